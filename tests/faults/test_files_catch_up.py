"""Fault scenario: traffic stops while two workers drain; the daily files must still be complete.

The export after a batch takes only what is final (on PostgreSQL, what lies
below the oldest open write transaction), so the last batch of one worker can
be left for the next export, and when traffic stops no batch comes to run one:
a quiet worker exports on its own.  Within 10 s of the last ack every acked
record is in the files, exactly once.

On PostgreSQL the race that left a frame out (a commit while the other
worker's write transaction was open) is made certain: a write transaction of
the test's own stays open from the first stored record until traffic has
stopped, so every later batch is committed above the horizon, and the files
must catch up after it ends with no batch to follow.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import ExitStack

import psycopg
import pytest

from tests.faults.harness import Fleet

CATCH_UP_S = 10


def _filed(fleet: Fleet) -> Counter[tuple[str, int]]:
    """:meth:`Fleet.filed`, or nothing while a worker is mid-append (a line not complete yet)."""
    try:
        return fleet.filed()
    except json.JSONDecodeError:
        return Counter()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_daily_files_complete_within_seconds_after_traffic_stops(
    backend: str, request: pytest.FixtureRequest
) -> None:
    fleet: Fleet = request.getfixturevalue("pg_fleet" if backend == "postgresql" else "fleet")
    fleet.start(worker_args=("--batch", "100"))
    fleet.start_worker("--batch", "100", consumer="w2")
    fleet.simulate(devices=20, messages=300, rate=3000)
    with ExitStack() as stack:
        other: psycopg.Connection[tuple[object, ...]] | None = None
        if fleet.store_url is not None:
            fleet.wait_drained(1)
            other = stack.enter_context(psycopg.connect(fleet.store_url))
            other.execute("SELECT pg_current_xact_id()")  # an id drawn, not committed
        fleet.wait_simulation(acked=6000)
        acked_through: dict[str, int] = json.loads(fleet.acked_file.read_text())
        acked = {(device, seq) for device, count in acked_through.items() for seq in range(count)}
        if other is not None:
            fleet.wait_drained(len(acked))
            held_back = len(acked - _filed(fleet).keys())
            assert held_back > 0, "batches committed above the open transaction wait for it"
            other.rollback()
    stopped = time.monotonic()  # the last frame acked (and the transaction over): no traffic now
    while not acked <= _filed(fleet).keys() and time.monotonic() - stopped < CATCH_UP_S:
        time.sleep(0.1)
    caught_up = time.monotonic() - stopped
    missing = len(acked - _filed(fleet).keys())
    assert missing == 0, f"{missing} acked records not in the files {caught_up:.1f} s after traffic stopped"
    name = "PostgreSQL" if backend == "postgresql" else "SQLite"
    note = f"every acked record filed {caught_up:.1f} s after traffic stopped"
    if other is not None:
        note += f"; {held_back} of them held back by an open write transaction until then"
    fleet.verify_clean(f"traffic stops, 2 workers ({name}): daily files complete", caught_up, note,
                       source="files")
