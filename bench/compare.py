"""``python -m bench.compare --before REV [--after REV_OR_DIR]``: two fleetlog revisions, one run.

Both sides' gateways run side by side against the same private Redis; their
workers drain the same preloaded queue.  Only the server side differs: the
load generator is the after side's ``fleetlog simulate`` for both.  Each
metric is measured ``repeats`` times, interleaved (before, after, before,
after, ...) so that noise from other tenants of the machine hits both alike,
and every run of a metric does the same work on both sides (sized from the
before side).  The median of the repeats is reported, with their spread, as
after / before.  Exit status 0 when everything ran (a slower number is not an
error), 1 when a component failed; every process and the temporary worktrees
are gone by the end either way.

``--after-env FLEETLOG_X=V`` (repeatable) sets a setting for the after side's
processes only (its gateways and workers; also the load generator, which is the
after side's for both and ignores server settings): with ``--after`` the same revision as ``--before``,
the table is what the setting does against its default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from bench.context import Bench, Server, start_server
from bench.drain import drain
from bench.floor import add_floor
from bench.procs import ChildFailed, Children
from bench.profile import FULL, QUICK
from bench.revisions import Checkouts, RevisionError, Side, imported_from
from bench.runner import BENCH_DIR, REPO, child_env, machine_info, open_redis, raise_fd_limit, say, shut_down
from bench.sweep import V2_BATCH, half_load, legacy_load, probe, v2_load
from fleetlog.embedded import RedisServer

__all__ = ["METRICS", "compare", "main", "markdown"]

SIDES = ("before", "after")


@dataclass(frozen=True)
class Metric:
    label: str  # completed with the run's numbers by _label()
    field: str  # the key of each run's result that is compared
    higher_is_better: bool


#: What --only chooses from, in the order they run.
METRICS = {
    "legacy": Metric("legacy ingest, {connections} connections (records/s acked)",
                     "records_per_s", True),
    "v2": Metric(f"v2 batched ingest, {V2_BATCH} records/frame, {{connections}} connections "
                 "(records/s acked)", "records_per_s", True),
    "latency": Metric("ack latency p99 at {rate} records/s offered (half of before's legacy max), "
                      "{connections} connections (ms)", "ack_p99_ms", False),
    "drain": Metric("worker drain into SQLite, {records} records (records/s)", "records_per_s", True),
}
#: Read off the runs of another metric (key: the metric whose runs hold the field).
DERIVED = {
    "legacy_redis": ("legacy", Metric("legacy Redis CPU per record / plain pipelined XADD per record "
                                      "(bench.floor), {connections} connections",
                                      "redis_vs_plain_xadd", False)),
    "v2_redis": ("v2", Metric(f"v2 Redis CPU per record / plain pipelined XADD per record "
                              f"(bench.floor), {V2_BATCH} records/frame", "redis_vs_plain_xadd", False)),
}
#: Every metric a table may show.
ALL_METRICS = {**METRICS, **{key: metric for key, (_, metric) in DERIVED.items()}}
#: The profile's sizes that a comparison uses.
PROFILE_KEYS = ("run_seconds", "latency_seconds", "latency_connections", "drain_records", "run_timeout")
#: Metrics that drive a gateway (the others only need a worker).
INGEST = ("legacy", "v2", "latency")


class _Runs:
    """Runs per metric and side; after a failed run a side makes no more runs of that metric."""

    def __init__(self, repeats: int, started: float) -> None:
        self.repeats, self.started = repeats, started
        self.metrics: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []

    def phase(self, metric: str, action: Callable[[str], dict[str, Any]]) -> None:
        """Run ``action(side)`` for every repeat and side, interleaved."""
        entry = self.metrics.setdefault(metric, {side: {"runs": []} for side in SIDES})
        field = ALL_METRICS[metric].field
        for repeat in range(1, self.repeats + 1):
            for side in SIDES:
                if "error" in entry[side]:
                    continue
                try:
                    run = action(side)
                except Exception as exc:
                    entry[side]["error"] = f"{type(exc).__name__}: {exc}"[:1500]
                    self.errors.append(f"{metric}/{side}: {entry[side]['error']}")
                    say(self.started, f"{metric} {side} FAILED:\n{traceback.format_exc()}")
                    continue
                entry[side]["runs"].append(run)
                say(self.started, f"{metric} {side} {repeat}/{self.repeats}: {field} {run[field]}")

    def median(self, metric: str, side: str) -> float | None:
        runs = self.metrics.get(metric, {}).get(side, {}).get("runs")
        return statistics.median(run[ALL_METRICS[metric].field] for run in runs) if runs else None


def _measure(benches: dict[str, Bench], only: list[str], runs: _Runs) -> dict[str, Any]:
    """Run the chosen metrics into ``runs``; return the rates the runs were sized from."""
    servers: dict[str, Server] = {}
    probes: dict[str, float] = {}

    def server(side: str) -> Server:
        if side not in servers:
            raise ChildFailed(f"the {side} gateway is not running (see its start error)")
        return servers[side]

    try:
        if set(only) & set(INGEST):
            for side in SIDES:
                try:
                    servers[side] = start_server(benches[side], "fleetlog")
                    # Also warms both gateways up before the first measured run.
                    probes[side] = float(probe(benches[side], servers[side])["records_per_s"])
                except Exception as exc:
                    runs.errors.append(f"{side} gateway: {type(exc).__name__}: {exc}"[:1500])
        # Every run of a metric does the same work on both sides, sized from the before side.
        probe_rate = probes.get("before") or probes.get("after") or 0.0
        if "legacy" in only:
            runs.phase("legacy", lambda side: add_floor(benches[side], legacy_load(
                benches[side], server(side), benches[side].profile.latency_connections, probe_rate)))
        max_rate = runs.median("legacy", "before")
        sizing = {"probe_records_per_s": probes, "before_legacy_records_per_s": max_rate}
        if "v2" in only:
            runs.phase("v2", lambda side: add_floor(
                benches[side], v2_load(benches[side], server(side), max_rate or probe_rate)))
        if "latency" in only and max_rate:
            runs.phase("latency", lambda side: half_load(benches[side], server(side), max_rate))
        elif "latency" in only:
            runs.errors.append("latency: no legacy rate of the before side to take half of")
    finally:
        for running in servers.values():
            running.stop()
    if "drain" in only:
        runs.phase("drain", lambda side: drain(benches[side], "fleetlog", with_files=False))
    for key, (source, _metric) in DERIVED.items():  # the same runs, another of their fields
        if source in runs.metrics:
            runs.metrics[key] = {side: {"runs": runs.metrics[source][side]["runs"]} for side in SIDES}
    return sizing


def _summarise(metrics: dict[str, dict[str, Any]]) -> None:
    """Add values, median, min, max per side and the after / before ratio of the medians."""
    for key, entry in metrics.items():
        for side in SIDES:
            values = [run[ALL_METRICS[key].field] for run in entry[side]["runs"]
                      if run.get(ALL_METRICS[key].field) is not None]
            if values:
                entry[side].update(values=values, median=statistics.median(values),
                                   min=min(values), max=max(values))
        before, after = entry["before"].get("median"), entry["after"].get("median")
        entry["ratio"] = round(after / before, 4) if before and after is not None else None


def _side_info(side: Side, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Where a side's code comes from; fails unless its children import its own ``src``."""
    found = imported_from(env, cwd)
    if found != side.src / "fleetlog":
        raise RevisionError(f"{side.name} children import fleetlog from {found}, not {side.src}")
    return {"spec": side.spec, "commit": side.commit, "short": side.short,
            "uncommitted_changes_in_src": list(side.changes), "tree": str(side.tree),
            "fleetlog_imported_from": str(found)}


