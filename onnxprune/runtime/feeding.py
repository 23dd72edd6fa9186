"""Feeding data to a model: batches of (feeds, labels) from a DataSpec, checked against the model's inputs."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.analysis.input_shapes import InputShapes, declared_inputs
from onnxprune.errors import InputError
from onnxprune.runtime import data as rdata
from onnxprune.runtime.session import create_session

__all__ = ["META_MEAN", "META_STD", "batches", "calibration_batches", "data_input_shapes", "fed_batch_size"]

# Preprocessing a model can carry in its metadata (written by models/export.py), used when no --mean/--std.
META_MEAN = "onnxprune.preprocess.mean"
META_STD = "onnxprune.preprocess.std"


def batches(model: ir.Model, sess, spec: rdata.DataSpec):
    """(batches of (feeds, labels), sample count or None, preprocessing note) for the model whose ONNX
    Runtime session is ``sess``; the data is checked against the session's inputs."""
    if (spec.data is None) == (spec.loader is None):
        raise InputError("give exactly one of --data FILE.npz or --data-loader-script FILE.py[:func]")
    if spec.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {spec.batch_size}")
    if spec.limit is not None and spec.limit < 1:
        raise InputError(f"--limit must be at least 1, got {spec.limit}")
    if spec.offset < 0:
        raise InputError(f"--offset must be at least 0, got {spec.offset}")
    specs = _input_specs(sess)
    if spec.data is None:
        if spec.offset:
            raise InputError("--offset applies to --data; skip samples inside the loader script instead")
        fixed = _fixed_batch(specs)  # the loader's batches are regrouped into the batch the graph fixes
        total = spec.limit if fixed is None or spec.limit is None else spec.limit - spec.limit % fixed
        if total == 0:
            raise InputError(f"the model's inputs fix the batch at {fixed}; give --limit of at least {fixed}")
        note = None if fixed is None else (f"fed in batches of {fixed}, the batch the model's graph fixes (samples "
                                           "past the last whole batch left out)")
        return rdata.script_batches(rdata.load_loader_script(spec.loader), specs, total, fixed), total, note
    if len(specs) != 1:
        raise InputError(f"the model has {len(specs)} inputs; an .npz feeds one, use --data-loader-script for several")
    x, y = rdata.load_npz(spec.data, spec.input_key, spec.label_key)
    if spec.offset >= len(x):
        raise InputError(f"--offset {spec.offset} leaves no samples of the {len(x)} in {spec.data}")
    x, y = x[spec.offset:], (None if y is None else y[spec.offset:])
    rdata.check_array(x, specs[0], str(spec.data))
    mean, std, source = spec.mean, spec.std, "options"
    if mean is None and std is None:
        mean = rdata.parse_floats(model.metadata_props.get(META_MEAN), "mean")
        std = rdata.parse_floats(model.metadata_props.get(META_STD), "std")
        source = "model metadata"
    notes = []
    if mean is not None or std is not None:
        notes.append(f"x/255 if uint8, then (x - {list(mean or [0])}) / {list(std or [1])} from {source}")
    total = len(x) if spec.limit is None else min(spec.limit, len(x))
    batch_size = fed_batch_size(sess, spec)
    if batch_size != spec.batch_size:  # the graph accepts no other batch size: feed it that
        whole = total - total % batch_size
        if whole == 0:
            raise InputError(f"the model's input {specs[0].name!r} fixes the batch at {batch_size}, and the data "
                             f"has only {total} sample(s); give at least {batch_size}")
        notes.append(f"fed in batches of {batch_size}, the batch the model's graph fixes"
                     + (f" (the last {total - whole} sample(s) left out)" if whole < total else ""))
        total = whole
    feeds = rdata.npz_batches(x, y, specs[0], rdata.Preprocess(mean, std), batch_size, total)
    return feeds, total, "; ".join(notes) or None


def _fixed_batch(specs: list[rdata.InputSpec]) -> int | None:
    """The batch every input's graph shape fixes (its leading dimension, a number), if they all do."""
    firsts = {s.shape[0] if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 else None for s in specs}
    return firsts.pop() if len(firsts) == 1 else None


def fed_batch_size(sess, spec: rdata.DataSpec) -> int:
    """The batch size the data is fed in: the batch the model's graph fixes (the inputs' leading dimension,
    when that is a number), else the option's."""
    return _fixed_batch(_input_specs(sess)) or spec.batch_size


def _input_specs(sess) -> list[rdata.InputSpec]:
    return [rdata.InputSpec(i.name, i.type, list(i.shape)) for i in sess.session.get_inputs()]


def calibration_batches(model: ir.Model, spec: rdata.DataSpec) -> tuple[str, list]:
    """(the provider a session really got, all batches as a list) for measuring ``model`` in memory."""
    sess = create_session(ir.serde.serialize_model(model).SerializeToString(), spec.provider)
    found, _, _ = batches(model, sess, spec)
    return sess.provider, list(found)


def data_input_shapes(model: ir.Model, spec: rdata.DataSpec) -> InputShapes:
    """The input sizes ``spec``'s data fixes, one sample each (the batch the graph fixes, else 1): from the
    .npz array's header, or the first batch a loader script yields. Data that does not fit the model's declared
    shapes fixes nothing here; feeding it reports the mismatch."""
    inputs = declared_inputs(model)
    if spec.data is not None:
        if len(inputs) != 1:
            return {}
        shape = rdata.npz_shape(spec.data, spec.input_key)
        if shape is None:
            shape = rdata.load_npz(spec.data, spec.input_key, spec.label_key)[0].shape
        found = {next(iter(inputs)): shape}
    elif spec.loader is not None:
        first = next(iter(rdata.load_loader_script(spec.loader)), None)
        found = {k: getattr(v, "shape", None) for k, v in first.items()} if isinstance(first, dict) else {}
    else:
        return {}
    shapes = {}
    for name, shape in found.items():
        declared = inputs.get(name)
        if declared is None or shape is None or len(shape) != len(declared) or len(shape) == 0:
            continue
        if any(isinstance(d, int) and d != s for d, s in zip(declared[1:], shape[1:], strict=True)):
            continue
        batch = declared[0] if isinstance(declared[0], int) else 1
        shapes[name] = (batch, *(int(s) for s in shape[1:]))
    return shapes
