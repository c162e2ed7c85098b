"""Fixtures: the real app over a real database, SQLite always and PostgreSQL when configured.

Every test that takes ``db_url`` (directly or through ``app``/``api``) runs once on a SQLite
file in ``tmp_path`` and once on a fresh PostgreSQL database of its own, created and dropped
around the test, whenever ``JOBLEDGER_TEST_POSTGRES`` names a server.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import json as json_module
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app, open_store
from api.context import STORE
from api.settings import Settings
from ledger import commands
from ledger.backends import backend_for
from ledger.backends.postgres import SCHEMA_DIGEST, PostgresBackend
from ledger.schema import LEDGER_SCHEMA
from ledger.sql import Backend
from ledger.store import EventStore
from projections import all_projectors, new_store
from tests import serverproc
from tests.openapi_check import Checker, checker
from tests.serverproc import Key

if TYPE_CHECKING:
    from tests.history import Templates

PG_ENV = "JOBLEDGER_TEST_POSTGRES"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ledger", "projections", "api", "tests")


def pytest_configure(config: pytest.Config) -> None:
    """Let Python cache bytecode, for this run and every process it starts.

    With ``PYTHONDONTWRITEBYTECODE`` set, each of the suite's hundreds of ``jobledger``
    processes compiles the whole package from source again: a quarter of its start-up CPU.
    The main process compiles the package once (``__pycache__`` is gitignored); the workers
    and every subprocess inherit the environment without the variable.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    if "PYTEST_XDIST_WORKER" not in os.environ:
        for package in PACKAGES:
            compileall.compile_dir(ROOT / package, quiet=2, workers=1)
    # ``jobledger`` processes fork from a warm interpreter (no 0.2-0.45 s of imports each),
    # unless JOBLEDGER_TEST_EXEC=1 asks for every process to be started from scratch
    if os.environ.get("JOBLEDGER_TEST_EXEC") != "1":
        serverproc.fork_from_zygote()


def pg_server_url() -> str | None:
    return os.environ.get(PG_ENV) or None


