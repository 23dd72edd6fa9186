"""One analysed model per command: the analysis (ONNX shape inference) and the full weight hash run once per
graph version, however many verbs a command chains."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import onnxprune.analysis.model as analysed_model
from onnxprune import workflows
from onnxprune.verbs.loading import open_model
from tests.graphs import make_model, tensor, weights


def _cnn(path):
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, unnamed nodes."""
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    inits = [weights("w1", 16, 3, 3, 3, seed=1), weights("w2", 16, 16, 3, 3, seed=2), weights("fc", 10, 16, seed=3),
             weights("fcb", 10, seed=4)]
    model = make_model(nodes, [tensor("input", "N", 3, 8, 8)], [tensor("logits", "N", 10)], inits)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture()
def counted(monkeypatch):
    """Calls of the analysis and of the fingerprint made through AnalysedModel."""
    calls = {"analyse": 0, "fingerprint": 0}
    analyse, fingerprint = analysed_model.analyse_graph, analysed_model.weight_fingerprint

    def counting_analyse(model, input_shapes=None):
        calls["analyse"] += 1
        return analyse(model, input_shapes)

    def counting_fingerprint(model):
        calls["fingerprint"] += 1
        return fingerprint(model)

    monkeypatch.setattr(analysed_model, "analyse_graph", counting_analyse)
    monkeypatch.setattr(analysed_model, "weight_fingerprint", counting_fingerprint)
    return calls


def test_facts_are_computed_once_per_graph_version(tmp_path, counted):
    am = open_model(_cnn(tmp_path / "cnn.onnx"))
    assert all(node.name for node in am.model.graph)  # opened models are named (NameNodesPass)
    for _ in range(3):
        am.info, am.layers, am.blocks, am.params, am.flops, am.fingerprint, am.channel_graph()
    assert counted == {"analyse": 1, "fingerprint": 1}
    assert [layer.op_type for layer in am.layers] == ["Conv", "Conv", "Gemm"]
    assert am.input_shapes == {} and am.unknown_dims == []  # only the batch is dynamic
    assert am.channel_graph("keep") is not am.channel_graph("prune")
    after = am.after_rewrite()
    after.info
    assert counted["analyse"] == 2 and after.model is am.model


def test_analysis_refuses_unnamed_nodes():
    from onnxprune.analysis.graph import analyse_graph

    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", 2)], [tensor("y", 2)])
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(ValueError, match="NameNodesPass"):
        analyse_graph(model)
    assert [node.name for node in open_model(model).model.graph] == ["Relu_0"]


def test_prune_analyses_the_input_once(tmp_path, counted):
    """prune --target-flops: the input is analysed and hashed once (score, allocate and apply share it); the
    rewritten graph once more inside apply, and the written file once for the after-table."""
    model = _cnn(tmp_path / "cnn.onnx")
    result = workflows.prune(model, tmp_path / "small.onnx", target_flops=0.4, latency=False)
    assert result.after.flops < result.before.flops
    assert counted == {"analyse": 3, "fingerprint": 1}
    np.testing.assert_equal(result.before.params, open_model(model).params)
