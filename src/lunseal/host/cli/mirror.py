"""``lunseal mirror ...``: create, status, split, resync, restore, delete."""

from __future__ import annotations

import datetime as dt

import typer
from rich.table import Table

from lunseal.errors import BackendError, InvalidArgument
from lunseal.host.backup.common import COPYING, wait_mirror
from lunseal.host.cli.common import client, console, emit, progress_bar, table
from lunseal.host.client import ArrayClient
from lunseal.schema.mirrors import MirrorInfo
from lunseal.units import format_size

app = typer.Typer(help="Mirror LUNs: sync, split, resync, restore.", no_args_is_help=True)

WAIT_OPTION = typer.Option(False, "--wait", help="wait until the copy is done")


@app.command("create")
def create(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="source LUN"),
    target: str = typer.Argument(..., help="target LUN (same size)"),
    create_target: bool = typer.Option(False, "--create-target", help="create the target"),
    name: str | None = typer.Option(None, "--name", help="mirror name (default: target)"),
    wait: bool = WAIT_OPTION,
    force: bool = typer.Option(False, "--force", help="overwrite a target that holds data"),
) -> None:
    """Mirror SOURCE onto TARGET; the initial copy runs in the background."""
    with client(ctx) as api:
        info = api.create_mirror(
            source, target, name=name, create_target=create_target, force=force
        )
        info = _maybe_wait(ctx, api, info, wait)
    _show(ctx, info)


@app.command("status")
def status(
    ctx: typer.Context,
    mirror: str | None = typer.Argument(None, help="one mirror (default: all)"),
) -> None:
    """State, progress and dirty regions of the mirrors."""
    with client(ctx) as api:
        found = [api.mirror(mirror)] if mirror else api.list_mirrors()

    def human() -> None:
        if not found:
            console.print("no mirrors (create one with: lunseal mirror create SOURCE TARGET)")
            return
        t = table("MIRROR", "SOURCE", "TARGET", "STATE", "DONE", "LEFT", "DIRTY S/T", "SPLIT AT")
        for m in found:
            split = (
                dt.datetime.fromtimestamp(m.split_at).isoformat(timespec="seconds")
                if m.split_at
                else "-"
            )
            t.add_row(
                m.name,
                m.source,
                m.target,
                m.state,
                f"{m.percent_done:.1f}%",
                format_size(m.bytes_left),
                f"{m.source_dirty_regions}/{m.target_dirty_regions}",
                split,
            )
        _print_unfolded(t)
        for m in found:
            if m.reason:  # long (paths, errors): below the table, not folded into it
                console.print(f"{m.name}: {m.reason}")

    emit(ctx, found, human)


def _print_unfolded(t: Table) -> None:
    """Print at the table's natural width: a row never folds (soft wrap, as for URIs)."""
    natural = console.measure(t, options=console.options.update_width(1 << 16)).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(t)
    finally:
        console.width = width


@app.command("split")
def split(
    ctx: typer.Context,
    mirror: str = typer.Argument(..., help="mirror (or its target LUN)"),
    target_access: str = typer.Option("ro", "--target-access", help="ro or rw for hosts"),
) -> None:
    """Split a synced mirror; writes on either side are recorded from now on."""
    if target_access not in ("ro", "rw"):
        raise InvalidArgument(f"--target-access must be ro or rw, not {target_access!r}")
    with client(ctx) as api:
        info = api.split_mirror(mirror, target_access=target_access)
    _show(ctx, info)


@app.command("resync")
def resync(
    ctx: typer.Context,
    mirror: str = typer.Argument(..., help="mirror (name, id or target LUN)"),
    wait: bool = WAIT_OPTION,
) -> None:
    """Copy the regions changed since the split, source -> target; then synced."""
    with client(ctx) as api:
        info = _maybe_wait(ctx, api, api.resync_mirror(mirror), wait)
    _show(ctx, info)


@app.command("restore")
def restore(
    ctx: typer.Context,
    mirror: str = typer.Argument(..., help="mirror"),
    wait: bool = WAIT_OPTION,
    force: bool = typer.Option(False, "--force", help="even while hosts use the source"),
) -> None:
    """Copy the regions changed since the split, target -> source; stays split."""
    with client(ctx) as api:
        info = _maybe_wait(ctx, api, api.restore_mirror(mirror, force=force), wait)
    _show(ctx, info)


@app.command("delete")
def delete(ctx: typer.Context, mirror: str = typer.Argument(..., help="mirror")) -> None:
    """Delete a mirror; both LUNs stay."""
    with client(ctx) as api:
        api.delete_mirror(mirror)
    emit(ctx, None, lambda: console.print(f"deleted mirror {mirror}"))


def _show(ctx: typer.Context, info: MirrorInfo) -> None:
    emit(ctx, info, lambda: console.print(f"mirror {info.name}: {_describe(info)}"))


def _describe(m: MirrorInfo) -> str:
    if m.state in COPYING:
        return f"{m.state}, {m.percent_done:.1f}% done, {format_size(m.bytes_left)} left"
    if m.state == "degraded":
        return f"degraded: {m.reason}; {format_size(m.bytes_left)} to resync"
    return m.state


def _maybe_wait(ctx: typer.Context, api: ArrayClient, info: MirrorInfo, wait: bool) -> MirrorInfo:
    if not wait:
        return info
    if info.state in COPYING:
        with progress_bar(ctx) as progress:
            info = wait_mirror(api, info.name, progress)  # raises when it ends degraded
    if info.reason:  # degraded, or a restore failed: the copy did not finish
        raise BackendError(f"mirror {info.name} is {info.state}: {info.reason}")
    return info
