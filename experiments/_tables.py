"""The experiments' tables: per-seed values, mean and spread, in Markdown; the README's marked blocks.

A table is printed from the results JSON only (`_common.collect_results`), so that the README
shows what the runs wrote and nothing typed by hand. Cells read `mean ± sd (seed 0 / seed 1 /
...)` in percent, where sd is the sample standard deviation over the seeds (n - 1 in the
denominator; none with one seed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from maskrcnn import _markdown


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # a flat metric of the per-seed results, e.g. "segm/novel/AP"
    percent: bool = True  # AP, mIoU and ratios are fractions: shown x 100


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _number(value: float, percent: bool) -> str:
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def cell(values: list[float | None], *, percent: bool = True) -> str:
    """`mean ± sd (v0 / v1 / v2)` over the seeds that have the value; "-" when none has."""
    present = [v for v in values if v is not None and math.isfinite(v) and v >= 0]
    if not present:
        return "-"
    mean, sd = mean_and_sd(present)
    if sd is None:
        return _number(mean, percent)
    per_seed = " / ".join(_number(v, percent) for v in present)
    return f"{_number(mean, percent)} ± {_number(sd, percent)} ({per_seed})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(
    runs: dict[str, dict[int, dict]], columns: list[Column], *, seeds: list[int], extra_rows: list[list[str]] = ()
) -> str:
    """One row per run name: the seeds it has, then one cell per column; runs without any
    finished seed read "not run yet". `runs[name][seed]` is that run's flat metrics."""
    header = ["run", "seeds"] + [c.header for c in columns]
    rows = []
    for name, by_seed in runs.items():
        done = [seed for seed in seeds if seed in by_seed]
        if not done:
            rows.append([name, "not run yet"] + ["-"] * len(columns))
            continue
        values = {c.key: [by_seed[seed].get(c.key) for seed in done] for c in columns}
        rows.append([name, " ".join(map(str, done))] + [cell(values[c.key], percent=c.percent) for c in columns])
    return markdown_table(header, rows + [list(row) for row in extra_rows])


def _writer(name: str, script: str | None) -> str:
    """The command that writes table `name`: the script's main table, or a `--table NAME` one."""
    if script is None or script == name:
        return f"experiments/{name}.py --readme"
    return f"experiments/{script}.py --table {name} --readme"


def block_markers(name: str, script: str | None = None) -> tuple[str, str]:
    return _markdown.block_markers(name, _writer(name, script))


def rewrite_block(path: Path, name: str, text: str, *, script: str | None = None) -> None:
    """Replace what lies between the block markers of table `name` (of `script`, the default
    being the script of the same name) in `path` with `text`."""
    _markdown.rewrite_block(path, name, _writer(name, script), text)
