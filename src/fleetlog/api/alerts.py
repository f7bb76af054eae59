"""Alert rules over HTTP: ``/api/alerts`` (read tokens list and show; admin tokens change).

The same model and the same Redis records as ``fleetlog alert ...``
(:mod:`fleetlog.alerts`): a rule saved here runs in ``fleetlog alerter`` like
one added from the CLI.  Destinations are shown masked to everyone, and a
rule's webhook secret is never shown.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, Field

from fleetlog import exactjson
from fleetlog.alerts.book import AlertBook
from fleetlog.alerts.delivery import send_test
from fleetlog.alerts.engine import Firing, Note
from fleetlog.alerts.rules import Rule, RuleSpec, Selector, mute_length, parse_spec
from fleetlog.alerts.sandbox import preview_in_child
from fleetlog.api.deps import ERRORS, AdminToken, Found, ReadToken
from fleetlog.api.reads import read_store, record_row
from fleetlog.reading import LogsRequest
from fleetlog.records import iso_ms

__all__ = ["router"]

router = APIRouter(tags=["alerts"], responses=ERRORS)

Name = Annotated[str, Path(description="The rule's name.", max_length=64)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No rule of that name."}}


class AlertOut(BaseModel):
    """A rule as anyone with a token sees it (destinations masked, no secret)."""

    name: str
    id: str
    kind: str
    condition: str = Field(description="The condition in words.")
    when: str | None
    offline: str | None
    reconnects: int | None
    refusals: int | None
    backlog: int | None
    dead_letters: int | None
    lag: str | None
    devices: str
    count: int
    within: str
    per: str
    group_wait: str
    to: list[str]
    signed: bool = Field(description="Whether webhook bodies are signed (a secret is set).")
    backfill: str | None
    notify_resolved: bool | None
    created_at: str
    muted_until: str | None
    muted: bool
    firing: int = Field(description="Firings open now.")


class NotificationOut(BaseModel):
    id: str
    rule: str
    event: str = Field(description="firing or resolved")
    destination: int = Field(description="Index into the rule's `to`.")
    status: str = Field(description="pending, delivered, failed, muted or cancelled")
    attempts: int
    last_error: str | None
    created_at: str
    delivered_at: str | None
    next_at: str | None


class FiringOut(BaseModel):
    id: str
    group: str = Field(description="The device, or * for the fleet.")
    state: str = Field(description="firing or resolved")
    started_at: str
    resolved_at: str | None
    first_at: str
    last_at: str
    count: int
    samples: list[dict[str, Any]]
    detail: dict[str, Any]
    notifications: list[NotificationOut]


class AlertDetail(BaseModel):
    rule: AlertOut
    firings: list[FiringOut] = Field(description="Newest first.")


class Mute(BaseModel):
    model_config = {"extra": "forbid", "populate_by_name": True}

    duration: str = Field(alias="for", description="How long: 30m, 2h, 1d.", max_length=32)


class PreviewIn(BaseModel):
    model_config = {"extra": "forbid"}

    when: str = Field(max_length=4096, description="The CEL condition, as `when` in a rule.")
    devices: str = Field(default="*", max_length=256, description="*, a device id, or a glob.")
    recent: int = Field(default=500, ge=1, le=2000, description="How many of the newest records to try "
                        "(of that device when `devices` is one id, else of the fleet).")


class PreviewOut(BaseModel):
    checked: int = Field(description="Records the selector admitted and the condition ran on.")
    matched: int
    errors: int = Field(description="Records the expression failed on (a missing field ...): no match.")
    first_error: str | None
    records: list[dict[str, Any]] = Field(description="The matching records, newest first (at most 50).")


class TestOutcome(BaseModel):
    destination: str
    delivered: bool
    error: str | None


def _book(found: Found) -> AlertBook:
    return AlertBook(found.redis)


def _now() -> int:
    return int(time.time() * 1000)


def _out(rule: Rule, firing: int, now: int) -> AlertOut:
    value = rule.public(now)
    value["created_at"] = iso_ms(rule.created_at)
    value["muted_until"] = iso_ms(rule.muted_until) if rule.muted_until is not None else None
    return AlertOut(**{key: value[key] for key in AlertOut.model_fields if key != "firing"}, firing=firing)


def _note(note: Note) -> NotificationOut:
    return NotificationOut(
        id=note.id, rule=note.rule, event=note.event, destination=note.dest, status=note.status,
        attempts=note.attempts, last_error=note.last_error, created_at=iso_ms(note.created_at),
        delivered_at=iso_ms(note.delivered_at) if note.delivered_at else None,
        next_at=iso_ms(note.next_at) if note.next_at and note.status == "pending" else None)


def _firing(firing: Firing, notes: list[Note]) -> FiringOut:
    public = firing.public()
    return FiringOut(**{key: public[key] for key in FiringOut.model_fields if key != "notifications"},
                     notifications=[_note(note) for note in notes])


@router.get("/api/alerts", response_model=list[AlertOut], summary="Every alert rule and its state")
def list_alerts(_token: ReadToken, found: Found) -> list[AlertOut]:
    book = _book(found)
    rules, open_firings = book.rules(), book.open_firings()
    now = _now()
    return [_out(rule, open_firings.get(rule.id, 0), now) for rule in rules]


@router.post("/api/alerts", response_model=AlertOut, status_code=201,
             responses={409: {"description": "A rule of that name exists (use ?replace=true)."},
                        422: {"description": "An invalid rule: `detail` names the field, and for a CEL "
                                             "error the line and column."}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": RuleSpec.model_json_schema()}}}},
             summary="Add an alert rule")
def add_alert(_token: AdminToken, found: Found,
              spec: Annotated[dict[str, Any], Body(description="A rule (the RuleSpec schema).")],
              replace: Annotated[bool, Query(description="Replace the rule of that name.")] = False,
              ) -> AlertOut:
    when = spec.get("when")
    if isinstance(when, str):  # its trial first in a child process (alerts.sandbox), as a preview's
        preview_in_child(when, "*", [], seconds=_trial_seconds(found))
    rule = _book(found).add(parse_spec(spec), replace=replace)
    return _out(rule, 0, _now())


#: Matching records a preview returns at most (it counts them all).
_PREVIEW_ROWS = 50
#: Seconds a preview's condition may run on its records, without a read budget (``read_timeout``).
_PREVIEW_SECONDS = 5.0


def _trial_seconds(found: Found) -> float:
    return found.readers.read_timeout or _PREVIEW_SECONDS


@router.post("/api/alerts/preview", response_model=PreviewOut,
             responses={422: {"description": "The condition could not be saved: as for POST /api/alerts; "
                                             "or it ran past `read_timeout` or 1 GiB on the records."}},
             summary="Which recent records a record condition matches (the console's live preview)")
async def preview_condition(body: PreviewIn, _token: ReadToken, found: Found, request: Request) -> PreviewOut:
    """The newest ``recent`` records, tried with the same compile, selector and variables as the alerter.

    A read token may ask: it shows only records the token can read anyway.
    The read runs on the reader pool under the read budget, like every read;
    the condition in a child process with as long again (``read_timeout``) and
    1 GiB, killed past either (422: :mod:`fleetlog.alerts.sandbox`), so that no
    condition holds the API.
    """
    devices = body.devices.strip() or "*"
    seconds = _trial_seconds(found)
    # Refuse an invalid condition before reading anything.  Even its compile and its trial
    # run in a child process with a time and memory limit (see alerts.sandbox), as the
    # records do: the CEL library holds the interpreter while it runs.
    await asyncio.to_thread(preview_in_child, body.when, devices, [], seconds=seconds)
    wanted = LogsRequest(Selector(devices).device, limit=body.recent)
    records = await read_store(request, found, lambda reader: reader.page(wanted).records,
                               lambda: [])
    found_ = await asyncio.to_thread(preview_in_child, body.when, devices, records, seconds=seconds)
    return PreviewOut(checked=found_.checked, matched=len(found_.matched), errors=found_.errors,
                      first_error=found_.first_error,
                      records=[exactjson.loads(record_row(r)) for r in found_.matched[:_PREVIEW_ROWS]])


@router.get("/api/alerts/{name}", response_model=AlertDetail, responses=_NOT_FOUND,
            summary="A rule and its history (firings, newest first, with their notifications)")
def show_alert(name: Name, _token: ReadToken, found: Found,
               limit: Annotated[int, Query(ge=1, le=100)] = 20) -> AlertDetail:
    book = _book(found)
    rule = book.get(name)
    history = book.history(rule, limit)
    open_now = sum(1 for firing, _ in history if firing.state == "firing")
    return AlertDetail(rule=_out(rule, open_now, _now()),
                       firings=[_firing(firing, notes) for firing, notes in history])


@router.delete("/api/alerts/{name}", status_code=204, response_class=Response, responses=_NOT_FOUND,
               summary="Remove a rule, its history and its unsent notifications")
def remove_alert(name: Name, _token: AdminToken, found: Found) -> Response:
    _book(found).remove(name)
    return Response(status_code=204)


def _mute(found: Found, name: str, until: int | None) -> AlertOut:
    rule = _book(found).mute(name, until)
    return _out(rule, 0, _now())


@router.post("/api/alerts/{name}/mute", response_model=AlertOut, responses=_NOT_FOUND,
             summary="Mute a rule for a while: its firings are recorded, not sent")
def mute_alert(name: Name, mute: Mute, _token: AdminToken, found: Found) -> AlertOut:
    try:
        length = mute_length(mute.duration)
    except ValueError as exc:
        raise HTTPException(422, [{"loc": ["body", "for"], "msg": str(exc), "type": "value_error"}]) from exc
    return _mute(found, name, _now() + length)


@router.delete("/api/alerts/{name}/mute", response_model=AlertOut, responses=_NOT_FOUND,
               summary="Unmute a rule")
def unmute_alert(name: Name, _token: AdminToken, found: Found) -> AlertOut:
    return _mute(found, name, None)


@router.post("/api/alerts/{name}/test", response_model=list[TestOutcome], responses=_NOT_FOUND,
             summary="Send a sample notification to each of the rule's destinations, now")
def send_sample(name: Name, _token: AdminToken, found: Found) -> list[TestOutcome]:
    rule = _book(found).get(name)
    return [TestOutcome(**outcome) for outcome in send_test(rule, timeout=found.settings.alert_send_timeout)]


@router.get("/api/notifications", response_model=list[NotificationOut],
            summary="Alert notifications, newest first (status=failed: those given up on)")
def list_notifications(
        _token: ReadToken, found: Found,
        status: Annotated[Literal["pending", "delivered", "failed", "muted", "cancelled"] | None,
                          Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[NotificationOut]:
    return [_note(note) for note in _book(found).notes(status, limit)]

