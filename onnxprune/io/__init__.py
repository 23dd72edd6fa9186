"""Loading and saving models on onnx-ir, and the model fingerprint.

- External data is memory-mapped by onnx-ir, never copied on load.
- Saves are atomic: everything is written into a temporary folder beside the target, then renamed into place,
  so a failed save leaves no partial file and an existing file untouched.
- The input is never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import InputError, WriteError
from onnxprune.io.checking import OnnxCheckError, check_file

__all__ = ["DEFAULT_IR_VERSION", "PROTOBUF_LIMIT", "SUPPORTED_OPSET", "SavedModel", "check_output_path", "external_tensors",
           "fingerprint", "has_external_data", "load_model", "make_temp", "model_copy", "model_file_bytes", "model_nbytes", "release",
           "release_mapped", "referencing_bytes", "resolved_model", "save_model", "session_proto", "write_text"]

# Above this size a model cannot be a single protobuf file.
PROTOBUF_LIMIT = 2**31 - 1
# For models that carry no IR version: one every current onnxruntime reads (onnx 1.23 would write 14).
DEFAULT_IR_VERSION = 10
SUPPORTED_OPSET = range(7, 24)


def load_model(path: str | os.PathLike, check: bool = True) -> ir.Model:
    """Load an ONNX model with onnx-ir (external data memory-mapped), with clear errors for bad files.

    ``check`` runs onnx.checker on the file (without loading external data) and refuses invalid models.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p}; check the path")
    if p.is_dir():
        raise InputError(f"{p} is a directory, not an .onnx file; give the path of the model file")
    try:
        with _quiet("onnx_ir"):  # its warnings about invalid graphs precede the checker's clearer error
            model = ir.load(p)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises various things
        raise InputError(
            f"cannot read {p} as an ONNX model ({type(exc).__name__}: {_short(exc)}); "
            "is it a complete .onnx file?"
        ) from exc
    if _has_dangling_inputs(model):
        model = _load_with_dense_weights(p) or model
    _check_external_data(model, p)
    if check:
        try:
            check_file(p)
        except OnnxCheckError as exc:
            raise InputError(f"{p} is not a valid ONNX model ({exc}); fix or re-export it") from exc
    opset = model.opset_imports.get("", None)
    if opset is not None and opset not in SUPPORTED_OPSET:
        raise InputError(
            f"{p} uses ONNX opset {opset}, supported are {SUPPORTED_OPSET.start}..{SUPPORTED_OPSET.stop - 1}; "
            "convert it with onnx.version_converter first"
        )
    return model


def _has_dangling_inputs(model: ir.Model) -> bool:
    """Whether a node of the main graph reads a value nothing defines (onnx-ir leaves a sparse initializer so)."""
    return any(v is not None and v.name and v.producer() is None and not v.is_graph_input()
               and not v.is_initializer() for node in model.graph for v in node.inputs)


def _load_with_dense_weights(path: Path) -> ir.Model | None:
    """The model with its sparse initializers made dense (as onnxprune apply --store sparse writes them), or
    None when it has none."""
    from onnxprune.io.sparse import densify_sparse_initializers

    proto = onnx.load(str(path), load_external_data=False)
    if not densify_sparse_initializers(proto):
        return None
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external tensor's file must exist and be long enough (else ONNX Runtime fails much later)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                location = Path(tensor.base_dir) / tensor.location
                if not location.is_file():
                    raise InputError(
                        f"external data file {tensor.location!r} of tensor {value.name!r} not found next to "
                        f"{path}; keep the .onnx file and its data file together"
                    )
                needed = (tensor.offset or 0) + (tensor.length or 0)
                if location.stat().st_size < needed:
                    raise InputError(
                        f"external data file {tensor.location!r} is truncated ({location.stat().st_size} bytes, "
                        f"tensor {value.name!r} needs {needed}); copy the data file again"
                    )


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor)
               for g in model.graphs() for v in g.initializers.values())


def session_proto(model: ir.Model, leave_out: Iterable[str] = ()) -> onnx.ModelProto:
    """The model as a protobuf for an in-memory ONNX Runtime session: external tensors inlined (a session made
    from bytes resolves external files against the working directory, not the model's folder), except those
    named in ``leave_out`` (weights the caller feeds at run time: they stay references, never read)."""
    proto = ir.serde.serialize_model(model)
    leave_out = set(leave_out)
    if not has_external_data(model):
        return proto
    graphs = [proto.graph]
    values = {name: v for g in model.graphs() for name, v in g.initializers.items()}
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in values \
                    and tensor.name not in leave_out:
                array = values[tensor.name].const_value.numpy()
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = array.tobytes()
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
    return proto


