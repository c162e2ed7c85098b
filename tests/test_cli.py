"""The ``jobledger`` command line as a real subprocess (section 2), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests import rawdb
from tests.conftest import Api, database_exists
from tests.serverproc import JOBLEDGER, Done, acli, acreate_key, cli, env, free_port, served
from tests.waits import wait_until

KEY_LINE = re.compile(
    r"^(key_[0-9A-Za-z]+) +(\S+) +(admin|writer|reader) +(\S+) +"
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) +(active|revoked) +(.+)$"
)
KEYS_HEADER = ["KEY_ID", "TENANT", "ROLE", "PROJECT", "CREATED_AT", "STATE", "NAME"]


def one_line_error(done: Done) -> str:
    """Exit 1 with one readable line on stderr and no traceback; that line."""
    assert done.code == 1, (done.code, done.out, done.err)
    lines = done.err.strip().splitlines()
    assert len(lines) == 1, done.err
    assert "Traceback" not in done.err
    assert lines[0].startswith("jobledger: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["keys"],
        ["keys", "create"],
        ["keys", "create", "--tenant", "acme"],
        ["keys", "create", "--tenant", "acme", "--role", "root"],
        ["keys", "create", "--tenant", "acme", "--role", "admin", "--secret-prefix", "MK-Live"],
        ["keys", "create", "--tenant", "acme", "--role", "admin", "--secret-prefix", ""],
        ["keys", "revoke"],
        ["export", "--format", "xml"],
        ["export", "--since", "last tuesday"],
        ["rebuild", "--projection", "nope"],
        ["serve", "--port", "http"],
        ["serve", "--port", "99999"],
        ["serve", "--rate-limit", "fast"],
        ["verify", "--nope"],
    ],
)
async def test_usage_errors_exit_2(argv: list[str], missing_db_url: str) -> None:
    """A malformed command line exits 2 with one line pointing at the help; no traceback."""
    done = await acli(*argv, *(["--db", missing_db_url] if len(argv) > 1 else []))
    assert done.code == 2, (done.out, done.err)
    assert len(done.err.strip().splitlines()) == 1, done.err
    assert done.err.startswith("jobledger: ") and "--help" in done.err
    assert "Traceback" not in done.err and "OverflowError" not in done.err
    assert not await database_exists(missing_db_url)


async def test_help_shows_defaults_and_version() -> None:
    """``--help`` shows each flag's default; ``--version`` prints the installed version."""
    serve = await acli("serve", "--help")
    assert serve.code == 0
    text = " ".join(serve.out.split())
    for shown in ("(default: 127.0.0.1)", "(default: 8080)", "(default: 7d)", "10MiB"):
        assert shown in text, serve.out
    assert "``" not in (await acli("--help")).out  # no RST markup in the description
    create = await acli("keys", "create", "--help")
    usage = " ".join(create.out.split())
    assert "--tenant TENANT --role {" in usage and "[--role" not in usage  # required, no default
    done = await acli("--version")
    assert done.code == 0 and re.fullmatch(r"jobledger \d+\.\d+\.\d+\S*\n", done.out), done.out


