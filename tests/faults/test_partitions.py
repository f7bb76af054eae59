"""Network partitions, slow links and links cut mid-frame, through a fault proxy.

``tc netem`` is not available, so the link under test goes through
:class:`~tests.faults.proxy.FaultProxy`: the component is pointed at the proxy's
port, and the proxy drops (holds), delays or cuts what passes.  Counting v2
devices (:mod:`tests.faults.devices`) keep the ledger each scenario settles
against the store: sent, acked, refused by code, stored, lost (acked, not
stored), duplicated (stored more than once) and refused-but-stored (a refusal
that promised "not written" for records that were).  Each is a row of the table
``make faults`` prints; the refusals go in its note.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fleetlog import keys
from tests.conftest import wait_for_port
from tests.faults.devices import Devices, Ledger
from tests.faults.harness import Fleet, Outcome
from tests.faults.proxy import FaultProxy
from tests.pg import PostgresServer

LEASE = keys.shard_lease("fleetlog:records", 0, 1)


@contextmanager
def _proxy(port: int) -> Iterator[FaultProxy]:
    proxy = FaultProxy(port).start()
    try:
        yield proxy
    finally:
        proxy.close()


def _gateway(fleet: Fleet, redis_url: str, *extra: str,
             env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The fleet's gateway, with its Redis at ``redis_url`` (a proxy)."""
    fleet.gateway = fleet.procs.start(
        "gateway", "--redis-url", redis_url, "--data-dir", str(fleet.data_dir),
        "--port", str(fleet.port), "--auth", "none", *extra, env={**fleet.env, **(env or {})})
    wait_for_port(fleet.port, process=fleet.gateway)
    return fleet.gateway


