"""Rules (validation) and the engine (grouping, windows, ids), without I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlog.alerts.engine import Engine, Firing, preview
from fleetlog.alerts.rules import (
    MAX_MUTE_MS,
    InvalidRule,
    Rule,
    Selector,
    compile_condition,
    display_url,
    mute_length,
    parse_spec,
)
from fleetlog.records import StoredRecord

HOOK = "http://127.0.0.1:9/hook"
T0 = 1_800_000_000_000


def rule(name: str = "r", created_at: int = T0, **values: Any) -> Rule:
    spec = parse_spec({"name": name, "to": [HOOK], **values})
    return Rule(**spec.model_dump(), id=f"id-{name}", created_at=created_at)


def record(seq: int, at: int, device: str = "d1", level: str | None = "error", message: str = "m",
           data: str = "{}") -> StoredRecord:
    return StoredRecord(seq, f"q{seq}", device, at, None, level, message, data)


# -- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "position"), [
    ("data.temp >", (1, 12)),
    ("level == 'error' &&", (1, 20)),
    ("message.contains(\"x\"", (1, 21)),
])
def test_a_syntax_error_is_refused_with_its_line_and_column(
        expression: str, position: tuple[int, int]) -> None:
    with pytest.raises(InvalidRule) as caught:
        compile_condition(expression)
    assert caught.value.field == "when"
    assert caught.value.position == position
    assert f"at line {position[0]}, column {position[1]}" in str(caught.value)


def test_unknown_names_and_non_boolean_conditions_are_refused() -> None:
    with pytest.raises(InvalidRule, match=r"unknown name 'lvl' at line 1, column 17 \(a record has level"):
        compile_condition('level == "x" || lvl == "error"')
    with pytest.raises(InvalidRule, match="unknown name 'tmp' at line 2, column 4"):
        compile_condition('level == "x"\n|| tmp > 3')
    with pytest.raises(InvalidRule, match="gives str"):
        compile_condition('"error"')
    with pytest.raises(InvalidRule, match=r"Undefined|undeclared|not found|unknown"):
        compile_condition("nosuchfunction(level)")
    # Depends on the record's data: valid (a record without the field does not match).
    assert compile_condition("data.temp > 80").execute({"data": {"temp": 81}}) is True


@pytest.mark.parametrize("expression", [
    "int(message) > 5", "double(message) > 1.5",
    'timestamp(message) > timestamp("2020-01-01T00:00:00Z")', "int(data.code) > 5",
])
def test_a_function_that_fails_on_some_records_is_valid(expression: str) -> None:
    """The trial record's empty message makes int() fail: that record does not match,
    the condition is not refused (only a function CEL does not have is)."""
    compile_condition(expression)
    assert compile_condition("int(message) > 5").execute({"message": "9"}) is True


@pytest.mark.parametrize("expression", [
    "data.a.all(x, data.b.exists(y, y == x))",
    "[0,1,2].all(a, [0,1,2].all(b, [0,1,2].all(c, true)))",
    'data.a.map(x, ("(" + x) + ")").filter(y, data.b.exists(z, z == y)).size() > 0',
])
def test_a_comprehension_inside_another_is_refused(expression: str) -> None:
    """Nested, their cost is the product of the lists' lengths on every record; the CEL
    library has no time limit and holds the interpreter (eight deep took the API a minute)."""
    with pytest.raises(InvalidRule, match="inside another"):
        compile_condition(expression)


#: ~50 ms a call in the CEL library, which compiles a regular expression again on every call.
SLOW_REGEX = 'message.matches("\\\\w{150,189}")'


def test_a_condition_slow_on_an_empty_record_is_refused() -> None:
    """129 of :data:`SLOW_REGEX` took 4.4 s on every record (and held the API while tried)."""
    with pytest.raises(InvalidRule, match=r"took \d+ ms on an empty record") as refused:
        compile_condition(" || ".join([SLOW_REGEX] * 10))
    assert refused.value.field == "when"
    compile_condition('message.matches("^door (forced|held)") || message.matches("[0-9]{3}")')


@pytest.mark.parametrize("expression", [
    "data.a.all(x, x > 1) && data.b.exists(y, y > 2)",
    'message == ".all(" && data.a.exists(x, (x > 1) || (x < -1))',
    "data.a.map(x, x * 2).exists(y, y > 3)",
])
def test_comprehensions_one_after_the_other_are_valid(expression: str) -> None:
    """Their own names (``x``, ``y``) are no unknown names."""
    program = compile_condition(expression)
    assert program.execute({"message": ".all(", "data": {"a": [1, 5], "b": [3]}}) in (True, False)


def test_a_mute_is_at_most_ten_years() -> None:
    assert mute_length("3650d") == MAX_MUTE_MS
    with pytest.raises(ValueError, match="ten years"):
        mute_length("417000w")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_a_rule_or_a_clear_refusal(expression: str) -> None:
    problem = None
    try:
        compile_condition(expression)
    except InvalidRule as exc:
        problem = str(exc)
    assert problem is None or problem.startswith("when: ")


def test_a_rule_has_exactly_one_condition_and_sane_values() -> None:
    with pytest.raises(InvalidRule, match="exactly one condition"):
        parse_spec({"name": "x", "to": [HOOK]})
    with pytest.raises(InvalidRule, match="exactly one condition"):
        parse_spec({"name": "x", "to": [HOOK], "when": "true", "offline": "5m"})
    with pytest.raises(InvalidRule, match="name"):
        parse_spec({"name": "bad name", "to": [HOOK], "when": "true"})
    with pytest.raises(InvalidRule, match="Apprise"):
        parse_spec({"name": "x", "to": ["nosuchservice://x"], "when": "true"})
    with pytest.raises(InvalidRule, match="within"):
        parse_spec({"name": "x", "to": [HOOK], "when": "true", "within": "soon"})
    with pytest.raises(InvalidRule, match="queue rules"):
        parse_spec({"name": "x", "to": [HOOK], "backlog": 5, "devices": "door-*"})
    assert parse_spec({"name": "x", "to": ["ntfy://ntfy.sh/topic"], "offline": "10m"}).kind == "offline"


def test_selectors() -> None:
    assert Selector("*")("anything")
    assert Selector("door-1")("door-1") and not Selector("door-1")("door-10")
    assert Selector("door-*")("door-10") and not Selector("door-*")("kiosk-1")
    assert Selector("kiosk-?")("kiosk-3") and not Selector("kiosk-?")("kiosk-33")
    assert Selector("[ab]-*")("a-1") and not Selector("[ab]-*")("c-1")
    assert Selector("x*")("x\ny")


def test_destinations_are_shown_without_their_secrets() -> None:
    assert display_url("https://user:pw@hooks.example.com/x?token=abc") == \
        "https://hooks.example.com/x?token=********"
    # A webhook whose path is its secret (Slack, Discord): its last 4 characters only; and
    # every query value, whatever its name (sig=, code=, auth=).
    slack = "https://hooks.slack.com/services/T0AAAA/B0BBBB/SuperSecretWebhookToken123"
    assert display_url(slack) == "https://hooks.slack.com/…n123"
    assert display_url("https://discord.com/api/webhooks/1234567/DiscordSecretToken_abc?wait=1") == \
        "https://discord.com/…_abc?wait=********"
    assert display_url("https://example.com/hook?sig=abc&code=def") == \
        "https://example.com/hook?sig=********&code=********"
    shown = display_url("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ")
    assert "TIiajkdnlazkcOXrIdevi7FQ" not in shown and shown.startswith("slack://")
    assert "secret" not in rule(when="true", secret="0123456789abcdef").public(T0)


# -- the engine ---------------------------------------------------------------------------


def engine_with(*rules: Rule) -> Engine:
    engine = Engine()
    engine.load(rules, {}, {})
    for new in engine.new_rules():
        engine.caught_up(new.id, None)
    return engine


def notes(engine: Engine) -> list[tuple[str, str]]:
    return [(note.event, note.firing) for note in engine.take_changes().notes]


def test_a_burst_is_one_firing_notified_after_group_wait_with_its_count() -> None:
    engine = engine_with(rule(when='level == "error"', group_wait="10s", within="1m"))
    engine.evaluate([record(n, T0 + n * 50) for n in range(1, 201)])  # 200 in 10 s
    engine.tick(T0 + 9_000)
    assert notes(engine) == []
    engine.tick(T0 + 50 + 10_000)
    [(event, firing_id)] = notes(engine)
    firing = engine.firings[firing_id]
    assert event == "firing" and firing.count == 200 and len(firing.samples) == 5
    assert (firing.first_at, firing.last_at) == (T0 + 50, T0 + 10_000)
    engine.evaluate([record(300, T0 + 30_000)])  # the same window goes on: counted, not sent again
    engine.tick(T0 + 40_000)
    assert notes(engine) == [] and engine.firings[firing_id].count == 201
    engine.tick(T0 + 30_000 + 60_000)  # a minute without a match: resolved, silently (record rule)
    assert notes(engine) == []
    assert firing_id not in engine.firings
    engine.evaluate([record(400, T0 + 100_000)])  # a new burst: a new firing
    engine.tick(T0 + 120_000)
    [(event, second)] = notes(engine)
    assert second != firing_id


def test_count_within_is_a_sliding_window_per_device() -> None:
    engine = engine_with(rule(when='level == "error"', count=3, within="1m", group_wait="0s"))
    engine.evaluate([record(1, T0, "a"), record(2, T0 + 50_000, "a"), record(3, T0 + 70_000, "a"),
                     record(4, T0 + 1, "b"), record(5, T0 + 2, "b")])
    engine.tick(T0 + 80_000)
    assert notes(engine) == []  # a: 3 in 70 s; b: 2
    engine.evaluate([record(6, T0 + 100_000, "a")])  # a: 50 s, 70 s, 100 s: 3 within a minute
    engine.tick(T0 + 100_000)
    [(_, firing_id)] = notes(engine)
    assert engine.firings[firing_id].group == "a" and engine.firings[firing_id].first_at == T0 + 50_000


def test_per_fleet_counts_every_device_together_and_selectors_apply() -> None:
    engine = engine_with(rule(when="true", per="fleet", count=3, devices="door-*", group_wait="0s"))
    engine.evaluate([record(1, T0, "door-1"), record(2, T0 + 1, "kiosk-1"), record(3, T0 + 2, "door-2"),
                     record(4, T0 + 3, "door-3")])
    engine.tick(T0 + 10)
    [(_, firing_id)] = notes(engine)
    assert engine.firings[firing_id].group == "*" and engine.firings[firing_id].count == 3


def test_records_before_the_rule_are_not_evaluated_unless_backfilled() -> None:
    plain = rule("plain", when="true", group_wait="0s", created_at=T0)
    backfilled = rule("back", when="true", group_wait="0s", created_at=T0, backfill="1h")
    engine = engine_with(plain, backfilled)
    engine.evaluate([record(1, T0 - 60_000)])
    engine.tick(T0)
    assert [note.rule for note in engine.take_changes().notes] == ["back"]


def test_errors_in_a_condition_do_not_match_and_are_counted() -> None:
    engine = engine_with(rule(when="data.temp > 80", group_wait="0s"))
    engine.evaluate([record(1, T0, data='{"other": 1}'), record(2, T0 + 1, data='{"temp": "hot"}'),
                     record(3, T0 + 2, data='{"temp": 81.5}')])
    engine.tick(T0 + 2)
    changes = engine.take_changes()
    assert len(changes.notes) == 1
    assert changes.stats["evaluations"] == 3 and changes.stats["evaluation_errors"] == 2


def test_ids_are_deterministic_and_state_survives_a_reload() -> None:
    def run() -> tuple[Engine, list[str]]:
        engine = engine_with(rule(when="true", group_wait="5s"))
        engine.evaluate([record(1, T0), record(2, T0 + 1)])
        return engine, [f for f in engine.firings]

    first, ids = run()
    assert run()[1] == ids
    changes = first.take_changes()
    groups = {k: v for k, v in changes.groups.items() if v is not None}
    firings = {k: Firing.from_json(v) for k, v in changes.firings.items()}
    reloaded = Engine()
    reloaded.load([rule(when="true", group_wait="5s")], groups, firings)
    reloaded.evaluate([record(3, T0 + 2)])
    reloaded.tick(T0 + 5_000)
    [(_, firing_id)] = notes(reloaded)
    assert firing_id == ids[0] and reloaded.firings[firing_id].count == 3


def test_conditions_fire_once_and_resolve_with_a_message() -> None:
    offline = rule("off", offline="5m")
    engine = engine_with(offline)
    engine.conditions(offline, {"d1": {"offline_since": T0}}, T0 + 300_000, {"d1": str(T0)})
    engine.conditions(offline, {"d1": {"offline_since": T0}}, T0 + 301_000, {"d1": str(T0)})
    [(event, firing_id)] = notes(engine)
    assert event == "firing"
    engine.conditions(offline, {}, T0 + 400_000)
    assert notes(engine) == [("resolved", firing_id)]


def test_the_preview_runs_the_condition_as_the_alerter_does() -> None:
    records = [record(1, T0, "door-1", message="door forced", data='{"temp": 91}'),
               record(2, T0, "door-2", message="door closed", data='{"temp": 20}'),
               record(3, T0, "kiosk-1", message="door forced", data='{"temp": 99}'),
               record(4, T0, "door-3", message="door forced", data="{}")]
    found = preview('message.contains("forced") && data.temp > 80', "door-*", records)
    assert [r.seq for r in found.matched] == [1]
    assert (found.checked, found.errors) == (3, 1) and found.first_error  # door-3 has no temp
    assert [r.seq for r in preview("true", "kiosk-1", records).matched] == [3]
    with pytest.raises(InvalidRule) as refused:
        preview("data.temp >", "*", records)
    assert refused.value.position == (1, 12)
