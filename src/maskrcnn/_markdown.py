"""Markdown blocks that scripts rewrite from their own results (the experiments' tables, the
benchmarks' figures), so that no measured table is typed by hand. A block lies between two marker
lines naming the script that writes it; only what lies between them is replaced."""

from __future__ import annotations

from pathlib import Path


def block_markers(name: str, writer: str) -> tuple[str, str]:
    """The begin and end lines of block `name`, written by `writer` (a command, for the reader)."""
    return (f"<!-- {name} table: begin (written by {writer}; do not edit by hand) -->",
            f"<!-- {name} table: end -->")


def rewrite_block(path: Path, name: str, writer: str, text: str) -> None:
    """Replace what lies between the markers of block `name` in `path` with `text`."""
    begin, end = block_markers(name, writer)
    content = Path(path).read_text()
    start, stop = content.find(begin), content.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{path}: needs the two lines\n{begin}\n{end}\n(in this order) around the table")
    Path(path).write_text(content[: start + len(begin)] + "\n" + text.rstrip("\n") + "\n" + content[stop:])
