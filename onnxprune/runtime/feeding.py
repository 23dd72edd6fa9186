"""Feeding data to a model: batches of (feeds, labels) from a DataSpec, checked against the model's inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxprune.analysis.input_shapes import InputShapes, declared_inputs
from onnxprune.errors import InputError
from onnxprune.runtime import data as rdata
from onnxprune.runtime.input_values import value_feed
from onnxprune.runtime.language_model import Decoder, decoder_of
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
        values = _checked_values(spec, {s.name: s for s in specs})
        return rdata.script_batches(rdata.load_loader_script(spec.loader), specs, total, fixed, values), total, note
    by_name = {s.name: s for s in specs}
    values = _checked_values(spec, by_name)
    decoder = decoder_of(model)
    if decoder is not None:
        return _decoder_batches(decoder, spec, sess)
    data_names = [s.name for s in specs if s.name not in values]  # the inputs the .npz feeds
    if not data_names:
        raise InputError("every model input has an --input-value: the data feeds none; drop one of them")
    arrays, y = rdata.load_npz_inputs(spec.data, data_names, spec.input_key, spec.label_key)
    missing = [n for n in data_names if n not in arrays]
    if missing:
        raise InputError(f"{spec.data} has no array for the model's input(s) {', '.join(map(repr, missing))}; "
                         "add arrays of those names, or give --input-value NAME=VALUE for inputs that are not data")
    main = by_name[data_names[0]]
    n = len(arrays[main.name]) if arrays[main.name].ndim else 0
    batch_dim = main.shape[0] if main.shape else None
    axes = {name: _batch_axis(by_name[name], batch_dim, arr, n) for name, arr in arrays.items()}
    axes[main.name] = 0
    if spec.offset >= n:
        raise InputError(f"--offset {spec.offset} leaves no samples of the {n} in {spec.data}")
    for name, arr in arrays.items():
        rdata.check_array(arr, by_name[name], f"{spec.data} ({name!r})")
    mean, std, source = spec.mean, spec.std, "options"
    if mean is None and std is None:
        mean = rdata.parse_floats(model.metadata_props.get(META_MEAN), "mean")
        std = rdata.parse_floats(model.metadata_props.get(META_STD), "std")
        source = "model metadata"
    notes = []
    if mean is not None or std is not None:
        notes.append(f"x/255 if uint8, then (x - {list(mean or [0])}) / {list(std or [1])} from {source}")
    total = n - spec.offset if spec.limit is None else min(spec.limit, n - spec.offset)
    batch_size = fed_batch_size(sess, spec)
    if batch_size != spec.batch_size:  # the graph accepts no other batch size: feed it that
        whole = total - total % batch_size
        if whole == 0:
            raise InputError(f"the model's input {main.name!r} fixes the batch at {batch_size}, and the data "
                             f"has only {total} sample(s); give at least {batch_size}")
        notes.append(f"fed in batches of {batch_size}, the batch the model's graph fixes"
                     + (f" (the last {total - whole} sample(s) left out)" if whole < total else ""))
        total = whole
    if len(specs) > 1:
        notes.append("inputs " + ", ".join(f"{name} from the data" if name in arrays else f"{name} = {values[name]}"
                                           for name in by_name))
    feeds = _npz_feeds(arrays, axes, y, by_name, main.name, rdata.Preprocess(mean, std), values, batch_dim,
                       spec.offset, total, batch_size)
    return feeds, total, "; ".join(notes) or None


def _decoder_batches(decoder: Decoder, spec: rdata.DataSpec, sess):
    """A decoder LM's batches: token sequences from the data, the other inputs a prefill from an empty cache."""
    arrays, _ = rdata.load_npz_inputs(spec.data, [decoder.input_ids], spec.input_key, None)
    ids = arrays.get(decoder.input_ids)
    if ids is None or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{spec.data}: a language model reads token ids: give an integer array "
                         f"{decoder.input_ids!r} (or --input-key) of shape (sequences, tokens)")
    if decoder.vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= decoder.vocab):
        raise InputError(f"{spec.data}: token ids run from {ids.min()} to {ids.max()}, outside the model's "
                         f"vocabulary of {decoder.vocab}; tokenise with the model's tokenizer")
    n = len(ids)
    if spec.offset >= n:
        raise InputError(f"--offset {spec.offset} leaves no samples of the {n} in {spec.data}")
    total = n - spec.offset if spec.limit is None else min(spec.limit, n - spec.offset)
    batch_size = fed_batch_size(sess, spec)

    def feeds():
        for start in range(spec.offset, spec.offset + total, batch_size):
            yield decoder.prefill(ids[start:min(start + batch_size, spec.offset + total)]), None

    note = (f"{ids.shape[1]} tokens per sequence, fed as a prefill from an empty cache (attention mask of ones"
            + (", positions 0..n-1" if decoder.position_ids else "") + ")")
    return feeds(), total, note


