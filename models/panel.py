"""A panel of tiny ONNX models with the structures that real third-party exporters emit, dynamic dimensions
included, so that every onnxprune command can be run on them in CI (each file < 1 MB, one 64x64 image < 5 ms).

    python -m models.panel -o build/panel                  # all five, verified, one line each
    python -m models.panel -o build/panel yolo nhwc        # some of them

``yolo`` (ultralytics YOLOv8 export, TorchScript exporter, opset 17): Conv = Conv2d + BatchNorm (fused into
the conv before export, as ``model.fuse()`` does) + SiLU written as x * sigmoid(x), so ONNX has Sigmoid and Mul;
C2f blocks (1x1 conv, Split in two halves, bottlenecks with residual Add, Concat of all pieces, 1x1 conv); SPPF
(three 5x5 stride-1 MaxPools, Concat, conv); nearest Resize upsampling and FPN/PAN Concats across the strides
8, 16 and 32; a decoupled head (box and class conv branches per stride) whose maps are Reshape'd to
(batch, C, -1) and Concat'ed along the anchors, then the DFL box decoding (Reshape, Transpose, Softmax and a
fixed 1x1 conv holding 0..15) and the anchor grid built from the feature shapes at run time (Range, meshgrid)
as a ``dynamic=True`` export does. Input ``images`` (batch, 3, height, width), output ``output0``
(batch, 4 + 8 classes, anchors), all of batch/height/width/anchors dynamic (the exporter cannot infer the 12
through the chunk of the box decoding and declares it as ``Concatoutput0_dim_1``). Random weights, BatchNorm
statistics calibrated on random images so that activations keep a realistic spread.

``dbnet`` (Paddle2ONNX export of a PP-OCR DB text detector, opset 14): a MobileNetV3 backbone (expand 1x1 conv,
depthwise kxk conv with groups = channels, squeeze-and-excitation GlobalAveragePool -> 1x1 conv -> Relu -> 1x1
conv -> HardSigmoid -> Mul, linear 1x1 conv, residual Add), ReLU and HardSwish; the DBFPN neck (1x1 convs,
Resize x2 and Add top-down, 3x3 convs, Resize x8/x4/x2 and Concat); the DB head (3x3 conv, two
ConvTranspose2d stride 2, Sigmoid). BatchNormalization nodes are kept, as Paddle2ONNX keeps them. Paddle names:
nodes ``p2o.Conv.0``, tensors ``conv2d_0.tmp_0``, weights ``conv2d_0.w_0``, dynamic dims
``p2o.DynamicDimension.N``; input ``x`` (batch, 3, H, W), output ``sigmoid_0.tmp_0`` (batch, 1, H, W), a
probability map. Random weights, BatchNorm calibrated; H and W must be multiples of 32.

``lcnet`` (Paddle2ONNX export of a PaddleClas PP-LCNet classifier, opset 14): a 3x3 stride-2 stem, depthwise
separable blocks (3x3/5x5 depthwise + 1x1 pointwise, HardSwish), SE gates in the last two blocks,
GlobalAveragePool, a 1x1 ``last_conv`` + HardSwish, Flatten, Gemm -> logits; BatchNorm folded. Paddle names as
for dbnet; input ``x`` (batch, 3, H, W) dynamic, output ``save_infer_model/scale_0.tmp_1``. Trained for a few
seconds on scikit-learn's digits, 8x8 grey upscaled x4 (nearest) to 32x32 and replicated to 3 channels; the
test data is uint8 N x 3 x 32 x 32, which onnxprune scales by 1/255 (no mean/std), as in training.

``fixed_batch`` (the many Paddle/TF exports that fix every dimension, opset 11): models/small.py's PlainCNN
trained on digits, exported with input ``input`` of shape (1, 1, 8, 8) and no dynamic axis at all. Test data:
the digits test split, uint8 N x 1 x 8 x 8.

``nhwc`` (tf2onnx export of a Keras CNN, opset 13, before its transpose optimiser): input ``input_1:0``
(unk__0, 8, 8, 1) channels-last; every Conv and MaxPool wrapped in Transpose perm [0,3,1,2] / [0,2,3,1], ReLU in
NHWC between them, the Keras Flatten as a Reshape to [-1, 256] in NHWC order (channels innermost), Dense layers
as MatMul with the weight as an initializer + Add of the bias (not Gemm), Softmax; tf2onnx names with slashes
and ``:0`` (``model/conv2d/Conv2D``, ``model/conv2d/Conv2D:0``, ``model/dense/MatMul/ReadVariableOp:0``),
output ``dense_1:0``. Trained on digits; test data uint8 N x 8 x 8 x 1 (scaled by 1/255, as in training).

``yolo`` and ``dbnet`` come with 64 fixed-seed random images (float32 N x 3 x 64 x 64 in [0, 1], smooth blobs
plus noise, key ``x`` only) so that data-driven commands have real inputs. Everything is seeded and torch runs
on one thread while building (a 2-core CI machine shared with tests trains 15x slower on two): the same torch
build writes the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F
from torch import nn

from models.small import PlainCNN, digits_split, fit

PANEL = ("yolo", "dbnet", "lcnet", "fixed_batch", "nhwc")
SEED = 0
NUM_CLASSES_YOLO = 8


# --------------------------------------------------------------------------------------------- shared helpers


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with the eval-mode BatchNorm after it folded into its weight and bias."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _calibrate_bn(model: nn.Module, images: torch.Tensor, seed: int) -> None:
    """Give a randomly initialised model trained-looking BatchNorms: random affine parameters and running
    statistics measured on ``images``, so that activations neither vanish nor explode with depth."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(16):
            model(chunk)
    model.eval()


