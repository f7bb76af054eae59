"""What an alert rule is: one model for the CLI, the HTTP API and the console.

A rule has exactly one condition:

* ``when``: a CEL expression over each stored record (``level``, ``message``,
  ``device_id``, ``received_at`` in ms since the epoch, and ``data``, the
  record's JSON: ``data.temp > 80``), with a threshold: at least ``count``
  matching records within ``within`` (a sliding window), counted per device or
  across the fleet (``per``).  The first notification of a firing waits
  ``group_wait`` to gather the burst, then carries the count, the first and
  last time and up to :data:`SAMPLES` sample records;
* ``offline``: a device offline for longer than this (and a ``resolved``
  message when it is back);
* ``reconnects`` / ``refusals``: a device connecting again, or being refused
  (any reason), more than this many times in the last minute;
* ``backlog`` (records in the queue), ``dead_letters`` (more than this many
  dead letters; 0: any), ``lag`` (the oldest record not yet stored is older
  than this).

``devices`` selects devices: ``*`` (all, the default), an id, or a glob
(``door-*`` is a prefix, ``kiosk-?``, ``[ab]-*``); it applies to the record,
presence and refusal conditions.  ``to`` lists destinations: an ``http(s)://``
URL is a plain webhook (JSON body, signed with ``secret`` when one is set),
anything else an Apprise URL (``slack://``, ``ntfy://``, ``tgram://``,
``mailto://``, ``msteams://`` ...).

An invalid rule is refused when it is saved, never when it runs: a CEL syntax
error names its line and column, an unknown name the names a record has.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import cel
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fleetlog.config import MASK, mask_url
from fleetlog.errors import InvalidRule
from fleetlog.timeparse import parse_duration

__all__ = [
    "CONDITIONS",
    "RECORD_VARIABLES",
    "SAMPLES",
    "STORED",
    "TRIAL_SECONDS",
    "InvalidRule",
    "Kind",
    "Rule",
    "RuleSpec",
    "Selector",
    "compile_condition",
    "display_url",
    "is_webhook",
    "parse_spec",
    "stored_program",
]

#: The names a record condition may use.
RECORD_VARIABLES: Final = ("level", "message", "device_id", "received_at", "data")
#: Sample records a notification carries at most.
SAMPLES: Final = 5
#: The fields that each name one kind of condition; a rule has exactly one.
CONDITIONS: Final = ("when", "offline", "reconnects", "refusals", "backlog", "dead_letters", "lag")

Kind = Literal["records", "offline", "reconnects", "refusals", "backlog", "dead_letters", "lag"]

_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_POSITION: Final = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")
_GLOB: Final = re.compile(r"[*?\[]")


def _caret(expression: str, line: int, column: int) -> str:
    text = expression.splitlines()[line - 1] if expression.splitlines() else ""
    return f"\n  {text}\n  {' ' * max(0, column - 1)}^"


#: The longest mute: ten years.  Longer ones reached past year 9999, which no date
#: can show: the rule could no longer be listed, by the API or the CLI.
MAX_MUTE_MS: Final = 3650 * 86_400_000


def mute_length(text: str) -> int:
    """Milliseconds of a mute's ``--for``/``for``; ValueError if not a duration or over ten years."""
    length = parse_duration(text)
    if length > MAX_MUTE_MS:
        raise ValueError(f"{text!r} is longer than a mute may be (3650d, ten years); "
                         "remove the rule to silence it for good")
    return length


