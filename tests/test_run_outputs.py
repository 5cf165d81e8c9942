"""What `train` leaves behind: log.txt, the per-class AP table, curves, pictures, kept checkpoints."""

import io
import json

import torch
from PIL import Image

from maskrcnn.engine import run_outputs, trainer
from test_trainer import SIZE, Rectangles, tiny_config, tiny_model_config


def _three_iterations(output_dir, **train):
    config = tiny_config(output_dir, iterations=3, checkpoint_every=1, keep_checkpoints=2, log_every=1, pictures=3,
                         **train)
    config.model = tiny_model_config()
    torch.set_num_threads(1)
    return trainer.train(config, train_dataset=Rectangles(6), val_dataset=Rectangles(4, seed=1))


def test_a_three_iteration_run_writes_its_outputs_and_keeps_n_checkpoints(tmp_path, capsys):
    summary = _three_iterations(tmp_path, eval_every=2, tensorboard=True)
    shown = capsys.readouterr()
    assert summary.iteration == 3

    periodic = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert periodic == ["model_0000002.pth", "model_0000003.pth"]  # exactly keep_checkpoints=2
    assert (tmp_path / "last.pth").is_file() and (tmp_path / "best.pth").is_file()

    log = (tmp_path / "log.txt").read_text()
    assert "\r" not in log
    assert "keep_checkpoints: 2" in log  # the config
    assert [line.split()[1] for line in log.splitlines() if line.startswith("iteration ")] == ["1/3", "2/3", "3/3"]
    assert log.count("AP per class") == 2  # the evaluations at iterations 2 and 3
    assert "AP per class" in shown.out and "class1" in shown.out  # printed as well

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}  # (these categories name no keypoints)
    assert set(metrics["segm"]["per_class"]) == {"class1", "class2"}
    assert Image.open(tmp_path / "training_curves.png").size[0] > 0

    pictures = sorted(p.name for p in (tmp_path / "predictions").glob("*.png"))
    assert pictures == ["0.png", "1.png", "2.png"]  # the COCO file names of the first 3 images
    assert Image.open(tmp_path / "predictions" / "0.png").size == (SIZE, SIZE)
    width, height = Image.open(tmp_path / "contact_sheet.png").size
    scaled = run_outputs.PICTURE_SCALE * SIZE
    assert width > 4 * scaled and height > 2 * scaled  # 2 pairs a row, 2 rows, enlarged 3x

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    (image,) = events.Images("predictions")
    assert image.step == 3 and (image.width, image.height) == (width, height)  # the contact sheet


def test_a_resumed_run_appends_to_its_log(tmp_path, capsys):
    _three_iterations(tmp_path)
    config = tiny_config(tmp_path, iterations=4, checkpoint_every=1, keep_checkpoints=2, log_every=1, pictures=0)
    config.model = tiny_model_config()
    trainer.train(config, resume=True, train_dataset=Rectangles(6), val_dataset=Rectangles(4, seed=1))
    log = (tmp_path / "log.txt").read_text()
    assert "iteration 3/3" in log and "iteration 4/4" in log
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000003.pth", "model_0000004.pth"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(tmp_path, capsys):
    values = {"lr": 0.01, "loss": 1.5, "loss_mask": 0.5, "loss_classifier": 1.0, "seconds_per_iteration": 0.5}
    with run_outputs.RunLog(tmp_path / "file.txt", append=False) as log:
        progress = run_outputs.Progress(total=4, initial=0, log=log, enabled=True)
        for iteration in range(1, 5):
            progress.step(iteration, values if iteration % 2 == 0 else None)
        progress.close()
    printed = capsys.readouterr().out
    assert printed.splitlines() == [line for line in printed.splitlines() if line.startswith("iteration ")]
    assert [line.split()[1] for line in printed.splitlines()] == ["2/4", "4/4"]
    assert "mask 0.500" in printed and "eta 0m 01s" in printed
    assert (tmp_path / "file.txt").read_text() == printed

    terminal = _Terminal()
    log = run_outputs.RunLog(tmp_path / "bar.txt", append=False)
    with log:
        log.terminal = terminal  # as if stderr were a terminal
        progress = run_outputs.Progress(total=4, initial=0, log=log, enabled=True)
        for iteration in range(1, 5):
            progress.step(iteration, values if iteration % 2 == 0 else None)
        progress.close()
    assert "\r" in terminal.getvalue()  # the bar redraws itself on the terminal ...
    in_file = (tmp_path / "bar.txt").read_text()
    assert "\r" not in in_file and [line.split()[1] for line in in_file.splitlines()] == ["2/4", "4/4"]  # ... not here