def test_the_command_starts_without_what_only_some_commands_use() -> None:
    """Starting ``jobledger`` imports no aiohttp, no rich (structlog's pretty tracebacks
    included), no tables of the read commands, no importer, rebuild or audit log: each command
    imports what it runs (a few hundred CLI processes per test run pay for the rest)."""
    unused = (
        "aiohttp",
        "rich",
        "api.cli_reads",
        "api.schemas",
        "ledger.audit",
        "ledger.importer",
        "ledger.rebuild",
        "importlib.metadata",
    )
    probe = (
        "import sys; from api.cli import build_parser; build_parser(); "
        f"print(' '.join(m for m in {unused!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


async def test_rebuild_without_a_metrics_port_imports_no_web_code(tmp_path: Path) -> None:
    """``jobledger rebuild`` imports its metrics exporter (and aiohttp) only for
    ``--metrics-port``: an operator's rebuild starts without the web stack."""
    db = tmp_path / "ledger.db"
    await acreate_key(str(db), "acme", "admin")  # a ledger with an event to replay
    probe = (
        "import sys; from api.cli import main\n"
        "try:\n"
        f"    main(['rebuild', '--db', {str(db)!r}])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print(' '.join(m for m in ('aiohttp', 'api.metrics') if m in sys.modules))"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == []  # the summary's line, then the probe's


async def test_serve_on_a_busy_port_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    """``serve`` on a port in use exits 1 with one line, before it creates a database."""
    db = tmp_path / "ledger.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = await acli("serve", "--db", str(db), "--port", str(port), seconds=30)
    line = one_line_error(done)
    assert f"127.0.0.1:{port}" in line
    assert done.out == ""  # no "no API keys yet" hint for a server that never ran
    assert not db.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["verify"],
        ["verify", "--tenant", "acme"],
        ["export"],
        ["rebuild"],
        ["rebuild", "--verify"],
        ["keys", "list"],
        ["keys", "revoke", "key_0"],
    ],
)
async def test_missing_database_is_one_line(argv: list[str], missing_db_url: str) -> None:
    """A command on a database that does not exist exits 1 with one line and creates nothing."""
    line = one_line_error(await acli(*argv, "--db", missing_db_url))
    assert missing_db_url.rsplit("/", 1)[1] in line
    assert not await database_exists(missing_db_url)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://localhost/x",
        "/no/such/dir/ledger.db",
        "sqlite:////no/such/dir/x.db",
        "postgresql://postgres@127.0.0.1:notaport/x",
        "postgresql://postgres@127.0.0.1:{closed}/x",  # a free port: nothing listens there
    ],
)
async def test_bad_database_urls_are_one_line(url: str) -> None:
    """An unsupported or malformed URL, a missing directory, a closed port: one line, exit 1."""
    url = url.replace("{closed}", str(free_port()))
    one_line_error(await acli("keys", "create", "--db", url, "--tenant", "acme", "--role", "admin"))
    one_line_error(await acli("verify", "--db", url))


async def test_a_database_that_is_not_a_ledger_is_one_line(
    backend_name: str, db_url: str, tmp_path: Path
) -> None:
    """``--db`` at a file that is not SQLite, or a database with foreign tables, is one line."""
    if backend_name == "sqlite":
        (tmp_path / "junk.db").write_bytes(b"this is not a database\n" * 100)
        db = str(tmp_path / "junk.db")
    else:
        db = db_url
        await rawdb.tamper(
            db,
            ("CREATE TABLE events (id integer, name text)", ()),
            ("CREATE TABLE api_keys (id integer)", ()),
        )
    for argv in (["verify"], ["keys", "list"], ["export"], ["rebuild"]):
        one_line_error(await acli(*argv, "--db", db))


async def test_unknown_tenant_and_key_are_one_line(db_url: str, tmp_path: Path) -> None:
    """An unknown tenant or key id exits 1 with one line naming it."""
    db = db_url
    await acreate_key(db, "acme")
    for argv in (
        ["export", "--tenant", "nobody"],
        ["verify", "--tenant", "nobody"],
        ["keys", "list", "--tenant", "nobody"],
    ):
        assert "nobody" in one_line_error(await acli(*argv, "--db", db))
    assert "key_nope" in one_line_error(await acli("keys", "revoke", "key_nope", "--db", db))
    missing = str(tmp_path / "none.ndjson")
    assert "none.ndjson" in one_line_error(await acli("verify", "--file", missing))


async def test_keys_create_prints_the_secret_last(db_url: str) -> None:
    """``keys create`` prints the secret alone on the last line; the ledger keeps only its hash."""
    db = db_url
    done = await acli(
        "keys",
        "create",
        "--db",
        db,
        "--tenant",
        "acme",
        "--role",
        "writer",
        "--name",
        "ci",
        "--project",
        "p1",
    )
    assert done.code == 0, done.err
    secret = done.last_line
    assert secret == secret.strip() and " " not in secret and len(secret) >= 32
    assert secret not in "\n".join(done.out.splitlines()[:-1])
    assert secret.encode() not in await rawdb.stored_bytes(db)
    second = await acli("keys", "create", "--db", db, "--tenant", "acme", "--role", "reader")
    assert second.last_line != secret


