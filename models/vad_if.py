"""A voice-activity model in the structure spox and torch export such models (issue 17's panel): all its
layers sit inside the two branches of an ``If`` that picks a branch by the sample rate, and it takes
several inputs: audio, a recurrent state and an int64 sample rate.

    input (N, samples) float, state (2, N, 32) float, sr () int64
      -> If sr == 16000: branch_16k else branch_8k
           Unsqueeze -> Conv1d(1->16) -> Relu -> Conv1d(16->32, stride 2) -> Relu -> ReduceMean over time
           -> LSTM(32, initial h and c from the state) -> Relu -> MatMul(32->1) + b -> Sigmoid
      -> output (N, 1) speech probability, stateN (2, N, 32)

The 16 kHz branch reads its weights from the main graph's initializers (the outer scope); the 8 kHz branch
keeps its convolution weights as initializers of its own body, as some exporters do. Built with onnx.helper
(no torch); the weights are random (the panel's oracles are output fidelity, not accuracy).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["HIDDEN", "INPUT_SHAPE", "vad_if_data", "vad_if_model"]

HIDDEN = 32
INPUT_SHAPE = "input:1,512"  # 32 ms at 16 kHz


def _tensor(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _branch(tag: str, kernel: int, stride: int, rng: np.random.Generator, local_convs: bool
            ) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    """One sample-rate branch; returns the body and the initializers the main graph must hold for it."""
    p = f"{tag}_"
    conv1 = _tensor(rng, p + "conv1_w", 16, 1, kernel)
    conv2 = _tensor(rng, p + "conv2_w", 32, 16, 3, scale=0.15)
    lstm = [_tensor(rng, p + "lstm_W", 1, 4 * HIDDEN, 32, scale=0.15),
            _tensor(rng, p + "lstm_R", 1, 4 * HIDDEN, HIDDEN, scale=0.15),
            _tensor(rng, p + "lstm_B", 1, 8 * HIDDEN, scale=0.05)]
    head = [_tensor(rng, p + "out_w", HIDDEN, 1), _tensor(rng, p + "out_b", 1, scale=0.1)]
    axes = [numpy_helper.from_array(np.array([1], np.int64), p + "axis1"),
            numpy_helper.from_array(np.array([0], np.int64), p + "axis0")]
    nodes = [
        helper.make_node("Unsqueeze", ["input", p + "axis1"], [p + "x"]),
        helper.make_node("Conv", [p + "x", p + "conv1_w"], [p + "c1"], strides=[stride], pads=[kernel // 2] * 2),
        helper.make_node("Relu", [p + "c1"], [p + "r1"]),
        helper.make_node("Conv", [p + "r1", p + "conv2_w"], [p + "c2"], strides=[2], pads=[1, 1]),
        helper.make_node("Relu", [p + "c2"], [p + "r2"]),
        helper.make_node("ReduceMean", [p + "r2"], [p + "feat"], axes=[2], keepdims=0),
        helper.make_node("Unsqueeze", [p + "feat", p + "axis0"], [p + "seq"]),
        helper.make_node("LSTM", [p + "seq", p + "lstm_W", p + "lstm_R", p + "lstm_B", "", "h0", "c0"],
                         [p + "y", p + "h", p + "c"], hidden_size=HIDDEN),
        helper.make_node("Squeeze", [p + "h", p + "axis0"], [p + "h2"]),
        helper.make_node("Relu", [p + "h2"], [p + "hr"]),
        helper.make_node("MatMul", [p + "hr", p + "out_w"], [p + "logit0"]),
        helper.make_node("Add", [p + "logit0", p + "out_b"], [p + "logit"]),
        helper.make_node("Sigmoid", [p + "logit"], [p + "prob"]),
        helper.make_node("Concat", [p + "h", p + "c"], [p + "state"], axis=0),
    ]
    local = [conv1, conv2] if local_convs else []
    outer = ([] if local_convs else [conv1, conv2]) + lstm + head + axes
    body = helper.make_graph(
        nodes, f"branch_{tag}", [],
        [helper.make_tensor_value_info(p + "prob", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info(p + "state", TensorProto.FLOAT, [2, "N", HIDDEN])],
        initializer=local)
    return body, outer


def vad_if_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    then_body, then_inits = _branch("sr16k", 8, 4, rng, local_convs=False)
    else_body, else_inits = _branch("sr8k", 4, 2, rng, local_convs=True)
    consts = [numpy_helper.from_array(np.array(16000, np.int64), "rate_16k"),
              numpy_helper.from_array(np.array([1, 1], np.int64), "state_split")]
    nodes = [
        helper.make_node("Split", ["state", "state_split"], ["h0", "c0"], axis=0),
        helper.make_node("Equal", ["sr", "rate_16k"], ["is_16k"]),
        helper.make_node("If", ["is_16k"], ["output", "stateN"], then_branch=then_body, else_branch=else_body),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "samples"]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", HIDDEN]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", HIDDEN])],
        initializer=then_inits + else_inits + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="spox-style")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def vad_if_data(n: int = 64, samples: int = 512, rate: int = 16000, seed: int = 1) -> dict[str, np.ndarray]:
    """Audio-like inputs (a few tones in noise), a zero state and the sample rate, as .npz arrays."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    tones = np.sin(2 * np.pi * rng.uniform(100, 1000, (n, 1)) * t) * rng.uniform(0, 1, (n, 1))
    audio = (tones + 0.1 * rng.standard_normal((n, samples))).astype(np.float32)
    return {"input": audio, "state": np.zeros((2, n, HIDDEN), np.float32), "sr": np.array(rate, np.int64)}
