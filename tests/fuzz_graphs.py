"""Hypothesis strategies for valid ONNX graphs built from the operators onnxprune supports.

Two families, random in structure, widths, operator variants and opset:
- vision: Conv (plain, grouped, depthwise, 1x1/3x3, with or without bias), BatchNormalization, Relu, Gelu
  (the opset-20 operator or its Erf decomposition), SiLU as Sigmoid x Mul or HardSwish, residual Add or Sum
  (identity or projection skip), Concat, MaxPool / AveragePool, ConvTranspose upsampling, FPN-style Resize
  and Concat, C2f-style Split, squeeze-and-excitation gates (HardSigmoid x Mul), then GlobalAveragePool or
  Flatten or Reshape into Gemm or MatMul + Add; height and width dynamic in half the graphs, as detector and
  OCR exports have them;
- sequence: MatMul (+ Add bias) projections, attention (Reshape/Transpose heads, MatMul, Softmax),
  LayerNormalization (pre- or post-norm), MLP with Gelu or Relu, an LSTM / GRU / RNN over the tokens, or
  two MLPs in the branches of an If the data chooses, residual Add, then ReduceMean or Flatten into Gemm;
- float16: a vision graph converted to float16 weights and activations (float32 inputs and outputs kept,
  onnxconverter-common's keep_io_types), as models are shipped for deployment.
Weights are drawn at He scale so activations stay of order one (1e-4 tolerances are round-off, not scale).
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import make_model, tensor

CLASSES = 5


class _Builder:
    def __init__(self, seed: int, opset: int):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.k = 0

    def name(self, prefix: str) -> str:
        self.k += 1
        return f"{prefix}{self.k}"

    def const(self, prefix: str, arr: np.ndarray) -> str:
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def weight(self, prefix: str, shape, fan_in: int) -> str:
        return self.const(prefix, (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def node(self, op: str, inputs, **attrs) -> str:
        y = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [y], name=y, **attrs))
        return y

    def act(self, x: str, kind: str) -> str:
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "silu":  # ultralytics' SiLU as torch exports it: x * Sigmoid(x)
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if kind == "hardswish":  # Paddle / MobileNetV3
            return self.node("HardSwish", [x]) if self.opset >= 14 else self.node("Relu", [x])
        if self.opset >= 20:
            return self.node("Gelu", [x])
        # Gelu as exporters before opset 20 write it: x * 0.5 * (1 + erf(x / sqrt(2)))
        s2 = self.const("sqrt2", np.array(np.sqrt(2.0), np.float32))
        one = self.const("one", np.array(1.0, np.float32))
        half = self.const("half", np.array(0.5, np.float32))
        e = self.node("Erf", [self.node("Div", [x, s2])])
        return self.node("Mul", [self.node("Mul", [x, self.node("Add", [e, one])]), half])

    def conv(self, x: str, cin: int, cout: int, group: int = 1, ksize: int = 3, bias: bool = True) -> str:
        w = self.weight("w", (cout, cin // group, ksize, ksize), cin // group * ksize * ksize)
        ins = [x, w] + ([self.const("b", (0.1 * self.rng.standard_normal(cout)).astype(np.float32))] if bias else [])
        return self.node("Conv", ins, pads=[ksize // 2] * 4, group=group, kernel_shape=[ksize, ksize])

    def deconv(self, x: str, cin: int, cout: int) -> str:
        """ConvTranspose, kernel 2 stride 2 (weight (in, out, k, k)): doubles the size, as DB heads upsample."""
        w = self.weight("wt", (cin, cout, 2, 2), cin * 4)
        return self.node("ConvTranspose", [x, w, self.const("bt", np.zeros(cout, np.float32))], strides=[2, 2],
                         kernel_shape=[2, 2])

    def resize2(self, x: str) -> str:
        """Nearest upsampling by 2, as torch exports nn.Upsample (Resize with scales)."""
        scales = self.const("scales", np.array([1, 1, 2, 2], np.float32))
        if self.opset >= 13:
            return self.node("Resize", [x, "", scales], mode="nearest")
        return self.node("Resize", [x, self.const("roi", np.zeros(0, np.float32)), scales], mode="nearest")

    def split2(self, x: str, c: int) -> tuple[str, str]:
        """Split into two halves on the channel axis (C2f): sizes as an input (opset 13+) or an attribute."""
        ys = [self.name("split"), self.name("split")]
        if self.opset >= 13:
            ins = [x, self.const("sizes", np.array([c // 2, c // 2], np.int64))]
            self.nodes.append(helper.make_node("Split", ins, ys, name=self.name("Split"), axis=1))
        else:
            self.nodes.append(helper.make_node("Split", [x], ys, name=self.name("Split"), axis=1, split=[c // 2] * 2))
        return ys[0], ys[1]

    def gate(self, x: str, c: int) -> str:
        """Squeeze-and-excitation: x * HardSigmoid(conv(relu(conv(GlobalAveragePool(x)))))."""
        squeezed = self.node("GlobalAveragePool", [x])
        g = self.conv(self.node("Relu", [self.conv(squeezed, c, max(c // 2, 1), ksize=1)]), max(c // 2, 1), c, ksize=1)
        return self.node("Mul", [x, self.node("HardSigmoid", [g], alpha=1 / 6, beta=0.5)])

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        parts = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x, *(self.const(p, a.astype(np.float32))
                                                     for p, a in zip(("s", "sh", "m", "v"), parts, strict=True))])

    def linear(self, x: str, din: int, dout: int, bias: bool = True) -> str:
        y = self.node("MatMul", [x, self.weight("w", (din, dout), din)])
        if bias:
            y = self.node("Add", [y, self.const("b", (0.1 * self.rng.standard_normal(dout)).astype(np.float32))])
        return y

    def layernorm(self, x: str, d: int) -> str:
        scale = self.const("g", self.rng.uniform(0.5, 1.5, d).astype(np.float32))
        shift = self.const("beta", self.rng.normal(0, 0.1, d).astype(np.float32))
        return self.node("LayerNormalization", [x, scale, shift], axis=-1)

    def recurrent(self, x: str, d: int, tokens: int, op: str) -> str:
        """An LSTM / GRU / RNN over the tokens of x (N, tokens, d), hidden size d, back to (N, tokens, d)."""
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        seq = self.node("Transpose", [x], perm=[1, 0, 2])  # (tokens, N, d)
        w, r = self.weight("W", (1, gates * d, d), d), self.weight("R", (1, gates * d, d), d)
        bias = self.const("B", (0.1 * self.rng.standard_normal((1, 2 * gates * d))).astype(np.float32))
        y = self.node(op, [seq, w, r, bias], hidden_size=d)  # (tokens, 1, N, d)
        y = self.node("Squeeze", [y, self.const("axis1", np.array([1], np.int64))])
        return self.node("Transpose", [y], perm=[1, 0, 2])

    def branches(self, x: str, d: int, act: str) -> str:
        """If the input's sum is positive (the data decides, per batch): an MLP, else another MLP; both
        branches read x and their weights from the main graph (outer scope)."""
        outer_nodes, self.nodes = self.nodes, []
        then_y = self.linear(self.act(self.linear(x, d, 2 * d), act), 2 * d, d)
        then_nodes, self.nodes = self.nodes, []
        else_y = self.linear(self.node("Relu", [self.linear(x, d, d)]), d, d)
        else_nodes, self.nodes = self.nodes, outer_nodes
        cond = self.node("Greater", [self.node("ReduceSum", [x], keepdims=0),
                                     self.const("zero", np.array(0.0, np.float32))])
        y = self.name("if_out")
        then_body = helper.make_graph(then_nodes, self.name("then"), [], [helper.make_tensor_value_info(
            then_y, TensorProto.FLOAT, None)])
        else_body = helper.make_graph(else_nodes, self.name("else"), [], [helper.make_tensor_value_info(
            else_y, TensorProto.FLOAT, None)])
        self.nodes.append(helper.make_node("If", [cond], [y], name=self.name("If"), then_branch=then_body,
                                           else_branch=else_body))
        return y

    def join(self, a: str, b: str, op: str) -> str:
        return self.node(op, [a, b])

    def model(self, inputs, outputs) -> onnx.ModelProto:
        last = self.nodes[-1]
        last.output[0] = "logits"
        return make_model(self.nodes, inputs, outputs, self.inits, opset=self.opset)


@st.composite
def vision_graphs(draw) -> onnx.ModelProto:
    b = _Builder(draw(st.integers(0, 2**16)), draw(st.sampled_from([11, 13, 17, 20])))
    act = draw(st.sampled_from(["relu", "gelu", "silu", "hardswish"]))
    dynamic = draw(st.booleans())  # height and width dynamic, as detectors and OCR models are exported
    side = 8
    c = 2 * draw(st.integers(2, 5))
    x = b.act(b.conv("input", 3, c, bias=draw(st.booleans())), act)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "bn", "residual", "projection", "depthwise", "grouped", "concat",
                                     "pool", "deconv", "fpn", "split", "gate"]))
        if kind == "plain":
            c2 = 2 * draw(st.integers(1, 5))
            x, c = b.act(b.conv(x, c, c2, ksize=draw(st.sampled_from([1, 3])), bias=draw(st.booleans())), act), c2
        elif kind == "bn":
            x = b.act(b.bn(b.conv(x, c, c, bias=False), c), act)
        elif kind in ("residual", "projection"):
            c2 = c if kind == "residual" else 2 * draw(st.integers(1, 5))
            y = b.conv(b.act(b.conv(x, c, c), act), c, c2)
            if draw(st.booleans()):
                y = b.bn(y, c2)
            skip = x if kind == "residual" else b.conv(x, c, c2, ksize=1, bias=False)
            x, c = b.act(b.join(skip, y, draw(st.sampled_from(["Add", "Sum"]))), act), c2
        elif kind == "depthwise":
            x = b.act(b.conv(x, c, c, group=c), act)
        elif kind == "grouped":
            x = b.act(b.conv(x, c, c, group=2), act)
        elif kind == "concat":
            c2 = 2 * draw(st.integers(1, 3))
            parts = [b.act(b.conv(x, c, c2), act), b.act(b.conv(x, c, c2, ksize=1), act), x]
            x, c = b.node("Concat", parts, axis=1), 2 * c2 + c
        elif kind == "deconv":  # up with ConvTranspose, back down with a pool
            c2 = 2 * draw(st.integers(1, 4))
            x, c = b.node("MaxPool", [b.act(b.deconv(x, c, c2), act)], kernel_shape=[2, 2], strides=[2, 2]), c2
        elif kind == "fpn":  # a strided branch upsampled by Resize and concatenated with the input (FPN / PAN)
            c2 = 2 * draw(st.integers(1, 3))
            down = b.act(b.node("Conv", [x, b.weight("w", (c2, c, 3, 3), c * 9)], pads=[1, 1, 1, 1], strides=[2, 2],
                                kernel_shape=[3, 3]), act)
            x, c = b.node("Concat", [x, b.resize2(down)], axis=1), c + c2
        elif kind == "split":  # C2f: split in halves, a conv on the second, concat of all three
            if c % 2 == 0:
                first, second = b.split2(x, c)
                x, c = b.conv(b.node("Concat", [first, second, b.act(b.conv(second, c // 2, c // 2), act)], axis=1),
                              c + c // 2, c, ksize=1), c
        elif kind == "gate":
            x = b.gate(x, c)
        elif side >= 4:
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            x, side = b.node(op, [x], kernel_shape=[2, 2], strides=[2, 2]), side // 2
    head = "gap-gemm" if dynamic else draw(st.sampled_from(["gap-gemm", "flatten-gemm", "reshape-matmul"]))
    if head == "gap-gemm":
        x, features = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), c
    elif head == "flatten-gemm":
        x, features = b.node("Flatten", [x], axis=1), c * side * side
    else:
        x = b.node("Reshape", [x, b.const("shape", np.array([0, -1], np.int64))])
        features = c * side * side
    if head == "reshape-matmul":
        b.linear(x, features, CLASSES)
    else:
        trans_b = draw(st.booleans())
        shape = (CLASSES, features) if trans_b else (features, CLASSES)
        b.node("Gemm", [x, b.weight("fc", shape, features), b.const("fcb", np.zeros(CLASSES, np.float32))],
               transB=int(trans_b))
    size = ("H", "W") if dynamic else (8, 8)
    return b.model([tensor("input", "N", 3, *size)], [tensor("logits", "N", CLASSES)])


@st.composite
def sequence_graphs(draw) -> onnx.ModelProto:
    b = _Builder(draw(st.integers(0, 2**16)), draw(st.sampled_from([17, 20])))
    act = draw(st.sampled_from(["relu", "gelu"]))
    tokens, heads = 4, draw(st.sampled_from([1, 2]))
    d = heads * 2 * draw(st.integers(2, 4))
    x = b.linear("input", 8, d)  # token embedding from 8 input features
    pre_norm = draw(st.booleans())
    for _ in range(draw(st.integers(1, 2))):
        parts = draw(st.permutations(["attention", draw(st.sampled_from(["mlp", "mlp", "recurrent", "if"]))]))
        for part in parts:
            h = b.layernorm(x, d) if pre_norm else x
            if part == "recurrent":
                y = b.recurrent(h, d, tokens, draw(st.sampled_from(["LSTM", "GRU", "RNN"])))
            elif part == "if":
                y = b.branches(h, d, act)
            elif part == "attention":
                dh = d // heads

                def split(v):
                    v = b.node("Reshape", [v, b.const("heads", np.array([0, tokens, heads, dh], np.int64))])
                    return b.node("Transpose", [v], perm=[0, 2, 1, 3])

                q, k, v = (split(b.linear(h, d, d, bias=draw(st.booleans()))) for _ in range(3))
                kt = b.node("Transpose", [k], perm=[0, 1, 3, 2])
                att = b.node("Mul", [b.node("MatMul", [q, kt]), b.const("scale", np.array(dh**-0.5, np.float32))])
                ctx = b.node("MatMul", [b.node("Softmax", [att], axis=-1), v])
                ctx = b.node("Transpose", [ctx], perm=[0, 2, 1, 3])
                ctx = b.node("Reshape", [ctx, b.const("merge", np.array([0, tokens, d], np.int64))])
                y = b.linear(ctx, d, d)
            else:
                f = 2 * d * draw(st.integers(1, 2))
                y = b.linear(b.act(b.linear(h, d, f), act), f, d)
            x = b.join(x, y, "Add")
            if not pre_norm:
                x = b.layernorm(x, d)
    if draw(st.booleans()):
        if b.opset >= 18:
            x = b.node("ReduceMean", [x, b.const("axes", np.array([1], np.int64))], keepdims=0)
        else:
            x = b.node("ReduceMean", [x], axes=[1], keepdims=0)
        features = d
    else:
        x, features = b.node("Flatten", [x], axis=1), tokens * d
    b.node("Gemm", [x, b.weight("fc", (features, CLASSES), features), b.const("fcb", np.zeros(CLASSES, np.float32))])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", tokens, 8])
    return b.model([inp], [tensor("logits", "N", CLASSES)])


@st.composite
def float16_graphs(draw) -> onnx.ModelProto:
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(draw(vision_graphs()), keep_io_types=True)


@st.composite
def decoder_graphs(draw) -> onnx.ModelProto:
    """A decoder LM with a KV cache, as Optimum-style exports write it: token ids (plus an attention mask)
    in, ``logits`` and ``present.N.key / value`` out, ``past_key_values.N.key / value`` in, the new keys and
    values concatenated after the past along the sequence; pre- or post-norm, grouped-query attention (fewer
    KV heads, repeated) or not, a SwiGLU or plain MLP, and some of torch's habits: layer 0's past key also
    read for its shape (the mask's past length), a one-input Concat passing a past on."""
    b = _Builder(draw(st.integers(0, 2**16)), draw(st.sampled_from([17, 20])))
    vocab, layers = 11, draw(st.integers(2, 3))
    kv, ratio, dh = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), 4
    heads, d = kv * ratio, kv * ratio * dh
    pre_norm, swiglu = draw(st.booleans()), draw(st.booleans())
    x = b.node("Gather", [b.weight("embed", (vocab, d), d), "input_ids"])
    pasts, presents = [], []
    mask_from_shape = draw(st.booleans())
    mask = None
    for i in range(layers):
        h = b.layernorm(x, d) if pre_norm else x
        q = b.node("Transpose", [b.node("Reshape", [b.linear(h, d, d, bias=False), b.const(
            "qs", np.array([0, 0, heads, dh], np.int64))])], perm=[0, 2, 1, 3])
        new = []
        for kind in ("key", "value"):
            t = b.node("Transpose", [b.node("Reshape", [b.linear(h, d, kv * dh, bias=False), b.const(
                "ks", np.array([0, 0, kv, dh], np.int64))])], perm=[0, 2, 1, 3])
            past = f"past_key_values.{i}.{kind}"
            pasts.append(past)
            read = b.node("Concat", [past], axis=2) if i == 0 and draw(st.booleans()) else past  # torch's habit
            if i == 0 and kind == "key" and mask_from_shape:
                mask = b.node("Shape", [read])  # the past length the causal mask is sized from
            present = b.node("Concat", [read, t], axis=2)
            presents.append((present, f"present.{i}.{kind}"))
            new.append(present if ratio == 1 else b.node("Tile", [present, b.const(
                "rep", np.array([1, ratio, 1, 1], np.int64))]))
        k, v = new
        scores = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])]),
                                b.const("scale", np.array(dh ** -0.5, np.float32))])
        ctx = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
        ctx = b.node("Reshape", [b.node("Transpose", [ctx], perm=[0, 2, 1, 3]), b.const(
            "merge", np.array([0, 0, d], np.int64))])
        x = b.join(x, b.linear(ctx, d, d, bias=False), "Add")
        if not pre_norm:
            x = b.layernorm(x, d)
        h = b.layernorm(x, d) if pre_norm else x
        f = 2 * d
        if swiglu:
            gate = b.linear(h, d, f, bias=False)
            y = b.node("Mul", [b.node("Mul", [gate, b.node("Sigmoid", [gate])]), b.linear(h, d, f, bias=False)])
        else:
            y = b.act(b.linear(h, d, f), "relu")
        x = b.join(x, b.linear(y, f, d, bias=False), "Add")
        if not pre_norm:
            x = b.layernorm(x, d)
    logits = b.linear(x, d, vocab, bias=False)
    if mask is not None:  # the past length reaches the output only through a shape: logits + 0 * length
        length = b.node("Cast", [b.node("Gather", [mask, b.const("two", np.array(2, np.int64))]), ], to=1)
        logits = b.node("Add", [logits, b.node("Mul", [length, b.const("nothing", np.array(0.0, np.float32))])])
    b.node("Identity", [logits])
    for value, name in presents:
        b.nodes.append(helper.make_node("Identity", [value], [name], name=f"out_{name}"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", kv, "past_sequence_length", dh])
               for n in pasts]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", kv, "total", dh])
                for _, name in presents]
    last = b.nodes[-1 - len(presents)]
    last.output[0] = "logits"
    return make_model(b.nodes, inputs, outputs, b.inits, opset=b.opset)


def graphs() -> st.SearchStrategy[onnx.ModelProto]:
    return st.one_of(vision_graphs(), sequence_graphs(), float16_graphs())


def sample_input(proto: onnx.ModelProto, n: int, seed: int = 0) -> np.ndarray:
    dims = [d.dim_value or 8 for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]  # 8 x 8 if dynamic
    return np.random.default_rng(seed).standard_normal((n, *dims)).astype(np.float32)