def _random_images(n: int, size: int, seed: int) -> np.ndarray:
    """float32 N x 3 x size x size in [0, 1]: smooth colour blobs (bilinear from 4x4) plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = smooth + 0.1 * torch.randn(n, 3, size, size, generator=gen)
    return noisy.clamp(0, 1).numpy().astype(np.float32)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: results independent of the core count, and no spinning threads when the CPUs are
    shared (two threads on a busy 2-core machine made training 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export(model: nn.Module, example: torch.Tensor, path: Path, *, input_name: str, output_name: str,
            input_axes: dict[int, str] | None, output_axes: dict[int, str] | None, opset: int,
            keep_bn: bool = False) -> onnx.ModelProto:
    """TorchScript export (the exporter ultralytics and most model zoos use); returns the loaded proto."""
    model.eval()
    dynamic = None
    if input_axes or output_axes:
        dynamic = {input_name: input_axes or {}, output_name: output_axes or {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), opset_version=opset, dynamo=False,
            input_names=[input_name], output_names=[output_name], dynamic_axes=dynamic,
            training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
        )
    return onnx.load(str(path))


def _save(proto: onnx.ModelProto, path: Path, source: str) -> Path:
    proto.ir_version = min(proto.ir_version, 10)  # readable by every current onnxruntime
    entry = proto.metadata_props.add()
    entry.key, entry.value = "onnxprune.source", source
    onnx.save(proto, str(path))
    return path


def _rename(proto: onnx.ModelProto, node_name: Callable[[onnx.NodeProto, int], str],
            tensor_name: Callable[[onnx.NodeProto, int, str], str],
            weight_name: Callable[[onnx.NodeProto, int, str], str], keep: set[str]) -> None:
    """Rename nodes, node outputs and initializers in place (``keep``: names left alone, e.g. graph I/O).
    ``node_name(node, index)``; ``tensor_name(node, output_index, new node name)``;
    ``weight_name(node, input_index, new node name)`` for an initializer read by the node (first reader)."""
    g = proto.graph
    inits = {t.name for t in g.initializer}
    mapping: dict[str, str] = {}
    for i, node in enumerate(g.node):
        node.name = node_name(node, i)
        for j, name in enumerate(node.input):
            if name in inits and name not in mapping and name not in keep:
                mapping[name] = weight_name(node, j, node.name)
        for j, name in enumerate(node.output):
            if name and name not in keep:
                mapping[name] = tensor_name(node, j, node.name)
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for t in g.initializer:
        t.name = mapping.get(t.name, t.name)
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        vi.name = mapping.get(vi.name, vi.name)


def _paddle_names(proto: onnx.ModelProto, output_name: str) -> None:
    """Paddle2ONNX naming: nodes ``p2o.<Op>.<k>``, tensors ``<paddle op>_<k>.tmp_0``, weights
    ``<paddle op>_<k>.w_<i>``; the graph output gets ``output_name``."""
    paddle_ops = {"Conv": "conv2d", "ConvTranspose": "conv2d_transpose", "BatchNormalization": "batch_norm",
                  "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "Relu": "relu", "Sigmoid": "sigmoid",
                  "GlobalAveragePool": "pool2d", "Mul": "elementwise_mul", "Add": "elementwise_add",
                  "Resize": "nearest_interp_v2", "Concat": "concat", "Flatten": "flatten", "Gemm": "linear"}
    g = proto.graph
    old_out = g.output[0].name
    per_op: Counter[str] = Counter()
    per_paddle: Counter[str] = Counter()
    paddle_index: dict[str, str] = {}

    def node_name(node: onnx.NodeProto, _: int) -> str:
        name = f"p2o.{node.op_type}.{per_op[node.op_type]}"
        per_op[node.op_type] += 1
        base = paddle_ops.get(node.op_type, node.op_type.lower())
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            base = "depthwise_conv2d"
        paddle_index[name] = f"{base}_{per_paddle[base]}"
        per_paddle[base] += 1
        return name

    def weight_name(node: onnx.NodeProto, j: int, name: str) -> str:
        suffixes = {"BatchNormalization": ("x", "w_0", "b_0", "w_1", "w_2"),  # scale, bias, mean, variance
                    "Conv": ("x", "w_0", "b_0"), "ConvTranspose": ("x", "w_0", "b_0"), "Gemm": ("x", "w_0", "b_0")}
        names = suffixes.get(node.op_type, ())
        return f"{paddle_index[name]}.{names[j] if j < len(names) else f'w_{j}'}"

    _rename(proto, node_name, lambda node, j, name: f"{paddle_index[name]}.tmp_{j}", weight_name,
            keep={g.input[0].name, old_out})
    for node in g.node:
        node.output[:] = [output_name if n == old_out else n for n in node.output]
    g.output[0].name = output_name


def op_counts(proto: onnx.ModelProto) -> Counter[str]:
    """Op types of the main graph, with depthwise/grouped convs counted again as ``Conv(group>1)``."""
    counts = Counter(node.op_type for node in proto.graph.node)
    grouped = sum(1 for node in proto.graph.node if node.op_type == "Conv"
                  and any(a.name == "group" and a.i > 1 for a in node.attribute))
    if grouped:
        counts["Conv(group>1)"] = grouped
    return counts


# --------------------------------------------------------------------------------------------- yolo


class SiLU(nn.Module):
    """x * sigmoid(x), exported as Sigmoid and Mul (as ultralytics' exports show)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU; ``fuse`` folds the BatchNorm into the conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2)
        self.act = SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        self.conv, self.bn = _fold_bn(self.conv, self.bn), nn.Identity()


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv to 2c channels, split in halves, n bottlenecks on the second half, Concat of all, 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))  # ultralytics exports C2f.forward_split
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c = c1 // 2
        self.cv1 = Conv(c1, c, 1)
        self.cv2 = Conv(4 * c, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


class DFL(nn.Module):
    """Distribution focal loss decoding: softmax over ``c1`` bins, expectation by a fixed 1x1 conv."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float32).reshape(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _anchors(feats: list[torch.Tensor], strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres (2, anchors) and their strides (1, anchors), from the feature shapes at run time."""
    points, stride_list = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[2], f.shape[3]
        sx = torch.arange(w, dtype=f.dtype) + 0.5
        sy = torch.arange(h, dtype=f.dtype) + 0.5
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), dtype=f.dtype))
    return torch.cat(points).transpose(0, 1), torch.cat(stride_list).transpose(0, 1)


