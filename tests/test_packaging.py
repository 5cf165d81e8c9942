"""A non-editable install works away from the checkout: the wheel carries the recipes, and
`maskrcnn train shapes_demo` / `maskrcnn demo` run from an unrelated folder.

The wheel is built from a copy of the project (no build isolation: nothing is downloaded) and
installed with `--no-deps` into a fresh venv. torch and the other dependencies come from the
running interpreter's site-packages, put on the new venv's path by a `.pth` line (a plain path:
that folder's own `.pth` files, such as an editable install of this project, are not run), so the
5 GB of torch are neither downloaded nor copied.
"""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone.fpn_channels=16", "model.box_head.fc_dim=32", "model.mask_head.conv_dim=8",
        "model.keypoint_head.conv_dim=8", "model.transform.min_size=[64]", "model.transform.min_size_test=64",
        "model.transform.max_size=64", "data.shapes_train_images=4", "data.shapes_val_images=2",
        "data.shapes_image_size=64", "data.num_workers=0", "train.batch_size=2", "train.warmup_iterations=1",
        "train.log_every=1", "train.cpu_threads=1"]


def _run(command: list, *, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's bin folder, an environment without PYTHONPATH) after installing the wheel."""
    work = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    source = work / "project"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", work / "dist", source], cwd=work, env=env)
    (wheel,) = (work / "dist").glob("maskrcnn-*.whl")

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, env=env)
    (venv_site,) = venv.glob("lib/python*/site-packages")
    (venv_site / "shared_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
          "-q", wheel], cwd=work, env=env)
    return venv / "bin", env, venv_site


def test_the_installed_package_is_the_wheel_and_has_its_recipes(installed, tmp_path):
    bin_dir, env, venv_site = installed
    where = _run([bin_dir / "python", "-c", "import maskrcnn.config as c; print(c.__file__); print(c.recipe_names())"],
                 cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(where[0]).is_relative_to(venv_site)  # not this checkout, not an editable install
    assert "shapes_demo" in where[1] and "coco_mask_rcnn_R50_FPN_1x" in where[1]


def test_train_a_recipe_by_name_and_the_demo_from_an_unrelated_folder(installed, tmp_path):
    bin_dir, env, _ = installed
    _run([bin_dir / "maskrcnn", "train", "shapes_demo", "train.iterations=2", *TINY, "train.output_dir=run"],
         cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "last.pth").is_file() and (tmp_path / "data" / "shapes" / "train.json").is_file()
    printed = _run([bin_dir / "maskrcnn", "demo", "--out", "demo", "--pictures", "1", "train.iterations=2", *TINY],
                   cwd=tmp_path, env=env).stdout
    assert "bbox" in printed and (tmp_path / "demo" / "last.pth").is_file()
