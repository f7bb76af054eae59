"""``POST /api/alerts/preview``: the console's live preview, against a real API process and SQLite store."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api.conftest import Api
from tests.api.conftest import api as api  # the fixture
from tests.api.test_reads import rec, write

pytestmark = pytest.mark.slow

T0 = int(time.time() * 1000) - 600_000


def preview(api: Api, token: str, **body: object) -> httpx.Response:
    return httpx.post(f"{api.url}/api/alerts/preview", json=body,
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_the_preview_shows_which_recent_stored_records_a_condition_matches(api: Api) -> None:
    write(api, [rec(f"1-{n}", "door-1", T0 + n, level="error" if n % 3 == 0 else "info", msg=f"m {n}",
                    temp=n * 10) for n in range(12)]
          + [rec("2-0", "kiosk-1", T0 + 50, level="error", msg="kiosk", temp=500)])
    answer = preview(api, api.reader, when='level == "error" && data.temp > 40', devices="door-*")
    assert answer.status_code == 200, answer.text
    found = answer.json()
    # Records 6 and 9 (error, temp 60 and 90) of door-1, newest first; the kiosk is not selected.
    assert [r["data"]["msg"] for r in found["records"]] == ["m 9", "m 6"]
    assert (found["checked"], found["matched"], found["errors"]) == (12, 2, 0)
    one = preview(api, api.reader, when="data.temp >= 500", devices="kiosk-1").json()
    assert [r["device_id"] for r in one["records"]] == ["kiosk-1"] and one["checked"] == 1
    # Only the newest `recent` records are tried.
    assert preview(api, api.reader, when="true", recent=5).json()["checked"] == 5


def test_an_invalid_condition_is_refused_with_its_position_and_reads_nothing(api: Api) -> None:
    answer = preview(api, api.reader, when="data.temp >")
    assert answer.status_code == 422
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["body", "when"] and problem["position"] == {"line": 1, "column": 12}
    assert preview(api, api.reader, when="x" * 5000).status_code == 422
    assert preview(api, api.reader, when="true", recent=0).status_code == 422
    assert httpx.post(f"{api.url}/api/alerts/preview", json={"when": "true"}, timeout=10).status_code == 401
    # No store yet is an empty preview, not an error.
    assert preview(api, api.reader, when="true").json()["checked"] == 0
