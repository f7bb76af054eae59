"""A small blocking client of the API, for ``fleetlog send`` (the standard library only)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from fleetlog.errors import ApiError

__all__ = ["ApiError", "send_command"]


def send_command(url: str, token: str, device_id: str, body: Any, *, wait: float = 0.0) -> dict[str, Any]:
    """``POST /api/devices/{device_id}/commands``; the outcome (``status`` and the rest)."""
    path = f"/api/devices/{urllib.parse.quote(device_id, safe='')}/commands?wait={wait}"
    request = urllib.request.Request(
        url.rstrip("/") + path, data=orjson.dumps(body), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=wait + 15) as response:
            outcome = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace")
        raise ApiError(f"the API answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiError(f"cannot reach the API at {url}: {exc}") from None
    except orjson.JSONDecodeError:  # a 2xx page from something else (a proxy's login page)
        raise ApiError(f"the answer from {url} is not JSON: is it fleetlog's API?") from None
    if not isinstance(outcome, dict):
        raise ApiError("the API's answer is not an object")
    return outcome