async def test_keys_create_with_a_secret_prefix(db_url: str, tmp_path: Path) -> None:
    """``--secret-prefix`` starts the secret as a customer's SDK expects; only the hash is kept."""
    db = db_url
    done = await acli(
        "keys",
        "create",
        "--db",
        db,
        "--tenant",
        "acme",
        "--role",
        "writer",
        "--secret-prefix",
        "mk_live_",
    )
    assert done.code == 0, done.err
    secret = done.last_line
    assert secret.startswith("mk_live_") and len(secret) > 40
    assert secret.encode() not in await rawdb.stored_bytes(db)
    async with served(db, log_dir=tmp_path) as server, aiohttp.ClientSession(server.base) as http:
        headers = {"Authorization": f"Bearer {secret}"}
        async with http.get("/v1/jobs", headers=headers) as resp:
            assert resp.status == 200


async def test_keys_list_format(db_url: str) -> None:
    """``keys list`` prints a header, then ``KEY_ID TENANT ROLE PROJECT CREATED_AT STATE NAME``."""
    db = db_url
    named = await acli(
        "keys", "create", "--db", db, "--tenant", "acme", "--role", "admin", "--name", "ci bot"
    )
    assert named.code == 0, named.err
    keys = [
        await acreate_key(db, "acme"),
        await acreate_key(db, "acme", "writer", "p1"),
        await acreate_key(db, "globex", "reader"),
    ]
    admin, writer, reader = (k.key_id for k in keys)
    revoked = await acli("keys", "revoke", writer, "--db", db)
    assert revoked.code == 0, revoked.err
    again = await acli("keys", "revoke", writer, "--db", db)
    one_line_error(again)

    listing = await acli("keys", "list", "--db", db)
    assert listing.code == 0
    header, *lines = listing.out.splitlines()
    assert header.split() == KEYS_HEADER
    rows = [KEY_LINE.match(line) for line in lines]
    assert all(rows), listing.out
    names = {m.group(7) for m in rows if m}
    assert names == {"ci bot", "--"}
    found = {m.group(1): (*m.groups()[1:4], m.group(6)) for m in rows if m and m.group(7) == "--"}
    assert found == {
        admin: ("acme", "admin", "--", "active"),
        writer: ("acme", "writer", "p1", "revoked"),
        reader: ("globex", "reader", "--", "active"),
    }
    for secret in (k.secret for k in keys):
        assert secret not in listing.out
    acme = await acli("keys", "list", "--db", db, "--tenant", "acme")
    assert len(acme.out.splitlines()) == 4  # the header and acme's three keys


async def answers(session: aiohttp.ClientSession, secret: str, status: int) -> bool:
    """Whether a running server answers ``GET /v1/jobs`` for this key with ``status``."""
    async with session.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"}) as resp:
        await resp.read()
        return resp.status == status


async def test_cli_revocation_reaches_a_running_server(db_url: str) -> None:
    """Keys made and revoked with the CLI take effect in a running server (401 once revoked)."""
    db = db_url
    old = await acreate_key(db, "acme", "reader")
    async with served(db) as server, aiohttp.ClientSession(base_url=server.base) as session:
        reader = Api(session, old.secret)  # type: ignore[arg-type]
        assert (await reader.get("/v1/jobs"))["jobs"] == []
        new = await acreate_key(db, "acme", "writer")
        writer = Api(session, new.secret)  # type: ignore[arg-type]

        await wait_until(lambda: answers(session, new.secret, 200), what="the new key works")
        await writer.post("/v1/jobs", {"agent": "a"})
        done = await acli("keys", "revoke", old.key_id, "--db", db)
        assert done.code == 0, done.err
        await wait_until(lambda: answers(session, old.secret, 401), what="the key is refused")
        body = await reader.get("/v1/jobs", status=401)
        assert body["error"]["code"] == "unauthorized"
        assert len((await writer.get("/v1/jobs"))["jobs"]) == 1


