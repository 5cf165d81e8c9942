"""Our checkpoint format: atomic writes, the weights_only reader, save / load round trip."""

import subprocess
import sys
import textwrap

import pytest
import torch

from maskrcnn.checkpoint.format import atomic_save, load_checkpoint, read_checkpoint, save_checkpoint
from maskrcnn.model.mask_rcnn import build_model

torch.set_num_threads(1)


class _FailsWhilePickled:
    """Raises from inside torch.save, after part of the file has been written."""

    def __reduce__(self):
        raise RuntimeError("disk on fire")


def test_atomic_save_replaces_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]  # no temporary left behind


def test_error_mid_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "last.pth"
    atomic_save({"iteration": 7, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_save({"w": torch.zeros(100_000), "bad": _FailsWhilePickled()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_process_killed_mid_write_leaves_old_file_intact(tmp_path):
    """A hard crash (no Python cleanup at all) after the new bytes are written, before the rename."""
    path = tmp_path / "last.pth"
    atomic_save({"iteration": 7}, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, torch
        from maskrcnn.checkpoint import format
        os.fsync = lambda fd: os._exit(3)  # the process dies right there, like a power cut
        format.atomic_save({{"iteration": 8, "w": torch.zeros(10_000)}}, {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr.decode()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True) == {"iteration": 7}


def test_checkpoint_round_trip(tmp_path):
    from test_model import small_config  # the same small model as test_model.py

    torch.manual_seed(4)
    config = small_config()
    model = build_model(config)
    path = tmp_path / "sub" / "model.pth"
    save_checkpoint(path, model, model_config=config, iteration=12)
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.config == config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == "maskrcnn/1" and checkpoint["iteration"] == 12
    assert isinstance(load_checkpoint(checkpoint), type(model))
    model.eval()
    image = torch.rand(3, 90, 100)
    with torch.no_grad():
        expected, got = model([image])[0], loaded([image])[0]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a maskrcnn/1 checkpoint"):
        load_checkpoint({"model": {}})


def test_mapped_reading_gives_the_same_checkpoint_and_falls_back_for_old_files(tmp_path):
    """read_checkpoint(mmap=True), as the CLI loads models: the same tensors; a file in torch's
    legacy (non-zip) format, which cannot be mapped, is read as before."""
    state = {"format": "maskrcnn/1", "model": {"w": torch.randn(5, 3)}, "optimizer": {"state": {0: torch.ones(4)}}}
    for legacy in (False, True):
        path = tmp_path / f"legacy{legacy}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        mapped = read_checkpoint(path, mmap=True)
        assert torch.equal(mapped["model"]["w"], state["model"]["w"])
        assert torch.equal(mapped["optimizer"]["state"][0], torch.ones(4))


def test_reader_refuses_pickled_code_and_names_the_file(tmp_path):
    pickled_model = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_model)  # unpickling it would import and build classes
    with pytest.raises(ValueError, match=r"whole_model.pth cannot be read: it holds more than weights \(torch.nn"):
        read_checkpoint(pickled_model)
    torch.save({"format": "maskrcnn/0", "model": {}}, tmp_path / "old.pth")
    with pytest.raises(ValueError, match=r"old.pth: expected format 'maskrcnn/1', found 'maskrcnn/0'"):
        load_checkpoint(tmp_path / "old.pth")