def compile_condition(expression: str) -> cel.Program:
    """The compiled CEL program of a record condition; :class:`InvalidRule` when it is not one.

    Refused: a syntax error (with its line and column), a name other than
    :data:`RECORD_VARIABLES`, a function CEL does not have, and an expression
    that gives something other than a boolean.  An expression that fails only
    on some records (``data.temp > 80`` where ``data`` has no ``temp``) is
    valid: such a record does not match.
    """
    if not expression.strip():
        raise InvalidRule("when: an empty expression", "when")
    if _comprehension_depth(expression) > 1:
        raise InvalidRule("when: a comprehension (all, exists, exists_one, map, filter) inside "
                          "another: its cost is the product of the lists' lengths, on every "
                          "record; write them one after the other", "when")
    try:
        program = cel.compile(expression)
    except ValueError as exc:
        found = _POSITION.search(str(exc))
        if found is None:
            raise InvalidRule(f"when: {exc}", "when") from None
        line, column = int(found.group(1)), int(found.group(2))
        raise InvalidRule(f"when: {found.group(3).strip()} at line {line}, column {column}"
                          f"{_caret(expression, line, column)}", "when", (line, column)) from None
    bound = set(_BOUND.findall(_STRING.sub('""', expression)))  # a comprehension's own names
    for name in program.variables():
        if name not in RECORD_VARIABLES and name not in bound:
            at = _find_name(expression, name)
            where = f" at line {at[0]}, column {at[1]}" if at else ""
            raise InvalidRule(
                f"when: unknown name {name!r}{where} (a record has {', '.join(RECORD_VARIABLES)})",
                "when", at)
    # A trial on a record with no data: only what no record could ever pass is refused.
    sample = {"level": "info", "message": "", "device_id": "d", "received_at": 0, "data": {}}
    started = time.perf_counter()
    try:
        value = program.execute(sample)
    except RuntimeError as exc:
        if str(exc).startswith(_UNDEFINED):
            raise InvalidRule(f"when: {exc}", "when") from None
        return program  # a function that failed on this record (int("")): valid
    except TypeError as exc:
        if "data" not in program.variables():
            raise InvalidRule(f"when: {exc}", "when") from None
        return program
    except (KeyError, ValueError, IndexError, OverflowError, ZeroDivisionError):
        return program
    if not isinstance(value, bool):
        raise InvalidRule(f"when: the expression gives {type(value).__name__} {value!r}, "
                          "not true or false", "when")
    took = time.perf_counter() - started
    if took > TRIAL_SECONDS:  # once more, so that a pause of the machine is not the condition's
        started = time.perf_counter()
        program.execute(sample)
        took = min(took, time.perf_counter() - started)
    if took > TRIAL_SECONDS:
        raise InvalidRule(f"when: the condition took {took * 1000:.0f} ms on an empty record, and the "
                          "alerter runs it on every record: use fewer or simpler regular expressions "
                          "(the CEL library compiles each one again on every call)", "when")
    return program


def stored_program(expression: str) -> cel.Program:
    """The program of a saved rule's condition, compiled only: it was checked when it was saved,
    and a check added since (nesting, the trial's time) must not stop the alerter on it."""
    return cel.compile(expression)


#: Seconds a condition may take on an empty record (a trial when it is written): a normal one
#: takes microseconds; 129 ``message.matches("\\w{150,189}")`` took 4.4 s, on every record.
TRIAL_SECONDS: Final = 0.05
#: The validation context of a rule read back from Redis: its condition was checked when it
#: was saved, and is not tried again on every listing.
STORED: Final = {"stored": True}

