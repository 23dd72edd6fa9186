"""Fine-tuning a loaded model end to end: its data as arrays, the teacher's cached outputs, training, and
the trained values written back into the same graph (onnxprune.recovery.finetune does the training)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from onnxprune.errors import InputError
from onnxprune.io import load_model
from onnxprune.recovery import finetune as ft
from onnxprune.recovery.convert import WriteBackPass
from onnxprune.runtime import data as rdata
from onnxprune.runtime.feeding import batches as feed_batches
from onnxprune.runtime.session import create_session

__all__ = ["Outcome", "finetune_model"]


@dataclass
class Outcome:
    """What training did to the model (already written back into it)."""

    report: ft.TrainReport
    options: ft.FinetuneOptions  # as used (augmentation resolved, labels set)
    labels: bool
    eval_spec: rdata.DataSpec | None
    teacher_seconds: float


def finetune_model(m: ir.Model, path: str | os.PathLike, spec: rdata.DataSpec, opts: ft.FinetuneOptions, *,
                   teacher: str | os.PathLike | None, labels: bool | None,
                   eval_data: rdata.DataSpec | str | os.PathLike | None,
                   progress: Callable[[str, int, int | None, dict], None] | None,
                   start: float, start_cpu: float) -> Outcome:
    """Train ``m`` (loaded from ``path``) on ``spec``'s data, with labels and/or distillation from
    ``teacher``, and write the trained values back into ``m``. ``start`` / ``start_cpu``: when the command
    began (the time budget counts from then)."""
    _lift_float_constants(m)
    if opts.epochs == 0 and teacher is None and not any(n.op_type == "BatchNormalization" for n in m.graph):
        raise InputError(f"{path} has no BatchNormalization (folded into the convolutions), so recalibration "
                         "needs the statistics to restore: give --teacher ORIGINAL.onnx")
    x, y, _ = _arrays(m, path, spec)
    use_labels = (y is not None) if labels is None else labels
    if use_labels and y is None:
        raise InputError(f"--labels: {spec.data or spec.loader} has no labels (key {spec.label_key!r}); "
                         "give labelled data or distil with --teacher ORIGINAL.onnx --no-labels")
    if not use_labels and teacher is None:
        raise InputError("nothing to learn from: the data has no labels and no --teacher ORIGINAL.onnx is given")
    if "auto" in opts.augment:
        opts = dataclasses.replace(opts, augment=tuple(a for a in opts.augment if a != "auto")
                                   + (("flip",) if x.ndim == 4 and "flip" not in opts.augment else ()))
    if ("flip" in opts.augment or "crop" in opts.augment) and x.ndim != 4:
        raise InputError(f"--augment flip/crop needs image inputs (N, C, H, W), the model takes rank {x.ndim}; "
                         "use --augment none")
    eval_x = eval_y = espec = None
    if eval_data is not None:
        espec = rdata.DataSpec.of(eval_data)
        if espec.mean is None and espec.std is None:
            espec = rdata.DataSpec.of(espec, mean=spec.mean, std=spec.std)
        eval_x, eval_y, _ = _arrays(m, path, espec)
        if eval_y is None:
            raise InputError(f"--eval-data {espec.data}: no labels (key {espec.label_key!r}); give labelled data")
    torch.set_num_threads(opts.threads or max(1, len(os.sched_getaffinity(0))))
    module = ft.build_module(m, opts.insert_bn)
    t_logits = t_flipped = None
    t_stats: dict = {}
    teacher_seconds = 0.0
    if teacher is not None:
        t0 = time.perf_counter()
        tm = load_model(teacher)
        t_inputs = [v for v in tm.graph.inputs if v.name not in tm.graph.initializers]
        if len(t_inputs) != 1:
            raise InputError(f"the teacher {teacher} has {len(t_inputs)} inputs; it must take the student's input")
        names = [ins.output for ins in module.inserted]
        have = {v.name for n in tm.graph for v in n.outputs}
        t_logits, t_flipped, t_stats = ft.teacher_outputs(
            tm, x, 256, [n for n in names if n in have], opts.calibration, spec.provider, progress,
            flip="flip" in opts.augment)
        if t_logits.shape[0] != len(x):
            raise InputError(f"the teacher's first output has shape {list(t_logits.shape)}; its first "
                             f"dimension must be the {len(x)} samples")
        if t_logits.ndim != 2 and use_labels:
            raise InputError(f"the model's first output has shape {list(t_logits.shape)}, not class scores: "
                             "labels cannot train it; distil from the teacher alone with --no-labels")
        teacher_seconds = time.perf_counter() - t0
    # (channels_last is faster for the convolutions of a CPU training step)
    layout = torch.channels_last if x.ndim == 4 else torch.contiguous_format
    xt = torch.from_numpy(x).contiguous(memory_format=layout)
    module = module.to(memory_format=layout)
    ext = None if eval_x is None else torch.from_numpy(eval_x).contiguous(memory_format=layout)
    opts.labels = use_labels
    rep = ft.train(module, xt, y, opts, teacher_logits=t_logits,
                   teacher_flipped=t_flipped, teacher_stats=t_stats, eval_x=ext, eval_y=eval_y,
                   progress=progress, start_time=start, start_cpu=start_cpu)
    WriteBackPass(module)(m)
    return Outcome(report=rep, options=opts, labels=use_labels, eval_spec=espec, teacher_seconds=teacher_seconds)


def _arrays(m: ir.Model, path, spec: rdata.DataSpec) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """All of ``spec``'s samples, preprocessed for the model's single input, and their labels."""
    sess = create_session(path, "cpu")
    if len(sess.session.get_inputs()) != 1:
        raise InputError(f"finetune trains models with one input; this one has {len(sess.session.get_inputs())}")
    batches, _, note = feed_batches(m, sess, spec)
    xs, ys = [], []
    for feeds, labels in batches:
        xs.append(next(iter(feeds.values())))
        ys.append(labels)
    if not xs:
        raise InputError("the data has no samples; check --data / --limit")
    x = np.concatenate(xs)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"finetune needs a float model input, this one takes {x.dtype}")
    y = None if any(v is None for v in ys) else np.concatenate(ys).astype(np.int64)
    return np.ascontiguousarray(x, np.float32), y, note


def _lift_float_constants(m: ir.Model) -> None:
    """Weights held in Constant nodes (older exporters) become initializers, so they train."""
    if any(n.op_type == "Constant" and "value" in n.attributes
           and n.attributes["value"].value.dtype.is_floating_point() and n.attributes["value"].value.size > 1
           for n in m.graph):
        from onnx_ir.passes.common import LiftConstantsToInitializersPass

        LiftConstantsToInitializersPass(size_limit=2)(m)
