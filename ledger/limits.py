"""The ranges of what the ledger stores: every text, count and amount has declared bounds.

Bounds are checked where input enters (request bodies, event data, query strings), so nothing
the ledger writes can be refused by the database or overflow a 64-bit total later. The same
``Annotated`` types appear in the OpenAPI document. A leaf module: it imports nothing of ours.
"""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

# Names and ids: no control characters at all (``(?!\n)``: Python's ``$`` would otherwise
# accept one trailing newline). Free text: tab, newline and carriage return are allowed.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$(?!\n)"
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"

MAX_COUNT = 1_000_000_000  # rows, executions (planned, in all): per job
# distinct execution ids per job: the job's state holds each one's status, and the whole state
# is written again with every event of the job
MAX_EXECUTIONS = 10_000
MAX_AMOUNT = 1_000_000_000  # credits: a price field or one grant, either sign
MAX_CHARGE_UNITS = 10**16  # one job's charge, in ten-thousandths (10^12 credits)
MAX_TOTAL_UNITS = 2**62  # any stored total; the database refuses more (CHECK constraints)
MAX_NAME = 200
MAX_TEXT = 2000

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)]
Text = Annotated[str, Meta(max_length=MAX_TEXT, pattern=TEXT_PATTERN)]
LongText = Annotated[str, Meta(max_length=20_000, pattern=TEXT_PATTERN)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]


_BAD_CHARACTER = re.compile("[\x00-\x1f\x7f]").search


def bad_text(value: str) -> bool:
    """Whether ``value`` holds a character no name, id or query value may hold (a control)."""
    return _BAD_CHARACTER(value) is not None
