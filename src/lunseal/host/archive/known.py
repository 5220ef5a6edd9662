"""Which archive directories were encrypted when this user last opened them.

Someone who can write an encrypted archive cannot forge objects in it, but
could replace the whole archive with an unencrypted one of their own making.
With a passphrase at hand that is refused anyway; this record (in the user's
state directory, as borg keeps a security directory per repository) catches
it also when the user runs without one: an archive remembered as encrypted
that now opens unencrypted, or is gone, is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

#: The record is small; a huge one is not ours and is not read.
_MAX_RECORD = 4 * 1024 * 1024


def record_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lunseal" / "encrypted-archives.json"


def _load() -> dict[str, str]:
    try:
        with record_file().open("rb") as f:
            raw = f.read(_MAX_RECORD + 1)
        obj = json.loads(raw) if len(raw) <= _MAX_RECORD else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}


def _save(record: dict[str, str]) -> None:
    """Best effort: an unwritable home must not stop a backup."""
    path = record_file()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def encrypted_as(path: Path) -> str | None:
    """The repository id ``path`` had when it was last opened encrypted, or None."""
    return _load().get(str(path.absolute()))


def remember(path: Path, repository: str) -> None:
    record = _load()
    if record.get(str(path.absolute())) != repository:
        _save({**record, str(path.absolute()): repository})


def forget(path: Path) -> None:
    record = _load()
    if record.pop(str(path.absolute()), None) is not None:
        _save(record)
