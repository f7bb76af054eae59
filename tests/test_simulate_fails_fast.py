"""``fleetlog simulate`` fails in seconds, saying why, when retrying cannot help."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fleetlog.embedded import free_port
from tests.conftest import Processes
from tests.helpers import run_fleetlog


def _simulate(url: str, *extra: str) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    done = run_fleetlog("simulate", "--url", url, "--devices", "3", "--messages", "2", "--json",
                        *extra, timeout=120)
    return done.returncode, json.loads(done.stdout), time.monotonic() - started


def test_refused_connection_fails_fast_with_the_url() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    code, summary, took = _simulate(url)
    assert code == 1
    assert summary["acked"] == 0
    assert summary["url"] == url
    assert "cannot connect to " + url in str(summary["failure"])
    assert took < 60, "not the 600 s timeout"


def test_a_malformed_url_fails_at_once() -> None:
    code, summary, took = _simulate("http://127.0.0.1:1/")
    assert code == 1
    assert "scheme" in str(summary["failure"])
    assert took < 20


def test_refused_credentials_fail_at_once(redis_url: str, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path, auth="token")
    code, summary, took = _simulate(f"ws://127.0.0.1:{port}/?token=flt_wrong")
    assert "flt_wrong" not in json.dumps(summary), "a token is never printed"
    assert code == 1
    assert "HTTP 401" in str(summary["failure"])
    assert "unknown or revoked token" in str(summary["failure"])
    assert took < 20


def test_text_summary_names_the_reason() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    done = run_fleetlog("simulate", "--url", url, "--devices", "1", "--messages", "1", timeout=120)
    assert done.returncode == 1
    assert f"cannot connect to {url}" in done.stderr
