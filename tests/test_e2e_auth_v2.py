"""Device identity and protocol v2 over real gateways: tokens, JWT, take-over, acks, limits, TLS."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from fleetlog.credentials import Credentials
from fleetlog.embedded import RedisServer
from fleetlog.store.sqlite import SQLiteStore
from tests.conftest import Processes
from tests.helpers import (
    RECEIVED,
    STORED,
    legacy_frame,
    queued,
    run_fleetlog,
    send_legacy,
    stored_rows,
    wait_until,
)

STREAM = "fleetlog:records"
HS_SECRET = "an-hs256-secret-of-32-bytes-min!"


def _add(redis_url: str, device: str) -> str:
    client = redis.Redis.from_url(redis_url)
    token = Credentials(client).add(device)  # returns once every gateway has it
    client.close()
    return token


async def _status_of_refusal(url: str, **kwargs: Any) -> int:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, **kwargs):
            pass
    return refused.value.response.status_code


async def _closed_code(ws: Any, timeout: float = 5) -> int:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def _log(ws: Any, frame_id: str, records: list[Any], **extra: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "log", "id": frame_id, "records": records, **extra}))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return reply


async def test_token_auth_at_the_handshake(redis_url: str, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path, auth="token")
    token = _add(redis_url, "door-1")
    url = f"ws://127.0.0.1:{port}/"
    client = redis.Redis.from_url(redis_url)

    assert await _status_of_refusal(url) == 401
    assert await _status_of_refusal(f"{url}?token=flt_nope") == 401
    assert await _status_of_refusal(url, additional_headers={"Authorization": "Bearer flt_x"}) == 401
    assert client.xlen(STREAM) == 0

    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        # Linked at connect, before any frame.
        assert wait_until(lambda: client.hexists("device:links", "door-1"), 5)
        assert await send_legacy(ws, legacy_frame("door-1", 0)) == [RECEIVED, STORED]
        # The token names the device: claiming another one is forbidden, changes nothing.
        replies = await send_legacy(ws, legacy_frame("door-2", 1))
        assert replies[1]["code"] == "forbidden"
        assert not client.hexists("device:links", "door-2")
        # A frame without deviceId is the token's device.
        frame = json.dumps({"type": 4, "data": {"seq": 2}})
        assert await send_legacy(ws, frame) == [RECEIVED, STORED]
    assert [device for device, _ in queued(client, STREAM)] == [b"door-1", b"door-1"]

    async with websockets.connect(f"{url}?token={token}") as ws:  # firmware without headers
        assert await send_legacy(ws, legacy_frame("door-1", 3)) == [RECEIVED, STORED]

    # The hash is stored, never the token.
    stored = b"".join(client.hgetall("fleetlog:device:door-1").values())
    assert token.encode() not in stored
    client.close()


async def test_revoke_and_rotate_close_connections(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port_a = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-a")
    _, port_b = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-b")
    token = _add(redis_url, "kiosk")
    other = _add(redis_url, "kiosk-2")
    client = redis.Redis.from_url(redis_url)
    credentials = Credentials(client)

    async with websockets.connect(f"ws://127.0.0.1:{port_a}/?token={token}") as on_a, \
            websockets.connect(f"ws://127.0.0.1:{port_b}/?token={other}") as on_b:
        started = time.monotonic()
        credentials.revoke("kiosk")
        assert await _closed_code(on_a) == 4401
        assert time.monotonic() - started < 2
        assert await send_legacy(on_b, legacy_frame("kiosk-2", 0)) == [RECEIVED, STORED]

        new = credentials.rotate("kiosk-2")
        assert await _closed_code(on_b) == 4401
    await asyncio.sleep(0.8)
    assert await _status_of_refusal(f"ws://127.0.0.1:{port_b}/?token={other}") == 401
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/?token={new}") as ws:
        assert await send_legacy(ws, legacy_frame("kiosk-2", 1)) == [RECEIVED, STORED]
    client.close()


async def test_list_mode_files_an_authenticated_devices_records_under_it_only(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    """``--queue list`` pushes the record alone and the worker reads the device from inside
    it: a token must not let one device file records under another, nor under ``unknown``."""
    data_dir = tmp_path / "data"
    token = _add(redis_url, "door-1")
    _add(redis_url, "door-2")
    _, port = processes.gateway(redis_url, data_dir, "--queue", "list", auth="token")
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
        forged = {"deviceId": "door-1", "type": 4, "data": {"deviceId": "door-2", "msg": "door forced"}}
        replies = await send_legacy(ws, json.dumps(forged))
        assert replies[0] == RECEIVED and replies[1]["code"] == "forbidden"
        for data in ({"msg": "plain"}, {"deviceId": "door-1", "msg": "own"}, "text"):
            assert (await send_legacy(ws, json.dumps({"type": 4, "data": data})))[1] == STORED
        # A v2 frame with one forged record is refused whole; sent again without it, stored.
        frame = {"type": "log", "id": "f1",
                 "records": [{"msg": "v2 ok"}, {"deviceId": "door-2", "msg": "v2 forged"}]}
        await ws.send(json.dumps(frame))
        refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert refused["type"] == "error" and refused["code"] == "forbidden" and refused["id"] == "f1"
        await ws.send(json.dumps({**frame, "records": [{"msg": "v2 ok"}]}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ack["type"] == "ack" and ack["id"] == "f1" and not ack.get("duplicate")
    client = redis.Redis.from_url(redis_url)
    pushed = [json.loads(item) for item in reversed(client.lrange("device:log:list", 0, -1))]
    client.close()
    assert pushed == [{"deviceId": "door-1", "msg": "plain"}, {"deviceId": "door-1", "msg": "own"}, "text",
                      {"deviceId": "door-1", "msg": "v2 ok"}]
    processes.worker(redis_url, data_dir, "--queue", "list")
    assert wait_until(lambda: len(stored_rows(data_dir)) >= 4, timeout=30)
    rows = stored_rows(data_dir)
    assert [(device, json.loads(data)) for _, device, _, data in rows] == [
        ("door-1", {"deviceId": "door-1", "msg": "plain"}), ("door-1", {"deviceId": "door-1", "msg": "own"}),
        ("unknown", "text"), ("door-1", {"deviceId": "door-1", "msg": "v2 ok"})]


async def test_second_connection_takes_over_on_any_node(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port_a = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-a")
    _, port_b = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-b")
    token = _add(redis_url, "sensor")
    client = redis.Redis.from_url(redis_url)

    async with websockets.connect(f"ws://127.0.0.1:{port_a}/?token={token}") as first:
        await send_legacy(first, legacy_frame("sensor", 0))
        async with websockets.connect(f"ws://127.0.0.1:{port_a}/?token={token}") as second:
            assert await _closed_code(first) == 4409  # same node
            await send_legacy(second, legacy_frame("sensor", 1))
            async with websockets.connect(f"ws://127.0.0.1:{port_b}/?token={token}") as third:
                assert await _closed_code(second) == 4409  # across nodes
                assert await send_legacy(third, legacy_frame("sensor", 2)) == [RECEIVED, STORED]
                link = json.loads(client.hget("device:links", "sensor"))
                node_b = json.loads(client.get(f"fleetlog:node:{link['node']}"))
                assert node_b["port"] == port_b
    client.close()


async def test_jwt_hs256_and_rs256(redis_url: str, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path, "--jwt-secret", HS_SECRET, auth="jwt",
                                log_name="gw-hs")
    now = datetime.datetime.now(datetime.UTC)
    good = jwt.encode({"sub": "cam-1", "exp": now + datetime.timedelta(minutes=5)}, HS_SECRET)
    expired = jwt.encode({"sub": "cam-1", "exp": now - datetime.timedelta(minutes=5)}, HS_SECRET)
    no_exp = jwt.encode({"sub": "cam-1"}, HS_SECRET)
    forged = jwt.encode({"sub": "cam-1", "exp": now + datetime.timedelta(minutes=5)}, "guess" * 8)
    for bad in (expired, no_exp, forged):
        assert await _status_of_refusal(f"ws://127.0.0.1:{port}/?token={bad}") == 401
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={good}") as ws:
        assert await send_legacy(ws, legacy_frame("cam-1", 0)) == [RECEIVED, STORED]

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "jwt.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    _, port_rs = processes.gateway(redis_url, tmp_path, "--jwt-public-key", str(public), auth="jwt",
                                   log_name="gw-rs")
    signed = jwt.encode({"sub": "cam-2", "exp": now + datetime.timedelta(minutes=5)}, key,
                        algorithm="RS256")
    async with websockets.connect(f"ws://127.0.0.1:{port_rs}/",
                                  additional_headers={"Authorization": f"Bearer {signed}"}) as ws:
        assert await send_legacy(ws, legacy_frame("cam-2", 0)) == [RECEIVED, STORED]
    # An HS256 token signed with the public key as secret must not pass (alg confusion).
    confused = jwt.encode({"sub": "cam-2", "exp": now + datetime.timedelta(minutes=5)}, "x" * 32)
    assert await _status_of_refusal(f"ws://127.0.0.1:{port_rs}/?token={confused}") == 401


async def test_v2_acks_say_exactly_what_is_stored(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path, "--max-records-per-frame", "10", auth="token")
    token = _add(redis_url, "meter")
    client = redis.Redis.from_url(redis_url)
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
        ack = await _log(ws, "a", [{"seq": 1}, {"seq": 2}, {"seq": 3}])
        assert ack == {"type": "ack", "id": "a", "stored": 3, "stored_through": 3, "missing": []}
        # The same frame id again: acked again, stored once.
        again = await _log(ws, "a", [{"seq": 1}, {"seq": 2}, {"seq": 3}])
        assert again["duplicate"] is True
        assert again["stored"] == 0
        assert len(queued(client, STREAM)) == 3
        # A gap (as after a reconnect) is reported so the device can resend.
        gap = await _log(ws, "b", [{"seq": 7}, {"seq": 8}])
        assert gap["stored_through"] == 3
        assert gap["missing"] == [[4, 6]]
        filled = await _log(ws, "c", [{"seq": 4}, {"seq": 5}, {"seq": 6}, {"seq": 2}])
        assert filled["stored"] == 3
        assert filled["duplicates"] == [2]
        assert filled["stored_through"] == 8
        assert filled["missing"] == []
        # Records without seq are simply stored.
        plain = await _log(ws, "d", ["text record", {"msg": "no seq"}])
        assert plain == {"type": "ack", "id": "d", "stored": 2}
        # A fresh session restarts the counter without reporting old seqs as duplicates.
        rebooted = await _log(ws, "e", [{"seq": 1}], session="boot-2")
        assert rebooted["stored"] == 1
        # Limits and bad frames: errors carry the frame id.
        too_many = await _log(ws, "f", [{"n": n} for n in range(11)])
        assert (too_many["code"], too_many["id"]) == ("too_large", "f")
        bad_seq = await _log(ws, "g", [{"seq": -1}])
        assert (bad_seq["code"], bad_seq["id"]) == ("bad_frame", "g")
        await ws.send(json.dumps({"type": "log", "records": [1]}))
        assert json.loads(await ws.recv())["code"] == "bad_frame"
    assert len(queued(client, STREAM)) == 3 + 2 + 3 + 2 + 1
    client.close()


async def test_rate_limit_slows_then_refuses_and_is_counted(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(
        redis_url, tmp_path, "--rate-records", "20", auth="token",
        env={"FLEETLOG_RATE_BURST": "1", "FLEETLOG_RATE_MAX_DELAY": "1"},
    )
    processes.worker(redis_url, tmp_path)
    token = _add(redis_url, "chatty")
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
        started = time.monotonic()
        for n in range(3):  # 60 records at 20/s with a 20-record burst: slowed, never refused
            ack = await _log(ws, f"s{n}", [{"n": i} for i in range(20)])
            assert ack["stored"] == 20
        assert time.monotonic() - started >= 1.5
        big = [{"n": i} for i in range(200)]
        refused = await _log(ws, "big", big)
        assert refused["code"] == "rate_limited"
        assert refused["retry_after_ms"] > 1000
        client = redis.Redis.from_url(redis_url)
        assert client.xinfo_stream(STREAM)["entries-added"] == 3, (
            "nothing of the refused frame was queued (one entry per frame acked)")
        # Sent again after retry_after_ms, the same frame is taken (its cost becomes debt).
        await asyncio.sleep(refused["retry_after_ms"] / 1000)
        resent = await _log(ws, "big", big)
        assert resent["stored"] == 200, resent
        assert client.xinfo_stream(STREAM)["entries-added"] == 4  # 260 records, one entry per frame
        client.close()
    # In the store: the three slowed frames and the resent one, each record once.
    assert wait_until(lambda: len(stored_rows(tmp_path)) >= 260, 20)
    stored = Counter(json.loads(data)["n"] for _, device, _, data in stored_rows(tmp_path)
                     if device == "chatty")
    assert stored == Counter({n: 4 if n < 20 else 1 for n in range(200)})
    await asyncio.sleep(0.3)  # refusal counts are written by the gateway in the background
    SQLiteStore(tmp_path / "fleetlog.db").close()  # what a worker creates; readers never do
    shown = await asyncio.to_thread(
        run_fleetlog, "devices", "--json", "--redis-url", redis_url, "--data-dir", str(tmp_path))
    [row] = [r for r in json.loads(shown.stdout) if r["device_id"] == "chatty"]
    assert row["refused"] == {"rate_limited": 1}


async def test_tls_and_connections_per_address(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    _, port = processes.gateway(redis_url, tmp_path, "--tls-cert", str(cert_path), "--tls-key",
                                str(key_path), "--max-connections-per-ip", "2")
    context = ssl.create_default_context(cafile=str(cert_path))
    url = f"wss://localhost:{port}/"
    async with websockets.connect(url, ssl=context) as one, websockets.connect(url, ssl=context):
        assert await send_legacy(one, legacy_frame("tls-1", 0)) == [RECEIVED, STORED]
        # After the handshake picows reads the socket directly: frames that take many
        # TLS records and reads, and many small ones, still arrive whole.
        assert await send_legacy(one, legacy_frame("tls-1", 1, blob="x" * 300_000)) == [RECEIVED, STORED]
        for seq in range(2, 52):
            assert await send_legacy(one, legacy_frame("tls-1", seq)) == [RECEIVED, STORED]
        # A third, counted from accept (its handshake too): refused before the upgrade.
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, ssl=context):
                pass
        assert refused.value.response.status_code == 429
    with pytest.raises(ssl.SSLError):
        async with websockets.connect(url, ssl=ssl.create_default_context()):
            pass


async def test_a_token_just_added_is_accepted_at_once_on_every_node(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port_a = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-a")
    _, port_b = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-b")
    common = ("--redis-url", redis_url, "--data-dir", str(tmp_path))
    client = redis.Redis.from_url(redis_url)
    for n in range(20):
        added = await asyncio.to_thread(run_fleetlog, "device", "add", f"new-{n}", *common)
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip()
        for port in (port_a, port_b):
            async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
                ack = await _log(ws, f"{n}-{port}", [{"n": n}])
                assert ack["stored"] == 1, ack
    assert len(queued(client, STREAM)) == 40
    client.close()


async def test_weak_jwt_settings_are_refused(redis_url: str, processes: Processes, tmp_path: Path) -> None:
    from fleetlog.embedded import free_port

    started = await asyncio.to_thread(
        run_fleetlog, "gateway", "--redis-url", redis_url, "--data-dir", str(tmp_path),
        "--port", str(free_port()), "--auth", "jwt", "--jwt-secret", "x", timeout=20)
    assert started.returncode != 0
    assert "at least 32 bytes" in started.stderr
    assert "Traceback" not in started.stderr
    up = await asyncio.to_thread(
        run_fleetlog, "up", "--data-dir", str(tmp_path / "up"), "--ws-port", str(free_port()),
        "--auth", "jwt", "--jwt-secret", "x", timeout=20)
    assert up.returncode != 0
    assert "at least 32 bytes" in up.stderr

    secret = "a-secret-of-32-bytes-or-more-ok!"
    _, port = processes.gateway(redis_url, tmp_path, "--jwt-secret", secret, auth="jwt")
    later = int(time.time()) + 300
    for claims in ({"sub": "cam-1", "exp": str(later)}, {"sub": "cam-1", "exp": later, "nbf": "0"},
                   {"sub": "cam-1", "exp": later, "iat": "0"}, {"sub": "bad\nid", "exp": later}):
        token = jwt.encode(claims, secret)
        assert await _status_of_refusal(f"ws://127.0.0.1:{port}/?token={token}") == 401
    good = jwt.encode({"sub": "cam-1", "exp": later}, secret)
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={good}") as ws:
        assert await send_legacy(ws, legacy_frame("cam-1", 0)) == [RECEIVED, STORED]
    client = redis.Redis.from_url(redis_url)
    assert len(queued(client, STREAM)) == 1, "only the valid token's record"
    client.close()


def test_device_add_refuses_a_bad_id(redis_url: str, tmp_path: Path) -> None:
    common = ("--redis-url", redis_url, "--data-dir", str(tmp_path))
    for bad in ("", "x" * 10_000, "two\nlines", "esc\x1b[2J", " padded"):
        added = run_fleetlog("device", "add", bad, *common)
        assert added.returncode != 0
        assert "device id" in added.stderr
        assert "Traceback" not in added.stderr
    client = redis.Redis.from_url(redis_url)
    assert client.hlen("fleetlog:tokens") == 0
    assert client.keys("fleetlog:device:*") == []
    client.close()
    assert run_fleetlog("device", "add", "site:ünïcode-1", *common).returncode == 0


async def test_a_gateway_that_does_not_confirm_delays_add_boundedly(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    stuck, port = processes.gateway(redis_url, tmp_path, auth="token")
    common = ("--redis-url", redis_url, "--data-dir", str(tmp_path))
    stuck.send_signal(signal.SIGSTOP)
    try:
        added = await asyncio.to_thread(run_fleetlog, "device", "add", "late", *common, timeout=30)
    finally:
        stuck.send_signal(signal.SIGCONT)
    assert added.returncode == 0, added.stderr
    assert "1 gateway node(s) did not confirm" in added.stderr
    token = added.stdout.strip()
    assert token.startswith("flt_"), "the token is printed even so"
    # Resumed, the node applies the change it has not read yet, soon (not necessarily
    # before it answers a handshake that was waiting too).
    for _ in range(50):
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
                assert (await _log(ws, "f", [{"n": 1}]))["stored"] == 1
            break
        except websockets.InvalidStatus:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the resumed gateway never accepted the token")


async def test_token_changes_reach_a_gateway_after_a_redis_restart(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    url = private_redis.url
    _, port = processes.gateway(url, tmp_path, auth="token")
    kept, dropped = _add(url, "kept"), _add(url, "dropped")
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={dropped}") as ws:
        assert await send_legacy(ws, legacy_frame("dropped", 0)) == [RECEIVED, STORED]
        private_redis.kill()  # the gateway's subscription dies with it
        private_redis.start()
        client = redis.Redis.from_url(url)
        Credentials(client).revoke("dropped")  # maybe before the gateway is back: no one confirms
        assert await _closed_code(ws, timeout=10) == 4401
    new = Credentials(client).add("new")
    client.close()
    for token in (kept, new):
        async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
            for _ in range(50):  # the first write after the restart may get `unavailable`: resend
                reply = await _log(ws, "f", [{"n": 1}])
                if reply["type"] == "ack":
                    break
                assert reply["code"] == "unavailable", reply
                await asyncio.sleep(0.1)
            assert reply["stored"] == 1
    assert await _status_of_refusal(f"ws://127.0.0.1:{port}/?token={dropped}") == 401


def _provision(client: redis.Redis, count: int, chunk: int = 10_000) -> None:
    """``count`` devices' token hashes in the table, as a big fleet has them (pipelined HSETs)."""
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, count, chunk):
            pipe.hset("fleetlog:tokens", mapping={
                f"{n:064x}": f"fleet-{n}" for n in range(start, min(count, start + chunk))})
        pipe.execute()


