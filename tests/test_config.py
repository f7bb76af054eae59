"""fleetlog.config.load_settings: flag > FLEETLOG_* env > TOML file > default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetlog.config import load_settings, mask_url
from tests.helpers import run_fleetlog


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FLEETLOG_* from the outside, and no ./fleetlog.toml but the test's own."""
    for name in list(os.environ):
        if name.startswith("FLEETLOG_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert settings.ws_port == 8765
    assert settings.http_port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.data_dir == Path("fleetlog-data")
    assert settings.queue == "stream"
    assert settings.batch == 500
    assert settings.redis_url is None
    assert settings.store_url == f"sqlite:///{Path('fleetlog-data') / 'fleetlog.db'}"


def test_by_default_one_gateway_process_per_core_this_process_may_use() -> None:
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from fleetlog.config import load_settings; "
            "print(load_settings().gateway_processes, load_settings(processes=3).gateway_processes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out.split() == ["1", "3"]
    assert load_settings().gateway_processes == len(os.sched_getaffinity(0))


def test_each_source_beats_the_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "ws_port = 9001\nhttp_port = 9002\nbatch = 7\nqueue = 'list'\n")
    monkeypatch.setenv("FLEETLOG_WS_PORT", "9101")
    monkeypatch.setenv("FLEETLOG_HTTP_PORT", "9102")
    settings = load_settings(config, ws_port=9201)
    assert settings.ws_port == 9201, "flag beats env"
    assert settings.http_port == 9102, "env beats file"
    assert settings.batch == 7, "file beats default"
    assert settings.queue == "list"
    assert settings.block_ms == 1000, "default when no source sets it"


def test_an_unset_flag_hides_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "ws_port = 9001\nbatch = 7\n")
    monkeypatch.setenv("FLEETLOG_WS_PORT", "9101")
    settings = load_settings(config, ws_port=None, batch=None, host=None)
    assert (settings.ws_port, settings.batch, settings.host) == (9101, 7, "127.0.0.1")


def test_env_variables_of_every_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLOG_DATA_DIR", "/srv/fleet")
    monkeypatch.setenv("FLEETLOG_REDIS_URL", "redis://h:6379/15")
    monkeypatch.setenv("FLEETLOG_MAX_RUNTIME", "3600")
    monkeypatch.setenv("FLEETLOG_NO_FILES", "true")
    settings = load_settings()
    assert settings.data_dir == Path("/srv/fleet")
    assert settings.redis_url == "redis://h:6379/15"
    assert settings.max_runtime == 3600.0
    assert settings.no_files is True
    assert settings.store_url == "sqlite:////srv/fleet/fleetlog.db"


def test_fleetlog_config_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from_env = write_toml(tmp_path / "env.toml", "ws_port = 9301\nbatch = 31\n")
    monkeypatch.setenv("FLEETLOG_CONFIG", str(from_env))
    assert load_settings().ws_port == 9301
    from_flag = write_toml(tmp_path / "flag.toml", "ws_port = 9401\n")
    settings = load_settings(from_flag)
    assert settings.ws_port == 9401, "--config beats FLEETLOG_CONFIG"
    assert settings.batch == 500, "only one file is read"


def test_fleetlog_toml_in_the_working_directory_is_the_default_file() -> None:
    write_toml(Path("fleetlog.toml"), "ws_port = 9501\n")
    assert load_settings().ws_port == 9501


def test_config_path_as_string(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "store = 'sqlite:////x/y.db'\n")
    assert load_settings(str(config)).store_url == "sqlite:////x/y.db"


def test_missing_config_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.toml"):
        load_settings(tmp_path / "missing.toml")


def test_missing_fleetlog_config_file_raises_file_not_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLEETLOG_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        load_settings()


