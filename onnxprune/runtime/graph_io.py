"""Model protos prepared for measuring: weights fed at run time, intermediate values as extra outputs.

Scoring, search, the refit and fine-tuning all evaluate a model whose weights change between runs, or read
values from inside it; these are the two rewrites of the serialised model they share.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

__all__ = ["value_types", "weight_tensor_type", "weights_as_inputs", "with_outputs"]


def weight_tensor_type(initializers: dict[str, onnx.TensorProto], const_nodes: dict[str, onnx.NodeProto],
                       name: str) -> tuple[int, list[int]]:
    """(element type, dims) of the weight ``name``: an initializer, or the output of a Constant node."""
    if name in initializers:
        t = initializers[name]
        return t.data_type, list(t.dims)
    t = next(a.t for a in const_nodes[name].attribute if a.name == "value")
    return t.data_type, list(t.dims)


def weights_as_inputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``proto`` in which every weight in ``names`` (initializer or Constant node output) is a
    graph input of the same type and shape, so each run can feed other values without a new session."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    names = set(names)
    graph = p.graph
    initializers = {t.name: t for t in graph.initializer}
    const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output[0] in names}
    for name in sorted(names & (set(initializers) | set(const_nodes)), key=_position(graph)):
        graph.input.append(helper.make_tensor_value_info(name, *weight_tensor_type(initializers, const_nodes, name)))
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in const_nodes.values():
        graph.node.remove(node)
    return p


def _position(graph: onnx.GraphProto):
    """Sort key: initializers in their order, then Constant nodes in graph order (inputs in a stable order)."""
    order = {t.name: i for i, t in enumerate(graph.initializer)}
    order.update({n.output[0]: len(order) + i for i, n in enumerate(graph.node) if n.op_type == "Constant"})
    return lambda name: order[name]


def with_outputs(proto: onnx.ModelProto, names: Iterable[str], elem_type: int | None = onnx.TensorProto.FLOAT
                 ) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the values ``names``, of ``elem_type`` (None: each value's own
    type as ONNX's shape inference finds it, float where it finds none: float16 graphs)."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    names = list(names)
    types = value_types(proto) if elem_type is None else {}
    have = {o.name for o in p.graph.output}
    for name in names:
        if name not in have:
            found = types[name].tensor_type.elem_type if name in types else 0
            p.graph.output.append(helper.make_tensor_value_info(
                name, found or elem_type or onnx.TensorProto.FLOAT, None))
            have.add(name)
    return p


def value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type of every graph input, intermediate value and output as ONNX's shape inference finds it (of
    the declared inputs and outputs only when it fails: over 2 GB, unknown ops)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - the declared types are all there is
        inferred = proto
    g = inferred.graph
    return {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}
