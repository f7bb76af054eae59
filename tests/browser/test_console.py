"""The web console in real headless Chromium (Debian's ``chromium``, driven by Playwright).

Against a real API, gateway, worker, Redis and SQLite store, with a legacy
device on a real WebSocket: log in with a token, see the device come online,
find a record by search (Chinese too), see a record sent during the test
appear in the live tail, send a command the device receives, export a range.

Screenshots are kept in the test's tmp dir; with ``FLEETLOG_SCREENSHOTS=DIR``
(``make screenshots``) they are copied there too (docs/api.md shows
``docs/screenshots``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.api.conftest import Api
from tests.conftest import Processes
from tests.helpers import RECEIVED, STORED, legacy_frame, stored_rows, wait_until

pytestmark = pytest.mark.slow

LONG_ID = "kiosk-" + "x" * 122  # 128 characters, the most a device id may have
CHROMIUM = os.environ.get("FLEETLOG_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

import playwright.sync_api as playwright_sync  # noqa: E402  (a test extra: make test installs it)

if not Path(CHROMIUM).exists():  # never a silent skip: make test checks first (tests.prerequisites)
    pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set FLEETLOG_CHROMIUM)",
                pytrace=False)


def send(ws: ClientConnection, frame: str) -> None:
    """Send one legacy frame and check both its replies (received, then stored)."""
    ws.send(frame)
    assert ws.recv(timeout=10) == RECEIVED
    assert ws.recv(timeout=10) == STORED


def device_page(browser: Any, api: Api, device: str) -> Any:
    """A new page, logged in as admin, on ``device``'s page (from its row in the fleet table)."""
    page = browser.new_page()
    page.goto(api.url)
    page.fill("#token", api.admin)
    page.click("#login-form button[type=submit]")
    page.locator(f'tr[data-device="{device}"] a').click()
    return page


