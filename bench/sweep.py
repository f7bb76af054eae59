"""Ingest and bare echo under the same closed-loop load, interleaved.

All four servers (both gateways, both echo servers) run side by side, idle
except for the one under load.  For each connection count, each repeat runs
every server once in turn, so a burst of noise from another tenant of the
machine lands on all of them alike instead of on one system's whole series;
the median run per server and connection count is reported.

Then, per system, ack latency at half of its own max rate, and fleetlog's v2
batched ingest when its simulator speaks v2.  Right after fleetlog's latency
run, the same load (rate, devices, records) against a server that acks every
frame at once (``instant-ack``): the latency the machine and the load
generator give on their own, so that what the gateway and Redis add can be
read off on any machine.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

import orjson

from bench.context import INSTANT_ACK, PY, Bench, Server, start_server
from bench.floor import add_floor
from bench.procs import ChildFailed
from bench.systems import SYSTEMS
from bench.usage import Usage

__all__ = ["LOADS", "V2_BATCH", "half_load", "legacy_load", "probe", "run_load", "sweep", "v2_load"]

#: Every server the sweep drives, in the order each repeat runs them.
LOADS = ("baseline", "fleetlog", "echo-websockets", "echo-picows")
#: Records per v2 log frame in the batched-ingest measurement.
V2_BATCH = 100
#: The Redis CPU per record against plain XADDs, measured in each run (:func:`~bench.floor.add_floor`).
RATIO = "redis_vs_plain_xadd"


def _client_argv(server: Server, devices: int, messages: int, rate: float, batch: int, prefix: str,
                 timeout: float) -> list[str]:
    if server.is_echo:
        return [PY, "-m", "bench.echo", "load", "--url", server.url, "--connections", str(devices),
                "--messages", str(messages), "--timeout", str(timeout)]
    argv = [PY, "-m", "fleetlog", "simulate", "--url", server.url, "--devices", str(devices),
            "--messages", str(messages), "--json", "--timeout", str(timeout), "--prefix", prefix]
    if rate:
        argv += ["--rate", f"{rate:.1f}"]
    if batch:
        argv += ["--batch", str(batch)]
    return argv


def run_load(bench: Bench, server: Server, devices: int, messages: int, *, rate: float = 0.0,
             batch: int = 0, prefix: str = "sim-") -> dict[str, Any]:
    """One client process against ``server``: its JSON summary plus server-side usage."""
    timeout = bench.profile.run_timeout
    bench.reset_redis()
    usage = Usage(bench, server.child)
    client = bench.clients.start(
        f"load-{server.name}-{devices}",
        _client_argv(server, devices, messages, rate, batch, prefix, timeout),
        capture_stdout=True,
    )
    out, code = client.collect(timeout + 15)
    if not out.strip():
        raise ChildFailed(f"{client.name} printed nothing (exit {code}):\n{client.tail()}")
    summary: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    if not summary.get("acked"):
        raise ChildFailed(f"{client.name}: nothing acknowledged: {summary}")
    summary.update(usage.finish(summary["acked"], client, summary.get("elapsed_s")),
                   connections=devices, client_exit=code)
    return summary


def _median(runs: list[dict[str, Any]], key: str = "records_per_s") -> dict[str, Any]:
    """The run with the median ``key``, holding every run's ``key`` (and the runs, if several).

    A ratio measured in each run (``redis_vs_plain_xadd``) is replaced by the median
    of the runs' own, its repeats kept beside it: the run with the median rate
    need not be the one with the median ratio (2026-12-06, full mode: ratios 0.507,
    0.666, 0.799, and the median-rate run was the 0.799 one).
    """
    ordered = sorted(runs, key=lambda run: float(run[key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen[f"repeats_{key}"] = [run[key] for run in runs]
    if len(runs) > 1:
        chosen["repeats"] = runs
        ratios = [run[RATIO] for run in runs if run.get(RATIO) is not None]
        if ratios:
            chosen[RATIO] = round(statistics.median(ratios), 3)
            chosen[f"repeats_{RATIO}"] = ratios
    return chosen


def v2_supported() -> bool:
    """Whether this fleetlog's simulator speaks protocol v2 (``simulate --batch``)."""
    help_text = subprocess.run([PY, "-m", "fleetlog", "simulate", "--help"], capture_output=True,
                               timeout=60, check=False).stdout
    return b"--batch" in help_text


def probe(bench: Bench, server: Server) -> dict[str, Any]:
    """A short run (50 devices x 40 frames) whose rate sizes the real ones."""
    return run_load(bench, server, 50, 40, prefix="probe-")


def legacy_load(bench: Bench, server: Server, connections: int, probe_rate: float) -> dict[str, Any]:
    """Closed-loop legacy ingest, sized from ``probe_rate`` to last ``run_seconds``."""
    messages = bench.profile.messages_per_device(probe_rate, connections, bench.profile.run_seconds)
    return run_load(bench, server, connections, messages, prefix=f"c{connections}-")


