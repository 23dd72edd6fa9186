"""ConvTranspose and 1-D / 3-D convolutions through channel planning, shrinking and the least-squares refit
(issue 16: the refit used to build a rank-4 input mask for every convolution, which ONNX Runtime refused)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxprune import api
from tests.graphs import make_model, weights


def _conv_net(path, spatial: int):
    """Conv(k3, pad 1) -> Relu -> Conv(k3, pad 1) -> Relu -> GlobalAveragePool -> Flatten, ``spatial``-D."""
    k, pads = [3] * spatial, [1] * 2 * spatial
    size = ["batch", 2] + ["s%d" % i for i in range(spatial)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=pads),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c"], name="conv2", pads=pads),
             helper.make_node("Relu", ["c"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, size)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
                       [weights("w1", 16, 2, *k, seed=1, scale=0.3), weights("b1", 16, seed=2),
                        weights("w2", 6, 16, *k, seed=3, scale=0.3), weights("b2", 6, seed=4)])
    path.write_bytes(model.SerializeToString())
    return path


def _deconv_net(path):
    """Conv -> Relu -> ConvTranspose(stride 2: weight (in, out, k, k)) -> Relu -> Conv 1x1: an upsampling head."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Relu", ["u"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="head")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, "h2", "w2"])],
                       [weights("w1", 16, 3, 3, 3, seed=1, scale=0.3), weights("wt", 16, 8, 2, 2, seed=2, scale=0.3),
                        weights("bt", 8, seed=3), weights("w3", 1, 8, 1, 1, seed=4, scale=0.3)])
    path.write_bytes(model.SerializeToString())
    return path


def _data(path, shape):
    np.savez(path, x=np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return path


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("spatial, sample", [(1, (2, 24)), (3, (2, 6, 6, 6))])
def test_non_2d_convolutions_are_shrunk_and_refit(tmp_path, spatial, sample):
    model = _conv_net(tmp_path / f"conv{spatial}d.onnx", spatial)
    data = _data(tmp_path / "x.npz", (64, *sample))
    plan = api.allocate(model, method="uniform", granularity="channel", target_sparsity=0.4, data=data, round_to=1)
    plain = api.apply(model, plan, tmp_path / "plain.onnx")
    refit = api.apply(model, plan, tmp_path / "refit.onnx", data=data)
    assert refit.totals["refit"]["layers"] == 1 and not refit.totals["refit"]["skipped"]  # conv2, from conv1's cut
    assert refit.totals["refit"]["mean_error_after"] < refit.totals["refit"]["mean_error_before"]
    x = np.load(data)["x"][:16]
    dense = _run(model, x)
    err = [float(np.abs(_run(p, x) - dense).mean()) for p in (plain.path, refit.path)]
    assert err[1] < err[0]  # the refit brings the output back towards the dense model's


def test_conv_transpose_keeps_its_output_channels_on_axis_1(tmp_path):
    model = _deconv_net(tmp_path / "deconv.onnx")
    data = _data(tmp_path / "x.npz", (16, 3, 8, 8))
    plan = api.allocate(model, method="uniform", granularity="channel", target_sparsity=0.4,
                        input_shapes=["x:1,3,8,8"], round_to=1)
    result = api.apply(model, plan, tmp_path / "out.onnx", data=data)
    after = {layer["name"]: layer["channels_after"] for layer in result.layers}
    assert after["conv1"] < 16 and after["up"] < 8
    assert "up" in result.totals["refit"]["skipped"]  # ConvTranspose is not refit, but its input is masked
    y = _run(result.path, np.load(data)["x"][:2])
    assert y.shape == (2, 1, 16, 16)
    flops = api.inspect(tmp_path / "out.onnx", input_shapes=["x:1,3,8,8"]).flops
    assert 0 < flops < api.inspect(model, input_shapes=["x:1,3,8,8"]).flops
