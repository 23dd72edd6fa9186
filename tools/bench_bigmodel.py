"""Big models (issue 7): a generated model over 2 GB with external data through every command, each in its
own process, with that process's peak resident memory (file-backed pages of the memory map included).

Target: peak memory under 1.5x the model's size (memory-mapped reads, no second copy), and every output
valid and saved with external data.

    python -m tools.bench_bigmodel [--layers 36] [--side 4096] [--calib 256] [--keep]

The default model: 36 layers of 4096 x 4096 float32 (2.25 GiB), alternating MatMul and Gemm (transB, with
bias) with Relu between them. Generation streams too (one layer in memory at a time). Results go to
BENCHMARKS.md, section "bigmodel". Needs about 3x the model size of free disk under build/bench/big.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from tools.benchlib import ROOT, machine, today, write_section

WORK = ROOT / "build" / "bench" / "big"


def generate(path: Path, layers: int, side: int, seed: int = 0) -> Path:
    """A chain of MatMul / Gemm(transB) + Relu layers with random weights, saved with external data. Every
    weight is a LazyTensor, drawn when it is written, so generating never holds more than one layer."""
    x = ir.Value(name="input", shape=ir.Shape(["batch", side]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits, cur = [], [], x

    def lazy(i: int, shape: tuple[int, ...], scale: float) -> ir.LazyTensor:
        def make():
            rng = np.random.default_rng(seed + i)
            return ir.tensor(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale), name=f"w{i}")

        return ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=f"w{i}")

    for i in range(layers):
        w = ir.Value(name=f"w{i}", shape=ir.Shape([side, side]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=lazy(i, (side, side), (2.0 / side) ** 0.5))
        inits.append(w)
        if i % 2 == 0:
            node = ir.node("MatMul", [cur, w], name=f"fc{i}")
        else:
            b = ir.Value(name=f"b{i}", shape=ir.Shape([side]), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(np.zeros(side, np.float32), name=f"b{i}"))
            inits.append(b)
            node = ir.node("Gemm", [cur, w, b], attributes={"transB": 1}, name=f"fc{i}")
        node.outputs[0].name = f"h{i}"
        relu = ir.node("Relu", [node.outputs[0]], name=f"relu{i}")
        relu.outputs[0].name = f"r{i}" if i < layers - 1 else "output"
        nodes += [node, relu]
        cur = relu.outputs[0]
    cur.type = ir.TensorType(ir.DataType.FLOAT)
    cur.shape = ir.Shape(["batch", side])
    graph = ir.Graph([x], [cur], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="big")
    ir.save(ir.Model(graph, ir_version=10), path, external_data=path.name + ".data")
    return path


def size_of(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run(args: list[str]) -> dict:
    """One CLI command in its own process: wall seconds, peak RSS (bytes), exit code and its stderr."""
    cmd = [sys.executable, "-m", "onnxprune.cli", *map(str, args)]
    t0 = time.perf_counter()
    with open(WORK / "stdout.txt", "w+") as out, open(WORK / "stderr.txt", "w+") as err:  # files: no pipe stalls
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"args": [str(a) for a in args], "seconds": seconds, "peak": usage.ru_maxrss * 1024,
            "rc": proc.returncode, "stdout": stdout, "stderr": stderr.strip()}


def check_output(path: Path) -> str:
    """The written model: external data beside it, onnx.checker (no data load), one ONNX Runtime run."""
    import onnx

    from onnxprune.runtime.session import create_session
    from onnxprune.runtime.timing import random_feeds

    data = path.parent / (path.name + ".data")
    proto = onnx.load(str(path), load_external_data=False)
    external = sum(1 for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    onnx.checker.check_model(str(path), full_check=True)
    del proto
    sess = create_session(path, "cpu", prepack=False).session
    out = sess.run(None, random_feeds(sess, batch=2))[0]
    return (f"{external} external initializers in {data.name} ({size_of(path) / 2**30:.2f} GiB in all), "
            f"checker full_check ok, ORT output {tuple(out.shape)} finite={bool(np.isfinite(out).all())}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--calib", type=int, default=256, help="calibration samples of apply --criterion obs")
    ap.add_argument("--keep", action="store_true", help="keep the generated files (build/bench/big)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model = WORK / "big.onnx"
    t0 = time.perf_counter()
    generate(model, args.layers, args.side)
    gen_seconds = time.perf_counter() - t0
    size = size_of(model)
    print(f"generated {model} ({size / 2**30:.2f} GiB) in {gen_seconds:.0f} s", flush=True)

    calib = WORK / "calib.npz"  # obs's calibration inputs: random, as the weights are
    np.savez(calib, x=np.random.default_rng(1).standard_normal((args.calib, args.side), dtype=np.float32))
    steps = [
        ("--version (the process floor: Python, onnx, onnxruntime)", ["--version"]),
        ("inspect", ["inspect", model, "--json"]),
        ("score --method capacity --metric l2", ["score", model, "--metric", "l2", "-o", WORK / "scores.json"]),
        ("allocate --method capacity (70 %)", ["allocate", model, "--scores", WORK / "scores.json", "--method",
                                               "capacity", "--target-sparsity", "0.7", "-o", WORK / "plan.json"]),
        ("allocate --method lamp (70 %)", ["allocate", model, "--method", "lamp", "--target-sparsity", "0.7",
                                           "-o", WORK / "lamp.json"]),
        ("apply (unstructured)", ["apply", model, WORK / "plan.json", "-o", WORK / "sparse.onnx"]),
        (f"apply --criterion obs (unstructured, {args.calib} samples)", [
            "apply", model, WORK / "plan.json", "-o", WORK / "obs.onnx", "--criterion", "obs", "--data", calib]),
        ("allocate --granularity channel (50 % FLOPs)", [
            "allocate", model, "--method", "uniform", "--granularity", "channel", "--budget", "flops",
            "--target-sparsity", "0.5", "--round-to", "8", "-o", WORK / "channels.json"]),
        ("apply (channel)", ["apply", model, WORK / "channels.json", "-o", WORK / "channels.onnx"]),
    ]
    rows = []
    for label, cmd in steps:
        r = run(cmd)
        ratio = r["peak"] / size
        status = "ok" if r["rc"] == 0 else f"exit {r['rc']}: {r['stderr'].splitlines()[-1] if r['stderr'] else ''}"
        print(f"{label}: {r['seconds']:.1f} s, peak {r['peak'] / 2**30:.2f} GiB = {ratio:.2f}x the model; {status}",
              flush=True)
        rows.append((label, r, ratio, status))
    checks = {}
    for name in ("sparse.onnx", "obs.onnx", "channels.onnx"):
        path = WORK / name
        checks[name] = check_output(path) if path.exists() else "not written"
        print(f"{name}: {checks[name]}", flush=True)
    sparse_plan = json.loads((WORK / "plan.json").read_text())["totals"] if (WORK / "plan.json").exists() else {}
    worst = max(ratio for _, _, ratio, _ in rows)
    ok = all(r["rc"] == 0 for _, r, _, _ in rows) and worst < 1.5

    lines = [
        f"Command: `python -m tools.bench_bigmodel --layers {args.layers} --side {args.side} --calib {args.calib}`; "
        f"{machine()}; "
        f"{today()}.",
        "",
        f"Generated model: {args.layers} layers of {args.side} x {args.side} float32, MatMul and Gemm(transB, bias) "
        f"alternating with Relu, external data: {size / 2**30:.2f} GiB ({size:,} bytes; generated in "
        f"{gen_seconds:.0f} s, one layer in memory at a time). Each command runs in its own process; peak = that "
        "process's maximum resident set (ru_maxrss, file-backed pages of the memory-mapped weights included).",
        "",
        "| command | seconds | peak memory | peak / model size | result |",
        "|---|---|---|---|---|",
    ]
    for label, r, ratio, status in rows:
        lines.append(f"| `{label}` | {r['seconds']:.1f} | {r['peak'] / 2**30:.2f} GiB | {ratio:.2f}x | {status} |")
    lines += ["", "Outputs (checked in this process, ONNX Runtime with pre-packing off):", ""]
    lines += [f"- `{name}`: {text}" for name, text in checks.items()]
    if sparse_plan:
        lines.append(f"- unstructured plan: params sparsity {sparse_plan.get('params_sparsity', 0):.4f}")
    lines += ["", f"Target (peak < 1.5x the model size on every command): {'met' if ok else 'NOT met'}, "
              f"worst {worst:.2f}x. Pruning itself keeps about one layer resident (each memory map is released "
              "once read; pruned weights are computed while written; obs keeps each pruned layer on disk until it "
              "is written); apply's peak is its output check, where ONNX Runtime loads the written model once to "
              "run it (`--no-check` skips it)."]
    if not args.no_write:
        write_section("bigmodel", "## Big models with external data (issue 7)\n\n" + "\n".join(lines))
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
