"""The console's alerts page in real headless Chromium, against a real API, gateway, worker,
alerter, Redis, SQLite store and HTTP receiver.

Type a condition and see which stored records it matches (and where it is wrong), save the rule,
see a matching record notified once and shown as firing, see a destination that keeps failing
listed under delivery failures, mute and test from the table; a read token may look, not save.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from fleetlog.net import free_port
from tests.alerts.conftest import FAST
from tests.alerts.conftest import receiver as receiver  # the fixture
from tests.alerts.receiver import Receiver
from tests.api.conftest import Api
from tests.browser.test_console import ARGS, CHROMIUM, playwright_sync, send
from tests.conftest import Processes
from tests.helpers import legacy_frame, stored_rows, wait_until

pytestmark = pytest.mark.slow


def test_alerts_page_preview_save_fire_fail_mute_and_roles(
        api: Api, processes: Processes, receiver: Receiver, screens: Path) -> None:
    env = {**FAST, "FLEETLOG_ALERT_GIVE_UP": "2"}
    _, port = processes.gateway(api.redis_url, api.data_dir, env=env)
    processes.worker(api.redis_url, api.data_dir)
    processes.start("alerter", "--redis-url", api.redis_url, "--data-dir", str(api.data_dir), env=env)
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # a closed port: every try is refused
    with connect(f"ws://127.0.0.1:{port}") as ws, playwright_sync.sync_playwright() as pw:
        for seq, (device, text) in enumerate([("door-1", "door forced"), ("door-2", "door closed"),
                                              ("door-3", "door forced open"), ("kiosk-1", "door forced")]):
            send(ws, legacy_frame(device, seq, level="warn", msg=text))
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(f"{api.url}/#/alerts")
            page.fill("#token", api.admin)
            page.click("#login-form button[type=submit]")
            page.locator("#rules", has_text="No rules yet").wait_for(timeout=15_000)
            assert page.locator("#new-rule").get_attribute("open") is not None  # open when there are none

            # A wrong condition: where it is wrong, before anything is saved.
            page.fill("#rule-form textarea[name=condition]", "data.temp >")
            page.locator("#preview-state", has_text="line 1, column 12").wait_for(timeout=10_000)
            # A right one: the stored records it matches, with the device selector applied.
            page.fill("#rule-form input[name=devices]", "door-*")
            page.fill("#rule-form textarea[name=condition]", 'message.contains("forced")')
            matches = page.locator("#preview-state", has_text="Matches 2 of the newest 3 records")
            matches.wait_for(timeout=10_000)
            assert sorted(page.locator("#preview .row .dev").all_inner_texts()) == ["door-1", "door-3"]

            page.fill("#rule-form input[name=name]", "door-forced")
            page.fill("#rule-form input[name=group_wait]", "0s")
            page.fill("#rule-form textarea[name=to]", receiver.url)
            page.click("#rule-form button[type=submit]")
            page.locator('#rules tr[data-rule="door-forced"]', has_text="ok").wait_for(timeout=10_000)

            # Records stored before the rule existed never fire it; one sent now fires it once.
            send(ws, legacy_frame("door-9", 10, level="error", msg="door forced at night"))
            page.locator("#firing .firing-block", has_text="door forced at night").wait_for(timeout=15_000)
            page.locator('#notifications tr[data-rule="door-forced"] td.status',
                         has_text="delivered").wait_for(timeout=15_000)
            assert [r.body["event"] for r in receiver.received] == ["firing"]
            assert receiver.received[0].body["firing"]["count"] == 1
            page.locator('#rules tr[data-rule="door-forced"]', has_text="firing (1)").wait_for(timeout=10_000)
            page.screenshot(path=screens / "alerts.png", full_page=True)

            # A destination that keeps failing: tried, then listed as failed with its error.
            page.fill("#rule-form input[name=name]", "pumps-to-nowhere")
            page.fill("#rule-form input[name=devices]", "pump-*")
            page.fill("#rule-form textarea[name=condition]", 'level == "error"')
            page.fill("#rule-form textarea[name=to]", nobody)
            page.fill("#rule-form input[name=within]", "2s")
            page.click("#rule-form button[type=submit]")
            page.locator('#rules tr[data-rule="pumps-to-nowhere"]').wait_for(timeout=10_000)
            send(ws, legacy_frame("pump-1", 11, level="error", msg="pump fault"))
            failed = page.locator('#failures tr[data-rule="pumps-to-nowhere"]').first
            failed.wait_for(timeout=30_000)  # tried for FLEETLOG_ALERT_GIVE_UP (2 s), then given up on
            assert "failed" in failed.inner_text() and failed.locator("td.last-error").inner_text().strip()
            # No match left within its 2 s: it resolved, and is listed so with what it gathered;
            # the rule that still fires is not.
            page.locator("#resolved .firing-block.resolved", has_text="pump fault").wait_for(timeout=30_000)
            assert page.locator("#resolved .firing-block", has_text="door forced").count() == 0
            assert page.locator("#firing .firing-block", has_text="pump fault").count() == 0
            page.screenshot(path=screens / "alerts-failures.png", full_page=True)

            # Mute from the table, then test: a sample reaches the receiver, marked as a test.
            page.click('#rules tr[data-rule="door-forced"] button:has-text("Mute 1 h")')
            muted = page.locator('#rules tr[data-rule="door-forced"]', has_text="muted until")
            muted.wait_for(timeout=10_000)
            page.click('#rules tr[data-rule="door-forced"] button:has-text("Test")')
            assert wait_until(lambda: [r.body["event"] for r in receiver.received] == ["firing", "test"], 10)

            # The rule's history page.
            page.click('#rules tr[data-rule="door-forced"] a')
            page.locator("#history .firing-block", has_text="door forced at night").wait_for(timeout=10_000)

            # A read token sees everything and may not save.
            reader = browser.new_page(viewport={"width": 390, "height": 844})
            reader.goto(f"{api.url}/#/alerts")
            reader.fill("#token", api.reader)
            reader.press("#token", "Enter")
            reader.locator('#rules tr[data-rule="door-forced"]').wait_for(timeout=15_000)
            reader.click("#new-rule summary")
            reader.fill("#rule-form input[name=name]", "not-allowed")
            reader.fill("#rule-form textarea[name=condition]", "true")
            reader.fill("#rule-form textarea[name=to]", receiver.url)
            reader.click("#rule-form button[type=submit]")
            reader.locator("#rule-error", has_text="admin token").wait_for(timeout=10_000)
            assert reader.locator('#rules tr[data-rule="not-allowed"]').count() == 0
            assert reader.evaluate("document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()
    time.sleep(1)  # anything sent late would show here
    assert [r.body["event"] for r in receiver.received] == ["firing", "test"]
    assert len(stored_rows(api.data_dir)) == 6
