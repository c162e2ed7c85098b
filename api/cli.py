"""``jobledger``: a thin shell over the functions the server uses.

Exit codes: 0 success, 1 a check failed or the work could not be done, 2 usage error. Errors
are one readable line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from api import cli_reads_args, logs
from api.settings import DEFAULT_DB, DEFAULT_MAX_BODY, DEFAULT_REPLICA_WAIT_S, Settings
from ledger import commands
from ledger.backends import backend_for, is_postgres
from ledger.clock import parse_duration, parse_us
from ledger.errors import LedgerError
from ledger.store import EventStore
from projections import PROJECTORS, new_store
from projections import keys as key_models
from projections.jobs import account_job_ids

if TYPE_CHECKING:
    from api.metrics import RebuildProgress

DESCRIPTION = (
    "jobledger: an event-sourced job ledger. Serve the HTTP API, manage API keys, rebuild "
    "read models, export and verify the audit log."
)


class CliError(Exception):
    """A failure to report as one line on stderr with exit code 1."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and usage errors on one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"jobledger: {message} (usage: {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jobledger")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


class _Version(argparse.Action):
    """``--version``: looks the version up only when asked (the lookup scans the installed
    distributions, which every other command would pay for at start)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show program's version number and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        sys.stdout.write(f"jobledger {_version()}\n")  # where argparse's own action writes it
        parser.exit()


def _db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("JOBLEDGER_DB", DEFAULT_DB),
        help="a file path, sqlite:///path or postgresql://... (env JOBLEDGER_DB)",
    )


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use 0-65535")
    return int(text)


def _rate(text: str) -> int:
    number, _, unit = text.partition("/")
    if unit not in ("", "min", "m") or not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError("use N/min, e.g. 600/min")
    return int(number)


def _secret_prefix(text: str) -> str:
    if not commands.SECRET_PREFIX.match(text):
        raise argparse.ArgumentTypeError("use 1-32 of [a-z0-9_], e.g. mk_live_")
    return text


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time(text: str) -> int:
    try:
        return parse_us(text, field="time")
    except LedgerError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError("use bytes or e.g. 10MiB, 512k") from None


def _schedule(text: str) -> tuple[float, ...]:
    from ledger.webhooks import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    from ledger.webhooks import parse_schedule

    try:
        (value,) = parse_schedule(text)
    except ValueError:
        raise argparse.ArgumentTypeError("use a duration, e.g. 10s, 5d or 0.5") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jobledger", description=DESCRIPTION)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    serve = sub.add_parser("serve", help="run the HTTP API")
    _db(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8080, help="port to listen on")
    serve.add_argument(
        "--result-retention",
        type=_duration,
        default="7d",
        help="how long results stay readable (e.g. 7d, 12h)",
    )
    serve.add_argument(
        "--rate-limit", type=_rate, default=None, help="requests per key, N/min (off if unset)"
    )
    serve.add_argument(
        "--max-body",
        type=_size,
        default=DEFAULT_MAX_BODY,
        help="largest request body, bytes or e.g. 10MiB (default 10MiB)",
    )
    serve.add_argument(
        "--enforce-credits",
        action="store_true",
        help="refuse new jobs (402) for accounts without a positive balance",
    )
    serve.add_argument(
        "--metrics-token",
        default=os.environ.get("JOBLEDGER_METRICS_TOKEN"),
        help="GET /metrics wants it as a Bearer token (env JOBLEDGER_METRICS_TOKEN); "
        "without one, only loopback clients may scrape",
    )
    serve.add_argument(
        "--webhook-allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host webhooks may reach over plain http (repeatable; loopback always may)",
    )
    serve.add_argument(
        "--webhook-retry-schedule",
        type=_schedule,
        default=None,
        metavar="DELAYS",
        help="delays before each delivery attempt (default 0,5s,5m,30m,2h,5h,10h,10h)",
    )
    serve.add_argument(
        "--webhook-disable-after",
        type=_seconds,
        default=None,
        metavar="DURATION",
        help="disable an endpoint failing for this long (default 5d)",
    )
    serve.add_argument(
        "--webhook-timeout",
        type=_seconds,
        default=None,
        metavar="DURATION",
        help="time limit of one delivery attempt (default 10s)",
    )
    serve.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="a PostgreSQL hot standby of --db that may answer reads (repeatable)",
    )
    serve.add_argument(
        "--replica-wait",
        type=_seconds,
        default=DEFAULT_REPLICA_WAIT_S,
        metavar="DURATION",
        help="how long a read waits for a standby to replay the caller's last write before "
        "the primary answers it (default 0.5s)",
    )

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=Parser)
    create = keys_sub.add_parser("create", help="create a key; prints the secret once")
    _db(create)
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument(
        "--role",
        choices=commands.ROLES,
        required=True,
        help="reader < writer < admin; choose the least the caller needs",
    )
    create.add_argument("--name", help="a label shown by keys list")
    create.add_argument("--project", help="confine the key to one project")
    create.add_argument(
        "--secret-prefix",
        type=_secret_prefix,
        default=commands.DEFAULT_SECRET_PREFIX,
        help="what the secret starts with, 1-32 of [a-z0-9_] (e.g. mk_live_ for Mindcase's SDK)",
    )
    listing = keys_sub.add_parser("list", help="list keys (never secrets)")
    _db(listing)
    listing.add_argument("--tenant", help="only this tenant's keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    _db(revoke)
    revoke.add_argument("key_id", help="the key's id, as keys list shows it")

    rb = sub.add_parser("rebuild", help="replay every event into fresh read models")
    _db(rb)
    rb.add_argument(
        "--projection", choices=sorted(PROJECTORS), help="one read model (all if unset)"
    )
    rb.add_argument(
        "--verify",
        action="store_true",
        help="compare a replay with the live read models instead of swapping",
    )
    rb.add_argument(
        "--metrics-port",
        type=int,
        help="serve the rebuild's progress at http://127.0.0.1:PORT/metrics while it runs",
    )

    export = sub.add_parser("export", help="stream the audit log")
    _db(export)
    export.add_argument("--tenant", help="one tenant's chain (every tenant if unset)")
    export.add_argument("--format", choices=("ndjson", "csv"), default="ndjson", help="line format")
    export.add_argument("--out", help="write to this file (stdout if unset)")
    export.add_argument("--since", type=_time, help="RFC 3339; events that occurred at or after")
    export.add_argument("--until", type=_time, help="RFC 3339; events that occurred before")
    export.add_argument("--job", help="one job's events")
    export.add_argument(
        "--account", help="that account's jobs (deleted ones too) and grants; needs --tenant"
    )

    imp = sub.add_parser("import", help="load an NDJSON export into an empty database")
    _db(imp)
    imp.add_argument("file", help="an NDJSON export (jobledger export, GET /v1/audit/export)")
    imp.add_argument("--tenant", help="the tenant of a one-tenant export (its lines name none)")

    verify = sub.add_parser("verify", help="recompute the hash chain")
    _db(verify)
    verify.add_argument("--tenant", help="one tenant's chain (each tenant's if unset)")
    verify.add_argument("--file", help="an NDJSON export to verify instead of the database")
    cli_reads_args.add_parsers(sub)
    return parser


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:

    from aiohttp import web

    from api import server
    from api.app import create_app
    from api.context import STORE

    settings = Settings(
        db_url=args.db,
        host=args.host,
        port=args.port,
        result_retention_s=args.result_retention,
        rate_limit=args.rate_limit,
        max_body=args.max_body,
        enforce_credits=args.enforce_credits,
        metrics_token=args.metrics_token or None,
        replicas=tuple(args.replica),
        replica_wait_s=args.replica_wait,
        **_webhook_settings(args),
    )
    if args.replica and not is_postgres(args.db):
        raise CliError(
            "--replica needs a PostgreSQL --db (postgresql://...): "
            "a SQLite database has no standbys to read from"
        )
    backend_for(args.db, replicas=settings.replicas)  # a bad URL fails here, before serving
    # bind before anything else: a busy port is one line, and no database is created
    sock = _bind(args.host, args.port)
    app = create_app(settings)

    async def announce(app: web.Application) -> None:
        async with app[STORE].backend.read() as conn:
            existing = await key_models.listing(conn)
        if not existing:
            print(
                "jobledger: no API keys yet. Create the first admin key with:\n"
                f"  {_me()} keys create --db {args.db} --tenant <your-org> --role admin",
                flush=True,
            )

    buffered = logs.configure_buffered()

    async def flush_logs(app: web.Application) -> Any:
        task = asyncio.create_task(buffered.flush_periodically())
        yield
        task.cancel()
        buffered.sync()

    app.on_startup.append(announce)
    app.cleanup_ctx.append(flush_logs)
    port = sock.getsockname()[1]
    address = (
        f"jobledger: serving on http://{args.host}:{port}\n"
        f"jobledger: dashboard at http://{args.host}:{port}/ui/ "
        f"(sign in with an API key), API reference at /docs"
    )
    try:
        server.run(
            app,
            sock=sock,
            shutdown_timeout=30.0,
            bound=lambda: print(address, flush=True),  # once bound: the line is never a lie
        )
    finally:
        sock.close()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CliError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _me() -> str:
    """How to run this command again: bare ``jobledger`` only when that is on PATH."""
    import shutil

    here = os.path.realpath(sys.argv[0])
    found = shutil.which("jobledger")
    if found is not None and os.path.realpath(found) == here:
        return "jobledger"
    relative = os.path.relpath(here)
    return relative if not relative.startswith("..") else here


def _webhook_settings(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "webhook_allow_hosts": tuple(args.webhook_allow_host) or None,
        "webhook_retry_schedule": args.webhook_retry_schedule,
        "webhook_disable_after_s": args.webhook_disable_after,
        "webhook_timeout_s": args.webhook_timeout,
    }
    return {name: value for name, value in given.items() if value is not None}


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    # on stderr: stdout carries the export or the JSON summary, often into a pipe or a file
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, 1))

        yield update


def _both(
    a: Callable[[int, int], None], b: Callable[[int, int], None]
) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        a(done, total)
        b(done, total)

    return update


async def _open(db: str, *, create: bool = False, writer: bool = True) -> EventStore:
    store = new_store(backend_for(db, create=create))
    await store.start(writer=writer)
    return store


async def cmd_keys(args: argparse.Namespace) -> int:
    store = await _open(args.db, create=args.keys_command == "create")
    try:
        if args.keys_command == "create":
            tenant = args.tenant.strip()
            if not tenant:
                raise CliError("--tenant must not be empty")
            new = await store.execute(
                lambda uow: commands.create_key(
                    uow,
                    tenant,
                    args.role,
                    name=args.name,
                    project=args.project,
                    secret_prefix=args.secret_prefix,
                ),
                tenants=[tenant],
            )
            print(
                f"created {new.key_id} for tenant {tenant} (role {args.role}); "
                "the secret is shown only this once:"
            )
            print(new.secret)
        elif args.keys_command == "list":
            async with store.backend.read() as conn:
                found = await key_models.listing(conn, args.tenant)
            if args.tenant is not None and not found:
                raise CliError(f"unknown tenant {args.tenant!r}: it has no keys")
            _print_keys(found)
        else:
            async with store.backend.read() as conn:
                found_key = await key_models.by_id(conn, args.key_id)
            if found_key is None:
                raise CliError(f"unknown key {args.key_id!r}")
            tenant, key_id = found_key.tenant, found_key.key_id
            await store.execute(
                lambda uow: commands.revoke_key(uow, tenant, key_id), tenants=[tenant]
            )
            print(f"revoked {key_id}")
    finally:
        await store.stop()
    return 0


def _print_keys(found: list[key_models.ApiKey]) -> None:
    """One aligned row per key under a header; the name last, as it may hold spaces."""
    header = ("KEY_ID", "TENANT", "ROLE", "PROJECT", "CREATED_AT", "STATE", "NAME")
    rows = [
        (
            key.key_id,
            key.tenant,
            key.role,
            key.project or "--",
            str(key.created_at),
            "revoked" if key.revoked_at else "active",
            key.name or "--",
        )
        for key in found
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print(" ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1])


async def cmd_rebuild(args: argparse.Namespace) -> int:
    from ledger.rebuild import rebuild

    store = await _open(args.db, writer=False)
    try:
        projectors = [p for p in store.projectors if args.projection in (None, p.name)]
        exporter: AbstractContextManager[RebuildProgress | None]
        if args.metrics_port is None:  # the exporter's module imports aiohttp: ~0.1 s
            exporter = nullcontext()
        else:
            from api.metrics import rebuild_exporter

            exporter = rebuild_exporter(args.metrics_port)
        with _progress("rebuilding") as bar, exporter as watched:
            progress = bar
            if watched is not None:
                progress = watched.update if bar is None else _both(bar, watched.update)
            report = await rebuild(store.backend, projectors, verify=args.verify, progress=progress)
    finally:
        await store.stop()
    if args.verify and report.difference is not None:
        print(f"DIFFERENT {report.difference}", file=sys.stderr)
    summary = {
        "events": report.events,
        "seconds": round(report.seconds, 3),
        "events_per_second": round(report.events_per_second, 1),
    }
    if args.verify:
        summary["identical"] = report.difference is None  # type: ignore[assignment]
    print(json.dumps(summary))
    return 1 if args.verify and report.difference is not None else 0


async def _known_tenant(store: EventStore, tenant: str | None) -> None:
    if tenant is not None and await store.head(tenant) is None:
        raise CliError(f"unknown tenant {tenant!r}: it has no events")


async def cmd_export(args: argparse.Namespace) -> int:
    from ledger import audit

    store = await _open(args.db, writer=False)
    try:
        await _known_tenant(store, args.tenant)
        total = await store.max_position()
        streams: frozenset[str] | None = None
        if args.account is not None:
            if args.tenant is None:
                raise CliError("--account needs --tenant: accounts belong to a tenant")
            async with store.backend.read() as conn:
                ids = await account_job_ids(conn, args.tenant, args.account)
            streams = frozenset([*ids, commands.credits_stream(args.account)])
        flt = audit.ExportFilter(
            tenant=args.tenant,
            since_us=args.since,
            until_us=args.until,
            stream=args.job,
            streams=streams,
            until_position=total,  # a consistent end: a running server may keep appending
        )
        out: BinaryIO = sys.stdout.buffer
        if args.out:
            try:
                out = await asyncio.to_thread(open, args.out, "wb")
            except OSError as exc:
                raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        try:
            if args.format == "csv":
                out.write(audit.csv_header())
            with _progress("exporting") as progress:
                async for chunk, position in audit.export_chunks(store.backend, flt, args.format):
                    out.write(chunk)
                    if progress is not None:
                        progress(position, total)
            out.flush()
        finally:
            if args.out:
                out.close()
    finally:
        await store.stop()
    return 0


async def cmd_import(args: argparse.Namespace) -> int:
    if not await asyncio.to_thread(os.path.isfile, args.file):
        raise CliError(f"cannot read {args.file}: no such file")
    from ledger.importer import import_file

    store = await _open(args.db, create=True, writer=False)
    try:
        with _progress("importing") as progress:
            report = await import_file(
                store.backend, store.projectors, args.file, tenant=args.tenant, progress=progress
            )
    finally:
        await store.stop()
    summary = {
        "events": report.events,
        "tenants": report.tenants,
        "jobs": report.jobs,
        "seconds": round(report.seconds, 3),
        "events_per_second": round(report.events_per_second, 1),
    }
    print(json.dumps(summary))
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    from ledger import audit

    if args.file:
        try:
            verdict = audit.verify_lines(audit.read_lines(args.file))
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    else:
        store = await _open(args.db, writer=False)
        try:
            await _known_tenant(store, args.tenant)
            verdict = await audit.verify_store(store.backend, args.tenant)
        finally:
            await store.stop()
    if verdict.ok:
        named = any(name for name, _, _ in verdict.chains)
        if not named and len(verdict.chains) <= 1:
            print(f"OK {verdict.count} {verdict.head}")
        else:  # one line per chain: its count and head, comparable with that tenant's audit head
            for name, count, head in verdict.chains:
                print(f"OK {count} {head} {name}".rstrip())
        return 0
    where = verdict.bad_position if verdict.bad_position is not None else "-"
    print(f"FAILED {where} {verdict.reason}")
    print(f"jobledger: chain broken at position {where}: {verdict.reason}", file=sys.stderr)
    return 1


def _runner(command: str) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    if command in cli_reads_args.COMMANDS:
        from api import cli_reads  # rich's tables and the API's schemas: only for these

        return cli_reads.COMMANDS[command]
    return {
        "keys": cmd_keys,
        "rebuild": cmd_rebuild,
        "export": cmd_export,
        "verify": cmd_verify,
        "import": cmd_import,
    }[command]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    # one-shot commands keep stderr for their one line; JOBLEDGER_LOG_LEVEL=info shows phases
    logs.configure(
        level=logging.getLevelNamesMapping().get(
            os.environ.get("JOBLEDGER_LOG_LEVEL", "warning").upper(), logging.WARNING
        )
    )
    try:
        if args.command == "serve":
            code = cmd_serve(args)
        else:
            runner = _runner(args.command)
            code = asyncio.run(runner(args))
    except CliError as exc:
        print(f"jobledger: {exc}", file=sys.stderr)
        code = 1
    except LedgerError as exc:
        print(f"jobledger: {exc.message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("jobledger: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # the last guard: one line, never a traceback
        print(f"jobledger: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
