"""A private PostgreSQL server for tests, started from the machine's binaries.

``initdb`` + ``pg_ctl`` into a temporary directory, listening on a free
127.0.0.1 port (and a Unix socket in that directory), with fsync off: tests
never survive a power cut, and a server of our own can be stopped and started
again by the tests that need the store to go away.  ``initdb`` refuses to run
as root, so as root every server command runs as the ``postgres`` user (which
Debian's ``postgresql`` package creates) in a directory it owns; the directory
is made directly under the system temporary directory, since pytest's own
(``/tmp/pytest-of-root``) is closed to other users.

Where no binaries are installed, :func:`external_url` names a running server
(``FLEETLOG_TEST_POSTGRES_URL``, or database ``test`` on 127.0.0.1:5432).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from fleetlog.embedded import free_port
from fleetlog.records import QueuedRecord

__all__ = ["PostgresServer", "external_url", "find_bindir", "held_write", "pg_url",
           "postgres_server", "private_postgres"]

_names = itertools.count()


def find_bindir() -> Path | None:
    """The directory of the newest installed PostgreSQL's ``initdb``, if any."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def external_url() -> str:
    return os.environ.get("FLEETLOG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


class PostgresServer:
    """One private PostgreSQL cluster; :meth:`start`, :meth:`stop`, :meth:`kill`, :meth:`remove`."""

    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        self.bindir = bindir
        self.durable = durable  # fsync as in production (benchmarks); tests need not
        self._as_root = os.geteuid() == 0
        # As root, /tmp itself: a $TMPDIR under /root would be closed to the postgres user.
        self.directory = Path(tempfile.mkdtemp(prefix="fleetlog-pg-",
                                               dir="/tmp" if self._as_root else None))
        self.data = self.directory / "data"
        self.port = free_port()
        if self._as_root:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bindir / tool), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self._as_root else command

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._command(tool, *args), capture_output=True, text=True,
                                timeout=60, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = " ".join((
            "-c listen_addresses=127.0.0.1", f"-c port={self.port}",
            f"-c unix_socket_directories={self.directory}", "-c max_connections=200",
            *(("-c shared_buffers=1GB", "-c max_wal_size=4GB") if self.durable else
              ("-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off")),
        ))
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"),
                  "-o", options, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 STRATEGY file_copy")
                         .format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def log_tail(self, lines: int = 40) -> Sequence[str]:
        try:
            return (self.directory / "server.log").read_text().splitlines()[-lines:]
        except OSError:
            return []


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    """The session's private PostgreSQL (None where no binaries: the external one is used)."""
    bindir = find_bindir()
    if bindir is None:
        yield None
        return
    with _running(bindir) as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer | None) -> Iterator[str]:
    """The URL of a new, empty database of this test's own."""
    if postgres_server is None:
        url = external_url()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        yield url
        return
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, for tests that stop or kill it (needs the binaries)."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL binaries (initdb) installed: .ci/run installs them")
    with _running(bindir) as server:
        yield server


@contextmanager
def _running(bindir: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own, started, and removed with its data on the way out."""
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@contextmanager
def held_write(url: str, records: Sequence[QueuedRecord]) -> Iterator[Callable[[], int]]:
    """A worker's write of ``records`` left in flight: its transaction id drawn, its rows in.

    The last record's key is inserted first by another transaction that does
    not commit, so the write blocks on it; whatever commits meanwhile has a
    higher seq.  Call the function yielded to let the write go on and commit
    (the blocker rolls back); it returns what ``write_batch`` returned.
    """
    from fleetlog.store.postgres import PostgresStore, day_of

    writer = PostgresStore(url)
    writer._ensure_days({day_of(record.received_at) for record in records})
    blocker = psycopg.connect(url)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(writer.write_batch(records)))
    try:
        last = records[-1]
        blocker.execute(
            "INSERT INTO records (seq, stream, qid, device_id, received_at, data)"
            " VALUES (0, %s, %s, %s, %s, '{}')",
            (last.stream, last.qid, last.device_id, last.received_at),
        )  # not committed
        thread.start()
        deadline = time.monotonic() + 10
        with psycopg.connect(url, autocommit=True) as probe:
            while probe.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
            ).fetchone() != (1,):
                assert time.monotonic() < deadline, "the write never blocked"
                time.sleep(0.02)

        def release() -> int:
            blocker.rollback()
            thread.join(10)
            assert result, "the held write did not finish"
            return result[0]

        yield release
    finally:
        blocker.close()
        thread.join(10)
        writer.close()