async def create_pg_database(template: str | None = None) -> str:
    """A new database on the test server, empty or a copy of ``template`` (a URL); its URL."""
    import asyncpg

    base = pg_server_url()
    assert base is not None
    name = f"jl_test_{uuid.uuid4().hex[:12]}"
    copy = "" if template is None else f' TEMPLATE "{template.rsplit("/", 1)[1]}"'
    conn = await asyncpg.connect(_with_db(base, "postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()
    return _with_db(base, name)


async def drop_pg_database(url: str) -> None:
    import asyncpg

    base = pg_server_url()
    assert base is not None
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(_with_db(base, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# The catalog of everything outside the system schemas: relations, columns with their types
# and defaults, indexes, constraints, functions, triggers, schemas. Equal fingerprints: the
# same schema.
_FINGERPRINT = r"""
SELECT md5(coalesce(string_agg(x, E'\n' ORDER BY x), '')) FROM (
  SELECT 'nsp ' || nspname FROM pg_namespace
   WHERE nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema'
  UNION ALL
  SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text || ' '
         || c.relpersistence::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
  UNION ALL
  SELECT 'col ' || a.attrelid::regclass || '.' || a.attname || ' '
         || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull::text || ' '
         || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
     AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'idx ' || pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
  UNION ALL
  SELECT 'con ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace::regnamespace::text NOT LIKE 'pg\_%'
     AND connamespace::regnamespace::text <> 'information_schema'
  UNION ALL
  SELECT 'fn ' || p.oid::regprocedure || ' ' || md5(p.prosrc)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
  UNION ALL
  SELECT 'trg ' || tgrelid::regclass || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
) AS catalog(x)
"""
_LARGE_TABLE = 1 << 20  # bytes
_OTHERS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
_SCHEMAS = (
    "SELECT nspname FROM pg_namespace"
    " WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
)


class PgDatabases:
    """This worker's PostgreSQL databases, handed from one test to the next.

    ``CREATE DATABASE`` copies ``template1`` through the WAL (7.5 MB): 0.15-0.3 s on an idle
    machine, 1-2.5 s while four workers create theirs at once (the WAL's fsyncs, and the
    checkpoints that 2.5 GB of it forces over a run). A database the last test is done with is
    made new instead: every connection to it ended, then

    - empty: every schema dropped and ``public`` made again (~25 ms);
    - holding the schema (``schema=True``, for tests whose app would create it anyway): when
      its catalog is exactly the one the first store start made (``_FINGERPRINT``), every
      table emptied but for the schema's digest and every sequence restarted (~25 ms), as a
      new database whose store started once would be; otherwise emptied and the schema made
      again (~120 ms).

    A database that cannot be made new is dropped and another created. What is left is
    dropped at the end of the run.
    """

    def __init__(self) -> None:
        self.free: list[str] = []
        self.schema_fingerprint: str | None = None  # the catalog a first store start makes
        self._digest: str | None = None  # and the schema digest it records

    async def take(self, *, schema: bool) -> str:
        url = self.free.pop() if self.free else await create_pg_database()
        try:
            await self._renew(url, schema)
        except Exception:
            await drop_pg_database(url)
            url = await create_pg_database()
            await self._renew(url, schema)
        return url

    def give_back(self, url: str) -> None:
        self.free.append(url)

    async def _renew(self, url: str, schema: bool) -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(_OTHERS)
            if schema and await conn.fetchval(_FINGERPRINT) == self.schema_fingerprint:
                relations = await conn.fetch(
                    "SELECT c.oid::regclass::text, c.relkind::text, pg_relation_size(c.oid)"
                    " FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
                    " AND c.relkind IN ('r', 'S')"
                )
                # DELETE for the small tables (~1 ms for all; TRUNCATE makes new files, ~75 ms),
                # TRUNCATE for a large one, whose dead rows would slow the next test's scans
                statements = [
                    f"TRUNCATE {name}" if size > _LARGE_TABLE else f"DELETE FROM {name}"
                    for name, kind, size in relations
                    if kind == "r"
                ]
                statements += [
                    f"ALTER SEQUENCE {name} RESTART" for name, kind, _ in relations if kind == "S"
                ]
                async with conn.transaction():
                    await conn.execute("; ".join(statements))
                    await conn.execute(
                        "INSERT INTO ledger_meta (name, value) VALUES ($1, $2)",
                        SCHEMA_DIGEST,
                        self._digest,
                    )
                return
            for (name,) in await conn.fetch(_SCHEMAS):
                await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
            await conn.execute("CREATE SCHEMA public")
        finally:
            await conn.close()
        if schema:
            await _first_start(url)
            conn = await asyncpg.connect(url)
            try:
                fingerprint = await conn.fetchval(_FINGERPRINT)
                self._digest = await conn.fetchval(
                    "SELECT value FROM ledger_meta WHERE name = $1", SCHEMA_DIGEST
                )
            finally:
                await conn.close()
            self.schema_fingerprint = fingerprint

    def drop_all(self) -> None:
        async def drop() -> None:
            for url in self.free:
                await drop_pg_database(url)

        asyncio.run(drop())
        self.free.clear()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    """This worker's reused PostgreSQL databases (``PgDatabases``), dropped at the end."""
    databases = PgDatabases()
    try:
        yield databases
    finally:
        databases.drop_all()


@pytest.fixture
async def pg_url(pg_databases: PgDatabases) -> AsyncIterator[str]:
    """An empty PostgreSQL database of its own for the test (PostgreSQL-only tests)."""
    if pg_server_url() is None:
        pytest.skip("JOBLEDGER_TEST_POSTGRES is not set: no PostgreSQL server")
    url = await pg_databases.take(schema=False)
    try:
        yield url
    finally:
        pg_databases.give_back(url)


def all_statements() -> list[str]:
    """The whole schema: the ledger's tables and every projector's, with their indexes."""
    statements = list(LEDGER_SCHEMA)
    for projector in all_projectors():
        statements.extend(projector.ddl())
        statements.extend(projector.indexes())
    return statements


@contextlib.asynccontextmanager
async def schema_backend(url: str) -> AsyncIterator[Backend]:
    """An open backend over ``url`` with the whole schema, closed at the end."""
    made = backend_for(url)
    await made.open()
    try:
        await made.ensure_schema(all_statements())
        yield made
    finally:
        await made.close()


@pytest.fixture
async def pg_backend(pg_url: str) -> AsyncIterator[PostgresBackend]:
    """An open PostgreSQL backend over a fresh database, with the whole schema."""
    async with schema_backend(pg_url) as made:
        assert isinstance(made, PostgresBackend)
        yield made


def _with_db(url: str, name: str) -> str:
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{name}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per reason why tests were skipped (e.g. no PostgreSQL), however many."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"skipped {count}: {reason}")


async def pg_database_exists(url: str) -> bool:
    """Whether the database that ``url`` names exists on the test server."""
    import asyncpg

    base = pg_server_url()
    assert base is not None
    conn = await asyncpg.connect(_with_db(base, "postgres"))
    try:
        name = url.rsplit("/", 1)[1]
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_name(request: pytest.FixtureRequest) -> str:
    """``sqlite`` always, ``postgres`` when ``JOBLEDGER_TEST_POSTGRES`` names a server."""
    if request.param == "postgres" and pg_server_url() is None:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against")
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def rich_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    """This worker's rich histories (``tests/history.py``), dropped at the end of the run."""
    from tests.history import Templates

    templates = Templates(tmp_path_factory.mktemp("rich-history"))
    try:
        yield templates
    finally:
        templates.drop()


class SchemaTemplates:
    """This worker's SQLite file holding just the schema, made on first use by a store's first
    start (what the server does on a new database). On PostgreSQL, ``PgDatabases`` keeps it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sqlite: str | None = None

    async def copy_into(self, path: str) -> None:
        """Make the SQLite file ``path`` (not there yet) a copy of the schema's file."""
        if self.sqlite is None:
            built = str(self.directory / "schema.db")
            await _first_start(built)
            # the store's close checkpointed and removed the WAL: the file is the whole database
            left = await asyncio.to_thread(os.path.exists, built + "-wal")
            assert not left, f"{built}: the store's close left its WAL"
            self.sqlite = built
        await asyncio.to_thread(shutil.copyfile, self.sqlite, path)


async def _first_start(url: str) -> None:
    store = open_store(url)  # the server's store, which creates the schema on a new database
    await store.start()
    await store.stop()


@pytest.fixture(scope="session")
def schema_templates(tmp_path_factory: pytest.TempPathFactory) -> SchemaTemplates:
    """This worker's schema-only SQLite file."""
    return SchemaTemplates(tmp_path_factory.mktemp("schema"))


@pytest.fixture
async def db_url(
    backend_name: str, tmp_path: Any, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A new database of the test's own: a SQLite file or a PostgreSQL database.

    Empty; for a test marked ``rich_history`` a copy of ``build_rich_history``'s history; for
    a test that takes ``app`` (whose server creates the schema before the test begins anyway)
    a copy of a database holding just the schema, which costs less than creating it.
    """
    templates: Templates | SchemaTemplates | None = None
    if request.node.get_closest_marker("rich_history") is not None:
        templates = request.getfixturevalue("rich_templates")
    elif "app" in request.fixturenames:
        templates = request.getfixturevalue("schema_templates")
    if backend_name == "sqlite":
        path = str(tmp_path / "ledger.db")
        if templates is not None:
            await templates.copy_into(path)
        yield path
        return
    if isinstance(templates, SchemaTemplates) or templates is None:  # a reused database
        databases: PgDatabases = request.getfixturevalue("pg_databases")
        url = await databases.take(schema=templates is not None)
        try:
            yield url
        finally:
            databases.give_back(url)
        return
    url = await create_pg_database(await templates.postgres())
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture
def missing_db_url(backend_name: str, tmp_path: Any) -> str:
    """A database URL naming nothing that exists (``database_exists`` stays false)."""
    if backend_name == "sqlite":
        return str(tmp_path / "missing.db")
    base = pg_server_url()
    assert base is not None
    return _with_db(base, f"jl_missing_{uuid.uuid4().hex[:12]}")


async def database_exists(url: str) -> bool:
    """Whether the SQLite file or the PostgreSQL database that ``url`` names exists."""
    if url.startswith(("postgresql://", "postgres://")):
        return await pg_database_exists(url)
    return await asyncio.to_thread(os.path.exists, url.removeprefix("sqlite://"))


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(db_url=db_url)


@pytest.fixture
def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(
    app: web.Application,
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
) -> TestClient[Any, Any]:
    # ``app`` (hence the database) is set up first, so it is torn down last: the app stops
    # before its PostgreSQL database is dropped
    return await aiohttp_client(app)


@pytest.fixture
def store(client: TestClient[Any, Any], app: web.Application) -> EventStore:
    return app[STORE]


def requests_started(client: TestClient[Any, Any]) -> int:
    """How many requests the in-process server has begun handling so far."""
    runner = client.server.runner
    assert runner is not None and runner.server is not None
    return runner.server.requests_count


class Api:
    """A thin JSON client for one key; each call checks the status it expects.

    Every answer is also validated against the OpenAPI document the server serves
    (``tests/openapi_check.py``), so an answer that drifts from the document fails its test.
    An in-process app serves the document of the code this process runs (``api.openapi.build``
    reads nothing else), so it is fetched from the first in-process app only and shared by
    every later one: building it costs the server about 20 ms of CPU. A real server's is
    fetched by each ``Api`` over it.
    """

    served: ClassVar[Checker | None] = None
    """The checker of the document every in-process app serves, once one has been fetched."""

    def __init__(
        self, client: TestClient[Any, Any], secret: str | None, project: str | None = None
    ) -> None:
        self.client = client
        self.headers: dict[str, str] = {}
        if secret is not None:
            self.headers["Authorization"] = f"Bearer {secret}"
        if project is not None:
            self.headers["X-Project-Id"] = project
        self.checker: Checker | None = None

    async def _checker(self) -> Checker:
        if self.checker is None:
            in_process = isinstance(self.client, TestClient)
            if in_process and Api.served is not None:
                self.checker = Api.served
                return self.checker
            async with self.client.get("/v1/openapi.json") as resp:
                assert resp.status == 200
                raw = await resp.read()
            self.checker = checker(raw, json_module.loads(raw))
            if in_process:
                Api.served = self.checker
        return self.checker

    async def call(
        self,
        method: str,
        path: str,
        *,
        status: int | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | str | None = None,
    ) -> Any:
        merged = {**self.headers, **(headers or {})}
        async with self.client.request(
            method, path, json=json, params=params, headers=merged, data=data
        ) as resp:
            body = await resp.read()
            if status is not None:
                assert resp.status == status, f"{method} {path}: {resp.status} {body[:500]!r}"
            (await self._checker()).check(
                method,
                resp.url.raw_path,
                dict(resp.url.query),
                resp.status,
                dict(resp.headers),
                body,
            )
            if resp.content_type == "application/json":
                return json_module.loads(body)
            return body.decode()

    async def get(self, path: str, status: int = 200, **kw: Any) -> Any:
        return await self.call("GET", path, status=status, **kw)

    async def post(self, path: str, json: Any = None, status: int = 201, **kw: Any) -> Any:
        return await self.call("POST", path, status=status, json=json, **kw)

    async def delete(self, path: str, status: int = 200, **kw: Any) -> Any:
        return await self.call("DELETE", path, status=status, **kw)


async def assert_feed_hides(
    client: TestClient[Any, Any], who: Api, types: Sequence[str], markers: Sequence[bytes]
) -> None:
    """``who`` (a key whose tenant's only job event is one ``job.queued``) sees that event and
    none of ``types`` in the paged feed (also when asking for them), and none of ``markers``
    in the stream up to that event."""
    events = (await who.get("/v1/events"))["events"]
    assert [e["type"] for e in events] == ["job.queued"]
    asked = await who.get("/v1/events", params={"types": ",".join(sorted(types))})
    assert asked["events"] == []
    async with client.get("/v1/events/stream", headers=who.headers) as resp:
        received = b""
        async with asyncio.timeout(30):
            while b"job.queued" not in received:
                received += await resp.content.readany()
    for marker in markers:
        assert marker not in received, marker


async def new_key(
    store: EventStore, tenant: str, role: str = "admin", project: str | None = None
) -> str:
    """A fresh API key's secret, made the way ``jobledger keys create`` makes it."""
    made = await store.execute(
        lambda uow: commands.create_key(uow, tenant, role, project=project), tenants=[tenant]
    )
    return made.secret


async def store_key(db: str, tenant: str, role: str = "admin", project: str | None = None) -> Key:
    """A new key of ``db`` made in this process exactly as ``jobledger keys create`` makes it
    (the schema too, on a new database), for a test that needs a key beside its servers rather
    than a test of the CLI: 0.015 s of CPU instead of a process start's 0.25 s. Tests of the
    CLI itself use ``serverproc.create_key``."""
    made_in = new_store(backend_for(db, create=True))
    await made_in.start()
    try:
        made = await made_in.execute(
            lambda uow: commands.create_key(uow, tenant, role, project=project), tenants=[tenant]
        )
    finally:
        await made_in.stop()
    return Key(key_id=made.key_id, secret=made.secret)


@pytest.fixture
def make_api(
    client: TestClient[Any, Any], store: EventStore
) -> Callable[..., Coroutine[Any, Any, Api]]:
    async def make(
        tenant: str = "acme",
        role: str = "admin",
        project: str | None = None,
        header_project: str | None = None,
    ) -> Api:
        return Api(client, await new_key(store, tenant, role, project), header_project)

    return make


@pytest.fixture
async def api(make_api: Callable[..., Coroutine[Any, Any, Api]]) -> Api:
    """An admin of tenant ``acme``."""
    return await make_api()
