"""Strict JSON everywhere, counts in agreement, and models whose FLOPs shape inference cannot tell: channel
plans by parameters work, by FLOPs refuse in one line naming the layers (issue 16, first part)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxprune import api
from onnxprune.cli import main
from onnxprune.errors import plural
from tests.graphs import make_model, weights


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_non_finite_numbers_as_null():
    obj = {"a": float("nan"), "b": [float("inf"), 1.5], "c": (2, -float("inf")), "d": np.float64("nan"), "e": "x"}
    assert _strict(api.json_text(obj)) == {"a": None, "b": [None, 1.5], "c": [2, None], "d": None, "e": "x"}


@pytest.mark.parametrize("n, noun, expected", [(0, "block", "0 blocks"), (1, "block", "1 block"),
                                               (2, "group", "2 groups"), (1024, "sample", "1,024 samples")])
def test_plural(n, noun, expected):
    assert plural(n, noun) == expected


def _behind_runtime_reshape(path, body, initializers):
    """x (N, 48) reshaped to the run-time shape input s (so nothing after it has a known shape), then
    ``body`` from value y to value c (4 channels), global pooling and Flatten to out (N, 4)."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape"), *body,
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["out"], name="flat")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 48]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [None])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], initializers)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture()
def unknown_flops(tmp_path):
    """Conv layers behind a Reshape to a run-time shape: their output shapes, hence FLOPs, are unknown."""
    path = _behind_runtime_reshape(tmp_path / "unknown_flops.onnx", [
        helper.make_node("Conv", ["y", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c"], name="conv2"),
    ], [weights("w1", 8, 3, 3, 3, seed=1), weights("b1", 8, seed=2), weights("w2", 4, 8, 1, 1, seed=3)])
    assert api.inspect(path).flops is None
    return path


def test_plans_for_unknown_flops_are_strict_json(unknown_flops, tmp_path):
    """An unstructured plan's FLOP-weighted sparsity is undefined without FLOPs: null, never NaN."""
    result = CliRunner().invoke(main, ["allocate", str(unknown_flops), "--method", "lamp", "--target-sparsity", "0.5",
                                       "-o", str(tmp_path / "plan.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert _strict(result.stdout)["totals"]["flops_sparsity"] is None
    assert _strict((tmp_path / "plan.json").read_text())["totals"]["flops_sparsity"] is None


def test_channel_plan_by_params_with_unknown_flops(unknown_flops, tmp_path):
    """It used to fail with a Python TypeError (None - int)."""
    plan = api.allocate(unknown_flops, method="uniform", granularity="channel", budget="params",
                        target_sparsity=0.3)
    assert plan.totals["flops_before"] is None and plan.totals["flops_after"] is None
    assert plan.totals["params_after"] < plan.totals["params_before"]
    # (no output check: it would feed a made-up shape to the Reshape, which is what issue 16's --input-shape fixes)
    out = api.apply(unknown_flops, plan, tmp_path / "small.onnx", check=False)
    assert out.totals["params_after"] == plan.totals["params_after"]


def test_onnx_runtime_logs_stay_off_stderr(unknown_flops, capfd):
    """A node failing at run time raises; ONNX Runtime's own log line must not reach the user's terminal."""
    from onnxprune.runtime.session import create_session

    sess = create_session(unknown_flops, "cpu")
    with pytest.raises(Exception, match="Reshape"):
        sess.run({"x": np.zeros((1, 48), np.float32), "s": np.array([7], np.int64)})
    assert "onnxruntime" not in capfd.readouterr().err


def test_channel_plan_by_flops_with_unknown_flops_names_the_layers(unknown_flops, tmp_path):
    result = CliRunner().invoke(main, ["allocate", str(unknown_flops), "--method", "uniform", "--granularity",
                                       "channel", "--budget", "flops", "--target-sparsity", "0.3",
                                       "-o", str(tmp_path / "plan.json")])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr
    assert "FLOPs of 2 layers are unknown" in line and "conv1, conv2" in line and "--budget params" in line
    assert not (tmp_path / "plan.json").exists()


def test_apply_counts_the_groups_it_changed(tmp_path):
    """Conv -> Relu -> Conv -> GAP -> Flatten: one prunable group (the hidden channels), one group kept (the
    output); the summary says "in 1 group", not "in 2 groups"."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["out"], name="flat")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
                       [weights("w1", 8, 3, 3, 3, seed=1), weights("w2", 4, 8, 1, 1, seed=3)])
    path = tmp_path / "cnn.onnx"
    path.write_bytes(model.SerializeToString())
    runner = CliRunner()
    assert runner.invoke(main, ["allocate", str(path), "--method", "uniform", "--granularity", "channel",
                                "--target-sparsity", "0.3", "-o", str(tmp_path / "plan.json")]).exit_code == 0
    result = runner.invoke(main, ["apply", str(path), str(tmp_path / "plan.json"), "-o", str(tmp_path / "s.onnx")])
    assert result.exit_code == 0, result.output
    assert " channels in 1 group:" in " ".join(result.stdout.split())


def test_channel_group_reasons_speak_of_the_graph_not_of_python(tmp_path):
    """A Concat whose rank shape inference cannot tell (behind a Reshape to a run-time shape) keeps its
    channels with a reason in the user's terms; it used to read "not understood (unsupported operand
    type(s) for %: 'int' and 'NoneType')"."""
    path = _behind_runtime_reshape(tmp_path / "concat.onnx", [
        helper.make_node("Conv", ["y", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a", "b"], ["ab"], name="concat", axis=1),
        helper.make_node("Relu", ["ab"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wc"], ["c"], name="conv_c"),
    ], [weights("wa", 4, 3, 3, 3, seed=1), weights("wb", 4, 3, 3, 3, seed=2), weights("wc", 4, 8, 1, 1, seed=3)])
    reasons = [g["reason"] for g in api.inspect(path).groups if g["reason"]]
    assert any("'concat'" in r and "rank shape inference could not tell" in r for r in reasons), reasons
    assert not any("NoneType" in r or "operand" in r for r in reasons), reasons
