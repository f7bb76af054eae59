"""Operator tokens: roles, 401 without or with a revoked token, 403 for a weak role."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import redis

from fleetlog import keys
from fleetlog.credentials import hash_token
from tests.api.conftest import Api
from tests.helpers import run_fleetlog


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_healthz_needs_no_token_and_everything_else_does(api: Api) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        for path in ("/readyz", "/metrics", "/openapi.json", "/api/device-tokens"):
            answer = http.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"] == "Bearer"
            assert http.get(path, headers=_auth("fla_wrong")).status_code == 401
        assert http.get("/openapi.json", headers=_auth(api.reader)).json()["paths"]


def test_read_token_cannot_send_commands_or_manage_device_tokens(api: Api) -> None:
    client = redis.Redis.from_url(api.redis_url)
    pubsub = client.pubsub()
    pubsub.psubscribe("fleetlog:control:*")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    client.hset(keys.DEVICE_LINKS, "d1", '{"node": "n1", "conn": "n1/1"}')
    client.set(keys.node_heartbeat("n1"), "{}")
    with httpx.Client(base_url=api.url, timeout=10, headers=_auth(api.reader)) as http:
        assert http.post("/api/devices/d1/commands", json={"reboot": True}).status_code == 403
        assert http.post("/api/device-tokens", json={"device_id": "d1"}).status_code == 403
        assert http.get("/api/device-tokens").status_code == 200
    assert pubsub.get_message(timeout=0.5) is None, "a refused command reached no node"
    assert not client.exists(keys.device_credential("d1")), "a refused token was not created"
    client.close()


def test_admin_manages_device_tokens_like_the_cli(api: Api) -> None:
    client = redis.Redis.from_url(api.redis_url)
    with httpx.Client(base_url=api.url, timeout=10, headers=_auth(api.admin)) as http:
        added = http.post("/api/device-tokens", json={"device_id": "door/1"})
        assert added.status_code == 201
        token = added.json()["token"]
        assert client.hget(keys.TOKENS, hash_token(token)) == b"door/1"
        assert http.post("/api/device-tokens", json={"device_id": "door/1"}).status_code == 409
        rotated = http.post("/api/device-tokens/door%2F1/rotate").json()["token"]
        assert client.hget(keys.TOKENS, hash_token(token)) is None
        assert client.hget(keys.TOKENS, hash_token(rotated)) == b"door/1"
        assert [row["device_id"] for row in http.get("/api/device-tokens").json()] == ["door/1"]
        assert http.delete("/api/device-tokens/door%2F1").status_code == 204
        assert http.delete("/api/device-tokens/door%2F1").status_code == 404
        assert client.hlen(keys.TOKENS) == 0
    client.close()


def test_api_token_cli_add_list_revoke(api: Api) -> None:
    added = run_fleetlog("api-token", "add", "ci", "--role", "admin", "--redis-url", api.redis_url)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("fla_") and "\n" not in token
    client = redis.Redis.from_url(api.redis_url)
    assert token.encode() not in b"".join(client.hvals(keys.SINGLE_API_TOKENS.table)), "stored hashed"
    listed = run_fleetlog("api-token", "list", "--json", "--redis-url", api.redis_url)
    assert {row["name"]: row["role"] for row in __import__("json").loads(listed.stdout)} == {
        "ci": "admin", "ops": "admin", "viewer": "read"}
    with httpx.Client(base_url=api.url, timeout=10, headers=_auth(token)) as http:
        assert http.get("/api/device-tokens").status_code == 200
        assert run_fleetlog("api-token", "revoke", "ci", "--redis-url", api.redis_url).returncode == 0
        assert http.get("/api/device-tokens").status_code == 401
    assert run_fleetlog("api-token", "revoke", "ci", "--redis-url", api.redis_url).returncode != 0
    assert not client.exists(keys.SINGLE_API_TOKENS.name("ci"))
    client.close()


async def test_a_burst_of_more_requests_than_redis_connections_is_served_not_refused(
    api: Api,
) -> None:
    """250 requests at once (a console wall of live tails, a scripted poller) are each
    authenticated; more than the client's pool of Redis connections wait for one rather
    than fail as "Redis is not answering" (the 200-subscriber SSE bench found 101 503s)."""
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=_auth(api.reader),
                                 limits=limits) as http:
        answers = await asyncio.gather(*(http.get("/api/devices") for _ in range(250)))
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: 250}, {code: n for code, n in statuses.items()}
    assert all(answer.json() == {"devices": [], "warning": ""} for answer in answers)
