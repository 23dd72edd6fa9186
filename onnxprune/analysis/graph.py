"""Shared graph facts for the analyses: constants, shapes, data edges, node order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.shape_inference import dim_value, fold_small_constants, infer_shapes

__all__ = ["FLOAT_TYPES", "GraphInfo", "analyse_graph", "const_shape", "constant_array", "constant_source",
           "dim_value", "fold_small_constants", "infer_shapes", "node_bodies", "numel", "per_sample_count",
           "stored_value"]

FLOAT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
}
# Ops whose outputs are shape information, never activations.
_SHAPE_OPS = {"Shape", "Size", "NonZero", "ConstantOfShape", "Range", "EyeLike"}
# Ops that only pass a constant through: a weight behind them is still a constant weight.
_CONST_PASSTHROUGH = {"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze"}


@dataclass
class GraphInfo:
    """What every analysis needs to know about the main graph, computed once."""

    model: ir.Model
    order: dict[ir.Node, int]
    shapes: dict[str, tuple] = field(default_factory=dict)
    dtypes: dict[str, ir.DataType] = field(default_factory=dict)  # inferred element types
    shape_error: str | None = None
    batch: int = 1  # a fixed batch dimension of the first input, divided out of FLOPs
    folded: dict[str, np.ndarray] = field(default_factory=dict)  # node outputs computed from small constants

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def shape(self, value: ir.Value | None) -> tuple | None:
        """The inferred shape of a value as a tuple of int / str (symbolic) / None (unknown)."""
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        return self.shapes.get(value.name)

    def is_const(self, value: ir.Value | None) -> bool:
        return value is not None and constant_source(value) is not None

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype if value.dtype is not None else self.dtypes.get(value.name)

    def is_data_edge(self, value: ir.Value | None) -> bool:
        """A run-time floating-point tensor (not a constant, not an integer/bool shape or mask computation)."""
        if value is None or self.is_const(value):
            return False
        producer = value.producer()
        if producer is not None and producer.op_type in _SHAPE_OPS:
            return False
        dtype = self.dtype(value)
        return dtype is None or dtype in FLOAT_TYPES


def node_bodies(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """(name, graph) of each body an If / Loop / Scan node holds (its GRAPH and GRAPHS attributes), in
    attribute order: the attribute's name (``then_branch``), numbered when one attribute holds several."""
    out = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append((attr.name, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
            out.extend((attr.name + (f"{k}" if len(graphs) > 1 else ""), g) for k, g in enumerate(graphs))
    return out


def stored_value(value: ir.Value) -> ir.Value:
    """The value a weight is stored in: ``value`` itself, or the one behind the Cast / Identity nodes that
    convert it (a weight kept in bfloat16 or float16 and cast to the layer's type)."""
    while (value.const_value is None and value.producer() is not None
           and value.producer().op_type in ("Cast", "Identity") and value.producer().inputs
           and value.producer().inputs[0] is not None):
        value = value.producer().inputs[0]
    return value


def constant_source(value: ir.Value) -> ir.Value | ir.Node | None:
    """The initializer value or Constant node a value comes from (through pass-through ops), else None."""
    seen = 0
    while value is not None and seen < 8:
        if value.const_value is not None or value.is_initializer():
            return value
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return node
        if node.op_type in _CONST_PASSTHROUGH and node.inputs and all(
            v is None or constant_source(v) is not None for v in node.inputs[1:]
        ):
            value = node.inputs[0]
            seen += 1
            continue
        return None
    return None


def constant_array(value: ir.Value) -> np.ndarray | None:
    """The array behind a constant value (its initializer or Constant node, through pass-through ops)."""
    src = constant_source(value)
    if src is None:
        return None
    tensor = src.const_value if isinstance(src, ir.Value) else src.attributes["value"].as_tensor()
    return None if tensor is None else tensor.numpy()


def const_shape(value: ir.Value) -> tuple[int, ...] | None:
    """Shape of a constant value: from its tensor, its Constant node, or its inferred type."""
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape)
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        attr = node.attributes.get("value")
        if attr is not None:
            return tuple(int(d) for d in attr.as_tensor().shape)
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(value.shape)
    if stored_value(value) is not value:
        return const_shape(stored_value(value))  # a weight stored in another type (bfloat16, float16) and cast
    return None


def numel(shape: tuple | None) -> int:
    return int(np.prod(shape)) if shape is not None else 0


def analyse_graph(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> GraphInfo:
    """Order the nodes, infer shapes (at ``input_shapes``, see infer_shapes). The nodes must be named
    (onnxprune.passes.NameNodesPass)."""
    unnamed = next((node for node in model.graph if not node.name), None)
    if unnamed is not None:
        raise ValueError(f"a {unnamed.op_type} node has no name; run onnxprune.passes.NameNodesPass first")
    order = {node: i for i, node in enumerate(model.graph)}
    shapes, dtypes, error, folded = infer_shapes(model, input_shapes)
    batch = 1
    if model.graph.inputs:
        first = shapes.get(model.graph.inputs[0].name)
        if first and isinstance(first[0], int) and first[0] > 1:
            batch = first[0]
    return GraphInfo(model=model, order=order, shapes=shapes, dtypes=dtypes, shape_error=error, batch=batch,
                     folded=folded)


def per_sample_count(shape: tuple | None, batch: int) -> int | None:
    """Number of elements of an activation per sample: symbolic or unknown dims count as 1."""
    if shape is None:
        return None
    total = 1
    for d in shape:
        total *= d if isinstance(d, int) and d > 0 else 1
    return total // batch if batch > 1 and total % batch == 0 else total
