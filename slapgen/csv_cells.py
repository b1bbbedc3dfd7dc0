"""CSV cells a spreadsheet will not run: the studio's ratings export and the campaigns' verdicts export."""

from __future__ import annotations


def inert_cell(value):
    """Text starting like a formula gets a leading apostrophe; anything else is left as it is."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