def test_console_login_online_search_live_tail_command_export(
        api: Api, processes: Processes, screens: Path, tmp_path: Path) -> None:
    _, port = processes.gateway(api.redis_url, api.data_dir)
    processes.worker(api.redis_url, api.data_dir)
    device = "pump-7"
    with connect(f"ws://127.0.0.1:{port}") as ws, playwright_sync.sync_playwright() as pw:
        for seq, (level, text) in enumerate([("info", "pressure nominal"), ("warn", "温度偏高 41°C"),
                                             ("error", "温度传感器故障: sensor 3 not answering"),
                                             ("info", 'quote " and star * kept')]):
            send(ws, legacy_frame(device, seq, level=level, msg=text))
        # A record that would read "abctxt.exe" if its bidi override were obeyed, from a device
        # whose id is as long as ids may be.
        with connect(f"ws://127.0.0.1:{port}") as other:  # a connection's device is its frames' device
            send(other, legacy_frame(LONG_ID, 0, level="warn", msg="abc\u202eexe.txt"))
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
            page.goto(api.url)
            # Log in: the token goes in a dialog, never in the URL.
            page.fill("#token", api.admin)
            page.click("#login-form button[type=submit]")
            row = page.locator(f'tr[data-device="{device}"]')
            row.locator(".dot.on").wait_for(timeout=15_000)  # the device is online
            assert api.admin not in page.url
            page.screenshot(path=screens / "fleet.png", full_page=True)

            # The 128-character id is cut short in the table, whole on hover; the page does not
            # stretch past the window.
            long_link = page.locator(f'tr[data-device="{LONG_ID}"] a')
            assert long_link.get_attribute("title") == LONG_ID
            box = long_link.bounding_box()
            assert box is not None and box["width"] < 400, box
            assert page.evaluate("document.documentElement.scrollWidth") <= 1200
            # Control characters are shown as escapes, as the CLI shows them.
            page.fill("#fleet-search input[name=q]", "exe.txt")
            page.press("#fleet-search input[name=q]", "Enter")
            bidi = page.locator("#fleet-results .row").first
            bidi.wait_for(timeout=10_000)
            assert "abc\\u202eexe.txt" in bidi.inner_text() and "\u202e" not in bidi.inner_text()

            # Fleet search, Chinese text.
            page.fill("#fleet-search input[name=q]", "温度传感器")
            page.press("#fleet-search input[name=q]", "Enter")
            hit = page.locator("#fleet-results .row")
            hit.first.wait_for(timeout=10_000)
            assert hit.count() == 1 and "温度传感器故障" in hit.first.inner_text()
            page.screenshot(path=screens / "fleet-search.png", full_page=True)

            # The device page: records newest first; a click shows the record's JSON.
            page.click(f'tr[data-device="{device}"] a')
            rows = page.locator("#records .row")
            rows.first.wait_for(timeout=10_000)
            assert "quote \" and star * kept" in rows.first.inner_text()
            assert rows.count() == 4
            rows.nth(1).click()
            assert '"温度传感器故障: sensor 3 not answering"' in page.locator("#records .json").inner_text()

            # Live tail: a record sent now shows up on top within 2 s of its ack.
            page.click("#tail")
            page.locator("#tail-state", has_text="live").wait_for(timeout=10_000)
            send(ws, legacy_frame(device, 99, level="info", msg="实时记录 live one"))
            acked = time.monotonic()
            page.locator("#records .row", has_text="实时记录 live one").wait_for(timeout=2_000)
            assert time.monotonic() - acked < 2.5
            assert "实时记录 live one" in rows.first.inner_text()
            page.screenshot(path=screens / "device-live-tail.png", full_page=True)

            # A command: the legacy device receives the body as it is.
            page.click("details summary")
            page.fill("#command textarea", '{"cmd": "ping", "note": "测试"}')
            page.click("#command button[type=submit]")
            assert json.loads(ws.recv(timeout=10)) == {"cmd": "ping", "note": "测试"}
            page.locator("#command-result", has_text="delivered").wait_for(timeout=10_000)
            page.screenshot(path=screens / "device-command.png", full_page=True)

            # Export a range (error and above): the file holds exactly those records.
            page.select_option("#filters select[name=level]", "error")
            page.click("#filters button[type=submit]")
            with page.expect_download(timeout=10_000) as download:
                page.click("text=Export NDJSON")
            saved = tmp_path / "export.ndjson"
            download.value.save_as(saved)
            lines: list[dict[str, Any]] = [json.loads(line) for line in saved.read_text("utf-8").splitlines()]
            assert [line["message"] for line in lines] == ["温度传感器故障: sensor 3 not answering"]
            assert len(stored_rows(api.data_dir)) == 6

            # A link that cannot be decoded says so, and the page before is gone.
            page.goto(f"{api.url}/#/device/%E0%A4%A")
            page.locator("#main .error", has_text="This link is broken").wait_for(timeout=10_000)
            assert page.locator("#records").count() == 0 and page.locator("#filters").count() == 0

            # The live tail's event parser: several data lines, CRLF, events cut anywhere.
            parsed = page.evaluate("""async () => {
                const { parseEvents } = await import('/console/tail.js');
                const text = 'retry: 2000\\n: hi\\n\\nid: a\\r\\nevent: record\\r\\ndata: one\\r\\n'
                           + 'data: two\\r\\n\\r\\nid: b\\nevent: record\\ndata: {}\\n\\n';
                const seen = new Set();
                for (let cut = 0; cut <= text.length; cut++) {
                  let rest = '', events = [];
                  for (const part of [text.slice(0, cut), text.slice(cut)]) {
                    const got = parseEvents(rest + part); rest = got.rest; events.push(...got.events);
                  }
                  seen.add(JSON.stringify(events.map((e) => [e.id, e.event, e.data, e.retry])));
                }
                return [...seen];
            }""")
            assert parsed == [json.dumps([[None, "message", None, 2000], ["a", "record", "one\ntwo", None],
                                          ["b", "record", "{}", None]], separators=(",", ":"))]

            # Phone width, dark mode (follows the system setting).
            phone = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark")
            phone.goto(api.url)
            phone.fill("#token", api.reader)
            phone.press("#token", "Enter")
            phone.locator(f'tr[data-device="{device}"] .dot.on').wait_for(timeout=15_000)
            background = phone.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(13, 17, 23)", background
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width}px wide on a 390px phone"
            phone.screenshot(path=screens / "phone-dark.png", full_page=True)
        finally:
            browser.close()
    assert sorted(shot.name for shot in screens.glob("*.png")) == [
        "device-command.png", "device-live-tail.png", "fleet-search.png", "fleet.png", "phone-dark.png"]


