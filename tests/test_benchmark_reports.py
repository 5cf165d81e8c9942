"""The benchmarks write their own results blocks (docs/results.md): the block is made from the
figures passed in, and only the marked block of the file changes."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from maskrcnn._markdown import block_markers, rewrite_block

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inference_block_is_made_from_the_measured_figures(tmp_path):
    benchmark = _load_benchmark("inference_vs_torchvision")
    stages = {"transform": 0.01, "backbone": 2.0, "rpn": 0.4, "roi_heads": 1.2, "postprocess": 0.1}
    medians = {"torchvision": stages | {"total": 3.71},
               "strict": {k: v / 2 for k, v in stages.items()} | {"total": 3.71 / 2}}
    processes = {"default": {"torchvision": 4.0, "strict": 3.0}, "heap": {"torchvision": 3.2, "strict": 2.5}}
    args = argparse.Namespace(images=1, height=480, width=640, size=800, repeats=3, processes=3)
    text = benchmark.markdown(args, medians, {"strict": "end to end: identical"}, processes, (0.4, 1.1))

    assert "| torchvision | 2000 ms | 400 ms | 1200 ms | 100 ms | 3710 ms | |" in text
    assert "| strict | 2.00x | 2.00x | 2.00x | 2.00x | **2.00x** | end to end: identical |" in text
    assert "strict **1.60x**" in text  # as shipped: torchvision's default-allocator 4.0 s / strict's 2.5 s
    assert "load average 0.4 before / 1.1 after" in text

    begin, end = block_markers("inference_vs_torchvision", "benchmarks/inference_vs_torchvision.py --results")
    path = tmp_path / "results.md"
    path.write_text(f"before\n{begin}\nold figures\n{end}\nafter\n")
    rewrite_block(path, "inference_vs_torchvision", "benchmarks/inference_vs_torchvision.py --results", text)
    written = path.read_text()
    assert written.startswith(f"before\n{begin}\n") and written.endswith(f"{end}\nafter\n")
    assert "old figures" not in written and text in written


def test_a_file_without_the_block_is_an_error(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("no block here\n")
    with pytest.raises(SystemExit, match="inference_vs_torchvision table: begin"):
        rewrite_block(path, "inference_vs_torchvision", "the benchmark", "figures")
    assert path.read_text() == "no block here\n"


def test_inference_summary_line_gives_the_ratios_as_shipped():
    benchmark = _load_benchmark("inference_vs_torchvision")
    medians = {"torchvision": {"total": 4.0}, "fast": {"total": 2.0}}
    processes = {"default": {"torchvision": 4.0, "fast": 2.5}, "heap": {"torchvision": 3.0, "fast": 2.0}}
    assert "as shipped: fast **2.00x**" in benchmark.summary(medians, processes)
    assert "fast **2.00x**" in benchmark.summary(medians, None) and "one process" in benchmark.summary(medians, None)


def test_step_benchmark_starts_both_models_from_the_same_weights(tmp_path):
    """`demo_vs_torchvision.py --steps --weights`: our checkpoint, loaded into torchvision's model
    through the converter's key names, sets every torchvision weight to ours (the biases ours
    leave out, before a norm, to zero)."""
    import torch

    from maskrcnn.checkpoint.format import save_checkpoint
    from maskrcnn.checkpoint.torchvision import convert_torchvision_state_dict
    from maskrcnn.config import load_config
    from maskrcnn.model.mask_rcnn import build_model

    benchmark = _load_benchmark("demo_vs_torchvision")
    config = load_config("shapes_demo", ["model.backbone.fpn_channels=16", "model.box_head.fc_dim=32",
                                         "model.mask_head.conv_dim=8", "model.keypoint_head.conv_dim=8"])
    torch.manual_seed(0)
    ours = build_model(config.model)
    weights = save_checkpoint(tmp_path / "weights.pth", ours, model_config=config.model)
    theirs = benchmark.DenseMasks(benchmark.torchvision_mask_rcnn(config.model))
    before = {k: v.clone() for k, v in theirs.model.state_dict().items()}
    benchmark._load_same_weights(theirs, str(weights), torchvision_model=True)
    after = theirs.model.state_dict()
    names = convert_torchvision_state_dict(after)
    state = ours.state_dict()
    for key, name in zip(after, names):
        expected = state[name] if name in state else torch.zeros_like(after[key])
        if name not in state:
            assert key.endswith(".bias"), key
        torch.testing.assert_close(after[key], expected, rtol=0, atol=0)
    layers = [k for k in after if after[k].dim() >= 2]  # conv and linear weights: random at initialisation
    assert layers and all(not torch.equal(after[k], before[k]) for k in layers)  # torchvision's own init replaced
