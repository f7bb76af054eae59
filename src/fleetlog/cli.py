"""The ``fleetlog`` command: parse arguments, build settings, call a ``run_*``.

Nothing else lives here.  Every flag defaults to ``None`` so that only the
flags a user typed override ``FLEETLOG_*`` variables and the TOML file; the
options several commands take are declared once, in :mod:`fleetlog.options`,
and what their values may be is checked by :class:`~fleetlog.config.Settings`.
Every Redis client a command opens is closed when the command ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import orjson
from pydantic import ValidationError

from fleetlog import options
from fleetlog.config import Settings, load_settings
from fleetlog.errors import ConfigError

if TYPE_CHECKING:
    import redis

F = TypeVar("F", bound=Callable[..., Any])

#: The most records one ``fleetlog logs`` prints (more is an export, not a look).
MAX_LIMIT = 1_000_000  # fleetlog.reading.MAX_LIMIT (not imported: it would slow every command)


def _fail(message: str) -> NoReturn:
    click.echo(f"fleetlog: {message}", err=True)
    sys.exit(2)


def _settings(config: str | None, **flags: Any) -> Settings:
    try:
        return load_settings(config, **flags)
    except ValidationError as exc:
        problems = "; ".join(
            # A check of several settings together has no location: its message names them.
            ": ".join(filter(None, (".".join(str(p) for p in error["loc"]), error["msg"])))
            for error in exc.errors()
        )
        _fail(f"invalid configuration: {problems}")
    except (FileNotFoundError, ConfigError) as exc:
        _fail(str(exc))


def _gateway_options(function: F) -> F:
    """Flags shared by ``gateway`` and ``up`` (device-facing settings)."""
    declared = [
        click.option("--auth", type=click.Choice(["none", "token", "jwt"]), default=None,
                     help="Device authentication (default token; none only for legacy fleets)."),
        click.option("--jwt-secret", default=None, help="HS256 secret for --auth jwt."),
        click.option("--jwt-public-key", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="RS256 public key (PEM) for --auth jwt."),
        click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Serve wss:// with this certificate chain (PEM)."),
        click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Private key (PEM) for --tls-cert."),
        click.option("--node-id", default=None, help="This gateway node's id (default HOST-PID)."),
        click.option("--max-frame-bytes", type=int, default=None, help="Frame size limit (1 MiB)."),
        click.option("--max-records-per-frame", type=int, default=None,
                     help="Records per v2 frame (500)."),
        click.option("--max-backlog", type=int, default=None, help="Answer busy above this backlog."),
        click.option("--rate-records", type=options.Seconds(above=True), default=None,
                     help="Per-device records/s (2000)."),
        click.option("--rate-bytes", type=options.Seconds(above=True), default=None,
                     help="Per-device bytes/s (2 MiB)."),
        click.option("--max-connections-per-ip", type=int, default=None,
                     help="Connections per client address, per gateway process, handshakes "
                          "included (10000)."),
        click.option("--processes", type=click.IntRange(min=1, max=1024), default=None,
                     help="Gateway processes sharing the port (default: one per core)."),
        click.option("--gateway-metrics-port", type=click.IntRange(min=0, max=65535), default=None,
                     help="Serve the gateway's /metrics and detailed /healthz here, on "
                          "--metrics-host (127.0.0.1); 0: off (default; up: HTTP port + 2)."),
        options.SHARDS,
        click.option("--ack-replicas", type=click.IntRange(min=0, max=16), default=None,
                     help="Ack only once N replicas have the records (WAIT). Default: 1 when every "
                          "master has a replica, else 0; 0 acks on the master alone (a failover "
                          "can lose acked records)."),
        click.option("--ingest-linger", type=options.Seconds(0, 0.1), default=None,
                     help="Seconds (at most 0.1) an idle queue shard may hold a Redis call for "
                          "the devices it just acked, while they send again at once: less Redis "
                          "CPU per record, up to that much more ack latency (default 0.002; 0: "
                          "never)."),
    ]
    for option in reversed(declared):
        function = option(function)
    return function


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("picows").setLevel(logging.WARNING)  # one line per connection otherwise


def _redis_url(settings: Settings) -> str:
    """The Redis URL to use; a cluster's as ``redis+cluster://`` (``--redis-cluster``)."""
    from fleetlog.embedded import resolve_redis_url
    from fleetlog.queue.connection import cluster_url

    try:
        url = resolve_redis_url(settings.redis_url, settings.data_dir)
    except ConfigError as exc:
        _fail(str(exc))
    return cluster_url(url) if settings.redis_cluster else url


