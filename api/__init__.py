"""The HTTP API (aiohttp), the seed dialects and the CLI: the only package importing aiohttp."""

import sys

if "structlog" not in sys.modules and "rich" not in sys.modules:
    # structlog imports rich at its own import, when rich is installed, only to offer rich's
    # pretty tracebacks to its ConsoleRenderer: a quarter of every ``jobledger`` process's
    # start (0.12 s CPU of 0.45 s). Our chain formats exceptions as text before any renderer
    # sees them (``format_exc_info`` in api/logs.py), so no line we write changes without it.
    # A None in sys.modules makes that import fail as if rich were absent; the CLI's progress
    # bars and tables import rich later, as usual.
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]
