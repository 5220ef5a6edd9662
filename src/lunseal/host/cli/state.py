"""``lunseal state ...``: holds, tokens, token checks and change maps.

The seed's commands map as: ``enable`` = ENABLE_LUN_STATE_SNAPSHOT,
``disable`` = DISABLE_LUN_STATE_SNAPSHOT, ``get`` = GET_LUN_STATE.
"""

from __future__ import annotations

import datetime as dt

import typer

from lunseal.engine.state.tracker import validate_mode
from lunseal.host.cli.common import client, console, emit, options, table
from lunseal.units import format_size

app = typer.Typer(help="Track LUN state: holds, tokens and change maps.", no_args_is_help=True)

#: ``--track-changes`` given without ``=SIZE`` (see ``main.expand_optional_values``).
TRACK_CHANGES_DEFAULT = "64K"


@app.command("enable")
def enable(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help="LUN name"),
    hold: str = typer.Option("default", "--hold", help="name of this consumer's hold"),
    mode: str | None = typer.Option(
        None, "--mode", help="counter (default), timestamp or flag; set by the first hold"
    ),
    track_changes: str | None = typer.Option(
        None,
        "--track-changes",
        metavar="[=GRANULARITY]",
        help="keep a change map for this hold (region size, default 64K)",
    ),
) -> None:
    """Acquire a hold: tracking is on while any hold exists. Prints the token."""
    if mode is not None:
        validate_mode(mode)  # one-line error, not the client's pydantic traceback
    with client(ctx) as api:
        info = api.acquire_hold(lun, hold, mode=mode, granularity=track_changes)
    emit(ctx, info, lambda: console.print(info.token, highlight=False))


@app.command("disable")
def disable(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help="LUN name"),
    hold: str = typer.Option("default", "--hold", help="the hold to release"),
) -> None:
    """Release a hold; releasing the last one turns tracking off."""
    with client(ctx) as api:
        api.release_hold(lun, hold)
        st = api.state(lun)
    left = f"{len(st.holds)} hold(s) left" if st.holds else "tracking is off"
    emit(ctx, st, lambda: console.print(f"released hold {hold} on LUN {lun}; {left}"))


@app.command("get")
def get(ctx: typer.Context, lun: str = typer.Argument(..., help="LUN name")) -> None:
    """Print the LUN's current state token (an error while tracking is off)."""
    with client(ctx) as api:
        st = api.token(lun)
    emit(ctx, st, lambda: console.print(st.token, highlight=False))


@app.command("check")
def check(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help="LUN name"),
    token: str = typer.Argument(..., help="a token printed earlier by enable or get"),
) -> None:
    """Is the LUN unchanged since TOKEN? Exit 0 intact, 1 changed (prints why),
    2 when TOKEN is not a state token at all."""
    with client(ctx) as api:
        outcome = api.check_token(lun, token)
    emit(ctx, outcome, lambda: console.print(f"{outcome.result}: {outcome.reason}"))
    if outcome.result != "intact":
        raise typer.Exit(1)


@app.command("holds")
def holds(ctx: typer.Context, lun: str = typer.Argument(..., help="LUN name")) -> None:
    """List the holds on a LUN."""
    with client(ctx) as api:
        found = api.list_holds(lun)

    def human() -> None:
        if not found:
            console.print(f"no holds on LUN {lun}: tracking is off")
            return
        t = table("HOLD", "SINCE", "CHANGE MAP", "CHANGED", "TOKEN")
        for h in found:
            since = dt.datetime.fromtimestamp(h.created_at).isoformat(timespec="seconds")
            gran = format_size(h.granularity) if h.granularity else "-"
            changed = format_size(h.changed_bytes) if h.changed_bytes is not None else "-"
            t.add_row(h.name, since, gran, changed, h.token)
        console.print(t)

    emit(ctx, found, human)


@app.command("changes")
def changes(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help="LUN name"),
    hold: str = typer.Option("default", "--hold", help="a hold acquired with --track-changes"),
) -> None:
    """List the regions changed since the hold's token."""
    with client(ctx) as api:
        info = api.changes(lun, hold)

    def human() -> None:
        console.print(
            f"{len(info.extents)} changed extent(s), {format_size(info.changed_bytes)} "
            f"at {format_size(info.granularity)} granularity since {info.since_token}",
            highlight=False,
        )
        if info.extents and not options(ctx).json:
            t = table("OFFSET", "LENGTH")
            for ext in info.extents:
                t.add_row(str(ext.offset), str(ext.length))
            console.print(t)

    emit(ctx, info, human)
