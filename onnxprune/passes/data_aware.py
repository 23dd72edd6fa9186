"""Data-aware weight pruning inside each layer: Wanda and OBS (SparseGPT), unstructured or N:M.

The per-layer counts come from a plan, as for magnitude pruning; what changes is which weights go and what
happens to the others, decided from the layer's real inputs X on calibration data:

- ``wanda`` (Sun et al. 2023): a weight's score is |w| times the norm of the input feature it multiplies
  (sqrt of the diagonal of X^T X); the lowest scores go: per output row of a Gemm / MatMul (each row its
  share of the layer's zeros, as the paper does for linear layers), over the whole layer for a convolution
  (measured better on ResNet-56: 40.2 against 31.8 % JPEG top-1 at 70 %), or the N lowest of every M (N:M).
  Survivors unchanged.
- ``obs`` (SparseGPT, Frantar & Alistarh 2023; Optimal Brain Compression): the layer's least-squares
  problem of onnxprune.passes.reconstruct (its input in the pruned model, its output in the original one,
  its bias a column of ones) is solved, its ridge (``damp`` x the mean diagonal of H = X^T X) pulling
  towards the layer's own weights, not towards 0 (a pull to 0 shrank an LLM's weights on features of small
  variance: 70.45 against 70.07 held-out perplexity at 50 %), and the solution pruned with H, dampened
  alike, in blocks of ``block`` inputs: each block takes its share of the layer's zeros, the weights
  of least w^2 / [H^-1]_jj^2 over all output rows (as SparseGPT does: rows may differ), and every pruned
  weight's error is spread over the inputs not yet visited (and the bias) through the inverse Hessian.
  Reproducing the original output rather than the layer's own output on its pruned input corrects what
  the earlier layers changed too: ResNet-56 at 70 % (LAMP), 91.2 against 87.8 % lossless top-1.

Layers are processed in graph order on the inputs the already-pruned model gives them, so each layer
compensates what the earlier ones changed. The model is cut at the layers (onnxprune.runtime.segments) and
the values crossing each cut carried forward, so the whole pass costs about one run of the model over the
data (two for obs: the original model's run gives the targets). A convolution is its im2col view (the
refit's), its columns ordered (kernel position, channel) so that N:M groups of consecutive channels are
consecutive columns. Accumulation in float64; results are the same on one machine for the same data and
options, and differ across CPUs by round-off only.

Grouped convolutions (depthwise too) are one problem per group; dilated ones are their dilated im2col; a
ConvTranspose is the convolution it equals (input spread out by the strides, kernel flipped). Layers the
view does not cover (MatMulNBits, recurrent weights, layers in subgraphs) fall back to magnitude, named in
the report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import constant_array
from onnxprune.analysis.layers import Layer
from onnxprune.io import session_proto
from onnxprune.passes.reconstruct import NormalEquations, bias_value, layer_rows, layer_targets, unsupported
from onnxprune.passes.sparsify import SparsifyReport
from onnxprune.runtime.graph_io import weights_as_inputs
from onnxprune.runtime.segments import Segments
from onnxprune.tensors.masks import magnitude_mask, nm_mask
from onnxprune.tensors.weights import compute_dtype, get_weight, out_in_axes, release_weight, set_weight

__all__ = ["CALIBRATION_SAMPLES", "CRITERIA", "DEFAULT_BLOCK", "DEFAULT_DAMP", "DataAwareSparsifyPass"]

CRITERIA = ("wanda", "obs")
DEFAULT_DAMP = 0.01  # these three chosen on ResNet-56 (BENCHMARKS.md, data-aware)
DEFAULT_BLOCK = 128
CALIBRATION_SAMPLES = 128  # read from the data when no limit is given


class DataAwareSparsifyPass(ir.passes.InPlacePass):
    """Like SparsifyPass (``targets``: layer -> zeros; ``nm``: the N:M pattern instead), choosing by
    ``criterion`` (wanda | obs) on ``batches`` of calibration feeds. ``report.error`` holds, for obs, each
    layer's output error on the data after pruning (relative to its variance)."""

    def __init__(self, layers: list[Layer], targets: dict[str, int], criterion: str, batches: list[dict],
                 nm: tuple[int, int] | None = None, provider: str = "cpu", damp: float = DEFAULT_DAMP,
                 block: int = DEFAULT_BLOCK, progress: Callable[[int, int], None] | None = None):
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.layers = [layer for layer in layers if layer.name in targets]
        self.targets, self.criterion, self.batches, self.nm = targets, criterion, batches, nm
        self.provider, self.damp, self.block, self.progress = provider, damp, block, progress
        self.report = SparsifyReport()
        self.fallback: dict[str, str] = {}  # layer -> why it was pruned by magnitude instead
        self.error: dict[str, float] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        index = {node: i for i, node in enumerate(model.graph)}
        todo, rest = [], []
        for layer in self.layers:
            why = None if layer.node in index else "inside a subgraph"
            why = why or unsupported(layer, per_group=True)
            (rest if why else todo).append(layer)
            if why:
                self.fallback[layer.name] = why
        if not self.batches:
            rest, todo = rest + todo, []
            self.fallback.update({layer.name: "no calibration data" for layer in self.layers})
        todo.sort(key=lambda layer: index[layer.node])
        if todo:
            self._sequential(model, todo, index)
        for layer in rest:  # magnitude, like SparsifyPass
            w = np.asarray(get_weight(layer))
            self.report.sizes[layer.name] = int(w.size)
            mask = _magnitude(w, layer, self.targets[layer.name], self.nm)
            if mask is None:
                self.report.skipped[layer.name] = f"input dimension is not a multiple of {self.nm[1]}"
                self.report.zeros[layer.name] = 0
                continue
            set_weight(layer, np.where(mask, w, 0).astype(w.dtype))
            self.report.zeros[layer.name] = int(mask.size - np.count_nonzero(mask))
        return ir.passes.PassResult(model, bool(self.layers))

    def _sequential(self, model: ir.Model, todo: list[Layer], index: dict) -> None:
        """Prune ``todo`` (top-level layers in graph order) one after another on the carried activations.
        Weights are read when their layer's segment runs and pruned ones kept on disk until the model is
        written, so a big model's pass holds about one layer's weight in memory."""
        obs = self.criterion == "obs"
        layer_of = {layer.weight: layer for layer in todo}
        dtypes = {layer.weight: compute_dtype(layer) for layer in todo}
        bias_of = {layer.name: b for layer in todo if obs and (b := bias_value(layer)) is not None}  # obs refits
        original_biases = {b.name: np.array(constant_array(b), np.float32) for b in bias_of.values()}
        dtypes.update({b.name: dtypes[layer.weight] for layer in todo if (b := bias_of.get(layer.name))})
        stored = {layer.weight: np.asarray(get_weight(layer)).dtype for layer in todo}  # written back in it
        refit_biases: dict[str, np.ndarray] = {}
        fed_names = [*layer_of, *original_biases]
        proto = weights_as_inputs(session_proto(model, leave_out=fed_names), fed_names)
        cuts = [index[layer.node] + k for layer in todo for k in (0, 1)]
        segments = Segments(proto, cuts, self.provider, fed=fed_names,
                            keep=[layer.node.outputs[0].name for layer in todo] if obs else ())
        del proto
        spilled = _Spilled()

        def dense_value(name: str) -> np.ndarray:
            value = original_biases[name] if name in original_biases else get_weight(layer_of[name])
            return np.asarray(value).astype(dtypes[name], copy=False)

        def pruned_value(name: str) -> np.ndarray:
            if name in refit_biases:
                return refit_biases[name].astype(dtypes[name], copy=False)
            return spilled.get(name).astype(dtypes[name], copy=False) if name in spilled else dense_value(name)

        dense_fed, fed = _Feeds(dense_value), _Feeds(pruned_value)
        pruned = [dict(b) for b in self.batches]
        dense = [dict(b) for b in self.batches] if obs else []
        seg = 0
        for k, layer in enumerate(todo):
            while segments.starts[seg] < index[layer.node]:  # up to the layer
                pruned = [segments.run(seg, state, fed) for state in pruned]
                dense = [segments.run(seg, state, dense_fed) for state in dense]
                seg += 1
            x_name = _data_input(layer).name
            w = np.asarray(get_weight(layer), np.float32)
            if obs:
                dense = [segments.run(seg, state, dense_fed) for state in dense]
                b = bias_of.get(layer.name)
                new_w, new_b = self._obs(layer, w, None if b is None else original_biases[b.name],
                                         [state[x_name] for state in pruned],
                                         [state[layer.node.outputs[0].name] for state in dense])
                if new_b is not None:
                    refit_biases[b.name] = new_b
            else:
                new_w = self._wanda(layer, w, [state[x_name] for state in pruned])
            del w
            spilled.put(layer.weight, new_w)
            self.report.sizes[layer.name] = int(new_w.size)
            self.report.zeros[layer.name] = int(new_w.size - np.count_nonzero(new_w))
            del new_w
            pruned = [segments.run(seg, state, fed) for state in pruned]  # through the pruned layer
            seg += 1
            release_weight(layer)
            if self.progress:
                self.progress(k + 1, len(todo))
        for layer in todo:
            set_weight(layer, spilled.tensor(layer.weight, stored[layer.weight], layer.weight_shape))
            b = bias_of.get(layer.name)
            if b is not None and b.name in refit_biases:
                b.const_value = ir.tensor(refit_biases[b.name].astype(constant_array(b).dtype), name=b.name)

    def _fits_pattern(self, layer: Layer, columns: int) -> bool:
        if self.nm is not None and columns % self.nm[1]:
            self.report.skipped[layer.name] = f"input dimension is not a multiple of {self.nm[1]}"
            return False
        return True

    def _wanda(self, layer: Layer, w: np.ndarray, inputs: list[np.ndarray]) -> np.ndarray:
        mat, back = _rows(layer, w)  # (outputs, columns), and the way back to the weight's layout
        if not self._fits_pattern(layer, mat.shape[1]):
            return w
        groups = _groups(layer)
        squares = np.zeros_like(mat)  # each row: the squared norms of the inputs it multiplies
        for x, _ in _pieces(layer, inputs):
            for out, channels in groups:
                squares[out] += np.square(_columns(x, layer, channels)).sum(0)
        per_row = layer.op_type not in CONVOLUTIONS
        return back(_wanda(mat, squares, self.targets[layer.name], self.nm, per_row=per_row))

    def _obs(self, layer: Layer, w: np.ndarray, bias: np.ndarray | None, inputs: list[np.ndarray],
             outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's weight (and bias) pruned by OBS against the original model's outputs (a grouped
        convolution group by group: each group's outputs read only its inputs)."""
        mat, back = _rows(layer, w)
        if not self._fits_pattern(layer, mat.shape[1]):
            return w, None
        has_bias = bias is not None
        groups = _groups(layer)
        systems = [NormalEquations() for _ in groups]
        for x, y in _pieces(layer, inputs, outputs):
            targets = layer_targets(np.asarray(y), layer)  # once per piece, sliced per group
            for equations, (out, channels) in zip(systems, groups):
                a = _columns(x, layer, channels)
                equations.add(np.hstack([a, np.ones((len(a), 1), a.dtype)]) if has_bias else a, targets[:, out])
        own = np.hstack([mat, bias[:, None]]) if has_bias else mat  # the ridge pulls towards these, not 0
        start = np.stack([e.solve(self.damp, prior=own[out].T).T for e, (out, _) in zip(systems, groups)])
        pruned = _obs(start, np.stack([e.gram for e in systems]), self.targets[layer.name], self.nm, self.damp,
                      self.block, free=int(has_bias))
        self.error[layer.name] = sum(e.residual(p.T) for e, p in zip(systems, pruned)) / max(
            sum(e.spread for e in systems), 1e-30)
        new, new_bias = np.empty_like(mat), np.empty(len(mat), np.float32) if has_bias else None
        for (out, _), p in zip(groups, pruned):
            new[out] = p[:, :mat.shape[1]]
            if has_bias:
                new_bias[out] = p[:, -1]
        return back(new), new_bias


class _Feeds:
    """Weights fed at run time, read only when a segment asks for them (see Segments.run)."""

    def __init__(self, read: Callable[[str], np.ndarray]):
        self._read = read

    def __getitem__(self, name: str) -> np.ndarray:
        return self._read(name)


class _Spilled:
    """Pruned weights written to a temporary folder as they are made and read back one at a time (``get``,
    or ``tensor``: computed when the model is written); the folder goes with the last tensor made from it."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="onnxprune-pruned-")
        self._paths: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._paths

    def put(self, name: str, array: np.ndarray) -> None:
        path = os.path.join(self._folder.name, f"{len(self._paths)}.npy")
        np.save(path, array)
        self._paths[name] = path

    def get(self, name: str) -> np.ndarray:
        return np.load(self._paths[name])

    def tensor(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> ir.LazyTensor:
        folder, path = self._folder, self._paths[name]

        def compute() -> ir.Tensor:
            assert folder is not None  # the closure keeps the folder until the tensor is written
            return ir.tensor(np.load(path).astype(dtype), name=name)

        return ir.LazyTensor(compute, dtype=ir.DataType.from_numpy(np.dtype(dtype)), shape=ir.Shape(shape),
                             name=name)


CONVOLUTIONS = ("Conv", "ConvTranspose")


def _data_input(layer: Layer) -> ir.Value:
    node = layer.node
    return node.inputs[0] if layer.op_type in CONVOLUTIONS or layer.weight_input == 1 else node.inputs[1]


def _conv_shape(layer: Layer) -> tuple[int, int, int]:
    """(groups, outputs per group, inputs per group) of a Conv or ConvTranspose (weights (O, C/g, k...) and
    (C, O/g, k...))."""
    groups = layer.node.attributes.get_int("group", 1)
    a, b = layer.weight_shape[:2]
    return (groups, a // groups, b) if layer.op_type == "Conv" else (groups, b, a // groups)


def _groups(layer: Layer) -> list[tuple[slice, slice | None]]:
    """(output rows, input channels) of each group of a grouped convolution; one (all, all) otherwise."""
    if layer.op_type not in CONVOLUTIONS or _conv_shape(layer)[0] == 1:
        return [(slice(None), None)]
    count, outs, ins = _conv_shape(layer)
    return [(slice(g * outs, (g + 1) * outs), slice(g * ins, (g + 1) * ins)) for g in range(count)]


PIECE_ELEMENTS = 1 << 24  # rows x columns of the layer's problem handled at once (128 MiB in float64)


def _pieces(layer: Layer, inputs: list[np.ndarray], outputs: list[np.ndarray] | None = None):
    """(input, output or None) of every calibration batch, cut along the samples so that a piece's rows
    (im2col of a convolution: about its input's size times the kernel's) stay under PIECE_ELEMENTS."""
    kernel = int(np.prod(layer.weight_shape[2:])) if layer.op_type in CONVOLUTIONS else 1
    if layer.op_type == "ConvTranspose":  # its output has the strides' product more positions
        kernel *= int(np.prod(layer.node.attributes.get_ints("strides", [1])))
    for k, x in enumerate(inputs):
        y = outputs[k] if outputs is not None else None
        per_sample = max(int(np.prod(x.shape[1:])) * kernel, 1)
        step = max(PIECE_ELEMENTS // per_sample, 1) if layer.op_type in CONVOLUTIONS or x.ndim > 2 else len(x)
        for i in range(0, len(x), step):
            yield x[i:i + step], None if y is None else y[i:i + step]


def _columns(x: np.ndarray, layer: Layer, channels: slice | None = None) -> np.ndarray:
    """The rows of the layer's least-squares problem (layer_rows; a convolution's input ``channels`` only),
    columns in _rows' order, in float64."""
    x = np.asarray(x, np.float32)
    a = layer_rows(x if channels is None else x[:, channels], layer).astype(np.float64)
    if layer.op_type in CONVOLUTIONS:  # im2col's (channel, kernel...) columns to (kernel..., channel)
        c, k = _conv_shape(layer)[2], int(np.prod(layer.weight_shape[2:]))
        a = a[:, np.arange(c * k).reshape(c, k).T.reshape(-1)]
    return a


def _rows(layer: Layer, w: np.ndarray):
    """(outputs, columns) view of the weight (a Conv's columns (kernel..., channel); a ConvTranspose as the
    convolution it equals) and the inverse."""
    if layer.op_type == "ConvTranspose":
        groups, outs, ins = _conv_shape(layer)
        mat, back = _conv_rows(_transposed_as_conv(w, groups, outs, ins))
        return mat, lambda m: _conv_as_transposed(back(m), groups, outs, ins)
    if layer.op_type == "Conv":
        return _conv_rows(w)
    out_axis, _ = out_in_axes(layer)
    mat = w if out_axis == 0 else w.T
    return mat.astype(np.float64), lambda m: (m if out_axis == 0 else m.T).astype(np.float32)


def _conv_rows(w: np.ndarray):
    moved = np.moveaxis(w, 1, -1)  # (out, k..., c)
    mat = moved.reshape(w.shape[0], -1)
    return mat.astype(np.float64), lambda m: np.moveaxis(m.reshape(moved.shape), -1, 1).astype(np.float32)


def _transposed_as_conv(w: np.ndarray, groups: int, outs: int, ins: int) -> np.ndarray:
    """A ConvTranspose weight (groups x ins, outs, k...) as the Conv weight (groups x outs, ins, k...) that
    computes the same on the input spread out by the strides: each group's axes swapped, the kernel flipped."""
    kernel = w.shape[2:]
    t = np.flip(w.reshape(groups, ins, outs, *kernel), axis=tuple(range(3, 3 + len(kernel))))
    return np.ascontiguousarray(t.swapaxes(1, 2)).reshape(groups * outs, ins, *kernel)


def _conv_as_transposed(w: np.ndarray, groups: int, outs: int, ins: int) -> np.ndarray:
    """The inverse of _transposed_as_conv."""
    kernel = w.shape[2:]
    t = np.flip(w.reshape(groups, outs, ins, *kernel), axis=tuple(range(3, 3 + len(kernel))))
    return np.ascontiguousarray(t.swapaxes(1, 2)).reshape(groups * ins, outs, *kernel)


def _row_counts(zeros: int, rows: int, cols: int) -> np.ndarray:
    """Zeros per output row: an equal share, the remainder one more on the first rows."""
    base, extra = divmod(min(zeros, rows * cols), rows)
    return np.full(rows, base) + (np.arange(rows) < extra)


def _lowest(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Boolean mask (True: pruned) of the ``counts[r]`` lowest scores of each row (ties by position)."""
    order = np.argsort(scores, axis=1, kind="stable")
    pruned = np.zeros(scores.shape, bool)
    for r, k in enumerate(counts):
        pruned[r, order[r, :k]] = True
    return pruned


def _lowest_in_groups(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean mask (True: pruned) of the m - n lowest scores in each group of m consecutive columns."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    pruned = np.zeros(groups.shape, bool)
    np.put_along_axis(pruned, order[..., : m - n], True, axis=-1)
    return pruned.reshape(rows, cols)


def _wanda(mat: np.ndarray, squares: np.ndarray, zeros: int, nm, per_row: bool) -> np.ndarray:
    """Wanda on an (outputs, columns) matrix, ``squares`` the sum over the data of each input squared (per
    column, or per output and column: a grouped convolution's rows read different inputs)."""
    scores = np.abs(mat) * np.sqrt(np.maximum(squares, 0.0))  # squares: (columns,) or one row per output
    if nm is not None:
        pruned = _lowest_in_groups(scores, *nm)
    elif per_row:
        pruned = _lowest(scores, _row_counts(zeros, *mat.shape))
    else:
        pruned = ~magnitude_mask(scores, zeros)
    return np.where(pruned, 0.0, mat)


def _obs(mat: np.ndarray, gram: np.ndarray, zeros: int, nm, damp: float, block: int, free: int = 0) -> np.ndarray:
    """SparseGPT's pass over the columns (the inputs), all rows at once. ``mat`` (rows, columns) with its
    ``gram`` (columns, columns), or a stack of independent problems (groups, rows, columns) with one gram
    each (a grouped convolution): their zeros are chosen together, by the same saliency w^2 / [H^-1]_jj^2
    (each one's increase of the squared output error). The last ``free`` columns (a bias's column of ones)
    are never pruned; they only take their share of the compensation."""
    if mat.ndim == 2:
        return _obs(mat[None], gram[None], zeros, nm, damp, block, free)[0]
    w = mat.copy()
    groups, rows, cols = w.shape
    prunable = cols - free
    zeros = min(zeros, groups * rows * prunable)
    h = gram.copy()
    eye = np.eye(cols)
    for g in range(groups):
        dead = np.diag(h[g]) == 0  # inputs that are always 0: their weights go first, nothing to compensate
        h[g][dead, dead] = 1.0
        h[g] += damp * float(np.mean(np.diag(h[g]))) * eye
    hinv = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # upper Cholesky factors of H^-1
    m = nm[1] if nm else 1
    block = max(block - block % m, m)
    done = 0  # zeros made so far (unstructured)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, :, i1:i2].copy(), hinv[:, i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        d = np.diagonal(hinv1, axis1=1, axis2=2)[:, None, :]  # (groups, 1, block)
        pruned1 = np.zeros(w1.shape, bool)
        last = min(i2, prunable) - i1  # prunable columns in this block
        if nm is None and last > 0:  # the block's share of the zeros, the lowest w^2 / d^2 over its rows
            share = min(max(round(zeros * (i1 + last) / prunable) - done, 0), groups * rows * last)
            pruned1[..., :last] = ~magnitude_mask(w1[..., :last] ** 2 / d[..., :last] ** 2, share)
            done += share
        for i in range(i2 - i1):
            if nm is not None and i < last and i % m == 0:  # the group starting here, on the updated weights
                span = slice(i, i + m)
                saliency = (w1[..., span] ** 2 / d[..., span] ** 2).reshape(groups * rows, m)
                pruned1[..., span] = _lowest_in_groups(saliency, *nm).reshape(groups, rows, m)
            col = w1[..., i]
            q = np.where(pruned1[..., i], 0.0, col)
            e = (col - q) / d[..., i]
            w1[..., i:] -= e[..., None] * hinv1[:, None, i, i:]
            w1[..., i] = q
            err1[..., i] = e
        w[..., i1:i2] = w1
        w[..., i2:] -= err1 @ hinv[:, i1:i2, i2:]
    return w


def _magnitude(w: np.ndarray, layer: Layer, zeros: int, nm) -> np.ndarray | None:
    if nm is None:
        return magnitude_mask(w, zeros)
    return nm_mask(w, *nm, out_in_axes(layer)[1])
