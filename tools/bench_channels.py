"""Structured channel pruning of the pretrained ResNet-56 at about 2x fewer FLOPs (issue 5), CPU.

    python -m tools.bench_channels [--flops 0.5]

Compared in one run, each pruned to the same FLOP reduction (bisection on its own ratio; FLOPs counted by
onnxprune inspect on the exported ONNX graphs, 2 per multiply-accumulate):
- onnxprune: `allocate --granularity channel --budget flops --target-sparsity F --round-to 8` (methods
  uniform and lamp; residual streams pruned too, coupled through the option-A pads, or kept whole with
  `--coupled keep`; L2 criterion) then `apply` (channels physically removed), without and with `--data`
  (each layer that lost inputs refit by least squares on 256 JPEG images 1017.., disjoint from the
  lossless test images, 2.6 % of the JPEG 10k set);
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
from tools.benchlib import ROOT, bench_resnet56, machine, today, write_section


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

    def ignored(model, inner_only: bool):
        if not inner_only:
            return [model.linear]
        # the residual streams: the stem and every block's second conv write them
        return [model.linear, model.conv1] + [b.conv2 for stage in (model.layer1, model.layer2, model.layer3)
                                              for b in stage]

    def prune(r, inner_only):
        model = load_pretrained(56).eval()
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=r, ignored_layers=ignored(model, inner_only))
        pruner.step()
        model(example)  # a pruned model that no longer runs raises here
        return model

    # Torch-Pruning's tracer does not follow the option-A shortcut (F.pad on the channel axis): pruning the
    # residual streams leaves a model that fails to run. Its users then keep the streams (ignored_layers)
    # and prune the blocks' inner channels, which is what is measured when the default fails.
    try:
        prune(0.3, inner_only=False)
        inner_only = False
    except RuntimeError:
        inner_only = True

    def run(r):
        macs, _ = tp.utils.count_ops_and_params(prune(r, inner_only), example)
        return 1 - macs / base_macs, r

    frac, r, _ = bisect(run, target)
    model = prune(r, inner_only)
    out = folder / "torch_pruning.onnx"
    export_onnx(model, torch.randn(2, 3, 32, 32), out)
    return 1 - flops_of(out) / dense_flops, out, r, inner_only


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
    parser.add_argument("--methods", default="uniform,lamp")
    parser.add_argument("--round-to", type=int, default=8, help="channel multiple (8: AVX2 NCHWc blocks)")
    parser.add_argument("--calibration", type=int, default=256,
                        help="JPEG images 1017.. used to refit layers (disjoint from the lossless 1,017)")
    parser.add_argument("--limit", type=int, default=None, help="JPEG images for top-1 (default all 10,000)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved latency rounds over all models")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    folder = ROOT / "build" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = bench_resnet56()
    dense = onnxprune.inspect(path)
    rows: dict[str, dict] = {"dense": {"path": path, "flops": dense.flops, "params": dense.params, "how": ""}}
    calib = {"data": cifar_data("jpeg"), "offset": 1017, "limit": args.calibration}
    # the same allocation without rounding, to show what channel counts off the 8-channel blocks cost
    plan = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=args.flops)
    out = api.apply(path, plan, folder / "channels_uniform_r1.onnx", force=True)
    rows["onnxprune uniform, --round-to 1"] = {
        "path": out.path, "how": f"--round-to 1, --coupled prune: {out.totals['channels_removed']} channels"}
    for method in args.methods.split(","):
        for coupled in ("prune", "keep"):
            plan = api.allocate(path, method=method, granularity="channel", budget="flops",
                                target_sparsity=args.flops, round_to=args.round_to, coupled=coupled)
            for refit in (False, True):
                t0 = time.perf_counter()
                name = f"channels_{method}_{coupled}{'_refit' if refit else ''}"
                out = api.apply(path, plan, folder / f"{name}.onnx", force=True, **(calib if refit else {}))
                how = (f"--round-to {args.round_to}, --coupled {coupled}: {out.totals['channels_removed']} channels"
                       + (f"; refit {out.totals['refit']['layers']} layers on {args.calibration} images "
                          f"({time.perf_counter() - t0:.0f} s)" if refit else ""))
                rows[f"onnxprune {method}{' + refit' if refit else ''}"
                     f"{' (streams kept)' if coupled == 'keep' else ''}"] = {"path": out.path, "how": how}
    frac, sim_path, s = onnxsim_pruned(path, folder, dense.flops, args.flops)
    rows["onnxsim apply_structured_pruning"] = {"path": sim_path, "how": f"sparsity {s:.3f}"}
    frac, tp_path, r, inner_only = torch_pruning_pruned(folder, dense.flops, args.flops)
    rows["Torch-Pruning MagnitudePruner"] = {
        "path": tp_path, "how": f"pruning_ratio {r:.3f}" + (
            " (inner channels only: with the residual streams pruned its model fails to run)"
            if inner_only else "")}
    for row in rows.values():
        info = onnxprune.inspect(row["path"])
        row["flops"], row["params"] = info.flops, info.params
        row["lossless"] = onnxprune.eval(row["path"], cifar_data("lossless")).top1
        row["jpeg"] = onnxprune.eval(row["path"], cifar_data("jpeg"), limit=args.limit).top1
    lat = latency({k: r["path"] for k, r in rows.items()}, batch1_runs=200, batch256_runs=5, rounds=args.rounds)
    base = lat["dense"]
    lines = [
        "## Channel pruning: ResNet-56 at about 2x fewer FLOPs (issue 5)", "",
        f"Command: `{' '.join(['python -m tools.bench_channels', *(argv or sys.argv[1:])])}`  ",
        f"Machine: {machine()}  ", f"Date: {today()}", "",
        f"Target: {100 * args.flops:.0f} % fewer FLOPs; every pruner brought there by bisection on its own ratio. "
        "Top-1 before any recovery. Latency: ONNX Runtime CPU (2 threads), median, all models timed in the "
        f"same {args.rounds} interleaved rounds (200 runs at batch 1, 5 at batch 256 per model and round); "
        "speed-up = dense / pruned.", "",
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
    lines += [
        "", "Torch-Pruning's tracer does not follow the option-A shortcut (F.pad on the channel axis): with the "
        "residual streams pruned its model no longer runs (a shape error in the classifier), so it is measured as "
        "its users would run it on this model, with the layers that write the streams in `ignored_layers`. "
        "onnxsim's apply_structured_pruning only prunes single producer -> consumer chains, which here are the "
        "same inner channels. `+ refit` = `apply --data` (onnxprune.passes.reconstruct): the same architecture "
        "as the row above it, with the layers that lost inputs refit by least squares; its time is in the `how` "
        "column. Rows with the same architecture can differ in latency by ~10 %: that is the machine's noise."]
    if not args.no_write:
        write_section("channels", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
