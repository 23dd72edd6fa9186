"""Golden outputs: run every command on real models, record what it wrote and printed, compare two runs.

A refactor that claims "behaviour unchanged" proves it with this: capture on the old code, capture on the new
code, diff. Every output file (plan/scores/sweep JSON, models, the HTML report) is compared by its bytes, every
``--json`` output as JSON with wall times masked, and every failure by its exit code and error line.

    python -m tools.golden models build/golden/models              # export the models once (needs torch)
    PYTHONPATH=/path/to/old/checkout python -m tools.golden capture build/golden/models build/golden/old
    python -m tools.golden capture build/golden/models build/golden/new
    python -m tools.golden diff build/golden/old build/golden/new

The commands run in-process through click's CliRunner, with the working folder set to the capture folder and
relative paths, so the two runs print the same paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MASKED = ("seconds", "wall_seconds", "throughput", "timing", "latency_ms", "teacher_seconds",
          "calibration_seconds", "minutes", "elapsed")


def export_models(folder: Path) -> None:
    """ResNet-20 (pretrained, BN folded), ResNet-20 with BN kept, the digits CNN and MLP, the digits data."""
    from models.export import build, export_onnx, write_digits_test

    folder.mkdir(parents=True, exist_ok=True)
    for name, keep_bn in (("resnet20", False), ("resnet20", True), ("cnn", False), ("mlp", False)):
        model, example, meta = build(name)
        export_onnx(model, example, folder / f"{name}{'_bn' if keep_bn else ''}.onnx", keep_bn=keep_bn, metadata=meta)
    write_digits_test(folder / "digits.npz")


def commands(data: Path) -> list[tuple[str, list[str]]]:
    """(case name, CLI arguments) in run order; later cases read what earlier ones wrote."""
    jpeg = str(data / "cifar10" / "cifar10_test_jpeg_q75.npz")
    lossless = str(data / "cifar10" / "cifar10_test_lossless_first1017.npz")
    calib = ["--data", jpeg, "--offset", "1017", "--limit", "64"]
    r20, bn, cnn, mlp, digits = "m/resnet20.onnx", "m/resnet20_bn.onnx", "m/cnn.onnx", "m/mlp.onnx", "m/digits.npz"
    cases = [
        ("inspect_r20", ["inspect", r20, "--json"]),
        ("inspect_bn", ["inspect", bn, "--json"]),
        ("inspect_cnn", ["inspect", cnn, "--json"]),
        ("inspect_mlp", ["inspect", mlp, "--json"]),
        ("eval_r20", ["eval", r20, "--data", lossless, "--limit", "256", "--json"]),
        ("eval_cnn", ["eval", cnn, "--data", digits, "--json"]),
        ("score_cap", ["score", r20, "-o", "o/cap.json", "--json"]),
        ("score_cap_er", ["score", r20, "--metric", "effective_rank", "-o", "o/cap_er.json", "--json"]),
        ("score_sens", ["score", r20, "--method", "sensitivity", *calib, "--grid", "0.5,0.9",
                        "-o", "o/sens.json", "--json"]),
        ("score_comp", ["score", cnn, "--method", "compactness", "--data", digits, "-o", "o/comp.json", "--json"]),
        ("score_sr", ["score", r20, "--method", "srinit", *calib, "--seeds", "2", "-o", "o/sr.json", "--json"]),
        ("score_sr_layers", ["score", cnn, "--method", "srinit", "--units", "layers", "--data", digits,
                             "--metric", "agreement", "-o", "o/sr_layers.json", "--json"]),
        ("score_sr_noblocks", ["score", mlp, "--method", "srinit", "--data", digits, "-o", "o/x.json"]),
    ]
    for method in ("capacity", "uniform", "global", "lamp", "erk"):
        cases.append((f"alloc_{method}", ["allocate", r20, "--method", method, "--scores", "o/cap.json",
                                          "--target-sparsity", "0.7", "-o", f"o/plan_{method}.json", "--json"]))
    cases += [
        ("alloc_lamp_flops", ["allocate", r20, "--method", "lamp", "--budget", "flops", "--target-sparsity", "0.6",
                              "--keep-dense", "/conv1/Conv", "--max-sparsity", "0.9", "-o", "o/plan_lf.json", "--json"]),
        ("alloc_sens", ["allocate", r20, "--method", "sensitivity", "--scores", "o/sens.json",
                        "--target-sparsity", "0.7", "-o", "o/plan_sens.json", "--json"]),
        ("alloc_search", ["allocate", r20, "--method", "search", "--target-sparsity", "0.7", "--iterations", "8",
                          *calib, "--seed", "3", "-o", "o/plan_search.json", "--json"]),
        ("alloc_ch", ["allocate", r20, "--method", "uniform", "--granularity", "channel", "--budget", "flops",
                      "--target-sparsity", "0.5", "--round-to", "8", "-o", "o/plan_ch.json", "--json"]),
        ("alloc_ch_lamp", ["allocate", r20, "--method", "lamp", "--granularity", "channel",
                           "--target-sparsity", "0.3", "--criterion", "l1", "-o", "o/plan_ch_lamp.json", "--json"]),
        ("alloc_ch_keep", ["allocate", r20, "--method", "capacity", "--scores", "o/cap.json", "--granularity",
                           "channel", "--coupled", "keep", "--target-sparsity", "0.2", "-o", "o/plan_ch_keep.json",
                           "--json"]),
        ("alloc_ch_bn", ["allocate", bn, "--method", "uniform", "--granularity", "channel", "--budget", "flops",
                         "--target-sparsity", "0.4", "-o", "o/plan_ch_bn.json", "--json"]),
        ("alloc_ch_cnn", ["allocate", cnn, "--method", "uniform", "--granularity", "channel", "--budget", "flops",
                          "--target-sparsity", "0.5", "--round-to", "8", "-o", "o/plan_ch_cnn.json", "--json"]),
        ("alloc_ch_unreachable", ["allocate", r20, "--method", "uniform", "--granularity", "channel",
                                  "--target-sparsity", "0.98", "-o", "o/x.json"]),
        ("alloc_sr_remove", ["allocate", r20, "--method", "srinit", "--scores", "o/sr.json", "--remove", "3",
                             "-o", "o/plan_sr.json", "--json"]),
        ("alloc_sr_thr", ["allocate", r20, "--method", "srinit", "--scores", "o/sr.json", "--threshold", "2",
                          "-o", "o/plan_sr_thr.json", "--json"]),
        ("alloc_sr_params", ["allocate", r20, "--method", "srinit", "--scores", "o/sr.json", "--target-params",
                             "0.2", "-o", "o/plan_sr_params.json", "--json"]),
        ("apply_lamp", ["apply", r20, "o/plan_lamp.json", "-o", "o/lamp.onnx", "--json"]),
        ("apply_nm", ["apply", r20, "o/plan_lamp.json", "--granularity", "n:m", "--nm", "2:4", "-o", "o/nm.onnx",
                      "--json"]),
        ("apply_sparse", ["apply", r20, "o/plan_global.json", "--store", "sparse", "-o", "o/sparse.onnx", "--json"]),
        ("apply_search", ["apply", r20, "o/plan_search.json", "-o", "o/search.onnx", "--json"]),
        ("apply_ch", ["apply", r20, "o/plan_ch.json", "-o", "o/ch.onnx", "--json"]),
        ("apply_ch_refit", ["apply", r20, "o/plan_ch.json", *calib, "-o", "o/ch_refit.onnx", "--json"]),
        ("apply_ch_lamp", ["apply", r20, "o/plan_ch_lamp.json", "--round-to", "4", "-o", "o/ch_lamp.onnx", "--json"]),
        ("apply_ch_keep", ["apply", r20, "o/plan_ch_keep.json", "-o", "o/ch_keep.onnx", "--json"]),
        ("apply_ch_bn", ["apply", bn, "o/plan_ch_bn.json", "-o", "o/ch_bn.onnx", "--json"]),
        ("apply_ch_cnn_refit", ["apply", cnn, "o/plan_ch_cnn.json", "--data", digits, "-o", "o/ch_cnn.onnx",
                                "--json"]),
        ("apply_unstr_as_ch", ["apply", r20, "o/plan_lamp.json", "--granularity", "channel", "-o", "o/u_ch.onnx",
                               "--json"]),
        ("apply_sr", ["apply", r20, "o/plan_sr.json", "-o", "o/sr.onnx", "--json"]),
        ("alloc_on_sr", ["allocate", "o/sr.onnx", "--method", "lamp", "--target-sparsity", "0.5",
                         "-o", "o/plan_on_sr.json", "--json"]),
        ("apply_twice", ["apply", "o/sr.onnx", "o/plan_on_sr.json", "-o", "o/twice.onnx", "--json"]),
        ("apply_wrong_model", ["apply", cnn, "o/plan_lamp.json", "-o", "o/x.onnx"]),
        ("apply_data_unstr", ["apply", r20, "o/plan_lamp.json", "--data", jpeg, "-o", "o/x.onnx"]),
        ("eval_pruned", ["eval", "o/ch_refit.onnx", "--data", lossless, "--limit", "256", "--json"]),
        ("prune_sparsity", ["prune", r20, "--target-sparsity", "0.6", "--no-latency", "--data", lossless,
                            "--limit", "128", "-o", "o/p_sparse.onnx", "--json"]),
        ("prune_flops", ["prune", r20, "--target-flops", "0.4", "--round-to", "8", "--no-latency", *calib,
                         "--eval-data", lossless, "-o", "o/p_flops.onnx", "--json"]),
        ("prune_blocks", ["prune", r20, "--remove-blocks", "2", "--no-latency", *calib, "-o", "o/p_blocks.onnx",
                          "--json"]),
        ("prune_cnn_capacity", ["prune", cnn, "--target-sparsity", "0.5", "--method", "capacity", "--no-latency",
                                "-o", "o/p_cnn.onnx", "--json"]),
        ("prune_two_goals", ["prune", r20, "--target-sparsity", "0.5", "--target-flops", "0.5", "-o", "o/x.onnx"]),
        ("sweep", ["sweep", r20, "--data", lossless, "--limit", "128", "--sparsities", "0.5,0.8",
                   "--methods", "uniform,lamp,erk", "-o", "o/sweep.json", "--json"]),
        ("sweep_ch", ["sweep", cnn, "--data", digits, "--sparsities", "0.3", "--methods", "uniform,capacity",
                      "--granularity", "channel", "--budget", "flops", "-o", "o/sweep_ch.json", "--json"]),
        ("report", ["report", "--scores", "o/sr.json", "--plan", "o/plan_sr.json", "--sweep", "o/sweep.json",
                    "-o", "o/report.html", "--json"]),
        ("report_layers", ["report", "--scores", "o/cap.json", "--plan", "o/plan_lamp.json", "-o", "o/report2.html"]),
        ("finetune", ["finetune", "o/ch_cnn.onnx", "--data", digits, "--teacher", cnn, "--epochs", "1",
                      "--threads", "1", "--eval-data", digits, "-o", "o/tuned.onnx", "--json"]),
        ("finetune_recal", ["finetune", "o/ch_bn.onnx", "--data", jpeg, "--offset", "1017", "--limit", "256",
                            "--teacher", bn, "--recalibrate-bn", "--threads", "1", "-o", "o/recal.onnx", "--json"]),
    ]
    return cases


def _mask(obj):
    if isinstance(obj, dict):
        return {k: ("<masked>" if any(m in k for m in MASKED) else _mask(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v) for v in obj]
    return obj


def capture(models: Path, out: Path) -> None:
    from click.testing import CliRunner

    from onnxprune.cli import main

    data = Path(os.environ.get("ONNXPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "o").mkdir(parents=True)
    shutil.copytree(models, out / "m")
    results = {}
    cwd = os.getcwd()
    os.chdir(out)
    try:
        for name, args in commands(data):
            res = CliRunner().invoke(main, args)
            entry = {"args": args, "exit_code": res.exit_code}
            if res.exit_code == 0 and "--json" in args:
                entry["json"] = _mask(json.loads(res.stdout))
            elif res.exit_code != 0:
                entry["error"] = (res.stderr.strip().splitlines() or [""])[-1]
            else:
                entry["stdout_lines"] = len(res.stdout.splitlines())
            results[name] = entry
            print(f"{name}: exit {res.exit_code}", file=sys.stderr, flush=True)
            if res.exit_code == 0 and "--json" in args:  # the human output too: it must not fail
                text = CliRunner().invoke(main, [a for a in args if a != "--json"])
                results[name + "_text"] = {"exit_code": text.exit_code, "stdout_lines": len(text.stdout.splitlines()),
                                           "error": (text.stderr.strip().splitlines() or [""])[-1]
                                           if text.exit_code else None}
    finally:
        os.chdir(cwd)
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((out / "o").rglob("*")) if p.is_file()}
    (out / "golden.json").write_text(json.dumps({"commands": results, "files": files}, indent=1, sort_keys=True))


def diff(a: Path, b: Path) -> int:
    ga, gb = (json.loads((p / "golden.json").read_text()) for p in (a, b))
    problems = []
    for name in sorted(set(ga["commands"]) | set(gb["commands"])):
        ca, cb = ga["commands"].get(name), gb["commands"].get(name)
        if ca != cb:
            problems.append(f"command {name}: {_first_difference(ca, cb)}")
    for name in sorted(set(ga["files"]) | set(gb["files"])):
        if ga["files"].get(name) != gb["files"].get(name):
            problems.append(f"file {name}: {ga['files'].get(name, 'missing')[:12]} != "
                            f"{gb['files'].get(name, 'missing')[:12]}")
    for line in problems:
        print(line)
    print(f"{len(ga['commands'])} commands, {len(ga['files'])} files: "
          + ("identical" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


def _first_difference(x, y, path="") -> str:
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k):
                return _first_difference(x.get(k), y.get(k), f"{path}.{k}")
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return _first_difference(u, v, f"{path}[{i}]")
    return f"{path or '.'}: {str(x)[:200]} != {str(y)[:200]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models").add_argument("folder", type=Path)
    cap = sub.add_parser("capture")
    cap.add_argument("models", type=Path)
    cap.add_argument("out", type=Path)
    d = sub.add_parser("diff")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "models":
        export_models(args.folder)
        return 0
    if args.cmd == "capture":
        capture(args.models.resolve(), args.out.resolve())
        return 0
    return diff(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
