"""The HTTP server around the app: aiohttp's runner, with its protocol-level errors in the envelope.

A request aiohttp cannot parse (an over-long request line or header, a NUL or another forbidden
byte in a header, a ``Content-Encoding`` it cannot decode) never reaches the app's middleware:
aiohttp answered it in ``text/plain`` quoting the offending bytes, and logged them as a plain
text traceback, so a key in an ``Authorization`` header with a trailing NUL landed in the log.
aiohttp has no public hook for those answers, so ``run`` serves the app through a runner whose
connection handler answers them in the JSON envelope and logs one structlog line naming the
kind of error, never the bytes it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import http_exceptions as hx
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from api.http import ENCODE

log = structlog.get_logger(__name__)

# (status, code, message) by the kind of error; the message never quotes the request.
_ANSWERS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (hx.LineTooLong, 400, "bad_request", "a request line or header is longer than the limit"),
    (
        hx.ContentEncodingError,
        415,
        "unsupported_media_type",
        "the body's Content-Encoding cannot be decoded; send identity, gzip or deflate",
    ),
    (hx.DecompressSizeError, 413, "too_large", "the decompressed body is too large"),
    (hx.ContentLengthError, 400, "bad_request", "the body does not match its Content-Length"),
    (hx.TransferEncodingError, 400, "bad_request", "the body's Transfer-Encoding is malformed"),
    (hx.InvalidURLError, 400, "bad_request", "the request target is not a valid URL"),
    (hx.BadStatusLine, 400, "bad_request", "the request line is malformed"),
    (
        hx.BadHttpMessage,
        400,
        "bad_request",
        "the request head is malformed (a header holds a byte HTTP does not allow)",
    ),
)
_BY_STATUS = {
    400: ("bad_request", "the request is malformed"),
    413: ("too_large", "the request is too large"),
    504: ("timeout", "the request took too long"),
}


def answer_for(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """The status, code and message to answer a protocol-level error with."""
    for kind, answer_status, code, message in _ANSWERS:
        if isinstance(exc, kind):
            return answer_status, code, message
    if status >= 500:
        return status, "internal", "an internal error occurred; it has been logged"
    code, message = _BY_STATUS.get(status, ("bad_request", "the request is malformed"))
    return status, code, message


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler; its own error answers are the JSON envelope."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # aiohttp's text, which quotes the request: never used
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionResetError) and (
            request.transport is None or request.transport.is_closing()
        ):
            # The client left mid-answer (an event stream, a long poll): the middleware logged
            # it at info (``http.client_gone``) and re-raised it to end the handler. Nobody is
            # left to answer and nothing went wrong: a ConnectionError is how aiohttp's
            # connection loop learns that the client disconnected (it closes quietly).
            raise exc
        answer_status, code, text = answer_for(status, exc)
        fields: dict[str, Any] = {"status": answer_status, "code": code, "remote": request.remote}
        if exc is not None:
            fields["error"] = type(exc).__name__
        if answer_status >= 500 and exc is not None and not isinstance(exc, hx.HttpProcessingError):
            log.error("http.protocol_error", exc_info=exc, **fields)  # our bug, not bad input
        else:
            log.info("http.protocol_error", **fields)
        if request.writer.output_size > 0:  # an answer is on its way already: only a cut is left
            raise ConnectionError("the answer was partly sent; closing the connection")
        body = ENCODE({"error": {"code": code, "message": text}})
        response = web.Response(body=body, status=answer_status, content_type="application/json")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections are ``JsonErrorHandler``s."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )


async def _serve(
    app: web.Application,
    sock: socket.socket,
    shutdown_timeout: float,
    bound: Callable[[], None],
) -> None:
    runner = Runner(app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        bound()  # once the socket is bound, so the announcement is never a lie
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    *,
    sock: socket.socket,
    shutdown_timeout: float,
    bound: Callable[[], None],
) -> None:
    """``web.run_app`` with ``Runner`` on an already bound ``sock``: serve until SIGINT or
    SIGTERM, then stop cleanly."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, sock, shutdown_timeout, bound))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
