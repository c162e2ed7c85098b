"""The export's lines, rendered by the database, are the bytes msgspec would encode."""

from __future__ import annotations

import msgspec

from ledger.backends import backend_for


def _all_characters() -> list[str]:
    """Every character a stored string can hold (no surrogates; no NUL, PostgreSQL refuses it
    in text), in strings of a few thousand characters."""
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    return ["".join(chars[i : i + 4096]) for i in range(0, len(chars), 4096)]


async def test_json_text_escapes_as_json_dumps_does(db_url: str) -> None:
    """The backend's JSON string of any text equals msgspec's (= ``json.dumps``'s) bytes."""
    backend = backend_for(db_url)
    await backend.open()
    try:
        async with backend.read(bulk=True) as conn:
            sql = f"SELECT {backend.json_text('CAST(? AS TEXT)')}"
            for text in [*_all_characters(), 'quote " backslash \\ tab \t nl \n', "é ☃ 𝄞"]:
                row = await conn.fetchone(sql, (text,))
                assert row is not None
                assert row[0].encode() == msgspec.json.encode(text), text[:20]
    finally:
        await backend.close()
