"""``fleetlog logs`` and ``devices`` as a user meets them: the read side of the code-health issue.

Reading never creates a data dir or a store (a wrong directory used to get an
empty ``fleetlog.db``, no output and exit 0: the logs looked gone); an unknown
device is said to have no records; provisioned devices that never sent
anything are listed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis

from fleetlog.credentials import Credentials
from fleetlog.records import QueuedRecord
from fleetlog.store.sqlite import SQLiteStore
from tests.helpers import run_fleetlog

T0 = 1_795_687_200_000


@pytest.mark.parametrize("command", [["logs", "D1"], ["devices"], ["logs", "D1", "--follow"]])
def test_reading_a_missing_data_dir_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    data_dir = tmp_path / "wrong-dir"
    done = run_fleetlog(*command, "--data-dir", str(data_dir), "--redis-url",
                        "redis://127.0.0.1:1/0", timeout=30) if command[0] == "devices" else \
        run_fleetlog(*command, "--data-dir", str(data_dir), timeout=30)
    assert done.returncode != 0
    assert str(data_dir) in done.stderr and "--data-dir" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not data_dir.exists(), "a reader created the data dir"
    assert done.stdout == ""


def test_reading_a_data_dir_without_a_store_creates_no_store(tmp_path: Path) -> None:
    done = run_fleetlog("logs", "D1", "--data-dir", str(tmp_path))
    assert done.returncode != 0
    assert str(tmp_path / "fleetlog.db") in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == [], "a reader created files"
    store_url = f"sqlite:///{tmp_path / 'other.db'}"
    done = run_fleetlog("logs", "D1", "--store", store_url)
    assert done.returncode != 0 and "other.db" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([QueuedRecord(f"1-{n}", "D1", T0 + n, b'{"msg": "hello %d"}' % n)
                       for n in range(3)])
    store.close()
    return tmp_path


def test_logs_of_an_unknown_device_says_it_has_no_records(data_dir: Path) -> None:
    before = sorted(path.name for path in data_dir.iterdir())
    done = run_fleetlog("logs", "NOPE", "--data-dir", str(data_dir))
    assert done.returncode == 1
    assert done.stdout == ""
    assert "NOPE" in done.stderr and "no records" in done.stderr, done.stderr
    known = run_fleetlog("logs", "D1", "--data-dir", str(data_dir), "--grep", "absent")
    assert known.returncode == 0 and known.stdout == "" and known.stderr == ""
    # (SQLite's -wal/-shm of a WAL database may appear: the reader's lock files, not a store.)
    after = sorted(path.name for path in data_dir.iterdir() if not path.name.endswith(("-wal", "-shm")))
    assert after == before


def test_devices_lists_provisioned_devices_that_sent_nothing(data_dir: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        Credentials(client, confirm_timeout=0.1).add("silent-1")
    finally:
        client.close()
    done = run_fleetlog("devices", "--json", "--data-dir", str(data_dir), "--redis-url", redis_url)
    assert done.returncode == 0, done.stderr
    rows = {row["device_id"]: row for row in json.loads(done.stdout)}
    assert rows["silent-1"]["records"] == 0
    assert rows["silent-1"]["last_seen"] is None
    assert rows["silent-1"]["online"] is False
    assert rows["D1"]["records"] == 3


def test_devices_into_a_pipe_prints_every_cell_whole(tmp_path: Path) -> None:
    """Piped (80 columns to rich by default), long ids were cut to ``door-controlle…``:
    a grep for one found nothing.  Each device is one line, its id and times whole."""
    store = SQLiteStore(tmp_path / "fleetlog.db")
    ids = [f"door-controller-building-A-floor-3-unit-{n:03d}" for n in range(2)]
    store.write_batch([QueuedRecord(f"1-{n}", device, T0 + n, b'{"msg": "m"}')
                       for n, device in enumerate(ids)])
    store.close()
    done = run_fleetlog("devices", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    for device in ids:
        [line] = [line for line in done.stdout.splitlines() if device in line]
        assert "…" not in line
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line), "last_seen whole"


def test_a_bad_reading_flag_is_named_as_the_user_typed_it(data_dir: Path) -> None:
    done = run_fleetlog("logs", "D1", "--data-dir", str(data_dir), "--grep", "a" * 300)
    assert done.returncode == 2
    assert done.stderr.startswith("fleetlog: --grep: 300 characters"), done.stderr
    since = run_fleetlog("logs", "D1", "--data-dir", str(data_dir), "--since", "yesterday-ish")
    assert since.returncode == 2 and since.stderr.startswith("fleetlog: --since: "), since.stderr
