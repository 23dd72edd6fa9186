"""Allocation benchmark (issue 3): one-shot top-1 of every allocation method at equal total sparsity.

    python -m tools.bench_allocation --models resnet20,resnet56 --sparsities 0.5,0.6,0.7,0.8,0.9

For each model, sparsity and method: allocate + apply (unstructured, magnitude within each layer), then top-1
on the lossless 1,017 CIFAR-10 images and on the 10,000 JPEG images. Peers in the same run: the onnxsim
package's apply_magnitude_pruning (uniform per row, and global). Results: build/bench/allocation.json and the
'allocation' section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

import onnxprune
from models.paths import cifar_data
from onnxprune import api
from tools.benchlib import ROOT, machine, today, weight_sparsity, write_section

CAPACITY_METRICS = ("mean_abs", "l2", "effective_rank", "stable_rank")
BASELINES = ("uniform", "global", "lamp", "erk")
PEERS = ("onnxsim-uniform", "onnxsim-global")
MEASURED = ("compactness", "sensitivity", "search")


def export_model(name: str, folder: Path) -> Path:
    from models.export import build, export_onnx

    path = folder / f"{name}.onnx"
    if not path.exists():
        if name == "vgg16-fmnist":
            from models.vgg import train_vgg

            t0 = time.perf_counter()
            model, acc = train_vgg()
            import torch

            meta = {"onnxprune.source": f"models/vgg.py VGG16Narrow, Fashion-MNIST train split, 3 epochs "
                                        f"({time.perf_counter() - t0:.0f} s), test top-1 {acc:.2f} %"}
            export_onnx(model, torch.rand(2, 1, 28, 28), path, metadata=meta)
        else:
            model, example, meta = build(name)
            export_onnx(model, example, path, metadata=meta)
    return path


def fashion_sets(folder: Path) -> tuple[dict[str, Path], Path]:
    """Fashion-MNIST test split (evaluation) and the first 2,048 train images (calibration) as .npz."""
    import numpy as np

    from models.vgg import fashion_mnist

    test, calib = folder / "fmnist_test.npz", folder / "fmnist_calib.npz"
    if not test.exists():
        x, y = fashion_mnist("test")
        np.savez(test, x=x, y=y)
        x, y = fashion_mnist("train")
        np.savez(calib, x=x[:2048], y=y[:2048])
    return {"test": test}, calib


def data_for(name: str, folder: Path) -> tuple[dict[str, Path], Path, int]:
    """Evaluation sets, calibration data and its offset for a model."""
    if name == "vgg16-fmnist":
        sets, calib = fashion_sets(folder)
        return sets, calib, 0
    return {"jpeg": cifar_data("jpeg"), "lossless": cifar_data("lossless")}, cifar_data("jpeg"), CALIBRATION["offset"]


def evaluate(path: Path, sets: dict[str, Path], limit: int | None) -> dict:
    return {key: onnxprune.eval(path, data, batch_size=512, limit=limit if key == "jpeg" else None).top1
            for key, data in sets.items()}


def prune_onnxsim(src: Path, dst: Path, sparsity: float, global_: bool) -> Path:
    import onnxsim

    proto = onnxsim.apply_magnitude_pruning(str(src), sparsity=sparsity, global_sparsity=global_)
    onnx.save(proto, str(dst))
    return dst


CALIBRATION = {"offset": 1017, "sensitivity_limit": 256, "search_limit": 512, "search_iterations": 150}


def run(models: list[str], sparsities: list[float], methods: list[str], jpeg_limit: int | None) -> list[dict]:
    folder = ROOT / "build" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        src = export_model(name, folder)
        sets, calib, offset = data_for(name, folder)
        dense = evaluate(src, sets, jpeg_limit)
        rows.append({"model": name, "method": "dense", "target": 0.0, "sparsity": 0.0, **dense})
        print(f"{name} dense {dense}", flush=True)
        scores = {m: api.score(src, metric=m) for m in CAPACITY_METRICS if f"capacity:{m}" in methods}
        if "sensitivity" in methods or "search" in methods:
            t0 = time.perf_counter()
            scores["sensitivity"] = api.score(src, "sensitivity", data=calib, offset=offset,
                                              limit=CALIBRATION["sensitivity_limit"], batch_size=256)
            print(f"{name} sensitivity scores {time.perf_counter() - t0:.0f} s", flush=True)
        if "compactness" in methods:
            t0 = time.perf_counter()
            scores["compactness"] = api.score(src, "compactness", data=calib, offset=offset, tolerance=1.0,
                                              limit=CALIBRATION["sensitivity_limit"], batch_size=256)
            print(f"{name} compactness scores {time.perf_counter() - t0:.0f} s", flush=True)
        for target in sparsities:
            for method in methods:
                t0 = time.perf_counter()
                out = folder / f"{name}_{method.replace(':', '_')}_{int(target * 100)}.onnx"
                extra = {}
                if method in PEERS:
                    prune_onnxsim(src, out, target, method.endswith("global"))
                else:
                    kind, _, metric = method.partition(":")
                    if kind == "search":
                        plan = api.allocate(src, target_sparsity=target, method="search",
                                            scores=scores["sensitivity"], data=calib, offset=offset,
                                            limit=CALIBRATION["search_limit"], batch_size=512,
                                            iterations=CALIBRATION["search_iterations"])
                        extra = {"search": plan.options["search"]}
                    else:
                        sc = scores.get(metric) if kind == "capacity" else scores.get(kind)
                        alloc = "capacity" if kind == "compactness" else kind
                        plan = api.allocate(src, target_sparsity=target, method=alloc, scores=sc)
                    api.apply(src, plan, out, force=True)
                seconds = time.perf_counter() - t0
                acc = evaluate(out, sets, jpeg_limit)
                row = {"model": name, "method": method, "target": target, "sparsity": weight_sparsity(out),
                       "prune_seconds": round(seconds, 2), **acc, **extra}
                rows.append(row)
                print(json.dumps(row), flush=True)
                out.unlink()
    return rows


def table(rows: list[dict], key: str) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows if key in r))
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    lines = []
    for name in models:
        dense = next(r for r in rows if r["model"] == name and r["method"] == "dense")
        lines.append(f"\n**{name}** ({key}; dense {dense[key]:.2f} %)\n")
        lines.append("| method | " + " | ".join(f"{int(t * 100)} %" for t in targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        methods = list(dict.fromkeys(r["method"] for r in rows if r["model"] == name and r["method"] != "dense"))
        best = {t: max(r[key] for r in rows if r["model"] == name and r["target"] == t) for t in targets}
        for method in methods:
            cells = []
            for t in targets:
                r = next((r for r in rows if r["model"] == name and r["method"] == method and r["target"] == t), None)
                if r is None:
                    cells.append("")
                    continue
                cell = f"{r[key]:.2f}"
                cells.append(f"**{cell}**" if r[key] == best[t] else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--methods", default=",".join([f"capacity:{m}" for m in CAPACITY_METRICS] + list(BASELINES)
                                                      + list(PEERS) + list(MEASURED)))
    parser.add_argument("--jpeg-limit", type=int, default=None, help="use only the first N JPEG images")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--section", default="allocation", help="BENCHMARKS.md section (and build/bench/NAME.json)")
    args = parser.parse_args(argv)
    t0 = time.time()
    rows = run(args.models.split(","), [float(s) for s in args.sparsities.split(",")], args.methods.split(","),
               args.jpeg_limit)
    out = ROOT / "build" / "bench" / f"{args.section}.json"
    out.write_text(json.dumps(rows, indent=1))
    body = (
        f"## Allocation: one-shot top-1 at equal total sparsity (issue 3)\n\n"
        f"Command: `python -m tools.bench_allocation {' '.join(argv or sys.argv[1:])}`  \n"
        f"Machine: {machine()}  \nDate: {today()}, {time.time() - t0:.0f} s\n\n"
        "Unstructured magnitude pruning inside each layer, the per-layer sparsities from each method; no "
        "fine-tuning. Total sparsity over the weights of all Conv/Gemm layers, measured on the output file "
        "(for onnxsim too). Bold: best at that sparsity. `compactness` = capacity allocation with importance "
        "1 - (highest sparsity of each layer alone within 1 point of top-1). `compactness`, `sensitivity` and "
        "`search` calibrate on JPEG images "
        f"{CALIBRATION['offset']}.. ({CALIBRATION['sensitivity_limit']} images for the sensitivity curves, "
        f"{CALIBRATION['search_limit']} for the search objective, {CALIBRATION['search_iterations']} search "
        "iterations), disjoint from the lossless 1,017 test images but inside the JPEG 10k set (5 % of it); "
        "the lossless table is the clean held-out check. vgg16-fmnist calibrates on the first 2,048 Fashion-"
        "MNIST train images and is tested on the 10,000 test images.\n"
        + "\n".join(table(rows, key) for key in ("jpeg", "lossless", "test") if any(key in r for r in rows))
    )
    if not args.no_write:
        write_section(args.section, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
