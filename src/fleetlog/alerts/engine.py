"""Rule evaluation without I/O: records and facts in, changes out.

The :class:`Engine` holds the evaluation state of every rule: per rule and
group (a device, or the fleet) the times of its latest matches and its open
firing.  It is a cache of what :mod:`fleetlog.alerts.book` keeps in Redis: the
alerter loads it when it takes the lease and commits :meth:`Engine.take_changes`
with every cursor advance, in one script, so a restarted alerter goes on
exactly where the last commit left it.

Record rules (``when``)
-----------------------
A group fires when ``count`` matching records lie within ``within`` (sliding,
in the records' ``received_at`` time).  The firing then collects every later
match of its group (count, first and last time, the first :data:`SAMPLES`
records) until the condition stops holding: fewer than ``count`` matches in
the last ``within`` (then it is ``resolved``).  Its one notification is due
``group_wait`` after it fired (or when it resolves, if sooner): a burst is one
message with its count, never one message per record.

Time passes by the *horizon*: the wall clock once the alerter has read the
store to its end, else the ``received_at`` of the last record it read (a
catch-up after downtime closes windows as they closed then, not all at once).

Condition rules (presence, queue)
---------------------------------
:meth:`Engine.conditions` is told which groups of a rule hold now (a device
offline past D, the backlog over N ...); a group that starts holding fires
(notification due at once), one that stops resolves (a ``resolved`` message
unless the rule says not).

Ids are deterministic (a hash of the rule id, the group and what started the
firing), so evaluating the same records again makes the same firing.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import cel
import orjson

from fleetlog.alerts.rules import SAMPLES, Rule, Selector, compile_condition, stored_program
from fleetlog.records import StoredRecord, iso_ms

__all__ = ["FLEET", "Changes", "Engine", "Firing", "Note", "Preview", "firing_id", "preview", "sample"]

log = logging.getLogger("fleetlog.alerts")

#: The group of a rule counted across the fleet, and of queue rules.
FLEET: Final = "*"
#: How much of a sample record's JSON a notification carries (characters).
SAMPLE_DATA_CHARS: Final = 2048
#: Device ids whose applicable rules are remembered (then the memo starts again).
_MEMO_DEVICES: Final = 100_000


def firing_id(rule_id: str, group: str, start: str) -> str:
    """A firing's id: the same rule, group and start always give the same id."""
    key = f"{rule_id}\x1f{group}\x1f{start}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).hexdigest()[:24]


def sample(record: StoredRecord) -> dict[str, Any]:
    """A record as a notification shows it (``data`` parsed; cut to a few KB)."""
    data: Any
    if len(record.data) > SAMPLE_DATA_CHARS:
        data = record.data[:SAMPLE_DATA_CHARS] + "…"
    else:
        try:
            data = orjson.loads(record.data)
        except orjson.JSONDecodeError:
            data = record.data
    return {"seq": record.seq, "device_id": record.device_id, "received_at": iso_ms(record.received_at),
            "level": record.level, "message": record.message, "data": data}


@dataclass
class Firing:
    """One firing of a rule for one group: ``firing`` until it ``resolved``."""

    id: str
    rule: str
    rule_id: str
    kind: str
    group: str
    started_at: int  # ms: when the condition started to hold
    first_at: int
    last_at: int
    count: int
    notify_at: int
    state: str = "firing"
    resolved_at: int | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    notified: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Firing:
        return cls(**orjson.loads(raw))

    def public(self) -> dict[str, Any]:
        """As the API, the CLI and a webhook show it: times ISO 8601."""
        value = asdict(self)
        for name in ("started_at", "first_at", "last_at", "resolved_at"):
            if value[name] is not None:
                value[name] = iso_ms(value[name])
        value.pop("notify_at")
        value.pop("notes")
        return value


@dataclass
class Note:
    """One message to one destination: a firing's ``firing`` or ``resolved`` event."""

    id: str
    firing: str
    rule: str
    rule_id: str
    event: str
    dest: int  # index into the rule's ``to``
    created_at: int  # ms, wall clock: the retry budget counts from here
    attempts: int = 0
    status: str = "pending"  # pending, delivered, failed, muted, cancelled
    last_error: str | None = None
    delivered_at: int | None = None
    next_at: int | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Note:
        return cls(**orjson.loads(raw))