def _redis(settings: Settings) -> redis.Redis:
    """A client of the command's Redis, closed when the command ends (however it ends)."""
    from fleetlog.queue.connection import connect

    client = connect(_redis_url(settings), timeout=settings.redis_timeout)
    click.get_current_context().with_resource(client)  # its __exit__ closes it
    return client


def _exit_code(function: Callable[..., int]) -> Callable[..., None]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        sys.exit(function(*args, **kwargs))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fleetlog")
def cli() -> None:
    """fleetlog: collect, keep and read the logs of a fleet of devices."""


def main() -> None:
    """Console entry point: fleetlog's own errors are one clear line, not a traceback."""
    from fleetlog.errors import FleetlogError

    try:
        cli()
    except FleetlogError as exc:
        _fail(str(exc))
    except Exception as exc:
        problem = _redis_problem(exc)
        if problem is None:
            raise
        _fail(problem)


def _redis_problem(exc: Exception) -> str | None:
    """One line for a Redis that cannot be reached or refused a command (an admin command's
    only call failing: ``device add``, ``dlq list`` ...); ``None`` for anything else."""
    import redis.exceptions

    from fleetlog.queue.connection import REDIS_DOWN

    if not isinstance(exc, redis.exceptions.RedisError):
        return None  # (REDIS_DOWN also holds the built-in ConnectionError: not Redis's here)
    if isinstance(exc, REDIS_DOWN):
        return f"Redis unavailable: {exc}"
    if isinstance(exc, redis.exceptions.ResponseError):
        return f"Redis refused the command: {exc}"
    return None


@cli.command()
@options.common
@options.HOST
@click.option("--ws-port", type=int, default=None, help="Device WebSocket port (default 8765).")
@click.option("--http-port", type=int, default=None, help="HTTP API port (default 8080).")
@options.REDIS_URL
@options.REDIS_CLUSTER
@click.option("--no-files", is_flag=True, default=None, help="Do not write the daily files.")
@_gateway_options
@_exit_code
def up(config: str | None, **flags: Any) -> int:
    """Run everything: embedded Redis, gateway, worker and the HTTP API."""
    from fleetlog.credentials import TokenCache
    from fleetlog.gateway.auth import Authenticator
    from fleetlog.supervise import run_up

    settings = _settings(config, **flags)
    # Bad auth settings fail here, once, not in a gateway child that `up` restarts forever.
    Authenticator(settings.auth, TokenCache(), jwt_secret=settings.jwt_secret,
                  jwt_public_key=settings.jwt_public_key)
    _logging()
    return run_up(settings, config)


@cli.command()
@options.common
@options.HOST
@click.option("--port", "ws_port", type=int, default=None, help="Port (default 8765).")
@options.REDIS_URL
@options.REDIS_CLUSTER
@options.QUEUE
@_gateway_options
@_exit_code
def gateway(config: str | None, **flags: Any) -> int:
    """The device-facing WebSocket server."""
    settings = _settings(config, **flags)
    _logging()
    if settings.gateway_processes > 1:
        from fleetlog.gateway.pool import run_pool

        return run_pool(settings, _redis_url(settings))
    from fleetlog.gateway.server import run_gateway

    return run_gateway(settings, _redis_url(settings))


