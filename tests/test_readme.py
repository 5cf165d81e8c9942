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


def test_readme_commands_parse():
    """Every `maskrcnn ...` command in the README's bash blocks is accepted by the parser (their
    effect is checked by the tests of each command: test_cli, test_checkpoint_*)."""
    import shlex

    from maskrcnn.cli import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = [line.split("#")[0] for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(c) for c in commands if c.strip().startswith("maskrcnn ")]
    assert any(c[1] == "convert" and "--config" in c for c in commands)
    for command in commands:
        words = [w for w in command[1:] if w != "..."]
        build_parser().parse_args(words)
