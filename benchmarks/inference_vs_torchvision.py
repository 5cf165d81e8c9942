"""Whole-model CPU inference: torchvision's Mask R-CNN against ours (eager and the optimize_for_cpu
modes) on the same seeded weights, at the real size by default (one 480 x 640 image, 800 px inside).

    .venv/bin/python benchmarks/inference_vs_torchvision.py                        # all modes
    .venv/bin/python benchmarks/inference_vs_torchvision.py --modes strict,fast --repeats 5
    .venv/bin/python benchmarks/inference_vs_torchvision.py --arch keypointrcnn --modes eager

One process, the models run interleaved (so that a change in the machine's load hits all alike):
median per-stage times, ratios against torchvision, and how the outputs compare (strict: equal end
to end; fast / bf16: each stage on torchvision's own inputs, as tests/test_cpu_inference.py).
The allocator setting is process-wide, so in that process it is left alone and measured apart:
`--processes N` alternates N processes with glibc's default allocator and N with
`keep_allocator_off_mmap`, each timing torchvision and the modes, and prints the ratios.
Nothing is downloaded: torchvision's model has seeded random weights.

`--results docs/results.md` rewrites the marked table block there from this run's figures,
`--summary README.md` the README's one-line summary of them, and `--json FILE` keeps them as numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

from maskrcnn._markdown import rewrite_block
from maskrcnn.checkpoint.torchvision import from_torchvision
from maskrcnn.engine import cpu_inference
from maskrcnn.engine.cpu_inference import optimize_for_cpu
from maskrcnn.engine.precision import read_cpu_flags

BUILDERS = {
    "fasterrcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "maskrcnn": torchvision.models.detection.maskrcnn_resnet50_fpn,
    "keypointrcnn": torchvision.models.detection.keypointrcnn_resnet50_fpn,
}
STAGES = ("transform", "backbone", "rpn", "roi_heads", "postprocess")


def build_torchvision(arch: str, seed: int, min_size: int, max_size: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[arch](weights=None, weights_backbone=None, min_size=min_size, max_size=max_size,
                           box_score_thresh=0.0)
    # With random weights the class logits spread over tens of units: every softmax score rounds to
    # exactly 1.0 and the order of tied detections is arbitrary. A softer classifier gives distinct
    # scores, so that the two models' outputs can be compared one by one.
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.25)
    return model.eval()


def staged(model, images, *, postprocess) -> tuple[dict[str, float], list[dict]]:
    """A detector's eval-mode forward, one timed stage at a time. `postprocess(detections,
    image_sizes, original_sizes)` is the model's last stage: torchvision's transform.postprocess,
    or our `_to_original_size` (which includes pasting)."""
    times, clock = {}, Clock()
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    batch, _ = model.transform(images)
    times["transform"] = clock.lap()
    features = model.backbone(batch.tensors)
    times["backbone"] = clock.lap()
    proposals, _ = model.rpn(batch, features)
    times["rpn"] = clock.lap()
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    times["roi_heads"] = clock.lap()
    detections = postprocess(detections, batch.image_sizes, original_sizes)
    times["postprocess"] = clock.lap()
    return times, detections


def staged_torchvision(model, images) -> tuple[dict[str, float], list[dict]]:
    return staged(model, images, postprocess=model.transform.postprocess)


def staged_ours(model, images) -> tuple[dict[str, float], list[dict]]:
    return staged(model, images, postprocess=model._to_original_size)


class Clock:
    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def build_all(args) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    theirs = build_torchvision(args.arch, args.seed, args.size, args.max_size)
    ours = from_torchvision(theirs)
    # a 91-slot COCO head: ours never predicts the N/A slots, torchvision's own model does; the
    # comparison needs the same candidates
    ours.roi_heads.suppressed_labels = ()
    models = {}
    for mode in args.modes:
        start = time.perf_counter()
        models[mode] = optimize_for_cpu(ours, mode=mode, tune_allocator=False)  # see child()
        print(f"optimize_for_cpu(mode={mode!r}): {time.perf_counter() - start:.1f} s "
              f"(got {models[mode].inference_mode!r})", flush=True)
    return theirs, models


def make_images(args) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.rand(3, args.height, args.width, generator=generator) for _ in range(args.images)]


def interleaved(theirs, models, images, repeats) -> tuple[dict, dict]:
    """Per-stage median seconds of every model, runs interleaved; and each model's last outputs."""
    runs = {"torchvision": (staged_torchvision, theirs)} | {m: (staged_ours, model) for m, model in models.items()}
    samples = {name: [] for name in runs}
    outputs = {}
    with torch.no_grad():
        for staged, model in runs.values():  # warm-up: oneDNN primitives, allocator
            staged(model, images)
        for _ in range(repeats):
            for name, (staged, model) in runs.items():
                times, outputs[name] = staged(model, images)
                samples[name].append(times | {"total": sum(times.values())})
    medians = {name: {k: statistics.median(s[k] for s in runs_) for k in runs_[0]} for name, runs_ in samples.items()}
    return medians, outputs


def print_table(medians: dict) -> None:
    reference = medians["torchvision"]
    columns = [*STAGES, "total"]
    print(f"{'':12s}" + "".join(f"{c:>12s}" for c in columns) + f"{'speed-up':>10s}")
    for name, times in medians.items():
        row = "".join(f"{times[c] * 1000:10.0f}ms" for c in columns)
        print(f"{name:12s}{row}{reference['total'] / times['total']:9.2f}x")
    print("per-stage speed-up (torchvision / ours):")
    for name, times in medians.items():
        if name != "torchvision":
            print(f"  {name:10s}" + ", ".join(f"{c} {reference[c] / times[c]:.2f}x" for c in columns))


def compare_end_to_end(got: list[dict], expected: list[dict]) -> str:
    for g, e in zip(got, expected):
        if set(g) != set(e):
            return f"different keys {sorted(g)} vs {sorted(e)}"
        for key in e:
            if g[key].shape != e[key].shape:
                return f"{key}: shape {tuple(g[key].shape)} vs {tuple(e[key].shape)}"
            if not torch.equal(g[key], e[key]):
                diff = (g[key].float() - e[key].float()).abs().max().item()
                return f"{key} differ, by up to {diff:.2e}"
    return "identical (boxes, labels, scores, masks: torch.equal)"


def compare_stages(model, theirs, images) -> tuple[str, str]:
    """The stages of `model` on torchvision's own inputs: max differences, in the issue's units (the
    features alone, and every stage)."""
    with torch.no_grad():
        batch, _ = theirs.transform(images)
        sizes = [tuple(s) for s in batch.image_sizes]
        features = theirs.backbone(batch.tensors)
        got_features = model.backbone(batch.tensors)
        feature_error = max(((got_features[k] - features[k]).abs().max() / features[k].abs().max()).item()
                            for k in features)
        proposals, _ = theirs.rpn(batch, features)
        expected, _ = theirs.roi_heads(features, proposals, batch.image_sizes)
        detections = model.roi_heads._forward_box(features, proposals, sizes)
        same_labels = all(torch.equal(d["labels"], e["labels"]) for d, e in zip(detections, expected))
        box_error = max((d["boxes"] - e["boxes"]).abs().max().item() if same_labels else float("inf")
                        for d, e in zip(detections, expected))
        score_error = max((d["scores"] - e["scores"]).abs().max().item() if same_labels else float("inf")
                          for d, e in zip(detections, expected))
        given = [{"boxes": e["boxes"], "labels": e["labels"]} for e in expected]
        model.roi_heads.run_on_boxes(features, sizes, given)
        mask_error = max((g["masks"] - e["masks"]).abs().max().item() for g, e in zip(given, expected) if "masks" in e)
    features = f"features within {feature_error:.1e} of their scale"
    return features, (f"{features}; on torchvision's proposals: same labels {same_labels}, boxes {box_error:.1e} px, "
                      f"scores {score_error:.1e}; 28x28 mask probabilities {mask_error:.1e}")


def child(args) -> None:
    """One process of the allocator comparison: prints {name: total seconds} as JSON."""
    if args.child == "heap":
        cpu_inference.keep_allocator_off_mmap()
    theirs, models = build_all(args)
    medians, _ = interleaved(theirs, models, make_images(args), args.repeats)
    print("RESULT " + json.dumps({name: times["total"] for name, times in medians.items()}), flush=True)


def alternate_processes(args) -> dict[str, dict[str, float]]:
    """N processes with each allocator setting, alternating; medians of each model's totals."""
    totals: dict[str, dict[str, list[float]]] = {"default": {}, "heap": {}}
    for _ in range(args.processes):
        for setting in ("default", "heap"):
            command = [sys.executable, __file__, "--child", setting, *args.passthrough]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
            for name, total in result.items():
                totals[setting].setdefault(name, []).append(total)
            print(f"  process ({setting} allocator): " + ", ".join(f"{k} {v:.2f} s" for k, v in result.items()),
                  flush=True)
    default = {k: statistics.median(v) for k, v in totals["default"].items()}
    heap = {k: statistics.median(v) for k, v in totals["heap"].items()}
    print("allocator off mmap (median total over processes, default -> heap):")
    for name in default:
        print(f"  {name:12s} {default[name]:.2f} -> {heap[name]:.2f} s ({default[name] / heap[name]:.2f}x)")
    print("as shipped (torchvision with the default allocator, our modes with theirs off mmap):")
    processes = {"default": default, "heap": heap}
    for name, ratio in shipped_ratios(processes).items():
        print(f"  {name:12s} {ratio:.2f}x torchvision")
    return processes


def shipped_ratios(processes: dict[str, dict[str, float]]) -> dict[str, float]:
    """torchvision with glibc's default allocator over each of our modes with it kept off mmap."""
    default, heap = processes["default"], processes["heap"]
    return {name: default["torchvision"] / total for name, total in heap.items() if name != "torchvision"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(BUILDERS), default="maskrcnn")
    parser.add_argument("--modes", default="eager,strict,fast,bf16", help="comma-separated optimize_for_cpu modes")
    parser.add_argument("--images", type=int, default=1, help="images per batch")
    parser.add_argument("--height", type=int, default=480, help="the image's own size, before the transform")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--size", type=int, default=800, help="min_size of both models (shorter side inside)")
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=0,
                        help="then alternate this many processes per allocator setting (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="rewrite the marked table block in this Markdown file")
    parser.add_argument("--summary", type=Path, help="rewrite the marked one-line summary block in this Markdown file")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--child", choices=("default", "heap"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                        if k not in ("processes", "child", "modes", "results", "summary", "json")] + [f"--modes={args.modes}"]
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def compare_outputs(mode: str, model, theirs, images, outputs) -> str:
    """How `mode`'s outputs compare with torchvision's, as the tests check them: end to end for eager
    and strict, stage by stage for fast; bf16's features (on random weights its near-tied class
    scores reorder: its accuracy is the AP of a trained model, benchmarks/bf16_accuracy.py)."""
    end_to_end = compare_end_to_end(outputs[mode], outputs["torchvision"])
    print(f"{mode}: end to end {end_to_end}")
    if mode not in ("fast", "bf16"):
        return f"end to end: {end_to_end}"
    features, stages = compare_stages(model, theirs, images)
    print(f"{mode}: stage by stage {stages}")
    return f"stage by stage: {stages}" if mode == "fast" else f"{features} (its AP: bf16_accuracy.py)"


def cpu_description() -> str:
    """The CPU's model name and the instruction sets the fast paths look for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = read_cpu_flags()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = ", AMX bf16" if "amx_bf16" in flags else ", AVX-512 bf16" if "avx512_bf16" in flags else ""
    return f"{name}, {os.cpu_count()} CPUs, {vector}{bf16}"


def markdown(args, medians: dict, outputs: dict[str, str], processes: dict | None, loads: tuple) -> str:
    """The results block: the one-process table, then the allocator processes' "as shipped" line."""
    reference = medians["torchvision"]
    columns = [*STAGES[1:], "total"]
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_description()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, torchvision {torchvision.__version__}, "
             f"load average {loads[0]:.1f} before / {loads[1]:.1f} after; `python benchmarks/"
             f"inference_vs_torchvision.py {' '.join(sys.argv[1:])}`. {args.images} image of "
             f"{args.height} x {args.width} at {args.size} px, median of {args.repeats} interleaved runs in one "
             "process with glibc's default allocator, torchvision / ours:", "",
             "| mode | " + " | ".join(columns) + " | outputs |", "|---" * (len(columns) + 2) + "|",
             "| torchvision | " + " | ".join(f"{reference[c] * 1000:.0f} ms" for c in columns) + " | |"]
    for name, times in medians.items():
        if name != "torchvision":
            ratios = [f"{reference[c] / times[c]:.2f}x" for c in columns]
            ratios[-1] = f"**{ratios[-1]}**"
            lines.append(f"| {name} | " + " | ".join(ratios) + f" | {outputs[name]} |")
    if processes:
        default, heap = processes["default"], processes["heap"]
        shipped = ", ".join(f"{name} **{ratio:.2f}x**" for name, ratio in shipped_ratios(processes).items())
        lines += ["", f"Then {args.processes} process(es) with glibc's default allocator alternating with "
                  f"{args.processes} that keep it off mmap (as `optimize_for_cpu` sets up strict, fast and bf16), "
                  "median total: " + ", ".join(f"{n} {default[n]:.2f} -> {heap[n]:.2f} s" for n in default)
                  + f". As shipped (torchvision with the default allocator, ours off mmap): {shipped}."]
    return "\n".join(lines) + "\n"


