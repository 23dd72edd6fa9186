"""make demo: the main job on a bundled default.

Trains the small VGG-style CNN on scikit-learn's bundled digits (seconds), exports it to ONNX, runs
``onnxprune inspect`` and ``onnxprune eval`` on it, then prunes it to at least half its FLOPs by removing whole
channels (``allocate --granularity channel --budget flops --round-to 8`` then ``apply``), once without data
and once refitting the layers that lost inputs on 256 training images (``apply --data``), and prints a
before/after table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "demo"


def onnxprune(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "onnxprune.cli", *args]
    print("$ onnxprune " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=True, text=True, capture_output=capture)
    return proc.stdout if capture else ""


def main() -> int:
    BUILD.mkdir(parents=True, exist_ok=True)
    model, data = BUILD / "cnn.onnx", BUILD / "digits_test.npz"
    print("$ python -m models.export cnn -o build/demo/cnn.onnx --data-out build/demo/digits_test.npz", flush=True)
    subprocess.run([sys.executable, "-m", "models.export", "cnn", "-o", str(model), "--data-out", str(data)],
                   cwd=ROOT, check=True)
    rel_model, rel_data = str(model.relative_to(ROOT)), str(data.relative_to(ROOT))
    onnxprune("inspect", rel_model)
    onnxprune("eval", rel_model, "--data", rel_data)
    info = json.loads(onnxprune("inspect", rel_model, "--json", "--quiet", capture=True))
    ev = json.loads(onnxprune("eval", rel_model, "--data", rel_data, "--json", "--quiet", capture=True))
    print("\nDemo report")
    print(f"  model        {rel_model} ({model.stat().st_size / 1024:.1f} KiB)")
    print(f"  layers       {info['totals']['layers']} prunable, {info['totals']['blocks']} residual blocks")
    print(f"  parameters   {info['totals']['params']:,}")
    print(f"  FLOPs/sample {info['totals']['flops']:,}")
    print(f"  top-1        {ev['top1']:.2f} % on {ev['samples']} held-out digits")
    print(f"  throughput   {ev['throughput']:,.0f} samples/s on {ev['provider']} (batch {ev['batch_size']})\n")

    sys.path.insert(0, str(ROOT))  # run as a script: the repository's models/ package
    from models.small import digits_split

    calib = BUILD / "digits_train256.npz"
    xtr, ytr, _, _ = digits_split()
    np.savez(calib, x=xtr[:256], y=ytr[:256])  # calibration from the training split, never the test images
    plan, small, refit = BUILD / "channels.json", BUILD / "cnn_half.onnx", BUILD / "cnn_half_refit.onnx"
    onnxprune("allocate", rel_model, "--method", "uniform", "--granularity", "channel", "--budget", "flops",
              "--target-sparsity", "0.5", "--round-to", "8", "-o", str(plan.relative_to(ROOT)))
    onnxprune("apply", rel_model, str(plan.relative_to(ROOT)), "-o", str(small.relative_to(ROOT)), "--force")
    onnxprune("apply", rel_model, str(plan.relative_to(ROOT)), "-o", str(refit.relative_to(ROOT)), "--force",
              "--data", str(calib.relative_to(ROOT)))
    rows = [("dense", model, info, ev)]
    for label, path in (("channels removed", small), ("channels removed + refit", refit)):
        rel = str(path.relative_to(ROOT))
        rows.append((label, path, json.loads(onnxprune("inspect", rel, "--json", "--quiet", capture=True)),
                     json.loads(onnxprune("eval", rel, "--data", rel_data, "--json", "--quiet", capture=True))))
    print(f"\n  {'model':26} {'params':>8} {'FLOPs/sample':>13} {'file KiB':>9} {'top-1 %':>8}")
    for label, path, i, e in rows:
        print(f"  {label:26} {i['totals']['params']:>8,} {i['totals']['flops']:>13,} "
              f"{path.stat().st_size / 1024:>9.1f} {e['top1']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
