"""``fleetlog alert ...`` and ``fleetlog alerter``: click commands, added to the ``fleetlog`` group.

Only parsing and printing: rules are checked by :mod:`.rules` and kept by
:mod:`.book`, the same code the HTTP API calls.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from fleetlog import options

__all__ = ["alert", "alerter"]


def _book(config: str | None, flags: dict[str, Any]) -> Any:
    from fleetlog.alerts.book import AlertBook
    from fleetlog.cli import _redis, _settings

    return AlertBook(_redis(_settings(config, **flags)))  # closed when the command ends


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"fleetlog: {message}", err=True)
    sys.exit(code)


def _now() -> int:
    return int(time.time() * 1000)


@click.group()
def alert() -> None:
    """Alert rules: add, list, show (history), test, mute, remove."""


@alert.command("add")
@options.redis_command
@click.argument("name")
@click.option("--when", default=None, help="CEL over each record: level, message, device_id, received_at "
              "(ms), data (its JSON). E.g. 'level == \"error\"', 'data.temp > 80', "
              "'message.contains(\"door forced\")'.")
@click.option("--offline", default=None, metavar="DURATION", help="A device offline for longer than this.")
@click.option("--reconnects", type=click.IntRange(min=0), default=None, metavar="K",
              help="A device reconnecting more than K times a minute.")
@click.option("--refusals", type=click.IntRange(min=0), default=None, metavar="K",
              help="A device refused more than K times a minute.")
@click.option("--backlog", type=click.IntRange(min=0), default=None, metavar="N",
              help="More than N records in the queue.")
@click.option("--dead-letters", type=click.IntRange(min=0), default=None, metavar="N",
              help="More than N dead letters (0: any).")
@click.option("--lag", default=None, metavar="DURATION",
              help="The oldest record not yet stored is older than this.")
@click.option("--devices", default="*", show_default=True, help="*, a device id, or a glob (door-*).")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fire when at least N records match within --within.")
@click.option("--within", default="1m", show_default=True, help="The sliding window of --count.")
@click.option("--per", type=click.Choice(["device", "fleet"]), default="device", show_default=True,
              help="Count per device, or across the fleet.")
@click.option("--group-wait", default="10s", show_default=True,
              help="How long a new firing gathers its burst before it is sent (0s: at once).")
@click.option("--to", "to", multiple=True, required=True, metavar="URL",
              help="An http(s) webhook, or an Apprise URL (slack://, ntfy://, tgram://, mailto://, ...). "
                   "Repeat for several.")
@click.option("--secret", envvar="FLEETLOG_ALERT_SECRET", default=None,
              help="Sign webhook bodies with HMAC-SHA256 (or FLEETLOG_ALERT_SECRET).")
@click.option("--backfill", default=None, metavar="DURATION",
              help="Also evaluate the records received this long before now.")
@click.option("--resolved/--no-resolved", "notify_resolved", default=None,
              help="Send a message when a firing resolves (default: yes, but for --when rules).")
@click.option("--replace", is_flag=True, help="Replace the rule of that name (and drop its history).")
def alert_add(config: str | None, data_dir: Path | None, redis_url: str | None, name: str,
              replace: bool, to: tuple[str, ...], **values: Any) -> None:
    """Add the alert rule NAME.

    \b
    fleetlog alert add door-forced --when 'message.contains("door forced")' --devices 'door-*' \\
        --to https://hooks.example.com/fleetlog --secret "$HOOK_SECRET"
    fleetlog alert add kiosk-errors --when 'level == "error"' --devices 'kiosk-*' \\
        --count 5 --within 3m --to 'slack://T000/B000/XXXX'
    fleetlog alert add door-offline --offline 10m --devices 'door-*' --to ntfy://ntfy.sh/my-topic
    fleetlog alert add backlog --backlog 100000 --to 'mailto://user:pass@example.com'
    """
    from fleetlog.alerts.rules import InvalidRule, parse_spec

    given = {key: value for key, value in values.items() if value is not None}
    try:
        spec = parse_spec({"name": name, "to": list(to), **given})
    except InvalidRule as exc:
        _fail(f"invalid rule: {exc}")
    book = _book(config, {"data_dir": data_dir, "redis_url": redis_url})
    from fleetlog.alerts.book import RuleExists

    try:
        rule = book.add(spec, replace=replace)
    except RuleExists as exc:
        _fail(str(exc), 1)
    click.echo(f"added alert {rule.name}: {rule.condition_text()} -> {len(rule.to)} destination(s)")


def _state(rule: Any, open_firings: int, now: int) -> str:
    state = f"{open_firings} firing" if open_firings else "ok"
    if rule.muted(now):
        from fleetlog.records import iso_ms

        state += f", muted until {iso_ms(rule.muted_until)}"
    return state


@alert.command("list")
@options.redis_command
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def alert_list(config: str | None, as_json: bool, **flags: Any) -> None:
    """Every rule: its condition, devices, destinations (masked) and state."""
    book = _book(config, flags)
    now = _now()
    rules = book.rules()
    firing = book.open_firings()
    if as_json:
        rows = [{**rule.public(now), "firing": firing.get(rule.id, 0)} for rule in rules]
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("name", "condition", "devices", "to", "state")
    for rule in rules:
        table.add_row(*(Text(cell) for cell in (
            rule.name, rule.condition_text(), rule.devices, ", ".join(rule.public(now)["to"]),
            _state(rule, firing.get(rule.id, 0), now))))
    Console().print(table)


@alert.command("show")
@options.redis_command
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=1, max=100), default=20, show_default=True,
              help="Firings to show, newest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def alert_show(config: str | None, name: str, limit: int, as_json: bool, **flags: Any) -> None:
    """A rule and its history: each firing, its state, count and notifications."""
    from fleetlog.alerts.book import UnknownRule
    from fleetlog.records import iso_ms

    book = _book(config, flags)
    try:
        rule = book.get(name)
    except UnknownRule as exc:
        _fail(str(exc), 1)
    now = _now()
    history = book.history(rule, limit)
    if as_json:
        firings = [{**firing.public(), "notifications": [_note(note) for note in notes]}
                   for firing, notes in history]
        value = {"rule": rule.public(now), "firings": firings}
        sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
        return
    public = rule.public(now)
    click.echo(f"{rule.name}  ({rule.kind})  {rule.condition_text()}")
    click.echo(f"  devices {rule.devices}  to {', '.join(public['to'])}"
               + (f"  muted until {iso_ms(rule.muted_until)}" if rule.muted(now) else ""))
    backfill = f", backfill {rule.backfill}" if rule.backfill else ""
    click.echo(f"  created {iso_ms(rule.created_at)}{backfill}")
    if not history:
        click.echo("  no firings yet")
    for firing, notes in history:
        sent = ", ".join(f"{note.event} {note.status}" + (f" ({note.last_error})" if note.last_error
                                                          and note.status != "delivered" else "")
                         for note in notes) or "not sent yet"
        ended = f" -> {iso_ms(firing.resolved_at)}" if firing.resolved_at is not None else ""
        click.echo(f"{iso_ms(firing.started_at)}{ended}  {firing.state:<8}  {firing.group}  "
                   f"count {firing.count}  [{sent}]")


def _note(note: Any) -> dict[str, Any]:
    from fleetlog.records import iso_ms

    return {"id": note.id, "event": note.event, "destination": note.dest, "status": note.status,
            "attempts": note.attempts, "last_error": note.last_error,
            "delivered_at": iso_ms(note.delivered_at) if note.delivered_at else None}


@alert.command("test")
@options.redis_command
@click.argument("name")
def alert_test(config: str | None, name: str, **flags: Any) -> None:
    """Send a sample notification to each of NAME's destinations now (exit 1 if one fails)."""
    from fleetlog.alerts.book import UnknownRule
    from fleetlog.alerts.delivery import send_test

    book = _book(config, flags)
    try:
        rule = book.get(name)
    except UnknownRule as exc:
        _fail(str(exc), 1)
    failed = 0
    for outcome in send_test(rule):
        if outcome["delivered"]:
            click.echo(f"delivered  {outcome['destination']}")
        else:
            failed += 1
            click.echo(f"FAILED     {outcome['destination']}: {outcome['error']}")
    sys.exit(1 if failed else 0)


