"""Shape inference for the analysis: ONNX's, at the given input sizes, with the weights left out.

ONNX's C++ inference runs first. The dimensions it leaves unknown are filled from two more ONNX runs with
the dynamic batch set to two probe sizes (a dimension equal to the probe in both is the batch, one equal in
both is a fixed size), and only what still stays unknown is handed to ONNX Runtime's symbolic shape
inference (Python and sympy: ten to a hundred times slower on a detector's Resize and Expand chains).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["dim_value", "fold_small_constants", "infer_shapes", "outer_reads", "proto_bodies"]

logger = logging.getLogger(__name__)


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
        _drop_constant_annotations(p)
        p = fold_small_constants(p)
        for t in p.graph.initializer:
            if t.name in made:
                folded[t.name] = onnx.numpy_helper.to_array(t)
        inferred = _onnx_shapes(p)
        if _has_unknown(inferred):
            _fill_from_batch_probe(inferred, p)
        if _has_unknown(inferred):
            # with every input size known but the batch, only the unknown part needs symbolic inference;
            # with symbolic sizes it sees the whole graph, so that it names equal sizes alike everywhere
            sized = all(d.HasField("dim_value") for vi in p.graph.input if vi.type.HasField("tensor_type")
                        for d in vi.type.tensor_type.shape.dim[1:])
            symbolic.update(_symbolic_shapes(_unknown_part(p, inferred) if sized else p))
        return inferred

    try:
        proto = infer(_at_input_shapes(_proto_without_big_weights(model), input_shapes or {}))
        for vi in _value_infos(proto.graph):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                dtypes[vi.name] = ir.DataType(vi.type.tensor_type.elem_type)
        for name, shape in _value_shapes(proto):
            better = symbolic.get(name)
            if better is not None and len(better) == len(shape):  # fill the dims ONNX left unknown
                shape = tuple(b if _unknown(d) and b is not None else d for d, b in zip(shape, better, strict=True))
            shapes[name] = shape
        for name, shape in symbolic.items():  # values ONNX could not type at all (ONNX Runtime's own ops)
            shapes.setdefault(name, shape)
    except Exception as exc:  # noqa: BLE001 - any inference failure leaves declared shapes only
        error = f"shape inference failed: {' '.join(str(exc).split())[:200]}"
        logger.warning("%s", error)
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        if v.name not in shapes and v.shape is not None:
            shapes[v.name] = tuple(dim_value(d) for d in v.shape)
    sizes = _named_sizes(model, input_shapes or {})
    if sizes:  # a name the inputs give a size means that size wherever it appears (a declared output's 'seq')
        shapes = {name: tuple(sizes.get(d, d) if isinstance(d, str) else d for d in shape)
                  for name, shape in shapes.items()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            if v.name not in shapes and v.shape is not None:
                shapes[v.name] = tuple(dim_value(d) for d in v.shape)
    return shapes, dtypes, error, folded


def _named_sizes(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dimension name -> the size ``input_shapes`` give it (the batch, kept dynamic, excepted)."""
    sizes: dict[str, int] = {}
    for v in model.graph.inputs:
        dims = input_shapes.get(v.name)
        if dims is None or v.shape is None:
            continue
        for axis, (d, size) in enumerate(zip(v.shape, dims, strict=False)):
            name = dim_value(d)
            if axis > 0 and isinstance(name, str):
                sizes.setdefault(name, int(size))
    return sizes


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
    """(value name, shape tuple) for every typed value of a model proto (int, symbolic name, or None),
    those inside If / Loop / Scan bodies included (value names are unique across a model's graphs)."""
    for vi in _value_infos(proto.graph):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            yield vi.name, tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in vi.type.tensor_type.shape.dim)


def _value_infos(graph: onnx.GraphProto):
    yield from graph.value_info
    yield from graph.output
    yield from graph.input
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _value_infos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _value_infos(g)


def _unknown(d) -> bool:
    """A dimension ONNX shape inference could not tell (None, or a name it made up: unk__N)."""
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _unknown_part(proto: onnx.ModelProto, inferred: onnx.ModelProto) -> onnx.ModelProto:
    """The part of ``proto`` that symbolic inference has to see to size what ONNX left unknown: the nodes
    with an output of unknown size and, back from them, the producers of their inputs, cut at activations
    (floating-point values not computed from a Shape) whose size is known, which become inputs of that size.
    Shape computations are followed to their start, so that their values can be computed."""
    shapes = {name: shape for name, shape in _value_shapes(inferred)}
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    producer = {out: i for i, node in enumerate(proto.graph.node) for out in node.output}
    initializers = {t.name for t in proto.graph.initializer}
    inputs = {vi.name for vi in proto.graph.input}

    from_shapes: set[str] = set()  # values computed from a Shape or Size: their values matter, not just sizes
    for node in proto.graph.node:
        if node.op_type in ("Shape", "Size") or any(name in from_shapes for name in node.input):
            from_shapes.update(node.output)

    def known_activation(name: str) -> bool:
        vi = types.get(name)
        shape = shapes.get(name)
        return (name not in from_shapes and vi is not None and shape is not None
                and not any(_unknown(d) for d in shape) and vi.type.tensor_type.elem_type in _FLOAT_ELEM_TYPES)

    wanted = {i for i, node in enumerate(proto.graph.node)
              if any(shapes.get(o) is None or any(_unknown(d) for d in shapes[o]) for o in node.output if o)}
    cut: set[str] = set()
    stack = list(wanted)
    while stack:
        for name in proto.graph.node[stack.pop()].input:
            if not name or name in initializers or name in inputs or name in cut:
                continue
            if known_activation(name):
                cut.add(name)
            elif name in producer and producer[name] not in wanted:
                wanted.add(producer[name])
                stack.append(producer[name])
    nodes = [proto.graph.node[i] for i in sorted(wanted)]
    used = {name for node in nodes for name in node.input}
    graph = onnx.helper.make_graph(
        nodes, proto.graph.name,
        [vi for vi in proto.graph.input if vi.name in used] + [types[name] for name in sorted(cut)],
        [onnx.ValueInfoProto(name=o) for node in nodes for o in node.output if o],
        initializer=[t for t in proto.graph.initializer if t.name in used],
    )
    part = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    part.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name in used and vi.name not in cut)
    return part


