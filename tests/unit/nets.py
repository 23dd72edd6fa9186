"""Small hand-built ONNX graphs for the unit tests (no torch), and the few helpers every unit test file uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxprune.analysis.model import AnalysedModel
from onnxprune.runtime.session import create_session
from onnxprune.verbs.loading import open_model
from tests.graphs import make_model, tensor, weights

CLASSES = 5


def conv(name: str, x: str, y: str, w: str, b: str | None = None, pads: int = 1) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, pads=[pads] * 4)


def relu(x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Relu", [x], [y])


def head(x: str, features: int, seed: int = 50) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """GlobalAveragePool -> Flatten -> Gemm "fc" to ``logits`` (N, CLASSES)."""
    nodes = [helper.make_node("GlobalAveragePool", [x], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1)]
    return nodes, [weights("wf", CLASSES, features, seed=seed), weights("bf", CLASSES, seed=seed + 1)]


def conv_chain(channels: tuple[int, ...] = (8, 6), with_head: bool = True) -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> (Conv c{i} with bias -> Relu) for each of ``channels`` [-> head fc]; value names
    h{i} (conv output) and r{i} (after the Relu)."""
    nodes, inits, x, cin = [], [], "x", 3
    for i, cout in enumerate(channels, 1):
        nodes += [conv(f"c{i}", x, f"h{i}", f"w{i}", f"b{i}"), relu(f"h{i}", f"r{i}")]
        inits += [weights(f"w{i}", cout, cin, 3, 3, seed=2 * i - 1), weights(f"b{i}", cout, seed=2 * i)]
        x, cin = f"r{i}", cout
    if not with_head:
        return make_model(nodes, [tensor("x", "N", 3, 8, 8)], [tensor(x, "N", cin, 8, 8)], inits)
    hn, hi = head(x, cin)
    return make_model(nodes + hn, [tensor("x", "N", 3, 8, 8)], [tensor("logits", "N", CLASSES)], inits + hi)


def mlp(widths: tuple[int, ...], scales: tuple[float, ...] | None = None) -> onnx.ModelProto:
    """x (N, widths[0]) -> MatMul l0 -> Relu -> MatMul l1 -> ... -> (N, widths[-1]); layer i's weight
    (widths[i], widths[i + 1]) drawn with scale ``scales[i]``."""
    scales = scales or (1.0,) * (len(widths) - 1)
    nodes, inits, x = [], [], "x"
    for i in range(len(widths) - 1):
        out = "logits" if i == len(widths) - 2 else f"a{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"l{i}"))
        inits.append(weights(f"w{i}", widths[i], widths[i + 1], seed=30 + i, scale=scales[i]))
        if out != "logits":
            nodes.append(relu(out, f"r{i}"))
            x = f"r{i}"
    return make_model(nodes, [tensor("x", "N", widths[0])], [tensor("logits", "N", widths[-1])], inits)


def gemm_chain(features: int = 16, hidden: int = 12) -> onnx.ModelProto:
    """x (N, features) -> Gemm g1 (transB, weight (hidden, features)) -> Relu -> MatMul m2 (weight (hidden,
    CLASSES)) -> logits."""
    nodes = [helper.make_node("Gemm", ["x", "wg", "bg"], ["h"], name="g1", transB=1), relu("h", "r"),
             helper.make_node("MatMul", ["r", "wm"], ["logits"], name="m2")]
    inits = [weights("wg", hidden, features, seed=7), weights("bg", hidden, seed=8),
             weights("wm", hidden, CLASSES, seed=9)]
    return make_model(nodes, [tensor("x", "N", features)], [tensor("logits", "N", CLASSES)], inits)


def residual_block(i: int, x: str, channels: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """x -> Conv -> Relu -> Conv -> Add(x, branch) named ``add{i}``, output ``y{i}``."""
    nodes = [conv(f"r{i}a", x, f"a{i}", f"wa{i}"), relu(f"a{i}", f"ra{i}"), conv(f"r{i}b", f"ra{i}", f"b{i}", f"wb{i}"),
             helper.make_node("Add", [x, f"b{i}"], [f"y{i}"], name=f"add{i}")]
    return nodes, [weights(f"w{k}{i}", channels, channels, 3, 3, seed=10 * i + j, scale=0.3)
                   for j, k in enumerate("ab")]


def residual(blocks: int = 2, channels: int = 4, with_head: bool = True) -> onnx.ModelProto:
    """x (N, channels, 6, 6) -> ``blocks`` identity residual blocks [-> head fc]."""
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        n, w = residual_block(i, x, channels)
        nodes, inits, x = nodes + n, inits + w, f"y{i}"
    outputs = [tensor(x, "N", channels, 6, 6)]
    if with_head:
        hn, hi = head(x, channels)
        nodes, inits, outputs = nodes + hn, inits + hi, [tensor("logits", "N", CLASSES)]
    return make_model(nodes, [tensor("x", "N", channels, 6, 6)], outputs, inits)


def analysed(proto: onnx.ModelProto) -> AnalysedModel:
    """The proto as the verbs see it: an ir.Model with named nodes, wrapped."""
    return open_model(ir.serde.deserialize_model(proto))


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list:
    """The model's outputs on ``feeds`` with ONNX Runtime on the CPU."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return create_session(proto.SerializeToString(), "cpu").session.run(outputs, feeds)


def sample(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_npz(path: Path, *shape, seed: int = 0, labelled: bool = True) -> Path:
    """Random inputs ``x`` of ``shape`` (and random labels ``y``) as an .npz."""
    arrays = {"x": sample(*shape, seed=seed)}
    if labelled:
        arrays["y"] = np.random.default_rng(seed + 1).integers(0, CLASSES, shape[0]).astype(np.int64)
    np.savez(path, **arrays)
    return path


def stable_mask(w: np.ndarray, zeros: int) -> np.ndarray:
    """Oracle: 0 at the first ``zeros`` positions of a stable argsort of |w| (ties by position), else 1."""
    keep = np.ones(w.size, bool)
    keep[np.argsort(np.abs(w).reshape(-1), kind="stable")[:max(zeros, 0)]] = False
    return keep.reshape(w.shape)


def layer(am: AnalysedModel, name: str):
    return next(layer for layer in am.layers if layer.name == name)


def with_weights(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers named in ``arrays`` hold those values instead."""
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    for t in q.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(np.asarray(arrays[t.name], np.float32), t.name))
    return q


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def assert_n_of_m(keep: np.ndarray, magnitudes: np.ndarray, axis: int, n: int = 2, m: int = 4) -> None:
    """Oracle for N:M sparsity: each group of ``m`` along ``axis`` keeps exactly ``n``, the largest."""
    kept, mags = (np.moveaxis(a, axis, -1).reshape(-1, m) for a in (keep, magnitudes))
    assert (kept.sum(1) == n).all()
    assert (np.where(kept, mags, np.inf).min(1) >= np.where(kept, -np.inf, mags).max(1)).all()
