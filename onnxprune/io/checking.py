"""onnx.checker, for models with operators only ONNX Runtime defines.

Deployment tools (ONNX Runtime's transformer optimizer, ONNX Runtime GenAI's model builder) write operators
that exist only in ONNX Runtime, some of them in the default domain (SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization). onnx.checker rejects those ("No Op registered for ..."), and stops there.
Such a model is checked with those nodes set aside (their domain made a custom one, which the checker does not
look into) so that every other check still runs, and it is valid when ONNX Runtime creates a session for it.
Every other checker failure stands.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx

__all__ = ["OnnxCheckError", "check_file"]

_UNKNOWN_OP = re.compile(r"No Op registered for (\w+) with domain_version")
_ASIDE = "onnxprune.runtime_only"  # the custom domain the set-aside nodes get in the copy the checker sees


class OnnxCheckError(Exception):
    """onnx.checker's failure (with ONNX Runtime's, when it could not load a model with runtime-only ops)."""


def check_file(path: str | os.PathLike, full_check: bool = False) -> str:
    """Check the model file at ``path``; returns what checked it (for reports). Raises OnnxCheckError."""
    try:
        onnx.checker.check_model(str(path), full_check=full_check)
        return "onnx.checker" + (" full_check" if full_check else "")
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, InferenceError and others
        first = exc
    unknown = _UNKNOWN_OP.search(str(first))
    if unknown is None:
        raise OnnxCheckError(_short(first)) from first
    proto = onnx.load(str(path), load_external_data=False)
    aside: set[str] = set()
    while unknown is not None and unknown.group(1) not in aside:
        aside.add(unknown.group(1))
        try:
            _check_beside(_set_aside(proto, aside))
            unknown = None
        except Exception as exc:  # noqa: BLE001
            unknown = _UNKNOWN_OP.search(str(exc))
            if unknown is None:
                raise OnnxCheckError(_short(exc)) from exc
    if unknown is not None:
        raise OnnxCheckError(_short(first)) from first
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.InferenceSession(str(Path(path)), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime does not define them either
        raise OnnxCheckError(f"{_short(first)}; ONNX Runtime cannot load it either: {_short(exc)}") from exc
    return f"onnx.checker (with {', '.join(sorted(aside))}, which only ONNX Runtime defines, checked by loading it)"


def _check_beside(proto: onnx.ModelProto) -> None:
    """onnx.checker on the set-aside copy, its external weights emptied.

    The check of the file itself has already passed its initializers (they come before the nodes) and the
    loader checks every external file's size; a copy cannot point at the data files (the checker looks for them
    beside the copy, and refuses links), so its external tensors are made empty ones.
    """
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            del tensor.dims[:]
            tensor.dims.append(0)
            tensor.data_location = onnx.TensorProto.DEFAULT
    onnx.checker.check_model(proto, full_check=False)


def _set_aside(proto: onnx.ModelProto, ops: set[str]) -> onnx.ModelProto:
    """A copy whose default-domain nodes of the op types ``ops`` are in a custom domain."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graphs = [copy.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in ops:
                node.domain = _ASIDE
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
    if not any(o.domain == _ASIDE for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(_ASIDE, 1))
    return copy


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