_FLOAT_ELEM_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                     onnx.TensorProto.DOUBLE}


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


def _drop_constant_annotations(proto: onnx.ModelProto) -> None:
    """Remove the declared shapes of Constant outputs: inference knows them exactly, and a wrong declaration
    (GenAI's builder declares its 1-element constants as scalars) fails the whole inference."""
    constants = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    if constants:
        keep = [vi for vi in proto.graph.value_info if vi.name not in constants]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(keep)


def _onnx_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)


def _has_unknown(proto: onnx.ModelProto) -> bool:
    """Whether ONNX left a dimension unknown, or a node output without a shape at all (an operator only
    ONNX Runtime defines, whose declared shapes a rewrite dropped)."""
    shapes = dict(_value_shapes(proto))
    if any(_unknown(d) for shape in shapes.values() for d in shape):
        return True
    return any(o and o not in shapes for node in proto.graph.node for o in node.output)


_BATCH_PROBES = (7919, 7927)  # primes no real dimension is: a dim equal to one in its run is the batch


def _fill_from_batch_probe(inferred: onnx.ModelProto, proto: onnx.ModelProto) -> None:
    """Fill the dimensions of ``inferred`` that ONNX left unknown only because the batch is symbolic (a
    Resize by scales, a Reshape to a shape computed from Shape): infer twice more with the dynamic batch at
    two probe sizes; a dimension that is the probe in both runs is the batch, one that is the same size in
    both is that size, anything else stays unknown. Only when every input with a dynamic leading dimension
    calls it by one name (or leaves it unnamed): the batch is then one symbol."""
    batch_dims = [vi.type.tensor_type.shape.dim[0] for vi in proto.graph.input
                  if vi.type.HasField("tensor_type") and len(vi.type.tensor_type.shape.dim)
                  and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")]
    names = {d.dim_param for d in batch_dims}
    if not batch_dims or len(names) > 1:
        return
    batch_name = names.pop() or None
    try:
        runs = [dict(_value_shapes(_onnx_shapes(_with_batch(proto, size)))) for size in _BATCH_PROBES]
    except Exception as exc:  # noqa: BLE001 - a refinement only
        logger.info("batch probe skipped: %s", exc)
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        seen = [run.get(vi.name) for run in runs]
        if any(s is None or len(s) != len(dims) for s in seen):
            continue
        for i, d in enumerate(dims):
            if d.HasField("dim_value") or not _unknown(d.dim_param or None):
                continue
            a, b = seen[0][i], seen[1][i]
            if (a, b) == _BATCH_PROBES:
                if batch_name is None:
                    continue
                d.dim_param = batch_name
            elif isinstance(a, int) and a == b and a not in _BATCH_PROBES:
                d.dim_value = a


def _with_batch(proto: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """A copy of ``proto`` whose inputs' dynamic leading dimensions are ``size``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for vi in probe.graph.input:
        if vi.type.HasField("tensor_type") and len(vi.type.tensor_type.shape.dim):
            first = vi.type.tensor_type.shape.dim[0]
            if not first.HasField("dim_value"):
                first.dim_value = size
    return probe


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
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                     None)
        if foldable and node.op_type == "Constant" and value is not None and _numel_proto(value) <= _FOLD_LIMIT:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            known[tensor.name] = tensor
            graph.initializer.append(tensor)
            continue
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
    for node in graph.node:  # (extend copied the kept nodes)
        for body in proto_bodies(node):
            _copy_outer_constants(body, known)
    return proto


def outer_reads(body: onnx.GraphProto) -> set[str]:
    """The values an If / Loop / Scan body reads from the scopes around it (it names them without listing
    them as inputs), those its own bodies read included."""
    defined = {t.name for t in body.initializer} | {vi.name for vi in body.input} | \
        {o for n in body.node for o in n.output}
    reads = {i for n in body.node for i in n.input if i}
    for node in body.node:
        for inner in proto_bodies(node):
            reads |= outer_reads(inner)
    return reads - defined


def proto_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + \
        [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def _copy_outer_constants(body: onnx.GraphProto, known: dict[str, onnx.TensorProto]) -> None:
    """Give an If / Loop / Scan body its own copy of the small outer-scope constants it reads: ONNX's shape
    inference sees only their types across the scope boundary, so an Unsqueeze by outer axes stays unsized."""
    body.initializer.extend(known[name] for name in sorted(outer_reads(body)) if name in known)
    for node in body.node:
        for inner in proto_bodies(node):
            _copy_outer_constants(inner, {**known, **{t.name: t for t in body.initializer}})


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