async def test_a_gateway_looks_tokens_up_instead_of_loading_the_table(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    _provision(client, 100_000)
    token = _add(redis_url, "door-1")
    other = _add(redis_url, "door-2")
    loads = client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
    _, port_a = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-a")
    _, port_b = processes.gateway(redis_url, tmp_path, auth="token", log_name="gw-b")
    url_a, url_b = f"ws://127.0.0.1:{port_a}/", f"ws://127.0.0.1:{port_b}/"

    # Unknown tokens, asked of Redis (then cached): still HTTP 401 before the upgrade.
    for _ in range(2):
        assert await _status_of_refusal(f"{url_a}?token=flt_nope") == 401
        assert await _status_of_refusal(url_b, additional_headers={"Authorization": "Bearer flt_x"}) == 401
    async with websockets.connect(f"{url_a}?token={token}") as on_a, \
            websockets.connect(url_b, additional_headers={"Authorization": f"Bearer {other}"}) as on_b:
        assert client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0) == loads, \
            "no gateway loaded the token table"
        assert await send_legacy(on_a, legacy_frame("door-1", 0)) == [RECEIVED, STORED]
        assert await send_legacy(on_b, legacy_frame("door-2", 0)) == [RECEIVED, STORED]
        started = time.monotonic()
        Credentials(client).revoke("door-1")
        Credentials(client).rotate("door-2")
        assert await _closed_code(on_a) == 4401
        assert await _closed_code(on_b) == 4401
        assert time.monotonic() - started < 2
    # The revoked token is refused on both nodes, cached or not.
    for url in (url_a, url_b):
        assert await _status_of_refusal(f"{url}?token={token}") == 401
        assert await _status_of_refusal(f"{url}?token={other}") == 401
    assert [device for device, _ in queued(client, STREAM)] == [b"door-1", b"door-2"]
    client.close()


