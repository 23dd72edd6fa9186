"""The commands that read a model without changing it: inspect and eval."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from onnxprune import api
from onnxprune.cli.options import common_options, data_options, input_shape_option
from onnxprune.cli.render import emit_json, fmt_flops, fmt_int, notice, notices, out, progress_bar, titled_table
from onnxprune.errors import plural

__all__ = ["eval_cmd", "inspect"]


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@input_shape_option
@common_options
def inspect(model: str, input_shapes, as_json: bool):
    """Show the prunable layers and residual blocks of MODEL, with parameters and FLOPs.

    \b
    FLOPs are per sample, 2 per multiply-accumulate, at --input-shape for dynamic dimensions (without it
    the notes say which dimension counted as 1).
    Examples:
      onnxprune inspect build/resnet56.onnx --json
      onnxprune inspect yolov8n.onnx --input-shape images:1,3,640,640
    """
    result = api.inspect(model, input_shapes=input_shapes)
    if as_json:
        emit_json(result.to_dict())
        notices(result.notes)
        return
    layers = titled_table(f"Prunable layers of {model}",
                          ("#", "layer", "op", "weight shape", "params", "FLOPs", "BN"),
                          left=("layer", "op", "weight shape", "BN"))
    for i, layer in enumerate(result.layers):
        shared = f" (shared with {layer.shared_with})" if layer.shared_with else ""
        layers.add_row(str(i), escape(layer.name), layer.op_type,
                       "x".join(map(str, layer.weight_shape)) + escape(shared),
                       fmt_int(layer.params), fmt_flops(layer.flops), escape(layer.bn or ""))
    out.print(layers)
    if result.blocks:
        blocks = titled_table("Residual blocks",
                              ("#", "block (join node)", "skip", "removable", "layers", "params", "FLOPs"),
                              left=("block (join node)", "skip", "removable"))
        for i, b in enumerate(result.blocks):
            blocks.add_row(str(i), escape(b.name), b.skip, "yes" if b.removable else escape(f"no: {b.reason}"),
                           str(len(b.layers)), fmt_int(b.params), fmt_flops(b.flops))
        out.print(blocks)
    else:
        out.print("Residual blocks: none found")
    d = result.to_dict()["totals"]
    out.print(
        f"[bold]Totals:[/] {plural(d['layers'], 'prunable layer')}"
        + (" (" + ", ".join(f"{n} {op}" for op, n in _count_ops(result.layers)) + ")" if result.layers else "")
        + f", {plural(d['blocks'], 'residual block')} ({d['removable_blocks']} removable), "
        f"{fmt_int(result.params)} parameters ({fmt_int(result.prunable_params)} in prunable layers), "
        f"{fmt_flops(result.flops)} FLOPs per sample"
    )
    notices(result.notes)


def _count_ops(layers) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.op_type] = counts.get(layer.op_type, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


@click.command(name="eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--reference", type=click.Path(path_type=str), default=None,
              help="The model MODEL was pruned from: also measure how far MODEL's outputs are from its outputs "
                   "(output error, %; for any outputs, no labels needed).")
@click.option("--task", type=click.Choice(api.EVAL_TASKS), default="auto", show_default=True,
              help="lm: a decoder language model on token sequences (--data with input_ids): perplexity, and "
                   "prefill / per-token decode latency with the KV cache; auto detects one.")
@data_options
@common_options
def eval_cmd(model, reference, task, data_spec, input_shapes, as_json):
    """Measure top-1 / top-5 accuracy and throughput of MODEL with ONNX Runtime.

    \b
    uint8 inputs are scaled to [0,1] before --mean/--std. Without labels: throughput only, and with
    --reference the output error against the model MODEL was pruned from (detectors, maps, embeddings).
    Example:
      onnxprune eval build/resnet56.onnx --data cifar10_test_lossless_first1017.npz \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    """
    with progress_bar("evaluating") as tick:
        result = api.evaluate(model, data_spec, progress=tick, input_shapes=input_shapes, reference=reference,
                              task=task)
    notice(result.notice)
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title=f"Evaluation of {model}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    lm = result.language_model
    if lm is not None:
        table.add_row("perplexity", f"{lm.perplexity:.3f} ({lm.tokens:,} next tokens)")
        if lm.prefill_ms is not None:
            table.add_row(f"prefill of {lm.context} tokens", f"{lm.prefill_ms:.2f} ms (batch 1)")
            table.add_row(f"decode at context {lm.context}", f"{lm.decode_ms:.3f} ms per token (batch 1)")
    elif result.top1 is not None:
        table.add_row("top-1", f"{result.top1:.2f} %")
        table.add_row("top-5", f"{result.top5:.2f} %")
    elif result.output_error is None:
        table.add_row("accuracy", "no labels (give --reference to compare outputs)")
    if result.output_error is not None:
        table.add_row("output error vs reference", f"{result.output_error:.3f} % (0 = identical)")
    table.add_row("samples", f"{result.samples:,}")
    table.add_row("throughput", f"{result.throughput:,.1f} samples/s (batch {result.batch_size})")
    table.add_row("time in ONNX Runtime", f"{result.seconds:.3f} s")
    table.add_row("provider", result.provider)
    if result.preprocess:
        table.add_row("preprocessing", result.preprocess)
    out.print(table)
