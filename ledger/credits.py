"""Credits arithmetic: exact decimals held as integer ten-thousandths ("units").

Prices and grants have at most four fractional digits, and every charge is a price times a whole
count, so every amount is a whole number of units and sums never drift.
"""

from __future__ import annotations

import functools
from decimal import Decimal

from ledger.errors import Invalid
from ledger.events import CreditsGranted, Event, JobQueued, Price, PriceSet
from ledger.limits import MAX_AMOUNT, MAX_CHARGE_UNITS

SCALE = 10_000
PRICE_FIELDS = ("per_job", "per_row", "per_execution", "per_second")


def to_units(value: Decimal, *, field: str, allow_negative: bool = False) -> int:
    """Exact units of a decimal; ``Invalid`` unless it is finite, within ``MAX_AMOUNT`` and has
    at most four fractional digits."""
    try:
        if not value.is_finite():
            raise Invalid(f"{field} must be a finite number", field=field)
        if value and value.adjusted() > 12:  # decide before any arithmetic on 1e999999999
            raise Invalid(f"{field} is too large (at most {MAX_AMOUNT})", field=field)
        if value and value.adjusted() < -4:
            raise Invalid(f"{field} has more than 4 fractional digits", field=field)
        scaled = value.scaleb(4)
        units = int(scaled)
    except (ArithmeticError, ValueError):
        raise Invalid(f"{field} is not a valid amount", field=field) from None
    if scaled != units:
        raise Invalid(f"{field} has more than 4 fractional digits", field=field)
    if units < 0 and not allow_negative:
        raise Invalid(f"{field} must not be negative", field=field)
    if abs(units) > MAX_AMOUNT * SCALE:
        raise Invalid(f"{field} is too large (at most {MAX_AMOUNT})", field=field)
    return units


def from_units(units: int) -> int | Decimal:
    """The JSON-ready amount: an ``int`` when integral, else an exact ``Decimal``."""
    whole, frac = divmod(units, SCALE)
    if frac == 0:
        return whole
    return (Decimal(units) / SCALE).normalize()


def validate_price(price: Price) -> None:
    for name in PRICE_FIELDS:
        to_units(getattr(price, name), field=name)


def check_amounts(event: Event | None) -> None:
    """What the API checks of a grant's or a price's amounts (a price set, or the one a job
    was queued at), for events it did not write (an import): ``Invalid`` names the field."""
    if isinstance(event, CreditsGranted):
        to_units(event.amount, field="amount", allow_negative=True)
    elif isinstance(event, PriceSet | JobQueued):
        validate_price(event.price)


@functools.lru_cache(maxsize=4096)
def price_units(price: Price) -> tuple[int, int, int, int]:
    """A price's four amounts in units (prices are frozen, so this is computed once each)."""
    return (
        to_units(price.per_job, field="per_job"),
        to_units(price.per_row, field="per_row"),
        to_units(price.per_execution, field="per_execution"),
        to_units(price.per_second, field="per_second"),
    )


def charge(
    price: Price,
    *,
    row_count: int,
    succeeded: int,
    started_us: int | None,
    finished_us: int | None,
) -> int:
    """The charge of a finished, billable job in units (section 5 of the contract)."""
    seconds = 0
    if started_us is not None and finished_us is not None and finished_us > started_us:
        seconds = -((started_us - finished_us) // 1_000_000)  # exact ceil, no float
    per_job, per_row, per_execution, per_second = price_units(price)
    units = per_job + per_row * row_count + per_execution * succeeded + per_second * seconds
    if not 0 <= units <= MAX_CHARGE_UNITS:
        raise Invalid(
            f"this job's charge would exceed the ledger's limit of "
            f"{MAX_CHARGE_UNITS // SCALE} credits",
            field="data.row_count",
        )
    return units
