"""Shared helpers for the benchmarks: machine description, BENCHMARKS.md sections, weight sparsity."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


def today() -> str:
    return _dt.date.today().isoformat()


def publish(result: dict, json_path: Path, text: str, section: str, write: bool) -> None:
    """A benchmark's result: its JSON beside its outputs, its table printed and, with ``write``, put in
    BENCHMARKS.md as ``section``."""
    json_path.write_text(json.dumps(result, indent=2))
    print(text)
    if write:
        write_section(section, text)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between <!-- NAME:begin --> and <!-- NAME:end --> in BENCHMARKS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nMeasured results; each section names its command, machine and date.\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def weight_sparsity(path: str | Path) -> float:
    """Fraction of zeros over the weights of the prunable layers the graph really uses (any pruner's output)."""
    from onnxprune.tensors.weights import get_weight
    from onnxprune.verbs.loading import open_model

    layers = open_model(path).owned_layers
    zeros = sum(int(np.count_nonzero(get_weight(layer) == 0)) for layer in layers)
    total = sum(int(np.prod(layer.weight_shape)) for layer in layers)
    return zeros / total


# The SR-init reference's 10 removed blocks of ResNet-56 (0-based, in graph order).
REFERENCE_BLOCKS = [1, 8, 17, 19, 21, 22, 23, 24, 25, 26]


def bench_resnet56() -> Path:
    """build/bench/resnet56.onnx, the pretrained ResNet-56 exported once (BN folded, preprocessing in metadata)."""
    folder = ROOT / "build" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resnet56.onnx"
    if not path.exists():
        from models.export import build, export_onnx

        model, example, meta = build("resnet56")
        export_onnx(model, example, path, metadata=meta)
    return path


def reference_block_plan(path: str | Path):
    """A plan removing the reference's 10 blocks from the ResNet-56 at ``path``."""
    import onnxprune
    from onnxprune.artefacts import Plan

    info = onnxprune.inspect(path)
    return Plan(method="reference", fingerprint=info.fingerprint, layers=[], totals={}, granularity="blocks",
                blocks=[{"name": info.blocks[i].name, "layers": info.blocks[i].layers} for i in REFERENCE_BLOCKS])
