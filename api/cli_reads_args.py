"""The arguments of ``jobledger jobs list|show``, ``stats`` and ``credits``.

Apart from the commands themselves (``api/cli_reads.py``), so that building ``jobledger``'s
parser imports neither rich's tables nor the API's schemas: a command that does not read them
starts faster.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from api.settings import DEFAULT_DB
from ledger.jobs import STATUSES

COMMANDS = ("jobs", "stats", "credits")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("JOBLEDGER_DB", DEFAULT_DB),
        help="a file path, sqlite:///path or postgresql://... (env JOBLEDGER_DB)",
    )
    parser.add_argument("--tenant", help="whose data (may be left out when there is only one)")
    parser.add_argument("--project", help="only this project's jobs")
    parser.add_argument("--json", action="store_true", help="JSON (the API's shapes) for scripts")


def add_parsers(sub: Any) -> None:
    """Add ``jobs``, ``stats`` and ``credits`` to the ``jobledger`` command."""
    jobs_cmd = sub.add_parser("jobs", help="list jobs or show one (reads the database)")
    jobs_sub = jobs_cmd.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_sub.add_parser("list", help="jobs, newest first")
    _common(listing)
    listing.add_argument("--status", help="comma-separated: " + ",".join(STATUSES))
    listing.add_argument("--agent")
    listing.add_argument("--account")
    listing.add_argument("--since", help="created at or after (RFC 3339)")
    listing.add_argument("--until", help="created before (RFC 3339)")
    listing.add_argument("-q", "--query", dest="q", help="text in the id, agent or account")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (1-1000)")
    show = jobs_sub.add_parser("show", help="one job, and with --events its event history")
    _common(show)
    show.add_argument("job_id")
    show.add_argument("--events", action="store_true", help="also every event of the job")

    stats = sub.add_parser("stats", help="job counts by status and agent, credits used")
    _common(stats)

    cred = sub.add_parser("credits", help="granted, used and balance per account")
    _common(cred)
    cred.add_argument("--account", help="one account only")
    cred.add_argument("--days", type=int, default=0, help="also usage per day for N days")