def _worker(fleet: Fleet, consumer: str, *, redis_url: str | None = None, store: str | None = None,
            extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """A worker as :meth:`Fleet.start_worker` starts it, with its Redis or its store at a proxy."""
    store = store or fleet.store_url
    return fleet.procs.start(
        "worker", "--redis-url", redis_url or fleet.redis.url, "--data-dir", str(fleet.data_dir),
        "--files", str(fleet.data_dir / "logs"), "--claim-idle", "1", "--consumer", consumer,
        *(("--store", store) if store else ()), *extra, env=fleet.env)


def _lease_holder(fleet: Fleet) -> str | None:
    with fleet.redis_client() as client:
        holder = client.get(LEASE)
    return holder.decode() if isinstance(holder, bytes) else holder


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


def _settle(fleet: Fleet, ledger: Ledger, scenario: str, recovery: float, note: str = "",
            *, expect_duplicate_acks: bool = False) -> Outcome:
    """Wait for the acked records to reach the store; count, record the row, assert it clean."""
    assert not ledger.unexpected, ledger.unexpected[:5]
    assert not ledger.unacked(), f"frames never acked: {ledger.unacked()[:10]}"
    acked = ledger.acked
    stored: Counter[tuple[str, int]] = Counter()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        stored = fleet.stored()
        if acked <= stored.keys():
            break
        time.sleep(0.25)
    time.sleep(1.0)  # a late write (unconfirmed, then run) would land by now
    stored = fleet.stored()
    lying = ledger.refused_but_stored(stored)
    outcome = Outcome(
        scenario, len(acked), sum(stored.values()), len(acked - stored.keys()),
        sum(count - 1 for count in stored.values() if count > 1), round(recovery, 2),
        f"{ledger.summary()}; refused-but-stored {len(lying)}" + (f"; {note}" if note else ""))
    outcome.record()
    print(outcome)
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
    assert not lying, f"refusals that promised 'not written' for stored frames: {lying[:10]}"
    if not expect_duplicate_acks:
        # A duplicate ack needs an attempt that may have stored the frame before.
        assert ledger.duplicate_acks <= ledger.refused["unconfirmed"] + ledger.lost_connection
    return outcome


def test_gateway_redis_partitioned_ten_seconds(fleet: Fleet) -> None:
    """Packets between the gateway and Redis dropped for 10 s, no connection reset: calls
    in flight time out (``unconfirmed``: they may have run), new ones cannot connect
    (``unavailable``); what was held reaches Redis after the heal, as TCP would deliver it."""
    with _proxy(fleet.redis.port) as proxy:
        _gateway(fleet, f"redis://127.0.0.1:{proxy.port}/0")
        fleet.start_worker()
        devices = Devices(fleet.url, 20, seconds=24, records=10, pause=0.05)
        time.sleep(4)
        assert fleet.stored(), "records flow before the partition"
        proxy.blackhole()
        time.sleep(10)
        proxy.heal()
        healed = time.monotonic()
        recovery = fleet.until_flowing()
        ledger = devices.join(150)
        first_ack = ledger.first_ack_after(healed)
        assert first_ack is not None
        refused = ledger.refused
        assert refused["unconfirmed"] + refused["unavailable"] > 0, "the devices were told"
        _settle(fleet, ledger, "gateway<->Redis partitioned 10 s (packets dropped, no reset)",
                recovery, f"first ack {first_ack:.1f} s after the heal")


def test_worker_redis_partitioned_thirty_seconds_second_worker_claims(fleet: Fleet) -> None:
    """Worker A's link to Redis drops packets for 30 s, starting just after A read a batch
    (its XACK is held); worker B, connected directly, takes the lease when A's expires,
    claims A's pending records and stores them: each is stored once."""
    _gateway(fleet, fleet.redis.url)
    with _proxy(fleet.redis.port) as proxy:
        a = _worker(fleet, "a", redis_url=f"redis://127.0.0.1:{proxy.port}/0", extra=("--batch", "200"))
        _wait(lambda: _lease_holder(fleet) == "a", 30, "worker a holds the lease")
        b = _worker(fleet, "b", extra=("--batch", "200"))
        devices = Devices(fleet.url, 20, seconds=42, records=10, pause=0.05)
        time.sleep(4)
        assert fleet.stored(), "records flow before the partition"
        proxy.blackhole_on("down", 2000)  # right after a's next batch of records is read
        parted = proxy.wait_tripped(10)
        time.sleep(0.5)
        with fleet.redis_client() as client:
            pending_a = len(client.xpending_range("fleetlog:records", "fleetlog:workers", "-", "+",
                                                  count=10_000, consumername="a"))
        takeover = _wait(lambda: _lease_holder(fleet) == "b", 25, "worker b takes the lease")
        before = len(fleet.stored())
        time.sleep(max(0.0, parted + 30 - time.monotonic()))
        flowed = len(fleet.stored()) - before
        proxy.heal()
        recovery = fleet.until_flowing()
        ledger = devices.join(150)
        with fleet.redis_client() as client:
            _wait(lambda: not client.xpending("fleetlog:records", "fleetlog:workers")["pending"], 30,
                  "nothing left pending")
        assert pending_a > 0, "a held a batch it had not acked when the partition began"
        assert flowed > 0, "b stored records during the partition"
        assert a.poll() is None and b.poll() is None, "both workers stayed up"
        _settle(fleet, ledger, "worker<->Redis partitioned 30 s, 2nd worker claims", recovery,
                f"a held {pending_a} records read, unacked; b took the lease after {takeover:.1f} s "
                f"and stored {flowed} during the partition")


def test_worker_postgresql_partitioned_thirty_seconds(pg_fleet: Fleet,
                                                      private_postgres: PostgresServer) -> None:
    """The worker's link to PostgreSQL drops packets for 30 s, starting just after it sent
    a batch's COPY (its commit is held): the backlog fills (``busy``), nothing is acked
    that is not queued, and the commit lands once the link heals."""
    fleet = pg_fleet
    assert fleet.store_url is not None
    _gateway(fleet, fleet.redis.url, "--max-backlog", "3000")
    with _proxy(private_postgres.port) as proxy:
        proxied = fleet.store_url.replace(f":{private_postgres.port}/", f":{proxy.port}/")
        worker = _worker(fleet, "w", store=proxied, extra=("--batch", "200"))
        devices = Devices(fleet.url, 20, seconds=42, records=10, pause=0.05)
        _wait(lambda: len(fleet.stored()) > 0, 30, "records flow before the partition")
        time.sleep(2)
        proxy.blackhole_on("up", 2000)  # right after a batch's COPY data went out
        parted = proxy.wait_tripped(10)
        time.sleep(5)
        stalled_at = len(fleet.stored())
        time.sleep(max(0.0, parted + 30 - time.monotonic()))
        stored_while_parted = len(fleet.stored()) - stalled_at
        proxy.heal()
        recovery = fleet.until_flowing()
        ledger = devices.join(150)
        assert worker.poll() is None, "the worker waited out the partition"
        assert stored_while_parted == 0, "nothing reached the store through the partition"
        assert ledger.refused["busy"] > 0, "the backlog filled: the gateway said busy"
        _settle(fleet, ledger, "worker<->PostgreSQL partitioned 30 s", recovery,
                "begun with a COPY sent, its commit held; --max-backlog 3000")


def test_device_link_cut_mid_frame(fleet: Fleet) -> None:
    """Device links that stall in the middle of a frame and then die (reset): on the way up
    (the gateway has half a frame: nothing stored) and on the way down (the ack is cut:
    stored, the resend is acked ``duplicate``).  Every record is stored once.
    ``recovery_s``: the longest from a device seeing its link die to that frame's ack."""
    fleet.start()
    with _proxy(fleet.port) as proxy:
        devices = Devices(f"ws://127.0.0.1:{proxy.port}", 20, seconds=24, records=10, pause=0.05)
        time.sleep(2)
        for cut in range(40):  # one cut every half second, alternating up and down
            proxy.cut_mid_frame(1, direction="up" if cut % 2 == 0 else "down", keep=0.5, stall=1.0)
            time.sleep(0.5)
        proxy.heal()
        ledger = devices.join(150)
        cuts = proxy.stats["cuts up"], proxy.stats["cuts down"]
        assert cuts[0] > 10 and cuts[1] > 10, cuts
        assert ledger.lost_connection >= sum(cuts) - 2, "every cut connection died"
        # Only a cut ack makes a duplicate: the device resent a frame that was stored.
        assert ledger.duplicate_acks <= cuts[1]
        _settle(fleet, ledger, "device link cut mid-frame x40 (stall 1 s, then reset)",
                max(ledger.reacked_after),
                f"{cuts[0]} frames cut on the way up, {cuts[1]} acks on the way down",
                expect_duplicate_acks=True)


def _slow_redis(fleet: Fleet, scenario: str, gateway_env: dict[str, str] | None = None) -> Ledger:
    with _proxy(fleet.redis.port) as proxy:
        proxied = f"redis://127.0.0.1:{proxy.port}/0"
        _gateway(fleet, proxied, env=gateway_env)
        _worker(fleet, "w", redis_url=proxied)
        devices = Devices(fleet.url, 20, seconds=30, records=10, pause=0.05)
        time.sleep(4)
        assert fleet.stored(), "records flow before the slowdown"
        proxy.delay(2.0)
        time.sleep(20)
        proxy.heal()
        recovery = fleet.until_flowing()
        ledger = devices.join(150)
        _settle(fleet, ledger, scenario, recovery, "gateway and worker both on the slow link")
    return ledger


def test_redis_answers_slowly(fleet: Fleet) -> None:
    """Every Redis reply, to the gateway and to the worker, comes 2 s late for 20 s; within
    the gateway's 5 s timeout: acks come late, none refused."""
    ledger = _slow_redis(fleet, "Redis answers 2 s late for 20 s")
    assert ledger.refused["unconfirmed"] == 0


def test_redis_answers_slower_than_the_gateway_waits(fleet: Fleet) -> None:
    """The same, with the gateway's Redis timeout (1 s) under the delay: every call runs but
    its answer comes too late (``unconfirmed``); a resend is acked ``duplicate``."""
    ledger = _slow_redis(fleet, "Redis answers 2 s late for 20 s, gateway redis_timeout 1 s",
                         {"FLEETLOG_REDIS_TIMEOUT": "1"})
    assert ledger.refused["unconfirmed"] > 0
