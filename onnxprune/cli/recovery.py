"""The command that recovers accuracy after pruning: finetune."""

from __future__ import annotations

import click
from rich.markup import escape

from onnxprune import api
from onnxprune.cli.options import common_options, output_option, runtime_options
from onnxprune.cli.render import emit_json, err, notice, notices, out, progress_bar, quiet
from onnxprune.errors import InputError, plural

__all__ = ["finetune"]


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@output_option("Where to write the tuned model (the same graph with new weights).")
@click.option("--teacher", type=click.Path(path_type=str), default=None,
              help="The unpruned ONNX model to distil from (run once with ONNX Runtime, its logits cached).")
@click.option("--labels/--no-labels", default=None,
              help="Train on the data's labels (cross-entropy). Default: when the data has labels.")
@click.option("--epochs", type=int, default=None, help="Passes over the data [default: 10].")
@click.option("--lr", type=float, default=0.01, show_default=True, help="Peak learning rate (SGD, cosine).")
@click.option("--max-minutes", type=float, default=None,
              help="Stop after this many minutes (teacher cache and calibration included); the cosine "
                   "schedule is stretched to it.")
@click.option("--augment", default="auto", show_default=True,
              help="Comma list of flip, crop (pad 4, random crop back to the input size), or none; auto is "
                   "flip for image inputs (N, C, H, W) and none otherwise.")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Distillation temperature.")
@click.option("--label-weight", type=float, default=0.5, show_default=True,
              help="With labels and a teacher: weight of the cross-entropy (the distillation gets the rest).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--recalibrate-bn", is_flag=True,
              help="No training: only re-estimate the BatchNorm statistics on the data (seconds). Folded graphs "
                   "need --teacher: their convolutions are mapped to the teacher's statistics.")
@click.option("--insert-bn", type=click.Choice(api.INSERT_BN), default="auto", show_default=True,
              help="Put BatchNorm after convolutions for training (auto: when the graph has none); folded back.")
@click.option("--calibration", type=int, default=2048, show_default=True,
              help="Samples for the BatchNorm statistics.")
@click.option("--keep-zeros/--no-keep-zeros", default=True, show_default=True,
              help="Zero weights of Conv/Gemm/MatMul stay zero (keeps an unstructured plan's sparsity).")
@click.option("--eval-data", type=click.Path(path_type=str), default=None,
              help="Held-out labelled .npz measured after every epoch and on the written model.")
@click.option("--eval-offset", type=int, default=0, show_default=True)
@click.option("--eval-limit", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("--force", is_flag=True, help="Allow -o to overwrite MODEL.")
@runtime_options(batch_size=128, batch_help="Training batch size.")
@common_options
def finetune(model, output, teacher, labels, epochs, lr, max_minutes, augment, temperature, label_weight,
             weight_decay, recalibrate_bn, insert_bn, calibration, keep_zeros, eval_data, eval_offset, eval_limit,
             seed, threads, force, data_spec, input_shapes, as_json):
    """Recover the accuracy of a pruned MODEL: fine-tune on labels and/or distil from --teacher, and write
    the same ONNX graph with the trained weights (needs torch: pip install 'onnxprune[torch]').

    Graphs whose BatchNorm was folded into the convolutions get BatchNorm back for training (started from
    the teacher's statistics when there is a teacher) and folded again on export.

    \b
    Examples:
      onnxprune finetune pruned.onnx --data cifar10_test_jpeg_q75.npz --offset 1017 \\
          --teacher resnet56.onnx --epochs 15 --eval-data cifar10_test_lossless_first1017.npz -o tuned.onnx
      onnxprune finetune pruned.onnx --data train.npz --teacher model.onnx --recalibrate-bn -o recal.onnx
    """
    if recalibrate_bn and epochs:
        raise InputError("--recalibrate-bn trains nothing; drop --epochs (fine-tuning recalibrates first anyway)")
    if data_spec.data is None and data_spec.loader is None:
        raise InputError("finetune needs training data: --data FILE.npz or --data-loader-script FILE.py[:func]")
    aug = tuple(a.strip() for a in augment.split(",") if a.strip() and a.strip() != "none")
    opts = api.FinetuneOptions(epochs=0 if recalibrate_bn else (10 if epochs is None else epochs), lr=lr,
                           batch_size=data_spec.batch_size, weight_decay=weight_decay, augment=aug,
                           temperature=temperature, label_weight=label_weight, insert_bn=insert_bn,
                           calibration=calibration, keep_zeros=keep_zeros, max_minutes=max_minutes, seed=seed,
                           threads=threads)
    espec = None
    if eval_data is not None:
        espec = api.DataSpec(data=eval_data, input_key=data_spec.input_key, label_key=data_spec.label_key,
                             mean=data_spec.mean, std=data_spec.std, offset=eval_offset, limit=eval_limit)
    with progress_bar("preparing") as bar:

        def tick(phase, done, total, info):
            if phase == "teacher":
                bar(done, total, description="caching teacher logits")
            elif phase == "calibrated":
                if info.get("eval_top1") is not None:
                    notice(f"BatchNorm calibrated: eval top-1 {info['eval_top1']:.2f} %")
                bar(0, None, description="training")
            elif phase == "train":
                bar(done, total, description=f"epoch {info['epoch']} loss {info['loss']:.4f}")
            elif phase == "epoch" and not quiet():
                parts = [f"epoch {done}/{total}", f"loss {info['loss']:.4f}"]
                if info.get("train_top1") is not None:
                    parts.append(f"train top-1 {info['train_top1']:.2f} %")
                if info.get("eval_top1") is not None:
                    parts.append(f"eval top-1 {info['eval_top1']:.2f} %")
                parts.append(f"{info['seconds'] / 60:.1f} min")
                err.print("  ".join(parts), highlight=False)

        result = api.finetune(model, data_spec, output, teacher=teacher, labels=labels, eval_data=espec,
                              options=opts, force=force, progress=tick, input_shapes=input_shapes)
    notices(result.notes)
    if as_json:
        emit_json(result.to_dict())
        return
    what = " + ".join(w for w, on in (("labels", result.labels), ("distillation", result.teacher)) if on)
    if not result.history:
        out.print(f"[bold]Recalibrated[/] BatchNorm statistics on {opts.calibration:,} samples "
                  f"({result.graph_bn} BatchNorm layers in the graph, {result.inserted_bn} inserted)")
    else:
        out.print(f"[bold]Fine-tuned[/] {plural(len(result.history), 'epoch')} ({what}) in {result.seconds / 60:.1f} min")
    if result.before_top1 is not None:
        out.print(f"eval top-1: {result.before_top1:.2f} % before, {result.calibrated_top1:.2f} % after BatchNorm "
                  f"calibration, {result.after_top1:.2f} % written model (ONNX Runtime)")
    out.print(f"wrote {escape(str(result.path))} (checked: onnx.checker full + ONNX Runtime)")
