"""Atomic replacement of small state files."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.fsutil import atomic_write, atomic_write_json


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=["umask022", "umask000", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_with_mode_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "token"
    atomic_write(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert mode(path) == 0o600


def test_an_explicit_mode_is_applied_exactly(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "info"
    atomic_write(path, b"x", mode=0o644)
    assert mode(path) == 0o644


def test_replaces_content_and_mode_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"old content that is longer")
    path.chmod(0o666)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600


def test_readers_of_the_old_file_keep_seeing_it(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"old")
    with path.open("rb") as reader:
        atomic_write(path, b"new")
        assert reader.read() == b"old"
    assert path.read_bytes() == b"new"


def test_leaves_no_temporary_file(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a", b"1")
    atomic_write(tmp_path / "a", b"2")
    assert os.listdir(tmp_path) == ["a"]


def test_writes_large_data_completely(tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text()
    assert text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert mode(path) == 0o600


def test_missing_directory_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "file", b"x")
