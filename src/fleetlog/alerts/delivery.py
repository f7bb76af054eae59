"""Sending a notification: a plain webhook, or any service Apprise knows.

Webhook (``http://`` or ``https://`` destination): one ``POST`` with the JSON
body of :func:`body` and these headers:

* ``Content-Type: application/json``, ``User-Agent: fleetlog-alerts/1``;
* ``X-Fleetlog-Id``: the notification's id, the same on every retry (receivers
  dedupe on it); ``X-Fleetlog-Event``: ``firing``, ``resolved`` or ``test``;
* ``X-Fleetlog-Timestamp``: Unix seconds of this attempt;
* with a rule ``secret``: ``X-Fleetlog-Signature: sha256=HEX``, the hex
  HMAC-SHA256 with the secret as key of ``TIMESTAMP + "." + BODY`` (the raw
  body bytes).  Check it in constant time and refuse old timestamps.

A 2xx answer is delivered.  A 408, 425, 429 or 5xx answer, a timeout or a
connection error is tried again later; any other answer (a 4xx: the request
itself is wrong) fails at once.  No redirect is followed.

Anything else is an Apprise URL (``slack://``, ``discord://``, ``tgram://``,
``ntfy://``, ``mailto://``, ``msteams://`` ...), sent as a title and a text
body; Apprise says only yes or no, so every failure is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson

from fleetlog.alerts.engine import Firing
from fleetlog.alerts.rules import Rule, display_url, is_webhook
from fleetlog.records import iso_ms

__all__ = ["SIGNATURE_HEADER", "Attempt", "apprise_plugin", "body", "retry_delay", "send", "sign", "text"]

SIGNATURE_HEADER: Final = "X-Fleetlog-Signature"
USER_AGENT: Final = "fleetlog-alerts/1"
#: Webhook answers that may pass later: tried again.
_TRANSIENT: Final = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try gave: ``ok``; else ``error`` and whether trying again may help."""

    ok: bool
    error: str | None = None
    permanent: bool = False


def sign(secret: str, timestamp: int, payload: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of ``TIMESTAMP.BODY``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def retry_delay(attempts: int, initial: float, cap: float) -> float:
    """Seconds before try ``attempts + 1``: ``initial`` doubling to ``cap``, 20% jitter below."""
    ceiling = min(cap, initial * 2.0 ** min(max(attempts - 1, 0), 32))
    return ceiling * random.uniform(0.8, 1.0)


def _ago(ms: int) -> str:
    seconds = max(0, ms) // 1000
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"


def text(rule: Rule, firing: Firing, event: str) -> str:
    """The notification in one line of words."""
    who = "the fleet" if firing.group == "*" else firing.group
    detail = firing.detail
    resolved = event == "resolved"
    kind = firing.kind
    if kind == "records":
        span = f"between {iso_ms(firing.first_at)} and {iso_ms(firing.last_at)}"
        head = f"{firing.count} matching record{'s' if firing.count != 1 else ''} from {who} {span}"
        if resolved:
            return f"{rule.name} resolved: {head} ({rule.condition_text()})"
        return f"{rule.name}: {head} ({rule.condition_text()})"
    if kind == "offline":
        since = detail.get("offline_since")
        if resolved and firing.resolved_at is not None and isinstance(since, int):
            away = _ago(firing.resolved_at - since)
            return f"{rule.name} resolved: {who} is back online after {away} offline"
        return f"{rule.name}: {who} offline since {iso_ms(since) if isinstance(since, int) else '?'} " \
               f"(more than {rule.offline})"
    if resolved:
        return f"{rule.name} resolved: {who} no longer {rule.condition_text()}"
    values = ", ".join(f"{key} {value}" for key, value in detail.items() if not isinstance(value, dict))
    return f"{rule.name}: {who}: {rule.condition_text()} ({values})"


def body(rule: Rule, firing: Firing, note_id: str, event: str, now: int | None = None) -> dict[str, Any]:
    """The webhook's JSON body (documented in docs/alerts.md)."""
    return {
        "version": 1,
        "id": note_id,
        "event": event,
        "rule": {"name": rule.name, "id": rule.id, "kind": rule.kind, "condition": rule.condition_text(),
                 "devices": rule.devices},
        "firing": firing.public(),
        "text": text(rule, firing, "resolved" if event == "resolved" else "firing"),
        "sent_at": iso_ms(now if now is not None else int(time.time() * 1000)),
    }


def apprise_plugin(url: str) -> Any:
    """Apprise's plugin for ``url``, or None when Apprise does not know the URL."""
    import apprise

    with apprise.LogCapture(level=apprise.logging.CRITICAL + 1):  # type: ignore[no-untyped-call]
        return apprise.Apprise.instantiate(url)


_client: Any = None
_loop: asyncio.AbstractEventLoop | None = None
_client_lock = threading.Lock()


def _http() -> tuple[asyncio.AbstractEventLoop, Any]:
    """One HTTP client for the process, on an event loop of its own thread (its connection pool
    and TLS context are reused: making a client costs tens of milliseconds).

    Async, so that a send has a deadline for the whole of it: httpx's timeouts are per
    read, and a receiver that sends a byte of its headers every 2 s kept a send, and its
    sender thread, for minutes (and its notification was claimed again and sent twice).
    """
    global _client, _loop
    with _client_lock:
        if _loop is None:
            import httpx

            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="fleetlog-webhooks", daemon=True).start()
            _client = httpx.AsyncClient(follow_redirects=False, limits=httpx.Limits(max_connections=64))
        return _loop, _client


