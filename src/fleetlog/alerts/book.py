"""Everything alerts keep, in Redis, and the scripts that change it atomically.

Keys (one hash tag, ``{alerts}``, so that every script runs on a Redis Cluster too):

==============================  =================================================================
``fleetlog:{alerts}:rules``     hash: rule name -> the rule's JSON (:class:`~.rules.Rule`)
``fleetlog:{alerts}:version``   counter: bumped on every rule change; the alerter reloads on it
``fleetlog:{alerts}:lease``     string (TTL): the consumer name of the one active alerter
``fleetlog:{alerts}:cursor``    JSON ``{store, seq, qid, received_at}``: the last record evaluated
``fleetlog:{alerts}:groups``    hash: ``RULE_ID\\x1fGROUP`` -> a group's evaluation state
``fleetlog:{alerts}:presence``  hash: device id -> ``{on, since, conn}`` as the alerter last saw it
``fleetlog:{alerts}:firings``   hash: firing id -> the firing's JSON (:class:`~.engine.Firing`)
``fleetlog:{alerts}:history``   sorted set (by name): ``RULE_ID:STARTED_AT:FIRING_ID``
``fleetlog:{alerts}:notes``     hash: notification id -> its JSON (:class:`~.engine.Note`)
``fleetlog:{alerts}:outbox``    sorted set: pending notification id -> when to try it (ms)
``fleetlog:{alerts}:stats``     hash: counters for ``/metrics``
==============================  =================================================================

One evaluation step is one :data:`COMMIT` script: it checks that the caller
still holds the lease, then moves the cursor, writes the changed groups and
firings, adds the new notifications to the outbox (each id once) and counts.
So a firing is recorded exactly once: either the whole step is committed or
none of it, and an alerter that lost its lease (paused, partitioned) commits
nothing.  Deliveries take due notifications with :data:`CLAIM` (which pushes
their next try past the send timeout, so a dead alerter's claims come back)
and record each outcome with :data:`FINISH`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic_core import PydanticSerializationError

from fleetlog.alerts.engine import Changes, Firing, Note
from fleetlog.alerts.rules import STORED, Rule, RuleSpec
from fleetlog.errors import FleetlogError, InvalidRule, RuleExists, UnknownRule

__all__ = ["HISTORY_KEPT", "AlertBook", "Cursor", "RuleExists", "UnknownRule"]

#: Firings kept per rule (the oldest resolved ones go first).
HISTORY_KEPT: Final = 100


_PREFIX: Final = "fleetlog:{alerts}:"
RULES: Final = _PREFIX + "rules"
VERSION: Final = _PREFIX + "version"
LEASE: Final = _PREFIX + "lease"
CURSOR: Final = _PREFIX + "cursor"
GROUPS: Final = _PREFIX + "groups"
PRESENCE: Final = _PREFIX + "presence"
FIRINGS: Final = _PREFIX + "firings"
HISTORY: Final = _PREFIX + "history"
NOTES: Final = _PREFIX + "notes"
OUTBOX: Final = _PREFIX + "outbox"
STATS: Final = _PREFIX + "stats"


#: KEYS lease cursor groups presence firings history notes outbox stats; ARGV holder, payload.
COMMIT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local p = cjson.decode(ARGV[2])
if type(p.cursor) == 'string' then redis.call('SET', KEYS[2], p.cursor) end
for f, v in pairs(p.groups) do
  if v == cjson.null then redis.call('HDEL', KEYS[3], f) else redis.call('HSET', KEYS[3], f, v) end
end
for f, v in pairs(p.presence) do
  if v == cjson.null then redis.call('HDEL', KEYS[4], f) else redis.call('HSET', KEYS[4], f, v) end
end
for id, v in pairs(p.firings) do redis.call('HSET', KEYS[5], id, v) end
for _, n in ipairs(p.notes) do
  if redis.call('HSETNX', KEYS[7], n[1], n[2]) == 1 then redis.call('ZADD', KEYS[8], n[3], n[1]) end
end
for _, h in ipairs(p.history) do redis.call('ZADD', KEYS[6], 0, h[2]) end
for name, n in pairs(p.stats) do redis.call('HINCRBY', KEYS[9], name, n) end
local seen = {}
for _, h in ipairs(p.history) do
  local rid = h[1]
  if not seen[rid] then
    seen[rid] = true
    local lo, hi = '[' .. rid .. ':', '(' .. rid .. ';'
    local extra = redis.call('ZLEXCOUNT', KEYS[6], lo, hi) - tonumber(p.keep)
    if extra > 0 then
      for _, m in ipairs(redis.call('ZRANGEBYLEX', KEYS[6], lo, hi, 'LIMIT', 0, extra)) do
        local fid = string.match(m, '([^:]+)$')
        local raw = redis.call('HGET', KEYS[5], fid)
        local open = false
        if raw then
          local f = cjson.decode(raw)
          open = f.state == 'firing'
          if not open then
            for _, nid in ipairs(f.notes) do
              redis.call('HDEL', KEYS[7], nid)
              redis.call('ZREM', KEYS[8], nid)
            end
          end
        end
        if not open then
          redis.call('HDEL', KEYS[5], fid)
          redis.call('ZREM', KEYS[6], m)
        end
      end
    end
  end
end
return 1
"""

