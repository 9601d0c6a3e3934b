"""How counts are written in what people read: ``1 image``, ``2,900 images``."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` with ``noun``, or ``plural`` (default: ``noun`` and an s) unless
    ``n`` is 1."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
