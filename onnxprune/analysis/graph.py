"""Shared graph facts for the analyses: constants, shapes, data edges, node order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["FLOAT_TYPES", "GraphInfo", "analyse_graph", "const_shape", "constant_array", "constant_source",
           "dim_value", "fold_small_constants", "infer_shapes", "numel", "per_sample_count"]

logger = logging.getLogger(__name__)

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
    return None


def numel(shape: tuple | None) -> int:
    return int(np.prod(shape)) if shape is not None else 0


def infer_shapes(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None
                 ) -> tuple[dict[str, tuple], dict[str, ir.DataType], str | None, dict[str, np.ndarray]]:
    """ONNX shape inference with the large initializers left out (works for models over 2 GB), with the
    inputs of ``input_shapes`` at those sizes (the model itself keeps its declared shapes).

    Returns value name -> shape tuple (int, or str for a symbolic dim, or None for an unknown one), value
    name -> element type, an error message when inference failed (shapes then stay as declared), and the
    values of the node outputs that small constant folding computed (e.g. the pads of an option-A shortcut).
    """
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, ir.DataType] = {}
    folded: dict[str, np.ndarray] = {}
    error = None
    made = {v.name for node in model.graph for v in node.outputs}

    symbolic: dict[str, tuple] = {}

    def infer(p: onnx.ModelProto) -> onnx.ModelProto:
        p = fold_small_constants(p)
        for t in p.graph.initializer:
            if t.name in made:
                folded[t.name] = onnx.numpy_helper.to_array(t)
        inferred = onnx.shape_inference.infer_shapes(p, check_type=False, strict_mode=False, data_prop=True)
        if any(_unknown(d) for _, shape in _value_shapes(inferred) for d in shape):
            symbolic.update(_symbolic_shapes(p))
        return inferred

    try:
        proto = infer(_at_input_shapes(_proto_without_big_weights(model), input_shapes or {}))
        for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                dtypes[vi.name] = ir.DataType(vi.type.tensor_type.elem_type)
        for name, shape in _value_shapes(proto):
            better = symbolic.get(name)
            if better is not None and len(better) == len(shape):  # fill the dims ONNX left unknown
                shape = tuple(b if _unknown(d) and b is not None else d for d, b in zip(shape, better, strict=True))
            shapes[name] = shape
    except Exception as exc:  # noqa: BLE001 - any inference failure leaves declared shapes only
        error = f"shape inference failed: {' '.join(str(exc).split())[:200]}"
        logger.warning("%s", error)
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        if v.name not in shapes and v.shape is not None:
            shapes[v.name] = tuple(dim_value(d) for d in v.shape)
    for node in model.graph:
        for v in node.outputs:
            if v.name not in shapes and v.shape is not None:
                shapes[v.name] = tuple(dim_value(d) for d in v.shape)
    return shapes, dtypes, error, folded


_INLINE_LIMIT = 1000  # bytes: bigger weights are left out of the proto handed to ONNX's C++ shape inference


def _proto_without_big_weights(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto in which every weight is a typed graph input and only weights up to 1 KB keep
    their values, so that a model of any size fits the C++ API (protobuf's 2 GB limit) and nothing big is
    copied. ``model`` is restored afterwards (its big initializers then come after the small ones)."""
    graph = model.graph
    weights = list(graph.initializers.values())
    tensors = {v.name: v.const_value for v in weights}
    inputs = len(graph.inputs)
    try:
        for value in weights:
            tensor = value.const_value
            if tensor is not None:
                value.shape = value.shape if value.shape is not None else tensor.shape
                value.dtype = value.dtype if value.dtype is not None else tensor.dtype
            if value not in graph.inputs:
                graph.inputs.append(value)
            if tensor is None or tensor.nbytes > _INLINE_LIMIT:
                value.const_value = None
                graph.initializers.pop(value.name)
        return ir.serde.serialize_model(model)
    finally:
        for value in weights:
            value.const_value = tensors[value.name]
            if value.name not in graph.initializers:
                if value.const_value is not None:
                    graph.register_initializer(value)
                else:
                    graph.initializers.add(value)
        kept = graph.inputs[:inputs]
        graph.inputs.clear()
        graph.inputs.extend(kept)


def _at_input_shapes(proto: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """``proto`` with the named graph inputs' dimensions set to the given sizes, except a dynamic batch (the
    leading dimension), which stays dynamic: the analysis counts per sample, and graphs cut from its shapes
    (onnxprune.runtime.partial) must take any batch."""
    for vi in proto.graph.input:
        dims = input_shapes.get(vi.name)
        if dims is None or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        batch = onnx.TensorShapeProto.Dimension()
        if len(shape.dim) and not shape.dim[0].HasField("dim_value"):
            batch.CopyFrom(shape.dim[0])
        else:
            batch.dim_value = int(dims[0])
        shape.ClearField("dim")
        shape.dim.add().CopyFrom(batch)
        for d in dims[1:]:
            shape.dim.add().dim_value = int(d)
    return proto


def _value_shapes(proto: onnx.ModelProto):
    """(value name, shape tuple) for every typed value of a model proto (int, symbolic name, or None)."""
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            yield vi.name, tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in vi.type.tensor_type.shape.dim)


def _unknown(d) -> bool:
    """A dimension ONNX shape inference could not tell (None, or a name it made up: unk__N)."""
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _symbolic_shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    """ONNX Runtime's symbolic shape inference, which follows Shape -> Gather -> Concat -> Expand chains that
    ONNX's leaves unknown (a transformer's attention mask: (batch, 1, seq, seq) where ONNX says unk__N).
    Empty when it is not installed (it needs sympy) or fails on the model."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # noqa: BLE001 - a refinement only: ONNX's shapes stand
        logger.info("symbolic shape inference skipped: %s", exc)
        return {}
    return dict(_value_shapes(out)) if out is not None else {}


_FOLD_LIMIT = 65536  # elements: only shape-sized computations are folded
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def fold_small_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate nodes whose inputs are all small constants (shape computations such as the pads of an
    exported option-A shortcut) and turn their outputs into initializers, so that shape inference sees
    concrete values. Works on a copy; nodes that cannot be evaluated are left as they are."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    known = {t.name: t for t in graph.initializer if _numel_proto(t) <= _FOLD_LIMIT}
    keep = []
    opsets = list(proto.opset_import)
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDABLE
            and all(i in known for i in inputs)
            and all(a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        )
        if foldable:
            try:
                sub = helper.make_model(
                    helper.make_graph(
                        [node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
                        initializer=[known[i] for i in dict.fromkeys(inputs)],
                    ),
                    opset_imports=opsets,
                    ir_version=proto.ir_version,
                )
                results = ReferenceEvaluator(sub).run(None, {})
                tensors = [numpy_helper.from_array(np.asarray(r), o) for r, o in zip(results, node.output)]
                if all(_numel_proto(t) <= _FOLD_LIMIT for t in tensors):
                    for t in tensors:
                        known[t.name] = t
                        graph.initializer.append(t)
                    continue
            except Exception:  # noqa: BLE001 - leave the node for shape inference as it is
                pass
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return proto


def _numel_proto(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def dim_value(d) -> int | str | None:
    """An onnx-ir dimension as an int, its symbolic name, or None (unknown)."""
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    if isinstance(value, int):
        return value
    return str(value) if value is not None else None


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
