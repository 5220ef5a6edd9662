"""``lunseal audit``: who changed what, when, with which result."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import typer

from lunseal.errors import InvalidArgument
from lunseal.host.cli.common import client, console, emit, table

_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``30m``, ``1h``, ``7d`` (that long ago) or an ISO 8601 time (UTC unless it
    says otherwise), as seconds since the epoch."""
    m = _AGE_RE.fullmatch(text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgument(
            f"invalid --since {text[:40]!r}: use an age (30m, 1h, 7d, 2w) or an ISO 8601 "
            "time (2026-12-01T08:00, UTC unless an offset is given)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def audit(
    ctx: typer.Context,
    since: str | None = typer.Option(
        None, "--since", help="from this long ago (1h, 7d) or this ISO time [default: all]"
    ),
    limit: int = typer.Option(1000, "--limit", min=1, max=10_000, help="at most the newest N"),
) -> None:
    """The audit trail: state-changing API calls and in-band state commands."""
    start = 0.0 if since is None else parse_since(since)
    with client(ctx) as api:
        events = api.audit(start, limit)

    def human() -> None:
        t = table("TIME (UTC)", "ACTOR", "ACTION", "TARGET", "RESULT", "DETAIL")
        for e in events:
            at = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            t.add_row(at, e.actor, e.action, e.target, e.result, e.detail)
        console.print(t)

    emit(ctx, events, human)
