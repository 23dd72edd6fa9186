"""Issue 15's check: the refactor made no command slower, and says how often each command runs ONNX shape
inference (the graph analysis) and hashes every weight (the fingerprint).

Old and new code run in one session, interleaved round by round, each command in its own process:
``prune --target-flops 0.5`` on ResNet-56, and inspect / allocate / apply on the 2.25 GiB external-data
model of tools/bench_bigmodel.py. The counts come from one extra run per command under cProfile (calls of
onnx.shape_inference.infer_shapes and of onnxprune.io.fingerprint); the timed runs are not profiled.

    git worktree add /tmp/onnxprune-old a039bd2      # the code before the refactor
    python -m tools.bench_refactor --old /tmp/onnxprune-old [--rounds 2] [--layers 36]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench" / "refactor"


def _child(argv: list[str]) -> int:
    """In the child process: run one CLI command under cProfile and print the call counts as JSON."""
    import cProfile
    import pstats

    from click.testing import CliRunner

    from onnxprune.cli import main

    profiler = cProfile.Profile()
    result = profiler.runcall(CliRunner().invoke, main, argv)
    counts = {"shape_inference": 0, "fingerprint": 0}
    for (filename, _, name), (calls, *_rest) in pstats.Stats(profiler).stats.items():
        if name == "infer_shapes" and filename.endswith(os.path.join("onnx", "shape_inference.py")):
            counts["shape_inference"] += calls
        if name == "fingerprint" and os.sep + "io" in filename and "onnxprune" in filename:
            counts["fingerprint"] += calls
    print(json.dumps({"exit_code": result.exit_code, **counts}))
    return 0


def _run(code: Path, args: list[str], count: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    if count:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--", *args]
    else:
        cmd = [sys.executable, "-c", "import sys; from onnxprune.cli import main; sys.argv[0] = 'onnxprune'; main()",
               *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with {code}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if count else {"seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the code before the refactor")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--only", default=None, help="run only the commands whose label contains this (no counts)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from tools.bench_bigmodel import generate, size_of
    from tools.benchlib import bench_resnet56, machine, today, write_section

    WORK.mkdir(parents=True, exist_ok=True)
    r56 = bench_resnet56()
    big = WORK / "big.onnx"
    if not big.exists():
        generate(big, args.layers, 4096)
    size = size_of(big)
    codes = {"old": args.old.resolve(), "new": ROOT}
    out = {label: WORK / label for label in codes}
    for folder in out.values():
        folder.mkdir(exist_ok=True)

    def commands(label: str) -> list[tuple[str, list[str]]]:
        o = out[label]
        return [
            ("prune ResNet-56 --target-flops 0.5", ["prune", str(r56), "--target-flops", "0.5", "--no-latency",
                                                    "--force", "-o", str(o / "r56_small.onnx")]),
            ("inspect (2.25 GiB)", ["inspect", str(big), "--json"]),
            ("allocate lamp 70 % (2.25 GiB)", ["allocate", str(big), "--method", "lamp", "--target-sparsity",
                                               "0.7", "-o", str(o / "lamp.json")]),
            ("apply unstructured (2.25 GiB)", ["apply", str(big), str(o / "lamp.json"), "--force",
                                               "-o", str(o / "sparse.onnx")]),
            ("allocate channel 50 % FLOPs (2.25 GiB)", [
                "allocate", str(big), "--method", "uniform", "--granularity", "channel", "--budget", "flops",
                "--target-sparsity", "0.5", "--round-to", "8", "-o", str(o / "channels.json")]),
            ("apply channel (2.25 GiB)", ["apply", str(big), str(o / "channels.json"), "--force",
                                          "-o", str(o / "channels.onnx")]),
        ]

    def chosen(label: str) -> list[tuple[str, list[str]]]:
        return [(name, cmd) for name, cmd in commands(label) if args.only is None or args.only in name]

    names = [name for name, _ in chosen("new")]
    times = {label: {name: [] for name in names} for label in codes}
    for r in range(args.rounds):
        for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
            for name, cmd in chosen(label):
                times[label][name].append(_run(codes[label], cmd)["seconds"])
                print(f"round {r + 1} {label} {name}: {times[label][name][-1]:.1f} s", flush=True)
    if args.only is not None:
        for name in names:
            old, new = statistics.median(times["old"][name]), statistics.median(times["new"][name])
            print(f"{name}: old {sorted(round(t, 2) for t in times['old'][name])}, new "
                  f"{sorted(round(t, 2) for t in times['new'][name])}; medians {old:.2f} / {new:.2f} s = {new / old:.2f}x")
        return 0
    counts = {label: {name: _run(codes[label], cmd, count=True) for name, cmd in commands(label)} for label in codes}
    for label in codes:
        for name in names:
            print(f"{label} {name}: {counts[label][name]}", flush=True)

    lines = [
        f"Command: `python -m tools.bench_refactor --old <checkout of a039bd2> --rounds {args.rounds}`; {machine()}; "
        f"{today()}. Old (a039bd2, before the refactor) and new code in one session, interleaved by round "
        f"(ABBA), each command in its own process; seconds are the median over {args.rounds} rounds (process "
        f"start included). Counts from one extra cProfile run per command: calls of "
        "`onnx.shape_inference.infer_shapes` (one per graph analysis) and of `onnxprune.io.fingerprint` (a hash "
        f"of every weight). The big model: {args.layers} x 4096 x 4096 float32, {size / 2**30:.2f} GiB external data.",
        "",
        "| command | old s | new s | new / old | shape inferences old -> new | full weight hashes old -> new |",
        "|---|---|---|---|---|---|",
    ]
    slower = []
    for name in names:
        old, new = statistics.median(times["old"][name]), statistics.median(times["new"][name])
        co, cn = counts["old"][name], counts["new"][name]
        lines.append(f"| `{name}` | {old:.1f} | {new:.1f} | {new / old:.2f}x | {co['shape_inference']} -> "
                     f"{cn['shape_inference']} | {co['fingerprint']} -> {cn['fingerprint']} |")
        if new > old * 1.05:
            slower.append(name)
    lines += ["", "No command slower (new within 5 % of old or faster): "
              + ("met." if not slower else f"NOT met for {', '.join(slower)}.")]
    print("\n".join(lines))
    if not args.no_write:
        write_section("refactor", "## Refactor: time, shape inferences and weight hashes per command (issue 15)\n\n"
                      + "\n".join(lines))
    shutil.rmtree(out["old"], ignore_errors=True)
    shutil.rmtree(out["new"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[3:]))
    sys.exit(main())