def _webhook(url: str, payload: bytes, note_id: str, event: str, secret: str | None,
             timeout: float) -> Attempt:
    import httpx

    stamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Fleetlog-Id": note_id,
               "X-Fleetlog-Event": event, "X-Fleetlog-Timestamp": str(stamp)}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, stamp, payload)
    loop, client = _http()
    sending = asyncio.run_coroutine_threadsafe(
        asyncio.wait_for(client.post(url, content=payload, headers=headers, timeout=timeout), timeout),
        loop)
    try:
        answer = sending.result()
    except TimeoutError:
        return Attempt(False, f"no whole answer within {timeout:g} s (alert_send_timeout)")
    except httpx.HTTPError as exc:
        return Attempt(False, f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__)
    if 200 <= answer.status_code < 300:
        return Attempt(True)
    error = f"HTTP {answer.status_code} from {display_url(url)}"
    transient = answer.status_code >= 500 or answer.status_code in _TRANSIENT
    return Attempt(False, error, permanent=not transient)


def _apprise(url: str, title: str, message: str) -> Attempt:
    import apprise

    with apprise.LogCapture(level=apprise.logging.WARNING) as captured:  # type: ignore[no-untyped-call]
        sender = apprise.Apprise()
        if not sender.add(url):
            return Attempt(False, f"Apprise does not know {display_url(url)}", permanent=True)
        ok = sender.notify(title=title, body=message)
        log_text = captured.getvalue().strip()
    if ok:
        return Attempt(True)
    return Attempt(False, (log_text.splitlines()[-1] if log_text else "Apprise could not send")[:300])


def send(rule: Rule, destination: int, firing: Firing, note_id: str, event: str,
         timeout: float = 10.0) -> Attempt:
    """One try at sending ``firing``'s ``event`` to ``rule.to[destination]``."""
    try:
        url = rule.to[destination]
    except IndexError:
        return Attempt(False, f"the rule has no destination {destination}", permanent=True)
    payload = body(rule, firing, note_id, event)
    if is_webhook(url):
        return _webhook(url, orjson.dumps(payload), note_id, event, rule.secret, timeout)
    title = f"[fleetlog] {rule.name} {'resolved' if event == 'resolved' else event}"
    lines = [payload["text"]]
    for record in firing.samples:
        lines.append(f"- {record['received_at']} {record['device_id']} {record.get('level') or ''} "
                     f"{record.get('message') or orjson.dumps(record.get('data')).decode()[:200]}")
    return _apprise(url, title, "\n".join(lines))


def sample_firing(rule: Rule, now: int) -> Firing:
    """A made-up firing for ``fleetlog alert test``."""
    group = "*" if rule.kind in ("backlog", "dead_letters", "lag") or rule.per == "fleet" else "test-device"
    samples = []
    if rule.kind == "records":
        samples = [{"seq": 0, "device_id": group, "received_at": iso_ms(now), "level": "info",
                    "message": "a test notification from fleetlog", "data": {"test": True}}]
    return Firing(id=f"test-{now}", rule=rule.name, rule_id=rule.id, kind=rule.kind, group=group,
                  started_at=now, first_at=now, last_at=now, count=1, notify_at=now, samples=samples,
                  detail={"test": True})


def send_test(rule: Rule, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send a sample notification to each of the rule's destinations, once, now: what each said."""
    now = int(time.time() * 1000)
    firing = sample_firing(rule, now)
    outcomes = []
    for index, url in enumerate(rule.to):
        attempt = send(rule, index, firing, f"test-{now}.{index}", "test", timeout)
        outcomes.append({"destination": display_url(url), "delivered": attempt.ok, "error": attempt.error})
    return outcomes

