"""The sizes of a model's dynamic input dimensions: given by the user (``--input-shape``), fixed by the data,
or recorded in a scores or plan file, and what is still unknown.

A shape setting maps an input name to a tuple of positive ints, one per dimension. The leading dimension
of an input is its batch: it may differ between the data and a setting (the data is fed in its own
batches); every other dimension must agree. A symbolic dimension a setting fixes is fixed wherever the
same name appears (``input_ids`` and ``attention_mask`` share ``sequence``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx_ir as ir

from onnxprune.analysis.graph import dim_value
from onnxprune.errors import InputError, plural

__all__ = ["InputShapes", "UnknownDim", "declared_inputs", "describe_unknown", "merge_data_shapes",
           "parse_input_shapes", "shapes_record", "unknown_dims"]

InputShapes = dict[str, tuple[int, ...]]
UnknownDim = tuple[str, int, str | None]  # (input name, axis, symbolic name or None)

OPTION = "--input-shape"


def declared_inputs(model: ir.Model) -> dict[str, tuple]:
    """Input name -> the declared shape (int, symbolic name, or None per dimension; () when unranked)."""
    inputs = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        inputs[v.name] = () if v.shape is None else tuple(dim_value(d) for d in v.shape)
    return inputs


def parse_input_shapes(texts: Iterable[str] | Mapping[str, Iterable[int]] | None, model: ir.Model) -> InputShapes:
    """``NAME:D0,D1,...`` settings (split at the last colon: tf2onnx names end in ``:0``; a bare ``D0,D1,...``
    for a model with one input), or a mapping name -> dims, checked against the model's inputs."""
    if not texts:
        return {}
    inputs = declared_inputs(model)
    named: dict[str, int] = {}
    if not isinstance(texts, Mapping):
        named = _named_dims([t for t in texts if "=" in t and ":" not in t], inputs)
        texts = [t for t in texts if not ("=" in t and ":" not in t)]
    from_record = isinstance(texts, Mapping)
    pairs = list(texts.items()) if from_record else [_split(t, inputs) for t in texts]
    shapes: InputShapes = {}
    for name, dims in pairs:
        if name not in inputs:
            raise InputError(f"{OPTION} names {name!r}, which is not an input of the model; its inputs: "
                             f"{', '.join(repr(n) for n in inputs)}")
        if name in shapes:
            raise InputError(f"{OPTION} gives {name!r} twice; give each input once")
        dims = tuple(int(d) for d in dims)
        if any(d < (0 if from_record else 1) for d in dims):  # a recorded 0 came from --dim (an empty cache)
            raise InputError(f"{OPTION} {name}:{_text(dims)} has a dimension below 1; every size must be positive")
        declared = inputs[name]
        if declared and len(declared) != len(dims):
            raise InputError(f"{OPTION} gives {name!r} {plural(len(dims), 'dimension')}, the model declares "
                             f"{len(declared)} ({_text(declared)})")
        for axis, (want, have) in enumerate(zip(declared, dims)):
            if isinstance(want, int) and want != have:
                raise InputError(f"{OPTION} {name}:{_text(dims)} sets dimension {axis} to {have}; the model fixes "
                                 f"it at {want}")
        shapes[name] = dims
    for name, declared in inputs.items():  # --dim NAME=VALUE: every input whose dimensions it names
        if name in shapes or not named or not any(d in named for d in declared):
            continue
        filled = tuple(named.get(d, 1 if axis == 0 else None) if isinstance(d, str) else d
                       for axis, d in enumerate(declared))
        if all(isinstance(d, int) for d in filled):
            shapes[name] = filled
    return _complete(shapes, inputs)


def _named_dims(texts: list[str], inputs: dict[str, tuple]) -> dict[str, int]:
    """``--dim NAME=VALUE`` settings: the size of a symbolic dimension wherever the inputs name it (a decoder's
    dozens of KV-cache inputs share batch_size, past_sequence_length...); 0 is allowed (an empty cache)."""
    known = {d for declared in inputs.values() for d in declared if isinstance(d, str)}
    named: dict[str, int] = {}
    for text in texts:
        name, _, value = text.partition("=")
        name, value = name.strip(), value.strip()
        if name not in known:
            raise InputError(f"--dim {text!r}: no input has a dimension named {name!r}; named dimensions: "
                             f"{', '.join(sorted(known)) or 'none'}")
        if not value.isdigit():
            raise InputError(f"--dim {text!r}: the size must be a whole number (NAME=VALUE, e.g. batch_size=1)")
        if name in named:
            raise InputError(f"--dim {name} is given twice; give it once")
        named[name] = int(value)
    return named


