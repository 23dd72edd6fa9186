"""Helpers that build or rewrite ONNX graphs for tests (hand-made graphs, opset-9 style rewrites)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # onnx 1.23 would write 14, which onnxruntime 1.31 does not read
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, *shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def weights(name: str, *shape, seed: int = 0, scale: float = 1.0) -> onnx.TensorProto:
    return numpy_helper.from_array((scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32),
                                   name)


def initializers_to_constants(src: Path, dst: Path) -> Path:
    """Older exporters produce weights from Constant nodes instead of initializers: rewrite a model so."""
    model = onnx.load(str(src))
    consts = [helper.make_node("Constant", [], [init.name], value=init, name=f"const_{i}")
              for i, init in enumerate(model.graph.initializer)]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return dst


def add_to_sum(src: Path, dst: Path) -> Path:
    """Opset-9-era exports join residuals with Sum instead of Add."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "Add" and not any(i.startswith("onnx::") and "Constant" in i for i in node.input):
            node.op_type = "Sum"
    onnx.save(model, str(dst))
    return dst


def mask_channels(model: onnx.ModelProto, masks: dict[str, tuple[str, int, np.ndarray]]) -> onnx.ModelProto:
    """Oracle for channel removal: ``masks`` maps a value name to (its rank, channel axis, 0/1 mask); each
    consumer of the value reads value * mask (broadcast on that axis) instead."""
    q = onnx.ModelProto()
    q.CopyFrom(model)
    nodes = list(q.graph.node)
    for value, (rank, axis, mask) in masks.items():
        masked = f"{value}__masked"
        shape = [len(mask)] + [1] * (rank - 1 - axis)
        q.graph.initializer.append(numpy_helper.from_array(mask.astype(np.float32).reshape(shape), f"{value}__mask"))
        for n in nodes:
            for k, i in enumerate(n.input):
                if i == value:
                    n.input[k] = masked
        producer = next(i for i, n in enumerate(nodes) if value in n.output)
        nodes.insert(producer + 1, helper.make_node("Mul", [value, f"{value}__mask"], [masked]))
    del q.graph.node[:]
    q.graph.node.extend(nodes)
    return q
