"""Bare aiohttp + sqlite3 server: the least a durable event store over HTTP can do here.

``POST /v1/jobs/{id}/events`` decodes the JSON body, and one writer commits every body that
waits in one transaction (group commit: WAL, ``synchronous=FULL``, as the ledger) into an
events table with a position and a ``(stream, version)`` key, before answering each with 201.
``GET /v1/jobs/{id}`` reads one row of ``--read-db``'s ``jobs`` read model by its primary key
on the loop's thread and answers its stored state.

No authentication, no validation, no hashes, no read models kept, no idempotency, no logs, no
metrics: whatever a real ledger does costs at least this much more. The benchmark runs it with
the same load as the ledger and reports its ratio against the echo server, to show how far
below echo the ceiling of a durable append and of a database read is on the machine itself.

Run: ``python bench/baselines/floor_server.py --port 8082 --append-db /tmp/floor.db
--read-db ledger.db``
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from typing import Any

import msgspec
from aiohttp import web

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_NOT_FOUND = b'{"error":{"code":"not_found"}}'
_EVENTS_DDL = """CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    UNIQUE (stream, version)
)"""
_INSERT = "INSERT INTO events (stream, version, type, data) VALUES (?, ?, ?, ?)"
Waiting = tuple[str, Any, "asyncio.Future[int]"]


class Appender:
    """Group commit: whatever waits when the last commit ends goes into the next one."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(_EVENTS_DDL)
        self.versions: dict[str, int] = {}
        self.waiting: list[Waiting] = []
        self.wake = asyncio.Event()

    def _commit(self, rows: list[tuple[str, int, str, str]]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany(_INSERT, rows)
        self.conn.execute("COMMIT")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            rows = []
            for stream, body, _ in batch:
                version = self.versions.get(stream, 0) + 1
                self.versions[stream] = version
                rows.append((stream, version, str(body["type"]), _encoder.encode(body).decode()))
            try:
                await loop.run_in_executor(None, self._commit, rows)
            except Exception as exc:
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, _, future), row in zip(batch, rows, strict=True):
                future.set_result(row[1])

    async def append(self, request: web.Request) -> web.Response:
        try:
            body = _decoder.decode(await request.read())
        except msgspec.DecodeError:
            return web.Response(status=400, body=b'{"error":{}}', content_type="application/json")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append((request.match_info["id"], body, future))
        self.wake.set()
        version = await future
        return web.Response(
            status=201, body=_encoder.encode({"version": version}), content_type="application/json"
        )


def make_app(append_db: str, read_db: str | None) -> web.Application:
    app = web.Application()
    if read_db is not None:
        reader = sqlite3.connect(f"file:{read_db}?mode=ro", uri=True, check_same_thread=False)
        tenant = reader.execute("SELECT tenant FROM jobs LIMIT 1").fetchone()
        tenant = tenant[0] if tenant else ""

        async def get_job(request: web.Request) -> web.Response:
            row = reader.execute(
                "SELECT state FROM jobs WHERE tenant = ? AND id = ?",
                (tenant, request.match_info["id"]),
            ).fetchone()
            if row is None:
                return web.Response(status=404, body=_NOT_FOUND, content_type="application/json")
            return web.Response(status=200, body=row[0].encode(), content_type="application/json")

        app.router.add_get("/v1/jobs/{id}", get_job)

    async def ping(request: web.Request) -> web.Response:
        return web.Response(status=200, body=b'{"status":"ok"}', content_type="application/json")

    app.router.add_get("/ping", ping)

    appender = Appender(append_db)
    app.router.add_post("/v1/jobs/{id}/events", appender.append)

    async def start(app: web.Application) -> None:
        app["writer"] = asyncio.ensure_future(appender.run())

    app.on_startup.append(start)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--append-db", required=True, help="a new SQLite file for the appends")
    parser.add_argument("--read-db", help="a ledger database whose jobs GET reads")
    args = parser.parse_args()
    web.run_app(
        make_app(args.append_db, args.read_db),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