async def test_export_progress_stays_off_stdout(db_url: str, tmp_path: Path) -> None:
    """``export`` to stdout is pure NDJSON; ``--out`` writes the file and nothing to stdout."""
    db = db_url
    await acreate_key(db, "acme")
    await acreate_key(db, "globex")
    done = await acli("export", "--db", db)
    assert done.code == 0 and len(done.out.splitlines()) == 2
    assert all(line.startswith('{"position":') for line in done.out.splitlines())
    out = tmp_path / "acme.csv"
    to_file = await acli(
        "export", "--db", db, "--tenant", "acme", "--format", "csv", "--out", str(out)
    )
    assert to_file.code == 0 and to_file.out == ""
    assert out.read_text().splitlines()[0].startswith("position,event_id,stream,")
    assert len(out.read_text().splitlines()) == 2


def _with_terminal_stderr(*args: str) -> tuple[int, bytes, bytes]:
    """Run ``jobledger ARGS`` with stderr on a pseudo-terminal; code, stdout, terminal bytes."""
    master, slave = pty.openpty()
    with subprocess.Popen(
        [JOBLEDGER, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env(),
    ) as proc:
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, out, seen


async def test_progress_goes_to_the_terminal_not_stdout(db_url: str) -> None:
    """On a terminal the progress bar draws on stderr; stdout stays the export or the summary."""
    db = db_url
    await acreate_key(db, "acme")
    await acreate_key(db, "acme")
    code, out, terminal = await asyncio.to_thread(_with_terminal_stderr, "export", "--db", db)
    assert code == 0 and b"exporting" in terminal
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all(line.startswith('{"position":') for line in lines)
    code, out, terminal = await asyncio.to_thread(_with_terminal_stderr, "rebuild", "--db", db)
    assert code == 0 and b"rebuilding" in terminal
    assert list(json.loads(out)) == ["events", "seconds", "events_per_second"]


async def test_export_account_holds_that_accounts_jobs_and_grants(db_url: str, api: Api) -> None:
    """``export --account`` writes that account's jobs (deleted ones too) and its grants only."""
    await api.post("/v1/jobs", {"id": "mine", "agent": "a", "account": "a1"})
    await api.post("/v1/jobs", {"id": "gone", "agent": "a", "account": "a1"})
    await api.delete("/v1/jobs/gone")
    await api.post("/v1/jobs", {"id": "theirs", "agent": "a", "account": "a2"})
    await api.post("/v1/credits/grants", {"account": "a1", "amount": 5})
    await api.post("/v1/credits/grants", {"account": "a2", "amount": 7})
    done = await acli("export", "--db", db_url, "--tenant", "acme", "--account", "a1")
    assert done.code == 0, done.err
    streams = {json.loads(line)["stream"] for line in done.out.splitlines()}
    assert streams == {"mine", "gone", "$credits/a1"}
    http = await api.get("/v1/audit/export", params={"account": "a1"})
    assert [json.loads(line) for line in http.splitlines()] == [
        json.loads(line) for line in done.out.splitlines()
    ]
    one_line_error(await acli("export", "--db", db_url, "--account", "a1"))


async def test_the_suites_forked_commands_behave_as_started_ones(tmp_path: Path) -> None:
    """The suite forks ``jobledger`` from a warm interpreter (``tests/zygote.py``): a forked
    command must answer what the real executable answers (output and exit code), read its own
    environment and working directory, and die of its own signals."""
    for args in (["--version"], ["bogus"], ["verify", "--db", str(tmp_path / "none.db")]):
        forked = await acli(*args)
        real = await asyncio.to_thread(
            subprocess.run, [JOBLEDGER, *args], capture_output=True, text=True, env=env()
        )
        assert (forked.code, forked.out, forked.err) == (real.returncode, real.stdout, real.stderr)
    db = tmp_path / "ledger.db"
    made = await acreate_key(str(db), "acme")
    listed = cli("keys", "list", extra_env={"JOBLEDGER_DB": str(db)})  # --db from the environment
    assert listed.code == 0 and made.key_id in listed.out, listed.err
    async with served(str(db)) as server:
        assert server.kill() == -signal.SIGKILL  # its exit code, as the process's parent sees it
