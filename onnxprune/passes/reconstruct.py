"""Calibrated channel removal: refit the layers that lose input channels, by least squares on real data.

Removing channels takes their contribution out of every layer that reads them. With calibration data that
loss can be mostly won back without training (He et al. 2017, "Channel Pruning for Accelerating Very Deep
Neural Networks"; Luo et al. 2017, ThiNet): for each such *consumer* layer, in graph order, find the weights
on its kept input channels (and its bias) that best reproduce its original output

    min over W', b'  || X'_kept W' + b' - Y ||^2  (+ a small ridge term)

where Y is the layer's output in the unmodified model and X' its input in the pruned model, so the error
that earlier layers leave behind is corrected too. The pruned model is evaluated without rewriting it: the
original graph with every consumer's removed input channels multiplied by 0 right before it (which computes
exactly what the shrunk graph computes) and the consumers' weights fed as inputs, so each refit is one run.

Conv (group 1, any dilation, explicit or no padding), Gemm and MatMul (2-D constant weight on the right)
consumers are refit; others keep their weights (named in the report).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxprune.analysis.channels import ChannelGraph
from onnxprune.analysis.graph import constant_array
from onnxprune.analysis.layers import Layer
from onnxprune.runtime.graph_io import with_outputs
from onnxprune.runtime.session import model_session
from onnxprune.tensors.weights import compute_dtype, get_weight, out_in_axes, set_weight

__all__ = ["NormalEquations", "ReconstructReport", "RefitPass", "bias_value", "layer_rows", "layer_targets",
           "reconstruct", "unsupported"]


class NormalEquations:
    """The sums behind min over W of || A W - Y ||^2, gathered batch by batch in float64: A the rows of a
    layer's input in the pruned model (layer_rows, a column of ones last when a bias is fit too), Y the
    layer's output in the original model (layer_targets). The channel refit solves it on the kept input
    columns; OBS (onnxprune.passes.data_aware) prunes its solution with ``gram`` as the Hessian."""

    def __init__(self):
        self.gram: np.ndarray | None = None  # A^T A
        self.cross: np.ndarray | None = None  # A^T Y
        self.y2 = 0.0  # sum of Y^2
        self.spread = 0.0  # sum of (Y - its batch mean)^2

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        a, y = a.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
        gram, cross = a.T @ a, a.T @ y
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.y2 += float((y ** 2).sum())
        self.spread += float(((y - y.mean(0)) ** 2).sum())

    def ridge(self, relative: float) -> float:
        """``relative`` times the mean of the Hessian's diagonal (SparseGPT's dampening)."""
        return relative * float(np.trace(self.gram)) / len(self.gram)

    def solve(self, relative_ridge: float, prior: np.ndarray | None = None) -> np.ndarray:
        """The least-squares W, (columns, outputs), with ``relative_ridge`` (see ridge) on the diagonal: its
        pull is towards ``prior`` (the layer's own weights), or towards 0 without one."""
        lam = self.ridge(relative_ridge)
        rhs = self.cross if prior is None else self.cross + lam * prior
        return np.linalg.solve(self.gram + lam * np.eye(len(self.gram)), rhs)

    def residual(self, w: np.ndarray) -> float:
        """|| A W - Y ||^2 on the data."""
        return max(float(np.trace(w.T @ self.gram @ w - 2 * w.T @ self.cross)) + self.y2, 0.0)

    def relative_error(self, w: np.ndarray) -> float:
        """|| A W - Y ||^2 over Y's spread about its (batch) mean: 0 exact, about 1 no better than a constant."""
        return self.residual(w) / max(self.spread, 1e-30)


@dataclass
class ReconstructReport:
    refit: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    error_before: dict[str, float] = field(default_factory=dict)  # relative output error, removal only
    error_after: dict[str, float] = field(default_factory=dict)  # after the refit
    samples: int = 0


def _kept_inputs(cg: ChannelGraph, remove: set[int]) -> dict[ir.Node, np.ndarray]:
    """Consumer node -> 0/1 mask of its input channels, for the layers that lose inputs."""
    out = {}
    for edit in cg.edits:
        if edit.kind != "weight_in":
            continue
        mask = np.array([cg.find(e) not in remove for e in edit.elems], np.float32)
        if mask.min() < 1:
            out[edit.node] = mask
    return out


def unsupported(layer: Layer, per_group: bool = False) -> str | None:
    """Why the layer's least-squares view (layer_rows) does not cover it, or None. ``per_group``: the view
    of onnxprune.passes.data_aware (Wanda and OBS are the unstructured cases of the same reconstruction),
    which also takes grouped convolutions and ConvTranspose, group by group; the channel refit does not."""
    node = layer.node
    if layer.op_type == "ConvTranspose" and per_group:
        nd = len(layer.weight_shape) - 2
        reach = [(k - 1) * d for k, d in zip(layer.weight_shape[2:], node.attributes.get_ints("dilations", [1] * nd))]
        pads = node.attributes.get_ints("pads", [0] * 2 * nd)
        if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET" or "output_shape" in node.attributes:
            return "ConvTranspose sized by auto_pad or output_shape"
        if any(p > reach[i % nd] for i, p in enumerate(pads)):
            return "ConvTranspose padded past its kernel"
    if layer.op_type == "Conv" or (layer.op_type == "ConvTranspose" and per_group):
        if node.attributes.get_int("group", 1) != 1 and not per_group:
            return "grouped convolution"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad"
        if len(layer.weight_shape) not in (3, 4, 5):
            return "not a 1-D, 2-D or 3-D convolution"
        return None
    if layer.op_type in ("Gemm", "MatMul") and layer.weight_input == 1 and len(layer.weight_shape) == 2:
        if layer.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "transposed input"
        return None
    return f"{layer.op_type} layers are not refit"


def layer_rows(x: np.ndarray, layer: Layer) -> np.ndarray:
    """Rows of the least-squares problem: im2col of a 1-D, 2-D or 3-D Conv input (columns in the weight's
    (C, k...) order; dilated kernels too), of a ConvTranspose input as the convolution it equals (its input
    spread out by the strides, the kernel flipped: see onnxprune.passes.data_aware), or the flattened
    features of a Gemm / MatMul input."""
    if layer.op_type not in ("Conv", "ConvTranspose"):
        return x.reshape(-1, x.shape[-1])
    node = layer.node
    kernel = tuple(layer.weight_shape[2:])
    nd = len(kernel)
    strides = node.attributes.get_ints("strides", [1] * nd)
    pads = node.attributes.get_ints("pads", [0] * 2 * nd)
    dilations = node.attributes.get_ints("dilations", [1] * nd)
    if layer.op_type == "ConvTranspose":  # zeros between the inputs, then a stride-1 convolution
        spread = np.zeros((*x.shape[:2], *((n - 1) * s + 1 for n, s in zip(x.shape[2:], strides))), x.dtype)
        spread[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = x
        extra = node.attributes.get_ints("output_padding", [0] * nd)
        reach = [(k - 1) * d for k, d in zip(kernel, dilations)]
        x, strides = spread, [1] * nd
        pads = [reach[i] - pads[i] for i in range(nd)] + [reach[i] - pads[i + nd] + extra[i] for i in range(nd)]
    x = np.pad(x, ((0, 0), (0, 0), *((pads[i], pads[i + nd]) for i in range(nd))))
    spatial = tuple(range(2, 2 + nd))
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))  # the dilated kernel's extent
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=spatial)
    win = win[(slice(None), slice(None), *(slice(None, None, s) for s in strides),
               *(slice(None, None, d) for d in dilations))]
    n, c, outs = win.shape[0], win.shape[1], win.shape[2:2 + nd]
    order = (0, *spatial, 1, *range(2 + nd, 2 + 2 * nd))  # (n, out positions..., c, kernel...)
    return np.ascontiguousarray(win.transpose(order)).reshape(n * int(np.prod(outs)), c * int(np.prod(kernel)))


