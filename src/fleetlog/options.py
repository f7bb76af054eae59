"""The command-line options more than one command takes, each declared once.

Each is a decorator (``@options.STORE``) that adds the option, with the same
name, type and help, to whichever command it decorates; the settings model
(:mod:`fleetlog.config`) checks the values, whichever way they came.  Every
one defaults to ``None``: only a flag the user typed overrides ``FLEETLOG_*``
and the TOML file.  (Its own module so that ``fleetlog.alerts.cli`` shares
them without importing :mod:`fleetlog.cli`, which imports it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import click

__all__ = ["CONFIG", "DATA_DIR", "FILES", "HOST", "QUEUE", "REDIS_CLUSTER", "REDIS_URL", "RETENTION",
           "RETENTION_BYTES", "SHARDS", "STORE", "Seconds", "common", "redis_command"]

F = TypeVar("F", bound=Callable[..., Any])


class Seconds(click.FloatRange):
    """A number of seconds (or a rate): a float, never NaN or infinite (``--wait nan``
    passed click's range check and then failed as a socket timeout, with a traceback)."""

    def __init__(self, low: float | None = 0, high: float | None = None, *, above: bool = False) -> None:
        # above: more than ``low``, as the setting requires (``--help`` then says 0<x).
        super().__init__(low, high, min_open=above)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


CONFIG: Final = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None,
    help="TOML config file (default: $FLEETLOG_CONFIG, else ./fleetlog.toml).")
DATA_DIR: Final = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where fleetlog keeps its data (default ./fleetlog-data).")
REDIS_URL: Final = click.option(
    "--redis-url", default=None,
    help="Redis URL, e.g. redis://127.0.0.1:6379/15 (default: the embedded one of the "
         "`fleetlog up` on --data-dir; `up` starts it).")
REDIS_CLUSTER: Final = click.option(
    "--redis-cluster", is_flag=True, default=None, help="The Redis URL names a node of a Redis Cluster.")
STORE: Final = click.option(
    "--store", default=None,
    help="Store URL: sqlite:///PATH or postgresql://... (default sqlite:///DATA_DIR/fleetlog.db).")
QUEUE: Final = click.option(
    "--queue", type=click.Choice(["stream", "list"]), default=None,
    help="The queue: the stream (default), or list: the legacy device:log:list (LPUSH, like the original).")
HOST: Final = click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
SHARDS: Final = click.option(
    "--shards", type=click.IntRange(min=1, max=1024), default=None,
    help="Queue streams (default 1); every gateway and worker must agree (workers split them with leases).")
FILES: Final = click.option(
    "--files", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The daily files under DIR/device/log/: the worker writes them, prune removes those past retention.")
RETENTION: Final = click.option("--retention", default=None,
                                help="Prune records older than this (30d, 12h...).")
RETENTION_BYTES: Final = click.option(
    "--retention-bytes", type=int, default=None,
    help="Prune the oldest records while the store is bigger than this.")


def common(function: F) -> F:
    """``--data-dir`` and ``--config``, which every command takes."""
    return DATA_DIR(CONFIG(function))


def redis_command(function: F) -> F:
    """:func:`common` and ``--redis-url``: what every command that only talks to Redis takes."""
    return common(REDIS_URL(function))
