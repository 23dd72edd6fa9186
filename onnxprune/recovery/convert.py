"""An ONNX graph as a trainable torch module, and the trained values written back into the same graph.

Why our own converter and not onnx2torch: onnx2torch (1.5.x) hard-depends on torchvision, whose wheels pull a
CUDA build of torch on a CPU machine, and it gives back a new graph through torch.onnx.export, so the tuned
model would lose the input model's node names, structure and metadata. Here every float initializer of the
graph is a ``torch.nn.Parameter`` (BatchNorm statistics are buffers), the nodes run in graph order as torch
operations, and after training the values go back into the initializers of the *same* ONNX graph: input and
output names, opset, metadata and every other node stay as they were.

Exported graphs usually have BatchNormalization folded into their convolutions, and such graphs train badly
(the scales of the folded weights differ by orders of magnitude between layers). ``insert_bn=True`` puts a
BatchNormalization after every convolution that has none (initialised to the identity), which trains like
the original network; ``write_back`` folds them into the convolution's weight and bias again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxprune.errors import InputError

__all__ = ["BN_EPS", "OPS", "InsertedBN", "OnnxModule", "WriteBackPass"]

BN_EPS = 1e-5


@dataclass
class InsertedBN:
    """A BatchNormalization put after a convolution of a folded graph (folded back on export)."""

    node: str  # the Conv node
    output: str  # the Conv's output tensor (the BN normalises it)
    weight: str  # the Conv's weight initializer
    bias: str | None  # its bias initializer (None: the fold adds one)
    channels: int


@dataclass
class _Step:
    op: str
    name: str
    fn: Callable
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict
    bn: int | None = None  # index of an inserted BatchNormalization applied to outputs[0]


_ONNX_TO_TORCH = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def _torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return _ONNX_TO_TORCH[ir.DataType(onnx_type)]
    except (KeyError, ValueError):
        raise InputError(f"finetune cannot convert tensors of ONNX type {onnx_type}") from None


def _attr_value(attr: ir.Attr):
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return torch.from_numpy(np.array(value.numpy()))
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------------------
# operators: fn(module, step, *inputs) -> tensor or tuple of tensors


def _spatial_pads(x, attrs: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    nd = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small = total // 2
            pads_b.append(small if auto == "SAME_UPPER" else total - small)
            pads_e.append(total - pads_b[-1])
        return pads_b + pads_e
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(attrs.get("pads", [0] * (2 * nd)))


def _torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX pads (begins of every axis, then ends) -> F.pad's (last axis first) pairs."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _conv(mod, s, x, w, b=None):
    nd = w.dim() - 2
    strides = s.attrs.get("strides", [1] * nd)
    dil = s.attrs.get("dilations", [1] * nd)
    pads = _spatial_pads(x, s.attrs, list(w.shape[2:]), strides, dil)
    if pads[:nd] == pads[nd:]:
        padding = pads[:nd]
    else:
        x, padding = F.pad(x, _torch_pad_order(pads)), 0
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, strides, padding, dil, s.attrs.get("group", 1))


def _conv_transpose(mod, s, x, w, b=None):
    nd = w.dim() - 2
    strides = s.attrs.get("strides", [1] * nd)
    dil = s.attrs.get("dilations", [1] * nd)
    pads = list(s.attrs.get("pads", [0] * (2 * nd)))
    if s.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID") or "output_shape" in s.attrs \
            or pads[:nd] != pads[nd:]:
        raise InputError(f"finetune supports ConvTranspose with symmetric explicit pads only (node {s.name})")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return conv(x, w, b, strides, pads[:nd], s.attrs.get("output_padding", [0] * nd), s.attrs.get("group", 1), dil)


def _gemm(mod, s, a, b, c=None):
    if s.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if s.attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = s.attrs.get("alpha", 1.0), s.attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _pool(kind):
    def fn(mod, s, x):
        kernel = list(s.attrs["kernel_shape"])
        nd = len(kernel)
        strides = list(s.attrs.get("strides", [1] * nd))
        dil = list(s.attrs.get("dilations", [1] * nd))
        pads = _spatial_pads(x, s.attrs, kernel, strides, dil)
        ceil = bool(s.attrs.get("ceil_mode", 0))
        if pads[:nd] != pads[nd:]:
            if kind == "avg" and not s.attrs.get("count_include_pad", 0):
                raise InputError(f"finetune: AveragePool {s.name} with asymmetric pads is not supported")
            x = F.pad(x, _torch_pad_order(pads), value=-math.inf if kind == "max" else 0.0)
            pads = [0] * (2 * nd)
        if kind == "max":
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return pool(x, kernel, strides, pads[:nd], dil, ceil)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        return pool(x, kernel, strides, pads[:nd], ceil, bool(s.attrs.get("count_include_pad", 0)))

    return fn


def _global_pool(kind):
    def fn(mod, s, x):
        dims = tuple(range(2, x.dim()))
        return x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)

    return fn


def _batch_norm(mod, s, x, scale, bias, mean, var):
    training = mod.training and mod.bn_training
    return F.batch_norm(x, mean, var, scale, bias, training, mod.bn_factor(), s.attrs.get("epsilon", 1e-5))


def _layer_norm(mod, s, x, scale, bias=None):
    axis = s.attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, s.attrs.get("epsilon", 1e-5))


def _instance_norm(mod, s, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=s.attrs.get("epsilon", 1e-5))


def _softmax(torch_fn):
    def fn(mod, s, x):
        if mod.opset >= 13:
            return torch_fn(x, s.attrs.get("axis", -1))
        axis = s.attrs.get("axis", 1) % x.dim()  # opset < 13: coerced to 2-D at axis
        shape = x.shape
        return torch_fn(x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1), 1).reshape(shape)

    return fn


def _reshape(mod, s, x, shape):
    target = _ints(shape)
    if not s.attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _flatten(mod, s, x):
    axis = s.attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _axes(s, given, name="axes") -> list[int] | None:
    return _ints(given) if given is not None else s.attrs.get(name)


def _unsqueeze(mod, s, x, axes=None):
    axes = _axes(s, axes)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(mod, s, x, axes=None):
    axes = _axes(s, axes)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _reduce(torch_fn):
    def fn(mod, s, x, axes=None):
        axes = _axes(s, axes)
        keep = bool(s.attrs.get("keepdims", 1))
        if not axes:
            if s.attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return torch_fn(x, [a % x.dim() for a in axes], keep)

    return fn


def _slice(mod, s, x, starts=None, ends=None, axes=None, steps=None):
    starts = _ints(starts) if starts is not None else s.attrs["starts"]
    ends = _ints(ends) if ends is not None else s.attrs["ends"]
    axes = _ints(axes) if axes is not None else s.attrs.get("axes", list(range(len(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list = [slice(None)] * x.dim()
    flips = []
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        ax %= x.dim()
        size = x.shape[ax]
        if sp > 0:
            index[ax] = slice(*slice(st, en, sp).indices(size))
        else:
            idx = list(range(*slice(st, en, sp).indices(size)))
            flips.append((ax, torch.tensor(idx, dtype=torch.long, device=x.device)))
    y = x[tuple(index)]
    for ax, idx in flips:
        y = y.index_select(ax, idx)
    return y


def _split(mod, s, x, split=None):
    axis = s.attrs.get("axis", 0)
    sizes = _ints(split) if split is not None else s.attrs.get("split")
    if sizes is None:
        n = s.attrs.get("num_outputs", len(s.outputs))
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return tuple(torch.split(x, sizes, axis))


_INTERPOLATE = {("linear", 3): "linear", ("linear", 4): "bilinear", ("linear", 5): "trilinear",
                ("cubic", 4): "bicubic"}


def _resize(mod, s, x, roi=None, scales=None, sizes=None):
    """ONNX Resize (opset 10: inputs X, scales) on the spatial axes: nearest (integer scales as exporters write
    upsampling, where every nearest mode agrees) or linear / cubic (align_corners from the coordinate mode)."""
    if scales is None and sizes is None and roi is not None and roi.numel() == x.dim():
        scales = roi  # opset 10: the second input holds the scales
    mode = s.attrs.get("mode", "nearest")
    if sizes is not None and sizes.numel():
        target = {"size": _ints(sizes)[2:]}
    else:
        target = {"scale_factor": [float(v) for v in scales.reshape(-1).tolist()[2:]]}
    if mode == "nearest":
        return F.interpolate(x, mode="nearest", **target)
    kind = _INTERPOLATE.get((mode, x.dim()))
    if kind is None:
        raise ValueError(f"Resize mode {mode!r} on a rank-{x.dim()} tensor")
    aligned = s.attrs.get("coordinate_transformation_mode", "half_pixel") == "align_corners"
    return F.interpolate(x, mode=kind, align_corners=aligned, **target)


def _gather(mod, s, x, idx):
    axis = s.attrs.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def _gather_elements(mod, s, x, idx):
    axis = s.attrs.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx).long())


def _shape(mod, s, x):
    dims = list(x.shape)
    start, end = s.attrs.get("start", 0), s.attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _constant_of_shape(mod, s, shape):
    value = s.attrs.get("value")
    if value is None:
        return torch.zeros(_ints(shape), dtype=torch.float32)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _constant(mod, s):
    return mod.constant_of(s)


def _pad(mod, s, x, pads=None, value=None, axes=None):
    pads = _ints(pads) if pads is not None else list(s.attrs["pads"])
    mode = s.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if axes is not None:
        full = [0] * (2 * x.dim())
        ax = [a % x.dim() for a in _ints(axes)]
        for i, a in enumerate(ax):
            full[a], full[a + x.dim()] = pads[i], pads[i + len(ax)]
        pads = full
    torch_pads = _torch_pad_order(pads)
    while torch_pads and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        fill = 0.0 if value is None or value.numel() == 0 else value.reshape(-1)[0].item()
        return F.pad(x, torch_pads, value=fill)
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _clip(mod, s, x, lo=None, hi=None):
    lo = lo if lo is not None else s.attrs.get("min")
    hi = hi if hi is not None else s.attrs.get("max")
    return torch.clamp(x, lo, hi)


def _div(mod, s, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _cast(mod, s, x):
    dtype = _torch_dtype(s.attrs["to"])
    if dtype.is_floating_point and x.is_floating_point():  # training runs in float32 (weights are float32
        return x.float()                                    # copies, written back in their own type)
    return x.to(dtype)


def _expand(mod, s, x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _range(mod, s, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _transpose(mod, s, x):
    perm = s.attrs.get("perm", list(reversed(range(x.dim()))))
    return x.permute(perm)


def _variadic(torch_fn):
    def fn(mod, s, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = torch_fn(out, x)
        return out

    return fn


def _unary(torch_fn):
    return lambda mod, s, x: torch_fn(x)


def _binary(torch_fn):
    return lambda mod, s, a, b: torch_fn(a, b)


def _gelu(mod, s, x):
    approx = s.attrs.get("approximate", "none")
    return F.gelu(x, approximate=approx.decode() if isinstance(approx, bytes) else approx)


OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"), "GlobalMaxPool": _global_pool("max"),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm, "InstanceNormalization": _instance_norm,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh), "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Sign": _unary(torch.sign), "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan), "IsInf": _unary(torch.isinf), "Identity": _unary(lambda x: x),
    "Softplus": _unary(F.softplus), "HardSwish": _unary(F.hardswish), "Gelu": _gelu,
    "LeakyRelu": lambda mod, s, x: F.leaky_relu(x, s.attrs.get("alpha", 0.01)),
    "Elu": lambda mod, s, x: F.elu(x, s.attrs.get("alpha", 1.0)),
    "HardSigmoid": lambda mod, s, x: torch.clamp(x * s.attrs.get("alpha", 0.2) + s.attrs.get("beta", 0.5), 0, 1),
    "PRelu": lambda mod, s, x, slope: torch.where(x >= 0, x, x * slope),
    "Dropout": lambda mod, s, x, *rest: x,
    "Clip": _clip, "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow), "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Where": lambda mod, s, c, a, b: torch.where(c, a, b),
    "Sum": _variadic(torch.add), "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum),
    "Mean": lambda mod, s, *xs: _variadic(torch.add)(mod, s, *xs) / len(xs),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": lambda mod, s, *xs: torch.cat(xs, s.attrs["axis"]), "Split": _split, "Slice": _slice,
    "Resize": _resize,
    "Gather": _gather, "GatherElements": _gather_elements, "Shape": _shape,
    "Size": lambda mod, s, x: torch.tensor(x.numel(), dtype=torch.int64),
    "ConstantOfShape": _constant_of_shape, "Constant": _constant, "Cast": _cast, "Expand": _expand,
    "Range": _range, "Tile": lambda mod, s, x, reps: x.repeat(_ints(reps)), "Pad": _pad,
    "ReduceMean": _reduce(lambda x, a, k: x.mean(a, keepdim=k)), "ReduceSum": _reduce(lambda x, a, k: x.sum(a, keepdim=k)),
    "ReduceMax": _reduce(lambda x, a, k: x.amax(a, keepdim=k)), "ReduceMin": _reduce(lambda x, a, k: x.amin(a, keepdim=k)),
    "ArgMax": lambda mod, s, x: torch.argmax(x, s.attrs.get("axis", 0), bool(s.attrs.get("keepdims", 1))),
    "Einsum": lambda mod, s, *xs: torch.einsum(s.attrs["equation"].decode() if isinstance(
        s.attrs["equation"], bytes) else s.attrs["equation"], *xs),
}
# Reductions whose axes moved from an attribute to an input (opset 13 for ReduceSum, 18 for the rest) are
# both handled by _axes; Slice/Pad/Clip/Split/Squeeze/Unsqueeze likewise.


class OnnxModule(nn.Module):
    """The ONNX graph of ``model`` as a torch module: ``forward(*inputs)`` returns the graph outputs (a
    tensor when there is one). Float initializers with more than one element are parameters (BatchNorm
    statistics: buffers); everything else is constant.

    ``insert_bn``: put a BatchNormalization (identity at first) after every Conv that is not followed by one
    and owns its weight; ``write_back`` folds them into the Conv. ``bn_training``: BatchNorm layers use
    batch statistics in training mode (else they stay fixed). ``bn_momentum``: update factor of the running
    statistics; None gives the cumulative average (for recalibration).
    """

    def __init__(self, model: ir.Model, *, insert_bn: bool = False):
        super().__init__()
        graph = model.graph
        self.opset = model.opset_imports.get("", 13)
        self.bn_training = True
        self.bn_momentum: float | None = 0.1
        self._seen = 0
        unknown = sorted({n.op_type for n in graph if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise InputError(
                f"finetune cannot convert operator(s) {', '.join(unknown)} to torch; it supports "
                f"{len(OPS)} common operators (Conv, Gemm, MatMul, BatchNormalization, LayerNormalization, ...)"
            )
        if any(n.op_type in ("If", "Loop", "Scan") for n in graph):
            raise InputError("finetune cannot convert graphs with control flow (If/Loop/Scan)")
        initializers = dict(graph.initializers)
        stat_inputs = {n.inputs[i].name for n in graph if n.op_type == "BatchNormalization"
                       for i in (3, 4) if len(n.inputs) > i and n.inputs[i] is not None}
        self.params = nn.ParameterList()
        self._param_of: dict[str, int] = {}
        self._buffer_of: dict[str, str] = {}
        self._dtype_of: dict[str, np.dtype] = {}
        for name, value in initializers.items():
            if value.const_value is None:
                continue
            arr = value.const_value.numpy()
            self._dtype_of[name] = arr.dtype
            floating = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"  # (ml_dtypes)
            if floating and arr.size > 1 and name not in stat_inputs:
                self._param_of[name] = len(self.params)
                self.params.append(nn.Parameter(torch.from_numpy(np.array(arr, np.float32))))
            else:
                key = f"const{len(self._buffer_of)}"
                t = torch.from_numpy(np.array(arr, np.float32 if floating else arr.dtype))
                self.register_buffer(key, t.reshape(arr.shape))
                self._buffer_of[name] = key
        self.input_names = [v.name for v in graph.inputs if v.name not in initializers]
        self.output_names = [v.name for v in graph.outputs]
        self._constants: dict[str, str] = {}  # Constant node -> buffer
        self.steps: list[_Step] = []
        self.inserted: list[InsertedBN] = []
        self.bn_weight = nn.ParameterList()
        self.bn_bias = nn.ParameterList()
        for node in graph:
            attrs = {k: _attr_value(a) for k, a in node.attributes.items()}
            step = _Step(node.op_type, node.name or f"{node.op_type}_{len(self.steps)}", OPS[node.op_type],
                         [None if v is None else v.name for v in node.inputs], [v.name for v in node.outputs], attrs)
            if node.op_type == "Constant":
                arr = self._constant_array(attrs, step.name)
                key = f"node_const{len(self._constants)}"
                self.register_buffer(key, torch.from_numpy(np.array(arr)).reshape(arr.shape), persistent=False)
                self._constants[step.name] = key
            if insert_bn and self._can_insert(node):
                step.bn = self._insert_bn(node)
            self.steps.append(step)

    # --- construction helpers

    @staticmethod
    def _constant_array(attrs: dict, name: str) -> np.ndarray:
        for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in attrs:
                value = attrs[key]
                return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype)
        raise InputError(f"finetune: Constant node {name} has no supported value attribute")

    def _can_insert(self, node: ir.Node) -> bool:
        if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] is None:
            return False
        w = node.inputs[1]
        if w.name not in self._param_of or len(w.uses()) != 1:
            return False
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is not None and (b.name not in self._param_of or len(b.uses()) != 1):
            return False
        return not any(c.op_type == "BatchNormalization" for c in node.outputs[0].consumers())

    def _insert_bn(self, node: ir.Node) -> int:
        channels = int(self.params[self._param_of[node.inputs[1].name]].shape[0])
        b = node.inputs[2] if len(node.inputs) > 2 else None
        i = len(self.inserted)
        self.inserted.append(InsertedBN(node.name, node.outputs[0].name, node.inputs[1].name,
                                        None if b is None else b.name, channels))
        self.bn_weight.append(nn.Parameter(torch.ones(channels)))
        self.bn_bias.append(nn.Parameter(torch.zeros(channels)))
        self.register_buffer(f"bn_mean{i}", torch.zeros(channels))
        self.register_buffer(f"bn_var{i}", torch.ones(channels))
        return i

    def constant_of(self, step: _Step) -> torch.Tensor:
        return getattr(self, self._constants[step.name])

    # --- running

    def bn_factor(self) -> float:
        return self.bn_momentum if self.bn_momentum is not None else 1.0 / (self._seen + 1)

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or constant of initializer ``name``."""
        if name in self._param_of:
            return self.params[self._param_of[name]]
        return getattr(self, self._buffer_of[name])

    def initializer_names(self) -> list[str]:
        return list(self._param_of) + list(self._buffer_of)

    def bn_stats(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"bn_mean{i}"), getattr(self, f"bn_var{i}")

    def forward(self, *inputs: torch.Tensor, capture: set[str] | None = None, captured: dict | None = None):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the model takes {len(self.input_names)} input(s), got {len(inputs)}")
        env: dict[str, torch.Tensor | None] = {name: self.params[i] for name, i in self._param_of.items()}
        env.update((name, getattr(self, key)) for name, key in self._buffer_of.items())
        env.update(zip(self.input_names, inputs, strict=True))
        bn_train = self.training and self.bn_training
        factor = self.bn_factor()
        for s in self.steps:
            out = s.fn(self, s, *[env[n] if n else None for n in s.inputs])
            if s.bn is not None:
                if captured is not None and capture and s.outputs[0] in capture:
                    captured[s.outputs[0]] = out
                mean, var = self.bn_stats(s.bn)
                out = F.batch_norm(out, mean, var, self.bn_weight[s.bn], self.bn_bias[s.bn], bn_train, factor, BN_EPS)
            if isinstance(out, tuple):
                env.update(zip(s.outputs, out, strict=False))
            else:
                env[s.outputs[0]] = out
                if captured is not None and capture and s.outputs[0] in capture and s.bn is None:
                    captured[s.outputs[0]] = out
        if bn_train:
            self._seen += 1
        outs = [env[n] for n in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)

    # --- back to ONNX

    def folded(self) -> dict[str, np.ndarray]:
        """Every initializer's current value (the inserted BatchNorms folded into their Conv), by name; new
        bias initializers are named ``<conv weight>.bias_folded``."""
        values = {name: self.tensor(name).detach().cpu().numpy() for name in self.initializer_names()}
        for i, ins in enumerate(self.inserted):
            mean, var = (t.detach().double().cpu().numpy() for t in self.bn_stats(i))
            gamma = self.bn_weight[i].detach().double().cpu().numpy()
            beta = self.bn_bias[i].detach().double().cpu().numpy()
            scale = gamma / np.sqrt(var + BN_EPS)
            w = values[ins.weight].astype(np.float64)
            values[ins.weight] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            b = values[ins.bias].astype(np.float64) if ins.bias else np.zeros(ins.channels)
            values[ins.bias or ins.weight + ".bias_folded"] = ((b - mean) * scale + beta).astype(np.float32)
        return values

    def write_back(self, model: ir.Model) -> int:
        """Write the trained values into ``model`` (the graph this module was built from): initializers take
        their new values in their original dtype, inserted BatchNorms are folded into their Conv (a Conv
        without bias gets one). Returns the number of initializers written."""
        graph = model.graph
        nodes = {n.name: n for n in graph}
        values = self.folded()
        written = 0
        for name, arr in values.items():
            value = graph.initializers.get(name)
            if value is None:
                continue
            dtype = self._dtype_of.get(name, arr.dtype)
            # np.ascontiguousarray would turn a scalar into shape (1,), which the checker then rejects
            value.const_value = ir.tensor(np.array(arr, dtype=dtype, order="C"), name=name)
            written += 1
        for ins in self.inserted:
            name = ins.weight + ".bias_folded"
            if ins.bias is None and name not in graph.initializers:
                dtype = self._dtype_of.get(ins.weight, values[name].dtype)  # the conv's own type (float16 models)
                bias = ir.Value(name=name, const_value=ir.tensor(np.asarray(values[name], dtype=dtype), name=name))
                graph.register_initializer(bias)
                node = nodes[ins.node]
                node.resize_inputs(3)
                node.replace_input_with(2, bias)
                written += 1
        return written


class WriteBackPass(ir.passes.InPlacePass):
    """Write a trained OnnxModule's values back into the model it was built from (see
    :meth:`OnnxModule.write_back`); ``written`` counts the initializers written."""

    def __init__(self, module: OnnxModule):
        super().__init__()
        self.module = module
        self.written = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.written = self.module.write_back(model)
        return ir.passes.PassResult(model, self.written > 0)
