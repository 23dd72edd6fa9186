"""Reading and writing the weight of a prunable layer, wherever it lives (initializer or Constant node),
and viewing it as an (outputs x inputs) matrix."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import constant_array, stored_value
from onnxprune.analysis.layers import Layer, out_in_axes
from onnxprune.errors import InputError
from onnxprune.io import release
from onnxprune.tensors.nbits import NBitsWeight, dequantize, is_nbits, nbits_weight, on_grid, stored_inputs

__all__ = ["as_matrix", "compute_dtype", "get_weight", "lazy_from", "out_in_axes", "release_weight",
           "new_initializer", "set_weight", "write_nbits"]


def _source(layer: Layer) -> ir.Value | ir.Node:
    """Where the layer's weight is stored: an initializer or Constant node, behind Cast / Identity nodes (a
    weight kept in bfloat16 or float16 and cast for the layer): rewritten there, in its stored type."""
    value = stored_value(layer.node.inputs[layer.weight_input])
    if value.const_value is not None:
        return value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.attributes.get("value") is not None:
        return node
    raise InputError(
        f"the weight of layer {layer.name!r} is computed by a {node.op_type if node else '?'} node, which "
        "onnxprune cannot rewrite yet; fold constants first (e.g. onnxsim) or leave this layer out"
    )


def get_weight(layer: Layer) -> np.ndarray:
    """The layer's weight as a (read-only, possibly memory-mapped) array in its ONNX layout (a MatMulNBits
    layer: the dequantised (K, N) matrix)."""
    _source(layer)  # a clear error for weights onnxprune cannot rewrite
    if is_nbits(layer.node):
        return dequantize(layer.node)
    return constant_array(layer.node.inputs[layer.weight_input])


def compute_dtype(layer: Layer) -> np.dtype:
    """The type the layer computes in: its weight's, or the one a Cast in front of the layer converts it to."""
    value = layer.node.inputs[layer.weight_input]
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and value.const_value is None:
        return ir.DataType(producer.attributes.get_int("to")).numpy()
    return np.asarray(get_weight(layer)).dtype


def release_weight(layer: Layer) -> None:
    """Done reading a memory-mapped weight: unmap it, so that a pass over a big model keeps one layer resident."""
    tensor = layer.node.inputs[layer.weight_input].const_value
    if isinstance(tensor, ir.ExternalTensor):
        release(tensor)


def lazy_from(source: ir.ExternalTensor, fn, shape: tuple[int, ...] | None = None) -> ir.LazyTensor:
    """A tensor computed as ``fn(source array)`` only when the model is written, after which the source's
    memory map is released: a pass over a big model then holds one layer at a time, never a second copy."""
    def compute() -> ir.Tensor:
        out = np.ascontiguousarray(fn(source.numpy()))
        release(source)
        return ir.tensor(out, name=source.name)

    return ir.LazyTensor(compute, dtype=source.dtype, shape=source.shape if shape is None else ir.Shape(shape),
                         name=source.name)


def set_weight(layer: Layer, array: np.ndarray | ir.LazyTensor) -> None:
    """Replace the layer's weight (same shape and dtype): an array, or a tensor computed when written. A
    MatMulNBits layer's weight is encoded on its own quantisation grid (exact for values taken from it)."""
    if is_nbits(layer.node):
        values = array.numpy() if isinstance(array, ir.LazyTensor) else array
        write_nbits(layer.node, on_grid(values, nbits_weight(layer.node)))
        return
    src = _source(layer)
    tensor = array if isinstance(array, ir.LazyTensor) else ir.tensor(array, name=src.name)
    if isinstance(src, ir.Value):
        src.const_value = tensor
    else:
        src.attributes["value"] = ir.AttrTensor("value", tensor)


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray | ir.LazyTensor, suffix: str = "_shrunk"
                    ) -> ir.Value:
    """A new initializer ``<base><suffix>`` (numbered when taken) holding ``array``, registered in ``graph``."""
    name, k = f"{base}{suffix}", 0
    while name in graph.initializers:
        k += 1
        name = f"{base}{suffix}{k}"
    if isinstance(array, ir.LazyTensor):
        tensor, dtype = array, array.dtype
        tensor.name = name
    else:
        tensor, dtype = ir.tensor(array, name=name), ir.DataType.from_numpy(array.dtype)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def write_nbits(node: ir.Node, weight: NBitsWeight) -> None:
    """Store ``weight`` as the MatMulNBits node's B, scales and zero points (new initializers), K and N."""
    for index, array in stored_inputs(weight).items():
        node.replace_input_with(index, new_initializer(node.graph, node.inputs[index].name,
                                                       np.ascontiguousarray(array), suffix="_pruned"))
    node.attributes["K"] = ir.AttrInt64("K", weight.k)
    node.attributes["N"] = ir.AttrInt64("N", weight.q.shape[0])


def as_matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as (outputs, everything else): conv filters as rows, linear output features as rows."""
    out_axis, _ = out_in_axes(layer)
    return np.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)
