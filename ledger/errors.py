"""The ledger's errors: one root, subclasses named for what happened.

Each carries the contract's error ``code``; the API maps classes to HTTP statuses.
"""

from __future__ import annotations

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


class StoreConflict(LedgerError):
    """A uniqueness constraint refused a write (another writer got there first)."""

    code = "version_conflict"
