"""The read side under a hostile or heavy user (issue 17, items 1, 4, 7), against real processes.

* a revoked token's live tails and exports end on every API process within a second;
* live tails that never read, and exports, hold what ``stream_buffer_bytes`` says
  (the API's RSS, measured), are cut off when they stall, and give memory back; a
  cut-off tail that reconnects with Last-Event-ID gets every record exactly once;
* hundreds of waiting commands hold no Redis connection each: another request is
  answered at once, and each command still gets its own device's answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
import redis
import websockets

from fleetlog import keys
from fleetlog.api.auth import OperatorTokens
from fleetlog.credentials import Credentials
from fleetlog.net import free_port
from fleetlog.records import QueuedRecord
from fleetlog.store.sqlite import SQLiteStore
from tests.api.conftest import Api
from tests.conftest import Processes, wait_for_port
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
#: The default ``stream_buffer_bytes``, as docs/configuration.md documents it.
BUFFER = 4 * MiB
#: What one client may cost beyond its buffer: a chunk being written and the socket's own
#: buffer (64 KiB and one more write), with records of 200 KB.
PER_CLIENT = BUFFER + 512 * 1024
#: What the API's RSS may grow by whatever the clients: SQLite's page caches, threads, the allocator.
SLACK = 32 * MiB
#: Commands sent (and answered) at once.
WAVE = 25


class Writer:
    """Writes records straight to the store and announces each batch, as a worker would."""

    def __init__(self, data_dir: Path, redis_url: str) -> None:
        self.store = SQLiteStore(data_dir / "fleetlog.db")
        self.client = redis.Redis.from_url(redis_url)
        self.written = 0
        self.t0 = int(time.time() * 1000) - 60_000

    def write(self, count: int, size: int, device: str = "big-1", batch: int = 10) -> list[int]:
        """``count`` records of about ``size`` bytes; their seqs."""
        first = self.store.max_seq()
        for start in range(0, count, batch):
            records = []
            for _ in range(min(batch, count - start)):
                n = self.written
                self.written += 1
                records.append(QueuedRecord(f"q-{n}", device, self.t0 + n, orjson.dumps(
                    {"level": "info", "msg": f"record {n}", "pad": "x" * size})))
            self.store.write_batch(records)
            self.client.publish(keys.COMMITS, orjson.dumps(
                {"seq": self.store.max_seq(), "count": len(records), "devices": [device]}))
        return list(range(first + 1, self.store.max_seq() + 1))

    def close(self) -> None:
        self.store.close()
        self.client.close()


def start_api(processes: Processes, redis_url: str, data_dir: Path,
              env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str, int]:
    port = free_port()
    process = processes.start("api", "--redis-url", redis_url, "--data-dir", str(data_dir),
                              "--port", str(port), env=env)
    wait_for_port(port, process=process)
    return process, f"http://127.0.0.1:{port}", port


def cut_off(processes: Processes, index: int) -> int:
    """How many answers the ``index``-th process started has cut off as stalled (its log)."""
    return (processes.tmp_path / f"api-{index}.log").read_text().count("cut off: stalled")


def rss(process: subprocess.Popen[bytes]) -> int:
    return int(psutil.Process(process.pid).memory_info().rss)


@contextmanager
def peak_rss(process: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """Samples the process's RSS every 50 ms in a thread; ``[peak]`` once the block ends."""
    peak = [rss(process)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss(process))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


