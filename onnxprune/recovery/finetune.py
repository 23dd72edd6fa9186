"""Fine-tuning and distillation of an ONNX model, and BatchNorm recalibration; the result is the same ONNX
graph with new weights.

The recipe (what the benchmark in tools/bench_finetune.py measured to work):

1. The graph becomes a torch module (onnxprune.recovery.convert). A graph without BatchNormalization (an
   export with BN folded into the convolutions) gets one after every convolution: exported graphs do not
   train like the network they came from without it.
2. The teacher (the unpruned model) runs once with ONNX Runtime over the data, and again over the flipped
   images when flips are an augmentation; its logits are cached, so distillation costs no teacher passes.
3. BatchNorm calibration: each inserted BatchNorm starts as the identity of the student's own statistics or,
   with a teacher, maps them to the teacher's statistics at the same tensor (what recalibrating the BN of an
   unfolded network does); the running statistics are then re-estimated over calibration samples (forward
   passes in training mode, cumulative average). Graphs with their own BatchNormalization get the same
   re-estimation. This alone (``epochs=0``) often recovers most of a removed block's damage.
4. SGD with momentum, cosine learning rate (over the epochs, or over ``max_minutes`` of wall time),
   cross-entropy on labels and/or distillation (KL at temperature T of class scores, else the squared error
   relative to the teacher's output); weights that were zero stay zero (masks).
5. The trained values are written back into the graph, inserted BatchNorms folded into their convolutions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxprune.errors import InputError
from onnxprune.recovery.convert import BN_EPS, OnnxModule
from onnxprune.recovery.options import FinetuneOptions
from onnxprune.runtime.data import InputSpec
from onnxprune.runtime.session import create_session

__all__ = ["PRUNABLE_OPS", "ChannelMoments", "EpochRecord", "Progress", "TrainReport", "build_module", "recalibrate",
           "teacher_outputs", "train"]

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_top1: float | None
    eval_top1: float | None
    lr: float
    seconds: float  # wall time since the start (teacher cache and calibration included, evaluations not)
    cpu_seconds: float  # process CPU time since the start (evaluations not included)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainReport:
    history: list[EpochRecord] = field(default_factory=list)
    inserted_bn: int = 0
    graph_bn: int = 0
    teacher_matched: int = 0  # inserted BatchNorms initialised to the teacher's statistics
    masked_weights: int = 0  # weights kept at zero
    teacher_seconds: float = 0.0
    calibration_seconds: float = 0.0
    initial_eval_top1: float | None = None  # after conversion, before calibration
    calibrated_eval_top1: float | None = None  # after calibration, before training
    steps: int = 0
    notes: list[str] = field(default_factory=list)


Progress = Callable[[str, int, int | None, dict], None]


def _flip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


def _crop(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n x w
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()


class ChannelMoments:
    """Per-channel (axis 1) mean and variance of a tensor, accumulated over batches in float64."""

    def __init__(self) -> None:
        self.sum: np.ndarray | float = 0.0
        self.sum_sq: np.ndarray | float = 0.0
        self.count = 0

    def add(self, t: np.ndarray) -> None:
        axes = (0,) + tuple(range(2, t.ndim))
        t64 = t.astype(np.float64)
        self.sum = self.sum + t64.sum(axes)
        self.sum_sq = self.sum_sq + (t64 * t64).sum(axes)
        self.count += t.size // t.shape[1]

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / self.count
        return mean, np.maximum(self.sum_sq / self.count - mean * mean, 0)


def teacher_outputs(teacher: ir.Model | str | os.PathLike, x: np.ndarray, batch_size: int, names: list[str],
                    stats_samples: int, provider: str = "cpu", progress: Progress | None = None,
                    flip: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The teacher's logits for ``x`` (and for ``x`` flipped), and the per-channel mean and variance of the
    tensors ``names`` over the first ``stats_samples`` samples; one ONNX Runtime pass each."""
    from onnxprune.runtime.graph_io import with_outputs

    proto = teacher if isinstance(teacher, onnx.ModelProto) else (
        ir.serde.serialize_model(teacher) if isinstance(teacher, ir.Model) else onnx.load(str(teacher)))
    output = proto.graph.output[0].name
    samples = len(x)
    plain = create_session(proto.SerializeToString(), provider).session
    stats_sess = create_session(with_outputs(proto, names, None).SerializeToString(), provider).session \
        if names else None  # (each tensor in its own type: float16 models)
    moments = {name: ChannelMoments() for name in names}
    fixed = plain.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed > 0:  # a graph that fixes its batch runs at that batch (last one padded)
        batch_size = fixed
        x = np.concatenate([x, np.zeros((-len(x) % fixed, *x.shape[1:]), x.dtype)])
    first = plain.get_inputs()[0]
    x = x.astype(InputSpec(first.name, first.type, first.shape).dtype or x.dtype, copy=False)  # float16 teachers
    n = len(x)
    logits, flipped = [], []
    total = n * (2 if flip else 1)
    done = 0
    for start in range(0, n, batch_size):
        xb = x[start:start + batch_size]
        if stats_sess is not None and start < stats_samples:
            outs = stats_sess.run([output] + names, {stats_sess.get_inputs()[0].name: xb})
            logits.append(outs[0])
            for name, t in zip(names, outs[1:], strict=True):
                moments[name].add(t)
        else:
            logits.append(plain.run([output], {plain.get_inputs()[0].name: xb})[0])
        done += len(xb)
        if progress:
            progress("teacher", done, total, {})
        if flip:
            flipped.append(plain.run([output], {plain.get_inputs()[0].name: np.ascontiguousarray(xb[..., ::-1])})[0])
            done += len(xb)
            if progress:
                progress("teacher", done, total, {})
    stats = {name: tuple(v.astype(np.float32) for v in mom.mean_var()) for name, mom in moments.items() if mom.count}
    return (np.concatenate(logits)[:samples].astype(np.float32),  # without the padding
            np.concatenate(flipped)[:samples].astype(np.float32) if flip else None, stats)


