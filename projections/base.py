"""What every SQL projection shares: table names that can carry a rebuild suffix."""

from __future__ import annotations

from typing import Self

from ledger.records import Batch, TableSpec
from ledger.sql import Conn


class SqlProjector:
    """A projection over a few tables; subclasses give DDL templates with ``{t}`` names."""

    name = ""
    tables: tuple[str, ...] = ()
    specs: tuple[TableSpec, ...] = ()  # one per table, in the order of ``tables``
    table_ddl: tuple[str, ...] = ()
    index_ddl: tuple[str, ...] = ()

    def __init__(self, suffix: str = "") -> None:
        # every table described, or a rebuild would silently leave it out of its comparison
        assert tuple(spec.name for spec in self.specs) == self.tables, f"{self.name}: specs"
        self.suffix = suffix
        self.t = {table: table + suffix for table in self.tables}

    def ddl(self, suffix: str | None = None) -> list[str]:
        names = self.t if suffix is None else {t: t + suffix for t in self.tables}
        return [sql.format(**names) for sql in self.table_ddl]

    def indexes(self) -> list[str]:
        return [sql.format(**{t: t for t in self.tables}) for sql in self.index_ddl]

    def with_suffix(self, suffix: str) -> Self:
        return type(self)(suffix)

    async def apply(self, conn: Conn, batch: Batch) -> None:
        raise NotImplementedError