@alert.command("mute")
@options.redis_command
@click.argument("name")
@click.option("--for", "duration", required=True, metavar="DURATION", help="How long (30m, 2h, 1d).")
def alert_mute(config: str | None, name: str, duration: str, **flags: Any) -> None:
    """Send nothing for NAME for a while (its firings are still recorded, as muted)."""
    from fleetlog.alerts.book import UnknownRule
    from fleetlog.alerts.rules import mute_length
    from fleetlog.records import iso_ms

    try:
        until = _now() + mute_length(duration)
    except ValueError as exc:
        _fail(f"--for: {exc}")
    try:
        _book(config, flags).mute(name, until)
    except UnknownRule as exc:
        _fail(str(exc), 1)
    click.echo(f"muted {name} until {iso_ms(until)}")


@alert.command("unmute")
@options.redis_command
@click.argument("name")
def alert_unmute(config: str | None, name: str, **flags: Any) -> None:
    """Send NAME's notifications again."""
    from fleetlog.alerts.book import UnknownRule

    try:
        _book(config, flags).mute(name, None)
    except UnknownRule as exc:
        _fail(str(exc), 1)
    click.echo(f"unmuted {name}")


@alert.command("remove")
@options.redis_command
@click.argument("name")
def alert_remove(config: str | None, name: str, **flags: Any) -> None:
    """Delete NAME, its history and its notifications not sent yet."""
    from fleetlog.alerts.book import UnknownRule

    try:
        _book(config, flags).remove(name)
    except UnknownRule as exc:
        _fail(str(exc), 1)
    click.echo(f"removed {name}")


@click.command()
@options.redis_command
@options.STORE
@click.option("--consumer", default=None,
              help="This alerter's name for the lease (default alerter-HOST-PID).")
@options.REDIS_CLUSTER
def alerter(config: str | None, **flags: Any) -> None:
    """Evaluate the alert rules and send their notifications (one active at a time, others standby)."""
    from fleetlog.alerts.alerter import run_alerter
    from fleetlog.cli import _logging, _redis_url, _settings

    settings = _settings(config, **flags)
    _logging()
    sys.exit(run_alerter(settings, _redis_url(settings)))
