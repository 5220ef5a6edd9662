"""Parsing and printing sizes with binary units (``10G``, ``512M``, ``4KiB``)."""

from __future__ import annotations

import re

from lunseal.errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a size such as ``10G`` or ``512M`` (binary units) into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(text)
    if match is None:
        raise InvalidArgument(
            f"invalid size {text!r}: use a whole number with an optional unit K, M, G, T or P "
            "(binary: 1K = 1024 bytes), e.g. 10G or 512M"
        )
    number, unit = match.groups()
    return int(number) * _UNITS[unit.upper()]


def format_size(size: int) -> str:
    """Print a byte count with the largest binary unit that keeps it exact."""
    for unit in ("P", "T", "G", "M", "K"):
        factor = _UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    if size >= 1 << 10:
        for unit in ("P", "T", "G", "M", "K"):
            factor = _UNITS[unit]
            if size >= factor:
                return f"{size / factor:.1f}{unit}"
    return f"{size}B"
