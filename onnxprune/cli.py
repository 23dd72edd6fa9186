"""The onnxprune command line: parses options, calls onnxprune.api, prints tables (people) or JSON (machines).

Exit codes: 0 success, 2 bad input or usage, 1 internal error. No traceback unless --debug.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxprune import __version__, api
from onnxprune.errors import InputError, OnnxpruneError
from onnxprune.io import check_output_path
from onnxprune.plan import write_json
from onnxprune.runtime.data import DataSpec, parse_floats, parse_size
from onnxprune.runtime.session import PROVIDERS

def _capacity_metrics():
    from onnxprune.scoring.capacity import METRICS

    return METRICS


def _allocation_methods():
    return api.ALLOCATION_METHODS


err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
_state = {"debug": False, "quiet": False}


def _set_flag(name):
    def callback(ctx, param, value):
        if value:
            _state[name] = True
        return value

    return callback


def common_options(fn):
    """--json, --quiet and --debug on every command."""

    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (human text on stderr).")
    @click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_flag("quiet"),
                  help="Print only results, no notices or progress.")
    @click.option("--debug", is_flag=True, expose_value=False, callback=_set_flag("debug"), is_eager=True,
                  help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class _Terminated(BaseException):
    """SIGTERM (a pipeline's timeout, a container stopping) unwinds like Ctrl-C, so atomic writes clean up."""


def _on_sigterm(signum, frame):
    raise _Terminated()


class _Group(click.Group):
    """Turns errors into one line and an exit code."""

    def invoke(self, ctx):
        _state.update(debug=False, quiet=False)
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (embedded use): leave signals alone
            pass
        try:
            return super().invoke(ctx)
        except OnnxpruneError as exc:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)
        except _Terminated:
            err.print("terminated")
            sys.exit(143)
        except Exception as exc:  # noqa: BLE001 - the one place internal errors become a clean line
            if _state["debug"]:
                raise
            msg = " ".join(str(exc).split())[:300]
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(msg)} "
                "(run again with --debug for the traceback, and please report it)",
                soft_wrap=True,
            )
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxprune")
def main():
    """Prune ONNX models: inspect, score, allocate, apply, eval, finetune.

    \b
    Example:
      onnxprune inspect model.onnx
      onnxprune eval model.onnx --data test.npz --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    """


def _notice(text: str | None) -> None:
    if text and not _state["quiet"]:
        err.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2))


def _fmt_int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _fmt_flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@common_options
def inspect(model: str, as_json: bool):
    """Show the prunable layers and residual blocks of MODEL, with parameters and FLOPs.

    \b
    FLOPs are per sample (a dynamic batch dimension counts as 1), 2 per multiply-accumulate.
    Example:
      onnxprune inspect build/resnet56.onnx --json
    """
    result = api.inspect(model)
    if as_json:
        _emit_json(result.to_dict())
        for note in result.notes:
            _notice(note)
        return
    layers = Table(title=f"Prunable layers of {model}", title_justify="left")
    for col in ("#", "layer", "op", "weight shape", "params", "FLOPs", "BN"):
        layers.add_column(col, justify="right" if col in ("#", "params", "FLOPs") else "left", overflow="fold")
    for i, layer in enumerate(result.layers):
        shared = f" (shared with {layer.shared_with})" if layer.shared_with else ""
        layers.add_row(str(i), escape(layer.name), layer.op_type,
                       "x".join(map(str, layer.weight_shape)) + escape(shared),
                       _fmt_int(layer.params), _fmt_flops(layer.flops), escape(layer.bn or ""))
    out.print(layers)
    if result.blocks:
        blocks = Table(title="Residual blocks", title_justify="left")
        for col in ("#", "block (join node)", "skip", "removable", "layers", "params", "FLOPs"):
            blocks.add_column(col, justify="right" if col in ("#", "layers", "params", "FLOPs") else "left",
                              overflow="fold")
        for i, b in enumerate(result.blocks):
            blocks.add_row(str(i), escape(b.name), b.skip, "yes" if b.removable else escape(f"no: {b.reason}"),
                           str(len(b.layers)), _fmt_int(b.params), _fmt_flops(b.flops))
        out.print(blocks)
    else:
        out.print("Residual blocks: none found")
    d = result.to_dict()["totals"]
    out.print(
        f"[bold]Totals:[/] {d['layers']} prunable layers ("
        + ", ".join(f"{n} {op}" for op, n in _count_ops(result.layers))
        + f"), {d['blocks']} residual blocks ({d['removable_blocks']} removable), "
        f"{_fmt_int(result.params)} parameters ({_fmt_int(result.prunable_params)} in prunable layers), "
        f"{_fmt_flops(result.flops)} FLOPs per sample"
    )
    for note in result.notes:
        _notice(note)