@cli.command()
@options.common
@options.REDIS_URL
@options.REDIS_CLUSTER
@options.STORE
@options.FILES
@click.option("--batch", type=int, default=None, help="Records per batch (default 500).")
@click.option("--max-runtime", type=options.Seconds(above=True), default=None,
              help="Planned exit after S seconds.")
@click.option("--max-messages", type=int, default=None, help="Planned exit after N records.")
@click.option("--max-deliveries", type=int, default=None, help="Dead-letter after N failures.")
@click.option("--claim-idle", type=options.Seconds(above=True), default=None,
              help="Claim records idle this long on a dead worker (default 30 s).")
@options.QUEUE
@click.option("--consumer", default=None, help="Consumer name in the group (default HOST-PID).")
@options.SHARDS
@options.RETENTION
@options.RETENTION_BYTES
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus /metrics on this port (default 0: off).")
@_exit_code
def worker(config: str | None, **flags: Any) -> int:
    """Drain the queue into the store (and the daily files)."""
    from fleetlog.worker.runner import run_worker

    settings = _settings(config, **flags)
    _logging()
    return run_worker(settings, _redis_url(settings))


@cli.command()
@options.common
@click.argument("device_id")
@click.option("--since", default=None, help="1h, 30m, 2d, or an ISO 8601 time.")
@click.option("--until", default=None, help="Same forms as --since.")
@click.option("--grep", default=None,
              help="Only records containing TEXT (plain text, any case, in the record's values).")
@click.option("--level", default=None,
              help="Only this level and above: trace, debug, info, warn, error, fatal.")
