"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    losses = namespace["losses"]
    assert set(losses) == {
        "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_keypoint"
    }
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(namespace["detections"]) == 2
    assert not namespace["model"].training