def _split(text: str, inputs: dict[str, tuple]) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    if not sep:
        if len(inputs) != 1:
            raise InputError(f"{OPTION} {text!r} has no input name and the model has {len(inputs)} inputs; "
                             f"give NAME:D0,D1,... for each (inputs: {', '.join(repr(n) for n in inputs)})")
        name = next(iter(inputs))
    parts = [p.strip() for p in dims.replace("x", ",").split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise InputError(f"{OPTION} {text!r} is not NAME:D0,D1,... with whole-number sizes (e.g. images:1,3,640,640)")
    return name, tuple(int(p) for p in parts)


def _complete(shapes: InputShapes, inputs: dict[str, tuple]) -> InputShapes:
    """Fill the inputs the settings fix through shared symbolic names (and fixed dims); the batch (a name some
    input leads with) is not a size the settings fix, wherever it sits."""
    batch_names = {d[0] for d in inputs.values() if d and isinstance(d[0], str)}
    sizes: dict[str, int] = {}
    for name, dims in shapes.items():
        for axis, d in enumerate(inputs[name]):
            if isinstance(d, str) and axis < len(dims) and (axis == 0 or d not in batch_names):
                sizes.setdefault(d, dims[axis])
    done = dict(shapes)
    for name, declared in inputs.items():
        if name in done or not declared:
            continue
        filled = tuple(d if isinstance(d, int) else None if not isinstance(d, str) or (axis and d in batch_names)
                       else sizes.get(d) for axis, d in enumerate(declared))
        if all(isinstance(d, int) for d in filled):
            done[name] = filled
    return done


def merge_data_shapes(given: InputShapes, data: InputShapes, model: ir.Model) -> InputShapes:
    """The data's shapes, checked against ``given``: the dims after the batch must agree."""
    shapes = dict(given)
    for name, dims in data.items():
        want = given.get(name)
        if want is not None and (len(want) != len(dims) or tuple(want[1:]) != tuple(dims[1:])):
            raise InputError(f"{OPTION} {name}:{_text(want)} contradicts the data, whose {name!r} samples are "
                             f"{_text(dims[1:]) or 'scalars'}; drop {OPTION} or give the data's shape")
        shapes[name] = tuple(dims) if want is None else (want[0], *dims[1:])
    return _complete(shapes, declared_inputs(model))


def unknown_dims(model: ir.Model, shapes: InputShapes) -> list[UnknownDim]:
    """Dimensions after the batch of inputs that neither the graph nor ``shapes`` fix. A dimension named like
    an input's leading one is the batch wherever it sits (a recurrent state (layers, batch, hidden))."""
    declared_all = declared_inputs(model)
    batch_names = {d[0] for d in declared_all.values() if d and isinstance(d[0], str)}
    missing = []
    for name, declared in declared_all.items():
        if name in shapes:
            continue
        missing += [(name, axis, d) for axis, d in enumerate(declared)
                    if axis > 0 and not isinstance(d, int) and d not in batch_names]
    return missing


def describe_unknown(missing: list[UnknownDim], model: ir.Model) -> str:
    """'dimension 2 ("height") of input "images"', and an example setting to give."""
    inputs = declared_inputs(model)
    by_input: dict[str, list[UnknownDim]] = {}
    for entry in missing:
        by_input.setdefault(entry[0], []).append(entry)
    parts = []
    for name, dims in by_input.items():
        axes = ", ".join(f"{axis}" + (f" ({sym!r})" if sym else "") for _, axis, sym in dims)
        parts.append(f"{'dimension' if len(dims) == 1 else 'dimensions'} {axes} of input {name!r}")
    examples = " ".join(f"{OPTION} {name}:{_example(inputs[name])}" for name in by_input)
    return f"{'; '.join(parts)} ({examples}, or --data)"


def _example(declared: tuple) -> str:
    return ",".join(str(d) if isinstance(d, int) else ("1" if axis == 0 else "N") for axis, d in enumerate(declared))


def shapes_record(shapes: InputShapes) -> dict[str, list[int]]:
    """How scores and plans record the shapes they were made at."""
    return {name: list(dims) for name, dims in shapes.items()}


def _text(dims) -> str:
    return ",".join("?" if d is None else str(d) for d in dims)
