"""The per-invocation flags (--quiet, --debug), held on click's context so nothing outlives one command."""

from __future__ import annotations

import click

__all__ = ["flag", "set_flag"]

_KEY = "onnxprune.{}"


def set_flag(name: str):
    """An option callback that records flag NAME for this invocation when it is given."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        if value:
            ctx.meta[_KEY.format(name)] = True
        return value

    return callback


def flag(name: str, ctx: click.Context | None = None) -> bool:
    """Whether flag NAME was given to the running command (False outside a command)."""
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_KEY.format(name)))
