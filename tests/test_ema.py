"""The moving average of the weights (`train.ema_decay`, engine/ema.py) in the training loop.

The reference is the closed form ema_t = d * ema_{t-1} + (1 - d) * w_t, computed here in float64
from the trained weights that each periodic checkpoint holds.
"""

import pytest
import torch

from maskrcnn.engine import run_outputs, trainer
from maskrcnn.engine.training_state import load_training_state
from test_trainer import Rectangles, _one_thread, tiny_config, tiny_model  # noqa: F401 (_one_thread: autouse fixture)


def _checkpoints(folder, iterations):
    return [load_training_state(folder / f"model_{i:07d}.pth") for i in iterations]


def _assert_same(weights, reference, **tolerance):
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        assert torch.allclose(value.double(), reference[name].double(), **tolerance), name


def test_the_average_follows_the_closed_form_from_after_ema_start(tmp_path):
    decay = 0.75
    config = tiny_config(tmp_path, iterations=4, checkpoint_every=1, keep_checkpoints=4, ema_decay=decay, ema_start=1)
    summary = trainer.train(config, model=tiny_model(), train_dataset=Rectangles(8))
    saved = _checkpoints(tmp_path, range(1, 5))
    trained = [checkpoint["training_model"] for checkpoint in saved]
    assert [checkpoint["ema_updates"] for checkpoint in saved] == [0, 1, 2, 3]
    _assert_same(saved[0]["model"], trained[0], rtol=0, atol=0)  # not started: the trained weights
    reference = {name: value.double() for name, value in trained[1].items()}  # the first update copies
    for checkpoint, weights in zip(saved[1:], trained[1:]):
        if checkpoint is not saved[1]:
            reference = {name: decay * reference[name] + (1 - decay) * weights[name].double() for name in reference}
        _assert_same(checkpoint["model"], reference, rtol=1e-6, atol=1e-7)
    _assert_same(summary["model"].state_dict(), reference, rtol=1e-6, atol=1e-7)
    # the weights moved, so the average is not any one of them
    assert any(not torch.equal(value, trained[3][name]) for name, value in saved[3]["model"].items())
    assert any(not torch.equal(value, trained[2][name]) for name, value in trained[3].items())


def test_evaluation_best_and_pictures_use_the_average_once_it_has_started(tmp_path, monkeypatch):
    evaluated, drawn = [], []
    evaluate, draw = trainer.evaluate_model, run_outputs.write_pictures

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({name: value.clone() for name, value in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    def recording_draw(model, *args, **kwargs):
        drawn.append({name: value.clone() for name, value in model.state_dict().items()})
        return draw(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_model", recording_evaluate)
    monkeypatch.setattr(run_outputs, "write_pictures", recording_draw)
    data = Rectangles(4)
    config = tiny_config(tmp_path, iterations=4, eval_every=2, checkpoint_every=2, keep_checkpoints=2,
                         ema_decay=0.5, ema_start=2, pictures=1)
    trainer.train(config, model=tiny_model(), train_dataset=data, val_dataset=data)
    at_2, at_4 = _checkpoints(tmp_path, (2, 4))
    assert len(evaluated) == 2 and len(drawn) == 1
    _assert_same(evaluated[0], at_2["training_model"], rtol=0, atol=0)  # before the average starts
    _assert_same(at_2["model"], at_2["training_model"], rtol=0, atol=0)
    _assert_same(evaluated[1], at_4["model"], rtol=0, atol=0)  # the average (updated after iterations 3 and 4)
    _assert_same(drawn[0], at_4["model"], rtol=0, atol=0)
    assert at_4["ema_updates"] == 2
    assert any(not torch.equal(value, at_4["training_model"][name]) for name, value in at_4["model"].items())
    best = load_training_state(tmp_path / "best.pth")
    _assert_same(best["model"], evaluated[best["iteration"] // 2 - 1], rtol=0, atol=0)


def test_a_non_finite_average_is_never_written(tmp_path, monkeypatch):
    from torch.optim.swa_utils import AveragedModel

    update = AveragedModel.update_parameters

    def poisoned_update(self, model):
        update(self, model)
        if int(self.n_averaged) == 2:  # after iteration 2 only the average is poisoned
            next(self.module.parameters()).detach().fill_(float("inf"))

    data = Rectangles(4)
    trainer.train(tiny_config(tmp_path, iterations=1, ema_decay=0.5), model=tiny_model(), train_dataset=data)
    good = (tmp_path / "last.pth").read_bytes()
    monkeypatch.setattr(AveragedModel, "update_parameters", poisoned_update)
    with pytest.raises(trainer.NonFiniteStateError, match=r"iteration 3: 1 tensors .* \(e\.g\. ema\.module\.") as error:
        trainer.train(tiny_config(tmp_path, iterations=3, ema_decay=0.5), resume=True, model=tiny_model(),
                      train_dataset=data)
    assert "last.pth was not written" in str(error.value)
    assert (tmp_path / "last.pth").read_bytes() == good
