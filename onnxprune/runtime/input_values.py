"""Values of a model's auxiliary inputs: the ones that are not data (a sample rate, an image size, a
recurrent state), given as ``--input-value NAME=V[,V...]`` and fed the same way to every run: data-driven
commands, the output check and timing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxprune.errors import InputError

__all__ = ["InputValues", "parse_input_values", "value_feed"]

InputValues = dict[str, tuple[float, ...]]


def parse_input_values(items: Sequence[str] | Mapping[str, object] | None) -> InputValues:
    """``["sr=16000", "state=0"]`` (or a mapping name -> number or numbers) as name -> numbers."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            name, sep, text = str(item).partition("=")
            if not sep or not name or not text:
                raise InputError(f"--input-value takes NAME=VALUE or NAME=V1,V2,..., got {item!r}")
            pairs.append((name, text.replace(" ", "").split(",")))
    out: InputValues = {}
    for name, raw in pairs:
        if name in out:
            raise InputError(f"--input-value {name} is given twice; give it once")
        seq = raw if isinstance(raw, list | tuple | np.ndarray) else [raw]
        try:
            out[name] = tuple(float(v) for v in np.asarray(seq).reshape(-1))
        except ValueError:
            raise InputError(f"--input-value {name}= must be numbers, got {','.join(map(str, seq))!r}") from None
    return out


def value_feed(name: str, shape: Sequence, dtype, values: tuple[float, ...], batch: int,
               batch_dim: str | int | None = None) -> np.ndarray:
    """The array fed to input ``name`` (declared ``shape``, numpy ``dtype``) from ``values``: a dimension
    that is ``batch_dim`` (the data's batch symbol) or the leading dynamic one gets ``batch``, other dynamic
    ones 1; one value fills the array, else the values must number exactly its elements."""
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif (batch_dim is not None and d == batch_dim) or (batch_dim is None and i == 0):
            dims.append(batch)
        else:
            dims.append(1)
    if len(values) != 1 and len(values) != int(np.prod(dims)):
        if len(dims) == 1 and not (isinstance(shape[0], int) and shape[0] > 0):
            dims = [len(values)]
        else:
            raise InputError(f"--input-value {name} has {len(values)} values for an input of shape {dims}; give one "
                             f"value (it fills the input) or {int(np.prod(dims))}")
    arr = np.full(dims, values[0]) if len(values) == 1 else np.asarray(values).reshape(dims)
    return arr.astype(dtype if dtype is not None else np.float32)