class Tail:
    """A live tail read by a task: every complete event (id, seq, when), and how it ended."""

    def __init__(self, http: httpx.AsyncClient, url: str, token: str, last_event_id: str | None = None,
                 pause_after: int | None = None) -> None:
        self.events: list[tuple[str, int, float]] = []
        self.opened = asyncio.Event()
        self.resume = asyncio.Event()
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self._pause_after = pause_after
        headers = {"Authorization": f"Bearer {token}"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.task = asyncio.create_task(self._run(http, url, headers))

    @property
    def seqs(self) -> list[int]:
        return [seq for _, seq, _ in self.events]

    async def _lines(self, answer: httpx.Response) -> AsyncIterator[str]:
        async for line in answer.aiter_lines():
            yield line
            if self._pause_after is not None and len(self.events) >= self._pause_after:
                self._pause_after = None
                await self.resume.wait()  # read nothing meanwhile: the server's writes stall

    async def _run(self, http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        try:
            async with http.stream("GET", f"{url}/api/stream", headers=headers) as answer:
                assert answer.status_code == 200, answer.status_code
                event_id, data = "", ""
                async for line in self._lines(answer):
                    self.opened.set()
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data:  # an event counts once it is complete
                        self.events.append((event_id, orjson.loads(data)["seq"], time.monotonic()))
                        event_id, data = "", ""
        except (httpx.HTTPError, AssertionError) as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.opened.set()


def fleetlog(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetlog", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60)


def revoke(redis_url: str, name: str) -> float:
    """``fleetlog api-token revoke NAME``; when it returned (``time.monotonic()``)."""
    done = fleetlog(redis_url, "api-token", "revoke", name)
    assert done.returncode == 0, done.stderr
    return time.monotonic()


# -- 1. revocation -----------------------------------------------------------------------


async def test_revoking_a_token_ends_its_tails_and_exports_on_every_api_process(
        api: Api, processes: Processes) -> None:
    _, other, _ = start_api(processes, api.redis_url, api.data_dir)
    writer = Writer(api.data_dir, api.redis_url)
    exported = writer.write(1500, 20_000, device="old")  # 30 MB: more than sockets hold
    headers = {"Authorization": f"Bearer {api.reader}"}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as http:
            mine = [Tail(http, api.url, api.reader), Tail(http, other, api.reader)]
            admins = Tail(http, other, api.admin)  # another token: goes on
            async with http.stream("GET", f"{other}/api/export", headers=headers) as export:
                assert export.status_code == 200
                chunks = export.aiter_raw()
                received = len(await anext(chunks))  # then read nothing: the export waits on us
                for tail in (*mine, admins):
                    await asyncio.wait_for(tail.opened.wait(), 10)
                before = writer.write(1, 100, device="live")
                for tail in (*mine, admins):
                    assert await asyncio.to_thread(wait_until, lambda t=tail: t.seqs == before, 10)

                done = await asyncio.to_thread(revoke, api.redis_url, "viewer")
                await asyncio.wait_for(asyncio.gather(*(tail.task for tail in mine)), 5)
                for tail in mine:
                    assert tail.ended_at is not None and tail.ended_at - done < 1.0, tail.ended_at - done
                # The export was cut short: what is left is an error, well before its end.
                with pytest.raises(httpx.HTTPError):
                    async for chunk in chunks:
                        received += len(chunk)
                failed = time.monotonic()
                assert failed - done < 1.0, failed - done
                assert received < sum(20_000 for _ in exported)

            after = writer.write(2, 100, device="live")
            assert await asyncio.to_thread(wait_until, lambda: admins.seqs == before + after, 10)
            await asyncio.sleep(0.5)
            for tail in mine:
                assert tail.seqs == before  # nothing after the revocation
            assert (await http.get(f"{other}/api/stream", headers=headers)).status_code == 401
            assert not admins.task.done()
            admins.task.cancel()
    finally:
        writer.close()


async def test_a_new_role_ends_what_the_token_has_open_and_applies_at_once(
        api: Api, processes: Processes) -> None:
    """``fleetlog api-token role ops read``: the admin token's tails end on both API processes
    within a second; it reads again at once, and may no longer send a command."""
    _, other, _ = start_api(processes, api.redis_url, api.data_dir)
    writer = Writer(api.data_dir, api.redis_url)
    headers = {"Authorization": f"Bearer {api.admin}"}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as http:
            tails = [Tail(http, api.url, api.admin), Tail(http, other, api.admin)]
            for tail in tails:
                await asyncio.wait_for(tail.opened.wait(), 10)
            done = await asyncio.to_thread(fleetlog, api.redis_url, "api-token", "role", "ops", "read")
            changed = time.monotonic()
            assert done.returncode == 0, done.stderr
            await asyncio.wait_for(asyncio.gather(*(tail.task for tail in tails)), 5)
            for tail in tails:
                assert tail.ended_at is not None and tail.ended_at - changed < 1.0
            command = await http.post(f"{other}/api/devices/d1/commands", json={"cmd": "x"}, headers=headers)
            assert command.status_code == 403, command.text
            again = Tail(http, other, api.admin)  # still a read token: it may tail
            await asyncio.wait_for(again.opened.wait(), 10)
            seqs = writer.write(1, 100, device="live")
            assert await asyncio.to_thread(wait_until, lambda: again.seqs == seqs, 10)
            again.task.cancel()
        listed = await asyncio.to_thread(fleetlog, api.redis_url, "api-token", "list", "--json")
        assert {row["name"]: row["role"] for row in orjson.loads(listed.stdout)} == {"ops": "read",
                                                                                    "viewer": "read"}
        unknown = await asyncio.to_thread(fleetlog, api.redis_url, "api-token", "role", "nobody", "admin")
        assert unknown.returncode != 0 and "no API token named 'nobody'" in unknown.stderr
    finally:
        writer.close()


# -- 4. memory bounded in bytes ----------------------------------------------------------


def raw_tail(port: int, token: str) -> socket.socket:
    """A live tail whose client never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/stream HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server reset (or closed) the connection, read or not (Linux's TCP_INFO)."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (7, 8)  # TCP_CLOSE (a reset), TCP_CLOSE_WAIT (a FIN)


def drained(sock: socket.socket) -> int:
    """What the socket still holds, read to its end."""
    sock.settimeout(5)
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return total


async def test_tails_that_never_read_hold_their_buffer_only_and_a_cut_off_tail_resumes(
        redis_url: str, tmp_path: Path, processes: Processes) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    client = redis.Redis.from_url(redis_url)
    reader = OperatorTokens(client).add("viewer", "read")
    client.close()
    writer = Writer(data_dir, redis_url)
    writer.write(1, 100, device="small")
    stall = 3.0
    index = len(processes.started)
    process, url, port = start_api(processes, redis_url, data_dir,
                                   env={"FLEETLOG_STREAM_STALL_TIMEOUT": str(stall)})
    headers = {"Authorization": f"Bearer {reader}"}
    small = httpx.AsyncHTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)])
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30), transport=small) as http:
            # Warm up (imports, threads, a store reader), then the baseline.
            warm = Tail(http, url, reader)
            await asyncio.wait_for(warm.opened.wait(), 10)
            warm.task.cancel()
            assert (await http.get(f"{url}/api/export", headers=headers)).status_code == 200
            await asyncio.sleep(1.5)
            base = rss(process)

            socks = [raw_tail(port, reader) for _ in range(4)]
            slow = Tail(http, url, reader, pause_after=5)  # reads 5 records, then stalls
            await asyncio.wait_for(slow.opened.wait(), 10)
            await asyncio.sleep(0.5)
            with peak_rss(process) as peak:
                seqs = await asyncio.to_thread(writer.write, 300, 200_000)  # 60 MB
                await asyncio.sleep(stall - 0.5)  # every tail is stalled now, none cut yet
            grown = peak[0] - base
            print(f"API RSS {base / MiB:.0f} MiB, peak {peak[0] / MiB:.0f} MiB with 5 stalled tails")
            assert grown < 5 * PER_CLIENT + SLACK, f"RSS grew {grown / MiB:.0f} MiB for 5 tails"

            # Each is cut off once it left a write untaken for `stall` seconds, long before its end.
            assert await asyncio.to_thread(wait_until, lambda: cut_off(processes, index) == 5, 30)
            for sock in socks:
                assert await asyncio.to_thread(wait_until, lambda s=sock: closed_by_server(s), 30)
                got = await asyncio.to_thread(drained, sock)
                assert got < 60 * 1000 * 1000 / 2, got
            slow.resume.set()
            await asyncio.wait_for(slow.task, 15)
            assert slow.error is not None, "the stalled tail was not cut off"
            assert 5 <= len(slow.seqs) < len(seqs)
            # It reconnects after its last complete event and gets the rest, each once.
            resumed = Tail(http, url, reader, last_event_id=slow.events[-1][0])
            assert await asyncio.to_thread(
                wait_until, lambda: len(slow.seqs) + len(resumed.seqs) >= len(seqs), 60)
            await asyncio.sleep(0.5)
            resumed.task.cancel()
            assert slow.seqs + resumed.seqs == seqs

            # Closed, they gave the memory back.
            await asyncio.sleep(2.5)
            print(f"API RSS {rss(process) / MiB:.0f} MiB once they were cut off")
            assert rss(process) - base < SLACK, f"{(rss(process) - base) / MiB:.0f} MiB left"

            # An export of the same records, read at once: its own buffer, and every record once.
            lines = 0
            with peak_rss(process) as peak:
                async with http.stream("GET", f"{url}/api/export", headers=headers) as export:
                    order = [orjson.loads(line)["seq"] async for line in export.aiter_lines() if line]
                    lines = len(order)
            assert lines == len(seqs) + 1 and order == sorted(order, reverse=True)
            print(f"API RSS peak {peak[0] / MiB:.0f} MiB during an export of {len(seqs)} records of 200 KB")
            assert peak[0] - base < PER_CLIENT + SLACK, f"export: {(peak[0] - base) / MiB:.0f} MiB"
    finally:
        writer.close()


# -- 7. waiting commands -----------------------------------------------------------------


async def test_hundreds_of_waiting_commands_hold_no_connection_and_each_gets_its_answer(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(api.redis_url, tmp_path / "gw", auth="token")
    client = redis.Redis.from_url(api.redis_url)
    devices = [f"cmd-{n}" for n in range(10)]
    credentials = Credentials(client)
    tokens = {device: credentials.add(device) for device in devices}
    waiting = 300
    admin = {"Authorization": f"Bearer {api.admin}"}
    sockets = [await websockets.connect(f"ws://127.0.0.1:{port}/?token={tokens[d]}") for d in devices]
    try:
        assert await asyncio.to_thread(wait_until, lambda: all(
            client.hexists(keys.DEVICE_LINKS, d) for d in devices), 10)
        got: dict[str, list[dict[str, Any]]] = {device: [] for device in devices}

        async def device(name: str, ws: Any) -> None:
            while len(got[name]) < waiting // len(devices):
                got[name].append(json.loads(await ws.recv()))

        receiving = [asyncio.create_task(device(d, ws)) for d, ws in zip(devices, sockets, strict=True)]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=api.url, timeout=60, limits=limits) as http:
            async def command(n: int) -> tuple[int, dict[str, Any]]:
                answer = await http.post(f"/api/devices/{devices[n % len(devices)]}/commands",
                                         params={"wait": 30}, json={"n": n}, headers=admin)
                return answer.status_code, answer.json()

            # In waves: a gateway publishes the replies to a burst of commands on a pool of 100
            # connections of its own (its limit, not the API's).
            commands: list[asyncio.Task[tuple[int, dict[str, Any]]]] = []
            for wave in range(0, waiting, WAVE):
                commands += [asyncio.create_task(command(n)) for n in range(wave, wave + WAVE)]
                sent = len(commands)
                assert await asyncio.to_thread(
                    wait_until, lambda: sum(map(len, got.values())) >= sent, 10)  # noqa: B023
            await asyncio.wait_for(asyncio.gather(*receiving), 30)  # every command reached its device
            # All 300 wait for their answers now, on no connection of their own (each used to
            # hold a subscribed one): another user's request is answered at once.
            subscribed = [c for c in client.client_list() if int(c["sub"]) + int(c["psub"]) > 0]
            assert len(subscribed) <= 4, f"{len(subscribed)} subscribed Redis connections"
            for _ in range(5):
                started = time.monotonic()
                overview = await http.get("/api/overview", headers={"Authorization": f"Bearer {api.reader}"})
                took = time.monotonic() - started
                assert overview.status_code == 200, overview.text
                assert took < 1.0, f"/api/overview took {took:.2f}s behind {waiting} waiting commands"
            assert not any(task.done() for task in commands)
            # Each device answers each of its commands, naming it; each caller gets its own answer.
            answered = 0
            for index in range(waiting // len(devices)):
                for name, ws in zip(devices, sockets, strict=True):
                    sent = got[name][index]
                    await ws.send(json.dumps({"type": "command_result", "id": sent["id"], "echo": sent["n"],
                                              "by": name}))
                    answered += 1
                    if answered % WAVE == 0:
                        await asyncio.sleep(0.1)
            answers = await asyncio.wait_for(asyncio.gather(*commands), 30)
        for n, (status, outcome) in enumerate(answers):
            assert status == 200, outcome
            assert outcome["status"] == "delivered" and outcome["device_id"] == devices[n % len(devices)]
            assert outcome["result"] == {"type": "command_result", "id": outcome["id"], "echo": n,
                                         "by": devices[n % len(devices)]}
        assert len({outcome["id"] for _, outcome in answers}) == waiting
    finally:
        for ws in sockets:
            await ws.close()
        client.close()


def test_stream_settings_are_documented() -> None:
    docs = Path(__file__).parents[2] / "docs"
    text = (docs / "configuration.md").read_text() + (docs / "api.md").read_text()
    for name in ("stream_buffer_bytes", "stream_stall_timeout", "max_live_tails", "4 MiB", "api-token revoke",
                 "api-token role"):
        assert name in text, name


def status_of(sock: socket.socket) -> int:
    """The status code of the answer on ``sock`` (its first line)."""
    sock.settimeout(10)
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1])


def test_the_live_tail_limit_counts_tails_when_admitted_and_gives_slots_back(
        redis_url: str, tmp_path: Path, processes: Processes) -> None:
    """60 tails asked at once of a limit of 20: exactly 20 admitted; each one that ends frees its slot."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    client = redis.Redis.from_url(redis_url)
    reader = OperatorTokens(client).add("viewer", "read")
    client.close()
    _, _, port = start_api(processes, redis_url, data_dir, env={"FLEETLOG_MAX_LIVE_TAILS": "20"})
    burst = [raw_tail(port, reader) for _ in range(60)]  # every request sent before any answer is read
    statuses = [status_of(sock) for sock in burst]
    admitted = [sock for sock, status in zip(burst, statuses, strict=True) if status == 200]
    assert sorted(set(statuses)) == [200, 503] and len(admitted) == 20, statuses
    for sock in burst:
        if sock not in admitted:
            sock.close()
    for sock in admitted[:5]:  # five tails end: five slots come back, no more
        sock.close()

    held: list[socket.socket] = []

    def one_more_fits() -> bool:
        sock = raw_tail(port, reader)
        if status_of(sock) == 200:
            held.append(sock)
            return True
        sock.close()
        return False

    for _ in range(5):  # each ended tail's slot comes back (when the server sees it close)
        assert wait_until(one_more_fits, 10)
    extra = raw_tail(port, reader)
    assert status_of(extra) == 503  # 15 + 5: full again
    for sock in [*admitted[5:], *held, extra]:
        sock.close()