def _accuracy(module: OnnxModule, x: torch.Tensor, y: np.ndarray, batch: int = 500) -> float:
    module.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out = module(x[start:start + batch])
            hits += int((out.argmax(1).numpy() == y[start:start + batch]).sum())
    return 100.0 * hits / len(x)


def _bn_identity_init(module: OnnxModule, x: torch.Tensor, batch: int,
                      teacher_stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Inserted BatchNorms: each Conv's filters rescaled to unit output variance on ``x``; running statistics
    = the student's own (rescaled) statistics at the Conv output; affine = the identity of them, or the
    teacher's statistics where the teacher has the same tensor (same name and channel count). Returns how
    many took the teacher's."""
    names = {ins.output: i for i, ins in enumerate(module.inserted)}
    with torch.no_grad():
        for i in range(len(module.inserted)):  # exact identity while measuring
            mean, var = module.bn_stats(i)
            mean.zero_()
            var.fill_(1.0 - BN_EPS)
            module.bn_weight[i].fill_(1.0)
            module.bn_bias[i].zero_()
        module.eval()
        moments = {name: ChannelMoments() for name in names}
        for start in range(0, len(x), batch):
            captured: dict = {}
            module(x[start:start + batch], capture=set(names), captured=captured)
            for name, t in captured.items():
                moments[name].add(t.numpy())
        matched = 0
        for name, i in names.items():
            mean_s, var_s = (torch.from_numpy(v) for v in moments[name].mean_var())
            # Folded weights carry the old BatchNorm's scale gamma/sigma, which differs by orders of magnitude
            # between channels; behind a BatchNorm that scale only sets how fast a filter learns (the
            # effective learning rate goes as 1/|W|^2). Rescale every filter so that its output has unit
            # variance on the data (the forward pass is unchanged: the BatchNorm's statistics scale along).
            scale = torch.where(var_s > 1e-6, 1.0 / torch.sqrt(var_s.clamp(min=1e-12)), torch.ones_like(var_s))
            ins = module.inserted[i]
            w = module.tensor(ins.weight)
            w.mul_(scale.float().reshape((-1,) + (1,) * (w.dim() - 1)))
            if ins.bias is not None:
                module.tensor(ins.bias).mul_(scale.float())
            mean_0 = mean_s
            mean_s, var_s = mean_s * scale, var_s * scale * scale
            mean, var = module.bn_stats(i)
            mean.copy_(mean_s.float())
            var.copy_(var_s.float())
            target = teacher_stats.get(name)
            if target is not None and target[0].shape == (module.inserted[i].channels,):
                module.bn_weight[i].copy_(torch.from_numpy(np.sqrt(target[1] + BN_EPS)))
                module.bn_bias[i].copy_(torch.from_numpy(target[0]))
                matched += 1
            else:  # the identity: back to the Conv's original output
                module.bn_weight[i].copy_((torch.sqrt(var_s + BN_EPS) / scale).float())
                module.bn_bias[i].copy_(mean_0.float())
    return matched


def recalibrate(module: OnnxModule, x: torch.Tensor, batch: int) -> None:
    """Re-estimate every BatchNorm's running statistics over ``x``: forward passes with batch statistics,
    cumulative average, no gradients, nothing else changes."""
    module.train()
    momentum, module.bn_momentum, module._seen = module.bn_momentum, None, 0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch):
                module(x[start:start + batch])
    finally:
        module.bn_momentum = momentum
        module.eval()


