"""A model run segment by segment computes what the whole model computes, carrying only what is still read
(the residual stream across a block, an outer value an If body reads), with weights fed at run time.
Graph outputs are not carried unless named in ``keep`` (pruning reads layer inputs, not model outputs)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune.runtime.graph_io import weights_as_inputs
from onnxprune.runtime.segments import Segments
from tests.unit.nets import initializer, residual, run, sample


def _run_all(segments: Segments, feeds: dict, fed: dict | None = None) -> tuple[dict, list[set]]:
    state, seen = dict(feeds), []
    for i in range(segments.count):
        state = segments.run(i, state, fed)
        seen.append(set(state))
    return state, seen


def test_segments_reproduce_the_model_and_carry_only_live_values():
    proto = residual(blocks=2)
    x = {"x": sample(3, 4, 6, 6, seed=1)}
    names = [n.name for n in proto.graph.node]
    cuts = [names.index("r0b"), names.index("r1a"), names.index("r1a") + 1]
    segments = Segments(proto, cuts, keep=["logits"])
    assert segments.starts == [0, *cuts] and segments.count == 4
    state, seen = _run_all(segments, x)
    np.testing.assert_allclose(state["logits"], run(proto, x)[0], rtol=1e-5, atol=1e-6)
    # before r0b: the block's input (read again by add0) and the branch; the graph input is then dropped
    assert seen[0] == {"x", "ra0"}
    assert seen[1] == {"y0"}  # through add0: only the residual stream crosses into block 1
    assert seen[2] == {"y0", "a1"}


def test_fed_weights_change_the_result_without_a_new_session():
    proto = residual(blocks=1)
    w = initializer(proto, "wa0")
    fed_proto = weights_as_inputs(proto, ["wa0"])
    segments = Segments(fed_proto, [1], fed=["wa0"], keep=["logits"])
    x = {"x": sample(2, 4, 6, 6, seed=2)}
    for weight in (w, np.zeros_like(w)):
        want = run(fed_proto, {**x, "wa0": weight})[0]
        got, _ = _run_all(segments, x, {"wa0": weight})
        np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-6)


def test_an_if_body_keeps_the_outer_value_it_reads_alive():
    then = helper.make_graph([helper.make_node("Mul", ["h", "h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Identity", ["flag"], ["f"], name="id"),
             helper.make_node("If", ["f"], ["y"], name="if", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    segments = Segments(proto, [1, 2], keep=["y"])
    for flag in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "flag": np.array(flag)}
        state, seen = _run_all(segments, feeds)
        assert "h" in seen[1]  # read only inside the If's bodies, yet carried to it
        np.testing.assert_allclose(state["y"], run(proto, feeds)[0])
