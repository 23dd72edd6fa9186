"""ONNX Runtime sessions: provider choice (CUDA when available, else CPU with a notice)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from onnxprune.analysis.shape_inference import outer_reads, proto_bodies
from onnxprune.errors import InputError
from onnxprune.io import external_tensors, session_proto

__all__ = ["PROVIDERS", "Session", "create_session", "likely_provider", "mapped_value", "model_session", "ort_value"]

PROVIDERS = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass
class Session:
    session: ort.InferenceSession
    provider: str  # "cuda" or "cpu": what really runs
    notice: str | None = None  # a one-line notice for the user (fallback)
    keep: object = None  # what the session reads without a copy (OrtValues of external initializers)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict, outputs: list[str] | None = None):
        return self.session.run(outputs, {k: ort_value(v) if _bfloat16(v) else v for k, v in feeds.items()})


def _bfloat16(array) -> bool:
    return getattr(array, "dtype", None) is not None and array.dtype.name == "bfloat16"


def ort_value(array) -> ort.OrtValue:
    """An OrtValue of a C-contiguous array; bfloat16 (ml_dtypes) ones too, which ONNX Runtime takes from numpy
    only this way."""
    if _bfloat16(array):
        from onnx import TensorProto

        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _options(threads: int | None = None, external: dict | None = None, spin: bool = True,
             prepack: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # fatal only: ONNX Runtime's error log lines (a failing node, with colour codes) would reach the user's
    # stderr before our one-line error; every error it logs is also raised, and reported from there
    opts.log_severity_level = 4
    if not prepack:  # weights stay where they are (memory-mapped external data) instead of a packed copy
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        # each session has its own thread pool: when many sessions run in turn (partial-graph evaluation), the
        # spinning workers of the last one steal the cores of the next (ResNet-56 SR-init: 49.5 s -> 40.6 s)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if external:
        opts.add_external_initializers(list(external), list(external.values()))
    return opts


def mapped_value(tensor) -> ort.OrtValue:
    """An OrtValue viewing an external tensor's memory map (no copy)."""
    return ort_value(np.require(tensor.numpy(), requirements="C"))


def model_session(model, provider: str = "auto", threads: int | None = None, edit=None) -> Session:
    """A session of an in-memory ir.Model whose external weights stay in their files: they remain references
    in the serialised graph and reach ONNX Runtime as OrtValues over the memory map, so a model over 2 GB
    (protobuf's limit) loads too. ``edit``: a change to the graph's proto first (extra outputs, weights
    made inputs: those are then fed, not supplied)."""
    outside = external_tensors(model.graph)
    proto = session_proto(model, leave_out=outside)
    if edit is not None:
        proto = edit(proto)
    graph = proto.graph  # supplied: the left-out initializers still read (ONNX Runtime drops unread ones)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | \
        {i for n in graph.node for body in proto_bodies(n) for i in outer_reads(body)}
    still = {t.name for t in graph.initializer} & read
    values = {name: mapped_value(tensor) for name, tensor in outside.items() if name in still}
    session = create_session(proto.SerializeToString(), provider, threads, external=values)
    session.keep = values
    return session


def likely_provider(provider: str) -> str:
    """Where a session asked for ``provider`` will run, known before making one: cuda where it is asked for
    (auto or cuda) and onnxruntime-gpu is installed, else cpu. (A GPU that then fails to start falls back to
    the CPU with a notice.)"""
    return "cuda" if provider in ("auto", "cuda") and _CUDA in ort.get_available_providers() else "cpu"


def create_session(model: str | os.PathLike | bytes, provider: str = "auto", threads: int | None = None,
                   external: dict | None = None, spin: bool = True, prepack: bool = True) -> Session:
    """A session on ``provider`` (auto | cpu | cuda) for a model path or serialized model bytes.

    ``external`` maps initializer names to ``OrtValue``s that supply the bytes of initializers stored as
    external data (used to inject weights without serialising a model; the caller keeps them alive).
    ``spin=False`` stops idle worker threads from spinning: for many sessions run one after another.
    ``prepack=False`` keeps ONNX Runtime from copying weights into packed buffers (a one-off check run).

    ``auto`` uses the CUDA execution provider when onnxruntime-gpu is installed and a GPU answers, and
    otherwise the CPU with a notice. ``cuda`` fails with a clear error when CUDA is not usable.
    """
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    src = model if isinstance(model, bytes) else os.fspath(model)
    available = ort.get_available_providers()
    notice = None
    if provider in ("auto", "cuda"):
        if _CUDA in available:
            try:
                sess = ort.InferenceSession(src, _options(threads, external, spin, prepack), providers=[_CUDA, _CPU])
                if _CUDA in sess.get_providers():
                    return Session(sess, "cuda")
                why = "no usable GPU"
            except Exception as exc:  # noqa: BLE001 - CUDA libraries missing or GPU unusable
                why = f"CUDA failed to start: {' '.join(str(exc).split())[:120]}"
        else:
            why = "onnxruntime-gpu is not installed (pip install 'onnxprune[gpu]')"
        if provider == "cuda":
            raise InputError(f"--provider cuda is not usable: {why}; use --provider cpu or auto")
        notice = f"running on CPU: {why}"
    try:
        sess = ort.InferenceSession(src, _options(threads, external, spin, prepack), providers=[_CPU])
    except Exception as exc:
        raise InputError(
            f"ONNX Runtime cannot load the model: {' '.join(str(exc).split())[:300]}"
        ) from exc
    return Session(sess, "cpu", notice)
