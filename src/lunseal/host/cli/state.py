"""``lunseal state ...``: holds, tokens, token checks and change maps.

The seed's commands map as: ``enable`` = ENABLE_LUN_STATE_SNAPSHOT,
``disable`` = DISABLE_LUN_STATE_SNAPSHOT, ``get`` = GET_LUN_STATE.  Given an
``iscsi://HOST[:PORT]/IQN/LUN`` URL instead of a LUN name, ``enable``,
``disable``, ``get`` and ``check`` speak only iSCSI (the in-band state
commands, :mod:`lunseal.host.state_inband`) and need no API access.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer

from lunseal.engine.state.tracker import validate_mode
from lunseal.host.cli.common import client, console, emit, options, table
from lunseal.host.state_inband import InbandClient, credentials, is_iscsi_url
from lunseal.units import format_size, parse_size

app = typer.Typer(help="Track LUN state: holds, tokens and change maps.", no_args_is_help=True)

#: ``--track-changes`` given without ``=SIZE`` (see ``main.expand_optional_values``).
TRACK_CHANGES_DEFAULT = "64K"

LUN_HELP = "LUN name, or iscsi://HOST[:PORT]/IQN/LUN to speak only iSCSI"
# How to log in when LUN is an iscsi:// URL; secrets from files or the environment.
INITIATOR = typer.Option(
    None, "--initiator", help="iSCSI: initiator name [$LUNSEAL_INITIATOR_NAME]"
)
CHAP_USER = typer.Option(None, "--chap-user", help="iSCSI: CHAP name [$LUNSEAL_CHAP_USER]")
CHAP_FILE = typer.Option(
    None, "--chap-secret-file", help="iSCSI: file with the CHAP secret [$LUNSEAL_CHAP_SECRET]"
)
MUTUAL_USER = typer.Option(
    None, "--mutual-user", help="iSCSI: the target's CHAP name [$LUNSEAL_MUTUAL_USER]"
)
MUTUAL_FILE = typer.Option(
    None,
    "--mutual-secret-file",
    help="iSCSI: file with the target's CHAP secret [$LUNSEAL_MUTUAL_SECRET]",
)


def inband(
    url: str,
    initiator: str | None,
    chap_user: str | None,
    chap_file: Path | None,
    mutual_user: str | None,
    mutual_file: Path | None,
) -> InbandClient:
    return InbandClient(url, credentials(initiator, chap_user, chap_file, mutual_user, mutual_file))


@app.command("enable")
def enable(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help=LUN_HELP),
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
    initiator: str | None = INITIATOR,
    chap_user: str | None = CHAP_USER,
    chap_file: Path | None = CHAP_FILE,
    mutual_user: str | None = MUTUAL_USER,
    mutual_file: Path | None = MUTUAL_FILE,
) -> None:
    """Acquire a hold: tracking is on while any hold exists. Prints the token."""
    tracking = None if mode is None else validate_mode(mode)  # one-line error
    if is_iscsi_url(lun):
        granularity = None if track_changes is None else parse_size(track_changes)
        with inband(lun, initiator, chap_user, chap_file, mutual_user, mutual_file) as ini:
            got = ini.acquire(hold, tracking, granularity)
        emit(ctx, got, lambda: console.print(got.token, highlight=False))
        return
    with client(ctx) as api:
        info = api.acquire_hold(lun, hold, mode=mode, granularity=track_changes)
    emit(ctx, info, lambda: console.print(info.token, highlight=False))


@app.command("disable")
def disable(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help=LUN_HELP),
    hold: str = typer.Option("default", "--hold", help="the hold to release"),
    initiator: str | None = INITIATOR,
    chap_user: str | None = CHAP_USER,
    chap_file: Path | None = CHAP_FILE,
    mutual_user: str | None = MUTUAL_USER,
    mutual_file: Path | None = MUTUAL_FILE,
) -> None:
    """Release a hold; releasing the last one turns tracking off."""
    if is_iscsi_url(lun):
        with inband(lun, initiator, chap_user, chap_file, mutual_user, mutual_file) as ini:
            ini.release(hold)
            now = ini.state()
        rest = f"{len(now.holds)} hold(s) left" if now.holds else "tracking is off"
        emit(ctx, now, lambda: console.print(f"released hold {hold} on {lun}; {rest}"))
        return
    with client(ctx) as api:
        api.release_hold(lun, hold)
        st = api.state(lun)
    left = f"{len(st.holds)} hold(s) left" if st.holds else "tracking is off"
    emit(ctx, st, lambda: console.print(f"released hold {hold} on LUN {lun}; {left}"))


@app.command("get")
def get(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help=LUN_HELP),
    initiator: str | None = INITIATOR,
    chap_user: str | None = CHAP_USER,
    chap_file: Path | None = CHAP_FILE,
    mutual_user: str | None = MUTUAL_USER,
    mutual_file: Path | None = MUTUAL_FILE,
) -> None:
    """Print the LUN's current state token (an error while tracking is off)."""
    if is_iscsi_url(lun):
        with inband(lun, initiator, chap_user, chap_file, mutual_user, mutual_file) as ini:
            now = ini.token()
        emit(ctx, now, lambda: console.print(now.token, highlight=False))
        return
    with client(ctx) as api:
        st = api.token(lun)
    emit(ctx, st, lambda: console.print(st.token, highlight=False))


@app.command("check")
def check(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help=LUN_HELP),
    token: str = typer.Argument(..., help="a token printed earlier by enable or get"),
    initiator: str | None = INITIATOR,
    chap_user: str | None = CHAP_USER,
    chap_file: Path | None = CHAP_FILE,
    mutual_user: str | None = MUTUAL_USER,
    mutual_file: Path | None = MUTUAL_FILE,
) -> None:
    """Is the LUN unchanged since TOKEN? Exit 0 intact, 1 changed (prints why),
    2 when TOKEN is not a state token at all."""
    if is_iscsi_url(lun):
        with inband(lun, initiator, chap_user, chap_file, mutual_user, mutual_file) as ini:
            answer = ini.check(token)
        emit(ctx, answer, lambda: console.print(f"{answer.result}: {answer.reason}"))
        result = answer.result
    else:
        with client(ctx) as api:
            outcome = api.check_token(lun, token)
        emit(ctx, outcome, lambda: console.print(f"{outcome.result}: {outcome.reason}"))
        result = outcome.result
    if result != "intact":
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
