"""One settings object for every fleetlog process.

Values come from, highest priority first: command-line flags, ``FLEETLOG_*``
environment variables, a TOML file (``--config FILE``, ``FLEETLOG_CONFIG``, or
``./fleetlog.toml`` when it exists), then the defaults below.  The CLI passes
only the flags a user actually gave, so an unset flag never hides an
environment variable.

Every process reads the same object, which is why ``fleetlog config`` can show
exactly what a gateway or worker started with the same inputs would use.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fleetlog.errors import ConfigError
from fleetlog.timeparse import parse_duration

__all__ = ["CLUSTER_SCHEMES", "MASK", "Settings", "load_settings", "mask_url"]

MiB = 1024 * 1024

#: URL schemes that mean a Redis Cluster (the rest of the URL names any one node).
CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
#: What a Redis URL may start with (redis-py's schemes, and the cluster ones).
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)
#: What a store URL may start with (:func:`fleetlog.store.open_store`).
STORE_SCHEMES: Final = ("sqlite:///", "postgresql://", "postgres://")
#: Per URL setting: its schemes, what it is, and what to write instead of a wrong one.
_URL_KINDS: Final = {
    "redis_url": (REDIS_SCHEMES, "a Redis URL",
                  "redis://HOST:PORT/DB, rediss:// (TLS), unix:///PATH or redis+cluster://HOST:PORT"),
    "store": (STORE_SCHEMES, "a store URL", "sqlite:///PATH or postgresql://USER@HOST:PORT/DB"),
}

#: What ``fleetlog config``, logs and banners show instead of a secret.
MASK: Final = "********"

#: Names of settings, and of URL query parameters, whose value is a secret.
_SECRET_NAME: Final = re.compile(r"secret|passw(or)?d|token|credential|api_?key|private", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its password and secret query parameters replaced by :data:`MASK`.

    ``redis://user:pw@host:6379/0?password=pw`` becomes
    ``redis://user:********@host:6379/0?password=********``; anything that
    is not a URL comes back unchanged.
    """
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # a malformed port or IPv6 address: not a URL to show
        return url
    if not parts.scheme:
        return url
    # Edit the text in place: re-assembling with urlunsplit would drop an empty
    # authority (sqlite:////path) and re-encode what it does not touch.
    if has_password:
        userinfo, _, host = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{userinfo.partition(':')[0]}:{MASK}@{host}", 1)
    if parts.query:
        head, _, tail = url.partition("?")
        query, hash_mark, fragment = tail.partition("#")
        query = "&".join(
            f"{name}={MASK}" if sep and _SECRET_NAME.search(name) else f"{name}{sep}{value}"
            for name, sep, value in (piece.partition("=") for piece in query.split("&"))
        )
        url = f"{head}?{query}{hash_mark}{fragment}"
    return url


