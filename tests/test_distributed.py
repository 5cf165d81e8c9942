"""Two processes with gloo on the CPU: DDP training keeps the ranks' weights identical, a rank whose
batches have no annotations does not hang, evaluation is gathered, one rank's signal stops both."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from maskrcnn.engine import distributed

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SCENARIOS = ("torchvision", "ours", "signal")


def _scenario(rank: int, out: Path, scenario: str) -> dict:
    from maskrcnn.engine import trainer
    from test_trainer import Rectangles, Sabotage, tiny_config, tiny_model, tiny_model_config

    # Every 4th item is empty, batch size 1: rank 1's batches at iterations 2 and 4 have no annotations.
    data = Rectangles(8, empty_every=4)
    if scenario == "ours":  # our model with box, mask and keypoint heads
        from maskrcnn.model.mask_rcnn import build_model

        torch.manual_seed(0)
        model = build_model(tiny_model_config())
    else:
        model = tiny_model()
    with torch.no_grad():  # different initial weights per rank: DDP must broadcast rank 0's
        for parameter in model.parameters():
            parameter.add_(rank)
    helpers = {}
    if scenario == "torchvision":
        config = tiny_config(out / "run", iterations=4, batch_size=1)
        result = trainer.train(config, model=model, train_dataset=data, val_dataset=Rectangles(3))
        helpers = {"gathered": distributed.all_gather_object(rank),
                   "mean": distributed.all_reduce_mean(torch.tensor([float(rank)])).item()}
    elif scenario == "ours":  # rank 1's 2nd batch is empty; DDP would fail in the 3rd if a grad were missing
        # with the weights' moving average, of the unwrapped module: result["model"] is the average
        config = tiny_config(out / "run", iterations=3, batch_size=1, ema_decay=0.5, ema_start=1)
        config.model = tiny_model_config()
        result = trainer.train(config, model=model, train_dataset=data)
    else:  # "signal": only rank 1 receives SIGTERM, during its 3rd iteration
        config = tiny_config(out / "run", iterations=6, batch_size=1)
        result = trainer.train(config, model=Sabotage(model, signal_at=3 if rank == 1 else None), train_dataset=data)
    torch.save(result["model"].state_dict(), out / f"weights{rank}.pt")
    return {"iteration": result["iteration"], "interrupted": result["interrupted"], "metrics": result["metrics"], **helpers}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Runs every scenario in turn (one process start-up for all: they cost more than the training)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from maskrcnn.engine import trainer
    from test_trainer import simple_batches

    trainer.build_train_batches = simple_batches  # rank r gets items (i * 2 + r) * batch_size ...
    distributed.init_distributed("cpu")  # joined here, so train() leaves the group up between scenarios
    try:
        for scenario in SCENARIOS:
            out = Path(out_dir) / scenario
            summary = _scenario(rank, out, scenario)
            (out / f"rank{rank}.json").parent.mkdir(parents=True, exist_ok=True)
            (out / f"rank{rank}.json").write_text(json.dumps(summary))
            distributed.barrier()
    finally:
        distributed.shutdown_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two spawned ranks with gloo; each scenario's per-rank summaries under runs / scenario."""
    out = tmp_path_factory.mktemp("ranks")
    # Spawned children get this process's sys.path, which holds tests/ (they import test_trainer).
    context = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 400
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 400 s (a hang in a collective?)")
    return out


def _summaries(runs: Path, scenario: str) -> list[dict]:
    ranks = [json.loads((runs / scenario / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return ranks


def _weights(runs: Path, scenario: str) -> list[dict]:
    return [torch.load(runs / scenario / f"weights{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_two_ranks_stay_identical_with_an_empty_rank_and_gather_evaluation(runs):
    ranks = _summaries(runs, "torchvision")
    weights = _weights(runs, "torchvision")
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    initial = __import__("test_trainer").tiny_model().state_dict()  # rank 0's initialisation
    assert all(not torch.equal(weights[0][name], value) for name, value in initial.items())
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 4
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and "bbox/AP" in ranks[0]["metrics"]
    assert ranks[0]["gathered"] == [0, 1] and ranks[0]["mean"] == 0.5
    # rank 0 alone writes the run's files
    records = [json.loads(line) for line in (runs / "torchvision" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]
    checkpoint = torch.load(runs / "torchvision" / "run" / "last.pth", weights_only=True)
    assert len(checkpoint["rng"]) == WORLD_SIZE and checkpoint["data_position"]["world_size"] == WORLD_SIZE


def test_our_model_two_ranks_with_an_empty_rank_stay_identical(runs):
    """Our model's losses stay connected on a batch without annotations: no rank waits forever.
    The weights' moving average (of each rank's unwrapped module) stays identical too."""
    ranks = _summaries(runs, "ours")
    assert [r["iteration"] for r in ranks] == [3, 3]
    weights = _weights(runs, "ours")
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    checkpoint = torch.load(runs / "ours" / "run" / "last.pth", weights_only=True)
    assert checkpoint["ema_updates"] == 2
    for name, value in checkpoint["model"].items():
        assert torch.equal(value, weights[0][name]), name


def test_a_signal_on_one_rank_stops_both_at_the_same_iteration(runs):
    ranks = _summaries(runs, "signal")
    assert [r["iteration"] for r in ranks] == [3, 3]
    assert ranks[1]["interrupted"] == "SIGTERM" and ranks[0]["interrupted"] == "a signal on another rank"
    assert torch.load(runs / "signal" / "run" / "last.pth", weights_only=True)["iteration"] == 3


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = distributed.init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main, context.enabled) == (0, 1, True, False)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.all_reduce_mean(torch.tensor([2.0])).item() == 2.0
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, context, torch.device("cpu")) is model
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.init_distributed("cpu")
