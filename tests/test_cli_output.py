"""What ``fleetlog logs`` and ``devices`` print when devices send hostile text, and bad flags.

Device-supplied text must never forge a log line, move the terminal's cursor
or be read as rich markup; ``--json`` is one object per line; bad flags are a
clear error, never a traceback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fleetlog.net import free_port
from fleetlog.records import QueuedRecord, StoredRecord
from fleetlog.store.sqlite import SQLiteStore
from fleetlog.view import record_line, record_text, safe_text
from tests.helpers import run_fleetlog

HOSTILE = [
    {"level": "info", "msg": "door open\n2026-01-01T00:00:00.000Z  INFO   forged line"},
    {"level": "warn", "msg": "\x1b[2J\x1b[31mscreen cleared\x07"},
    {"level": "error\r\x1b[1A", "msg": "level with escapes"},
    {"msg": "bidi \u202egnp.exe\u202c and line\u2028separator and \x85NEL"},
    {"note": "no msg: the JSON \u2028 itself", "门": "中文 ok"},
]
DEVICES = ["[/bad]", "multi\nline", "[bold]x[/bold]", "plain-1"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    store = SQLiteStore(tmp_path / "fleetlog.db")
    now = int(time.time() * 1000)
    batch = [QueuedRecord(f"{now}-{n}", "evil", now, json.dumps(record, ensure_ascii=False).encode())
             for n, record in enumerate(HOSTILE)]
    batch += [QueuedRecord(f"{now + 1}-{n}", device, now + 1, b'{"msg": "hi"}')
              for n, device in enumerate(DEVICES)]
    store.write_batch(batch)
    store.close()
    return tmp_path


def test_text_output_escapes_control_characters(data_dir: Path) -> None:
    shown = run_fleetlog("logs", "evil", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == len(HOSTILE), "one line per record, none forged"
    assert not any(char in shown.stdout for char in "\x1b\x07\r\x85\u2028\u202e")
    assert "door open\\n2026-01-01" in lines[0]
    assert "\\e[2J" in lines[1]
    assert "中文 ok" in lines[4], "Unicode text is shown as text"


def test_json_output_is_one_object_per_line(data_dir: Path) -> None:
    shown = run_fleetlog("logs", "evil", "--json", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()  # splitlines also splits on U+2028 and NEL
    assert len(lines) == len(HOSTILE)
    assert [json.loads(line)["data"] for line in lines] == HOSTILE, "the same values, exactly"


def test_devices_table_prints_ids_as_text(data_dir: Path) -> None:
    shown = run_fleetlog("devices", "--data-dir", str(data_dir), "--redis-url", "redis://127.0.0.1:1/0")
    assert shown.returncode == 0, shown.stderr
    assert "[/bad]" in shown.stdout
    assert "[bold]x[/bold]" in shown.stdout
    assert "multi\\nline" in shown.stdout
    assert "Traceback" not in shown.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--level", "bogus"], "trace, debug, info, warn, error, fatal"),
        (["--since", "99999999999999d"], "longer than fleetlog can count"),
        (["--until", "99999999999999999999w"], "longer than fleetlog can count"),
        (["--limit", str(10**30)], "--limit"),
        (["--since", "yesterday"], "neither a duration"),
    ],
)
def test_bad_read_flags_are_clear_errors(data_dir: Path, flags: list[str], message: str) -> None:
    shown = run_fleetlog("logs", "evil", "--data-dir", str(data_dir), *flags)
    assert shown.returncode == 2
    assert message in shown.stderr
    assert "Traceback" not in shown.stderr


def test_a_level_alias_is_accepted(data_dir: Path) -> None:
    shown = run_fleetlog("logs", "evil", "--level", "WARNING", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == 1  # the warn record; "error\r.." is no known level


def test_safe_text_and_record_line_units() -> None:
    assert safe_text("a\tb\x00\x7f\x9b") == "a\\tb\\x00\\x7f\\x9b"
    assert safe_text("👨\u200d👩 中文") == "👨\u200d👩 中文"
    assert safe_text("door\u200b-1 \u061cx \u2060y") == "door\\u200b-1 \\u061cx \\u2060y"
    record = StoredRecord(1, "1-0", "d\u2028x", 0, None, "in\nfo", "m", '{\n  "a": "\u2029"\n}')
    line = record_line(record)
    assert len(line.decode().splitlines()) == 1
    assert json.loads(line)["data"] == {"a": "\u2029"}
    assert json.loads(line)["device_id"] == "d\u2028x"
    assert len(record_text(record).splitlines()) == 1


def test_send_says_what_went_wrong_with_its_exit_code_never_a_traceback() -> None:
    """``--wait nan`` is a usage error (64); an ``--api-url`` answering 2xx with a page that
    is not JSON (a proxy's login page) is "the API could not be asked" (3)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"<html>please log in</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        usage = run_fleetlog("send", "--api-url", url, "--api-token", "t", "d", "{}", "--wait", "nan")
        assert usage.returncode == 64 and "not a finite number" in usage.stderr
        page = run_fleetlog("send", "--api-url", url, "--api-token", "t", "d", "{}")
        assert page.returncode == 3 and "not JSON" in page.stderr
        assert "Traceback" not in usage.stderr + page.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("command", "flag"), [("gateway", "--rate-records"), ("gateway", "--rate-bytes"),
                                               ("worker", "--max-runtime"), ("worker", "--claim-idle")])
def test_a_flag_that_must_be_positive_says_so_in_help_and_refuses_zero(command: str, flag: str) -> None:
    """``--help`` said x>=0 for these, then 0 was refused by the settings."""
    helped = run_fleetlog(command, "--help")
    assert helped.returncode == 0
    line = " ".join(helped.stdout.split(flag, 1)[1].split("--", 1)[0].split())
    assert "[x>0]" in line and "x>=0" not in line, line
    refused = run_fleetlog(command, flag, "0", "--redis-url", "redis://127.0.0.1:1/0")
    assert refused.returncode == 2 and "x>0" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("command", [["device", "add", "door-1"], ["device", "list"], ["dlq", "list"],
                                     ["alert", "list"], ["api-token", "add", "ops", "--role", "read"]])
def test_an_admin_command_without_its_redis_says_so_in_one_line(command: list[str]) -> None:
    """Redis down: one line naming Redis and exit 2, where a 70-line traceback was."""
    free = str(free_port())  # nothing listens there
    done = run_fleetlog(*command, "--redis-url", f"redis://127.0.0.1:{free}/0")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "Redis unavailable" in done.stderr and free in done.stderr


def test_a_redis_url_whose_port_is_no_number_is_a_configuration_error() -> None:
    """It passed the settings and failed at the first connection, as a worker's "fatal error"."""
    for command in (["dlq", "list"], ["worker", "--max-runtime", "2"]):
        done = run_fleetlog(*command, "--redis-url", "redis://127.0.0.1:notaport/0")
        assert done.returncode == 2, done.stderr
        assert "redis_url" in done.stderr and "notaport" in done.stderr
        assert "Traceback" not in done.stderr