@click.option("--limit", type=click.IntRange(min=1, max=MAX_LIMIT), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records.")
@options.STORE
@_exit_code
def logs(config: str | None, device_id: str, since: str | None, until: str | None,
         grep: str | None, level: str | None, limit: int, as_json: bool, follow: bool,
         **flags: Any) -> int:
    """Print a device's records, oldest first among the newest --limit.

    Exit 1 (and a line on stderr) when the store has no record of DEVICE_ID at all.
    """
    from fleetlog.reading import InvalidRequest, Reader, logs_request
    from fleetlog.view import record_json, record_text

    settings = _settings(config, **flags)
    try:
        request = logs_request(device_id, now_ms=int(time.time() * 1000), since=since,
                               until=until, q=grep, level=level, limit=limit)
    except InvalidRequest as exc:  # named as the API names it: say the flag instead
        message, field = str(exc), exc.field
        if field and message.startswith(f"{field}:"):
            message = ("--grep" if field == "q" else f"--{field}") + message[len(field):]
        _fail(message)
    out = sys.stdout.buffer

    def emit(records: list[Any]) -> None:
        for record in records:
            line = record_json(record) if as_json else record_text(record).encode()
            out.write(line + b"\n")
        out.flush()

    with Reader.open(settings.store_url) as reader:
        try:
            records, more = reader.tail(request)
            emit(records)
            if not records and not reader.has_records(device_id):
                click.echo(f"fleetlog: device {device_id!r} has no records in "
                           f"{settings.store_url}", err=True)
                if not follow:
                    return 1
            if follow:
                for record in more:
                    emit([record])
        except (KeyboardInterrupt, BrokenPipeError):
            pass
    return 0


@cli.command()
@options.common
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@options.REDIS_URL
@options.STORE
def devices(config: str | None, as_json: bool, **flags: Any) -> None:
    """Every known device (stored records, a live link, or a token): online, node,
    connected since, last seen, records."""
    from fleetlog.embedded import resolve_redis_url
    from fleetlog.queue.connection import connect
    from fleetlog.reading import Reader

    settings = _settings(config, **flags)
    with Reader.open(settings.store_url) as reader:
        try:
            redis_url: str | None = resolve_redis_url(settings.redis_url, settings.data_dir)
        except ConfigError:
            redis_url = None
            click.echo("fleetlog: no Redis found; online state unknown (shown as offline)",
                       err=True)
        client: contextlib.AbstractContextManager[redis.Redis | None] = (
            connect(redis_url, timeout=settings.redis_timeout) if redis_url else contextlib.nullcontext())
        with client as redis_client:
            rows, warning = reader.devices(redis_client)
    if warning:
        click.echo(f"fleetlog: {warning}", err=True)
    if as_json:
        sys.stdout.buffer.write(
            orjson.dumps([row.as_dict() for row in rows], option=orjson.OPT_INDENT_2) + b"\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from fleetlog.view import safe_text

    # Nothing is ever cut short ("door-controlle…" matched no grep): on a terminal a
    # long cell wraps inside its column; into a pipe each row is one line, however wide.
    table = Table()
    for name in ("device_id", "online", "node", "connected_since", "last_seen", "records"):
        table.add_column(name, overflow="fold")
    for row in rows:
        # Text cells: a device id is printed as it is, never read as rich markup.
        table.add_row(*(Text(safe_text(str(cell))) for cell in (
            row.device_id, "yes" if row.online else "no", row.node or "-",
            row.connected_since or "-", row.last_seen or "-", row.records,
        )))
    Console(width=None if sys.stdout.isatty() else 100_000).print(table)


@cli.command()
@click.option("--url", required=True, help="Gateway URL, e.g. ws://127.0.0.1:8765.")
@click.option("--devices", "device_count", type=click.IntRange(min=1), default=10,
              show_default=True)
@click.option("--messages", type=click.IntRange(min=1), default=100, show_default=True,
              help="Records per device.")
@click.option("--rate", type=options.Seconds(), default=0.0, help="Total records/s (0: as fast as acks).")
@click.option("--prefix", default="sim-", show_default=True, help="Device id prefix.")
@click.option("--pad", type=click.IntRange(min=0), default=0, help="Extra bytes per record.")
@click.option("--batch", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: legacy frames; N: v2 log frames of N records.")
@click.option("--provision", is_flag=True,
              help="Create (or rotate) a token for each simulated device; needs Redis.")
@options.common
@options.REDIS_URL
@click.option("--timeout", type=options.Seconds(), default=600.0, show_default=True,
              help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON only.")
@click.option("--acked-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write {device: records acked} as JSON here (for checks that nothing was lost).")
@_exit_code
def simulate(url: str, device_count: int, messages: int, rate: float, prefix: str, pad: int,
             batch: int, provision: bool, config: str | None, data_dir: Path | None,
             redis_url: str | None, timeout: float, as_json: bool, acked_file: Path | None) -> int:
    """Simulate a fleet of devices (load generator and reference client)."""
    import uvloop
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from fleetlog.simulate import device_ids
    from fleetlog.simulate import simulate as run_simulation

    total = device_count * messages
    tokens = None
    if provision:
        settings = _settings(config, data_dir=data_dir, redis_url=redis_url)
        tokens = _provision(_redis_url(settings), device_ids(prefix, device_count))

    async def main_async(advance: Any) -> Any:
        return await run_simulation(url, device_count, messages, rate=rate, prefix=prefix,
                                    pad=pad, batch=batch, tokens=tokens, timeout=timeout,
                                    progress=advance)

    if as_json:
        summary = uvloop.run(main_async(None))
        sys.stdout.buffer.write(orjson.dumps(summary.as_dict()) + b"\n")
    else:
        console = Console(stderr=True)
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("acked", total=total)
            summary = uvloop.run(main_async(lambda n: progress.advance(task, n)))
        for key, value in summary.as_dict().items():
            click.echo(f"{key:>20}: {value}")
        if summary.failure:
            click.echo(f"fleetlog: {summary.failure}", err=True)
    if acked_file is not None:
        acked_file.write_bytes(orjson.dumps(summary.acked_through))
    return 0 if summary.acked == total else 1


def _provision(redis_url: str, devices: list[str]) -> dict[str, str]:
    from fleetlog.credentials import Credentials
    from fleetlog.queue.connection import connect

    with connect(redis_url) as client:
        credentials = Credentials(client)
        known = {credential.device_id for credential in credentials.list()}
        return {
            device: credentials.rotate(device) if device in known else credentials.add(device)
            for device in devices
        }


@cli.group()
def device() -> None:
    """Device credentials: add, list, revoke, rotate."""


def _credentials(config: str | None, flags: dict[str, Any]) -> Any:
    from fleetlog.credentials import Credentials

    return Credentials(_redis(_settings(config, **flags)))


def _warn_unconfirmed(credentials: Any) -> None:
    """Say so when a gateway did not confirm a change (the command already made it)."""
    if credentials.unconfirmed:
        click.echo(f"fleetlog: {credentials.unconfirmed} gateway node(s) did not confirm the change "
                   "within 2 s; they apply it within half a second of reaching Redis", err=True)


@device.command("add")
@options.redis_command
@click.argument("device_id")
def device_add(config: str | None, device_id: str, **flags: Any) -> None:
    """Create DEVICE_ID's token and print it (alone, once: it is stored only as a hash).

    Returns once every live gateway accepts the token.
    """
    credentials = _credentials(config, flags)
    click.echo(credentials.add(device_id))
    _warn_unconfirmed(credentials)


@device.command("rotate")
@options.redis_command
@click.argument("device_id")
def device_rotate(config: str | None, device_id: str, **flags: Any) -> None:
    """Replace DEVICE_ID's token and print the new one; open connections are closed (4401)."""
    credentials = _credentials(config, flags)
    click.echo(credentials.rotate(device_id))
    _warn_unconfirmed(credentials)


@device.command("revoke")
@options.redis_command
@click.argument("device_id")
def device_revoke(config: str | None, device_id: str, **flags: Any) -> None:
    """Delete DEVICE_ID's token; its open connections are closed (4401) on every gateway."""
    credentials = _credentials(config, flags)
    credentials.revoke(device_id)
    click.echo(f"revoked {device_id}", err=True)
    _warn_unconfirmed(credentials)


@device.command("list")
@options.redis_command
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def device_list(config: str | None, as_json: bool, **flags: Any) -> None:
    """Every device with a token (never the token itself)."""
    rows = [
        {"device_id": c.device_id, "created_at": c.created_at, "rotated_at": c.rotated_at}
        for c in _credentials(config, flags).list()
    ]
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(rows) + b"\n")
        return
    for row in rows:
        click.echo(f"{row['device_id']}\tcreated {row['created_at']}"
                   + (f"\trotated {row['rotated_at']}" if row["rotated_at"] else ""))


@cli.command()
@options.common
@options.RETENTION
@options.RETENTION_BYTES
@options.STORE
@options.FILES
def prune(config: str | None, **flags: Any) -> None:
    """Apply retention once, now (the worker also does it in the background)."""
    from fleetlog.store import open_store
    from fleetlog.store.files import FilesSink
    from fleetlog.worker.retention import Pruner

    settings = _settings(config, **flags)
    if settings.retention is None and settings.retention_bytes is None:
        _fail("nothing to do: give --retention and/or --retention-bytes")
    store = open_store(settings.store_url)
    try:
        files = FilesSink(settings.files) if settings.files is not None else None
        pruned = Pruner(store, files, retention_ms=settings.retention_ms,
                        max_bytes=settings.retention_bytes).run_all()
    finally:
        store.close()
    click.echo(f"pruned {pruned} records")


@cli.group()
def dlq() -> None:
    """Dead letters: records the store kept rejecting."""


def _dead_letters(config: str | None, flags: dict[str, Any]) -> Any:
    from fleetlog.queue.deadletter import DeadLetters

    settings = _settings(config, **flags)
    return DeadLetters(_redis(settings), dead_letter_stream=settings.dead_letter_stream,
                       stream=settings.stream, queue=settings.queue, shards=settings.shards)


@dlq.command("list")
@options.redis_command
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(config: str | None, as_json: bool, **flags: Any) -> None:
    """Every dead letter: id, device, deliveries, when, and the error."""
    for letter in _dead_letters(config, flags).letters():
        if as_json:
            sys.stdout.buffer.write(orjson.dumps(letter.as_dict(with_record=False)) + b"\n")
        else:
            click.echo(f"{letter.id}  {letter.device_id}  deliveries={letter.deliveries}  "
                       f"{letter.failed_at}  {letter.error[:120]}")


@dlq.command("show")
@options.redis_command
@click.argument("entry_id")
def dlq_show(config: str | None, entry_id: str, **flags: Any) -> None:
    """One dead letter in full, with its record."""
    try:
        letter = _dead_letters(config, flags).show(entry_id)
    except ValueError as exc:
        _fail(str(exc))
    if letter is None:
        _fail(f"no dead letter {entry_id}")
    sys.stdout.buffer.write(orjson.dumps(letter.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")


@dlq.command("replay")
@options.redis_command
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@options.QUEUE
def dlq_replay(config: str | None, entry_ids: tuple[str, ...], replay_all: bool,
               **flags: Any) -> None:
    """Queue dead letters again (after fixing what rejected them)."""
    if not entry_ids and not replay_all:
        _fail("name dead letter ids, or --all")
    try:
        count = _dead_letters(config, flags).replay(None if replay_all else list(entry_ids))
    except ValueError as exc:
        _fail(str(exc))
    click.echo(f"replayed {count}")
    _named_but_not_found(entry_ids, count)


@dlq.command("purge")
@options.redis_command
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Delete every dead letter.")
def dlq_purge(config: str | None, entry_ids: tuple[str, ...], purge_all: bool,
              **flags: Any) -> None:
    """Delete dead letters for good."""
    if not entry_ids and not purge_all:
        _fail("name dead letter ids, or --all")
    try:
        count = _dead_letters(config, flags).purge(None if purge_all else list(entry_ids))
    except ValueError as exc:
        _fail(str(exc))
    click.echo(f"purged {count}")
    _named_but_not_found(entry_ids, count)


def _named_but_not_found(entry_ids: tuple[str, ...], done: int) -> None:
    """Exit 2 when some of the named dead letters were not there (as ``dlq show`` does)."""
    missing = len(set(entry_ids)) - done
    if entry_ids and missing > 0:
        _fail(f"{missing} of the {len(set(entry_ids))} ids named no dead letter "
              "(replayed or purged already?)")


@cli.command()
@options.common
@options.HOST
@click.option("--port", "http_port", type=int, default=None, help="Port (default 8080).")
@options.REDIS_URL
@options.STORE
@_exit_code
def api(config: str | None, **flags: Any) -> int:
    """The HTTP API: commands, device tokens, health, metrics (tokens: `api-token add`)."""
    from fleetlog.api.app import run_api

    settings = _settings(config, **flags)
    _logging()
    return run_api(settings, _redis_url(settings), settings.http_port)


@cli.group("api-token")
def api_token() -> None:
    """Operator tokens for the HTTP API: add, list, role, revoke."""


def _operator_tokens(config: str | None, flags: dict[str, Any]) -> Any:
    from fleetlog.api.auth import OperatorTokens

    return OperatorTokens(_redis(_settings(config, **flags)))


@api_token.command("add")
@options.redis_command
@click.argument("name")
@click.option("--role", type=click.Choice(["read", "admin"]), default="read", show_default=True,
              help="read: every reading route; admin: also commands and device tokens.")
def api_token_add(config: str | None, name: str, role: str, **flags: Any) -> None:
    """Create an operator token NAME and print it (alone, once: it is stored only as a hash)."""
    click.echo(_operator_tokens(config, flags).add(name, role))


@api_token.command("list")
@options.redis_command
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def api_token_list(config: str | None, as_json: bool, **flags: Any) -> None:
    """Every operator token's name, role and creation time (never the token)."""
    rows = [{"name": t.name, "role": t.role, "created_at": t.created_at}
            for t in _operator_tokens(config, flags).list()]
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(rows) + b"\n")
        return
    for row in rows:
        click.echo(f"{row['name']}\t{row['role']}\tcreated {row['created_at']}")


@api_token.command("revoke")
@options.redis_command
@click.argument("name")
def api_token_revoke(config: str | None, name: str, **flags: Any) -> None:
    """Delete the operator token NAME; requests with it are refused (401) at once."""
    _operator_tokens(config, flags).revoke(name)
    click.echo(f"revoked {name}", err=True)


@api_token.command("role")
@options.redis_command
@click.argument("name")
@click.argument("role", type=click.Choice(["read", "admin"]))
def api_token_role(config: str | None, name: str, role: str, **flags: Any) -> None:
    """Give the operator token NAME another ROLE; the live tails and exports open with it end."""
    _operator_tokens(config, flags).set_role(name, role)
    click.echo(f"{name} is now {role}", err=True)


#: sysexits' EX_USAGE: ``send``'s exit 2 means "timeout" (CONTRACT), so its usage errors differ.
EXIT_USAGE = 64


class _SendUsageError(click.UsageError):
    exit_code = EXIT_USAGE


class _SendCommand(click.Command):
    """``send``: a usage error (``--wait 99``, a missing argument) exits 64, not click's 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _SendUsageError(exc.format_message(), exc.ctx) from exc


@cli.command(cls=_SendCommand)
@options.common
@click.argument("device_id")
@click.argument("body")
@click.option("--wait", type=options.Seconds(0, 60), default=0.0, show_default=True,
              help="Seconds to wait for a v2 device's command_result (printed).")
@click.option("--api-url", default=None, help="The API (default http://HOST:HTTP_PORT).")
@click.option("--api-token", default=None, help="An admin token (or FLEETLOG_API_TOKEN).")
@click.option("--host", default=None, hidden=True)
@click.option("--http-port", type=int, default=None, hidden=True)
def send(config: str | None, device_id: str, body: str, wait: float, **flags: Any) -> None:
    """Send the command BODY (JSON) to DEVICE_ID through the API.

    Exit 0 when delivered (and, with --wait, answered), 1 offline, 2 timeout, 3 when the API
    could not be asked, 64 a usage error (--wait over 60, BODY not JSON).
    """
    from fleetlog.api.client import ApiError, send_command

    settings = _settings(config, **flags)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        click.echo(f"fleetlog: BODY is not JSON: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    url = settings.api_url or f"http://{settings.host}:{settings.http_port}"
    if not settings.api_token:
        click.echo("fleetlog: give an admin token: --api-token or FLEETLOG_API_TOKEN", err=True)
        sys.exit(3)
    try:
        outcome = send_command(url, settings.api_token, device_id, value, wait=wait)
    except ApiError as exc:
        click.echo(f"fleetlog: {exc}", err=True)
        sys.exit(3)
    sys.stdout.buffer.write(orjson.dumps(outcome) + b"\n")
    sys.exit({"delivered": 0, "offline": 1}.get(str(outcome.get("status")), 2))


@cli.command("config")
@options.common
def show_config(config: str | None, **flags: Any) -> None:
    """Print the effective configuration (flags > FLEETLOG_* > TOML > defaults), secrets masked."""
    values = _settings(config, **flags).for_display()
    for key in sorted(values):
        click.echo(f"{key} = {orjson.dumps(values[key]).decode()}")


def _alert_commands() -> None:
    """``fleetlog alert ...`` and ``fleetlog alerter`` (in ``fleetlog.alerts.cli``: click only at import)."""
    from fleetlog.alerts.cli import alert, alerter

    cli.add_command(alert)
    cli.add_command(alerter)


_alert_commands()
