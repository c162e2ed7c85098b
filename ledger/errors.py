"""The ledger's errors: one root, subclasses named for what happened.

Each carries the contract's error ``code``; the API maps classes to HTTP statuses.
"""

from __future__ import annotations

import re
from typing import Any


class LedgerError(Exception):
    """Root of every error the ledger raises on purpose."""

    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra


class BadRequest(LedgerError):
    code = "bad_request"


class Invalid(LedgerError):
    """Input that parses but breaks a rule (unknown event type, bad data, bad field)."""

    code = "invalid"


class NotFound(LedgerError):
    code = "not_found"


class JobNotFound(NotFound):
    pass


class ResultsNotReady(NotFound):
    code = "results_not_ready"


class NoResults(NotFound):
    code = "no_results"


class ResultsExpired(LedgerError):
    code = "results_expired"


class Conflict(LedgerError):
    code = "conflict"


class VersionConflict(Conflict):
    code = "version_conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class InsufficientCredits(LedgerError):
    code = "insufficient_credits"


class Unauthorized(LedgerError):
    code = "unauthorized"


class Forbidden(LedgerError):
    code = "forbidden"


class StoreUnavailable(LedgerError):
    """The database cannot be opened or reached (bad URL, server down, missing file)."""

    code = "unavailable"


class CommitFailed(StoreUnavailable):
    """The database did not commit a transaction: nothing of it was recorded."""


class Rejected(Invalid):
    """The database refused a value (out of its range, a character it cannot store)."""

    code = "invalid"


# The read-model totals the database bounds with a CHECK to +-2^62 units (ledger/limits.py's
# MAX_TOTAL_UNITS; 4,611,686,018,427,387,904 ten-thousandths), by column: what each one sums.
_TOTALS = {
    "credits": "the credits of one account's jobs of one agent, project and status",
    "used": "the credits one account has used on one agent in one project",
    "granted": "the credits granted to one account",
}


def total_out_of_range(detail: str) -> Rejected:
    """The error for a CHECK a read-model total broke; ``detail`` is the database's text (the
    constraint's name or expression), which names the column."""
    for column, what in _TOTALS.items():
        if re.search(rf"(?<![a-z]){column}(?![a-z])", detail):
            return Rejected(
                f"{what} would pass 2^62 ten-thousandths (461,168,601,842,738.7904 credits), "
                "the most one stored total holds; nothing was written"
            )
    return Rejected("a total would leave the ledger's range; nothing was written")


class StoreConflict(LedgerError):
    """A uniqueness constraint refused a write (another writer got there first)."""

    code = "version_conflict"
