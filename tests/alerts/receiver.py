"""A real HTTP webhook receiver for the alert tests: a threaded server on a loopback port.

It keeps every request (headers, raw body, parsed JSON, arrival time), can be
taken down (the port closed: connections refused) and brought back on the
same port, and checks signatures the way the README tells receivers to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fleetlog.net import free_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any]
    at: float  # time.time()

    def signature_ok(self, secret: str) -> bool:
        """The README's check: HMAC-SHA256(secret, TIMESTAMP + "." + raw body), constant time."""
        stamp = self.headers.get("x-fleetlog-timestamp", "")
        given = self.headers.get("x-fleetlog-signature", "")
        digest = hmac.new(secret.encode(), f"{stamp}.".encode() + self.raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given, f"sha256={digest}")


class Receiver:
    """``url`` takes POSTs; ``received`` lists them; ``down()``/``up()`` close and reopen the port."""

    def __init__(self, status: int = 200) -> None:
        self.port = free_port()
        self.status = status
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with receiver.lock:
                    receiver.received.append(Received(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, raw, json.loads(raw),
                        time.time()))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self, event: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.received if event is None or r.body.get("event") == event]

    def wait(self, count: int, timeout: float, event: str | None = "firing") -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.bodies(event)) >= count:
                break
            time.sleep(0.05)
        return self.bodies(event)

    def close(self) -> None:
        self.down()
