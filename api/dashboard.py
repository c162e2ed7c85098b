"""The dashboard at ``/ui/`` and the API reference at ``/docs``: static files in the package.

The dashboard is one HTML page, a script and a stylesheet (``api/static/ui``); it signs in with
an API key and reads the ``/v1`` API as that key, so it shows exactly what the key may see.
``/docs`` renders ``/v1/openapi.json`` with the Swagger UI files vendored in
``api/static/swagger``. Nothing is fetched from another host: both work offline.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
UI = STATIC / "ui"
SWAGGER = STATIC / "swagger"

# The dashboard runs only its own files; Swagger UI sets inline styles, so /docs allows those.
UI_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
DOCS_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)

routes = web.RouteTableDef()


def _page(path: Path, policy: str) -> web.FileResponse:
    return web.FileResponse(
        path,
        headers={
            "Content-Security-Policy": policy,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@routes.get("/")
async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


@routes.get("/ui")
async def ui_bare(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


@routes.get("/ui/")
async def ui_index(request: web.Request) -> web.StreamResponse:
    return _page(UI / "index.html", UI_POLICY)


@routes.get("/docs")
async def docs(request: web.Request) -> web.StreamResponse:
    return _page(SWAGGER / "index.html", DOCS_POLICY)


def install(app: web.Application) -> None:
    """Add the dashboard's and the reference's routes and static files to ``app``."""
    app.add_routes(routes)
    app.router.add_static("/ui/static", UI, append_version=False)
    app.router.add_static("/docs/static", SWAGGER, append_version=False)