class Settings(BaseSettings):
    """Effective configuration of a fleetlog process."""

    model_config = SettingsConfigDict(env_prefix="FLEETLOG_", extra="ignore")

    # Where everything lives on disk.
    data_dir: Path = Path("fleetlog-data")

    # Redis / Valkey.  ``None`` means: the embedded server of a running
    # ``fleetlog up`` on the same data dir (see ``fleetlog.embedded``).
    redis_url: str | None = None
    redis_appendfsync: Literal["always", "everysec", "no"] = "always"
    # The URL names one node of a Redis Cluster (also: a ``redis+cluster://`` URL).
    redis_cluster: bool = False
    queue: Literal["stream", "list"] = "stream"
    stream: str = "fleetlog:records"
    group: str = "fleetlog:workers"
    dead_letter_stream: str = "fleetlog:dead"
    max_backlog: int = Field(default=1_000_000, ge=1)
    # Ack a frame only once this many replicas have its records (WAIT), within
    # ack_replicas_timeout; 0: once the master has them.  None (the default): 1 when
    # every master has a replica (a failover then keeps every acked record), else 0.
    ack_replicas: int | None = Field(default=None, ge=0, le=16)
    ack_replicas_timeout: float = Field(default=1.0, gt=0)
    # Streams the queue is split into (``fleetlog:{s3}:records``); 1 keeps the one
    # ``stream`` above.  Every gateway and worker of a deployment must agree.
    shards: int = Field(default=1, ge=1, le=1024)
    # Seconds a worker's lease on a shard lasts unless renewed (a third of it apart).
    shard_lease: float = Field(default=10.0, ge=0.3)

    # Gateway.
    host: str = "127.0.0.1"
    ws_port: int = Field(default=8765, ge=0, le=65535)
    http_port: int = Field(default=8080, ge=0, le=65535)
    auth: Literal["none", "token", "jwt"] = "token"
    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Letters, digits and ``._~-`` only: a node id is spliced into key and channel names
    # (also inside Lua), where it must read the same escaped or not (keys.part).
    node_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                         pattern=r"^[A-Za-z0-9._~-]{1,128}$")
    max_frame_bytes: int = Field(default=1 * MiB, ge=64)
    # Bytes one gateway process holds for what devices send, all its connections
    # together: unfinished fragmented messages, and read buffers as they grow past their
    # first 1,792 bytes (a frame's bytes wait there until it is whole); what would go
    # past it closes its connection (1008).
    max_buffered_bytes: int = Field(default=256 * MiB, ge=64)
    idle_timeout: float = Field(default=300.0, gt=0)
    ping_interval: float = Field(default=20.0, gt=0)
    heartbeat_ttl: float = Field(default=15.0, gt=0)
    handshake_timeout: float = Field(default=10.0, gt=0)
    max_connections_per_ip: int = Field(default=10_000, ge=1)
    # File descriptors a gateway process keeps for other than device connections: it stops
    # accepting at its RLIMIT_NOFILE minus this, and accepts again at 90% of that.
    fd_reserve: int = Field(default=128, ge=16)
    # Token lookups (a handshake whose token is not cached) run on their own Redis
    # connections, at most this many at once; more wait their turn.
    token_lookups: int = Field(default=16, ge=1, le=1024)
    # Lookups that find no such token, per source address: this many a second, this
    # many saved up; past that the address's uncached tokens get 429 with Retry-After.
    auth_failures_per_ip: float = Field(default=10.0, gt=0)
    auth_failures_burst: float = Field(default=100.0, ge=1)
    max_records_per_frame: int = Field(default=500, ge=1)
    dedupe_window: float = Field(default=86_400.0, ge=1)
    rate_records: float = Field(default=2_000.0, gt=0)
    rate_bytes: float = Field(default=2 * MiB, gt=0)
    rate_burst: float = Field(default=10.0, gt=0)
    rate_max_delay: float = Field(default=5.0, ge=0)
    redis_timeout: float = Field(default=5.0, gt=0)
    # Seconds an idle queue shard may hold its next Redis call for the records of the
    # devices its last call answered, while they send again at once (queue.producer):
    # fewer, larger calls cost Redis less per record; a paced fleet is not held.  0: never.
    ingest_linger: float = Field(default=0.002, ge=0, le=0.1)
    # Gateway processes on one port (SO_REUSEPORT) under one parent; None: one per core.
    processes: int | None = Field(default=None, ge=1, le=1024)
    # Set by that parent for its children: listen with SO_REUSEPORT, sharing the port.
    reuse_port: bool = False

    # Worker.
    store: str | None = None
    files: Path | None = None
    batch: int = Field(default=500, ge=1, le=100_000)
    block_ms: int = Field(default=1000, ge=1)
    max_runtime: float | None = Field(default=None, gt=0)
    max_messages: int | None = Field(default=None, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
    claim_idle: float = Field(default=30.0, gt=0)
    consumer: str | None = None
    retention: str | None = None  # a duration: 30d, 12h ... (None: keep forever)
    retention_bytes: int | None = Field(default=None, gt=0)
    prune_interval: float = Field(default=60.0, gt=0)
    index_max_lag: int = Field(default=200_000, ge=0)
    metrics_port: int = Field(default=0, ge=0, le=65535)  # worker /metrics; 0: off
    # Where a gateway serves /metrics and a detailed /healthz (node id, connections),
    # apart from the device port; 0: off.  Child k of --processes N uses this port + k.
    gateway_metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Also answer /metrics on the device port, without a token (before 0.2: the default).
    metrics_on_device_port: bool = False

    # HTTP API (``fleetlog api``, ``fleetlog send``).
    api_url: str | None = None  # default http://HOST:HTTP_PORT
    api_token: str | None = None
    max_consumer_lag: int = Field(default=100_000, ge=0)  # /readyz fails above it
    # Seconds one store read of the API may run (a search, a page, a chart): then it
    # stops and the answer is 503 "narrow the search".  Each export page has it too.
    read_timeout: float = Field(default=5.0, gt=0, le=3600)
    # The largest request body the API reads (a command's JSON; 413 above it), and the
    # seconds a client has to send one (408 after).  A control message over 16 MiB would
    # risk Redis' pub/sub output limit (32 MB) and a gateway's subscription: not allowed.
    max_command_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * MiB)
    body_timeout: float = Field(default=10.0, gt=0, le=3600)
    # What one live tail or export may hold in the API beyond what its socket took (bytes of
    # records read from the store), and the seconds its client may leave a write untaken
    # before it is cut off (a tail resumes with Last-Event-ID).
    stream_buffer_bytes: int = Field(default=4 * MiB, ge=64 * 1024, le=1024 * MiB)
    stream_stall_timeout: float = Field(default=30.0, gt=0, le=3600)
    # Live tails one API process serves at once (each holds a connection and up to
    # stream_buffer_bytes); more are answered 503 until one ends.
    max_live_tails: int = Field(default=1000, ge=1, le=100_000)

    # Alerts (``fleetlog alerter``; see fleetlog.alerts).  Presence, refusals and the queue
    # are looked at every alert_poll s; one alerter holds a lease of alert_lease s; a
    # notification is tried again alert_retry_initial s doubling to alert_retry_cap s
    # apart until alert_give_up s after it was due, then recorded as failed.
    alert_poll: float = Field(default=2.0, gt=0, le=3600)
    alert_lease: float = Field(default=10.0, ge=0.3)
    alert_retry_initial: float = Field(default=1.0, gt=0)
    alert_retry_cap: float = Field(default=60.0, gt=0)
    alert_give_up: float = Field(default=86_400.0, gt=0)
    alert_send_timeout: float = Field(default=10.0, gt=0, le=300)
    alert_senders: int = Field(default=8, ge=1, le=256)
    # The alerter's CPU priority (nice), and the share of a core it uses while it catches up
    # with the store (a drain, a burst) unless it is more than alert_max_lag s behind: it may
    # lag under a full drain, rather than take CPU from the gateway and the worker.
    alert_nice: int = Field(default=10, ge=0, le=19)
    alert_cpu_share: float = Field(default=0.25, gt=0, le=1)
    alert_max_lag: float = Field(default=60.0, ge=0)

    # ``fleetlog up``.
    no_files: bool = False

    @property
    def gateway_processes(self) -> int:
        """How many gateway processes ``fleetlog gateway`` runs: ``processes``, else the cores.

        The cores this process may run on (its affinity mask: ``taskset``, a
        container's cpuset), not all the machine has.
        """
        if self.processes:
            return self.processes
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0)) or 1
        return os.cpu_count() or 1

    @property
    def store_url(self) -> str:
        """The store URL, defaulting to the SQLite file inside the data dir."""
        return self.store or f"sqlite:///{self.data_dir / 'fleetlog.db'}"

    @property
    def on_cluster(self) -> bool:
        """Whether the Redis is a Redis Cluster (``redis_cluster``, or a ``redis+cluster://`` URL)."""
        return self.redis_cluster or (self.redis_url or "").startswith(CLUSTER_SCHEMES)

    @model_validator(mode="after")
    def _shards_need_streams(self) -> Settings:
        if self.shards > 1 and self.queue == "list":
            raise ValueError("shards > 1 needs queue = stream (the legacy list is one list)")
        return self

    @model_validator(mode="after")
    def _no_files_means_none(self) -> Settings:
        # ``up --no-files`` beats a ``files`` from the TOML file or the environment, in every
        # process it starts (they get FLEETLOG_NO_FILES): a flag beats both.
        if self.no_files and self.files is not None:
            self.files = None
        return self

    @model_validator(mode="after")
    def _list_needs_one_redis(self) -> Settings:
        if self.queue == "list" and self.on_cluster:
            raise ValueError("queue = list cannot run on a Redis Cluster (its scripts span keys of "
                             "several slots); use queue = stream")
        return self

    @field_validator("redis_url", "store")
    @classmethod
    def _url_of_a_known_kind(cls, value: str | None, info: ValidationInfo) -> str | None:
        schemes, kind, use = _URL_KINDS[info.field_name or ""]
        if value is not None and not value.startswith(schemes):
            raise ValueError(f"{mask_url(value)!r} is not {kind}: use {use}")
        if value is not None and info.field_name == "redis_url":
            try:  # a port that is no number would fail at the first connection, as a traceback
                _ = urlsplit(value).port
            except ValueError as exc:
                raise ValueError(f"{mask_url(value)!r}: {exc}") from None
        return value

    @field_validator("retention")
    @classmethod
    def _retention_is_a_duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def retention_ms(self) -> int | None:
        """``retention`` in milliseconds (None: keep forever)."""
        return None if self.retention is None else parse_duration(self.retention)

    def for_display(self) -> dict[str, Any]:
        """Every setting (and ``store_url``) as JSON values, secrets masked.

        A setting named like a secret shows :data:`MASK` when set; every
        string that is a URL shows without its password (:func:`mask_url`).
        """
        values = self.model_dump(mode="json")
        values["store_url"] = self.store_url
        for name, value in values.items():
            if isinstance(value, str):
                values[name] = MASK if _SECRET_NAME.search(name) else mask_url(value)
        return values

    @property
    def fatal_error_dir(self) -> Path:
        return self.data_dir / "logs" / "device" / "fatal_error"

    def as_env(self) -> dict[str, str]:
        """The values set other than by default, as ``FLEETLOG_*`` variables.

        ``fleetlog up`` hands its effective settings to its children this way,
        so a flag given to ``up`` reaches the gateway and the worker.
        """
        env = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if isinstance(value, bool):
                value = str(value).lower()
            if value is not None:
                env[f"FLEETLOG_{name.upper()}"] = str(value)
        return env

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _config_path(config_file: str | Path | None) -> Path | None:
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    env = os.environ.get("FLEETLOG_CONFIG")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"config file not found: {env} (from FLEETLOG_CONFIG)")
        return Path(env)
    default = Path("fleetlog.toml")
    return default if default.is_file() else None


def _check_config_file(path: Path) -> None:
    """A TOML file that does not parse, or names a setting fleetlog does not have, is an error.

    A misspelt key (``retension = "30d"``) would otherwise be ignored without a
    word and the setting left at its default; environment variables are not
    checked this way (``FLEETLOG_*`` may hold other tools' variables).
    """
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(Settings.model_fields))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(f"config file {path}: no such setting: {', '.join(hints)}")


def load_settings(config_file: str | Path | None = None, **flags: Any) -> Settings:
    """Build the effective settings; ``flags`` holds only the flags a user gave.

    Raises :class:`pydantic.ValidationError` for a bad value (from any source),
    :class:`FileNotFoundError` for a missing ``--config`` file and
    :class:`~fleetlog.errors.ConfigError` for a config file that does not parse
    or names an unknown setting.
    """
    given = {key: value for key, value in flags.items() if value is not None}
    path = _config_path(config_file)
    if path is None:
        return Settings(**given)
    _check_config_file(path)
    with_file = type(
        "Settings",
        (Settings,),
        {"model_config": SettingsConfigDict(**{**Settings.model_config, "toml_file": path})},
    )
    settings: Settings = with_file(**given)
    return settings