def train(module: OnnxModule, x: torch.Tensor, y: np.ndarray | None, opts: FinetuneOptions, *,
          teacher_logits: np.ndarray | None = None, teacher_flipped: np.ndarray | None = None,
          teacher_stats: dict | None = None, eval_x: torch.Tensor | None = None, eval_y: np.ndarray | None = None,
          progress: Progress | None = None, start_time: float | None = None,
          start_cpu: float | None = None) -> TrainReport:
    """Calibrate and fine-tune ``module`` in place on preprocessed inputs ``x`` (and labels ``y`` and/or the
    teacher's cached logits). The labels are learnt when ``opts.labels``, and reported either way."""
    rep = TrainReport(inserted_bn=len(module.inserted),
                      graph_bn=sum(s.op == "BatchNormalization" for s in module.steps))
    t0 = time.perf_counter() if start_time is None else start_time
    c0 = time.process_time() if start_cpu is None else start_cpu
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    use_labels = opts.labels and y is not None
    if not use_labels and teacher_logits is None:
        raise InputError("nothing to learn from: give labels (--labels with labelled data) or --teacher ORIGINAL.onnx")
    evaluate = eval_x is not None and eval_y is not None
    spent = [0.0, 0.0]  # wall and CPU seconds spent on evaluations, kept off the clock

    def measure() -> float | None:
        if not evaluate:
            return None
        w, c = time.perf_counter(), time.process_time()
        top1 = _accuracy(module, eval_x, eval_y)
        spent[0] += time.perf_counter() - w
        spent[1] += time.process_time() - c
        return top1

    def clock() -> float:
        return time.perf_counter() - t0 - spent[0]

    rep.initial_eval_top1 = measure()
    # 1. calibration
    c_start = time.perf_counter()
    calib = x[: opts.calibration]
    if module.inserted:
        rep.teacher_matched = _bn_identity_init(module, calib, 256, teacher_stats or {})
    if opts.recalibrate and (rep.graph_bn or rep.teacher_matched):
        recalibrate(module, calib, 256)
    rep.calibration_seconds = time.perf_counter() - c_start
    rep.calibrated_eval_top1 = measure()
    if progress:
        progress("calibrated", 0, None, {"eval_top1": rep.calibrated_eval_top1})
    if opts.epochs == 0:
        return rep
    # 2. training
    masks = []
    if opts.keep_zeros:
        for s in module.steps:
            if s.op in PRUNABLE_OPS and len(s.inputs) > 1 and s.inputs[1] in module._param_of:
                p = module.tensor(s.inputs[1])
                zero = p.detach() == 0
                if bool(zero.any()):
                    masks.append((p, (~zero).float()))
                    rep.masked_weights += int(zero.sum())
    decay, no_decay = [], []
    for p in module.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": opts.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, momentum=opts.momentum,
                                nesterov=True)
    n = len(x)
    steps_per_epoch = math.ceil(n / opts.batch_size)
    total_steps = steps_per_epoch * opts.epochs
    budget = None if opts.max_minutes is None else opts.max_minutes * 60.0
    train_start = clock()  # the budget counts from the start (teacher and calibration included)
    t_logits = None if teacher_logits is None else torch.from_numpy(teacher_logits)
    t_flipped = None if teacher_flipped is None else torch.from_numpy(teacher_flipped)
    flip = "flip" in opts.augment
    crop = "crop" in opts.augment
    y_t = None if y is None else torch.from_numpy(np.asarray(y, np.int64))
    T = opts.temperature
    step = 0
    done = False
    for epoch in range(1, opts.epochs + 1):
        module.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, hits, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            frac = step / total_steps
            if budget is not None:
                frac = max(frac, (clock() - train_start) / max(budget - train_start, 1e-9))
            if frac >= 1.0:
                done = True
                break
            lr = 0.5 * opts.lr * (1 + math.cos(math.pi * frac))
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = perm[b * opts.batch_size:(b + 1) * opts.batch_size]
            if len(idx) < 2:
                continue
            xb = x[idx]
            flipped = None
            if flip:
                flipped = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flipped[:, None, None, None], _flip(xb), xb)
            if crop:
                xb = _crop(xb, gen)
            out = module(xb)
            loss = 0.0
            if use_labels:
                ce = F.cross_entropy(out, y_t[idx])
                loss = ce if t_logits is None else opts.label_weight * ce
            if t_logits is not None:
                tl = t_logits[idx]
                if flipped is not None and t_flipped is not None:
                    tl = torch.where(flipped.view(-1, *[1] * (tl.dim() - 1)), t_flipped[idx], tl)
                if tl.dim() == 2:  # class scores: KL at temperature T
                    kd = F.kl_div(F.log_softmax(out / T, 1), F.log_softmax(tl / T, 1), reduction="batchmean",
                                  log_target=True) * T * T
                else:  # boxes, maps: the squared error relative to the teacher's output energy
                    kd = F.mse_loss(out, tl, reduction="sum") / tl.square().sum().clamp_min(1e-12)
                loss = loss + (kd if not use_labels else (1 - opts.label_weight) * kd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for p, mask in masks:
                        p.mul_(mask)
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            if y is not None:
                hits += int((out.detach().argmax(1) == y_t[idx]).sum())
            if progress:
                progress("train", step, total_steps, {"epoch": epoch, "loss": loss_sum / max(seen, 1), "lr": lr})
        if seen:
            wall, cpu = clock(), time.process_time() - c0 - spent[1]
            record = EpochRecord(epoch, loss_sum / seen, 100.0 * hits / seen if y is not None else None,
                                 measure(), lr, wall, cpu)
            rep.history.append(record)
            if progress:
                progress("epoch", epoch, opts.epochs, record.to_dict())
        if done:
            break
    rep.steps = step
    module.eval()
    return rep


def build_module(model: ir.Model, insert_bn: str) -> OnnxModule:
    """The torch module of ``model``; BatchNorm is inserted after convolutions per ``insert_bn``."""
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph)
    has_conv = any(n.op_type == "Conv" for n in model.graph)
    insert = insert_bn == "always" or (insert_bn == "auto" and has_conv and not has_bn)
    return OnnxModule(model, insert_bn=insert)
