"""Whether a SQLite database in WAL mode has changed, read from its WAL index without a query.

Every transaction that commits to a database in WAL mode, from any connection of any process,
rewrites the header of the WAL index (the ``-shm`` file every connection maps): the number of
valid frames, the checksum over them, the salts that change when the WAL starts over, and a
change counter (https://www.sqlite.org/walformat.html, "The WAL-Index Header"). The header
never returns to an earlier value, so two equal readings mean that nothing committed between
them. Reading it is a memory compare, against ~10 µs and a lock round trip for even the
smallest query.

The header is trusted only while the reading connection stays open in WAL mode: that
connection holds a shared lock on the database file, so no other connection can take the
database out of WAL mode or delete the ``-shm`` file meanwhile (SQLite needs an exclusive lock
for either). ``SqliteBackend`` opens a ``WalIndex`` after its own inline reader connection has
read the file in WAL mode, and closes it before that connection.
"""

from __future__ import annotations

import itertools
import mmap
import os
import sys

HEADER = 48  # one copy of the header; the WAL index holds two, the second written first
WAL_INDEX_VERSION = 3007000
_MAPPED = 136  # both copies and the checkpoint information after them

# Versions are drawn from one counter for every database of the process, so equal versions
# also mean the same database.
_versions = itertools.count(1)


class WalIndex:
    """The WAL-index header of one database, mapped read-only (use from one thread)."""

    def __init__(self, fd: int, mapped: mmap.mmap) -> None:
        self._fd = fd
        self._map = mapped
        self._header = b""
        self._version = 0

    @classmethod
    def open(cls, db_path: str, page_size: int) -> WalIndex | None:
        """The WAL index of ``db_path``, or ``None`` where it cannot be read as documented.

        ``page_size`` is the database's: a header that records another page size (or another
        format) is not one this module understands. (An empty WAL records none: 0.)
        """
        shm = os.path.realpath(db_path) + "-shm"  # SQLite resolves links the same way
        try:
            fd = os.open(shm, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < _MAPPED:
                raise OSError("the WAL index is not initialised")
            mapped = mmap.mmap(fd, _MAPPED, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            os.close(fd)
            return None
        index = cls(fd, mapped)
        header = mapped[:HEADER]
        version = int.from_bytes(header[0:4], sys.byteorder)
        size = int.from_bytes(header[14:16], sys.byteorder)
        if version != WAL_INDEX_VERSION or (size if size != 1 else 65536) not in (0, page_size):
            index.close()
            return None
        return index

    def version(self) -> int | None:
        """A number that changes whenever a transaction commits to the database.

        Take it *before* the read it vouches for: a commit after it changes it. ``None`` while
        a writer is rewriting the header or it is not valid (after a crash, until the next
        connection recovers it): no answer then.
        """
        both = self._map[: 2 * HEADER]
        if both != self._header:
            if both[:HEADER] != both[HEADER:] or not both[12]:  # isInit
                return None
            self._header = both
            self._version = next(_versions)
        return self._version

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
