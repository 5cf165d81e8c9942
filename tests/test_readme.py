"""The README's Python example runs as written."""

import functools
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


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces to hyphens."""
    text = re.sub(r"`|\*|\[|\]\([^)]*\)", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _prose(path: Path) -> str:
    """A Markdown file without its code blocks (a `# comment` there is not a heading)."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


@functools.cache
def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(path), flags=re.M):
        anchor = _github_anchor(heading)
        count = seen.get(anchor, 0)  # GitHub numbers repeated headings: name, name-1, name-2
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def test_relative_links_and_their_anchors_exist():
    """Every relative link of the project's Markdown files names a file that exists and, with a
    `#anchor`, a heading of that file (headings that change with the results break links silently)."""
    root = README.parent
    documents = [README, *sorted((root / "docs").glob("*.md")), *sorted((root / "experiments").glob("*.md"))]
    broken = []
    for document in documents:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(document)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (document.parent / file_part).resolve() if file_part else document
            if not linked.exists():
                broken.append(f"{document.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{document.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
