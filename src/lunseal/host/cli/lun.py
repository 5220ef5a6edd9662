"""``lunseal lun ...``: create, list, show, grow, set and delete LUNs."""

from __future__ import annotations

import datetime as dt

import typer

from lunseal.host.cli.common import client, console, emit, table
from lunseal.schema.luns import LunInfo
from lunseal.units import format_size

app = typer.Typer(help="Create, list, show, grow, re-point and delete LUNs.", no_args_is_help=True)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="LUN name: letters, digits, '.', '_' or '-'"),
    size: str | None = typer.Argument(None, help="size, e.g. 10G or 512M"),
    number: int | None = typer.Option(None, help="LUN number (lowest free if omitted)"),
    read_only: bool = typer.Option(False, "--read-only", help="hosts may only read"),
    file: str | None = typer.Option(
        None, "--file", help="absolute path of an existing (or new) backing file"
    ),
) -> None:
    """Create a LUN backed by a sparse file in the data directory (or --file)."""
    with client(ctx) as api:
        info = api.create_lun(name, size, number=number, read_only=read_only, path=file)
    emit(ctx, info, lambda: _print_created(info))


def _print_created(info: LunInfo) -> None:
    console.print(
        f"created LUN [bold]{info.name}[/] (number {info.number}, {format_size(info.size)})"
    )
    for uri in info.nbd_uris:
        console.print(f"  {uri}", highlight=False)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List the LUNs of the array."""
    with client(ctx) as api:
        luns = api.list_luns()

    def human() -> None:
        if not luns:
            console.print("no LUNs (create one with: lunseal lun create NAME SIZE)")
            return
        t = table("#", "NAME", "SIZE", "MODE", "CONNS", "UUID")
        for lun in luns:
            mode = "ro" if lun.read_only else "rw"
            if not lun.available:
                mode = "unavailable"
            t.add_row(
                str(lun.number),
                lun.name,
                format_size(lun.size),
                mode,
                str(lun.connections),
                lun.uuid,
            )
        console.print(t)
        for lun in luns:
            if not lun.available:
                console.print(
                    f"LUN {lun.name} is unavailable: {lun.unavailable_reason} "
                    f"(lunseal lun repoint {lun.name} --file PATH, or lunseal lun delete)",
                    highlight=False,
                )

    emit(ctx, luns, human)


@app.command("show")
def show(ctx: typer.Context, name: str = typer.Argument(..., help="LUN name")) -> None:
    """Show one LUN in detail."""
    with client(ctx) as api:
        info = api.show_lun(name)
    emit(ctx, info, lambda: _print_details(info))


def _mode(info: LunInfo) -> str:
    if not info.read_only:
        return "read-write"
    return f"read-only ({info.read_only_reason})" if info.read_only_reason else "read-only"


def _print_details(info: LunInfo) -> None:
    created = dt.datetime.fromtimestamp(info.created_at).isoformat(timespec="seconds")
    rows = [
        ("name", info.name),
        ("number", str(info.number)),
        ("uuid", info.uuid),
        ("size", f"{format_size(info.size)} ({info.size} bytes)"),
        ("mode", _mode(info)),
        ("available", "yes" if info.available else f"NO: {info.unavailable_reason}"),
        ("backend", f"{info.backend} {info.path}"),
        ("created", created),
        ("connections", str(info.connections)),
        (
            "io",
            f"{info.stats.reads} reads ({format_size(info.stats.bytes_read)}), "
            f"{info.stats.writes} writes ({format_size(info.stats.bytes_written)}), "
            f"{info.stats.trims} trims, {info.stats.zeroes} zeroes, {info.stats.flushes} flushes",
        ),
    ]
    rows += [("nbd", uri) for uri in info.nbd_uris]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"{key:<{width}}  {value}", highlight=False)


@app.command("grow")
def grow(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="LUN name"),
    size: str = typer.Argument(..., help="the new, larger size, e.g. 20G"),
) -> None:
    """Grow a LUN; connected hosts see the new size when they reconnect."""
    with client(ctx) as api:
        info = api.grow_lun(name, size)
    emit(ctx, info, lambda: console.print(f"LUN {info.name} is now {format_size(info.size)}"))


@app.command("repoint")
def repoint(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="LUN name"),
    file: str = typer.Option(
        ..., "--file", help="absolute path of an existing file of the LUN's size"
    ),
) -> None:
    """Serve a LUN (typically an unavailable one) from another backing file.

    The file must exist, have the LUN's size, be a regular file outside any
    lunseal data directory and back no other LUN.  The LUN's state token
    changes: tokens issued before never match again.
    """
    with client(ctx) as api:
        info = api.repoint_lun(name, file)
    emit(ctx, info, lambda: console.print(f"LUN {info.name} now uses {info.path}"))


@app.command("set")
def set_(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="LUN name"),
    read_only: bool | None = typer.Option(
        None, "--read-only/--read-write", help="make the LUN read-only or writable"
    ),
) -> None:
    """Change a LUN's settings."""
    with client(ctx) as api:
        info = api.update_lun(name, read_only=read_only)
    mode = "read-only" if info.read_only else "read-write"
    emit(ctx, info, lambda: console.print(f"LUN {info.name} is {mode}"))


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="LUN name"),
    force: bool = typer.Option(False, "--force", help="disconnect hosts using it first"),
) -> None:
    """Delete a LUN and the backing file lunseal created for it."""
    with client(ctx) as api:
        api.delete_lun(name, force=force)
    emit(ctx, None, lambda: console.print(f"deleted LUN {name}"))