def test_a_device_named_dot_dot_shows_its_own_records(api: Api, processes: Processes) -> None:
    """The page asked for /api/devices/../logs, which the browser made /api/logs: device ".."
    showed every device's records as its own."""
    _, port = processes.gateway(api.redis_url, api.data_dir)
    processes.worker(api.redis_url, api.data_dir)
    with connect(f"ws://127.0.0.1:{port}") as ws:
        send(ws, legacy_frame("..", 0, level="info", msg="the dot-dot device"))
    with connect(f"ws://127.0.0.1:{port}") as ws:
        send(ws, legacy_frame("door-1", 0, level="info", msg="another device"))
    assert wait_until(lambda: len(stored_rows(api.data_dir)) == 2, timeout=15)
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = device_page(browser, api, "..")
            rows = page.locator("#records .row")
            rows.first.wait_for(timeout=10_000)
            page.wait_for_timeout(500)
            assert rows.count() == 1 and "the dot-dot device" in rows.first.inner_text()
            page.click("details summary")
            page.click("#command button[type=submit]")
            page.locator("#command-result", has_text="use fleetlog send").wait_for(timeout=5_000)
        finally:
            browser.close()


def test_the_live_tail_shows_each_record_once_across_apply_and_toggling(
        api: Api, processes: Processes) -> None:
    """The tail restarted by Apply began from the old first page's newest record before the new
    page came, and turned off and on it began there again: records tailed meanwhile showed twice.
    An integer past 2^53 in a record showed rounded (JSON.parse)."""
    _, port = processes.gateway(api.redis_url, api.data_dir)
    processes.worker(api.redis_url, api.data_dir)
    device = "meter-9"
    big = 9007199254740993  # 2^53 + 1: a double cannot hold it
    with connect(f"ws://127.0.0.1:{port}") as ws, playwright_sync.sync_playwright() as pw:
        for seq in range(3):
            send(ws, legacy_frame(device, seq, level="info", msg=f"before {seq}", counter=big))
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = device_page(browser, api, device)
            rows = page.locator("#records .row")
            rows.first.wait_for(timeout=10_000)
            rows.first.click()
            assert f'"counter": {big}' in page.locator("#records .json").inner_text()
            rows.first.click()  # closed again

            def shows(count: int) -> None:
                playwright_sync.expect(rows).to_have_count(count, timeout=10_000)
                page.wait_for_timeout(1_000)  # a record shown twice would come within this
                texts = [rows.nth(k).inner_text() for k in range(rows.count())]
                assert len(texts) == count == len(set(texts)), texts
                assert count == len([r for r in stored_rows(api.data_dir) if r[1] == device])

            page.click("#tail")
            page.locator("#tail-state", has_text="live").wait_for(timeout=10_000)
            for seq in (3, 4):
                send(ws, legacy_frame(device, seq, level="info", msg=f"tailed {seq}"))
            shows(5)
            page.click("#filters button[type=submit]")  # Apply, the same filters, tail on
            page.locator("#tail-state", has_text="live").wait_for(timeout=10_000)
            shows(5)
            page.click("#tail")  # off
            send(ws, legacy_frame(device, 5, level="info", msg="while off"))
            page.click("#tail")  # on again: what came while it was off, once
            shows(6)
            send(ws, legacy_frame(device, 6, level="info", msg="after"))
            shows(7)
            assert "after" in rows.first.inner_text()
            # A first page that fails (a range the API refuses): the tail goes on all the same.
            page.fill("#filters input[name=since]", "not a time")
            page.click("#filters button[type=submit]")
            page.locator("#records + p", has_text="Error").wait_for(timeout=10_000)
            page.locator("#tail-state", has_text="live").wait_for(timeout=10_000)
            send(ws, legacy_frame(device, 7, level="info", msg="after an error"))
            playwright_sync.expect(rows).to_have_count(1, timeout=10_000)
            assert "after an error" in rows.first.inner_text()
            assert page.locator("#tail").get_attribute("aria-pressed") == "true"
        finally:
            browser.close()