def half_load(bench: Bench, server: Server, max_rate: float) -> dict[str, Any]:
    """Ack latency with the offered rate fixed at half of ``max_rate``."""
    profile = bench.profile
    rate = max_rate / 2
    devices = profile.latency_connections
    messages = profile.messages_per_device(rate, devices, profile.latency_seconds)
    result = run_load(bench, server, devices, messages, rate=rate, prefix="half-")
    result["offered_rate"] = round(rate, 1)
    return result


def v2_load(bench: Bench, server: Server, legacy_rate: float) -> dict[str, Any]:
    """Batched v2 ingest (``V2_BATCH`` records per frame), sized from a legacy rate."""
    profile = bench.profile
    devices = profile.latency_connections
    # Batches go several times faster than single frames: size the run for that.
    messages = profile.messages_per_device(legacy_rate * 5, devices, profile.run_seconds)
    messages = max(V2_BATCH, messages - messages % V2_BATCH)
    result = run_load(bench, server, devices, messages, batch=V2_BATCH, prefix="v2-")
    result["batch"] = V2_BATCH
    return result


def _latency(bench: Bench, result: dict[str, Any], server: Server, max_rate: float, *,
             attempt: Callable[[Callable[[], Any]], Any], with_floor: bool) -> None:
    """``half_load``: the median p99 of the profile's repeats at half of ``max_rate``.

    A single p99 moves by a factor of two from run to run on a shared machine, so
    both modes repeat it (``Profile.latency_repeats``).  With ``with_floor``, each
    repeat is followed by the same load against an instant-ack server
    (``half_load_floor``, its median p99 too): a failure there is noted in it and
    does not count against the system.
    """
    floor: Server | None = None
    floors: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    try:
        if with_floor:
            floor = _noting(result, lambda: start_server(bench, INSTANT_ACK))
        for _ in range(bench.profile.latency_repeats):
            run = attempt(lambda: half_load(bench, server, max_rate))
            if run is None:
                break
            runs.append(run)
            if floor is not None and "half_load_floor" not in result:  # until it fails
                floor_run = _noting(result, functools.partial(half_load, bench, floor, max_rate))
                if floor_run is not None:
                    floors.append(floor_run)
    finally:
        if floor is not None:
            floor.stop()
    result["half_load"] = _median(runs, "ack_p99_ms") if runs else None
    if floors and "half_load_floor" not in result:  # every repeat's, or only the failure
        result["half_load_floor"] = _median(floors, "ack_p99_ms")


def _noting(result: dict[str, Any], action: Callable[[], Any]) -> Any:
    """``action()``, or ``None`` with the failure noted as the floor's (never the system's)."""
    try:
        return action()
    except Exception as exc:
        result["half_load_floor"] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
        return None


def sweep(bench: Bench) -> dict[str, dict[str, Any]]:
    """Results per server name; a server that failed has an ``error`` and no more runs."""
    profile = bench.profile
    results: dict[str, dict[str, Any]] = {name: {"runs": []} for name in LOADS}
    servers: dict[str, Server] = {}

    def attempt(name: str, action: Any) -> Any:
        if "error" in results[name]:
            return None
        try:
            return action()
        except Exception as exc:
            results[name]["error"] = f"{type(exc).__name__}: {exc}"[:1500]
            return None

    try:
        for name in LOADS:
            server = attempt(name, lambda name=name: start_server(bench, name))
            if server is not None:
                servers[name] = server
        for name, server in servers.items():
            results[name]["probe"] = attempt(name, lambda server=server: probe(bench, server))
        for connections in profile.connections:
            repeats: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for _ in range(profile.repeats):
                for name, server in servers.items():
                    rate = float((results[name].get("probe") or {}).get("records_per_s", 0))
                    run = attempt(name, lambda s=server, c=connections, r=rate: legacy_load(
                        bench, s, c, r))
                    if run is not None and name == "fleetlog" and connections == profile.latency_connections:
                        add_floor(bench, run)  # Redis CPU per record against plain XADDs
                    if run is not None:
                        repeats[name].append(run)
            for name, runs in repeats.items():
                if runs:
                    results[name]["runs"].append(_median(runs))
        for name in SYSTEMS:
            if name not in servers:
                continue
            reference = next((run for run in results[name]["runs"]
                              if run["connections"] == profile.latency_connections), None)
            if reference is None:
                continue
            max_rate = float(reference["records_per_s"])
            _latency(bench, results[name], servers[name], max_rate,
                     attempt=functools.partial(attempt, name), with_floor=name == "fleetlog")
            if name == "fleetlog" and v2_supported():
                results[name]["v2"] = attempt(name, lambda s=servers[name], r=max_rate: add_floor(
                    bench, v2_load(bench, s, r)))
    finally:
        for server in servers.values():
            server.stop()
    return results