def external_tensors(graph: ir.Graph) -> dict[str, ir.ExternalTensor]:
    """Initializer name -> tensor, for ``graph``'s initializers stored in external data files."""
    return {name: v.const_value for name, v in graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}


def _data_folder(model: ir.Model) -> str | None:
    """The folder of the model's external data files (of its first external tensor), or None."""
    return next((str(Path(t.base_dir).resolve()) for g in model.graphs() for t in external_tensors(g).values()),
                None)


def _read_data_from(model: ir.Model, folder: str) -> None:
    """Point every external tensor of a deserialised model (which knows only the files' names) at ``folder``."""
    for graph in model.graphs():
        ir.external_data.set_base_dir(graph, folder)


def model_copy(model: ir.Model) -> ir.Model:
    """A deep copy of ``model`` whose external tensors still read from their files (a serialise / deserialise
    round trip alone loses their folder)."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    folder = _data_folder(model)
    if folder:
        _read_data_from(copy, folder)
    return copy


def referencing_bytes(model: ir.Model) -> tuple[bytes, str | None]:
    """The model as bytes that another process on storage which sees the same files turns back into it
    (``resolved_model``): inline tensors inline, external ones left as references to their files (a 7B
    model stays a few MB and never meets protobuf's 2 GB limit). Returns (bytes, the data files' folder)."""
    outside = {name for g in model.graphs() for name in external_tensors(g)}
    return session_proto(model, leave_out=outside).SerializeToString(), _data_folder(model)


def resolved_model(data: bytes, folder: str | None) -> ir.Model:
    """``referencing_bytes``' model again, its external tensors read (memory-mapped) from ``folder``; a folder
    this process cannot see is one line."""
    model = ir.serde.deserialize_model(onnx.load_from_string(data))
    if folder is not None:
        if not Path(folder).is_dir():
            raise InputError(f"the model's external data folder {folder} is not on this machine; keep the model "
                             "on storage every worker sees")
        _read_data_from(model, folder)
        _check_external_data(model, Path(folder))
    return model


def release(tensor: ir.ExternalTensor) -> None:
    """Unmap an external tensor's file (it maps again if read later), so that its pages leave memory."""
    try:
        tensor.release()
    except BufferError:  # an array still views the map: it stays
        pass


def release_mapped(model: ir.Model) -> None:
    """Unmap all the model's external tensors."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                release(value.const_value)


def model_nbytes(model: ir.Model) -> int:
    """Bytes held by the model's initializers (what decides whether external data is needed)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


@dataclass
class SavedModel:
    path: Path
    data_path: Path | None  # the external data file, if any
    size_bytes: int  # .onnx plus external data
    sparse_initializers: list[str] = field(default_factory=list)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    input_path: str | os.PathLike | None = None,
    force: bool = False,
    sparse: set[str] | None = None,
    verify: Callable[[Path], None] | None = None,
) -> SavedModel:
    """Save ``model`` to ``path`` atomically.

    ``external_data``: True writes weights to ``<name>.data`` beside the file; None: external when the model's
    weights already are (a model loaded with external data) or above 2 GB; False: everything inline. ``input_path``: the file the model came from, never overwritten unless ``force``.
    ``sparse``: initializer names to store as sparse initializers where that is smaller (inline models only).
    ``verify(tmp_path)`` runs on the written file before it is moved into place; if it raises, nothing is
    written.
    """
    out = Path(path)
    check_output_path(out, input_path=input_path, force=force)
    if external_data is None:  # like the input (external data stays external), and always above 2 GB
        external_data = has_external_data(model) or model_nbytes(model) > PROTOBUF_LIMIT - 64 * 2**20
    if sparse and external_data:
        raise InputError("sparse storage needs an inline model (under 2 GB, no --external-data)")
    if not external_data and has_external_data(model):
        # an inline file must carry the bytes: otherwise the tensors would keep pointing at the input's
        # data file, relative to the new location
        ir.external_data.load_to_model(model)
    if not model.ir_version:
        model.ir_version = DEFAULT_IR_VERSION
    tmpdir = make_temp(out, folder=True)
    converted: list[str] = []
    try:
        tmp_file = tmpdir / out.name
        data_name = out.name + ".data" if external_data else None
        if sparse:
            from onnxprune.io.sparse import to_sparse_initializers

            proto = ir.serde.serialize_model(model)
            converted = to_sparse_initializers(proto, set(sparse))
            onnx.save(proto, str(tmp_file))
        else:
            ir.save(model, tmp_file, external_data=data_name)
        if verify is not None:
            release_mapped(model)  # the input's pages leave memory before the check maps the output
            verify(tmp_file)
        size = tmp_file.stat().st_size
        if data_name is not None:
            size += (tmpdir / data_name).stat().st_size
            os.replace(tmpdir / data_name, out.parent / data_name)
        os.replace(tmp_file, out)
    except OSError as exc:
        raise WriteError(f"cannot write {out} ({exc.strerror or exc}); nothing was written: free some space or "
                         "choose another -o path") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return SavedModel(out, out.parent / data_name if data_name else None, size, converted)


