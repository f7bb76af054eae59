"""How records and devices are printed by the CLI (text for people, JSON for scripts)."""

from __future__ import annotations

from typing import Any

import orjson

from fleetlog.records import StoredRecord, iso_ms

__all__ = ["record_json", "record_text"]


def record_json(record: StoredRecord) -> bytes:
    """One JSON line: ``data`` is the record exactly as stored, spliced in raw."""
    head: dict[str, Any] = {
        "seq": record.seq,
        "device_id": record.device_id,
        "received_at": iso_ms(record.received_at),
    }
    if record.ts is not None:
        head["ts"] = iso_ms(record.ts)
    if record.level is not None:
        head["level"] = record.level
    if record.message is not None:
        head["message"] = record.message
    return orjson.dumps(head)[:-1] + b',"data":' + record.data.encode() + b"}"


def record_text(record: StoredRecord) -> str:
    """``RECEIVED_AT  LEVEL  MESSAGE``; the record's JSON when it has no message."""
    level = (record.level or "-").upper()
    body = record.message if record.message is not None else record.data
    return f"{iso_ms(record.received_at)}  {level:<5}  {body}"
