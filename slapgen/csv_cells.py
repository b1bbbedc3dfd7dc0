"""CSV cells a spreadsheet will not run: the studio's ratings export and the campaigns' verdicts export."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping


def inert_cell(value):
    """Text starting like a formula gets a leading apostrophe; anything else is left as it is."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def inert_csv(rows: Iterable[Mapping], columns: tuple[str, ...] | list[str], extrasaction: str = "raise") -> str:
    """`rows` as CSV text with a header of `columns`, every cell made inert."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction=extrasaction)
    writer.writeheader()
    writer.writerows({key: inert_cell(value) for key, value in row.items()} for row in rows)
    return out.getvalue()
