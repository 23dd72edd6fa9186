"""Weights stored in bfloat16 and cast for the layer (issue 17): found through the Cast, pruned unstructured
and N:M where they are stored, in their own type, measured on data (fed as bfloat16 OrtValues), channels
removed from the stored tensor, refit and fine-tuned with bfloat16 written back."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import api
from tests.unit.nets import save, write_npz


def _bf16(name: str, *shape, seed: int) -> onnx.TensorProto:
    a = (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(ml_dtypes.bfloat16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, shape, a.view(np.uint16).tobytes(), raw=True)


def _bf16_net() -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["w1"], ["w1f"], name="cast_w1", to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w1f"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Cast", ["wf"], ["wff"], name="cast_wf", to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["f", "wff"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [_bf16("w1", 8, 3, 3, 3, seed=1), _bf16("wf", 5, 8, seed=2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_bfloat16_weights_prune_in_their_own_type(tmp_path):
    path = save(_bf16_net(), tmp_path / "bf16.onnx")
    found = api.inspect(path)
    assert [(layer.name, layer.weight, layer.weight_shape) for layer in found.layers] == [
        ("conv", "w1", (8, 3, 3, 3)), ("fc", "wf", (5, 8))]
    plan = api.allocate(path, method="capacity", scores=api.score(path, "capacity"), target_sparsity=0.5)
    for granularity in ("unstructured", "n:m"):
        out = api.apply(path, plan, tmp_path / f"{granularity[0]}.onnx", granularity=granularity)
        stored = {t.name: t for t in onnx.load(str(out.path)).graph.initializer}
        assert {t.data_type for t in stored.values()} == {TensorProto.BFLOAT16}
        # unstructured: the conv at its planned sparsity; 2:4: the fc (the conv's 3 inputs are not a multiple of 4)
        name, want = ("w1", plan.layers[0]["zeros"] / 216) if granularity == "unstructured" else ("wf", 0.5)
        assert float(np.mean(onnx.numpy_helper.to_array(stored[name]) == 0)) == pytest.approx(want)


def test_bfloat16_weights_are_measured_on_data(tmp_path):
    """Scores on data replace the stored bfloat16 tensor (fed as an OrtValue of that type) before its Cast."""
    path = save(_bf16_net(), tmp_path / "bf16.onnx")
    data = write_npz(tmp_path / "d.npz", 16, 3, 8, 8)
    sens = api.score(path, "sensitivity", data=data, grid=(0.5, 0.9))
    assert all(u["mean_drop"] > 0 for u in sens.units)
    sr = api.score(path, "srinit", data=data, units="layers", metric="kl")
    assert all(u["drop"] > 0 for u in sr.units)
    plan = api.allocate(path, method="search", target_sparsity=0.5, data=data, iterations=4)
    assert plan.totals["params_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_channels_are_removed_and_training_runs_on_bfloat16_weights(tmp_path):
    """The shrink cuts the stored tensor in front of its Cast; the refit and finetune write back bfloat16."""
    path = save(_bf16_net(), tmp_path / "bf16.onnx")
    data = write_npz(tmp_path / "d.npz", 16, 3, 8, 8)
    channels = api.allocate(path, method="uniform", granularity="channel", target_sparsity=0.3, round_to=1)
    refit = api.apply(path, channels, tmp_path / "c.onnx", data=data)
    stored = {t.name: t for t in onnx.load(str(refit.path)).graph.initializer}
    assert {t.data_type for t in stored.values()} == {TensorProto.BFLOAT16}
    assert refit.totals["params_after"] < refit.totals["params_before"]
    assert np.isfinite(api.evaluate(refit.path, data, reference=path).output_error)
    tuned = api.finetune(refit.path, data, tmp_path / "t.onnx", teacher=path,
                         options=api.FinetuneOptions(epochs=1, batch_size=8))
    assert {t.data_type for t in onnx.load(str(tuned.path)).graph.initializer} == {TensorProto.BFLOAT16}
