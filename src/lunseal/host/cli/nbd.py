"""``lunseal nbd ...``: the NBD export ACL (who may open which LUN, ro or rw)."""

from __future__ import annotations

import typer

from lunseal.host.cli.common import client, console, emit, table
from lunseal.schema.nbd_access import CLIENT_HELP, NbdAccessInfo

app = typer.Typer(
    help="NBD export access: which clients may open a LUN, read-only or read-write.",
    no_args_is_help=True,
)


def _print(info: NbdAccessInfo) -> None:
    if info.open:
        console.print(f"LUN {info.lun}: no NBD ACL, any client may open it", highlight=False)
        return
    t = table("CLIENT", "ACCESS")
    for entry in info.entries:
        t.add_row(entry.client, entry.access)
    console.print(f"LUN {info.lun}: only these NBD clients may open it", highlight=False)
    console.print(t)


@app.command("show")
def show(ctx: typer.Context, lun: str = typer.Argument(..., help="LUN name")) -> None:
    """Who may open a LUN over NBD."""
    with client(ctx) as api:
        info = api.nbd_access(lun)
    emit(ctx, info, lambda: _print(info))


@app.command("allow")
def allow(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help="LUN name"),
    clients: list[str] = typer.Argument(..., metavar="CLIENT...", help=CLIENT_HELP),
    read_only: bool = typer.Option(False, "--ro", help="read-only: writes are refused"),
) -> None:
    """Allow clients to open a LUN (or change their access). The first entry closes
    the LUN to every NBD client not listed; connections whose access changed end."""
    access = "ro" if read_only else "rw"
    with client(ctx) as api:
        for spec in clients:
            info = api.allow_nbd(lun, spec, access)
    emit(ctx, info, lambda: _print(info))


@app.command("deny")
def deny(
    ctx: typer.Context,
    lun: str = typer.Argument(..., help="LUN name"),
    clients: list[str] = typer.Argument(None, metavar="[CLIENT]...", help=CLIENT_HELP),
    all_entries: bool = typer.Option(
        False, "--all", help="remove every entry: any client may open the LUN again"
    ),
) -> None:
    """Remove entries; their clients' connections to the LUN end."""
    if bool(clients) == all_entries:
        raise typer.BadParameter("name the clients to remove, or give --all (not both)")
    with client(ctx) as api:
        if all_entries:
            info = api.deny_nbd(lun, None)
        for spec in clients or []:
            info = api.deny_nbd(lun, spec)
    emit(ctx, info, lambda: _print(info))
