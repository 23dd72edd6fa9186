"""Recovery benchmark: `onnxprune finetune` on pruned ResNet-56 (CIFAR-10) against a plain PyTorch fine-tune.

    python -m tools.bench_finetune                       # everything (about 90 minutes on 2 cores)
    python -m tools.bench_finetune --parts sr10 --ref-epochs 15

Data: fine-tuning on the JPEG test images 1017..9999 (with labels, or distillation only), evaluation on the
lossless first 1,017 images, which the tuning never sees. Teacher: the dense model.

Parts:
- sr10: the SR-init reference's 10 blocks removed (BN-folded ONNX export). Rows: the plain PyTorch fine-tune of
  the same pruned network with its BatchNorm layers (native torch module; labels + distillation at T=4 with the
  teacher run per batch, horizontal flips, SGD lr 0.01 cosine, momentum 0.9, wd 5e-4, batch 128,
  --ref-epochs epochs); onnxprune finetune with labels + distillation and with distillation only, each under
  a wall-clock budget equal to the reference's training time (teacher cache and calibration included); the
  same graph trained without inserted BatchNorm (what an onnx2torch-style conversion trains) for a few
  minutes; BatchNorm recalibration only.
- long: onnxprune finetune (labels + distillation) with a --long-minutes budget.
- channels / sparse: the channel-pruned ResNet-56 (50 % fewer FLOPs, uniform, streams kept, least-squares
  refit: tools/bench_channels.py's best row) and the 90 %-sparse (LAMP, unstructured) ResNet-56, each tuned
  for --minutes.

Evaluations after each epoch are kept off the clocks. Writes the "Recovery" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.paths import cifar_data
from onnxprune import FinetuneOptions, api
from onnxprune.runtime.data import Preprocess
from tools.benchlib import REFERENCE_BLOCKS, ROOT, bench_resnet56, machine, reference_block_plan, today, write_section

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DENSE_TOP1 = 92.72


def _data():
    pp = Preprocess(MEAN, STD)
    jpeg = np.load(cifar_data("jpeg"))
    lossless = np.load(cifar_data("lossless"))
    return (pp(jpeg["x"][1017:], np.float32), jpeg["y"][1017:].astype(np.int64),
            pp(lossless["x"], np.float32), lossless["y"].astype(np.int64))


def torch_reference(epochs: int, x, y, ex, ey) -> dict:
    """The plain PyTorch fine-tune of the pruned network that keeps its BatchNorm layers."""
    from models.resnet_cifar import load_pretrained

    torch.manual_seed(0)
    torch.set_num_threads(2)
    teacher = load_pretrained(56).eval()
    student = load_pretrained(56)
    blocks = [b for stage in (student.layer1, student.layer2, student.layer3) for b in stage]
    for i in REFERENCE_BLOCKS:
        assert isinstance(blocks[i].shortcut, nn.Identity)
        blocks[i].forward = lambda t: t  # the block's branch removed, its identity skip kept
    xt, yt, ext = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ex)

    def top1() -> float:
        student.eval()
        with torch.no_grad():
            return 100.0 * float((student(ext).argmax(1).numpy() == ey).mean())

    curve = [(0, 0.0, 0.0, top1())]
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    steps = epochs * int(np.ceil(len(x) / 128))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    wall = cpu = 0.0
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        student.train()
        perm = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), 128):
            idx = perm[b:b + 128]
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            with torch.no_grad():
                t_logits = teacher(xb)
            out = student(xb)
            kd = F.kl_div(F.log_softmax(out / 4, 1), F.log_softmax(t_logits / 4, 1), reduction="batchmean",
                          log_target=True) * 16
            loss = 0.5 * F.cross_entropy(out, yt[idx]) + 0.5 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        curve.append((epoch, wall, cpu, top1()))
        print(f"reference epoch {epoch}: {curve[-1][3]:.2f} % at {wall / 60:.1f} min", flush=True)
    return {"curve": curve, "top1": curve[-1][3], "minutes": wall / 60, "cpu_minutes": cpu / 60}


def ours(model, minutes: float, **kw) -> dict:
    labels = kw.pop("labels", None)
    teacher = kw.pop("teacher", bench_resnet56())
    opts = FinetuneOptions(epochs=kw.pop("epochs", 1000), max_minutes=minutes, **kw)
    out = ROOT / "build" / "bench" / f"tuned_{Path_stem(model)}_{int(time.time())}.onnx"
    def tick(phase, done, total, info):
        if phase == "epoch":
            print(f"  epoch {done}: {info['eval_top1']:.2f} % at {info['seconds'] / 60:.1f} min", flush=True)

    res = api.finetune(model, cifar_data("jpeg"), out, teacher=teacher, labels=labels, options=opts,
                       eval_data=cifar_data("lossless"), offset=1017, progress=tick)
    curve = [(0, 0.0, 0.0, res.calibrated_top1)] + [
        (h["epoch"], h["seconds"], h["cpu_seconds"], h["eval_top1"]) for h in res.history]
    last = res.history[-1] if res.history else {"seconds": res.seconds, "cpu_seconds": 0.0}
    print(f"ours {Path_stem(model)} {kw}: {res.after_top1:.2f} % in {last['seconds'] / 60:.1f} min", flush=True)
    return {"curve": curve, "top1": res.after_top1, "minutes": last["seconds"] / 60,
            "cpu_minutes": last["cpu_seconds"] / 60, "before": res.before_top1, "calibrated": res.calibrated_top1,
            "epochs": len(res.history), "teacher_seconds": res.teacher_seconds, "path": res.path}


def Path_stem(p) -> str:  # noqa: N802 - tiny helper
    return str(p).rsplit("/", 1)[-1].removesuffix(".onnx")


def _curve_text(curve) -> str:
    return ", ".join(f"{w / 60:.1f} min {t:.1f} %" for _, w, _, t in curve if t is not None)


def emit(head: list[str], rows: list, no_write: bool) -> None:
    """The table and curves so far, printed and written to BENCHMARKS.md (after every row: a long run that
    is cut off keeps what it measured)."""
    lines = list(head) + ["| model | recovery | top-1 before | top-1 after | minutes (CPU minutes) | epochs |",
                          "|---|---|---|---|---|---|"]
    for model, how, r in rows:
        before = r.get("before", r["curve"][0][3])
        lines.append(f"| {model} | {how} | {before:.2f} | **{r['top1']:.2f}** | {r['minutes']:.1f} "
                     f"({r['cpu_minutes']:.1f}) | {r.get('epochs', len(r['curve']) - 1)} |")
    lines += ["", "Curves (top-1 on the lossless 1,017 against wall minutes; the first point is after BatchNorm "
                  "calibration for onnxprune, the unchanged pruned network for the reference):", ""]
    for model, how, r in rows:
        lines.append(f"- {model}, {how}: {_curve_text(r['curve'])}")
    text = "\n".join(lines)
    print(text, flush=True)
    if not no_write:
        write_section("finetune", "## Recovery (onnxprune finetune)\n\n" + text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sr10,kd,nobn,long,channels,sparse")
    parser.add_argument("--kd-minutes", type=float, default=None,
                        help="budget of the distillation-only run (default: the reference's time)")
    parser.add_argument("--ref-epochs", type=int, default=15)
    parser.add_argument("--long-minutes", type=float, default=30.0)
    parser.add_argument("--minutes", type=float, default=8.0, help="budget of the channel and sparse runs")
    parser.add_argument("--ref-json", default=None,
                        help="reuse the reference row measured earlier (written by a run to build/bench/reference.json)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    folder = ROOT / "build" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    dense = bench_resnet56()
    sr10 = api.apply(dense, reference_block_plan(dense), folder / "resnet56_sr10.onnx", force=True).path
    lines = [f"Command: `python -m tools.bench_finetune --parts {args.parts} --ref-epochs {args.ref_epochs}"
             f" --long-minutes {args.long_minutes:g} --minutes {args.minutes:g}`; {machine()}; torch "
             f"{torch.__version__}; {today()}.", "",
             "Fine-tuned on the JPEG images 1017..9999 (8,983), evaluated on the lossless first 1,017 (never "
             f"trained on); dense ResNet-56: {DENSE_TOP1} %. Minutes are wall-clock on this 2-core machine with "
             "2 threads, evaluations excluded; onnxprune's include caching the teacher's logits and the "
             "BatchNorm calibration.", ""]
    rows = []
    if "sr10" in parts:
        if args.ref_json:
            ref = json.loads(Path(args.ref_json).read_text())
            lines.append(f"The reference row was measured on {ref['date']} on this machine by an earlier run "
                         f"(`--ref-json`), not in this process.\n")
        else:
            x, y, ex, ey = _data()
            ref = torch_reference(args.ref_epochs, x, y, ex, ey)
            del x, y, ex, ey
            ref["date"] = today()
            (folder / "reference.json").write_text(json.dumps(ref))
        budget = ref["minutes"]
        name = "SR-init 10 blocks removed"
        rows.append((name, f"plain PyTorch fine-tune, BN kept, {args.ref_epochs} epochs", ref))
        rows.append((name, "onnxprune --recalibrate-bn (no training)", ours(sr10, None, epochs=0)))
        emit(lines, rows, args.no_write)
        rows.append((name, "onnxprune finetune, labels + distillation, equal time", ours(sr10, budget)))
        emit(lines, rows, args.no_write)
    if "kd" in parts:
        kd_minutes = args.kd_minutes or budget
        rows.append(("SR-init 10 blocks removed", f"onnxprune finetune, distillation only, {kd_minutes:.1f} min",
                     ours(sr10, kd_minutes, labels=False)))
        emit(lines, rows, args.no_write)
    if "nobn" in parts:
        rows.append(("SR-init 10 blocks removed", "same graph without inserted BatchNorm (--insert-bn never), 3 min",
                     ours(sr10, 3.0, insert_bn="never")))
        emit(lines, rows, args.no_write)
    if "long" in parts:
        rows.append(("SR-init 10 blocks removed", f"onnxprune finetune, labels + distillation, "
                                                  f"{args.long_minutes:g} min", ours(sr10, args.long_minutes)))
        emit(lines, rows, args.no_write)
    if "channels" in parts:
        ch = folder / "channels_uniform_keep_refit.onnx"
        if not ch.exists():
            cplan = api.allocate(dense, method="uniform", granularity="channel", budget="flops", target_sparsity=0.5,
                                 round_to=8, coupled="keep")
            api.apply(dense, cplan, ch, force=True, data=cifar_data("jpeg"), offset=1017, limit=256)
        rows.append(("channels, 50 % fewer FLOPs (+ refit)", f"onnxprune finetune, labels + distillation, "
                                                             f"{args.minutes:g} min", ours(ch, args.minutes)))
        emit(lines, rows, args.no_write)
    if "sparse" in parts:
        splan = api.allocate(dense, method="lamp", target_sparsity=0.9)
        sp = api.apply(dense, splan, folder / "resnet56_lamp90.onnx", force=True).path
        rows.append(("90 % sparse (LAMP, unstructured)", f"onnxprune finetune, labels + distillation, "
                                                         f"{args.minutes:g} min", ours(sp, args.minutes)))
    emit(lines, rows, args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
