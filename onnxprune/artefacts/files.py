"""Reading and writing the JSON artefacts: schema and fingerprint checks, atomic writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from onnxprune.errors import InputError
from onnxprune.io import write_text

__all__ = ["check_fingerprint", "check_schema", "json_text", "read_input_shapes", "read_json", "write_json"]


def check_schema(d: Any, schema: str, source: str) -> None:
    if not isinstance(d, dict):
        raise InputError(f"{source} is not a JSON object; give a file written by onnxprune")
    found = d.get("schema")
    if found != schema:
        raise InputError(f"{source} has schema {found!r}, expected {schema!r}; give a file written by onnxprune")


def read_input_shapes(d: dict, source: str) -> dict[str, list[int]]:
    """An artefact's ``input_shapes`` (input name -> sizes, 0 for an empty KV cache), checked; {} when absent."""
    shapes = d.get("input_shapes") or {}
    ok = isinstance(shapes, dict) and all(
        isinstance(dims, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in dims)
        for dims in shapes.values())
    if not ok:
        raise InputError(f"{source}: 'input_shapes' must map input names to lists of sizes (whole numbers, 0 or more); "
                         f"make the file again")
    return {str(name): list(dims) for name, dims in shapes.items()}


def read_json(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p} is not valid JSON ({exc}); give a {what} file written by onnxprune") from exc


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Atomic write (temporary file in the same folder, then rename) of strict JSON (see json_text)."""
    return write_text(path, json_text(obj) + "\n")


def json_text(obj: Any) -> str:
    """Strict JSON (RFC 8259), indented: a number that is not finite (NaN, infinity) becomes null, so every
    JSON onnxprune writes or prints parses everywhere."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def check_fingerprint(artefact_fp: str, model_fp: str, what: str, force: bool) -> None:
    if artefact_fp != model_fp and not force:
        raise InputError(
            f"the {what} was made for another model (fingerprint {artefact_fp[:12]}..., this model "
            f"{model_fp[:12]}...); make a new {what} for this model, or pass --force"
        )