def _count_ops(layers) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.op_type] = counts.get(layer.op_type, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def _data_options(batch_size: int = 256, batch_help: str | None = None):
    """Evaluation data and runtime options, shared by every command that runs the model."""

    def decorate(fn):
        @click.option("--data", type=click.Path(path_type=str), help="An .npz with inputs (and labels).")
        @click.option("--data-loader-script", metavar="FILE.py[:func]",
                      help="A Python function (default load_data) yielding dicts {input: array, 'labels': array}.")
        @click.option("--input-key", default="x", show_default=True, help="Array of the .npz holding the inputs.")
        @click.option("--label-key", default="y", show_default=True, help="Array of the .npz holding the labels.")
        @click.option("--mean", metavar="M[,M...]", help="Per-channel mean, after uint8 inputs are scaled to [0,1].")
        @click.option("--std", metavar="S[,S...]", help="Per-channel standard deviation.")
        @click.option("--batch-size", default=batch_size, show_default=True, type=int, help=batch_help)
        @click.option("--limit", type=int, help="Use only the first N samples (after --offset).")
        @click.option("--offset", type=int, default=0, show_default=True, help="Skip the first N samples of --data.")
        @click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
                      help="ONNX Runtime execution provider (auto: CUDA if available, else CPU).")
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            spec = DataSpec(
                data=kwargs.pop("data"), loader=kwargs.pop("data_loader_script"), input_key=kwargs.pop("input_key"),
                label_key=kwargs.pop("label_key"), mean=parse_floats(kwargs.pop("mean"), "mean"),
                std=parse_floats(kwargs.pop("std"), "std"), batch_size=kwargs.pop("batch_size"),
                limit=kwargs.pop("limit"), offset=kwargs.pop("offset"), provider=kwargs.pop("provider"),
            )
            return fn(*args, data_spec=spec, **kwargs)

        return wrapper

    return decorate


data_options = _data_options()


