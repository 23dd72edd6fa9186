"""Run the CLI in-process (click's CliRunner: the console script's code path without an interpreter start)."""

from __future__ import annotations

from click.testing import CliRunner

from onnxprune.cli import main


def cli(*args) -> str:
    """Run a command that must succeed; return its stdout."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    return result.stdout