def _checked_values(spec: rdata.DataSpec, inputs: dict[str, rdata.InputSpec]) -> dict[str, tuple[float, ...]]:
    values = dict(spec.input_values or {})
    unknown = [name for name in values if name not in inputs]
    if unknown:
        raise InputError(f"--input-value {unknown[0]}: the model has no input of that name (its inputs: "
                         f"{', '.join(inputs)})")
    return values


def _batch_axis(spec: rdata.InputSpec, batch_dim, arr: np.ndarray, samples: int) -> int | None:
    """The axis of ``arr`` that holds the samples: where the input's shape names the main input's batch
    dimension (a recurrent state (layers, batch, hidden)), else a leading axis of the sample count; None: the
    array is fed whole to every batch (a sample rate, a fixed table)."""
    if isinstance(batch_dim, str) and batch_dim in spec.shape and arr.ndim == len(spec.shape):
        axis = spec.shape.index(batch_dim)
        return axis if arr.shape[axis] == samples else None
    return 0 if arr.ndim == len(spec.shape) and arr.ndim and arr.shape[0] == samples else None


def _npz_feeds(arrays, axes, y, inputs, main, preprocess, values, batch_dim, offset, total, batch_size):
    for start in range(offset, offset + total, batch_size):
        stop = min(start + batch_size, offset + total)
        feeds = {}
        for name, arr in arrays.items():
            axis, spec = axes[name], inputs[name]
            part = arr if axis is None else arr[(slice(None),) * axis + (slice(start, stop),)]
            feeds[name] = preprocess(part, spec.dtype) if name == main else part.astype(spec.dtype, copy=False)
        for name, vals in values.items():
            spec = inputs[name]
            feeds[name] = value_feed(name, spec.shape, spec.dtype, vals, stop - start, batch_dim)
        yield feeds, (None if y is None else y[start:stop])


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
    """(the provider a session really got, all batches as a list) for measuring ``model`` in memory. The data
    is checked against a session of the model's inputs alone, so no weight is read or copied for it."""
    sess = create_session(_inputs_only(model).SerializeToString(), spec.provider)
    found, _, _ = batches(model, sess, spec)
    return sess.provider, list(found)


def _inputs_only(model: ir.Model) -> onnx.ModelProto:
    """A model with ``model``'s graph inputs (not its initializers), each passed through an Identity."""
    infos = [ir.serde.serialize_value(v) for v in model.graph.inputs if v.name not in model.graph.initializers]
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}__passed"]) for i in infos]
    outputs = [helper.make_value_info(f"{i.name}__passed", i.type) for i in infos]
    graph = helper.make_graph(nodes, "inputs", infos, outputs)
    return helper.make_model(graph, ir_version=model.ir_version,
                             opset_imports=[helper.make_opsetid("", model.opset_imports.get("", 17))])


def data_input_shapes(model: ir.Model, spec: rdata.DataSpec) -> InputShapes:
    """The input sizes ``spec``'s data fixes, one sample each (the batch the graph fixes, else 1): from the
    .npz array's header, or the first batch a loader script yields. Data that does not fit the model's declared
    shapes fixes nothing here; feeding it reports the mismatch."""
    inputs = declared_inputs(model)
    if spec.data is not None:
        data_names = [name for name in inputs if name not in (spec.input_values or {})]
        if not data_names:
            return {}
        found = {name: rdata.npz_shape(spec.data, name) for name in data_names[1:]}
        found[data_names[0]] = rdata.npz_shape(spec.data, spec.input_key) or rdata.npz_shape(spec.data, data_names[0])
        if found[data_names[0]] is None:
            found.update({k: v.shape for k, v in rdata.load_npz_inputs(spec.data, data_names, spec.input_key,
                                                                        spec.label_key)[0].items()})
    elif spec.loader is not None:
        first = next(iter(rdata.load_loader_script(spec.loader)), None)
        found = {k: getattr(v, "shape", None) for k, v in first.items()} if isinstance(first, dict) else {}
    else:
        return {}
    shapes = {}
    batch_names = {d[0] for d in inputs.values() if d and isinstance(d[0], str)}
    for name, shape in found.items():
        declared = inputs.get(name)
        if declared is None or shape is None or len(shape) != len(declared) or len(shape) == 0:
            continue
        if any(d in batch_names for d in declared[1:]):  # the batch on another axis (a recurrent state)
            continue
        if any(isinstance(d, int) and d != s for d, s in zip(declared[1:], shape[1:], strict=True)):
            continue
        batch = declared[0] if isinstance(declared[0], int) else 1
        shapes[name] = (batch, *(int(s) for s in shape[1:]))
    return shapes
