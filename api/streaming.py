"""JSON documents with one long array, written as they are read.

A handler hands over the document's ``prefix`` (up to the array's ``[``), its ``suffix`` (from
the ``]``) and an async iterator of encoded items (``ENCODE(list)[1:-1]``, one chunk each time);
each chunk is written as it comes, so memory and loop time per step are those of one chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)


async def json_array(
    request: web.Request, prefix: bytes, chunks: AsyncIterator[bytes], suffix: bytes
) -> web.StreamResponse:
    """Answer ``prefix``, the chunks joined by commas, then ``suffix``, as ``application/json``."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp routes HEAD to GET handlers: headers only
        return response
    first = True
    try:
        await response.write(prefix)
        async for chunk in chunks:
            if chunk:
                await response.write(chunk if first else b"," + chunk)
                first = False
        await response.write(suffix)
        await response.write_eof()
    except OSError:  # ConnectionResetError included: the client left, nobody to answer
        log.info("http.stream_client_gone")
    except Exception:
        # the status line is out: the only honest signal left is a cut, invalid document
        log.exception("http.stream_failed")
        if request.transport is not None:
            request.transport.close()
    return response
