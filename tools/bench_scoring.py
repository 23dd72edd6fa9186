"""Capacity scoring speed (issue 3): ResNet-56, and a generated ~1 GiB model with external data.

    python -m tools.bench_scoring

Norm metrics must run at memory speed: their time is compared, in the same run, with a plain chunked
float64 sum over the same memory-mapped weights (the floor for reading every weight once). Rank metrics on
the 4096 x 4096 layers use the randomized method; its error is measured against the exact spectrum on one
layer. Peak resident memory shows whether weights were copied. Results: 'scoring' section of BENCHMARKS.md.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune import api
from onnxprune.io import load_model, save_model
from onnxprune.scoring import capacity
from tools.benchlib import ROOT, bench_resnet56, machine, today, write_section

LAYERS, SIDE = 16, 4096  # 16 x 4096 x 4096 float32 = 1 GiB


def generate_big(path: Path) -> Path:
    """A chain of MatMul + Relu layers with random weights, saved with external data."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="input", shape=ir.Shape(["batch", SIDE]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits, cur = [], [], x
    for i in range(LAYERS):
        w = ir.Value(name=f"w{i}", shape=ir.Shape([SIDE, SIDE]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor((rng.standard_normal((SIDE, SIDE), dtype=np.float32) / 64), name=f"w{i}"))
        inits.append(w)
        mm = ir.node("MatMul", [cur, w], name=f"fc{i}")
        mm.outputs[0].name = f"h{i}"
        relu = ir.node("Relu", [mm.outputs[0]], name=f"relu{i}")
        relu.outputs[0].name = f"r{i}"
        nodes += [mm, relu]
        cur = relu.outputs[0]
    graph = ir.Graph([x], [cur], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="big")
    for v in graph.outputs:
        v.type = ir.TensorType(ir.DataType.FLOAT)
        v.shape = ir.Shape(["batch", SIDE])
    model = ir.Model(graph, ir_version=10)
    save_model(model, path, external_data=True)
    return path


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def plain_read(model: ir.Model) -> float:
    """The floor: one chunked float64-accumulated sum over every weight of the memory map."""
    total = 0.0
    for v in model.graph.initializers.values():
        flat = v.const_value.numpy().reshape(-1)
        for s in range(0, flat.size, 1 << 20):
            total += float(flat[s:s + (1 << 20)].sum(dtype=np.float64))
    return total


def main() -> int:
    folder = ROOT / "build" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["## Capacity scoring speed (issue 3)", "",
             "Command: `python -m tools.bench_scoring`  ", f"Machine: {machine()}  ", f"Date: {today()}", ""]
    r56 = bench_resnet56()
    lines += ["| model | metric | seconds (best of 3) |", "|---|---|---|"]
    for metric in capacity.METRICS:
        t = timed(lambda: api.score(r56, metric=metric))
        lines.append(f"| ResNet-56 (850,986 params) | {metric} | {t:.3f} |")
    big = folder / "big_1gib.onnx"
    if not big.exists():
        generate_big(big)
    size = sum(p.stat().st_size for p in folder.glob("big_1gib.onnx*"))
    model = load_model(big)
    floor = timed(lambda: plain_read(model))
    from onnxprune.io import fingerprint

    t_fp = timed(lambda: fingerprint(model))
    for metric in ("l2", "mean_abs"):
        t = timed(lambda: api.score(model, metric=metric))
        lines.append(f"| generated {LAYERS} x MatMul {SIDE}x{SIDE} ({size / 2**30:.2f} GiB, external data) | "
                     f"{metric} | {t:.2f} ({size / 2**30 / t:.2f} GiB/s; plain chunked read of the same weights: "
                     f"{floor:.2f} s, ratio {t / floor:.2f}; of which the model fingerprint, a second full read "
                     f"that hashes every byte: {t_fp:.2f} s) |")
    from onnxprune.analysis.graph import analyse_graph
    from onnxprune.analysis.layers import find_layers

    layer = find_layers(analyse_graph(model))[0]
    t = timed(lambda: capacity.layer_metrics(layer, ["effective_rank", "stable_rank"]), repeat=1)
    lines.append(f"| generated, one {SIDE}x{SIDE} layer | effective_rank + stable_rank (randomized, k=256) | "
                 f"{t:.1f} per layer ({LAYERS * t:.0f} for the model) |")
    w = next(iter(model.graph.initializers.values())).const_value.numpy()
    t0 = time.perf_counter()
    exact_sigma, energy, _ = capacity.singular_values(w[:2048, :2048])  # exact path timing reference
    sigma_full = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    exact_time = time.perf_counter() - t0
    old = capacity.EXACT_RANK_LIMIT
    approx_sigma, energy2, exact = capacity.singular_values(w)
    capacity.EXACT_RANK_LIMIT = old
    er_exact = capacity.effective_rank_fraction(sigma_full, float((sigma_full ** 2).sum()), SIDE, True)
    er_approx = capacity.effective_rank_fraction(approx_sigma, energy2, SIDE, exact)
    sr_exact = float((sigma_full ** 2).sum() / sigma_full[0] ** 2) / SIDE
    sr_approx = energy2 / float(approx_sigma[0]) ** 2 / SIDE
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += [
        "",
        f"Randomized vs exact spectrum on one {SIDE}x{SIDE} layer (exact SVD {exact_time:.0f} s): effective rank "
        f"{er_approx:.4f} vs {er_exact:.4f} ({100 * abs(er_approx - er_exact) / er_exact:.2f} % error), stable rank "
        f"{sr_approx:.4f} vs {sr_exact:.4f} ({100 * abs(sr_approx - sr_exact) / sr_exact:.2f} % error). "
        "(A random Gaussian matrix has a flat spectrum, the hardest case for the tail approximation.)",
        "",
        f"Peak resident memory of the whole benchmark: {peak:.2f} GiB (includes generating the model once and the "
        f"exact float64 SVD of one layer; the scoring itself reads the memory map in 1 M-element chunks).",
    ]
    write_section("scoring", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
