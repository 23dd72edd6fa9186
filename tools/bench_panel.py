"""Benchmark of issue 16 on the panel of real-world structures (models/panel.py) and ResNet-56, each at its
real input shape: FLOPs, channel-pruned FLOPs at a 30 % FLOP target with default options (``--round-to
auto``), ONNX Runtime CPU latency dense vs pruned (default threads, median of interleaved rounds, batch 1
and a usual batch), and the time of ``inspect`` at a given shape against loading plus onnx's shape
inference on the same model. ResNet-56 is also pruned to 2x fewer FLOPs (default plan) and timed at
batch 256.

    python -m tools.bench_panel [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune import api
from onnxprune.runtime.timing import latency
from tools.benchlib import ROOT, bench_resnet56, machine, today, write_section

FOLDER = ROOT / "build" / "bench" / "panel"
USUAL_BATCH = {"yolo": 8, "dbnet": 8, "lcnet": 64, "fixed_batch": 1, "nhwc": 64, "resnet56": 256}


def _shape(text: str) -> dict[str, tuple[int, ...]]:
    name, _, dims = text.rpartition(":")
    return {name: tuple(int(d) for d in dims.split(","))}


def _inspect_ratio(path: Path, shape: str, repeats: int = 3) -> float:
    """Median time of api.inspect at ``shape`` over the median time of onnx.load + infer_shapes."""
    t_inspect, t_base = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        proto = onnx.load(str(path))
        onnx.shape_inference.infer_shapes(proto, data_prop=True)
        t_base.append(time.perf_counter() - t)
        t = time.perf_counter()
        api.inspect(path, input_shapes=[shape])
        t_inspect.append(time.perf_counter() - t)
    return float(np.median(t_inspect) / np.median(t_base))


def _row(name: str, path: Path, shape: str, target: float, rounds: int) -> dict:
    plan = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=target,
                        input_shapes=[shape])
    out = FOLDER / f"{name}_pruned{int(target * 100)}.onnx"
    res = api.apply(path, plan, out, force=True)
    shapes = _shape(shape)
    batch1 = latency([path, out], "cpu", batch=1, rounds=rounds, shapes=shapes)
    usual = USUAL_BATCH[name]
    batchn = batch1 if usual == 1 else latency([path, out], "cpu", batch=usual, rounds=rounds, runs=5, shapes=shapes)
    return {"name": name, "shape": shape, "flops": res.totals["flops_before"], "pruned_flops": res.totals["flops_after"],
            "round_to": plan.options["round_to"], "lat1": batch1, "batch": usual, "latn": batchn,
            "inspect_ratio": _inspect_ratio(path, shape)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_panel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args(argv)
    from models.panel import PANEL, export_panel_model

    FOLDER.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in PANEL:
        path, _, info = export_panel_model(name, FOLDER, verify=False)
        rows.append(_row(name, path, info["input_shape"], 0.3, args.rounds))
        print(rows[-1], flush=True)
    r56 = bench_resnet56()
    rows.append(_row("resnet56", r56, "input:1,3,32,32", 0.3, args.rounds))
    print(rows[-1], flush=True)
    half = _row("resnet56", r56, "input:1,3,32,32", 0.5, args.rounds)
    print(half, flush=True)

    def ms(v):
        return f"{v:.3f}"

    lines = ["## Real-world structures: default channel plans (issue 16)", "",
             f"`python -m tools.bench_panel --rounds {args.rounds} --write`, {machine()}, {today()}.", "",
             "Channel plan: `allocate --method uniform --granularity channel --budget flops --target-sparsity 0.3 "
             "--input-shape SHAPE` (default `--round-to auto`), applied without data. Latency: ONNX Runtime CPU, "
             "default threads, median of interleaved rounds, random inputs at the shape (batch 1 and the usual "
             "batch). inspect: `api.inspect` at the shape over `onnx.load` + `onnx.shape_inference.infer_shapes` "
             "(median of 3).", "",
             "| model | shape | FLOPs | pruned FLOPs | round-to | batch 1 dense / pruned ms | speed-up | usual batch | "
             "dense / pruned ms | speed-up | inspect / (load + shape inference) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['shape']}` | {r['flops'] / 1e6:.2f}M | {r['pruned_flops'] / 1e6:.2f}M | "
            f"{r['round_to']} | {ms(r['lat1'][0])} / {ms(r['lat1'][1])} | {r['lat1'][0] / r['lat1'][1]:.2f}x | "
            f"{r['batch']} | {ms(r['latn'][0])} / {ms(r['latn'][1])} | {r['latn'][0] / r['latn'][1]:.2f}x | "
            f"{r['inspect_ratio']:.2f}x |")
    flop_ratio = half["flops"] / half["pruned_flops"]
    speed = half["latn"][0] / half["latn"][1]
    lines += ["", f"ResNet-56, default channel plan at 50 % of the FLOPs (round-to {half['round_to']}): "
              f"{flop_ratio:.2f}x fewer FLOPs, {speed:.2f}x faster at batch 256 "
              f"({speed / flop_ratio:.2f} of the FLOP ratio; target at least 0.8), "
              f"{half['lat1'][0] / half['lat1'][1]:.2f}x at batch 1.", "",
              "Why not 0.8: with AVX-512, ONNX Runtime's NCHWc convolutions work on blocks of 16 channels, and "
              "ResNet-56's first stage, the slowest per FLOP (16 channels at 32x32), is one block wide. Whole "
              "blocks of 16 elsewhere remove at most 43 % of the FLOPs (1.76x, measured at 0.80 of the FLOP "
              "ratio); past that only 16 -> 8 cuts are left, and they take those convolutions off the blocked "
              "kernels. `--round-to auto` now keeps every other group on the block and takes the finer step "
              "only on the groups that touch the fewest layers."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("panel", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
