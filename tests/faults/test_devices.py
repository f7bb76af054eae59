"""The counting devices' ledger: which answers convict a refusal of lying."""

from __future__ import annotations

from collections import Counter

from tests.faults.devices import LOST, Frame, Ledger


def _ledger(*histories: list[str]) -> Ledger:
    ledger = Ledger()
    for n, history in enumerate(histories):
        ledger.frames[f"f{n}"] = Frame("d", range(n * 2, n * 2 + 2), list(history))
    return ledger


def test_a_duplicate_ack_after_refusals_alone_convicts_them() -> None:
    ledger = _ledger(["unavailable"], ["busy", "rate_limited"], ["unavailable", "unconfirmed"],
                     ["busy", LOST], [])
    for frame_id in ("f0", "f1", "f2", "f3"):
        ledger.ack(frame_id, {"type": "ack", "id": frame_id, "duplicate": True})
    ledger.ack("f4", {"type": "ack", "id": "f4", "duplicates": [8]})
    # f2 and f3 had an attempt that may have stored them; f4 had no attempt at all before.
    assert ledger.lying == ["f0", "f1", "f4"]
    assert ledger.duplicate_acks == 5
    assert ledger.acked == {("d", seq) for seq in range(10)}


def test_a_plain_ack_after_refusals_is_no_lie() -> None:
    ledger = _ledger(["unavailable", "busy"])
    ledger.ack("f0", {"type": "ack", "id": "f0", "stored": 2})
    assert ledger.lying == []
    assert ledger.refused_but_stored(Counter({("d", 0): 1, ("d", 1): 1})) == []


def test_the_store_convicts_a_refused_frame_never_acked() -> None:
    ledger = _ledger(["busy"], ["unavailable", "unconfirmed"], ["busy"])
    stored = Counter({("d", 0): 1, ("d", 2): 1})  # f0 (refused only) and f1 (unconfirmed) stored
    assert ledger.refused_but_stored(stored) == ["f0"]
    assert ledger.unacked() == ["f0", "f1", "f2"]