def layer_targets(y: np.ndarray, layer: Layer) -> np.ndarray:
    """The layer's output as rows matching layer_rows' (one column per output channel)."""
    if layer.op_type in ("Conv", "ConvTranspose"):
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _matrix(w: np.ndarray, layer: Layer) -> np.ndarray:
    """(inputs, outputs) matrix of a weight, rows in the order of layer_rows' columns."""
    if layer.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    out_axis, _ = out_in_axes(layer)
    return w.T if out_axis == 0 else w


def _unmatrix(m: np.ndarray, layer: Layer, shape: tuple) -> np.ndarray:
    if layer.op_type == "Conv":
        return m.T.reshape(shape)
    out_axis, _ = out_in_axes(layer)
    return (m.T if out_axis == 0 else m).reshape(shape)


def bias_value(layer: Layer) -> ir.Value | None:
    """The constant added to the layer's raw output that the refit may change: a Conv's, ConvTranspose's or
    Gemm's bias input (MatMul: None, its bias Add stays and the refit targets the raw product)."""
    node = layer.node
    if layer.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        v = node.inputs[2]
        if v.const_value is not None and len(v.shape or ()) == 1:
            return v
    return None


class RefitPass(ir.passes.InPlacePass):
    """Refit the layers that lose input channels when the classes ``remove`` of ``cg`` go (see
    :func:`reconstruct`); runs before ShrinkChannelsPass, which then keeps the refit values. ``report``
    says what was refit, what was skipped and why, and the output errors before and after."""

    def __init__(self, cg: ChannelGraph, remove: set[int], batches: list[dict[str, np.ndarray]],
                 provider: str = "cpu", progress: Callable[[int, int], None] | None = None):
        super().__init__()
        self.cg, self.remove, self.batches, self.provider, self.progress = cg, remove, batches, provider, progress
        self.report = ReconstructReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = reconstruct(model, self.cg, self.remove, self.batches, provider=self.provider,
                                  progress=self.progress)
        return ir.passes.PassResult(model, bool(self.report.refit))