def compare(before: str, after: str, quick: bool, repeats: int, only: list[str],
            out_dir: Path, after_env: dict[str, str] | None = None) -> int:
    """Measure both sides, write the results, print the table; return the exit code."""
    started = time.perf_counter()
    profile = QUICK if quick else FULL
    raise_fd_limit(4096)
    root = Path(tempfile.mkdtemp(prefix="fleetlog-compare-"))
    checkouts = Checkouts(REPO, root)
    redis_server = RedisServer(root / "redis", appendfsync="everysec")
    groups: dict[str, Children] = {}
    runs = _Runs(repeats, started)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "mode": profile.name, "repeats": repeats,
        "only": only, "profile": {key: getattr(profile, key) for key in PROFILE_KEYS},
        "config": {"appendfsync": "everysec", "loadgen": "the after side's fleetlog simulate",
                   "order": "per metric, each repeat runs before then after",
                   "after_env": after_env or {}},
    }
    errors: list[str] = []
    try:
        results["sides"] = {}
        for name, spec in zip(SIDES, (before, after), strict=True):
            side = checkouts.side(name, spec)
            env, cwd = child_env(side.src), root / f"run-{name}"
            if name == "after":
                env.update(after_env or {})
            cwd.mkdir()
            results["sides"][name] = _side_info(side, env, cwd)
            groups[name] = Children(cwd, env)
            say(started, f"{name}: {side.short} ({side.tree})")
        client = open_redis(redis_server)
        results["machine"] = machine_info(client)
        benches = {name: Bench(profile, groups[name], redis_server, client, root / f"run-{name}",
                               loadgen=groups["after"]) for name in SIDES}
        results["sizing"] = _measure(benches, only, runs)
        client.close()
    except Exception as exc:  # a bad revision, Redis would not start, ...
        errors.append(f"setup: {type(exc).__name__}: {exc}"[:1500])
        say(started, f"setup FAILED:\n{traceback.format_exc()}")
    finally:
        errors += shut_down(redis_server, *groups.values())
        errors += checkouts.close()
        shutil.rmtree(root, ignore_errors=True)
    _summarise(runs.metrics)
    results.update(metrics=runs.metrics, errors=runs.errors + errors,
                   wall_s=round(time.perf_counter() - started, 1))
    table = markdown(results)
    if runs.metrics:
        md_path, json_path = _write(results, table, out_dir)
        say(started, f"wrote {md_path}, {json_path}")
    print(table)
    return 1 if results["errors"] else 0


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _spread(entry: dict[str, Any]) -> str:
    if "median" not in entry:
        return "failed" if "error" in entry else "n/a"
    width = (entry["max"] - entry["min"]) / entry["median"] if entry["median"] else 0.0
    return f"{_fmt(entry['min'])}-{_fmt(entry['max'])} ({100 * width:.0f}%)"


