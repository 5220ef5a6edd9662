"""Sizes with binary units: parsing what people type, printing what they can read."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lunseal.errors import InvalidArgument
from lunseal.units import format_size, parse_size

K, M, G, T, P = (1 << n for n in (10, 20, 30, 40, 50))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("4K", 4 * K),
        ("4k", 4 * K),
        ("4KB", 4 * K),
        ("4KiB", 4 * K),
        ("4kib", 4 * K),
        ("512M", 512 * M),
        ("10G", 10 * G),
        ("2T", 2 * T),
        ("1P", P),
        ("1 G", G),
        ("  7  ", 7),
        ("100B", 100),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "G", "12Q", "1.5G", "-1", "+1", "1GG", "0x10", "1e3", "ten", "1 0", "1E"]
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(text)


def test_parse_size_rejects_negative_integers() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        parse_size(-1)


def test_the_error_message_shows_an_example() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_size("12Q")
    assert "'12Q'" in info.value.message
    assert "10G" in info.value.message


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (K, "1K"),
        (1536, "1.5K"),
        (512 * M, "512M"),
        (G, "1G"),
        (1536 * M, "1536M"),
        (3 * T, "3T"),
        (5 * P, "5P"),
        (2048 * P, "2048P"),
        (G + 512, "1.0G"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(0, 1 << 20), st.sampled_from([K, M, G, T, P]))
def test_whole_units_round_trip(count: int, unit: int) -> None:
    assert parse_size(format_size(count * unit)) == count * unit


@given(st.integers(0, 1023))
def test_small_byte_counts_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(1 << 10, 1 << 60).filter(lambda n: n % 1024))
@example(217344)  # 212.25K: a tie that binary floats put a hair past the bound
def test_other_sizes_are_shown_rounded_to_one_decimal(size: int) -> None:
    text = format_size(size)
    number, unit = float(text[:-1]), {"K": K, "M": M, "G": G, "T": T, "P": P}[text[-1]]
    assert number >= 1
    # Half a tenth at most; the slack covers binary floats (212.25K shows as 212.2K).
    assert abs(number * unit - size) <= 0.05 * unit * (1 + 1e-9)
