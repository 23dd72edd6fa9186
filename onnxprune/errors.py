"""Errors the CLI turns into one clean line and an exit code, and the wording their messages share."""

from __future__ import annotations

__all__ = ["InputError", "OnnxpruneError", "WriteError", "plural"]


class OnnxpruneError(Exception):
    """A problem with the user's input or usage: the CLI prints the message and exits with ``exit_code``.

    The message names the problem and what to do about it, in one line.
    """

    exit_code = 2


class InputError(OnnxpruneError):
    """Bad input (model, data, plan, path, option): exit code 2."""


class WriteError(OnnxpruneError):
    """Writing the output failed (disk full, I/O error): nothing was written. Exit code 1."""

    exit_code = 1


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun in agreement: "1 block", "3 blocks", "2 channel groups" (``nouns``: an irregular
    plural)."""
    return f"{n:,} {noun if n == 1 else (nouns or noun + 's')}"