#: How the CEL library says a function (or name) does not exist.
_UNDEFINED: Final = "Undefined variable or function"
#: A CEL comprehension macro's call, and a string literal (whose text is not code).
_MACRO: Final = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(")
#: The name a comprehension binds: ``x`` in ``data.items.exists(x, x > 1)``.
_BOUND: Final = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_STRING: Final = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')


def _comprehension_depth(expression: str) -> int:
    """How deep comprehensions (``list.all(x, ...)`` and the like) nest in ``expression``.

    The CEL library evaluates without a time limit and holds the interpreter
    while it does: ``[0..9].all(a, [0..9].all(b, ...))`` eight deep took a
    minute, and the API with it.  One level costs a record's size at most.
    """
    text = _STRING.sub('""', expression)
    opened: list[bool] = []  # per open parenthesis: whether a comprehension opened it
    depth = deepest = 0
    at = 0
    while at < len(text):
        macro = _MACRO.match(text, at)
        if macro is not None:
            opened.append(True)
            depth += 1
            deepest = max(deepest, depth)
            at = macro.end()
            continue
        if text[at] == "(":
            opened.append(False)
        elif text[at] == ")" and opened and opened.pop():
            depth -= 1
        at += 1
    return deepest


def _find_name(expression: str, name: str) -> tuple[int, int] | None:
    """(line, column) of the first use of ``name`` as a name (not a field: ``x.name``)."""
    for number, line in enumerate(expression.splitlines(), start=1):
        match = re.search(rf"(?<![\w.]){re.escape(name)}\b", line)
        if match:
            return number, match.start() + 1
    return None


class Selector:
    """Which devices a rule watches: all (``*``), one id, or a glob (``door-*``)."""

    __slots__ = ("_match", "device", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        #: The one device id the selector names, if it names one (not ``*``, not a glob).
        self.device = pattern if pattern not in ("", "*") and not _GLOB.search(pattern) else None
        self._match = self._matcher(pattern)

    @staticmethod
    def _matcher(pattern: str) -> Callable[[str], bool]:
        if pattern in ("", "*"):
            return lambda device_id: True
        if not _GLOB.search(pattern):
            return lambda device_id: device_id == pattern
        regex = re.compile(fnmatch.translate(pattern), re.DOTALL)
        return lambda device_id: regex.match(device_id) is not None

    def __call__(self, device_id: str) -> bool:
        return self._match(device_id)


def is_webhook(url: str) -> bool:
    """Whether a destination is a plain webhook (``http(s)://``); else it is an Apprise URL."""
    return url.lower().startswith(("http://", "https://"))


def _check_destination(url: str) -> None:
    if is_webhook(url):
        parts = urlsplit(url)
        if not parts.hostname:
            raise InvalidRule(f"to: {mask_url(url)!r} names no host", "to")
        return
    from fleetlog.alerts.delivery import apprise_plugin

    if apprise_plugin(url) is None:
        raise InvalidRule(f"to: {display_url(url)!r} is neither an http(s) webhook nor a URL Apprise "
                          "knows (slack://, discord://, tgram://, ntfy://, mailto://, msteams:// ...)", "to")


def _shown_webhook(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return url.split("://", 1)[0] + "://..."
    if ":" in host:
        host = f"[{host}]"
    path = parts.path if parts.path not in ("", "/") else ""
    shown = f"{parts.scheme}://{host}{port}/" + (f"…{path[-4:]}" if len(path) > 8 else path.lstrip("/"))
    if parts.query:
        shown += "?" + "&".join(f"{piece.partition('=')[0]}={MASK}" for piece in parts.query.split("&"))
    return shown


def display_url(url: str) -> str:
    """A destination as anyone may see it: a webhook's scheme and host with its path shortened to
    its last 4 characters and every query value masked (``https://hooks.slack.com/…k9Qz``),
    an Apprise URL's tokens shortened (``slack://T...2/A...D/``).

    A webhook's path is often its secret (Slack's and Discord's incoming webhooks are
    nothing but a path), and read tokens list the rules.
    """
    if is_webhook(url):
        return _shown_webhook(url)
    try:
        from fleetlog.alerts.delivery import apprise_plugin

        plugin = apprise_plugin(url)
    except Exception:
        plugin = None
    if plugin is None:
        return url.split("://", 1)[0] + "://..."
    private: str = plugin.url(privacy=True)
    return private.split("?", 1)[0]


def _duration(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        if parse_duration(value) <= 0:
            raise ValueError(f"{value!r} is not a positive duration")
    except ValueError as exc:
        raise InvalidRule(f"{name}: {exc}", name) from None
    return value.strip()


class RuleSpec(BaseModel):
    """A rule as a user writes it (CLI flags, an API body); durations as text (``3m``)."""

    model_config = {"extra": "forbid"}

    name: str = Field(description="1 to 64 letters, digits, '.', '_' or '-'.")
    when: str | None = Field(default=None, description="CEL over a record: level, message, device_id, "
                             "received_at (ms), data (its JSON). Example: data.temp > 80")
    offline: str | None = Field(default=None, description="A device offline for longer than this (10m).")
    reconnects: int | None = Field(default=None, ge=0, description="More reconnects than this in a minute.")
    refusals: int | None = Field(default=None, ge=0, description="More refused frames or handshakes than "
                                 "this in a minute.")
    backlog: int | None = Field(default=None, ge=0, description="More records than this in the queue.")
    dead_letters: int | None = Field(default=None, ge=0, description="More dead letters than this (0: any).")
    lag: str | None = Field(default=None, description="The oldest record not yet stored is older than this.")
    devices: str = Field(default="*", description="*, a device id, or a glob (door-*).")
    count: int = Field(default=1, ge=1, le=100_000, description="Records: matches needed within `within`.")
    within: str = Field(default="1m", description="Records: the sliding window.")
    per: Literal["device", "fleet"] = Field(default="device", description="Records: count per device or "
                                            "across the fleet.")
    group_wait: str = Field(default="10s", description="Records: how long a new firing gathers its burst "
                            "before it is sent (0s: at once).")
    to: list[str] = Field(min_length=1, max_length=20, description="Destinations: http(s) webhooks or "
                          "Apprise URLs.")
    secret: str | None = Field(default=None, description="Sign webhook bodies with HMAC-SHA256.")
    backfill: str | None = Field(default=None, description="Records: also evaluate the records received "
                                 "this long before the rule was saved (default: none).")
    notify_resolved: bool | None = Field(default=None, description="Send a message when a firing "
                                         "resolves (default: yes, but for record rules).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise InvalidRule(f"name: {value!r} is not 1 to 64 letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit)", "name")
        return value

    @field_validator("when")
    @classmethod
    def _when(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not (info.context or {}).get("stored"):
            compile_condition(value)
        return value

    @field_validator("offline", "lag", "within", "backfill")
    @classmethod
    def _durations(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _duration(info.field_name or "duration", value)

    @field_validator("group_wait")
    @classmethod
    def _group_wait(cls, value: str) -> str:
        text = value.strip()
        if text in ("0", "0s", "0ms"):
            return "0s"
        checked = _duration("group_wait", text)
        assert checked is not None
        return checked

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str) -> str:
        if len(value) > 256 or "\x00" in value:
            raise InvalidRule("devices: at most 256 characters, no NUL", "devices")
        return value.strip() or "*"

    @field_validator("to")
    @classmethod
    def _to(cls, value: list[str]) -> list[str]:
        for url in value:
            _check_destination(url.strip())
        return [url.strip() for url in value]

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            raise InvalidRule("secret: at least 16 characters", "secret")
        return value

    @model_validator(mode="after")
    def _one_condition(self) -> RuleSpec:
        given = [name for name in CONDITIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidRule("a rule needs exactly one condition: --when EXPR, --offline DURATION, "
                              "--reconnects K, --refusals K, --backlog N, --dead-letters N or --lag DURATION"
                              + (f" (got {', '.join(given)})" if given else ""), "when")
        if self.kind != "records" and (self.backfill is not None or self.count != 1):
            raise InvalidRule("count and backfill are for record rules (--when)", "count")
        if self.kind in ("backlog", "dead_letters", "lag") and self.devices != "*":
            raise InvalidRule("devices: queue rules watch the whole queue (leave --devices out)", "devices")
        return self

    # -- derived ------------------------------------------------------------------

    @property
    def kind(self) -> Kind:
        kinds: dict[str, Kind] = {"when": "records", "offline": "offline", "reconnects": "reconnects",
                                  "refusals": "refusals", "backlog": "backlog",
                                  "dead_letters": "dead_letters", "lag": "lag"}
        for name, kind in kinds.items():
            if getattr(self, name) is not None:
                return kind
        raise AssertionError("validated: one condition")

    @property
    def within_ms(self) -> int:
        return parse_duration(self.within)

    @property
    def group_wait_ms(self) -> int:
        return 0 if self.group_wait == "0s" else parse_duration(self.group_wait)

    @property
    def offline_ms(self) -> int:
        return parse_duration(self.offline) if self.offline else 0

    @property
    def lag_ms(self) -> int:
        return parse_duration(self.lag) if self.lag else 0

    @property
    def backfill_ms(self) -> int:
        return parse_duration(self.backfill) if self.backfill else 0

    @property
    def resolved_messages(self) -> bool:
        """Whether a resolved firing is announced (default: all but record rules)."""
        return self.notify_resolved if self.notify_resolved is not None else self.kind != "records"

    def condition_text(self) -> str:
        """The condition in words, for lists and messages."""
        kind = self.kind
        if kind == "records":
            where = " across the fleet" if self.per == "fleet" else " per device"
            per = "" if self.count == 1 else f" ≥{self.count} within {self.within}{where}"
            return f"{self.when}{per}"
        return {
            "offline": f"offline for more than {self.offline}",
            "reconnects": f"more than {self.reconnects} reconnects a minute",
            "refusals": f"more than {self.refusals} refusals a minute",
            "backlog": f"queue backlog above {self.backlog} records",
            "dead_letters": f"more than {self.dead_letters} dead letters",
            "lag": f"oldest unstored record older than {self.lag}",
        }[kind]


class Rule(RuleSpec):
    """A saved rule: the spec, its id (new each time a name is added), when, and its mute."""

    id: str
    created_at: int  # ms
    muted_until: int | None = None  # ms

    @property
    def active_from(self) -> int:
        """Records received before this (ms) are not evaluated (``backfill`` moves it back)."""
        return self.created_at - self.backfill_ms

    def muted(self, now_ms: int) -> bool:
        return self.muted_until is not None and now_ms < self.muted_until

    def public(self, now_ms: int) -> dict[str, Any]:
        """The rule as read tokens may see it: destinations masked, the secret left out."""
        value = self.model_dump(exclude={"secret"})
        value["to"] = [display_url(url) for url in self.to]
        value["signed"] = self.secret is not None
        value["kind"] = self.kind
        value["condition"] = self.condition_text()
        value["muted"] = self.muted(now_ms)
        return value


def parse_spec(values: dict[str, Any], model: type[RuleSpec] = RuleSpec) -> RuleSpec:
    """A :class:`RuleSpec` from plain values; :class:`InvalidRule` (the first problem) if invalid."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRule):
            raise cause from None
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidRule(f"{where}: {error['msg']}" if where else str(error["msg"]),
                          str(error["loc"][0]) if error["loc"] else None) from None