@dataclass
class Changes:
    """What one evaluation step changed, for :meth:`fleetlog.alerts.book.AlertBook.commit`."""

    groups: dict[str, bytes | None] = field(default_factory=dict)  # field -> JSON (None: delete)
    firings: dict[str, bytes] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)  # (rule_id, member)
    notes: list[Note] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, amount: int = 1) -> None:
        if amount:
            self.stats[name] = self.stats.get(name, 0) + amount

    def __bool__(self) -> bool:
        return bool(self.groups or self.firings or self.history or self.notes or self.stats)


def group_field(rule_id: str, group: str) -> str:
    """The field of a group's state in the groups hash."""
    return f"{rule_id}\x1f{group}"


#: The group that holds a rule's catch-up progress (``{"through": seq}``; absent: new rule).
PROGRESS: Final = "\x00progress"


@dataclass
class _Group:
    """A record rule's state for one group: its latest match times and samples, its open firing."""

    times: list[int] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    firing: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({"t": self.times, "s": self.samples, "f": self.firing})

    @classmethod
    def from_json(cls, raw: bytes | str) -> _Group:
        value = orjson.loads(raw)
        return cls(list(value.get("t") or []), list(value.get("s") or []), value.get("f"))


class _Compiled:
    """A rule with its program and selector, ready to run."""

    __slots__ = ("active_from", "group_wait", "program", "rule", "selector", "uses_data", "within")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.selector = Selector(rule.devices)
        self.program: cel.Program | None = stored_program(rule.when) if rule.when is not None else None
        self.uses_data = self.program is not None and "data" in self.program.variables()
        self.within = rule.within_ms
        self.group_wait = rule.group_wait_ms
        self.active_from = rule.active_from


