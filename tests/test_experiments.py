"""Smoke tests of the experiment scripts (experiments/): 2 iterations, 1 seed, a tiny `shapes` set.

They check that every row trains and is evaluated, that the results JSON and the printed table
(also written into a README block) come from the runs, and that a rerun reads the records back
instead of training again. The numbers themselves mean nothing after 2 iterations.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import _common  # noqa: E402
import _tables  # noqa: E402

# A 4 + 2 image set at 64 px, read at 64 px, 2 images a batch: seconds per row on a CPU.
TINY = [
    "data.shapes_train_images=4", "data.shapes_val_images=2", "data.shapes_image_size=64",
    "model.transform.min_size=[64]", "model.transform.min_size_test=64", "model.transform.max_size=64",
    "train.batch_size=2",
]


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the scripts set one thread for the whole process
    yield
    torch.set_num_threads(threads)


def _argv(tmp_path: Path, *extra: str, iterations: int = 2, seeds: tuple[int, ...] = (0,)) -> list[str]:
    return [f"data.root={tmp_path / 'shapes'}", *TINY, "--config", "shapes_demo",
            "--out", str(tmp_path / "out"), "--iterations", str(iterations), *extra,
            "--seeds", *map(str, seeds)]


def _readme(tmp_path: Path, experiment: str) -> Path:
    begin, end = _tables.block_markers(experiment)
    path = tmp_path / "README.md"
    path.write_text(f"before\n{begin}\nold table\n{end}\nafter\n")
    return path


def _no_training(*_args, **_kwargs):
    raise AssertionError("a finished run was trained again")


def _check_outputs(tmp_path: Path, script, readme: Path, printed: str) -> dict:
    out = tmp_path / "out"
    summary = json.loads((out / "results.json").read_text())
    for name, row in summary["runs"].items():
        metrics = row["seeds"]["0"]
        assert metrics["iterations"] == 2 and "bbox/AP" in metrics, name
        if name == "no mask loss":  # no mask head: box AP only
            assert "segm/AP" not in metrics and "gt_boxes/mIoU" not in metrics
            continue
        assert 0 <= metrics["gt_boxes/mIoU"] <= 1 and "segm/AP" in metrics, name
        assert row["mean"]["gt_boxes/mIoU"] == metrics["gt_boxes/mIoU"] and row["sd"] == {}, name
    table = (out / "table.md").read_text()
    assert table.strip() in printed  # the printed table is the written one
    assert readme.read_text() == (
        f"before\n{_tables.block_markers(script.EXPERIMENT)[0]}\n{table}{_tables.block_markers(script.EXPERIMENT)[1]}"
        "\nafter\n"
    )
    for name, row in summary["runs"].items():  # each row's mIoU as the table prints it
        if script.COLUMNS[0].key in row["seeds"]["0"]:
            assert f"| {name} | 0 | {100 * row['seeds']['0'][script.COLUMNS[0].key]:.1f} |" in table
        else:
            assert f"| {name} | 0 | - |" in table
    return summary


@pytest.mark.parametrize("name", ["partial_supervision", "point_supervision"])
def test_script_trains_writes_and_rereads(name, tmp_path, capsys, monkeypatch, keep_threads):
    script = importlib.import_module(name)
    monkeypatch.setattr(_common, "RECORDS", tmp_path / "records")  # not the repository's tracked copies
    readme = _readme(tmp_path, name)
    script.main(_argv(tmp_path, "--table-only", "--readme", str(readme)))  # no run yet: the README is kept
    assert "old table" in readme.read_text() and not (tmp_path / "records").exists()
    script.main(_argv(tmp_path, "--readme", str(readme)))
    first = _check_outputs(tmp_path, script, readme, capsys.readouterr().out)
    expected_rows = {"partial_supervision": 6, "point_supervision": 10}[name]
    assert len(first["runs"]) == expected_rows
    assert len(list((tmp_path / "out").glob("*/seed0/result.json"))) == expected_rows

    # A rerun re-reads every record (training would raise) and prints the same table.
    monkeypatch.setattr(_common, "train_and_evaluate", _no_training)
    script.main(_argv(tmp_path, "--readme", str(readme)))
    printed = capsys.readouterr().out
    assert printed.count("done before, read back") == expected_rows
    second = _check_outputs(tmp_path, script, readme, printed)
    assert second["runs"] == first["runs"]

    # --readme also wrote every record into the tracked copy: a fresh clone, without OUT, re-reads them.
    tracked = json.loads((tmp_path / "records" / f"{name}.json").read_text())["records"]
    assert sorted(tracked) == sorted(f"{p.parent.parent.name}/seed0" for p in (tmp_path / "out").glob("*/seed0/result.json"))
    for path in (tmp_path / "out").glob("*/seed0/result.json"):
        path.unlink()
    script.main(_argv(tmp_path, "--readme", str(readme)))
    printed = capsys.readouterr().out
    assert printed.count("done before, read back") == expected_rows
    assert _check_outputs(tmp_path, script, readme, printed)["runs"] == first["runs"]

    # Another budget would mix configs in one table: it stops and names the difference.
    with pytest.raises(SystemExit, match=r"train.iterations: 2 -> 3"):
        script.main(_argv(tmp_path, iterations=3))
    # --table-only trains nothing; a seed not run yet is counted as missing.
    script.main(_argv(tmp_path, "--table-only", seeds=(0, 1)))
    printed = capsys.readouterr().out
    assert f"{expected_rows} of {2 * expected_rows} runs done (seeds 0 1)" in printed


def test_a_second_table_keeps_its_records_and_block_apart(tmp_path, capsys, monkeypatch, keep_threads):
    """`--table NAME`: runs of the same rows elsewhere (another CPU, another precision) train
    anew instead of reading the main table's tracked records back, and their records and README
    block are NAME's: the main table's are left as they were."""
    script = importlib.import_module("point_supervision")
    monkeypatch.setattr(_common, "RECORDS", tmp_path / "records")
    main_begin, main_end = _tables.block_markers(script.EXPERIMENT)
    second_begin, second_end = _tables.block_markers("points_b", script.EXPERIMENT)
    assert "experiments/point_supervision.py --table points_b --readme" in second_begin
    readme = tmp_path / "README.md"
    readme.write_text(f"{main_begin}\nold\n{main_end}\n{second_begin}\nold\n{second_end}\n")

    def argv(out: str, *extra: str) -> list[str]:
        return [f"data.root={tmp_path / 'shapes'}", *TINY, "--out", str(tmp_path / out), "--iterations", "2",
                *extra, "--readme", str(readme), "--seeds", "0", "--only", "full masks"]

    script.main(argv("main"))
    main_records = (tmp_path / "records" / "point_supervision.json").read_text()
    main_block = readme.read_text().split(second_begin)[0]
    assert "| full masks | 0 |" in main_block
    capsys.readouterr()

    script.main(argv("second", "--table", "points_b"))
    assert "=== full masks, seed 0" in capsys.readouterr().out  # trained, not read back from the main records
    assert (tmp_path / "second" / "full_masks" / "seed0" / "result.json").is_file()
    assert (tmp_path / "records" / "point_supervision.json").read_text() == main_records
    second = json.loads((tmp_path / "records" / "points_b.json").read_text())["records"]
    assert list(second) == ["full_masks/seed0"]
    text = readme.read_text()
    assert text.startswith(main_block) and "| full masks | 0 |" in text.split(second_begin)[1]

    # A fresh clone of the second table reads its own tracked records back.
    (tmp_path / "second" / "full_masks" / "seed0" / "result.json").unlink()
    monkeypatch.setattr(_common, "train_and_evaluate", _no_training)
    script.main(argv("second", "--table", "points_b"))
    assert "done before, read back" in capsys.readouterr().out


def test_cells_give_mean_sample_sd_and_seeds():
    # mean 0.2, sample sd sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1, in percent
    assert _tables.cell([0.1, 0.2, 0.3]) == "20.0 ± 10.0 (10.0 / 20.0 / 30.0)"
    assert _tables.cell([0.25]) == "25.0"  # one seed: no spread to give
    assert _tables.cell([None, -1.0]) == "-"  # missing, or COCOeval's -1 for "no such objects"
    assert _tables.cell([12.0, 14.0], percent=False) == "13.0 ± 1.4 (12.0 / 14.0)"
    table = _tables.results_table({"a": {0: {"k": 0.5}, 1: {"k": 0.7}}, "b": {}}, [_tables.Column("K", "k")],
                                  seeds=[0, 1])
    assert table.splitlines()[2:] == ["| a | 0 1 | 60.0 ± 14.1 (50.0 / 70.0) |", "| b | not run yet | - |"]


def test_block_rewrite_needs_its_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("no markers\n")
    with pytest.raises(SystemExit, match="partial_supervision table: begin"):
        _tables.rewrite_block(path, "partial_supervision", "table")


def test_schedule_scaled_to_the_iterations():
    from maskrcnn.config import load_config

    cosine = load_config("shapes_demo")
    assert cosine.train.schedule == "cosine"  # spans train.iterations by itself
    assert _common.scaled_schedule(cosine, 2000) == ["train.iterations=2000"]
    step = load_config(None, ["train.schedule=step", "train.iterations=600", "train.steps=[400,500]"])
    assert _common.scaled_schedule(step, 1500) == ["train.iterations=1500", "train.steps=[1000, 1250]"]
    scaled = load_config(None, ["train.schedule=step", "train.iterations=600", "train.steps=[400,500]",
                                *_common.scaled_schedule(step, 1500)])
    assert (scaled.train.iterations, scaled.train.steps, scaled.train.warmup_iterations) == (1500, [1000, 1250], 1000)


def test_unfinished_run_continues_only_under_its_config(tmp_path):
    from maskrcnn.config import load_config, save_config

    started = load_config("shapes_demo", ["train.iterations=2000"])
    save_config(started, tmp_path / "config.yaml")
    _common.check_unfinished(tmp_path, started)  # no last.pth yet: nothing to continue
    (tmp_path / "last.pth").write_bytes(b"")
    _common.check_unfinished(tmp_path, started)  # the same config: train(resume=True) continues it
    with pytest.raises(SystemExit, match="train.iterations: 2000 -> 3000"):
        _common.check_unfinished(tmp_path, load_config("shapes_demo", ["train.iterations=3000"]))


def test_a_key_added_to_the_config_after_a_run_is_its_default():
    """A record from before a config key existed ran with that key's default: the same config."""
    from maskrcnn.config import config_to_dict, load_config

    wanted = config_to_dict(load_config("shapes_demo", []))
    stored = copy.deepcopy(wanted)
    del stored["model"]["mask_head"]["loss_weight"]
    assert _common.config_differences(stored, wanted) == []
    changed = config_to_dict(load_config("shapes_demo", ["model.mask_head.loss_weight=0.5"]))
    assert _common.config_differences(stored, changed) == ["model.mask_head.loss_weight: 1.0 -> 0.5"]