def summary(medians: dict, processes: dict | None) -> str:
    """The README's line: the ratios as shipped (or in one process, without --processes)."""
    if processes:
        ratios, how = shipped_ratios(processes), "as shipped"
    else:
        ratios = {n: medians["torchvision"]["total"] / t["total"] for n, t in medians.items() if n != "torchvision"}
        how = "in one process, glibc's default allocator for every model"
    figures = ", ".join(f"{name} **{ratio:.2f}x**" for name, ratio in ratios.items())
    return (f"Last full run of `benchmarks/inference_vs_torchvision.py` ({time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{cpu_description()}, {torch.get_num_threads()} threads; 800 px, 100 detections with masks), {how}: "
            f"{figures} torchvision's eager model (targets: strict 1.5x, fast 1.7x, bf16 3x). Per stage, the "
            "outputs' differences and earlier runs: [docs/results.md](docs/results.md#cpu-inference-optimize_for_cpu).\n")


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    load_before = os.getloadavg()[0]
    print(f"{args.arch}_resnet50_fpn, {args.images} image(s) of {args.height}x{args.width} at {args.size} px, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_before:.1f}, {cpu_description()}, bf16 units used: {cpu_inference.has_fast_bf16()}")
    theirs, models = build_all(args)
    images = make_images(args)
    medians, outputs = interleaved(theirs, models, images, args.repeats)
    print(f"median of {args.repeats} interleaved runs, glibc's default allocator (load average now "
          f"{os.getloadavg()[0]:.1f}); detections: {[len(o['boxes']) for o in outputs['torchvision']]}")
    print_table(medians)
    comparisons = {mode: compare_outputs(mode, model, theirs, images, outputs) for mode, model in models.items()}
    processes = alternate_processes(args) if args.processes else None
    loads = (load_before, os.getloadavg()[0])
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_description(), "load_average": loads, "medians": medians,
                                         "outputs": comparisons, "processes": processes}, indent=1))
    if args.results:
        rewrite_block(args.results, "inference_vs_torchvision", "benchmarks/inference_vs_torchvision.py --results",
                      markdown(args, medians, comparisons, processes, loads))
        print(f"wrote the table block in {args.results}")
    if args.summary:
        rewrite_block(args.summary, "inference_vs_torchvision summary", "benchmarks/inference_vs_torchvision.py --summary",
                      summary(medians, processes))
        print(f"wrote the summary block in {args.summary}")


if __name__ == "__main__":
    main()
