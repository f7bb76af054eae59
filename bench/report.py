"""Turn the results dict into the JSON file, the Markdown table and the plot.

Every ratio is fleetlog / baseline.  For rates (records/s) higher is better;
for latency, CPU seconds and memory lower is better, so a ratio below 1 is the
improvement there.  ``met?`` judges fleetlog's number against the target; it is
``n/a`` when the number is missing and marked ``(quick)`` when the quick mode
measured a smaller load than the target names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Row", "markdown", "rows", "write_all"]

V2_NOTE = "n/a (v2 protocol not implemented yet)"


@dataclass(frozen=True)
class Row:
    metric: str
    baseline: float | None
    fleetlog: float | None
    target: str = ""
    check: Callable[[float, float | None], bool] | None = None  # (fleetlog, ratio) -> met
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline and self.fleetlog is not None:
            return self.fleetlog / self.baseline
        return None

    def met(self) -> str:
        if self.check is None:
            return ""
        if self.fleetlog is None:
            return "n/a"
        verdict = "yes" if self.check(self.fleetlog, self.ratio) else "no"
        return f"{verdict} {self.note}".strip()


def _get(results: dict[str, Any], *path: Any) -> Any:
    value: Any = results
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and callable(key):
            value = next((item for item in value if key(item)), None)
        else:
            return None
        if value is None:
            return None
    return value


def _run(connections: int) -> Callable[[dict[str, Any]], bool]:
    return lambda run: bool(run.get("connections") == connections)


def _ingest(results: dict[str, Any], system: str, connections: int, key: str) -> float | None:
    value = _get(results, "ingest", system, "runs", _run(connections), key)
    return float(value) if value is not None else None


def _pct(part: float | None, whole: float | None) -> float | None:
    return 100 * part / whole if part is not None and whole else None


def rows(results: dict[str, Any]) -> list[Row]:
    """The table, in reading order; targets from the project's list."""
    quick = results.get("mode") == "quick"
    counts = results.get("profile", {}).get("connections", [])
    table: list[Row] = []
    for connections in counts:
        target = connections in (100, 1000)
        table.append(Row(
            f"legacy ingest, {connections} connections (records/s acked)",
            _ingest(results, "baseline", connections, "records_per_s"),
            _ingest(results, "fleetlog", connections, "records_per_s"),
            ">= 10x baseline" if target else "",
            (lambda _v, ratio: ratio is not None and ratio >= 10) if target else None,
        ))
    v2 = _get(results, "ingest", "fleetlog", "v2")
    if v2:
        connections = v2["connections"]
        table.append(Row(
            f"v2 batched ingest, {v2['batch']} records/frame, {connections} connections "
            "(records/s; baseline: its legacy rate)",
            _ingest(results, "baseline", connections, "records_per_s"), v2["records_per_s"]))
    else:
        table.append(Row("v2 batched ingest (records/s)", None, None, V2_NOTE))
    # The Redis work per record against its floor (bench.floor: plain pipelined XADDs, one
    # entry per record, measured right after on the same server).
    table.append(Row(
        "legacy: Redis CPU per record / plain pipelined XADD per record (100 connections)", None,
        _ingest(results, "fleetlog", 100, "redis_vs_plain_xadd"),
        "<= 0.6", lambda value, _r: value <= 0.6))
    table.append(Row(
        "v2: Redis CPU per record / plain pipelined XADD per record (100 records/frame)", None,
        (v2 or {}).get("redis_vs_plain_xadd"), "<= 0.3", lambda value, _r: value <= 0.3))
    for connections in counts:
        echo_ws = _get(results, "echo", "websockets", "runs", _run(connections), "records_per_s")
        echo_pw = _get(results, "echo", "picows", "runs", _run(connections), "records_per_s")
        table.append(Row(f"bare echo, {connections} connections (msgs/s; websockets | picows)",
                         echo_ws, echo_pw))
        table.append(Row(
            f"gateway ingest as % of bare echo, same library, {connections} connections",
            _pct(_ingest(results, "baseline", connections, "records_per_s"), echo_ws),
            _pct(_ingest(results, "fleetlog", connections, "records_per_s"), echo_pw),
            ">= 50%", lambda value, _r: value >= 50,
        ))
    for key, label in (("ack_p50_ms", "p50"), ("ack_p99_ms", "p99")):
        is_p99 = key == "ack_p99_ms"
        table.append(Row(
            f"ack latency {label} at half of own max rate (ms)",
            _get(results, "ingest", "baseline", "half_load", key),
            _get(results, "ingest", "fleetlog", "half_load", key),
            "<= 5 ms" if is_p99 else "",
            (lambda value, _r: value <= 5) if is_p99 else None,
        ))
    # The floor under the p99: the same load at the same rate against a server that acks at once.
    table.append(Row(
        "ack latency p99 at fleetlog's half rate (ms; a picows server that acks at once, the "
        "machine's and load generator's floor | fleetlog)",
        _get(results, "ingest", "fleetlog", "half_load_floor", "ack_p99_ms"),
        _get(results, "ingest", "fleetlog", "half_load", "ack_p99_ms"),
    ))
    base_drain = _get(results, "drain", "baseline_files", "records_per_s")
    table.append(Row(
        "worker drain, fleetlog into SQLite (FTS built after commit) vs baseline into files (records/s)",
        base_drain, _get(results, "drain", "fleetlog_sqlite", "records_per_s"),
        ">= 10x baseline", lambda _v, ratio: ratio is not None and ratio >= 10,
    ))
    table.append(Row(
        "worker drain, fleetlog into SQLite+FTS+files vs baseline into files (records/s)",
        base_drain, _get(results, "drain", "fleetlog_sqlite_files", "records_per_s"),
    ))
    table.append(Row(
        "full-text index catch-up after the drain, off the ingest path (records/s)",
        None, _get(results, "drain", "fleetlog_sqlite", "verify_sqlite", "index_records_per_s"),
    ))
    most = max(counts, default=None)
    if most is not None:
        table.append(Row(
            f"accept-queue overflows during the {most}-connection run (kernel ListenOverflows)",
            _ingest(results, "baseline", most, "listen_overflows"),
            _ingest(results, "fleetlog", most, "listen_overflows"),
        ))
    table.append(Row(
        "gateway CPU s per 100k records (100 connections)",
        _ingest(results, "baseline", 100, "server_cpu_s_per_100k"),
        _ingest(results, "fleetlog", 100, "server_cpu_s_per_100k"),
    ))
    table.append(Row(
        "Redis CPU s per 100k records ingested (100 connections)",
        _ingest(results, "baseline", 100, "redis_cpu_s_per_100k"),
        _ingest(results, "fleetlog", 100, "redis_cpu_s_per_100k"),
    ))
    table.append(Row(
        "worker CPU s per 100k records (fleetlog: SQLite+FTS)",
        _get(results, "drain", "baseline_files", "worker_cpu_s_per_100k"),
        _get(results, "drain", "fleetlog_sqlite", "worker_cpu_s_per_100k"),
    ))
    idle_count = _get(results, "idle", "fleetlog", "connections") or _get(
        results, "idle", "baseline", "connections")
    table.append(Row(
        f"gateway RSS per idle connection, {idle_count} connections (KiB)",
        _get(results, "idle", "baseline", "rss_per_connection_kib"),
        _get(results, "idle", "fleetlog", "rss_per_connection_kib"),
        "<= 20 KB at 10,000", lambda value, _r: value * 1024 <= 20_000,
        "(quick: fewer conns)" if quick and idle_count != 10_000 else "",
    ))
    table.append(Row(
        f"bare echo RSS per idle connection, {idle_count} connections (KiB; websockets | picows)",
        _get(results, "idle", "echo-websockets", "rss_per_connection_kib"),
        _get(results, "idle", "echo-picows", "rss_per_connection_kib"),
    ))
    return table