async def test_a_token_that_cannot_be_looked_up_gets_503_not_401(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    url = private_redis.url
    token = _add(url, "door-9")
    _, port = processes.gateway(url, tmp_path, auth="token")
    gateway = f"ws://127.0.0.1:{port}/?token={token}"
    private_redis.stop()
    try:
        # The gateway never saw this token and cannot ask Redis: not "bad token" (a device
        # told 401 stops retrying) but "try again later".
        assert await _status_of_refusal(gateway, open_timeout=15) == 503
    finally:
        private_redis.start()
    client = redis.Redis.from_url(url)
    statuses = []
    for _ in range(100):  # the gateway's connection comes back within its backoff
        try:
            async with websockets.connect(gateway) as ws:
                replies = await send_legacy(ws, legacy_frame("door-9", 0))
            if replies == [RECEIVED, STORED]:
                break
            # The producer's first call after the restart may still meet the dead socket:
            # "unavailable", not stored, sent again -- as a device does.
            assert replies[1]["code"] == "unavailable", replies
            await asyncio.sleep(0.1)
        except websockets.InvalidStatus as refused:
            statuses.append(refused.response.status_code)
            await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the token was never accepted once Redis was back: {statuses}")
    assert set(statuses) <= {503}, "never told the token is bad"
    assert [device for device, _ in queued(client, STREAM)] == [b"door-9"]
    client.close()
