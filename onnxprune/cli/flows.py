"""The one-command flows: prune (score, allocate, apply), sweep and report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from onnxprune import api, workflows
from onnxprune.cli.options import backend_options, common_options, data_options, output_option, round_to_option
from onnxprune.cli.render import emit_json, fmt_flops, fmt_int, fmt_kib, notice, notices, out, progress_bar
from onnxprune.errors import InputError

__all__ = ["prune", "report", "sweep"]


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--target-sparsity", type=float, default=None, help="Zero this fraction of the weights (unstructured).")
@click.option("--target-flops", type=float, default=None,
              help="Remove whole channels until this fraction of the FLOPs is gone.")
@click.option("--remove-blocks", type=int, default=None, metavar="K",
              help="Remove the K residual blocks SR-init finds least important (needs --data).")
@click.option("--method", default=None,
              help="Allocation: lamp (default for --target-sparsity), uniform (default for --target-flops), "
                   "capacity, global, erk, sensitivity or search (these two need --data).")
@round_to_option("--target-flops: kept channel counts in multiples of N (auto: the multiple this machine's "
                 "convolutions need, 8 with AVX2, 16 with AVX-512).")
@click.option("--criterion", type=click.Choice(api.WEIGHT_CRITERIA), default="magnitude", show_default=True,
              help="--target-sparsity: how each layer's zeros are chosen; wanda and obs (SparseGPT: the kept "
                   "weights updated) from the layers' inputs on --data.")
@click.option("--damp", type=float, default=None,
              help="obs: dampening added to the Hessian's diagonal, times its mean (default 0.01).")
@click.option("--block-size", type=int, default=None, help="obs: inputs pruned together (default 128).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of SR-init and search.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--eval-data", type=click.Path(path_type=str), default=None,
              help="Held-out .npz for accuracy before and after (fed like --data); default: --data itself.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs (even MODEL).")
@backend_options
@data_options
@output_option("The pruned model; OUT.scores.json and OUT.plan.json are written beside it.")
@common_options
def prune(model, target_sparsity, target_flops, remove_blocks, method, round_to, criterion, damp, block_size, seed,
          no_latency, eval_data, force, backend, data_spec, input_shapes, output, as_json):
    """Score, allocate and apply in one command; print MODEL before and after.

    --data is optional: with labels it adds accuracy before and after, with --target-flops it refits the
    layers that lose inputs, and --remove-blocks needs it (SR-init measures each block).

    \b
    Examples:
      onnxprune prune build/resnet56.onnx --target-sparsity 0.7 -o build/r56_sparse.onnx
      onnxprune prune build/resnet56.onnx --target-flops 0.5 --round-to 8 --data cifar10_test_jpeg_q75.npz \\
          --offset 1017 --limit 256 -o build/r56_small.onnx
      onnxprune prune build/resnet56.onnx --remove-blocks 10 --data cifar10_test_jpeg_q75.npz --limit 1000 \\
          -o build/r56_shallow.onnx
    """
    with progress_bar("pruning") as bar:
        result = workflows.prune(model, output, target_sparsity=target_sparsity, target_flops=target_flops,
                                 remove_blocks=remove_blocks, method=method, round_to=round_to, seed=seed,
                                 criterion=criterion, damp=damp, block_size=block_size, backend=backend,
                                 latency=not no_latency, force=force, data=data_spec if data_spec.given else None,
                                 eval_data=eval_data, progress=bar.describe, input_shapes=input_shapes,
                                 input_values=data_spec.input_values)
    notices(result.notes)
    for name, why in result.applied.skipped.items():
        notice(f"{name}: {why}")
    if as_json:
        emit_json(result.to_dict())
        return
    b, a = result.before, result.after
    out.print(f"[bold]{escape(model)}[/] -> [bold]{escape(str(result.path))}[/] ({result.mode}, {result.method})")
    table = Table()
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="left" if not col else "right")

    def row(label, x, y, fmt, better_lower=True):
        if x is None or y is None:
            table.add_row(label, fmt(x) if x is not None else "-", fmt(y) if y is not None else "-", "")
            return
        change = f"{y / x:.2f}x" if better_lower and x else f"{y - x:+.2f} pts"
        table.add_row(label, fmt(x), fmt(y), change)

    row("parameters", b.params, a.params, fmt_int)
    row("FLOPs/sample", b.flops, a.flops, fmt_flops)
    row("file", b.file_bytes, a.file_bytes, fmt_kib)
    row("latency (batch 1)", b.latency_ms, a.latency_ms, lambda v: f"{v:.3f} ms")
    if b.top1 is not None or a.top1 is not None:
        row("top-1", b.top1, a.top1, lambda v: f"{v:.2f} %", better_lower=False)
        row("top-5", b.top5, a.top5, lambda v: f"{v:.2f} %", better_lower=False)
    if a.output_error is not None:
        table.add_row("output error vs dense", "0 %", f"{a.output_error:.2f} %", "")
    out.print(table)
    t = result.applied.totals
    if result.mode == "unstructured":
        out.print(f"zeroed {fmt_int(t['zeros'])} of {fmt_int(t['weights'])} weights (sparsity "
                  f"{t['params_sparsity']:.4f}); zeros shrink the file only with apply --store sparse, and run "
                  "faster only on sparse kernels")
    out.print(f"wrote {escape(str(result.path))} (checked: {result.applied.checked}), "
              f"{escape(str(result.scores_path))}, {escape(str(result.plan_path))}")


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--sparsities", default="0.5,0.7,0.9", show_default=True, metavar="S,S,...",
              help="Targets to try, each in [0, 1).")
@click.option("--methods", default="capacity,uniform,lamp", show_default=True, metavar="M,M,...",
              help=f"Allocation methods: {', '.join(m for m in api.ALLOCATION_METHODS if m != 'srinit')}.")
@click.option("--granularity", type=click.Choice(api.ALLOCATION_GRANULARITIES), default="unstructured",
              show_default=True, help="Zero weights, or remove channels (then the target is a fraction of --budget).")
@click.option("--budget", type=click.Choice(api.BUDGETS), default="params", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of search.")
@click.option("--criteria", default="magnitude", show_default=True, metavar="C,C,...",
              help="unstructured: how each layer's zeros are chosen, each tried with every method: magnitude, "
                   "wanda, obs (these two need --calibration-data).")
@click.option("--calibration-data", type=click.Path(path_type=str), default=None,
              help="wanda / obs: .npz of calibration samples, fed like --data; keep them out of --data.")
@click.option("--calibration-offset", type=int, default=0, show_default=True)
@click.option("--calibration-limit", type=int, default=128, show_default=True)
@backend_options
@data_options
@output_option("Where to write sweep.json.")
@common_options
def sweep(model, sparsities, methods, granularity, budget, seed, criteria, calibration_data, calibration_offset,
          calibration_limit, backend, data_spec, input_shapes, output, as_json):
    """Accuracy against sparsity for several allocation methods (one-shot, no recovery), on labelled data.

    \b
    Example:
      onnxprune sweep build/resnet56.onnx --data cifar10_test_lossless.npz --limit 1000 \\
          --sparsities 0.5,0.7,0.9 --methods capacity,uniform,lamp -o sweep.json
      onnxprune report --sweep sweep.json -o report.html
    """
    if not data_spec.given:
        raise InputError("sweep needs labelled data: --data FILE.npz (or --data-loader-script)")
    api.check_output_path(Path(output), input_path=[model, data_spec.data], forceable=False)
    targets = api.parse_floats(sparsities, "sparsities")
    names = tuple(x.strip() for x in methods.split(",") if x.strip())
    chosen = tuple(x.strip() for x in criteria.split(",") if x.strip())
    calibration = None
    if calibration_data is not None:
        calibration = dataclasses.replace(data_spec, data=calibration_data, loader=None,
                                          offset=calibration_offset, limit=calibration_limit)
    with progress_bar("sweeping") as tick:
        result = workflows.sweep(model, data_spec, sparsities=targets, methods=names, granularity=granularity,
                                 budget=budget, seed=seed, criteria=chosen, calibration=calibration,
                                 backend=backend, progress=tick, input_shapes=input_shapes)
    api.write_json(result.to_dict(), output)
    for r in result.rows:
        if "error" in r:
            notice(f"{r['method']} at {r['sparsity']:g}: {r['error']}")
    if as_json:
        emit_json(result.to_dict())
        return
    metric = result.metric
    table = Table(title=f"{result.metric_label} after one-shot pruning", title_justify="left")
    table.add_column("method")
    for s in targets:
        table.add_column(f"{s:g}", justify="right")
    for name in dict.fromkeys(r["method"] for r in result.rows):
        cells = []
        for s in targets:
            r = next(r for r in result.rows if r["method"] == name and r["sparsity"] == s)
            cells.append("-" if r.get(metric) is None else f"{r[metric]:.2f}")
        table.add_row(name, *cells)
    out.print(table)
    if metric == "top1":
        out.print(f"dense {escape(model)}: top-1 {result.dense['top1']:.2f} % on {result.dense['samples']:,} samples")
    else:
        out.print(f"the data has no labels: each pruned model's outputs compared with those of {escape(model)} "
                  f"on {result.dense['samples']:,} samples (0 = identical, 100 = as far off as all zeros)")
    out.print(f"wrote {escape(output)}")


@click.command()
@click.option("--scores", "scores_path", type=click.Path(path_type=str), help="scores.json from onnxprune score.")
@click.option("--plan", "plan_path", type=click.Path(path_type=str), help="plan.json from onnxprune allocate.")
@click.option("--sweep", "sweep_path", type=click.Path(path_type=str), help="sweep.json from onnxprune sweep.")
@click.option("--title", default=None, help="Heading of the report.")
@output_option("Where to write the HTML report.")
@common_options
def report(scores_path, plan_path, sweep_path, title, output, as_json):
    """A self-contained HTML report with plots (needs onnxprune[report], i.e. matplotlib).

    SR-init scores: per-block drop as bars with the plan's threshold and removed blocks; layer scores:
    importance and allocated sparsity per layer; a sweep: top-1 against sparsity per method.

    \b
    Example:
      onnxprune report --scores sr.json --plan blocks.json --sweep sweep.json -o report.html
    """
    inputs = [p for p in (scores_path, plan_path, sweep_path) if p]
    api.check_output_path(Path(output), input_path=inputs, forceable=False)
    path = api.report(output, scores=api.load_scores(scores_path) if scores_path else None,
                      plan=api.load_plan(plan_path) if plan_path else None,
                      sweep=api.load_sweep(sweep_path) if sweep_path else None, title=title)
    if as_json:
        emit_json({"output": str(path), "bytes": path.stat().st_size,
                   "inputs": {"scores": scores_path, "plan": plan_path, "sweep": sweep_path}})
        return
    out.print(f"wrote {escape(str(path))} ({fmt_kib(path.stat().st_size)})")
