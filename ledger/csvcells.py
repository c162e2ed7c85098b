"""CSV that a spreadsheet opens as data: cells that would run as formulas start with a quote.

Excel, LibreOffice and Google Sheets read a cell that begins with ``=``, ``+``, ``-``, ``@``,
a tab or a carriage return as a formula (OWASP "CSV Injection"), so a job id, agent or event id
chosen by a client could run ``=HYPERLINK(...)`` on an auditor's machine. Every text cell that
begins with one of those is written with a single quote in front, which spreadsheets show as
text.

The rule is reversible, so a program can recover the exact value (and check a hash over it): a
text cell whose text after its leading quotes begins with one of those characters gets one
more quote, and ``original`` removes exactly one. Numbers are written as they are (a negative
amount stays a number).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_FIRST = frozenset("=+-@\t\r'")


def cell(value: Any) -> Any:
    """``value`` as a CSV cell: text that a spreadsheet would evaluate gets a leading quote."""
    if value.__class__ is str and value and value[0] in _FIRST:
        if value.lstrip("'").startswith(TRIGGERS):
            return "'" + value
    return value


def original(text: str) -> str:
    """The value ``cell`` wrote as ``text``."""
    if text.startswith("'") and text.lstrip("'").startswith(TRIGGERS):
        return text[1:]
    return text


def rows_text(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as CSV text (``\\n`` line ends), every cell through ``cell``."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([cell(v) for v in row] for row in rows)
    return out.getvalue()