def reconstruct(model: ir.Model, cg: ChannelGraph, remove: set[int], batches: list[dict[str, np.ndarray]],
                provider: str = "cpu", ridge: float = 1e-3,
                progress: Callable[[int, int], None] | None = None) -> ReconstructReport:
    """Refit, in place, the weights (and biases) of the layers of ``model`` that lose input channels when the
    classes ``remove`` go, so that their outputs on ``batches`` stay as close as possible to the original.
    Call before shrinking: the shrink then keeps the refit values of the kept channels."""
    report = ReconstructReport(samples=sum(len(next(iter(b.values()))) for b in batches))
    consumers = _kept_inputs(cg, remove)
    layers = {layer.node: layer for layer in cg.layers.values()}
    order = {node: i for i, node in enumerate(model.graph)}
    todo = []
    for node in sorted(consumers, key=order.get):
        layer = layers[node]
        why = unsupported(layer)
        if why:
            report.skipped[layer.name] = why
        else:
            todo.append(layer)
    if not todo or not batches:
        return report
    outputs, elem = [layer.node.outputs[0].name for layer in todo], compute_dtype(todo[0])
    feeds_of: dict = {}

    def masked(proto: onnx.ModelProto) -> onnx.ModelProto:
        edited, found = _masked(proto, consumers, todo, layers)
        feeds_of.update(found)
        return edited

    # external weights stay in their files (model_session): a model over 2 GB is refit too
    ref_sess = model_session(model, provider, edit=lambda proto: with_outputs(
        proto, outputs, helper.np_dtype_to_tensor_dtype(elem)))
    sess = model_session(model, provider, edit=masked)
    stored = {layer.name: np.asarray(get_weight(layer)).dtype for layer in todo}  # written back in it
    dtypes = {layer.name: compute_dtype(layer) for layer in todo}  # fed in it (float16 models: float16)
    weights = {layer.name: np.array(get_weight(layer), np.float32) for layer in todo}
    biases = {layer.name: (np.array(constant_array(b), np.float32) if (b := bias_value(layer)) is not None
                           else None) for layer in todo}
    for k, layer in enumerate(todo):
        x_name = feeds_of[layer.name][0]
        mask = consumers[layer.node]
        kept = np.flatnonzero(mask)
        w = weights[layer.name]
        wm = _matrix(w, layer)  # (inputs * kernel, outputs)
        per_in = wm.shape[0] // len(mask)
        rows = (kept[:, None] * per_in + np.arange(per_in)).reshape(-1)
        has_bias = biases[layer.name] is not None
        equations = NormalEquations()
        for feeds in batches:
            y = layer_targets(ref_sess.run(feeds, [layer.node.outputs[0].name])[0], layer)
            x = sess.run({**feeds, **_weight_feeds(weights, biases, feeds_of, dtypes)}, [x_name])[0]
            a = layer_rows(x, layer)[:, rows]
            equations.add(np.hstack([a, np.ones((len(a), 1), a.dtype)]) if has_bias else a, y)
        before = wm[rows].astype(np.float64)
        if has_bias:
            before = np.vstack([before, biases[layer.name][None, :]])
        sol = equations.solve(ridge)
        new = np.zeros_like(wm, dtype=np.float64)
        new[rows] = sol[:len(rows)]
        weights[layer.name] = _unmatrix(new, layer, w.shape).astype(np.float32)
        if has_bias:
            biases[layer.name] = sol[-1].astype(np.float32)
        report.error_before[layer.name] = equations.relative_error(before)
        report.error_after[layer.name] = equations.relative_error(sol)
        report.refit.append(layer.name)
        if progress:
            progress(k + 1, len(todo))
    for layer in todo:
        set_weight(layer, weights[layer.name].astype(stored[layer.name]))
        b = bias_value(layer)
        if b is not None:
            b.const_value = ir.tensor(biases[layer.name].astype(constant_array(b).dtype), name=b.name)
    return report