#: KEYS lease outbox notes; ARGV holder, now, claimed until, limit.  The due notes' JSON.
CLAIM: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))) do
  local raw = redis.call('HGET', KEYS[3], id)
  if raw then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    table.insert(out, raw)
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""

#: KEYS outbox notes stats; ARGV id, the note's new JSON, outcome, next try ('' : done).
FINISH: Final = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
if cjson.decode(raw).status ~= 'pending' then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[4] == '' then redis.call('ZREM', KEYS[1], ARGV[1])
else redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1]) end
redis.call('HINCRBY', KEYS[3], 'deliveries:' .. ARGV[3], 1)
return 1
"""

#: KEYS rules version; ARGV name, JSON, replace ('1').  0: exists already.
ADD: Final = """
if ARGV[3] ~= '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
"""

#: KEYS rules version; ARGV name, rule id, new JSON.  Replaces the rule only if it is still that id.
UPDATE: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw or cjson.decode(raw).id ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('INCR', KEYS[2])
return 1
"""

#: KEYS rules version history firings notes outbox stats; ARGV name.  Deletes the rule and
#: its history; 0 when there is no such rule.
REMOVE: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rid = cjson.decode(raw).id
local lo, hi = '[' .. rid .. ':', '(' .. rid .. ';'
for _, m in ipairs(redis.call('ZRANGEBYLEX', KEYS[3], lo, hi)) do
  local fid = string.match(m, '([^:]+)$')
  local f = redis.call('HGET', KEYS[4], fid)
  if f then
    local firing = cjson.decode(f)
    if firing.state == 'firing' then redis.call('HINCRBY', KEYS[7], 'open', -1) end
    for _, nid in ipairs(firing.notes) do
      redis.call('HDEL', KEYS[5], nid)
      redis.call('ZREM', KEYS[6], nid)
    end
    redis.call('HDEL', KEYS[4], fid)
  end
  redis.call('ZREM', KEYS[3], m)
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last record the alerter evaluated: its store, seq, qid and time."""

    store: str
    seq: int
    qid: str
    received_at: int

    def to_json(self) -> bytes:
        return orjson.dumps({"store": self.store, "seq": self.seq, "qid": self.qid,
                             "received_at": self.received_at})

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Cursor | None:
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
            return cls(str(value["store"]), int(value["seq"]), str(value["qid"]), int(value["received_at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class AlertBook:
    """Rules, state, history and outbox in Redis, on a blocking client (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._commit = client.register_script(COMMIT)
        self._claim = client.register_script(CLAIM)
        self._finish = client.register_script(FINISH)
        self._add = client.register_script(ADD)
        self._update = client.register_script(UPDATE)
        self._remove = client.register_script(REMOVE)

    # -- rules --------------------------------------------------------------------------

    def rules(self) -> list[Rule]:
        """Every rule, by name."""
        raw = self.client.hgetall(RULES)
        return sorted((Rule.model_validate_json(value, context=STORED) for value in raw.values()),
                      key=lambda r: r.name)

    def get(self, name: str) -> Rule:
        raw = self.client.hget(RULES, name)
        if raw is None:
            raise UnknownRule(f"no alert rule named {name!r}")
        return Rule.model_validate_json(raw, context=STORED)

    def version(self) -> int:
        return int(self.client.get(VERSION) or 0)

    def add(self, spec: RuleSpec, *, replace: bool = False, now: int | None = None) -> Rule:
        """Save a new rule (a new id; with ``replace``, in place of the one of that name and its history)."""
        rule = Rule.model_validate({**spec.model_dump(), "id": secrets.token_hex(8),
                                    "created_at": now or now_ms()}, context=STORED)  # checked as a spec
        stored = _rule_json(rule)  # before anything is removed: a rule that cannot be saved changes nothing
        if replace:
            self._remove(keys=[RULES, VERSION, HISTORY, FIRINGS, NOTES, OUTBOX, STATS], args=[spec.name])
        added = self._add(keys=[RULES, VERSION], args=[rule.name, stored, "1" if replace else "0"])
        if not added:
            raise RuleExists(f"an alert rule named {rule.name!r} exists already (remove it, or --replace)")
        return rule

    def remove(self, name: str) -> None:
        """Delete a rule with its history and its pending notifications."""
        if not self._remove(keys=[RULES, VERSION, HISTORY, FIRINGS, NOTES, OUTBOX, STATS], args=[name]):
            raise UnknownRule(f"no alert rule named {name!r}")

    def mute(self, name: str, until: int | None) -> Rule:
        """Mute a rule until ``until`` (ms; None: unmute).  Firings are still recorded, not sent."""
        for _ in range(5):
            rule = self.get(name)
            changed = rule.model_copy(update={"muted_until": until})
            if self._update(keys=[RULES, VERSION], args=[name, rule.id, changed.model_dump_json()]):
                return changed
        raise FleetlogError(f"alert rule {name!r} keeps changing; try again")

    # -- history ------------------------------------------------------------------------

    def history(self, rule: Rule, limit: int = HISTORY_KEPT) -> list[tuple[Firing, list[Note]]]:
        """The rule's firings, newest first, each with its notifications."""
        members = self.client.zrevrangebylex(HISTORY, f"({rule.id};", f"[{rule.id}:", start=0, num=limit)
        ids = [_text(member).rsplit(":", 1)[1] for member in members]
        if not ids:
            return []
        found = []
        for raw in self.client.hmget(FIRINGS, ids):
            if raw is not None:
                found.append(Firing.from_json(raw))
        note_ids = [note for firing in found for note in firing.notes]
        notes = {}
        if note_ids:
            for raw in self.client.hmget(NOTES, note_ids):
                if raw is not None:
                    note = Note.from_json(raw)
                    notes[note.id] = note
        return [(firing, [notes[n] for n in firing.notes if n in notes]) for firing in found]

    def open_firings(self) -> dict[str, int]:
        """Rule id -> how many of its firings are open."""
        counts: dict[str, int] = {}
        for raw in self.client.hvals(FIRINGS):
            value = orjson.loads(raw)
            if value.get("state") == "firing":
                counts[value["rule_id"]] = counts.get(value["rule_id"], 0) + 1
        return counts

    def notes(self, status: str | None = None, limit: int = 1000) -> list[Note]:
        """Notifications (newest first), optionally of one status (``failed``, ``pending`` ...)."""
        found = []
        for _, raw in self.client.hscan_iter(NOTES, count=1000):
            note = Note.from_json(raw)
            if status is None or note.status == status:
                found.append(note)
        found.sort(key=lambda note: note.created_at, reverse=True)
        return found[:limit]

    def stats(self) -> dict[str, int]:
        values = {_text(k): int(v) for k, v in self.client.hgetall(STATS).items()}
        values["pending_notifications"] = int(self.client.zcard(OUTBOX))
        return values

    # -- the alerter's state --------------------------------------------------------------

    def load_state(self) -> tuple[Cursor | None, dict[str, bytes], dict[str, Firing], dict[str, bytes]]:
        """(cursor, groups, open firings, presence), as the last commit left them."""
        cursor = Cursor.from_json(self.client.get(CURSOR))
        groups = {_text(k): v for k, v in self.client.hgetall(GROUPS).items()}
        firing_ids = sorted({str(value["f"]) for value in map(orjson.loads, groups.values())
                             if isinstance(value, dict) and value.get("f")})
        firings: dict[str, Firing] = {}
        for start in range(0, len(firing_ids), 1000):
            chunk = firing_ids[start:start + 1000]
            for raw in self.client.hmget(FIRINGS, chunk):
                if raw is not None:
                    firing = Firing.from_json(raw)
                    firings[firing.id] = firing
        presence = {_text(k): v for k, v in self.client.hgetall(PRESENCE).items()}
        return cursor, groups, firings, presence

    def commit(self, holder: str, cursor: Cursor | None, changes: Changes,
               presence: dict[str, bytes | None] | None = None, *, now: int | None = None) -> bool:
        """Apply one evaluation step atomically; False (nothing applied) when the lease is not ours."""
        created = now or now_ms()
        payload = {
            "cursor": cursor.to_json().decode() if cursor is not None else None,
            "groups": {k: (v.decode() if v is not None else None) for k, v in changes.groups.items()},
            "presence": {k: (v.decode() if v is not None else None) for k, v in (presence or {}).items()},
            "firings": {k: v.decode() for k, v in changes.firings.items()},
            "notes": [[note.id, _stamped(note, created).to_json().decode(), str(created)]
                      for note in changes.notes],
            "history": [list(entry) for entry in changes.history],
            "stats": changes.stats,
            "keep": HISTORY_KEPT,
        }
        return bool(self._commit(keys=[LEASE, CURSOR, GROUPS, PRESENCE, FIRINGS, HISTORY, NOTES, OUTBOX,
                                       STATS], args=[holder, orjson.dumps(payload)]))

    def claim(self, holder: str, *, now: int, claim_ms: int, limit: int) -> list[Note] | None:
        """Take up to ``limit`` due notifications for ``claim_ms``; None when the lease is not ours."""
        raw = self._claim(keys=[LEASE, OUTBOX, NOTES], args=[holder, now, now + claim_ms, limit])
        if raw is None:
            return None
        return [Note.from_json(item) for item in raw]

    def firings(self, ids: Iterable[str]) -> dict[str, Firing]:
        wanted = list(ids)
        if not wanted:
            return {}
        found = {}
        for raw in self.client.hmget(FIRINGS, wanted):
            if raw is not None:
                firing = Firing.from_json(raw)
                found[firing.id] = firing
        return found

    def finish(self, note: Note, outcome: str, next_at: int | None) -> bool:
        """Record what became of an attempt: ``delivered``, ``retried`` (try again at ``next_at``),
        ``failed``, ``muted`` or ``cancelled``."""
        return bool(self._finish(keys=[OUTBOX, NOTES, STATS],
                                 args=[note.id, note.to_json(), outcome, "" if next_at is None else next_at]))


def _is_unicode(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode()
    except UnicodeEncodeError:
        return False
    return True


def _rule_json(rule: Rule) -> str:
    """The rule as stored; :class:`InvalidRule` naming the field for a text that is not Unicode.

    A JSON body (or a command line) can carry a lone surrogate (``\\ud800``), which
    pydantic validates as text but cannot write: that was a 500 from the API.
    """
    try:
        return rule.model_dump_json()
    except PydanticSerializationError:
        field = next((name for name, value in rule.model_dump().items() if not _is_unicode(value)), None)
        if field is None:
            raise
        raise InvalidRule(f"{field}: a lone surrogate (\\ud800 to \\udfff) is not Unicode", field) from None


def _stamped(note: Note, created: int) -> Note:
    note.created_at = created
    note.next_at = created
    return note

