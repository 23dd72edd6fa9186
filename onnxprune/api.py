"""The onnxprune verbs as Python functions; the CLI only parses options and prints what these return."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune import __version__
from onnxprune.analysis.blocks import Block, find_blocks
from onnxprune.analysis.graph import analyse_graph
from onnxprune.analysis.layers import Layer, find_layers, model_params
from onnxprune.errors import InputError
from onnxprune.io import fingerprint, load_model
from onnxprune.runtime import data as rdata
from onnxprune.runtime.metrics import Accuracy
from onnxprune.runtime.session import create_session

ModelLike = str | os.PathLike | ir.Model

# Preprocessing a model can carry in its metadata (written by models/export.py), used when no --mean/--std.
META_MEAN = "onnxprune.preprocess.mean"
META_STD = "onnxprune.preprocess.std"


@dataclass
class InspectResult:
    """Prunable layers, residual blocks and totals of a model."""

    layers: list[Layer]
    blocks: list[Block]
    params: int  # every float parameter of the model (BN statistics excluded)
    prunable_params: int  # parameters of the prunable layers (with their bias and BatchNorm)
    flops: int | None  # per sample, 2 per multiply-accumulate, prunable layers only
    fingerprint: str
    opset: int | None
    shape_error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "onnxprune_version": __version__,
            "fingerprint": self.fingerprint,
            "opset": self.opset,
            "layers": [layer.to_dict() for layer in self.layers],
            "blocks": [block.to_dict() for block in self.blocks],
            "totals": {
                "params": self.params,
                "prunable_params": self.prunable_params,
                "flops": self.flops,
                "layers": len(self.layers),
                "blocks": len(self.blocks),
                "removable_blocks": sum(b.removable for b in self.blocks),
            },
            "notes": self.notes,
        }


def _as_model(model: ModelLike) -> ir.Model:
    return model if isinstance(model, ir.Model) else load_model(model)


def inspect(model: ModelLike) -> InspectResult:
    """Find the prunable layers and residual blocks of ``model`` (a path or an onnx-ir Model).

    >>> result = inspect("build/demo/cnn.onnx")  # doctest: +SKIP
    >>> result.to_dict()["totals"]["params"]  # doctest: +SKIP
    """
    m = _as_model(model)
    info = analyse_graph(m)
    layers = find_layers(info)
    blocks = find_blocks(info, layers)
    flops = [layer.flops for layer in layers]
    notes = []
    if not layers:
        notes.append("no prunable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight) found")
    if info.shape_error:
        notes.append(info.shape_error)
    if any(f is None for f in flops):
        notes.append("FLOPs unknown for layers whose output shape could not be inferred")
    symbolic = sorted({d for shape in info.shapes.values() for d in shape if isinstance(d, str)} & _input_dims(m))
    if symbolic:
        notes.append(f"symbolic input dimension(s) {', '.join(symbolic)} counted as 1 in FLOPs")
    return InspectResult(
        layers=layers,
        blocks=blocks,
        params=model_params(info),
        prunable_params=sum(layer.params for layer in layers),
        flops=None if any(f is None for f in flops) else int(sum(flops)),
        fingerprint=fingerprint(m),
        opset=m.opset_imports.get(""),
        shape_error=info.shape_error,
        notes=notes,
    )


def _input_dims(model: ir.Model) -> set[str]:
    """Symbolic input dimensions other than the leading (batch) one."""
    dims = set()
    for v in model.graph.inputs:
        if v.shape is not None:
            dims.update(str(d.value) for d in list(v.shape)[1:] if not isinstance(d, int) and d.value is not None)
    return dims


@dataclass
class EvalResult:
    """Accuracy (percent, None without labels) and speed of a model on data."""

    top1: float | None
    top5: float | None
    samples: int
    seconds: float  # time inside ONNX Runtime
    wall_seconds: float
    provider: str
    batch_size: int
    notice: str | None = None
    preprocess: str | None = None

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "samples": self.samples,
            "seconds": round(self.seconds, 6),
            "wall_seconds": round(self.wall_seconds, 6),
            "throughput": round(self.throughput, 3),
            "provider": self.provider,
            "batch_size": self.batch_size,
            "preprocess": self.preprocess,
            "notice": self.notice,
        }


def evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    data_loader_script: str | None = None,
    input_key: str = "x",
    label_key: str | None = "y",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    provider: str = "auto",
    progress: Callable[[int, int | None], None] | None = None,
) -> EvalResult:
    """Top-1 / top-5 accuracy and throughput of ``model`` with ONNX Runtime.

    Data comes from an .npz (``data``; uint8 scaled to [0, 1], then ``(x - mean) / std`` per channel; mean
    and std default to the model's ``onnxprune.preprocess.*`` metadata when it has some) or from a loader
    script (``data_loader_script="file.py:func"``). ``progress(done, total)`` is called after each batch.
    """
    if (data is None) == (data_loader_script is None):
        raise InputError("give exactly one of --data FILE.npz or --data-loader-script FILE.py[:func]")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    m = load_model(model)
    sess = create_session(model, provider)
    specs = [
        rdata.InputSpec(i.name, i.type, list(i.shape)) for i in sess.session.get_inputs()
    ]
    preprocess_note = None
    if data is not None:
        if len(specs) != 1:
            raise InputError(
                f"the model has {len(specs)} inputs; an .npz feeds one, use --data-loader-script for several"
            )
        x, y = rdata.load_npz(data, input_key, label_key)
        rdata.check_array(x, specs[0], str(data))
        source = "options"
        if mean is None and std is None:
            mean = rdata.parse_floats(m.metadata_props.get(META_MEAN), "mean")
            std = rdata.parse_floats(m.metadata_props.get(META_STD), "std")
            source = "model metadata"
        pre = rdata.Preprocess(mean, std)
        if mean is not None or std is not None:
            preprocess_note = f"x/255 if uint8, then (x - {list(mean or [0])}) / {list(std or [1])} from {source}"
        total = len(x) if limit is None else min(limit, len(x))
        batches: Iterator = rdata.npz_batches(x, y, specs[0], pre, batch_size, limit)
    else:
        total = limit
        batches = rdata.script_batches(rdata.load_loader_script(data_loader_script), specs, limit)
    acc = Accuracy()
    run_seconds = 0.0
    start = time.perf_counter()
    output = sess.session.get_outputs()[0].name
    for feeds, labels in batches:
        t0 = time.perf_counter()
        (logits,) = sess.run(feeds, [output])
        run_seconds += time.perf_counter() - t0
        acc.update(np.asarray(logits), labels)
        if progress:
            progress(acc.samples, total)
    if acc.samples == 0:
        raise InputError("the data has no samples; check --data / --limit")
    return EvalResult(
        top1=acc.percent(acc.top1),
        top5=acc.percent(acc.top5),
        samples=acc.samples,
        seconds=run_seconds,
        wall_seconds=time.perf_counter() - start,
        provider=sess.provider,
        batch_size=batch_size,
        notice=sess.notice,
        preprocess=preprocess_note,
    )
