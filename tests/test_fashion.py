"""Fashion-MNIST from the Debian package (the README's end-to-end example): the loader reads the complete
splits, and the example's CNN at 28x28 converts for fine-tuning exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import fashion


@pytest.fixture(scope="module")
def splits():
    try:
        return fashion.load_split("train"), fashion.load_split("test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))  # .ci/run installs the package


def test_complete_splits(splits):
    (xtr, ytr), (xte, yte) = splits
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10
    assert 50 < xtr.mean() < 100  # real images, not zeros


def test_example_cnn_round_trip(splits, tmp_path):
    import onnxruntime as ort

    from models.export import export_onnx
    from models.small import PlainCNN
    from onnxprune.io import load_model
    from onnxprune.recovery.convert import OnnxModule

    (_, _), (xte, _) = splits
    torch.manual_seed(0)
    path = export_onnx(PlainCNN(width=16, image_size=28), torch.rand(2, 1, 28, 28), tmp_path / "cnn.onnx")
    x = xte[:16].astype(np.float32) / 255
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    with torch.no_grad():
        got = OnnxModule(load_model(path)).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
