"""CHAP secrets for host tools: from a file (``-``: stdin) or an environment
variable, never from the command line, where ``ps`` and shell history show them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lunseal.errors import InvalidArgument

CHAP_SECRET_ENV = "LUNSEAL_CHAP_SECRET"
MUTUAL_SECRET_ENV = "LUNSEAL_MUTUAL_SECRET"
#: A secret file larger than this is surely not a secret (CHAP secrets are <= 255 bytes).
SECRET_FILE_MAX = 4096


def read_secret(path: Path | None, env: str, what: str) -> str | None:
    """A secret from ``path`` (``-``: stdin; one trailing newline dropped), else from
    the environment variable ``env``, else ``None``."""
    if path is None:
        return os.environ.get(env) or None
    try:
        if str(path) == "-":
            raw = sys.stdin.read(SECRET_FILE_MAX + 1)
        else:
            with path.open() as f:
                raw = f.read(SECRET_FILE_MAX + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the {what} from {path}: {exc}") from None
    if len(raw) > SECRET_FILE_MAX:
        raise InvalidArgument(f"{path} is too large to hold a {what}")
    return raw.removesuffix("\n").removesuffix("\r")
