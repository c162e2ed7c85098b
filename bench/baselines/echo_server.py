"""Bare aiohttp + msgspec server: the floor for append throughput and GET latency.

``POST /echo`` decodes the JSON body with a prebuilt msgspec decoder and answers
it re-encoded with status 201; ``GET /ping`` answers ``{"status":"ok"}``.
No database, no auth, no validation beyond "is it JSON": whatever the ledger does
on top of this is what its ratio against this server measures.

Run: ``python bench/baselines/echo_server.py --port 8081``
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
from aiohttp import web

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_PING_BODY = _encoder.encode({"status": "ok"})


async def echo(request: web.Request) -> web.Response:
    try:
        payload = _decoder.decode(await request.read())
    except msgspec.DecodeError:
        return web.Response(
            status=400, body=b'{"error":"invalid json"}', content_type="application/json"
        )
    return web.Response(status=201, body=_encoder.encode(payload), content_type="application/json")


async def ping(request: web.Request) -> web.Response:
    return web.Response(status=200, body=_PING_BODY, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/ping", ping)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
