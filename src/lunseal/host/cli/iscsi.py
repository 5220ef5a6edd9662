"""``lunseal iscsi ...``: the iSCSI target's initiator ACL.

Secrets never go on the command line (where ``ps`` and shell history show
them): they come from a file (``-`` for stdin) or an environment variable.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lunseal.errors import InvalidArgument
from lunseal.host.cli.common import client, console, emit, table
from lunseal.host.secret_file import CHAP_SECRET_ENV, MUTUAL_SECRET_ENV, read_secret
from lunseal.schema.iscsi import Access, ChapBody, InitiatorAllow, InitiatorInfo

app = typer.Typer(help="The iSCSI target: initiator ACL, LUN masking, CHAP.", no_args_is_help=True)


def chap_from(user: str | None, secret_file: Path | None, env: str, what: str) -> ChapBody | None:
    secret = read_secret(secret_file, env, what)
    if user is None:
        if secret_file is not None:
            raise InvalidArgument(f"a {what} file needs its user name too")
        return None
    if secret is None:
        raise InvalidArgument(f"the {what} for {user!r}: give a secret file or set ${env}")
    return ChapBody(user=user, secret=secret)


def parse_lun(spec: str) -> tuple[str, Access]:
    """``NAME`` or ``NAME:ro`` / ``NAME:rw``."""
    name, _, access = spec.partition(":")
    if not name or access not in ("", "ro", "rw"):
        raise InvalidArgument(f"invalid --lun {spec!r}: use NAME, NAME:ro or NAME:rw")
    return name, "ro" if access == "ro" else "rw"


def describe(info: InitiatorInfo) -> str:
    if info.all_luns:
        ro = [a.lun for a in info.luns]
        return "all" + (f" (read-only: {', '.join(ro)})" if ro else "")
    return ", ".join(f"{a.lun}:{a.access}" for a in info.luns) or "none"


def _print_initiator(info: InitiatorInfo) -> None:
    chap = info.chap_user or "-"
    mutual = info.mutual_user or "-"
    console.print(
        f"initiator {info.name}: LUNs {describe(info)}; CHAP {chap}; mutual {mutual}",
        highlight=False,
    )


@app.command("show")
def show(ctx: typer.Context) -> None:
    """The target's name and portal, and who may log in (secrets are never shown)."""
    with client(ctx) as api:
        info = api.iscsi()

    def human() -> None:
        if info.target is None:
            console.print("iSCSI is off")
        else:
            console.print(f"target {info.target} at {info.portal}", highlight=False)
        if info.open:
            console.print("no initiator ACL: any initiator may log in and sees every LUN")
            return
        t = table("INITIATOR", "LUNS", "CHAP USER", "MUTUAL USER")
        for i in info.initiators:
            t.add_row(i.name, describe(i), i.chap_user or "-", i.mutual_user or "-")
        console.print(t)

    emit(ctx, info, human)


@app.command("allow")
def allow(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="initiator name (iqn..., eui... or naa...)"),
    luns: list[str] = typer.Option(
        [], "--lun", help="NAME[:ro|:rw]: a LUN it sees (repeat); default: every LUN"
    ),
    all_luns: bool = typer.Option(
        False, "--all-luns", help="see every LUN; the --lun ones given as :ro are read-only"
    ),
    chap_user: str | None = typer.Option(None, "--chap-user", help="CHAP name it logs in with"),
    chap_secret_file: Path | None = typer.Option(
        None,
        "--chap-secret-file",
        help=f"file with its CHAP secret ('-': stdin; or ${CHAP_SECRET_ENV})",
    ),
    mutual_user: str | None = typer.Option(
        None, "--mutual-user", help="CHAP name the target answers with (mutual CHAP)"
    ),
    mutual_secret_file: Path | None = typer.Option(
        None,
        "--mutual-secret-file",
        help=f"file with the target's secret (or ${MUTUAL_SECRET_ENV})",
    ),
) -> None:
    """Allow an initiator to log in, or change it. The first one allowed closes the
    target to every initiator not allowed."""
    body = InitiatorAllow(
        all_luns=True if all_luns else None,
        luns=dict(parse_lun(spec) for spec in luns) if luns else None,
        chap=chap_from(chap_user, chap_secret_file, CHAP_SECRET_ENV, "CHAP secret"),
        mutual=chap_from(mutual_user, mutual_secret_file, MUTUAL_SECRET_ENV, "mutual CHAP secret"),
    )
    with client(ctx) as api:
        info = api.allow_initiator(name, body)
    emit(ctx, info, lambda: _print_initiator(info))


@app.command("deny")
def deny(ctx: typer.Context, name: str = typer.Argument(..., help="initiator name")) -> None:
    """Forget an initiator.  With none left, any initiator may log in again."""
    with client(ctx) as api:
        api.deny_initiator(name)
        left = api.iscsi()
    open_note = "; no ACL left: any initiator may log in" if left.open else ""
    emit(ctx, left, lambda: console.print(f"initiator {name} removed{open_note}", highlight=False))


@app.command("lun")
def lun(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="initiator name"),
    lun_name: str = typer.Argument(..., metavar="LUN", help="LUN name"),
    access: str = typer.Argument(..., help="ro, rw, or none (it no longer sees the LUN)"),
) -> None:
    """Set what an initiator may do with one LUN."""
    if access not in ("ro", "rw", "none"):
        raise InvalidArgument(f"invalid access {access!r}: use ro, rw or none")
    with client(ctx) as api:
        info = api.set_initiator_lun(name, lun_name, access)
    emit(ctx, info, lambda: _print_initiator(info))


@app.command("chap")
def chap(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="initiator name"),
    user: str | None = typer.Option(None, "--user", help="CHAP name it logs in with"),
    secret_file: Path | None = typer.Option(
        None, "--secret-file", help=f"file with its CHAP secret ('-': stdin; or ${CHAP_SECRET_ENV})"
    ),
    mutual_user: str | None = typer.Option(None, "--mutual-user", help="target's CHAP name"),
    mutual_secret_file: Path | None = typer.Option(
        None,
        "--mutual-secret-file",
        help=f"file with the target's secret (or ${MUTUAL_SECRET_ENV})",
    ),
    clear: bool = typer.Option(False, "--clear", help="no CHAP for this initiator"),
) -> None:
    """Set an initiator's CHAP credentials (replacing both), or clear them."""
    body = chap_from(user, secret_file, CHAP_SECRET_ENV, "CHAP secret")
    mutual = chap_from(mutual_user, mutual_secret_file, MUTUAL_SECRET_ENV, "mutual CHAP secret")
    if clear == (body is not None) or (clear and mutual is not None):
        raise InvalidArgument("give either --user with a secret, or --clear")
    with client(ctx) as api:
        info = api.set_chap(name, body, mutual)
    emit(ctx, info, lambda: _print_initiator(info))
