"""Evaluation with ONNX Runtime on the real data: the published accuracies of the pretrained ResNet-56."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxprune
from models.resnet_cifar import CIFAR_MEAN, CIFAR_STD
from onnxprune.errors import InputError


def test_resnet56_lossless_accuracy(export, cifar_lossless):
    res = onnxprune.eval(export("resnet56"), cifar_lossless, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert res.samples == 1017
    assert res.top1 == pytest.approx(92.72, abs=0.1)
    assert res.top5 > res.top1
    assert res.provider == "cpu" or res.provider == "cuda"
    assert res.throughput > 0


@pytest.mark.slow
def test_resnet56_jpeg_accuracy_all_exports(export, cifar_jpeg):
    """10,000 JPEG images; every export (folded, dynamo, with BatchNorm) gives the same 83.20 %."""
    for kw in ({}, {"dynamo": True}, {"keep_bn": True}):
        res = onnxprune.eval(export("resnet56", **kw), cifar_jpeg, mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=500)
        assert res.samples == 10_000
        assert res.top1 == pytest.approx(83.20, abs=0.1), kw


def test_preprocessing_from_model_metadata(export, cifar_lossless):
    res = onnxprune.eval(export("resnet56"), cifar_lossless, limit=300)
    explicit = onnxprune.eval(export("resnet56"), cifar_lossless, mean=CIFAR_MEAN, std=CIFAR_STD, limit=300)
    assert res.top1 == explicit.top1 and "metadata" in res.preprocess
    raw = onnxprune.eval(export("resnet56"), cifar_lossless, mean=(0.0,), std=(1.0,), limit=300)
    assert raw.top1 < explicit.top1 - 10  # wrong preprocessing really shows


def test_matches_direct_onnxruntime(export, cifar_lossless):
    """top-1 / top-5 agree with a direct computation on ONNX Runtime outputs."""
    path = export("resnet56")
    data = np.load(cifar_lossless)
    x = (data["x"][:200].astype(np.float32) / 255 - np.array(CIFAR_MEAN, np.float32)[:, None, None]) / np.array(
        CIFAR_STD, np.float32)[:, None, None]
    y = data["y"][:200]
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    res = onnxprune.eval(path, cifar_lossless, mean=CIFAR_MEAN, std=CIFAR_STD, limit=200, batch_size=64)
    assert res.top1 == pytest.approx(100 * np.mean(top5[:, 0] == y))
    assert res.top5 == pytest.approx(100 * np.mean((top5 == y[:, None]).any(1)))


def test_small_models_on_digits(export, digits_npz):
    for name in ("cnn", "mlp", "transformer-pre", "transformer-post", "resnet-proj"):
        res = onnxprune.eval(export(name), digits_npz)
        assert res.samples == 397 and res.top1 > 90, name


def test_data_loader_script(export, digits_npz, tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        f"def batches():\n"
        f"    d = np.load({str(digits_npz)!r})\n"
        "    for i in range(0, len(d['x']), 100):\n"
        "        yield {'input': d['x'][i:i+100].astype('float32') / 255, 'labels': d['y'][i:i+100]}\n"
    )
    res = onnxprune.eval(export("cnn"), data_loader_script=f"{script}:batches")
    ref = onnxprune.eval(export("cnn"), digits_npz)
    assert res.samples == 397 and res.top1 == ref.top1
    limited = onnxprune.eval(export("cnn"), data_loader_script=f"{script}:batches", limit=150)
    assert limited.samples == 150


def test_without_labels_throughput_only(export, tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=np.zeros((10, 1, 8, 8), np.uint8))
    res = onnxprune.eval(export("cnn"), path)
    assert res.top1 is None and res.samples == 10 and res.throughput > 0


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((10, 3, 8, 8), np.uint8), "y": np.zeros(10)}, "does not match model input"),
        ({"x": np.zeros((10, 1, 8, 8), np.uint8), "y": np.zeros(7)}, "7 labels"),
        ({"images": np.zeros((10, 1, 8, 8), np.uint8)}, "no array 'x'"),
        ({"x": np.array(["a"] * 10)}, "does not match|cannot feed"),
    ],
    ids=["shape", "label-count", "key", "dtype"],
)
def test_bad_data(export, tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        onnxprune.eval(export("cnn"), path)


def test_cuda_provider_errors_cleanly_without_gpu(export, digits_npz):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(InputError, match="--provider cuda is not usable"):
        onnxprune.eval(export("cnn"), digits_npz, provider="cuda")
    res = onnxprune.eval(export("cnn"), digits_npz, provider="auto")
    assert res.provider == "cpu" and "running on CPU" in res.notice
