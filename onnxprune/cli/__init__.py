"""The onnxprune command line: parses options, calls onnxprune.api, prints tables (people) or JSON (machines).

Exit codes: 0 success, 2 bad input or usage, 1 internal error. No traceback unless --debug.
"""

from __future__ import annotations

import signal
import sys

import click
from rich.markup import escape

from onnxprune._version import __version__
from onnxprune.cli.flows import prune, report, sweep
from onnxprune.cli.inspect_eval import eval_cmd, inspect
from onnxprune.cli.pipeline import allocate, apply, score
from onnxprune.cli.recovery import finetune
from onnxprune.cli.render import err
from onnxprune.cli.state import flag
from onnxprune.errors import OnnxpruneError

__all__ = ["main"]


class _Terminated(BaseException):
    """SIGTERM (a pipeline's timeout, a container stopping) unwinds like Ctrl-C, so atomic writes clean up."""


def _on_sigterm(signum, frame):
    raise _Terminated()


class _Group(click.Group):
    """Turns errors into one line and an exit code."""

    def invoke(self, ctx):
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (embedded use): leave signals alone
            pass
        try:
            return super().invoke(ctx)
        except OnnxpruneError as exc:
            if flag("debug", ctx):
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
            if flag("debug", ctx):
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


for _command in (inspect, eval_cmd, score, allocate, apply, finetune, prune, sweep, report):
    main.add_command(_command)