def _weight_feeds(weights: dict, biases: dict, feeds_of: dict, dtypes: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, (_, w_name, b_name) in feeds_of.items():
        out[w_name] = weights[name].astype(dtypes[name], copy=False)
        if b_name is not None:
            out[b_name] = biases[name].astype(dtypes[name], copy=False)
    return out


def _masked(proto: onnx.ModelProto, consumers: dict, todo: list[Layer], layers: dict
            ) -> tuple[onnx.ModelProto, dict[str, tuple[str, str, str | None]]]:
    """The original graph computing what the pruned one does: each consumer reads its data input times the
    0/1 mask of its kept input channels; the refit layers' weights and biases are graph inputs. Returns the
    model and, per refit layer, (masked input name, weight input name, bias input name or None)."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    nodes = list(p.graph.node)
    new_nodes = []
    feeds_of = {}
    refit = {layer.node.name: layer for layer in todo}
    by_name = {node.name: node for node in consumers}
    for n in nodes:
        layer_node = by_name.get(n.name)
        if layer_node is not None:
            layer = layers[layer_node]
            mask = consumers[layer_node]
            data_index = 0 if layer.op_type.startswith("Conv") or layer.weight_input == 1 else 1
            x = n.input[data_index]
            # channels on axis 1 of a convolution's input (of its weight's rank), else on the last axis
            m = (mask.reshape(1, -1, *[1] * (len(layer.weight_shape) - 2)) if layer.op_type.startswith("Conv")
                 else mask)
            mname, out = f"{n.name}__inmask", f"{x}__masked_for_{n.name}"
            dtype = compute_dtype(layer)  # the activations' type: float16 models stay float16
            elem = helper.np_dtype_to_tensor_dtype(dtype)
            p.graph.initializer.append(numpy_helper.from_array(m.astype(dtype), mname))
            new_nodes.append(helper.make_node("Mul", [x, mname], [out], name=f"{n.name}__mask"))
            n.input[data_index] = out
            if n.name in refit:
                w_name = f"{n.name}__refit_w"
                n.input[layer.weight_input] = w_name
                p.graph.input.append(helper.make_tensor_value_info(w_name, elem, list(layer.weight_shape)))
                b_name = None
                if bias_value(layer) is not None:
                    b_name = f"{n.name}__refit_b"
                    n.input[2] = b_name
                    outputs = layer.weight_shape[out_in_axes(layer)[0]]
                    p.graph.input.append(helper.make_tensor_value_info(b_name, elem, [outputs]))
                feeds_of[layer.name] = (out, w_name, b_name)
                p.graph.output.append(helper.make_tensor_value_info(out, elem, None))
        new_nodes.append(n)
    del p.graph.node[:]
    p.graph.node.extend(new_nodes)
    return p, feeds_of