def _progress() -> Progress:
    """A progress bar on stderr (hidden with --quiet or when stderr is not a terminal)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=_state["quiet"] or not err.is_terminal,
    )


@main.command(name="eval")
@click.argument("model", type=click.Path(path_type=str))
@data_options
@common_options
def eval_cmd(model, data_spec, as_json):
    """Measure top-1 / top-5 accuracy and throughput of MODEL with ONNX Runtime.

    \b
    uint8 inputs are scaled to [0,1] before --mean/--std. Without labels: throughput only.
    Example:
      onnxprune eval build/resnet56.onnx --data cifar10_test_lossless_first1017.npz \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    """
    with _progress() as progress:
        task = progress.add_task("evaluating", total=None)

        def tick(done, total):
            progress.update(task, completed=done, total=total)

        result = api.evaluate(model, data_spec, progress=tick)
    _notice(result.notice)
    if as_json:
        _emit_json(result.to_dict())
        return
    table = Table(title=f"Evaluation of {model}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result.top1 is not None:
        table.add_row("top-1", f"{result.top1:.2f} %")
        table.add_row("top-5", f"{result.top5:.2f} %")
    else:
        table.add_row("accuracy", "no labels")
    table.add_row("samples", f"{result.samples:,}")
    table.add_row("throughput", f"{result.throughput:,.1f} samples/s (batch {result.batch_size})")
    table.add_row("time in ONNX Runtime", f"{result.seconds:.3f} s")
    table.add_row("provider", result.provider)
    if result.preprocess:
        table.add_row("preprocessing", result.preprocess)
    out.print(table)


def _output_option(help_text: str):
    return click.option("-o", "--output", required=True, type=click.Path(path_type=str), help=help_text)


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--method", type=click.Choice(list(api.SCORE_METHODS)), default="capacity", show_default=True,
              help="capacity: data-free, from the weights; sensitivity: measured on --data.")
@click.option("--metric", default=None,
              help=f"capacity: {', '.join(_capacity_metrics())} (default {api.DEFAULT_CAPACITY_METRIC}); "
                   f"sensitivity: {', '.join(api.SENSITIVITY_METRICS)} (default kl).")
@click.option("--grid", default=None, metavar="S,S,...", help="Sparsities measured per layer (sensitivity).")
@click.option("--at", "at_plan", type=click.Path(path_type=str), default=None,
              help="sensitivity: measure around this plan (the other layers pruned as planned).")
@click.option("--tolerance", type=float, default=1.0, show_default=True,
              help="compactness: allowed drop in top-1 points (agreement points without labels).")
@click.option("--units", type=click.Choice(["blocks", "layers"]), default="blocks", show_default=True,
              help="srinit: re-initialise residual blocks or single layers.")
@click.option("--seed", type=int, default=1, show_default=True, help="srinit: seed of the fresh initialisation.")
@click.option("--seeds", type=int, default=1, show_default=True, help="srinit: repeat over K seeds.")
@click.option("--max-memory", default="2GB", show_default=True, metavar="SIZE",
              help="srinit: bound on the cached activations (e.g. 512MB, 4GB); more data runs in chunks.")
@data_options
@_output_option("Where to write scores.json.")
@common_options
def score(model, method, metric, grid, at_plan, tolerance, units, seed, seeds, max_memory, data_spec, output,
          as_json):
    """Score the importance of every prunable layer of MODEL.

    \b
    Examples:
      onnxprune score build/resnet56.onnx --method capacity --metric effective_rank -o scores.json
      onnxprune score build/resnet56.onnx --method sensitivity --data cifar10_test_jpeg_q75.npz \\
          --offset 1017 --limit 512 -o sensitivity.json
      onnxprune score build/resnet56.onnx --method compactness --tolerance 1.0 --data ... -o compactness.json
      onnxprune score build/resnet56.onnx --method srinit --data cifar10_test_jpeg_q75.npz --offset 1017 -o sr.json
    """
    check_output_path(Path(output), input_path=[model, at_plan, data_spec.data], forceable=False)
    memory = parse_size(max_memory, "max-memory")
    with _progress() as progress:
        task = progress.add_task(f"scoring ({method})", total=None)
        scores = api.score(
            model, method, metric=metric, data=data_spec, grid=parse_floats(grid, "grid"), at=at_plan,
            tolerance=tolerance, units=units, seed=seed, seeds=seeds, max_memory=memory,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    write_json(scores.to_dict(), output)
    if as_json:
        _emit_json({**scores.to_dict(), "timing": scores.timing})
        return
    table = Table(title=f"{scores.method} scores ({scores.metric}) of {model}", title_justify="left")
    if scores.method == "srinit":
        several = scores.options["seeds"] > 1
        cols = ["#", scores.unit_kind[:-1], "params", f"{scores.metric} drop", "+/- (s.e.)"]
        cols += ["std over seeds"] if several else []
        for col in (*cols, "seconds", "candidate"):
            table.add_column(col, justify="left" if col in ("block", "layer", "candidate") else "right",
                             overflow="fold")
        for i, u in enumerate(scores.units):
            row = [str(i), escape(u["name"]), _fmt_int(u["params"]), f"{u['drop']:.3f}", f"{u['drop_se']:.3f}"]
            row += [f"{u['drop_seed_std']:.3f}"] if several else []
            table.add_row(*row, f"{scores.timing['units'][u['name']]:.1f}", "" if "removable" not in u else
                          ("yes" if u["removable"] and u.get("skip") == "identity" else "no"))
    else:
        value_col = f"mean {scores.metric} drop" if scores.method == "sensitivity" else scores.metric
        for col in ("#", "layer", "op", "params", value_col, "importance"):
            table.add_column(col, justify="left" if col in ("layer", "op") else "right", overflow="fold")
        for i, u in enumerate(scores.units):
            value = u["mean_drop"] if scores.method == "sensitivity" else u["metrics"][scores.metric]
            table.add_row(str(i), escape(u["name"]), u["op_type"], _fmt_int(u["params"]), f"{value:.4g}",
                          f"{u['importance']:.3f}")
    out.print(table)
    if scores.method == "srinit":
        ref = scores.options["reference"]
        out.print(f"{scores.options['samples']:,} samples, reference "
                  + (f"top-1 {ref['top1']:.2f} %, " if "top1" in ref else "")
                  + f"{scores.timing['seconds']:.1f} s on {scores.options['provider']}")
    out.print(f"wrote {escape(output)}")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--scores", "scores_path", type=click.Path(path_type=str), help="scores.json from onnxprune score.")
@click.option("--target-sparsity", type=float, default=None, help="Total sparsity S in [0, 1).")
@click.option("--threshold", type=float, default=None, help="srinit: remove blocks whose drop is <= T.")
@click.option("--remove", type=int, default=None, help="srinit: remove the K least sensitive blocks.")
@click.option("--target-params", type=float, default=None,
              help="srinit: remove the fewest blocks that take this fraction of the parameters.")
@click.option("--method", type=click.Choice(list(_allocation_methods())), default="capacity", show_default=True)
@click.option("--min-sparsity", type=float, default=0.0, show_default=True, help="Lower bound for every layer.")
@click.option("--max-sparsity", type=float, default=0.99, show_default=True, help="Upper bound for every layer.")
@click.option("--keep-dense", multiple=True, metavar="NAME", help="Leave this layer dense (repeatable).")
@click.option("--budget", type=click.Choice(["params", "flops"]), default="params", show_default=True,
              help="Weight the total by parameters or by FLOPs.")
@click.option("--force", is_flag=True, help="Use scores made for another model.")
@click.option("--iterations", type=int, default=150, show_default=True, help="search: mutations to try.")
@click.option("--seed", type=int, default=0, show_default=True, help="search: random seed.")
@click.option("--granularity", type=click.Choice(["unstructured", "channel"]), default="unstructured",
              show_default=True, help="channel: plan whole output channels; the target is the fraction of "
                                      "parameters (or FLOPs with --budget flops) their removal takes away.")
@click.option("--criterion", type=click.Choice(["l1", "l2"]), default="l2", show_default=True,
              help="channel: the norm that ranks channels.")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="channel: keep channel counts multiples of N (8 for ONNX Runtime's fast CPU convolutions "
                   "with AVX2, 16 with AVX-512); the target is still met.")
@click.option("--coupled", type=click.Choice(["prune", "keep"]), default="prune", show_default=True,
              help="channel: keep leaves channels written by several layers (residual streams) whole.")
@data_options
@_output_option("Where to write plan.json.")
@common_options
def allocate(model, scores_path, target_sparsity, threshold, remove, target_params, method, min_sparsity, max_sparsity,
             keep_dense, budget, force, iterations, seed, granularity, criterion, round_to, coupled, data_spec,
             output, as_json):
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
    check_output_path(Path(output), input_path=[model, scores_path, data_spec.data], forceable=False)
    with _progress() as progress:
        task = progress.add_task(f"allocating ({method})", total=None)
        plan = api.allocate(
            model, target_sparsity=target_sparsity, method=method, scores=scores_path, min_sparsity=min_sparsity,
            max_sparsity=max_sparsity, keep_dense=keep_dense, budget=budget, force=force, data=data_spec,
            iterations=iterations, seed=seed, threshold=threshold, remove=remove, target_params=target_params,
            granularity=granularity, criterion=criterion, round_to=round_to, coupled=coupled,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    write_json(plan.to_dict(), output)
    if as_json:
        _emit_json(plan.to_dict())
        return
    if plan.blocks or method == "srinit":
        table = Table(title=f"srinit plan for {model}: blocks to remove", title_justify="left")
        for col in ("#", "block", "drop", "params", "FLOPs"):
            table.add_column(col, justify="left" if col == "block" else "right", overflow="fold")
        for i, b in enumerate(plan.blocks):
            table.add_row(str(i), escape(b["name"]), f"{b['drop']:.3f}", _fmt_int(b["params"]), _fmt_flops(b["flops"]))
        out.print(table)
        t = plan.totals
        out.print(f"[bold]Remove[/] {t['blocks_removed']} of {t['blocks']} blocks: {_fmt_int(t['params_removed'])} "
                  f"parameters ({100 * t['params_fraction']:.2f} %), {_fmt_flops(t['flops_removed'])} FLOPs "
                  f"({100 * t['flops_fraction']:.2f} %). wrote {escape(output)}")
        return
    if plan.granularity == "channel":
        table = Table(title=f"{method} channel plan for {model}", title_justify="left")
        for col in ("#", "layer", "channels", "kept", "removed"):
            table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
        for i, entry in enumerate(plan.layers):
            table.add_row(str(i), escape(entry["name"]), str(entry["channels"]), str(entry["channels_after"]),
                          f"{entry['sparsity']:.3f}")
        out.print(table)
        t = plan.totals
        for names, why in plan.options.get("blocked", {}).items():
            _notice(f"channels of {names} stay: {why}")
        out.print(f"[bold]Predicted:[/] parameters {_fmt_int(t['params_before'])} -> {_fmt_int(t['params_after'])} "
                  f"({100 * t['params_fraction_removed']:.2f} % fewer), FLOPs {_fmt_flops(t['flops_before'])} -> "
                  f"{_fmt_flops(t['flops_after'])} ({100 * t['flops_fraction_removed']:.2f} % fewer); target "
                  f"{t['target']:g} by {t['budget']}. wrote {escape(output)}")
        return
    table = Table(title=f"{method} plan for {model}", title_justify="left")
    for col in ("#", "layer", "params", "sparsity", "kept"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for i, entry in enumerate(plan.layers):
        table.add_row(str(i), escape(entry["name"]), _fmt_int(entry["params"]), f"{entry['sparsity']:.3f}",
                      _fmt_int(entry["params"] - entry["zeros"]))
    out.print(table)
    t = plan.totals
    out.print(f"[bold]Total:[/] {t['params_sparsity']:.4f} of {_fmt_int(t['weights'])} weights "
              f"({_fmt_int(t['zeros'])} zeros), FLOP-weighted {t['flops_sparsity']:.4f}; target {t['target']:g} "
              f"by {t['budget']}. wrote {escape(output)}")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("plan", type=click.Path(path_type=str))
@_output_option("Where to write the pruned model.")
@click.option("--granularity", type=click.Choice(["unstructured", "n:m", "channel"]), default=None,
              help="unstructured (zero weights), n:m, or channel (remove whole channels). Default: the plan's.")
@click.option("--criterion", type=click.Choice(["l1", "l2"]), default=None,
              help="channel: the norm that ranks channels. Default: the plan's, else l2.")
@click.option("--round-to", type=int, default=None, help="channel: keep channel counts multiples of N. "
                                                          "Default: the plan's, else 1.")
@click.option("--nm", default="2:4", show_default=True, help="N:M pattern for --granularity n:m.")
@click.option("--store", type=click.Choice(["dense", "sparse"]), default="dense", show_default=True,
              help="sparse: write pruned weights as ONNX sparse initializers, so the file shrinks.")
@click.option("--external-data", is_flag=True, default=None, help="Write weights to OUT.onnx.data.")
@click.option("--force", is_flag=True, help="Apply a plan made for another model; allow -o equal to MODEL.")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime test run of the output.")
@data_options
@common_options
def apply(model, plan, output, granularity, criterion, round_to, nm, store, external_data, force, no_check,
          data_spec, as_json):
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
    with _progress() as progress:
        task = progress.add_task("refitting layers", total=None, visible=data_spec.given)
        result = api.apply(model, plan, output, granularity=granularity, nm=(n, m), store=store, force=force,
                           external_data=external_data, check=not no_check, criterion=criterion,
                           round_to=round_to, data=data_spec if data_spec.given else None,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
    t = result.totals
    for name, why in result.skipped.items():
        _notice(f"channels of {name} stay: {why}" if t.get("granularity") == "channel"
                else f"layer {name} left dense: {why}")
    if as_json:
        _emit_json(result.to_dict())
        return
    if t.get("granularity") == "channel":
        out.print(f"[bold]Removed[/] {t['channels_removed']} channels in {t['groups']} groups: parameters "
                  f"{_fmt_int(t['params_before'])} -> {_fmt_int(t['params_after'])} "
                  f"({100 * t['params_fraction_removed']:.2f} % fewer), FLOPs {_fmt_flops(t['flops_before'])} -> "
                  f"{_fmt_flops(t['flops_after'])} ({100 * t['flops_fraction_removed']:.2f} % fewer)")
        refit = t.get("refit")
        if refit:
            out.print(f"refit {refit['layers']} layers on {refit['samples']} samples: mean relative output error "
                      f"{refit['mean_error_before']:.3f} -> {refit['mean_error_after']:.3f}")
            for name, why in refit["skipped"].items():
                _notice(f"layer {name} not refit: {why}")
        out.print(f"file: {result.input_bytes / 1024:,.1f} KiB -> {result.output_bytes / 1024:,.1f} KiB")
        out.print(f"wrote {escape(str(result.path))} (checked: {result.checked})")
        return
    if "blocks_removed" in t:
        out.print(f"[bold]Removed[/] {t['blocks_removed']} blocks: parameters {_fmt_int(t['params_before'])} -> "
                  f"{_fmt_int(t['params_after'])} ({100 * t['params_fraction_removed']:.2f} % fewer), FLOPs "
                  f"{_fmt_flops(t['flops_before'])} -> {_fmt_flops(t['flops_after'])} "
                  f"({100 * t['flops_fraction_removed']:.2f} % fewer)")
    planned = t.get("planned_params_sparsity")
    if t.get("granularity") == "n:m":
        against = f"the {t['nm']} pattern on every layer the plan prunes"
    else:
        against = "plan " + ("?" if planned is None else f"{planned:.4f}")
    if t["zeros"] or not t.get("blocks_removed"):
        out.print(
            f"[bold]Pruned[/] {_fmt_int(t['zeros'])} of {_fmt_int(t['weights'])} weights: sparsity "
            f"{t['params_sparsity']:.4f} ({against}), FLOP-weighted {t['flops_sparsity']:.4f}"
        )
    out.print(f"file: {result.input_bytes / 1024:,.1f} KiB -> {result.output_bytes / 1024:,.1f} KiB"
              + (f" ({len(result.sparse_initializers)} sparse initializers)" if store == "sparse" else ""))
    out.print(f"wrote {escape(str(result.path))} (checked: {result.checked})")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@_output_option("Where to write the tuned model (the same graph with new weights).")
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
@click.option("--insert-bn", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
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
@_data_options(batch_size=128, batch_help="Training batch size.")
@common_options
def finetune(model, output, teacher, labels, epochs, lr, max_minutes, augment, temperature, label_weight,
             weight_decay, recalibrate_bn, insert_bn, calibration, keep_zeros, eval_data, eval_offset, eval_limit,
             seed, threads, force, data_spec, as_json):
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
    from onnxprune.recovery.options import FinetuneOptions

    if recalibrate_bn and epochs:
        raise InputError("--recalibrate-bn trains nothing; drop --epochs (fine-tuning recalibrates first anyway)")
    if data_spec.data is None and data_spec.loader is None:
        raise InputError("finetune needs training data: --data FILE.npz or --data-loader-script FILE.py[:func]")
    aug = tuple(a.strip() for a in augment.split(",") if a.strip() and a.strip() != "none")
    opts = FinetuneOptions(epochs=0 if recalibrate_bn else (10 if epochs is None else epochs), lr=lr,
                           batch_size=data_spec.batch_size, weight_decay=weight_decay, augment=aug,
                           temperature=temperature, label_weight=label_weight, insert_bn=insert_bn,
                           calibration=calibration, keep_zeros=keep_zeros, max_minutes=max_minutes, seed=seed,
                           threads=threads)
    espec = None
    if eval_data is not None:
        espec = DataSpec(data=eval_data, input_key=data_spec.input_key, label_key=data_spec.label_key,
                         mean=data_spec.mean, std=data_spec.std, offset=eval_offset, limit=eval_limit)
    with _progress() as progress:
        task = progress.add_task("preparing", total=None)

        def tick(phase, done, total, info):
            if phase == "teacher":
                progress.update(task, description="caching teacher logits", completed=done, total=total)
            elif phase == "calibrated":
                if info.get("eval_top1") is not None:
                    _notice(f"BatchNorm calibrated: eval top-1 {info['eval_top1']:.2f} %")
                progress.update(task, description="training", completed=0, total=None)
            elif phase == "train":
                progress.update(task, description=f"epoch {info['epoch']} loss {info['loss']:.4f}",
                                completed=done, total=total)
            elif phase == "epoch" and not _state["quiet"]:
                parts = [f"epoch {done}/{total}", f"loss {info['loss']:.4f}"]
                if info.get("train_top1") is not None:
                    parts.append(f"train top-1 {info['train_top1']:.2f} %")
                if info.get("eval_top1") is not None:
                    parts.append(f"eval top-1 {info['eval_top1']:.2f} %")
                parts.append(f"{info['seconds'] / 60:.1f} min")
                err.print("  ".join(parts), highlight=False)

        result = api.finetune(model, data_spec, output, teacher=teacher, labels=labels, eval_data=espec,
                              options=opts, force=force, progress=tick)
    for note in result.notes:
        _notice(note)
    if as_json:
        _emit_json(result.to_dict())
        return
    what = " + ".join(w for w, on in (("labels", result.labels), ("distillation", result.teacher)) if on)
    if not result.history:
        out.print(f"[bold]Recalibrated[/] BatchNorm statistics on {opts.calibration:,} samples "
                  f"({result.graph_bn} BatchNorm layers in the graph, {result.inserted_bn} inserted)")
    else:
        out.print(f"[bold]Fine-tuned[/] {len(result.history)} epochs ({what}) in {result.seconds / 60:.1f} min")
    if result.before_top1 is not None:
        out.print(f"eval top-1: {result.before_top1:.2f} % before, {result.calibrated_top1:.2f} % after BatchNorm "
                  f"calibration, {result.after_top1:.2f} % written model (ONNX Runtime)")
    out.print(f"wrote {escape(str(result.path))} (checked: onnx.checker full + ONNX Runtime)")


# ---------------------------------------------------------------------------------------------------------
# one-command flows


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--target-sparsity", type=float, default=None, help="Zero this fraction of the weights (unstructured).")
@click.option("--target-flops", type=float, default=None,
              help="Remove whole channels until this fraction of the FLOPs is gone.")
@click.option("--remove-blocks", type=int, default=None, metavar="K",
              help="Remove the K residual blocks SR-init finds least important (needs --data).")
@click.option("--method", default=None,
              help="Allocation: lamp (default for --target-sparsity), uniform (default for --target-flops), "
                   "capacity, global, erk, sensitivity or search (these two need --data).")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="--target-flops: kept channel counts in multiples of N (8 suits AVX2 CPUs).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of SR-init and search.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--eval-data", type=click.Path(path_type=str), default=None,
              help="Held-out .npz for accuracy before and after (fed like --data); default: --data itself.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs (even MODEL).")
@data_options
@_output_option("The pruned model; OUT.scores.json and OUT.plan.json are written beside it.")
@common_options
def prune(model, target_sparsity, target_flops, remove_blocks, method, round_to, seed, no_latency, eval_data, force,
          data_spec, output, as_json):
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
    from onnxprune.workflows import prune as run_prune

    with _progress() as progress:
        task = progress.add_task("pruning", total=None)
        result = run_prune(model, output, target_sparsity=target_sparsity, target_flops=target_flops,
                           remove_blocks=remove_blocks, method=method, round_to=round_to, seed=seed,
                           latency=not no_latency, force=force, data=data_spec if data_spec.given else None,
                           eval_data=eval_data,
                           progress=lambda what: progress.update(task, description=what))
    for note in result.notes:
        _notice(note)
    for name, why in result.applied.skipped.items():
        _notice(f"{name}: {why}")
    if as_json:
        _emit_json(result.to_dict())
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

    row("parameters", b.params, a.params, _fmt_int)
    row("FLOPs/sample", b.flops, a.flops, _fmt_flops)
    row("file", b.file_bytes, a.file_bytes, lambda v: f"{v / 1024:,.1f} KiB")
    row("latency (batch 1)", b.latency_ms, a.latency_ms, lambda v: f"{v:.3f} ms")
    row("top-1", b.top1, a.top1, lambda v: f"{v:.2f} %", better_lower=False)
    row("top-5", b.top5, a.top5, lambda v: f"{v:.2f} %", better_lower=False)
    out.print(table)
    t = result.applied.totals
    if result.mode == "unstructured":
        out.print(f"zeroed {_fmt_int(t['zeros'])} of {_fmt_int(t['weights'])} weights (sparsity "
                  f"{t['params_sparsity']:.4f}); zeros shrink the file only with apply --store sparse, and run "
                  "faster only on sparse kernels")
    out.print(f"wrote {escape(str(result.path))} (checked: {result.applied.checked}), "
              f"{escape(str(result.scores_path))}, {escape(str(result.plan_path))}")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--sparsities", default="0.5,0.7,0.9", show_default=True, metavar="S,S,...",
              help="Targets to try, each in [0, 1).")
@click.option("--methods", default="capacity,uniform,lamp", show_default=True, metavar="M,M,...",
              help=f"Allocation methods: {', '.join(m for m in api.ALLOCATION_METHODS if m != 'srinit')}.")
@click.option("--granularity", type=click.Choice(["unstructured", "channel"]), default="unstructured",
              show_default=True, help="Zero weights, or remove channels (then the target is a fraction of --budget).")
@click.option("--budget", type=click.Choice(["params", "flops"]), default="params", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of search.")
@data_options
@_output_option("Where to write sweep.json.")
@common_options
def sweep(model, sparsities, methods, granularity, budget, seed, data_spec, output, as_json):
    """Accuracy against sparsity for several allocation methods (one-shot, no recovery), on labelled data.

    \b
    Example:
      onnxprune sweep build/resnet56.onnx --data cifar10_test_lossless.npz --limit 1000 \\
          --sparsities 0.5,0.7,0.9 --methods capacity,uniform,lamp -o sweep.json
      onnxprune report --sweep sweep.json -o report.html
    """
    from onnxprune.workflows import sweep as run_sweep

    if not data_spec.given:
        raise InputError("sweep needs labelled data: --data FILE.npz (or --data-loader-script)")
    check_output_path(Path(output), input_path=[model, data_spec.data], forceable=False)
    targets = parse_floats(sparsities, "sparsities")
    names = tuple(x.strip() for x in methods.split(",") if x.strip())
    with _progress() as progress:
        task = progress.add_task("sweeping", total=None)
        result = run_sweep(model, data_spec, sparsities=targets, methods=names, granularity=granularity,
                           budget=budget, seed=seed,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
    write_json(result.to_dict(), output)
    for r in result.rows:
        if "error" in r:
            _notice(f"{r['method']} at {r['sparsity']:g}: {r['error']}")
    if as_json:
        _emit_json(result.to_dict())
        return
    table = Table(title="top-1 % after one-shot pruning", title_justify="left")
    table.add_column("method")
    for s in targets:
        table.add_column(f"{s:g}", justify="right")
    for name in names:
        cells = []
        for s in targets:
            r = next(r for r in result.rows if r["method"] == name and r["sparsity"] == s)
            cells.append("-" if r.get("top1") is None else f"{r['top1']:.2f}")
        table.add_row(name, *cells)
    out.print(table)
    out.print(f"dense {escape(model)}: top-1 {result.dense['top1']:.2f} % on {result.dense['samples']:,} samples")
    out.print(f"wrote {escape(output)}")


@main.command()
@click.option("--scores", "scores_path", type=click.Path(path_type=str), help="scores.json from onnxprune score.")
@click.option("--plan", "plan_path", type=click.Path(path_type=str), help="plan.json from onnxprune allocate.")
@click.option("--sweep", "sweep_path", type=click.Path(path_type=str), help="sweep.json from onnxprune sweep.")
@click.option("--title", default=None, help="Heading of the report.")
@_output_option("Where to write the HTML report.")
@common_options
def report(scores_path, plan_path, sweep_path, title, output, as_json):
    """A self-contained HTML report with plots (needs onnxprune[report], i.e. matplotlib).

    SR-init scores: per-block drop as bars with the plan's threshold and removed blocks; layer scores:
    importance and allocated sparsity per layer; a sweep: top-1 against sparsity per method.

    \b
    Example:
      onnxprune report --scores sr.json --plan blocks.json --sweep sweep.json -o report.html
    """
    from onnxprune.plan import load_plan, load_scores
    from onnxprune.report import write_report
    from onnxprune.workflows import load_sweep

    inputs = [p for p in (scores_path, plan_path, sweep_path) if p]
    check_output_path(Path(output), input_path=inputs, forceable=False)
    path = write_report(output, scores=load_scores(scores_path) if scores_path else None,
                        plan=load_plan(plan_path) if plan_path else None,
                        sweep=load_sweep(sweep_path) if sweep_path else None, title=title)
    if as_json:
        _emit_json({"output": str(path), "bytes": path.stat().st_size,
                    "inputs": {"scores": scores_path, "plan": plan_path, "sweep": sweep_path}})
        return
    out.print(f"wrote {escape(str(path))} ({path.stat().st_size / 1024:,.1f} KiB)")


if __name__ == "__main__":
    main()
