"""The step-by-step commands: score, allocate and apply."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from onnxprune import api
from onnxprune.cli.options import backend_options, common_options, data_options, output_option, round_to_option
from onnxprune.cli.render import (
    emit_json,
    fmt_flops,
    fmt_int,
    fmt_kib,
    fmt_percent,
    fmt_ratio,
    notice,
    out,
    progress_bar,
    titled_table,
)
from onnxprune.errors import InputError, plural

__all__ = ["allocate", "apply", "score"]


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--method", type=click.Choice(api.SCORE_METHODS), default="capacity", show_default=True,
              help="capacity: data-free, from the weights; sensitivity: measured on --data.")
@click.option("--metric", default=None,
              help=f"capacity: {', '.join(api.CAPACITY_METRICS)} (default {api.DEFAULT_CAPACITY_METRIC}); "
                   f"sensitivity, srinit: {', '.join(api.SENSITIVITY_METRICS)} (default: kl / top-1 for class "
                   f"scores, kl of next-token distributions for a language model, error (relative output error) "
                   f"for any other outputs).")
@click.option("--grid", default=None, metavar="S,S,...", help="Sparsities measured per layer (sensitivity).")
@click.option("--at", "at_plan", type=click.Path(path_type=str), default=None,
              help="sensitivity: measure around this plan (the other layers pruned as planned).")
@click.option("--tolerance", type=float, default=1.0, show_default=True,
              help="compactness: allowed drop in top-1 points (agreement points without labels).")
@click.option("--units", type=click.Choice(api.SRINIT_UNITS), default="blocks", show_default=True,
              help="srinit, influence: residual blocks, transformer-layers (an attention block with the MLP "
                   "block after it: a decoder layer, removed with its KV cache) or (srinit) single layers.")
@click.option("--seed", type=int, default=1, show_default=True, help="srinit: seed of the fresh initialisation.")
@click.option("--seeds", type=int, default=1, show_default=True, help="srinit: repeat over K seeds.")
@click.option("--max-memory", default="2GB", show_default=True, metavar="SIZE",
              help="srinit: bound on the cached activations (e.g. 512MB, 4GB); more data runs in chunks.")
@backend_options
@data_options
@output_option("Where to write scores.json.")
@common_options
def score(model, method, metric, grid, at_plan, tolerance, units, seed, seeds, max_memory, backend, data_spec,
          input_shapes, output, as_json):
    """Score the importance of every prunable layer of MODEL.

    \b
    Examples:
      onnxprune score build/resnet56.onnx --method capacity --metric effective_rank -o scores.json
      onnxprune score build/resnet56.onnx --method sensitivity --data cifar10_test_jpeg_q75.npz \\
          --offset 1017 --limit 512 -o sensitivity.json
      onnxprune score build/resnet56.onnx --method compactness --tolerance 1.0 --data ... -o compactness.json
      onnxprune score build/resnet56.onnx --method srinit --data cifar10_test_jpeg_q75.npz --offset 1017 -o sr.json
    """
    api.check_output_path(Path(output), input_path=[model, at_plan, data_spec.data], forceable=False)
    memory = api.parse_size(max_memory, "max-memory")
    with progress_bar(f"scoring ({method})") as tick:
        scores = api.score(
            model, method, metric=metric, data=data_spec, grid=api.parse_floats(grid, "grid"), at=at_plan,
            tolerance=tolerance, units=units, seed=seed, seeds=seeds, max_memory=memory, progress=tick,
            input_shapes=input_shapes, backend=backend,
        )
    api.write_json(scores.to_dict(), output)
    notice(scores.options.get("metric_note"))
    if as_json:
        emit_json({**scores.to_dict(), "timing": scores.timing})
        return
    title = f"{scores.method} scores ({scores.metric}) of {model}"
    if scores.method == "srinit":
        several = scores.options["seeds"] > 1
        cols = ["#", scores.unit_kind[:-1], "params", f"{scores.metric} drop", "+/- (s.e.)"]
        cols += ["std over seeds"] if several else []
        table = titled_table(title, (*cols, "seconds", "candidate"), left=("block", "layer", "candidate"))
        for i, u in enumerate(scores.units):
            row = [str(i), escape(u["name"]), fmt_int(u["params"]), _value(u["drop"], ".3f"), _value(u["drop_se"], ".3f")]
            row += [_value(u.get("drop_seed_std"), ".3f")] if several else []
            table.add_row(*row, f"{scores.timing['units'][u['name']]:.1f}", "" if "removable" not in u else
                          ("yes" if u["removable"] and u.get("skip") == "identity" else "no"))
    elif scores.method == "influence":
        table = titled_table(title, ("#", "block", "params", "influence", "candidate"), left=("block", "candidate"))
        for i, u in enumerate(scores.units):
            table.add_row(str(i), escape(u["name"]), fmt_int(u["params"]), f"{u['drop']:.4f}",
                          "yes" if u["removable"] and u["skip"] == "identity" else "no")
    else:
        value_col = f"mean {scores.metric} drop" if scores.method == "sensitivity" else scores.metric
        table = titled_table(title, ("#", "layer", "op", "params", value_col, "importance"), left=("layer", "op"))
        for i, u in enumerate(scores.units):
            value = u["mean_drop"] if scores.method == "sensitivity" else u["metrics"][scores.metric]
            table.add_row(str(i), escape(u["name"]), u["op_type"], fmt_int(u["params"]), _value(value, ".4g"),
                          f"{u['importance']:.3f}")
    out.print(table)
    unscored = [u for u in scores.units if u.get("unscored")]
    if unscored:
        notice(f"{plural(len(unscored), 'layer')} not scored ({unscored[0]['unscored']}): importance 1, kept whole by "
               "sensitivity plans; score with data that reaches them")
    if scores.method == "srinit":
        ref = scores.options["reference"]
        out.print(f"{scores.options['samples']:,} samples, reference "
                  + (f"top-1 {ref['top1']:.2f} %, " if "top1" in ref else "")
                  + f"{scores.timing['seconds']:.1f} s on {scores.options['provider']}")
    out.print(f"wrote {escape(output)}")


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--scores", "scores_path", type=click.Path(path_type=str), help="scores.json from onnxprune score.")
@click.option("--target-sparsity", type=float, default=None, help="Total sparsity S in [0, 1).")
@click.option("--threshold", type=float, default=None, help="srinit: remove blocks whose drop is <= T.")
@click.option("--remove", type=int, default=None, help="srinit: remove the K least sensitive blocks.")
@click.option("--target-params", type=float, default=None,
              help="srinit: remove the fewest blocks that take this fraction of the parameters.")
@click.option("--method", type=click.Choice(api.ALLOCATION_METHODS), default="capacity", show_default=True)
@click.option("--min-sparsity", type=float, default=0.0, show_default=True, help="Lower bound for every layer.")
@click.option("--max-sparsity", type=float, default=0.99, show_default=True, help="Upper bound for every layer.")
@click.option("--keep-dense", multiple=True, metavar="NAME", help="Leave this layer dense (repeatable).")
@click.option("--budget", type=click.Choice(api.BUDGETS), default="params", show_default=True,
              help="Weight the total by parameters or by FLOPs.")
@click.option("--force", is_flag=True, help="Use scores made for another model.")
@click.option("--iterations", type=int, default=150, show_default=True, help="search: mutations to try.")
@click.option("--seed", type=int, default=0, show_default=True, help="search: random seed.")
@click.option("--granularity", type=click.Choice(api.ALLOCATION_GRANULARITIES), default="unstructured",
              show_default=True, help="channel: plan whole output channels; the target is the fraction of "
                                      "parameters (or FLOPs with --budget flops) their removal takes away.")
@click.option("--criterion", type=click.Choice(api.CRITERIA), default="l2", show_default=True,
              help="channel: the norm that ranks channels.")
@round_to_option("channel: keep channel counts multiples of N (ONNX Runtime's fast CPU convolutions work on "
                 "blocks of 8 with AVX2, 16 with AVX-512; auto picks this machine's, recorded in the plan); "
                 "the target is still met. An explicit N gives the same plan on every machine.")
@click.option("--coupled", type=click.Choice(api.COUPLED), default="prune", show_default=True,
              help="channel: keep leaves channels written by several layers (residual streams) whole.")
@data_options
@output_option("Where to write plan.json.")
@common_options
def allocate(model, scores_path, target_sparsity, threshold, remove, target_params, method, min_sparsity, max_sparsity,
             keep_dense, budget, force, iterations, seed, granularity, criterion, round_to, coupled, data_spec,
             input_shapes, output, as_json):
    """Turn scores and a budget into a plan: a sparsity for every layer of MODEL.

    \b
    capacity / sensitivity read --scores; uniform, global, lamp, erk need only the model;
    search measures whole pruned models on calibration data (--data) and can start from --scores
    of onnxprune score --method sensitivity.
    Examples:
      onnxprune allocate build/resnet56.onnx --scores scores.json --target-sparsity 0.7 --method capacity -o plan.json
      onnxprune allocate build/resnet56.onnx --method search --target-sparsity 0.7 \\
          --data cifar10_test_jpeg_q75.npz --offset 1017 --limit 512 -o plan.json
      onnxprune allocate build/resnet56.onnx --method uniform --granularity channel --budget flops \\
          --target-sparsity 0.5 --round-to 8 -o channels.json
    """
    api.check_output_path(Path(output), input_path=[model, scores_path, data_spec.data], forceable=False)
    with progress_bar(f"allocating ({method})") as tick:
        plan = api.allocate(
            model, target_sparsity=target_sparsity, method=method, scores=scores_path, min_sparsity=min_sparsity,
            max_sparsity=max_sparsity, keep_dense=keep_dense, budget=budget, force=force, data=data_spec,
            iterations=iterations, seed=seed, threshold=threshold, remove=remove, target_params=target_params,
            granularity=granularity, criterion=criterion, round_to=round_to, coupled=coupled, progress=tick,
            input_shapes=input_shapes,
        )
    api.write_json(plan.to_dict(), output)
    if as_json:
        emit_json(plan.to_dict())
        return
    if plan.blocks or method == "srinit":
        table = titled_table(f"srinit plan for {model}: blocks to remove",
                             ("#", "block", "drop", "params", "FLOPs"), left=("block",))
        for i, b in enumerate(plan.blocks):
            table.add_row(str(i), escape(b["name"]), f"{b['drop']:.3f}", fmt_int(b["params"]), fmt_flops(b["flops"]))
        out.print(table)
        t = plan.totals
        layers = (f"{plural(t['units_removed'], 'transformer layer')} (with the KV cache they carry): "
                  if t.get("unit_kind") == "transformer-layers" else "")
        out.print(f"[bold]Remove[/] {layers}{t['blocks_removed']} of {t['blocks']} blocks: {fmt_int(t['params_removed'])} "
                  f"parameters ({100 * t['params_fraction']:.2f} %), {fmt_flops(t['flops_removed'])} FLOPs "
                  f"({fmt_percent(t['flops_fraction'])}). wrote {escape(output)}")
        return
    if plan.granularity == "channel":
        table = titled_table(f"{method} channel plan for {model}",
                             ("#", "layer", "channels", "kept", "removed"), left=("layer",))
        for i, entry in enumerate(plan.layers):
            table.add_row(str(i), escape(entry["name"]), str(entry["channels"]), str(entry["channels_after"]),
                          f"{entry['sparsity']:.3f}")
        out.print(table)
        t = plan.totals
        for names, why in plan.options.get("blocked", {}).items():
            notice(f"channels of {names} stay: {why}")
        if plan.options.get("round_to_auto"):
            notice(f"kept channel counts in multiples of {plan.options['round_to']} (--round-to auto: "
                   f"{plan.options['round_to_auto']})")
        out.print(f"[bold]Predicted:[/] {_smaller(t)}; target {t['target']:g} by {t['budget']}. wrote {escape(output)}")
        return
    table = titled_table(f"{method} plan for {model}", ("#", "layer", "params", "sparsity", "kept"), left=("layer",))
    for i, entry in enumerate(plan.layers):
        table.add_row(str(i), escape(entry["name"]), fmt_int(entry["params"]), f"{entry['sparsity']:.3f}",
                      fmt_int(entry["params"] - entry["zeros"]))
    out.print(table)
    t = plan.totals
    out.print(f"[bold]Total:[/] {t['params_sparsity']:.4f} of {fmt_int(t['weights'])} weights "
              f"({fmt_int(t['zeros'])} zeros), FLOP-weighted {fmt_ratio(t['flops_sparsity'])}; target {t['target']:g} "
              f"by {t['budget']}. wrote {escape(output)}")


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("plan", type=click.Path(path_type=str))
@output_option("Where to write the pruned model.")
@click.option("--granularity", type=click.Choice(api.GRANULARITIES), default=None,
              help="unstructured (zero weights), n:m, or channel (remove whole channels). Default: the plan's.")
@click.option("--criterion", type=click.Choice(api.APPLY_CRITERIA), default=None,
              help="channel: l1 | l2, the norm that ranks channels (default: the plan's, else l2). unstructured, "
                   "n:m: magnitude (default), or wanda / obs, chosen from the layers' inputs on --data (its "
                   "first 128 samples unless --limit; obs, SparseGPT: also updates the kept weights).")
@click.option("--damp", type=float, default=None,
              help="obs: dampening added to the Hessian's diagonal, times its mean (default 0.01).")
@click.option("--block-size", type=int, default=None, help="obs: inputs pruned together (default 128).")
@click.option("--round-to", type=int, default=None, help="channel: keep channel counts multiples of N. "
                                                          "Default: the plan's, else 1.")
@click.option("--nm", default="2:4", show_default=True, help="N:M pattern for --granularity n:m.")
@click.option("--store", type=click.Choice(api.STORES), default="dense", show_default=True,
              help="sparse: write pruned weights as ONNX sparse initializers, so the file shrinks.")
@click.option("--external-data", is_flag=True, default=None, help="Write weights to OUT.onnx.data.")
@click.option("--force", is_flag=True, help="Apply a plan made for another model; allow -o equal to MODEL.")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime test run of the output.")
@data_options
@common_options
def apply(model, plan, output, granularity, criterion, damp, block_size, round_to, nm, store, external_data, force, no_check,
          data_spec, input_shapes, as_json):
    """Rewrite MODEL per PLAN and write a checked, deployable model.

    With --granularity channel, --data gives calibration data: every layer that loses input channels is
    refit by least squares to reproduce its original output (a few hundred samples are enough).

    \b
    Example:
      onnxprune apply build/resnet56.onnx plan.json -o build/resnet56_pruned.onnx
      onnxprune apply build/resnet56.onnx channels.json -o build/resnet56_small.onnx --granularity channel \\
          --data cifar10_test_jpeg_q75.npz --offset 1017 --limit 256
    """
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise InputError(f"--nm must look like 2:4, got {nm!r}") from None
    with progress_bar("calibrating layers", visible=data_spec.given) as tick:
        result = api.apply(model, plan, output, granularity=granularity, nm=(n, m), store=store, force=force,
                           external_data=external_data, check=not no_check, criterion=criterion, damp=damp,
                           block_size=block_size,
                           round_to=round_to, data=data_spec if data_spec.given else None, progress=tick,
                           input_shapes=input_shapes, input_values=data_spec.input_values)
    t = result.totals
    for name, why in result.skipped.items():
        notice(f"channels of {name} stay: {why}" if t.get("granularity") == "channel"
               else f"layer {name} left dense: {why}")
    if as_json:
        emit_json(result.to_dict())
        return
    extra = ""
    if t.get("granularity") == "channel":
        out.print(f"[bold]Removed[/] {plural(t['channels_removed'], 'channel')} in "
                  f"{plural(t['groups_changed'], 'group')}: {_smaller(t)}")
        refit = t.get("refit")
        if refit:
            out.print(f"refit {plural(refit['layers'], 'layer')} on {plural(refit['samples'], 'sample')}: "
                      "mean relative output error "
                      f"{refit['mean_error_before']:.3f} -> {refit['mean_error_after']:.3f}")
            for name, why in refit["skipped"].items():
                notice(f"layer {name} not refit: {why}")
    else:
        if "blocks_removed" in t:
            out.print(f"[bold]Removed[/] {plural(t['blocks_removed'], 'block')}: {_smaller(t)}")
        planned = t.get("planned_params_sparsity")
        if t.get("granularity") == "n:m":
            against = f"the {t['nm']} pattern on every layer the plan prunes"
        else:
            against = "plan " + ("?" if planned is None else f"{planned:.4f}")
        if t["zeros"] or not t.get("blocks_removed"):
            out.print(
                f"[bold]Pruned[/] {fmt_int(t['zeros'])} of {fmt_int(t['weights'])} weights: sparsity "
                f"{t['params_sparsity']:.4f} ({against}), FLOP-weighted {fmt_ratio(t['flops_sparsity'])}"
            )
        if store == "sparse":
            extra = f" ({len(result.sparse_initializers)} sparse initializers)"
    out.print(f"file: {fmt_kib(result.input_bytes)} -> {fmt_kib(result.output_bytes)}{extra}")
    out.print(f"wrote {escape(str(result.path))} (checked: {result.checked})")
    folder = result.folder
    if folder is not None and folder.config:
        out.print(f"wrote {folder.config} beside it (layers and heads of the pruned model)"
                  + (f", copied {', '.join(folder.copied)}" if folder.copied else ""))
    elif folder is not None and folder.notice:
        notice(folder.notice)


def _smaller(t: dict) -> str:
    """Parameters and FLOPs before and after, from a plan's or a result's totals."""
    params = (f"parameters {fmt_int(t['params_before'])} -> {fmt_int(t['params_after'])} "
              f"({fmt_percent(t['params_fraction_removed'])} fewer)")
    if t.get("flops_before") is None:
        return f"{params}, FLOPs unknown (see onnxprune inspect)"
    return (f"{params}, FLOPs {fmt_flops(t['flops_before'])} -> {fmt_flops(t['flops_after'])} "
            f"({fmt_percent(t['flops_fraction_removed'])} fewer)")


def _value(v, spec: str) -> str:
    """A score cell: the number, or "unscored" for a unit the data never reached."""
    return "unscored" if v is None else format(v, spec)