class Engine:
    """Every rule's evaluation state; see the module docstring."""

    def __init__(self) -> None:
        self._rules: dict[str, _Compiled] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        #: Open firings (and those changed since the last :meth:`take_changes`).
        self.firings: dict[str, Firing] = {}
        #: Record rules: rule id -> the store seq its catch-up evaluated through (None: joined).
        self._progress: dict[str, int | None] = {}
        self._memo: dict[str, _Applicable] = {}
        self._changes = Changes()
        #: Groups and firings changed since the last :meth:`take_changes` (written out then, once).
        self._dirty_groups: dict[str, _Group | None] = {}
        self._dirty_firings: dict[str, Firing] = {}
        self.errors: dict[str, str] = {}  # rule name -> its last evaluation error

    # -- state ------------------------------------------------------------------------

    @property
    def rules(self) -> dict[str, Rule]:
        return {rule_id: compiled.rule for rule_id, compiled in self._rules.items()}

    def load(self, rules: Iterable[Rule], groups: dict[str, bytes], firings: dict[str, Firing]) -> None:
        """Start from what Redis holds (after taking the lease)."""
        self._rules = {}
        self._groups = {}
        self._progress = {}
        self.firings = {key: f for key, f in firings.items() if f.state == "firing"}
        self._changes = Changes()
        self._dirty_groups, self._dirty_firings = {}, {}
        for name, raw in groups.items():
            rule_id, _, group = name.partition("\x1f")
            if group == PROGRESS:
                through = orjson.loads(raw).get("through")
                self._progress[rule_id] = None if through is None else int(through)
            else:
                self._groups[(rule_id, group)] = _Group.from_json(raw)
        self.set_rules(rules)

    @property
    def catching_up(self) -> dict[str, int]:
        """Record rules still catching up: rule id -> the store seq they evaluated through."""
        return {rule_id: through for rule_id, through in self._progress.items() if through is not None}

    def set_rules(self, rules: Iterable[Rule]) -> list[Rule]:
        """Use ``rules`` from now on; returns the record rules that are new (they need a catch-up,
        :meth:`start_catch_up`).

        Groups and firings of rules that are gone are dropped (their firings were
        closed when the rule was removed).
        """
        wanted = {rule.id: rule for rule in rules}
        for rule_id in list(self._rules):
            if rule_id not in wanted:
                del self._rules[rule_id]
        for rule_id, rule in wanted.items():
            if rule_id not in self._rules:
                try:
                    self._rules[rule_id] = _Compiled(rule)
                except Exception as exc:  # saved by another version, say: skip it, loudly
                    log.error("alert rule %r cannot run: %s", rule.name, exc)
            else:
                self._rules[rule_id].rule = rule  # a mute changes only the rule object
        for key in [key for key in self._groups if key[0] not in self._rules]:
            del self._groups[key]
            self._dirty_groups[group_field(*key)] = None
        for firing_key in [key for key, f in self.firings.items() if f.rule_id not in self._rules]:
            del self.firings[firing_key]
        for rule_id in [rule_id for rule_id in self._progress if rule_id not in self._rules]:
            del self._progress[rule_id]
            self._changes.groups[group_field(rule_id, PROGRESS)] = None
        self._memo = {}
        return self.new_rules()

    def new_rules(self) -> list[Rule]:
        """The record rules that have not started their catch-up (:meth:`start_catch_up`)."""
        return [c.rule for rule_id, c in self._rules.items()
                if c.program is not None and rule_id not in self._progress]

    def start_catch_up(self, rule: Rule, through: int) -> None:
        """Rule ``rule`` evaluates the records after ``through`` before it joins the others."""
        self.caught_up(rule.id, through)

    def caught_up(self, rule_id: str, through: int | None) -> None:
        """Record a catch-up's progress (``through``), or its end (None: the rule joins)."""
        self._progress[rule_id] = through
        self._changes.groups[group_field(rule_id, PROGRESS)] = orjson.dumps({"through": through})
        self._memo = {}

    def take_changes(self) -> Changes:
        """What changed since the last call (firings that closed leave the memory)."""
        changes, self._changes = self._changes, Changes()
        for name, group in self._dirty_groups.items():
            changes.groups[name] = group.to_json() if group is not None else None
        changes.firings = {key: firing.to_json() for key, firing in self._dirty_firings.items()}
        self._dirty_groups, self._dirty_firings = {}, {}
        for firing_key in [key for key, f in self.firings.items() if f.state != "firing"]:
            del self.firings[firing_key]
        return changes

    # -- record rules -----------------------------------------------------------------

    def _applicable(self, device_id: str) -> _Applicable:
        """The joined record rules that watch ``device_id``, grouped by expression (each distinct
        expression is run once per record, whatever the number of rules that share it)."""
        found = self._memo.get(device_id)
        if found is None:
            if len(self._memo) >= _MEMO_DEVICES:
                self._memo = {}
            rules = [c for rule_id, c in self._rules.items()
                     if c.program is not None and self._progress.get(rule_id, 0) is None
                     and c.selector(device_id)]
            found = self._memo[device_id] = _group_by_expression(rules)
        return found

    def evaluate(self, records: Sequence[StoredRecord], only: str | None = None) -> int:
        """Run the record rules over ``records`` (store order); return how many evaluations ran.

        ``only``: the one rule catching up (else every rule that joined).
        """
        evaluations = errors = 0
        single = self._rules.get(only) if only is not None else None
        alone = _group_by_expression([single]) if single is not None else ((), False)
        for record in records:
            if single is not None:
                applicable = alone if single.selector(record.device_id) else _NOTHING
            else:
                applicable = self._applicable(record.device_id)
            expressions, uses_data = applicable
            if not expressions:
                continue
            context: cel.Context | None = None
            at = record.received_at
            for program, rules in expressions:
                live = [c for c in rules if at >= c.active_from]
                if not live:
                    continue
                if context is None:
                    context = _context(record, uses_data)
                evaluations += len(live)
                try:
                    matched = program.execute(context) is True
                except Exception as exc:  # a field missing, a type mismatch: no match
                    errors += len(live)
                    for compiled in live:
                        self.errors[compiled.rule.name] = str(exc)[:200]
                    continue
                if matched:
                    for compiled in live:
                        self._matched(compiled, record)
        self._changes.count("evaluations", evaluations)
        self._changes.count("evaluation_errors", errors)
        return evaluations

    def _matched(self, compiled: _Compiled, record: StoredRecord) -> None:
        rule = compiled.rule
        group_name = record.device_id if rule.per == "device" else FLEET
        key = (rule.id, group_name)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        at = record.received_at
        bisect.insort(group.times, at)
        del group.times[:-rule.count]
        open_firing = self.firings.get(group.firing) if group.firing else None
        if open_firing is not None and open_firing.state == "firing":
            open_firing.count += 1
            open_firing.first_at = min(open_firing.first_at, at)
            open_firing.last_at = max(open_firing.last_at, at)
            if len(open_firing.samples) < SAMPLES:
                open_firing.samples.append(sample(record))
            self._dirty_firings[open_firing.id] = open_firing
        else:
            group.samples = [*group.samples, sample(record)][-SAMPLES:]
            if len(group.times) >= rule.count and group.times[-1] - group.times[0] < compiled.within:
                new_id = firing_id(rule.id, group_name, record.qid)
                self._open(rule, group_name, new_id, at, first_at=group.times[0], last_at=at,
                           count=rule.count, notify_at=at + compiled.group_wait, samples=group.samples)
                group.firing = new_id
                group.samples = []
        self._dirty_groups[group_field(*key)] = group

    def tick(self, horizon: int, rule_ids: Iterable[str] | None = None) -> None:
        """Let time pass to ``horizon`` (ms) for record rules: notifications due, windows closed.

        ``rule_ids``: only these rules (a catch-up's own horizon); else every joined rule.
        """
        wanted = set(rule_ids) if rule_ids is not None else None
        for key, group in list(self._groups.items()):
            rule_id = key[0]
            compiled = self._rules.get(rule_id)
            if compiled is None or compiled.program is None:
                continue
            if wanted is not None:
                if rule_id not in wanted:
                    continue
            elif self._progress.get(rule_id, 0) is not None:
                continue
            rule = compiled.rule
            holds_until = group.times[0] + compiled.within if len(group.times) >= rule.count else 0
            firing = self.firings.get(group.firing) if group.firing else None
            if firing is not None and firing.state == "firing":
                if not firing.notified and firing.notify_at <= horizon:
                    self._notify(rule, firing, "firing", horizon)
                if holds_until <= horizon:
                    end = max(holds_until, firing.last_at)
                    if not firing.notified:
                        self._notify(rule, firing, "firing", end)
                    self._resolve(rule, firing, end)
                    group.firing = None
                    group.times = []
                    group.samples = []
            if group.firing is None and (not group.times or group.times[-1] + compiled.within <= horizon):
                del self._groups[key]
                self._dirty_groups[group_field(*key)] = None
            elif firing is not None:
                self._dirty_groups[group_field(*key)] = group

    # -- condition rules --------------------------------------------------------------

    def conditions(self, rule: Rule, holding: dict[str, dict[str, Any]], now: int,
                   starts: dict[str, str] | None = None) -> None:
        """``holding``: group -> detail for the groups of ``rule`` whose condition holds now.

        Those without an open firing fire; open ones not holding any more resolve.
        ``starts``: group -> what started it (for a deterministic id; default ``now``).
        """
        if rule.id not in self._rules:
            return
        for group_name, detail in holding.items():
            key = (rule.id, group_name)
            group = self._groups.get(key)
            firing = self.firings.get(group.firing) if group is not None and group.firing else None
            if firing is not None and firing.state == "firing":
                if firing.detail != detail:
                    firing.detail = detail
                    firing.last_at = now
                    self._dirty_firings[firing.id] = firing
                continue
            start = (starts or {}).get(group_name, str(now))
            new_id = firing_id(rule.id, group_name, start)
            self._open(rule, group_name, new_id, now, first_at=now, last_at=now, count=1,
                       notify_at=now, detail=detail)
            self._notify(rule, self.firings[new_id], "firing", now)
            self._groups[key] = _Group(firing=new_id)
            self._dirty_groups[group_field(*key)] = self._groups[key]
        for key, group in list(self._groups.items()):
            if key[0] != rule.id or key[1] in holding:
                continue
            firing = self.firings.get(group.firing) if group.firing else None
            if firing is not None and firing.state == "firing":
                self._resolve(rule, firing, now)
            del self._groups[key]
            self._dirty_groups[group_field(*key)] = None

    def open_groups(self, rule_id: str) -> list[str]:
        """The groups of a rule with an open firing."""
        return [key[1] for key, group in self._groups.items() if key[0] == rule_id and group.firing]

    # -- firings ----------------------------------------------------------------------

    def _open(self, rule: Rule, group: str, new_id: str, at: int, *, first_at: int, last_at: int,
              count: int, notify_at: int, samples: list[dict[str, Any]] | None = None,
              detail: dict[str, Any] | None = None) -> None:
        firing = Firing(id=new_id, rule=rule.name, rule_id=rule.id, kind=rule.kind, group=group,
                        started_at=at, first_at=first_at, last_at=last_at, count=count,
                        notify_at=notify_at, samples=list(samples or []), detail=dict(detail or {}))
        self.firings[new_id] = firing
        self._dirty_firings[new_id] = firing
        self._changes.history.append((rule.id, f"{rule.id}:{at:013d}:{new_id}"))
        self._changes.count("firings")
        self._changes.count("open")

    def _resolve(self, rule: Rule, firing: Firing, at: int) -> None:
        firing.state = "resolved"
        firing.resolved_at = at
        if firing.notified and rule.resolved_messages:
            self._notify(rule, firing, "resolved", at)
        self._dirty_firings[firing.id] = firing
        self._changes.count("open", -1)

    def _notify(self, rule: Rule, firing: Firing, event: str, at: int) -> None:
        if event == "firing":
            firing.notified = True
        for index in range(len(rule.to)):
            note = Note(id=f"{firing.id}.{event}.{index}", firing=firing.id, rule=rule.name,
                        rule_id=rule.id, event=event, dest=index, created_at=at)
            firing.notes.append(note.id)
            self._changes.notes.append(note)
        self._dirty_firings[firing.id] = firing