def make_temp(out: Path, folder: bool = False, suffix: str = "") -> Path:
    """A temporary folder or file beside ``out`` (same file system, so the final rename is atomic)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=parent))
        fd, name = tempfile.mkstemp(prefix=".onnxprune-", suffix=suffix, dir=parent)
        os.close(fd)
        return Path(name)
    except OSError as exc:
        raise InputError(f"cannot write to output folder {parent} ({exc.strerror or exc}); choose another -o path"
                         ) from exc


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (a temporary file beside it, then a rename) with the usual permissions."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist; create it or choose another -o path")
    if p.is_dir():
        raise InputError(f"output path {p} is a directory; give a file name inside it")
    tmp = make_temp(p, suffix=p.suffix)
    try:
        try:
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
            os.replace(tmp, p)
        except OSError as exc:
            raise WriteError(f"cannot write {p} ({exc.strerror or exc}); nothing was written") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(out: Path, *, input_path=None, force: bool = False, forceable: bool = True) -> None:
    """Refuse output paths that cannot be written or would overwrite an input.

    ``input_path``: one path or several (model, scores, plan, data); ``force`` allows overwriting them where
    ``forceable`` (a pruned model may replace its input; a JSON artefact never replaces a model or data).
    """
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist; create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable; choose another -o path")
    if out.is_dir():
        raise InputError(f"output path {out} is a directory; give a file name such as {out / 'model.onnx'}")
    make_temp(out).unlink()  # the real test (root passes os.access; read-only and special file systems do not)
    inputs = [input_path] if isinstance(input_path, str | os.PathLike) else list(input_path or [])
    for given in inputs:
        if given is not None and out.exists() and Path(given).exists() and os.path.samefile(out, given) \
                and not (force and forceable):
            raise InputError(f"output {out} is the input {given}; choose another -o path"
                             + (" or pass --force" if forceable else ""))


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model: the .onnx file and its external data files."""
    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def fingerprint(model: ir.Model) -> str:
    """A stable hash of the graph structure and of every initializer's name, dtype, shape and bytes.

    Later artefacts (scores.json, plan.json) record it so a plan is never applied to another model.
    Initializer bytes are hashed in chunks from the memory map, so large models are not copied.
    """
    h = hashlib.sha256()  # SHA extensions make it the fastest hashlib digest on current CPUs
    for graph in model.graphs():
        for value in graph.inputs:
            h.update(f"in:{value.name}:{value.dtype}:{value.shape}\n".encode())
        for node in graph:
            attrs = ",".join(
                f"{k}={_attr_repr(a)}" for k, a in sorted(node.attributes.items())
            )
            ins = ",".join(v.name if v is not None else "" for v in node.inputs)
            outs = ",".join(v.name for v in node.outputs)
            h.update(f"node:{node.domain}:{node.op_type}:{ins}:{outs}:{attrs}\n".encode())
        for value in graph.outputs:
            h.update(f"out:{value.name}\n".encode())
        for name, value in sorted(graph.initializers.items()):
            tensor = value.const_value
            h.update(f"init:{name}:{tensor.dtype}:{tensor.shape}\n".encode())
            _hash_tensor(h, tensor)
            if isinstance(tensor, ir.ExternalTensor):
                release(tensor)  # hashing a big model must not leave all of it resident
    return h.hexdigest()[:32]


def _attr_repr(attr: ir.Attr) -> str:
    if attr.type in (ir.AttributeType.TENSOR,):
        t = attr.as_tensor()
        return f"tensor({t.dtype},{t.shape},{hashlib.sha256(t.tobytes()).hexdigest()[:16]})"
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return "graph"  # subgraph nodes are hashed through model.graphs()
    return repr(attr.value)


def _hash_tensor(h: "hashlib._Hash", tensor: ir.TensorProtocol, chunk: int = 64 * 2**20) -> None:
    try:
        arr = tensor.numpy()
    except Exception:
        h.update(tensor.tobytes())
        return
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, chunk):
        h.update(flat[start : start + chunk])