class Detect(nn.Module):
    """Decoupled head: per stride a box branch (4 x reg_max DFL bins) and a class branch; decoded boxes (xywh,
    pixels) and class probabilities concatenated to (batch, 4 + nc, anchors)."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], reg_max: int = 16, hidden: int = 16):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.no = nc + 4 * reg_max
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3),
                                               nn.Conv2d(hidden, 4 * reg_max, 1)) for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3),
                                               nn.Conv2d(hidden, nc, 1)) for c in ch)
        self.dfl = DFL(reg_max)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        feats = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]
        b = feats[0].shape[0]
        x_cat = torch.cat([f.view(b, self.no, -1) for f in feats], 2)
        anchors, strides = _anchors(feats, self.strides)
        box, cls = x_cat.split((4 * self.reg_max, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = anchors.unsqueeze(0) - lt, anchors.unsqueeze(0) + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class TinyYOLO(nn.Module):
    """YOLOv8 layout (layers 0-22 as in yolov8.yaml) at tiny widths; ``model.N`` names like ultralytics."""

    def __init__(self, nc: int = NUM_CLASSES_YOLO, w: tuple[int, ...] = (8, 16, 24, 32, 48)):
        super().__init__()
        w1, w2, w3, w4, w5 = w
        self.model = nn.ModuleList([
            Conv(3, w1, 3, 2), Conv(w1, w2, 3, 2), C2f(w2, w2, 1, True),               # 0-2   P1/2, P2/4
            Conv(w2, w3, 3, 2), C2f(w3, w3, 1, True),                                  # 3-4   P3/8
            Conv(w3, w4, 3, 2), C2f(w4, w4, 1, True),                                  # 5-6   P4/16
            Conv(w4, w5, 3, 2), C2f(w5, w5, 1, True), SPPF(w5, w5),                    # 7-9   P5/32
            nn.Upsample(None, 2, "nearest"), Concat(), C2f(w5 + w4, w4),               # 10-12 top-down
            nn.Upsample(None, 2, "nearest"), Concat(), C2f(w4 + w3, w3),               # 13-15 P3 out
            Conv(w3, w3, 3, 2), Concat(), C2f(w3 + w4, w4),                            # 16-18 P4 out
            Conv(w4, w4, 3, 2), Concat(), C2f(w4 + w5, w5),                            # 19-21 P5 out
            Detect(nc, (w3, w4, w5), (8, 16, 32)),                                     # 22
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        for i in range(4):
            x = m[i](x)
        p3 = m[4](x)
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h4 = m[12](m[11]([m[10](p5), p4]))
        o3 = m[15](m[14]([m[13](h4), p3]))
        o4 = m[18](m[17]([m[16](o3), h4]))
        o5 = m[21](m[20]([m[19](o4), p5]))
        return m[22]([o3, o4, o5])

    def fuse(self) -> TinyYOLO:
        for module in self.modules():
            if isinstance(module, Conv):
                module.fuse()
        return self


def build_yolo(seed: int = SEED) -> TinyYOLO:
    """Random weights, BatchNorm calibrated on random images, then fused (eval mode)."""
    torch.manual_seed(seed)
    model = TinyYOLO()
    _calibrate_bn(model, torch.from_numpy(_random_images(32, 64, seed + 1)), seed)
    return model.fuse().eval()


# --------------------------------------------------------------------------------------------- dbnet, lcnet


class ConvBNLayer(nn.Module):
    """Paddle's ConvBNLayer: conv (no bias) + BatchNorm + optional activation."""

    def __init__(self, c1: int, c2: int, k: int, s: int = 1, groups: int = 1, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = {"relu": nn.ReLU(), "hardswish": nn.Hardswish(), None: nn.Identity()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
    """GlobalAveragePool -> 1x1 conv -> ReLU -> 1x1 conv -> HardSigmoid, multiplied into the input."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(c, c // reduction, 1)
        self.conv2 = nn.Conv2d(c // reduction, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.conv1(self.avg_pool(x)))
        return x * F.hardsigmoid(self.conv2(s))


class ResidualUnit(nn.Module):
    """MobileNetV3 block: expand 1x1, depthwise kxk (stride s), optional SE, linear 1x1, Add if shapes allow."""

    def __init__(self, c1: int, mid: int, c2: int, k: int, s: int, se: bool, act: str):
        super().__init__()
        self.expand_conv = ConvBNLayer(c1, mid, 1, act=act)
        self.bottleneck_conv = ConvBNLayer(mid, mid, k, s, groups=mid, act=act)
        self.mid_se: nn.Module = SEModule(mid) if se else nn.Identity()
        self.linear_conv = ConvBNLayer(mid, c2, 1)
        self.shortcut = s == 1 and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_conv(self.mid_se(self.bottleneck_conv(self.expand_conv(x))))
        return x + y if self.shortcut else y


# (kernel, expand, out, SE, activation, stride) as PaddleOCR's det MobileNetV3 config, at tiny widths
DB_BACKBONE = (
    (3, 8, 8, False, "relu", 1),
    (3, 24, 12, False, "relu", 2),
    (3, 32, 12, False, "relu", 1),
    (5, 36, 16, True, "relu", 2),
    (5, 48, 16, True, "relu", 1),
    (3, 64, 24, False, "hardswish", 2),
    (3, 72, 24, True, "hardswish", 1),
    (5, 96, 32, True, "hardswish", 2),
    (5, 128, 32, True, "hardswish", 1),
)


class DBNet(nn.Module):
    """MobileNetV3 backbone (stages ending at strides 4, 8, 16, 32) + DBFPN neck + DB head."""

    def __init__(self, fpn: int = 32, last: int = 96):
        super().__init__()
        self.conv = ConvBNLayer(3, 8, 3, 2, act="hardswish")
        stages, blocks, c = [], [], 8
        for i, (k, mid, out, se, act, s) in enumerate(DB_BACKBONE):
            if s == 2 and i > 2:  # a new stage starts at every later stride-2 block
                stages.append(nn.Sequential(*blocks))
                blocks = []
            blocks.append(ResidualUnit(c, mid, out, k, s, se, act))
            c = out
        blocks.append(ConvBNLayer(c, last, 1, act="hardswish"))
        stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        chans = [stage[-1].linear_conv.bn.num_features for stage in stages[:-1]] + [last]
        self.in_convs = nn.ModuleList(nn.Conv2d(ci, fpn, 1, bias=False) for ci in chans)
        self.inp_convs = nn.ModuleList(nn.Conv2d(fpn, fpn // 4, 3, padding=1, bias=False) for _ in chans)
        q = fpn // 4
        self.head = nn.Sequential(
            nn.Conv2d(fpn, q, 3, padding=1, bias=False), nn.BatchNorm2d(q), nn.ReLU(),
            nn.ConvTranspose2d(q, q, 2, 2), nn.BatchNorm2d(q), nn.ReLU(),
            nn.ConvTranspose2d(q, 1, 2, 2), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c2, c3, c4, c5 = (conv(f) for conv, f in zip(self.in_convs, feats))

        def up(t: torch.Tensor, scale: int) -> torch.Tensor:
            return F.interpolate(t, scale_factor=scale, mode="nearest")

        o4 = c4 + up(c5, 2)
        o3 = c3 + up(o4, 2)
        o2 = c2 + up(o3, 2)
        p5, p4, p3, p2 = (conv(t) for conv, t in zip(self.inp_convs[::-1], (c5, o4, o3, o2)))
        fuse = torch.cat([up(p5, 8), up(p4, 4), up(p3, 2), p2], 1)
        return self.head(fuse)


# (kernel, in, out, stride, SE) as PaddleClas' PP-LCNet NET_CONFIG (blocks2..blocks6), at tiny widths
LCNET_BLOCKS = (
    (3, 8, 16, 1, False),
    (3, 16, 24, 2, False), (3, 24, 24, 1, False),
    (3, 24, 32, 2, False), (3, 32, 32, 1, False),
    (3, 32, 64, 2, False), (5, 64, 64, 1, False),
    (5, 64, 128, 2, True), (5, 128, 128, 1, True),
)


class DepthwiseSeparable(nn.Module):
    def __init__(self, k: int, c1: int, c2: int, s: int, se: bool):
        super().__init__()
        self.dw_conv = ConvBNLayer(c1, c1, k, s, groups=c1, act="hardswish")
        self.se: nn.Module = SEModule(c1) if se else nn.Identity()
        self.pw_conv = ConvBNLayer(c1, c2, 1, act="hardswish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.se(self.dw_conv(x)))


class LCNet(nn.Module):
    def __init__(self, num_classes: int = 10, last: int = 256):
        super().__init__()
        self.conv1 = ConvBNLayer(3, 8, 3, 2, act="hardswish")
        self.blocks = nn.Sequential(*(DepthwiseSeparable(*cfg) for cfg in LCNET_BLOCKS))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.last_conv = nn.Conv2d(LCNET_BLOCKS[-1][2], last, 1, bias=False)
        self.hardswish = nn.Hardswish()
        self.dropout = nn.Dropout(0.2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg_pool(self.blocks(self.conv1(x)))
        return self.fc(self.flatten(self.dropout(self.hardswish(self.last_conv(x)))))

    def fuse(self) -> LCNet:
        for module in self.modules():
            if isinstance(module, ConvBNLayer):
                module.conv, module.bn = _fold_bn(module.conv, module.bn), nn.Identity()
        return self


def digits_rgb32(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split as uint8 N x 3 x 32 x 32: each pixel repeated 4 x 4, grey replicated to 3 channels."""
    def up(x: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.repeat(x, 4, 2), 4, 3), 3, 1)

    xtr, ytr, xte, yte = digits_split(seed)
    return up(xtr), ytr, up(xte), yte


def train_lcnet(epochs: int = 6, seed: int = SEED) -> tuple[LCNet, float]:
    """PP-LCNet trained on 32x32 RGB digits (Adam); returns it (eval mode, BatchNorm not yet fused), top-1 %."""
    torch.manual_seed(seed)
    model = LCNet()
    xtr, ytr, xte, yte = digits_rgb32(seed)
    return model, fit(model, xtr, ytr, xte, yte, epochs=epochs, lr=4e-3, batch_size=64, seed=seed)


# --------------------------------------------------------------------------------------------- nhwc


class KerasCNN(nn.Module):
    """A Keras-style channels-last CNN: each NCHW op between permutes, Flatten in NHWC order, Dense layers as
    explicit ``x @ W + b`` (so ONNX gets MatMul + Add as tf2onnx writes them), Softmax."""

    def __init__(self, width: int = 8, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv2d = nn.Conv2d(1, width, 3, padding=1)
        self.conv2d_1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.flat = 2 * width * 4 * 4
        self.dense_w = nn.Parameter(torch.randn(self.flat, hidden) / self.flat ** 0.5)
        self.dense_b = nn.Parameter(torch.zeros(hidden))
        self.dense_1_w = nn.Parameter(torch.randn(hidden, num_classes) / hidden ** 0.5)
        self.dense_1_b = nn.Parameter(torch.zeros(num_classes))

    @staticmethod
    def nchw(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return op(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.nchw(self.conv2d, x))
        x = F.relu(self.nchw(self.conv2d_1, x))
        x = self.nchw(lambda t: F.max_pool2d(t, 2), x)
        x = x.reshape(-1, self.flat)
        x = F.relu(x @ self.dense_w + self.dense_b)
        return x @ self.dense_1_w + self.dense_1_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


class _LogitsNCHW(nn.Module):
    """Training view: NCHW digits in, logits out (``fit`` feeds N x 1 x 8 x 8)."""

    def __init__(self, inner: KerasCNN):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(x.permute(0, 2, 3, 1))


def train_nhwc(epochs: int = 25, seed: int = SEED) -> tuple[KerasCNN, float]:
    torch.manual_seed(seed)
    model = KerasCNN()
    xtr, ytr, xte, yte = digits_split(seed)
    acc = fit(_LogitsNCHW(model), xtr, ytr, xte, yte, epochs=epochs, lr=3e-3, batch_size=64, seed=seed)
    return model.eval(), acc


def _tf2onnx_names(proto: onnx.ModelProto, input_name: str, output_name: str) -> None:
    """tf2onnx naming: Keras layer scopes, ``:0`` tensors, ``__N`` for the Transposes it inserts."""
    g = proto.graph
    for node in [n for n in g.node if n.op_type == "Constant"]:  # tf2onnx stores constants as initializers
        value = onnx.numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
        g.initializer.append(onnx.numpy_helper.from_array(value, node.output[0]))
        g.node.remove(node)
    layer_of = {"Conv": "conv2d", "MaxPool": "max_pooling2d", "MatMul": "dense", "Reshape": "flatten"}
    tf_op = {"Conv": "Conv2D", "MaxPool": "MaxPool", "MatMul": "MatMul", "Reshape": "Reshape", "Add": "BiasAdd",
             "Relu": "Relu", "Softmax": "Softmax"}
    seen: Counter[str] = Counter()
    scope = "model/input"
    names: list[str] = []
    for node in g.node:  # each node in the scope of its Keras layer
        if node.op_type in layer_of:
            base = layer_of[node.op_type]
            scope = f"model/{base}" + (f"_{seen[base]}" if seen[base] else "")
            seen[base] += 1
        names.append(f"{scope}/{tf_op.get(node.op_type, node.op_type)}")
    for i, node in enumerate(g.node):  # an inserted Transpose is named after the op it serves, plus __N
        if node.op_type == "Transpose":
            to_nchw = any(a.name == "perm" and list(a.ints) == [0, 3, 1, 2] for a in node.attribute)
            names[i] = f"{names[i + 1] if to_nchw else names[i - 1]}__{i + 5}"
    old_in, old_out = g.input[0].name, g.output[0].name

    def weight(node: onnx.NodeProto, j: int, name: str) -> str:
        if node.op_type == "Reshape":
            return "model/flatten/Const:0"
        scope_name = name.rsplit("/", 1)[0]
        kind = {("Conv", 1): "Conv2D", ("Conv", 2): "BiasAdd", ("MatMul", 1): "MatMul", ("Add", 1): "BiasAdd",
                ("Add", 0): "BiasAdd"}.get((node.op_type, j), node.op_type)
        return f"{scope_name}/{kind}/ReadVariableOp:0"

    _rename(proto, lambda node, i: names[i], lambda node, j, name: f"{name}:{j}", weight, keep={old_in, old_out})
    for node in g.node:
        node.input[:] = [input_name if n == old_in else n for n in node.input]
        node.output[:] = [output_name if n == old_out else n for n in node.output]
    g.input[0].name, g.output[0].name = input_name, output_name
    proto.producer_name, proto.producer_version = "tf2onnx", "1.16.1 (imitated by models/panel.py)"


# --------------------------------------------------------------------------------------------- the panel


def export_panel_model(name: str, out_dir: Path | str, *, verify: bool = True) -> tuple[Path, Path | None, dict]:
    """Write ``<out_dir>/<name>.onnx`` and its data ``<out_dir>/<name>_test.npz``; returns the two paths and
    info: ``input_shape`` (a deployment shape NAME:D0,D1,..), ``kind``, ``accuracy`` (test top-1 % or None),
    ``opset`` and ``ops`` (op-type counts). ``verify`` runs :func:`verify_panel_model` on the file."""
    if name not in PANEL:
        raise ValueError(f"unknown panel model {name!r}; choose from {', '.join(PANEL)}")
    with _one_thread():
        path, data, info = _export_panel(name, Path(out_dir))
    info["ops"] = dict(verify_panel_model(name, path) if verify else op_counts(onnx.load(str(path))))
    if info["accuracy"] is not None:  # the exported file's accuracy, as onnxprune will measure it
        info["accuracy"] = onnx_accuracy(path, data)
        assert not verify or info["accuracy"] > 80, f"{name}: test top-1 {info['accuracy']:.2f} %"
    return path, data, info


def onnx_accuracy(path: Path | str, data: Path | str) -> float:
    """Top-1 (%) of an ONNX classifier on an .npz (x, y), uint8 inputs scaled by 1/255 as onnxprune does; a
    graph with a fixed batch is fed that batch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    with np.load(data) as npz:
        x, y = npz["x"], npz["y"]
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    step = inp.shape[0] if isinstance(inp.shape[0], int) else 256
    logits = np.concatenate([sess.run(None, {inp.name: x[i:i + step]})[0] for i in range(0, len(x), step)])
    return float((logits.argmax(1) == y).mean() * 100)


def _export_panel(name: str, out: Path) -> tuple[Path, Path, dict]:
    out.mkdir(parents=True, exist_ok=True)
    path, data = out / f"{name}.onnx", out / f"{name}_test.npz"
    acc: float | None = None
    if name == "yolo":
        opset, kind, shape = 17, "detector", "images:1,3,64,64"
        proto = _export(build_yolo(), torch.rand(1, 3, 64, 64), path, input_name="images", output_name="output0",
                        input_axes={0: "batch", 2: "height", 3: "width"}, output_axes={0: "batch", 2: "anchors"},
                        opset=opset)
        np.savez(data, x=_random_images(64, 64, SEED + 2))
        source = "models/panel.py TinyYOLO: ultralytics YOLOv8 export structure, random weights"
    elif name == "dbnet":
        opset, kind, shape = 14, "segmentation", "x:1,3,64,64"
        torch.manual_seed(SEED)
        model = DBNet()
        _calibrate_bn(model, torch.from_numpy(_random_images(32, 64, SEED + 1)), SEED)
        dims = {axis: f"p2o.DynamicDimension.{k}" for k, axis in enumerate((0, 2, 3))}
        out_dims = {axis: f"p2o.DynamicDimension.{k + 3}" for k, axis in enumerate((0, 2, 3))}
        proto = _export(model, torch.rand(1, 3, 64, 64), path, input_name="x", output_name="sigmoid_0.tmp_0",
                        input_axes=dims, output_axes=out_dims,
                        opset=opset, keep_bn=True)
        _paddle_names(proto, "sigmoid_0.tmp_0")
        np.savez(data, x=_random_images(64, 64, SEED + 2))
        source = "models/panel.py DBNet: Paddle2ONNX PP-OCR det (DB) structure, random weights"
    elif name == "lcnet":
        opset, kind, shape = 14, "classifier", "x:1,3,32,32"
        model, acc = train_lcnet()
        dims = {axis: f"p2o.DynamicDimension.{k}" for k, axis in enumerate((0, 2, 3))}
        out_name = "save_infer_model/scale_0.tmp_1"
        proto = _export(model.fuse(), torch.rand(1, 3, 32, 32), path, input_name="x", output_name=out_name,
                        input_axes=dims, output_axes={0: "p2o.DynamicDimension.0"}, opset=opset)
        _paddle_names(proto, out_name)
        _, _, xte, yte = digits_rgb32()
        np.savez(data, x=xte, y=yte)
        source = f"models/panel.py LCNet: Paddle2ONNX PP-LCNet structure, digits 32x32 RGB (test top-1 {acc:.2f} %)"
    elif name == "fixed_batch":
        opset, kind, shape = 11, "classifier", "input:1,1,8,8"
        torch.manual_seed(SEED)
        model = PlainCNN()
        xtr, ytr, xte, yte = digits_split(SEED)
        acc = fit(model, xtr, ytr, xte, yte, epochs=15, lr=3e-3, batch_size=64, seed=SEED)
        proto = _export(model, torch.rand(1, 1, 8, 8), path, input_name="input", output_name="logits",
                        input_axes=None, output_axes=None, opset=opset)
        np.savez(data, x=xte, y=yte)
        source = f"models/panel.py fixed_batch: PlainCNN on digits, batch fixed at 1 (test top-1 {acc:.2f} %)"
    else:  # nhwc
        opset, kind, shape = 13, "classifier", "input_1:0:1,8,8,1"
        model, acc = train_nhwc()
        proto = _export(model, torch.rand(1, 8, 8, 1), path, input_name="input_1", output_name="dense_1",
                        input_axes={0: "unk__0"}, output_axes={0: "unk__1"}, opset=opset)
        _tf2onnx_names(proto, "input_1:0", "dense_1:0")
        _, _, xte, yte = digits_split(SEED)
        np.savez(data, x=np.ascontiguousarray(xte.transpose(0, 2, 3, 1)), y=yte)
        source = f"models/panel.py KerasCNN: tf2onnx channels-last structure, digits (test top-1 {acc:.2f} %)"
    _save(proto, path, source)
    return path, data, {"input_shape": shape, "kind": kind, "accuracy": acc, "opset": opset}


# op types (or the pseudo-type Conv(group>1)) each panel model must contain
REQUIRED_OPS = {
    "yolo": ("Conv", "Sigmoid", "Mul", "Split", "Add", "Concat", "MaxPool", "Resize", "Reshape", "Transpose",
             "Softmax", "Range"),
    "dbnet": ("Conv(group>1)", "HardSwish", "HardSigmoid", "GlobalAveragePool", "Mul", "Relu", "Resize", "Add",
              "Concat", "ConvTranspose", "BatchNormalization", "Sigmoid"),
    "lcnet": ("Conv(group>1)", "HardSwish", "HardSigmoid", "GlobalAveragePool", "Flatten", "Gemm"),
    "fixed_batch": ("Conv", "Relu", "MaxPool", "Gemm"),
    "nhwc": ("Transpose", "Conv", "Relu", "MaxPool", "Reshape", "MatMul", "Add", "Softmax"),
}


def verify_panel_model(name: str, path: Path | str) -> Counter[str]:
    """Check a panel file: full ONNX check, the intended op types, ONNX Runtime runs at two image sizes and at
    batch 1 and 4 (batch 1 only for fixed_batch); returns the op counts. Raises AssertionError."""
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = op_counts(proto)
    missing = [op for op in REQUIRED_OPS[name] if not ops[op]]
    assert not missing, f"{name}: no {', '.join(missing)} in {dict(ops)}"
    g = proto.graph
    if name == "nhwc":
        for i, node in enumerate(g.node):  # tf2onnx wraps each Conv/MaxPool in Transposes
            if node.op_type in ("Conv", "MaxPool"):
                assert g.node[i - 1].op_type == "Transpose" and g.node[i + 1].op_type == "Transpose", node.name
        names = [g.input[0].name, g.output[0].name] + [o for n in g.node for o in n.output]
        assert all(n.endswith(":0") for n in names), "tf2onnx tensor names end in :0"
        assert "Gemm" not in ops
    dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    dynamic = [i for i, d in enumerate(dims) if isinstance(d, str)]
    expected = {"yolo": [0, 2, 3], "dbnet": [0, 2, 3], "lcnet": [0, 2, 3], "fixed_batch": [], "nhwc": [0]}[name]
    assert dynamic == expected, f"{name}: dynamic input axes {dynamic}, want {expected} ({dims})"
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    sizes = {"yolo": (64, 96), "dbnet": (64, 96), "lcnet": (32, 64, 96), "fixed_batch": (8,), "nhwc": (8,)}[name]
    batches = (1,) if name == "fixed_batch" else (1, 4)
    for size in sizes:
        for b in batches:
            shape = (b, size, size, 1) if name == "nhwc" else (b, dims[1], size, size)
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            (y,) = sess.run(None, {g.input[0].name: x})
            assert np.isfinite(y).all(), f"{name}: non-finite output at {shape}"
            want = {"yolo": (b, 4 + NUM_CLASSES_YOLO, sum((size // s) ** 2 for s in (8, 16, 32))),
                    "dbnet": (b, 1, size, size)}.get(name, (b, 10))
            assert y.shape == want, f"{name}: output {y.shape} at input {shape}, want {want}"
    return ops


def latency_ms(path: Path | str, shape: tuple[int, ...], runs: int = 20) -> float:
    """Median ONNX Runtime latency (ms, one thread) of one input of ``shape``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.panel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="name", help=f"some of {', '.join(PANEL)} (default: all)")
    parser.add_argument("-o", "--output", default="build/panel", help="folder for <name>.onnx and <name>_test.npz")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in PANEL]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(PANEL)}")
    for name in args.names or PANEL:
        t0 = time.perf_counter()
        path, data, info = export_panel_model(name, args.output)
        ops = ", ".join(f"{op} {n}" for op, n in sorted(info["ops"].items(), key=lambda kv: (-kv[1], kv[0])))
        acc = f"top-1 {info['accuracy']:.2f} %" if info["accuracy"] is not None else "untrained"
        shape = tuple(int(d) for d in info["input_shape"].rsplit(":", 1)[1].split(","))
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB, {info['kind']}, {acc}, {info['input_shape']}, "
              f"{latency_ms(path, shape):.2f} ms, {time.perf_counter() - t0:.1f} s) + {data.name}: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