@pytest.mark.parametrize(
    "flags",
    [{"ws_port": 70000}, {"batch": 0}, {"queue": "kafka"}, {"max_backlog": 0}, {"ws_port": "eighty"},
     {"ingest_linger": 0.5}, {"ingest_linger": -0.001}],
)
def test_invalid_flag_raises_validation_error(flags: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(**flags)


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLEETLOG_WS_PORT", "abc"), ("FLEETLOG_QUEUE", "kafka"), ("FLEETLOG_BATCH", "-1"),
     ("FLEETLOG_REDIS_APPENDFSYNC", "sometimes")],
)
def test_invalid_env_raises_validation_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        load_settings()


@pytest.mark.parametrize("text", ["ws_port = 70000\n", "queue = 'kafka'\n", "batch = 'many'\n"])
def test_invalid_file_value_raises_validation_error(tmp_path: Path, text: str) -> None:
    config = write_toml(tmp_path / "bad.toml", text)
    with pytest.raises(ValidationError):
        load_settings(config)


@pytest.mark.parametrize("env", [
    {"FLEETLOG_QUEUE": "list", "FLEETLOG_REDIS_URL": "redis+cluster://127.0.0.1:7000"},
    {"FLEETLOG_QUEUE": "list", "FLEETLOG_REDIS_CLUSTER": "true"},
])
def test_the_list_queue_on_a_cluster_is_refused_from_any_source(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Checked by the settings, not by the CLI only: an env var or the TOML file gets it too."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="queue = list cannot run on a Redis Cluster"):
        load_settings()
    assert load_settings(queue="stream").on_cluster


def test_a_flag_replaces_an_invalid_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLOG_WS_PORT", "abc")
    assert load_settings(ws_port=9000).ws_port == 9000, "the flag replaces the bad value"


# -- `fleetlog config` -----------------------------------------------------------


def run_config(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("FLEETLOG_")}
    return subprocess.run(
        [sys.executable, "-m", "fleetlog", "config", *args],
        env={**base, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=30,
    )


def parse_output(stdout: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in stdout.splitlines() if " = " in line)
    return {key: value for key, value in pairs}


def test_config_command_prints_the_effective_values(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "fleet.toml", "ws_port = 9001\nbatch = 7\nqueue = 'list'\nredis_url = 'redis://a:1/15'\n"
    )
    result = run_config(
        "--config", str(config), "--data-dir", str(tmp_path / "flagdir"),
        env={"FLEETLOG_BATCH": "42", "FLEETLOG_DATA_DIR": str(tmp_path / "envdir")},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    values = parse_output(result.stdout)
    assert values["ws_port"] == "9001"
    assert values["queue"] == '"list"'
    assert values["redis_url"] == '"redis://a:1/15"'
    assert values["batch"] == "42", "env beats file"
    assert values["data_dir"] == f'"{tmp_path / "flagdir"}"', "flag beats env"
    assert values["store_url"] == f'"sqlite:///{tmp_path / "flagdir" / "fleetlog.db"}"'
    assert values["http_port"] == "8080"


def test_config_command_with_a_missing_file_fails_clearly(tmp_path: Path) -> None:
    result = run_config("--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_command_with_an_invalid_value_fails_clearly(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "bad.toml", "ws_port = 70000\n")
    result = run_config("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "ws_port" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_command_names_a_check_of_several_settings_without_a_stray_colon(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "bad.toml", "queue = 'list'\nshards = 2\n")
    result = run_config("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "fleetlog: invalid configuration: Value error, shards > 1 needs queue = stream" in result.stderr


def test_config_command_masks_secrets(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "fleet.toml", "store = 'postgresql://app:st0re-pw@db:5432/fleet'\n")
    result = run_config(
        "--config", str(config),
        env={"FLEETLOG_JWT_SECRET": "jwt-secret-of-at-least-32-bytes!!",
             "FLEETLOG_REDIS_URL": "redis://fleet:r3dis-pw@cache:6379/15?password=q-pw"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for secret in ("jwt-secret-of", "r3dis-pw", "st0re-pw", "q-pw"):
        assert secret not in result.stdout + result.stderr
    values = parse_output(result.stdout)
    assert values["jwt_secret"] == '"********"'
    assert values["redis_url"] == '"redis://fleet:********@cache:6379/15?password=********"'
    assert values["store"] == '"postgresql://app:********@db:5432/fleet"'
    assert values["store_url"] == values["store"]
    assert values["ws_port"] == "8765", "everything else as it is"


def test_config_command_shows_unset_secrets_as_unset(tmp_path: Path) -> None:
    result = run_config(env={"FLEETLOG_REDIS_URL": "redis://cache:6379/15"}, cwd=tmp_path)
    values = parse_output(result.stdout)
    assert values["jwt_secret"] == "null"
    assert values["redis_url"] == '"redis://cache:6379/15"'


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:********@host:6379/0"),
        ("redis://:pw@host", "redis://:********@host"),
        ("rediss://u:p%40ss@h:1/2", "rediss://u:********@h:1/2"),
        ("redis://u:p@ss@h", "redis://u:********@h"),
        ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=********&db=1"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=********"),
        ("postgresql://app:pw@db/fleet?sslmode=require", "postgresql://app:********@db/fleet?sslmode=require"),
        ("redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/15"),
        ("redis://user@host", "redis://user@host"),
        ("sqlite:////srv/fleet/fleetlog.db", "sqlite:////srv/fleet/fleetlog.db"),
        ("fleetlog-data", "fleetlog-data"),
        ("redis://h:notaport", "redis://h:notaport"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(("text", "says"), [
    ("retention = 30d\n", "is not valid TOML"),
    ("batch = 1\nbatch = 2\n", "is not valid TOML"),
    ('retension = "30d"\n', "no such setting: 'retension' (did you mean 'retention'?)"),
])
def test_a_config_file_that_cannot_be_what_was_meant_is_refused_by_every_command(
        tmp_path: Path, text: str, says: str) -> None:
    """Exit 2 with the file and the reason, never a traceback; a misspelt key is not ignored."""
    config = write_toml(tmp_path / "c.toml", text)
    for command in (["config"], ["devices", "--data-dir", str(tmp_path)]):
        result = run_fleetlog(*command, "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert str(config) in result.stderr and says in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("redis_url", "notaurl", "is not a Redis URL"),
    ("redis_url", "http://127.0.0.1:6379", "is not a Redis URL"),
    ("store", "bogus://x", "is not a store URL"),
    ("store", "sqlite://relative.db", "is not a store URL"),
])
def test_a_url_of_the_wrong_kind_is_refused_with_what_to_write(flag: str, value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        load_settings(**{flag: value})
    for good in ("redis://127.0.0.1:6379/15", "rediss://h:6380/0", "unix:///run/redis.sock",
                 "redis+cluster://h:7000"):
        assert load_settings(redis_url=good).redis_url == good
    assert load_settings(store="postgresql://u@h:5432/db").store_url == "postgresql://u@h:5432/db"


def test_no_files_beats_files_from_the_file_and_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``up --no-files`` reaches its worker as FLEETLOG_NO_FILES; a ``files`` in the TOML file
    or the environment was still used there, and the daily files were written."""
    config = tmp_path / "fleetlog.toml"
    config.write_text(f'files = "{tmp_path / "from-toml"}"\n')
    assert load_settings(config).files == tmp_path / "from-toml"
    assert load_settings(config, no_files=True).files is None
    monkeypatch.setenv("FLEETLOG_FILES", str(tmp_path / "from-env"))
    monkeypatch.setenv("FLEETLOG_NO_FILES", "true")
    assert load_settings(config).files is None, "the worker's view: up's flag came as env"
    monkeypatch.setenv("FLEETLOG_NO_FILES", "false")
    assert load_settings(config).files == tmp_path / "from-env"