def _spread(results: dict[str, Any]) -> list[str]:
    """min-max of the repeated runs per gateway and connection count (full mode)."""
    found = []
    for name, result in (results.get("ingest") or {}).items():
        for run in result.get("runs", []):
            rates = run.get("repeats_records_per_s") or []
            if len(rates) > 1:
                found.append(f"{name} {run['connections']}: {min(rates):,.0f}-{max(rates):,.0f}")
    return found


def _ratio_spread(results: dict[str, Any]) -> list[str]:
    """Every repeat's Redis ratio of the runs that measured one (full mode)."""
    found = []
    for run in _get(results, "ingest", "fleetlog", "runs") or []:
        ratios = run.get("repeats_redis_vs_plain_xadd") or []
        if len(ratios) > 1:
            found.append(f"{run['connections']} connections " + ", ".join(f"{r:g}" for r in ratios))
    return found


def _latency_spread(results: dict[str, Any]) -> list[str]:
    """Every repeat's p99 of the half-load runs, per system and the floor."""
    found = []
    for name, result in (results.get("ingest") or {}).items():
        for key, label in (("half_load", name), ("half_load_floor", "floor")):
            p99s = (result.get(key) or {}).get("repeats_ack_p99_ms") or []
            if len(p99s) > 1:
                found.append(f"{label} " + ", ".join(f"{value:g}" for value in p99s))
    return found


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    lines = [
        f"# fleetlog benchmark, {results.get('date')} ({results.get('mode')} mode)",
        "",
        f"{machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}), Python "
        f"{machine.get('python')}, {machine.get('redis_server')} {machine.get('redis_version')} "
        f"(appendfsync {results.get('config', {}).get('appendfsync')}). "
        "Load generator on the same machine: it competes with the server for the same cores.",
        "Ratio = fleetlog / baseline (for ms, CPU and RSS, lower is better).",
        "",
        "| metric | baseline | fleetlog | ratio | target | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in rows(results):
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        lines.append(f"| {row.metric} | {_fmt(row.baseline)} | {_fmt(row.fleetlog)} | {ratio} | "
                     f"{row.target} | {row.met()} |")
    spread = _spread(results)
    if spread:
        lines += ["", "Ingest is the median of repeated runs; their spread (records/s): "
                  + "; ".join(spread) + "."]
    ratios = _ratio_spread(results)
    if ratios:
        lines += ["", "The legacy Redis ratio is the median of the repeats' own ratios: "
                  + "; ".join(ratios) + "."]
    latency = _latency_spread(results)
    if latency:
        lines += ["", "Ack latency at half load is the run with the median p99 of its repeats; "
                  "their p99 (ms): " + "; ".join(latency) + "."]
    if results.get("errors"):
        lines += ["", "Failed components:", *(f"- {error}" for error in results["errors"])]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput and p99 (at max rate) against connections, both systems and bare echo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("baseline (websockets)", _get(results, "ingest", "baseline", "runs"), "o-", "tab:red"),
        ("fleetlog (picows)", _get(results, "ingest", "fleetlog", "runs"), "s-", "tab:blue"),
        ("bare echo websockets", _get(results, "echo", "websockets", "runs"), "o--", "tab:orange"),
        ("bare echo picows", _get(results, "echo", "picows", "runs"), "s--", "tab:cyan"),
    ]
    for label, runs, style, color in series:
        if not runs:
            continue
        xs = [run["connections"] for run in runs]
        rate_axis.plot(xs, [run["records_per_s"] for run in runs], style, color=color, label=label)
        p99_axis.plot(xs, [run["ack_p99_ms"] for run in runs], style, color=color, label=label)
    for axis, title, unit in ((rate_axis, "Legacy ingest throughput", "records/s acked"),
                              (p99_axis, "Ack latency p99 at max rate", "ms")):
        axis.set_xscale("log")
        axis.set_xlabel("concurrent connections")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    rate_axis.set_yscale("log")
    p99_axis.set_yscale("log")
    rate_axis.legend(fontsize=8)
    machine = results.get("machine", {})
    figure.suptitle(f"fleetlog vs original design, {results.get('date')} ({results.get('mode')}), "
                    f"{machine.get('cpu_count')} CPUs, load generator on the same machine", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(results: dict[str, Any], directory: Path) -> tuple[Path, Path, Path | None, str]:
    """Write ``<date>.json``, ``<date>.md`` and ``<date>.png``; return the paths and the table."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = str(results["date"])
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    png_path: Path | None = directory / f"{stem}.png"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    table = markdown(results)
    md_path.write_text(table)
    try:
        assert png_path is not None
        plot(results, png_path)
    except Exception as exc:  # a missing matplotlib must not lose the numbers
        results.setdefault("errors", []).append(f"plot: {type(exc).__name__}: {exc}")
        png_path = None
    return json_path, md_path, png_path, table