def _label(key: str, entry: dict[str, Any], profile: dict[str, Any]) -> str:
    runs = entry["before"]["runs"] or entry["after"]["runs"]
    rate = runs[0].get("offered_rate") if runs else None
    return ALL_METRICS[key].label.format(connections=profile.get("latency_connections"),
                                     rate=_fmt(rate), records=f"{profile.get('drain_records'):,}")


def markdown(results: dict[str, Any]) -> str:
    sides = results.get("sides", {})
    machine = results.get("machine", {})
    profile = results.get("profile", {})

    def describe(name: str) -> str:
        side = sides.get(name)
        settings = results.get("config", {}).get("after_env", {}) if name == "after" else {}
        extra = "".join(f" with `{key}={value}`" for key, value in sorted(settings.items()))
        return f"`{side['short']}` (`{side['spec']}`){extra}" if side else "n/a"

    where = (f" {machine['cpu_count']} CPUs, Python {machine['python']}, {machine['redis_server']} "
             f"{machine['redis_version']} (appendfsync everysec); the load generator shares the cores."
             if machine else "")
    lines = [
        f"# fleetlog before/after, {results['date']} ({results['mode']} mode, "
        f"{results['repeats']} repeats)",
        "",
        f"before {describe('before')}, after {describe('after')}; load generator: the after "
        f"side's `fleetlog simulate`.{where}",
        "",
        "| metric | better | before | after | after / before | before spread | after spread |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, entry in results.get("metrics", {}).items():
        ratio = f"{entry['ratio']:.3f}" if entry.get("ratio") is not None else "n/a"
        better = "higher" if ALL_METRICS[key].higher_is_better else "lower"
        lines.append(f"| {_label(key, entry, profile)} | {better} | "
                     f"{_fmt(entry['before'].get('median'))} | {_fmt(entry['after'].get('median'))} "
                     f"| {ratio} | {_spread(entry['before'])} | {_spread(entry['after'])} |")
    lines += ["", f"Median of {results['repeats']} repeats, run interleaved (before, after, before, "
              "...). Spread: min-max of the repeats (width as % of the median); a ratio that "
              "differs from 1 by less than the spreads are wide is within this machine's noise."]
    if results.get("errors"):
        lines += ["", "Failed components:", *(f"- {error}" for error in results["errors"])]
    return "\n".join(lines) + "\n"


def _write(results: dict[str, Any], table: str, directory: Path) -> tuple[Path, Path]:
    """Write ``compare-<date>-<before>-<after>.md`` and ``.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    shorts = [results.get("sides", {}).get(name, {}).get("short", name) for name in SIDES]
    stem = f"compare-{results['date']}-{shorts[0]}-{shorts[1]}"
    for key, value in sorted(results.get("config", {}).get("after_env", {}).items()):
        stem += "-" + re.sub(r"[^a-z0-9.]+", "_", f"{key.removeprefix('FLEETLOG_')}={value}".lower())
    md_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    md_path.write_text(table)
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return md_path, json_path


def _metric_list(text: str) -> list[str]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    unknown = chosen - set(METRICS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(sorted(unknown))}: "
                                         f"choose from {','.join(METRICS)}")
    if "latency" in chosen:
        chosen.add("legacy")  # its offered rate is half of the before side's legacy rate
    return [name for name in METRICS if name in chosen]


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("FLEETLOG_"):
        raise argparse.ArgumentTypeError(f"{text!r}: write FLEETLOG_NAME=VALUE")
    return key, value


def _exit_on_sigterm(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through the cleanup in compare()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="A git revision (main~3, a sha).")
    parser.add_argument("--after", default=str(REPO),
                        help="A git revision, or a directory holding src/fleetlog (default: this "
                             "repo's working tree, uncommitted changes included).")
    parser.add_argument("--quick", action="store_true", help="Shorter runs, smaller drains.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per metric and side (default 3).")
    parser.add_argument("--only", type=_metric_list, default=list(METRICS),
                        help=f"Comma-separated subset of {','.join(METRICS)} (latency brings legacy).")
    parser.add_argument("--after-env", action="append", default=[], type=_setting, metavar="FLEETLOG_X=V",
                        help="A setting for the after side's processes only (repeatable).")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="Where compare-<date>-<before>-<after>.md and .json go.")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return compare(args.before, args.after, args.quick, args.repeats, args.only, args.out,
                   dict(args.after_env))


if __name__ == "__main__":
    sys.exit(main())
