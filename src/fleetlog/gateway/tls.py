"""The gateway's TLS context (``--tls-cert``/``--tls-key``), for ``wss://``."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["server_context"]


def server_context(cert: Path | str | None, key: Path | str | None) -> ssl.SSLContext | None:
    """A server context holding ``cert`` and ``key``; ``None`` (plain ``ws://``) without a cert.

    ``ssl.create_default_context`` for client authentication is the server
    side's secure default (TLS 1.2 or newer, no compression, the system's
    ciphers).  Raises :class:`OSError` or :class:`ssl.SSLError` when the files
    cannot be read or do not match; the gateway reports that at start.
    """
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
