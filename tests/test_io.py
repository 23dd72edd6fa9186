"""Loading (errors, external data memory-mapped), atomic saving, the fingerprint."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune.errors import InputError, WriteError
from onnxprune.io import fingerprint, load_model, save_model


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_external_data_roundtrip_is_memory_mapped(export, tmp_path):
    src = load_model(export("resnet56"))
    out = save_model(src, tmp_path / "ext.onnx", external_data=True).path
    assert (tmp_path / "ext.onnx.data").is_file()
    assert out.stat().st_size < 100_000  # weights live in the data file
    loaded = load_model(out)
    big = [v.const_value for v in loaded.graph.initializers.values() if v.const_value.nbytes > 1024]
    assert big and all(isinstance(t, ir.ExternalTensor) for t in big)
    arr = big[0].numpy()
    assert isinstance(big[0].raw, mmap.mmap) and not arr.flags.writeable and not arr.flags.owndata
    assert fingerprint(loaded) == fingerprint(src)
    info = onnxprune.inspect(out)
    assert info.params == 850_986 and len(info.blocks) == 27
    # no temporary folder left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxprune-")]


def test_inline_save_roundtrip_and_ir_version(export, tmp_path):
    src = load_model(export("cnn"))
    out = save_model(src, tmp_path / "copy.onnx").path
    assert not (tmp_path / "copy.onnx.data").exists()
    proto = onnx.load(str(out))
    assert proto.ir_version == onnx.load(str(export("cnn"))).ir_version <= 10
    onnx.checker.check_model(proto, full_check=True)
    assert fingerprint(load_model(out)) == fingerprint(src)


def test_fingerprint_sees_weight_bytes(export, tmp_path):
    model = load_model(export("mlp"))
    before = fingerprint(model)
    value = next(iter(model.graph.initializers.values()))
    arr = value.const_value.numpy().copy()
    arr.reshape(-1)[0] += 1.0
    value.const_value = ir.tensor(arr, name=value.name)
    assert fingerprint(model) != before


def test_never_overwrites_input_without_force(export, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(export("mlp").read_bytes())
    digest = sha(path)
    model = load_model(path)
    with pytest.raises(InputError, match="is the input"):
        save_model(model, path, input_path=path)
    assert sha(path) == digest
    save_model(model, path, input_path=path, force=True)
    assert load_model(path) is not None


def test_failed_save_leaves_nothing(export, tmp_path, monkeypatch):
    """A failure in the middle of a write leaves no output file, no temp folder, and an old file intact."""
    model = load_model(export("mlp"))
    target = tmp_path / "out.onnx"

    def broken(model, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken)
    with pytest.raises(WriteError, match="disk full"):
        save_model(model, target)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(WriteError):
        save_model(model, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.onnx", "not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "random.onnx", os.urandom(4096)), "cannot read"),
    ],
    ids=["missing", "directory", "random-bytes"],
)
def test_bad_model_files(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        load_model(make(tmp_path))


def test_truncated_model(export, tmp_path):
    data = export("cnn").read_bytes()
    path = _write(tmp_path / "trunc.onnx", data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(path)


def test_missing_and_truncated_external_data(export, tmp_path):
    out = save_model(load_model(export("resnet56")), tmp_path / "ext.onnx", external_data=True).path
    data = tmp_path / "ext.onnx.data"
    full = data.read_bytes()
    data.write_bytes(full[:1000])
    with pytest.raises(InputError, match="truncated"):
        load_model(out)
    data.unlink()
    with pytest.raises(InputError, match="not found"):
        load_model(out)


def test_output_folder_must_exist(export, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        save_model(load_model(export("mlp")), tmp_path / "nope" / "m.onnx")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_referencing_bytes_need_the_data_folder(export, tmp_path):
    """A model shipped by reference to its external data (the Ray backend) is rebuilt where the folder is
    seen, and is one line where it is not."""
    from onnxprune.io import referencing_bytes, resolved_model

    ir_model = load_model(export("resnet20"))
    save_model(ir_model, tmp_path / "ext.onnx", external_data=True)
    data, folder = referencing_bytes(load_model(tmp_path / "ext.onnx"))
    assert folder == str(tmp_path.resolve()) and len(data) < 50_000
    again = resolved_model(data, folder)
    assert [v.const_value.numpy().sum() for v in again.graph.initializers.values()] == \
        [v.const_value.numpy().sum() for v in ir_model.graph.initializers.values()]
    with pytest.raises(InputError, match="not on this machine"):
        resolved_model(data, str(tmp_path / "elsewhere"))
