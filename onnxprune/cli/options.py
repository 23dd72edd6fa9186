"""The option groups commands share: common flags, evaluation data and provider, output, input shapes."""

from __future__ import annotations

import functools

import click

from onnxprune import api
from onnxprune.cli.state import set_flag

__all__ = ["backend_options", "common_options", "data_options", "input_shape_option", "input_value_option", "output_option", "provider_option",
           "round_to_option", "runtime_options"]


def _apply(fn, decorators):
    """Apply DECORATORS as if stacked above FN in this order (so --help lists them in this order)."""
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


# ---------------------------------------------------------------------------------------------------------
# common: on every command


def common_options(fn):
    """--json, --quiet and --debug on every command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return _apply(wrapper, [
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (human text on stderr)."),
        click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=set_flag("quiet"),
                     help="Print only results, no notices or progress."),
        click.option("--debug", is_flag=True, expose_value=False, callback=set_flag("debug"), is_eager=True,
                     help="Show the full traceback on errors."),
    ])


# ---------------------------------------------------------------------------------------------------------
# data: what the model is run on


def _data_group(batch_size: int, batch_help: str | None) -> list:
    return [
        click.option("--data", type=click.Path(path_type=str), help="An .npz with inputs (and labels)."),
        click.option("--data-loader-script", metavar="FILE.py[:func]",
                     help="A Python function (default load_data) yielding dicts {input: array, 'labels': array}."),
        click.option("--input-key", default="x", show_default=True, help="Array of the .npz holding the inputs."),
        click.option("--label-key", default="y", show_default=True, help="Array of the .npz holding the labels."),
        click.option("--mean", metavar="M[,M...]", help="Per-channel mean, after uint8 inputs are scaled to [0,1]."),
        click.option("--std", metavar="S[,S...]", help="Per-channel standard deviation."),
        click.option("--batch-size", default=batch_size, show_default=True, type=int, help=batch_help),
        click.option("--limit", type=int, help="Use only the first N samples (after --offset)."),
        click.option("--offset", type=int, default=0, show_default=True, help="Skip the first N samples of --data."),
    ]


# ---------------------------------------------------------------------------------------------------------
# provider: where the model runs (split from the data group, applied with it by runtime_options)


def provider_option():
    """--provider, the ONNX Runtime execution provider."""
    return click.option("--provider", type=click.Choice(api.PROVIDERS), default="auto", show_default=True,
                        help="ONNX Runtime execution provider (auto: CUDA if available, else CPU).")


# ---------------------------------------------------------------------------------------------------------
# input shapes: the sizes of dynamic input dimensions


def input_shape_option(fn):
    """--input-shape NAME:D0,D1,... and --dim NAME=VALUE (both repeatable), handed to the command together as
    input_shapes (a tuple of str; analysis.input_shapes tells them apart)."""
    fn = click.option(
        "--dim", "dims", multiple=True, metavar="NAME=VALUE",
        help="Size of a named dynamic dimension in every input that has it (repeatable), e.g. "
             "--dim batch_size=1 --dim sequence_length=128 --dim past_sequence_length=0.")(fn)
    fn = click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
        help="Size of a dynamic input (repeatable; NAME: may be left out for a one-input model), e.g. "
             "images:1,3,640,640. FLOPs, budgets, latency and the output check use it; with --data the data "
             "fixes it. Written models keep their dynamic dimensions.")(fn)

    @functools.wraps(fn)
    def wrapper(*args, dims=(), input_shapes=(), **kwargs):
        return fn(*args, input_shapes=tuple(input_shapes) + tuple(d if "=" in d else d + "=" for d in dims),
                  **kwargs)

    return wrapper


def input_value_option(fn):
    """--input-value NAME=V[,V...] (repeatable), handed to the command as input_values (a tuple of str)."""
    return click.option(
        "--input-value", "input_values", multiple=True, metavar="NAME=V[,V...]",
        help="Value of an input that is not data (repeatable), e.g. sr=16000 or state=0 (one value fills the "
             "input): fed with the data, to the output check and to the timing.")(fn)


def runtime_options(batch_size: int = 256, batch_help: str | None = None):
    """The data options, --provider and --input-value, handed to the command as one data_spec (a DataSpec),
    and --input-shape (input_shapes)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            spec = api.DataSpec(
                data=kwargs.pop("data"), loader=kwargs.pop("data_loader_script"), input_key=kwargs.pop("input_key"),
                label_key=kwargs.pop("label_key"), mean=api.parse_floats(kwargs.pop("mean"), "mean"),
                std=api.parse_floats(kwargs.pop("std"), "std"), batch_size=kwargs.pop("batch_size"),
                limit=kwargs.pop("limit"), offset=kwargs.pop("offset"), provider=kwargs.pop("provider"),
                input_values=api.parse_input_values(kwargs.pop("input_values")) or None,
            )
            return fn(*args, data_spec=spec, **kwargs)

        return _apply(wrapper, [*_data_group(batch_size, batch_help), provider_option(), input_shape_option,
                                input_value_option])

    return decorate


data_options = runtime_options()


# ---------------------------------------------------------------------------------------------------------
# output


def output_option(help_text: str):
    """-o/--output, required: the file a command writes."""
    return click.option("-o", "--output", required=True, type=click.Path(path_type=str), help=help_text)


# ---------------------------------------------------------------------------------------------------------
# channel rounding


class _RoundTo(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number or auto", param, ctx)


def round_to_option(help_text: str):
    """--round-to N|auto: kept channel counts in multiples of N; auto (the default) picks this machine's."""
    return click.option("--round-to", type=_RoundTo(), default="auto", show_default=True, help=help_text)


# ---------------------------------------------------------------------------------------------------------
# where measured work runs


def backend_options(fn):
    """--backend, --address, --cpus-per-task and --gpus-per-task, handed to the command as one ``backend``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        backend = api.Backend(kwargs.pop("backend_kind"), kwargs.pop("address"), kwargs.pop("cpus_per_task"),
                              kwargs.pop("gpus_per_task"))
        return fn(*args, backend=backend, **kwargs)

    return _apply(wrapper, [
        click.option("--backend", "backend_kind", type=click.Choice(api.BACKENDS), default="local",
                     show_default=True, help="Where the independent runs go: this process, or Ray tasks (pip "
                                             "install 'onnxprune[ray]'); the numbers are the same."),
        click.option("--address", default=None, help="ray: a running cluster's address (host:port, ray://host:port, "
                                                      "auto); default: start a local one."),
        click.option("--cpus-per-task", type=float, default=1.0, show_default=True, help="ray: CPUs per task."),
        click.option("--gpus-per-task", type=float, default=0.0, show_default=True,
                     help="ray: GPUs per task (the tasks then use the CUDA provider where onnxruntime-gpu is "
                          "installed; add --provider cuda)."),
    ])
