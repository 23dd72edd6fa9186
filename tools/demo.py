"""make demo: the main job on a bundled default.

Trains the small VGG-style CNN on scikit-learn's bundled digits (seconds), exports it to ONNX, and runs
``onnxprune inspect`` and ``onnxprune eval`` on it, then prints a short report. Grows into the full
score -> allocate -> apply pipeline with a before/after table as those commands land.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    print(f"  throughput   {ev['throughput']:,.0f} samples/s on {ev['provider']} (batch {ev['batch_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
