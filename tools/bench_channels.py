"""Structured channel pruning of the pretrained ResNet-56 at about 2x fewer FLOPs (issue 5), CPU.

    python -m tools.bench_channels [--flops 0.5]

Compared in one run, each pruned to the same FLOP reduction (bisection on its own ratio; FLOPs counted by
onnxprune inspect on the exported ONNX graphs, 2 per multiply-accumulate):
- onnxprune: `allocate --granularity channel --budget flops --target-sparsity F` (methods uniform, lamp,
  erk; L2 criterion) then `apply` (channels physically removed, residual streams coupled through the
  option-A pads);
- onnxsim's `apply_structured_pruning` (whole output channels of single producer -> consumer chains);
- Torch-Pruning's MagnitudePruner (L2 magnitude, the classifier ignored) on the PyTorch model, exported to
  ONNX with BatchNorm folded.
Top-1 before any recovery on the lossless first 1,017 test images and on the JPEG 10k set; ONNX Runtime CPU
latency at batch 1 (median of many runs) and batch 256 (median of a few), every model timed in the same
interleaved rounds; speed-up = dense latency / pruned latency.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx

import onnxprune
from models.paths import cifar_data
from onnxprune import api
from onnxprune.runtime.session import create_session
from tools.benchlib import ROOT, machine, today, write_section


def flops_of(path) -> int:
    return onnxprune.inspect(path).flops


def bisect(fn, target: float, lo: float = 0.0, hi: float = 0.95, steps: int = 14):
    """fn(ratio) -> (fraction of FLOPs removed, payload): the payload whose fraction is nearest the target."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        frac, payload = fn(mid)
        if best is None or abs(frac - target) < abs(best[0] - target):
            best = (frac, payload, mid)
        if frac < target:
            lo = mid
        else:
            hi = mid
    return best


def onnxsim_pruned(path, folder, dense_flops: int, target: float):
    from onnxsim.pruning import apply_structured_pruning

    proto = onnx.load(str(path))

    def run(s):
        out = folder / f"onnxsim_{s:.4f}.onnx"
        onnx.save(apply_structured_pruning(proto, sparsity=s), str(out))
        return 1 - flops_of(out) / dense_flops, out

    return bisect(run, target, hi=0.99)


def torch_pruning_pruned(folder, dense_flops: int, target: float):
    import torch
    import torch_pruning as tp

    from models.export import export_onnx
    from models.resnet_cifar import load_pretrained

    example = torch.randn(1, 3, 32, 32)
    base_macs, _ = tp.utils.count_ops_and_params(load_pretrained(56), example)

    def prune(r):
        model = load_pretrained(56).eval()
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=r, ignored_layers=[model.linear])
        pruner.step()
        return model

    def run(r):
        macs, _ = tp.utils.count_ops_and_params(prune(r), example)
        return 1 - macs / base_macs, r

    frac, r, _ = bisect(run, target)
    model = prune(r)
    out = folder / "torch_pruning.onnx"
    export_onnx(model, torch.randn(2, 3, 32, 32), out)
    return 1 - flops_of(out) / dense_flops, out, r


def latency(paths: dict[str, object], batch1_runs: int, batch256_runs: int, rounds: int = 3) -> dict:
    """Median seconds per run at batch 1 and 256 for each model, timed in interleaved rounds."""
    sessions = {k: create_session(p, "cpu").session for k, p in paths.items()}
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    x256 = rng.standard_normal((256, 3, 32, 32)).astype(np.float32)
    times = {k: {1: [], 256: []} for k in paths}
    for s in sessions.values():  # warm up
        s.run(None, {"input": x1})
        s.run(None, {"input": x256})
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(batch1_runs):
                t = time.perf_counter()
                s.run(None, {"input": x1})
                times[k][1].append(time.perf_counter() - t)
            for _ in range(batch256_runs):
                t = time.perf_counter()
                s.run(None, {"input": x256})
                times[k][256].append(time.perf_counter() - t)
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of FLOPs to remove")
    parser.add_argument("--methods", default="uniform,lamp,erk")
    parser.add_argument("--limit", type=int, default=None, help="JPEG images for top-1 (default all 10,000)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    folder = ROOT / "build" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resnet56.onnx"
    if not path.exists():
        from models.export import build, export_onnx

        model, example, meta = build("resnet56")
        export_onnx(model, example, path, metadata=meta)
    dense = onnxprune.inspect(path)
    rows: dict[str, dict] = {"dense": {"path": path, "flops": dense.flops, "params": dense.params, "how": ""}}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        plan = api.allocate(path, method=method, granularity="channel", budget="flops", target_sparsity=args.flops)
        out = api.apply(path, plan, folder / f"channels_{method}.onnx", force=True)
        rows[f"onnxprune {method}"] = {"path": out.path, "seconds": time.perf_counter() - t0,
                                       "how": f"{out.totals['channels_removed']} channels removed"}
    frac, sim_path, s = onnxsim_pruned(path, folder, dense.flops, args.flops)
    rows["onnxsim apply_structured_pruning"] = {"path": sim_path, "how": f"sparsity {s:.3f}"}
    frac, tp_path, r = torch_pruning_pruned(folder, dense.flops, args.flops)
    rows["Torch-Pruning MagnitudePruner"] = {"path": tp_path, "how": f"pruning_ratio {r:.3f}"}
    for row in rows.values():
        info = onnxprune.inspect(row["path"])
        row["flops"], row["params"] = info.flops, info.params
        row["lossless"] = onnxprune.eval(row["path"], cifar_data("lossless")).top1
        row["jpeg"] = onnxprune.eval(row["path"], cifar_data("jpeg"), limit=args.limit).top1
    lat = latency({k: r["path"] for k, r in rows.items()}, batch1_runs=200, batch256_runs=5)
    base = lat["dense"]
    lines = [
        "## Channel pruning: ResNet-56 at about 2x fewer FLOPs (issue 5)", "",
        f"Command: `python -m tools.bench_channels {' '.join(argv or sys.argv[1:])}`  ",
        f"Machine: {machine()}  ", f"Date: {today()}", "",
        f"Target: {100 * args.flops:.0f} % fewer FLOPs; every pruner brought there by bisection on its own ratio. "
        "Top-1 before any recovery. Latency: ONNX Runtime CPU (2 threads), median, all models timed in the "
        "same interleaved rounds; speed-up = dense / pruned.", "",
        "| model | how | FLOPs | FLOPs removed | params | top-1 lossless 1,017 | top-1 JPEG | batch 1 ms | "
        "speed-up b1 | batch 256 ms | speed-up b256 | speed-up / FLOP reduction (b256) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, row in rows.items():
        red = dense.flops / row["flops"]
        s1, s256 = base[1] / lat[k][1], base[256] / lat[k][256]
        lines.append(
            f"| {k} | {row['how']} | {row['flops'] / 1e6:.1f} M | {100 * (1 - row['flops'] / dense.flops):.1f} % | "
            f"{row['params']:,} | {row['lossless']:.2f} | {row['jpeg']:.2f} | {1e3 * lat[k][1]:.2f} | {s1:.2f}x | "
            f"{1e3 * lat[k][256]:.1f} | {s256:.2f}x | {s256 / red:.2f} |")
    if not args.no_write:
        write_section("channels", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
