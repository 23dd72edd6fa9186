"""Evaluation data: .npz arrays (loaded with allow_pickle=False) or a user loader script.

A loader script (``--data-loader-script file.py[:func]``, func defaults to ``load_data``) is the only way
user code runs: the function yields batches as dicts {input name: array}, optionally with a "labels" key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.errors import InputError
from onnxprune.runtime.input_values import parse_input_values, value_feed

__all__ = ["DataSpec", "InputSpec", "Preprocess", "check_array", "file_sha256", "load_loader_script", "load_npz",
           "npz_shape", "parse_floats", "parse_size", "script_batches"]

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


@dataclass
class DataSpec:
    """Where evaluation or calibration data comes from, and how it is fed (the CLI's data options).

    ``data``: an .npz; ``loader``: ``file.py[:func]`` instead. uint8 inputs are scaled to [0, 1], then
    ``(x - mean) / std`` per channel (mean/std default to the model's metadata). ``offset`` skips samples of
    the .npz, ``limit`` keeps the first N after it. A model with several inputs is fed each from the .npz
    array of its name (the first may also come from ``input_key``); ``input_values`` gives the inputs that are
    not data (name -> numbers).
    """

    data: str | os.PathLike | None = None
    loader: str | None = None
    input_key: str = "x"
    label_key: str | None = "y"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_size: int = 256
    limit: int | None = None
    offset: int = 0
    provider: str = "auto"
    input_values: dict[str, tuple[float, ...]] | None = None  # auxiliary inputs (onnxprune.runtime.input_values)

    @classmethod
    def of(cls, data: "DataSpec | str | os.PathLike | None" = None, **options) -> "DataSpec":
        """A spec from a path (or an existing spec) and keyword options; unknown options are an error."""
        if isinstance(data, DataSpec):
            return dataclasses.replace(data, **options) if options else data
        if "data_loader_script" in options:
            options["loader"] = options.pop("data_loader_script")
        if options.get("input_values"):
            options["input_values"] = parse_input_values(options["input_values"])
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown data option(s): {', '.join(sorted(unknown))}")
        return cls(data=data, **options)

    def record(self) -> dict:
        """What an artefact records about its data: file name and content hash, and how it was fed."""
        source = self.data if self.data is not None else (self.loader or "").partition(":")[0] or None
        rec = {"data": Path(self.data).name if self.data is not None else None, "loader": self.loader,
               "sha256": file_sha256(source) if source and Path(source).is_file() else None,
               "input_key": self.input_key, "label_key": self.label_key,
               "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
               "offset": self.offset, "limit": self.limit, "batch_size": self.batch_size}
        if self.input_values:
            rec["input_values"] = {k: list(v) for k, v in self.input_values.items()}
        return rec

    @property
    def given(self) -> bool:
        return self.data is not None or self.loader is not None


@dataclass
class InputSpec:
    """What the model expects of an input: name, ONNX Runtime type string, shape (int or symbolic)."""

    name: str
    type: str
    shape: list

    @property
    def dtype(self):
        return _NP_DTYPES.get(self.type)


@dataclass
class Preprocess:
    """uint8 images are scaled to [0, 1]; then ``(x - mean) / std`` per channel (axis 1) if given."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, x: np.ndarray, dtype) -> np.ndarray:
        if dtype is None or not np.issubdtype(dtype, np.floating):
            return x.astype(dtype) if dtype is not None else x
        out = x.astype(np.float32)
        if x.dtype == np.uint8:
            out /= 255.0
        if self.mean is not None or self.std is not None:
            channels = out.shape[1] if out.ndim > 1 else 1
            shape = (1, -1) + (1,) * max(out.ndim - 2, 0)
            mean = _per_channel(self.mean, channels, 0.0, "mean").reshape(shape)
            std = _per_channel(self.std, channels, 1.0, "std").reshape(shape)
            out = (out - mean) / std
        return out.astype(dtype, copy=False)


def _per_channel(values, channels: int, default: float, what: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, np.float32)
    arr = np.asarray(values, np.float32)
    if arr.size == 1:
        return np.full(channels, float(arr[0]), np.float32)
    if arr.size != channels:
        raise InputError(f"--{what} has {arr.size} values but the input has {channels} channels; give one per channel")
    return arr


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise InputError(f"--{what} must be comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | None, what: str) -> int | None:
    """A memory size such as 512MB, 2GB, 1.5GiB or a plain byte count (binary units: 1 GB = 2**30 bytes)."""
    if text is None or text == "":
        return None
    t = text.strip().lower().replace(" ", "")
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise InputError(f"--{what} must be a positive size such as 512MB or 2GB, got {text!r}")
    return int(value * _UNITS[unit])


def npz_shape(path: str | os.PathLike, key: str) -> tuple[int, ...] | None:
    """The shape of array ``key`` of an .npz, from its header alone (no data read); None when it cannot be
    read that way (load_npz then reads the file and names the problem)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            return tuple(read[version](f)[0]) if version in read else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def load_npz(path: str | os.PathLike, input_key: str = "x", label_key: str | None = "y"
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs and (if present) labels from an .npz file, without pickle."""
    arrays, y = load_npz_inputs(path, [], input_key, label_key)
    return arrays[input_key], y


def load_npz_inputs(path: str | os.PathLike, names: Sequence[str], input_key: str = "x",
                    label_key: str | None = "y") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The arrays of an .npz (without pickle) that feed the model inputs ``names``, and the labels if present.
    A single input, or the first of several that has no array of its name, comes from ``input_key``
    (returned under the input's name; under ``input_key`` when ``names`` is empty)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}; give an .npz with an input array (key {input_key!r})")
    main = names[0] if names else input_key
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = list(npz.keys())
            source = input_key if input_key in keys and (len(names) <= 1 or main not in keys) else main
            if source not in keys:
                wanted = input_key if len(names) <= 1 else f"{main!r} or {input_key!r}"
                raise InputError(f"{p} has no array {wanted!r} (it has: {', '.join(keys)}); choose one with "
                                 "--input-key" + (", or name the arrays after the model's inputs" if len(names) > 1
                                                  else ""))
            arrays = {main: npz[source]}
            arrays.update({name: npz[name] for name in names[1:] if name in keys})
            y = npz[label_key] if label_key and label_key in keys and label_key not in arrays else None
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read {p} as an .npz archive ({exc}); save data with numpy.savez") from exc
    x = arrays[main]
    if y is not None and (x.ndim == 0 or len(y) != len(x)):
        raise InputError(
            f"{p}: {len(y)} labels ({label_key!r}) for {len(x) if x.ndim else 1} inputs ({source!r}); they must match"
        )
    if y is not None and not _class_indices(y):
        raise InputError(
            f"{p}: labels ({label_key!r}) of dtype {y.dtype} and shape {list(y.shape)} are not class indices; "
            "give one whole number per input, or point --label-key at another array"
        )
    return arrays, y


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:32]


def _class_indices(y: np.ndarray) -> bool:
    if y.ndim != 1:
        return False
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return True
    return bool(np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))


def check_array(arr: np.ndarray, spec: InputSpec, source: str) -> None:
    """Rank and fixed dimensions must match the model input; the dtype must be convertible."""
    if len(spec.shape) != arr.ndim:
        raise InputError(
            f"{source}: array shape {list(arr.shape)} does not match model input {spec.name!r} "
            f"of shape {spec.shape} (rank {len(spec.shape)})"
        )
    for i, (dim, n) in enumerate(zip(spec.shape, arr.shape, strict=True)):
        if i > 0 and isinstance(dim, int) and dim > 0 and dim != n:
            raise InputError(
                f"{source}: array shape {list(arr.shape)} does not match model input {spec.name!r} "
                f"of shape {spec.shape} (dimension {i})"
            )
    dtype = spec.dtype
    if dtype is None:
        raise InputError(f"model input {spec.name!r} has type {spec.type}, which onnxprune cannot feed")
    ok = arr.dtype == dtype or (
        np.issubdtype(dtype, np.floating) and np.issubdtype(arr.dtype, np.number)
        and not np.issubdtype(arr.dtype, np.complexfloating)
    ) or (np.issubdtype(dtype, np.integer) and np.issubdtype(arr.dtype, np.integer))
    if not ok:
        raise InputError(f"{source}: dtype {arr.dtype} cannot feed model input {spec.name!r} ({spec.type})")


def load_loader_script(spec_text: str) -> Iterable[dict]:
    """Call ``func`` from ``file.py[:func]`` (default ``load_data``) and return what it yields."""
    path, _, func = spec_text.partition(":")
    func = func or "load_data"
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data loader script not found: {p}; give FILE.py[:function]")
    module_spec = importlib.util.spec_from_file_location(f"_onnxprune_loader_{p.stem}", p)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {p} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    with _user_code(p, "while importing it"):
        module_spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise InputError(f"{p} has no function {func!r}; name it with {path}:FUNCTION")
    with _user_code(p, f"in {func}()"):
        batches = fn()
    return _guarded(batches, p)


@contextlib.contextmanager
def _user_code(path: Path, where: str):
    """An exception inside the user's loader script is bad input (exit 2), named as such, not an internal error."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything the user's code raises
        msg = " ".join(str(exc).split())[:200]
        raise InputError(f"data loader script {path} failed {where}: {type(exc).__name__}: {msg}; fix the script "
                         "(run with --debug for its traceback)") from exc


def _guarded(batches, path: Path) -> Iterator[dict]:
    try:
        it = iter(batches)
    except TypeError:
        raise InputError(f"{path}: the loader returned a {type(batches).__name__}; return or yield dicts of "
                         "input name -> array") from None
    i = 0
    while True:
        with _user_code(path, f"producing batch {i}"):
            try:
                batch = next(it)
            except StopIteration:
                return
        yield batch
        i += 1


def script_batches(
    batches: Iterable[dict], specs: list[InputSpec], limit: int | None = None, fixed_batch: int | None = None,
    values: dict[str, tuple[float, ...]] | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """The loader's batches checked against the model's inputs (at most ``limit`` samples), inputs they lack
    taken from ``values`` (--input-value); with ``fixed_batch``, regrouped into batches of that many samples
    (the batch a graph fixes), a last incomplete one left out."""
    checked = _checked_script_batches(batches, specs, limit, values or {})
    return checked if fixed_batch is None else _regrouped(checked, fixed_batch)


def _regrouped(batches: Iterator[tuple[dict, np.ndarray | None]], size: int
               ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    feeds_buf: list[dict] = []
    labels_buf: list[np.ndarray | None] = []
    held = 0
    for feeds, labels in batches:
        feeds_buf.append(feeds)
        labels_buf.append(labels)
        held += len(next(iter(feeds.values())))
        while held >= size:
            joined = {k: np.concatenate([f[k] for f in feeds_buf]) for k in feeds_buf[0]}
            with_labels = all(lab is not None for lab in labels_buf)
            all_labels = np.concatenate(labels_buf) if with_labels else None
            yield {k: v[:size] for k, v in joined.items()}, (None if all_labels is None else all_labels[:size])
            held -= size
            feeds_buf = [{k: v[size:] for k, v in joined.items()}] if held else []
            labels_buf = [all_labels[size:] if all_labels is not None else None] if held else []


def _checked_script_batches(
    batches: Iterable[dict], specs: list[InputSpec], limit: int | None, values: dict[str, tuple[float, ...]]
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    names = {s.name: s for s in specs}
    seen = 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict):
            raise InputError(f"data loader batch {i} is a {type(batch).__name__}; yield dicts of input name -> array")
        batch = dict(batch)
        labels = batch.pop("labels", None)
        missing = [n for n in names if n not in batch and n not in values]
        if missing:
            raise InputError(f"data loader batch {i} lacks model input(s) {missing}; it has {list(batch)} "
                             "(inputs that are not data can be given with --input-value NAME=VALUE)")
        feeds = {}
        for name, spec in names.items():
            if name in batch:
                arr = np.asarray(batch[name])
                check_array(arr, spec, f"data loader batch {i}")
                feeds[name] = arr.astype(spec.dtype, copy=False)
        if not feeds:
            raise InputError(f"data loader batch {i} feeds none of the model's inputs {list(names)}")
        n = len(next(iter(feeds.values())))
        first = next(iter(feeds))
        batch_dim = names[first].shape[0] if names[first].shape else None
        for name in names:
            if name not in feeds:
                feeds[name] = value_feed(name, names[name].shape, names[name].dtype, values[name], n, batch_dim)
        if labels is not None and len(labels) != n:
            raise InputError(f"data loader batch {i}: {len(labels)} labels for {n} inputs; they must match")
        if labels is not None and not _class_indices(np.asarray(labels)):
            raise InputError(f"data loader batch {i}: labels are not class indices; give one whole number per input")
        if limit is not None and seen + n > limit:
            keep = limit - seen
            feeds = {k: v[:keep] if v.ndim and len(v) == n else v for k, v in feeds.items()}
            labels = None if labels is None else np.asarray(labels)[:keep]
            n = keep
        if n <= 0:
            return
        seen += n
        yield feeds, (None if labels is None else np.asarray(labels))
        if limit is not None and seen >= limit:
            return