#: Per device: (each distinct program with the rules that use it, whether any reads ``data``).
_Applicable = tuple[tuple[tuple[cel.Program, tuple["_Compiled", ...]], ...], bool]
_NOTHING: Final[_Applicable] = ((), False)


def _group_by_expression(rules: Sequence[_Compiled]) -> _Applicable:
    by_text: dict[str, list[_Compiled]] = {}
    for compiled in rules:
        by_text.setdefault(compiled.rule.when or "", []).append(compiled)
    groups = []
    for same in by_text.values():
        program = same[0].program
        assert program is not None
        groups.append((program, tuple(same)))
    return tuple(groups), any(c.uses_data for c in rules)


def _context(record: StoredRecord, with_data: bool) -> cel.Context:
    variables: dict[str, Any] = {
        "level": record.level or "",
        "message": record.message or "",
        "device_id": record.device_id,
        "received_at": record.received_at,
    }
    if with_data:
        try:
            variables["data"] = orjson.loads(record.data)
        except orjson.JSONDecodeError:
            variables["data"] = record.data
    return cel.Context(variables=variables)


@dataclass(frozen=True, slots=True)
class Preview:
    """Which of some records a condition matches: what the console shows while a rule is typed."""

    checked: int
    matched: list[StoredRecord]
    #: Records the expression failed on (a missing field, a type mismatch): they do not match.
    errors: int
    #: The first such failure, for the form to show.
    first_error: str | None


def preview(when: str, devices: str, records: Sequence[StoredRecord]) -> Preview:
    """Run a record condition over ``records`` exactly as the alerter would.

    The same compile (:class:`~fleetlog.errors.InvalidRule` for what could not
    be saved), the same device selector and the same record variables as
    :meth:`Engine.evaluate`; no threshold, no state.
    """
    program = compile_condition(when)
    selector = Selector(devices)
    uses_data = "data" in program.variables()
    matched: list[StoredRecord] = []
    checked = errors = 0
    first_error: str | None = None
    for record in records:
        if not selector(record.device_id):
            continue
        checked += 1
        try:
            if program.execute(_context(record, uses_data)) is True:
                matched.append(record)
        except Exception as exc:  # as in evaluate(): no match
            errors += 1
            first_error = first_error or str(exc)[:200]
    return Preview(checked, matched, errors, first_error)
