"""Run the measurements in order, write the results, and always clean up.

One private Redis serves the whole run (both systems, same ``appendfsync``);
it is emptied (and its AOF compacted) before each run.  A measurement that
fails is recorded in ``errors`` and the others still run: the exit code is
non-zero only when a component failed, never because a number missed its
target.  Every process started is killed by the end, and checked to be gone.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import resource
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis

from bench import report
from bench.context import ECHO_SERVERS, Bench
from bench.drain import drain
from bench.memory import idle_rss
from bench.procs import Children
from bench.profile import FULL, QUICK, Profile
from bench.sweep import sweep
from bench.systems import SYSTEMS
from fleetlog.embedded import RedisServer

__all__ = ["child_env", "machine_info", "open_redis", "raise_fd_limit", "run", "say",
           "shut_down"]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def say(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit (children inherit it); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_env(fleetlog_src: Path | None = None) -> dict[str, str]:
    """The caller's environment minus ``FLEETLOG_*`` (so no stray setting skews a run),
    plus ``FLEETLOG_PROCESSES=1``.

    ``fleetlog_src`` (a revision's ``src``) goes first on ``PYTHONPATH``, ahead of the
    installed fleetlog, so that ``python -m fleetlog`` runs that revision.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLEETLOG_")}
    # One gateway process, whatever the cores (``--processes`` defaults to one per core):
    # the figures are per process.  Revisions without the setting ignore it.
    env["FLEETLOG_PROCESSES"] = "1"
    paths = [str(fleetlog_src) if fleetlog_src else "", str(REPO), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(client: redis.Redis) -> dict[str, Any]:
    info: Any = client.info("server")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": info.get("server_name", "redis"),
        "redis_version": info.get("valkey_version") or info.get("redis_version"),
    }


def _sweep_into(results: dict[str, Any], bench: Bench) -> list[str]:
    """Run the load sweep; file gateways under ``ingest``, echo servers under ``echo``."""
    errors: list[str] = []
    for name, result in sweep(bench).items():
        if name in ECHO_SERVERS:
            results.setdefault("echo", {})[ECHO_SERVERS[name]] = result
        else:
            results.setdefault("ingest", {})[name] = result
        if "error" in result:
            errors.append(f"load/{name}: {result['error']}")
        if "error" in (result.get("half_load_floor") or {}):
            errors.append(f"load/{name} latency floor: {result['half_load_floor']['error']}")
    return errors


def open_redis(redis_server: RedisServer) -> redis.Redis:
    """Start the private Redis and return a client to it."""
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    # An AOF rewrite (a fork) in the middle of one system's run would be noise.
    client.config_set("auto-aof-rewrite-percentage", 0)
    return client


def shut_down(redis_server: RedisServer, *groups: Children) -> list[str]:
    """Stop every child and Redis; return the errors to report if any outlived the run."""
    leftovers = [name for children in groups for name in children.close()]
    redis_server.stop()
    if redis_server.process is not None and redis_server.process.poll() is None:
        leftovers.append("redis-server")
        redis_server.kill()
    errors: list[str] = []
    if leftovers:
        errors.append(f"processes still running at the end (killed): {', '.join(leftovers)}")
    still_alive = [child.name for children in groups for child in children.alive()]
    if still_alive:
        errors.append(f"processes that would not die: {', '.join(still_alive)}")
    return errors


def _steps(bench: Bench) -> list[tuple[tuple[str, str], Callable[[], Any]]]:
    """(where the result goes, how to get it), in the order they run after the sweep."""
    steps: list[tuple[tuple[str, str], Callable[[], Any]]] = [
        (("drain", "baseline_files"), lambda: drain(bench, "baseline", with_files=True)),
        (("drain", "fleetlog_sqlite"), lambda: drain(bench, "fleetlog", with_files=False)),
        (("drain", "fleetlog_sqlite_files"), lambda: drain(bench, "fleetlog", with_files=True)),
    ]
    for name in (*SYSTEMS, *ECHO_SERVERS):
        steps.append((("idle", name), functools.partial(idle_rss, bench, name)))
    return steps


def _redis_warnings(log_file: Path) -> list[str]:
    """Redis's own complaints during the run (a slow AOF fsync stalls every client)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if " # " in line or "fsync" in line.lower()][-20:]


def run(quick: bool, appendfsync: str, out_dir: Path) -> int:
    """Measure, write the results, print the table; return the exit code."""
    started = time.perf_counter()
    profile: Profile = QUICK if quick else FULL
    fd_limit = raise_fd_limit(2 * profile.idle_connections + 4096)
    scratch = BENCH_DIR / ".scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    children = Children(scratch, child_env())
    redis_server = RedisServer(scratch / "redis", appendfsync=appendfsync)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "mode": profile.name,
        "profile": {k: v for k, v in vars(profile).items() if k != "name"},
        "config": {"appendfsync": appendfsync, "appendonly": True,
                   "aof_rewrite": "automatic off; BGREWRITEAOF of the emptied db before each run",
                   "fd_limit": fd_limit, "network": "127.0.0.1 only"},
    }
    errors: list[str] = []
    try:
        client = open_redis(redis_server)
        results["machine"] = machine_info(client)
        bench = Bench(profile, children, redis_server, client, scratch)
        say(started, "load sweep (ingest and bare echo, interleaved) ...")
        try:
            errors += _sweep_into(results, bench)
        except Exception as exc:
            errors.append(f"load sweep: {type(exc).__name__}: {exc}"[:1500])
            say(started, f"load sweep FAILED:\n{traceback.format_exc()}")
        for path, step in _steps(bench):
            say(started, f"{' '.join(path)} ...")
            try:
                results.setdefault(path[0], {})[path[1]] = step()
            except Exception as exc:
                errors.append(f"{'/'.join(path)}: {type(exc).__name__}: {exc}"[:1500])
                say(started, f"{' '.join(path)} FAILED:\n{traceback.format_exc()}")
        client.close()
    except Exception as exc:  # Redis would not start, or the machine info failed
        errors.append(f"setup: {type(exc).__name__}: {exc}"[:1500])
        say(started, f"setup FAILED:\n{traceback.format_exc()}")
    finally:
        errors += shut_down(redis_server, children)
    results["redis_log_warnings"] = _redis_warnings(scratch / "redis" / "server.log")
    shutil.rmtree(scratch, ignore_errors=True)
    results["errors"] = errors
    results["wall_s"] = round(time.perf_counter() - started, 1)
    json_path, md_path, png_path, table = report.write_all(results, out_dir)
    say(started, f"wrote {json_path}, {md_path}, {png_path}")
    print(table)
    return 1 if results["errors"] else 0
