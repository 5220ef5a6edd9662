"""``lunseal token ...``: API tokens with roles (admin only).

A new token's secret is printed once (or written to a 0600 file with
``--out``); the array keeps only a salted hash of it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from lunseal.engine.access import Role
from lunseal.errors import Conflict, InvalidArgument
from lunseal.host.cli.common import client, console, emit, table
from lunseal.schema.access import TokenCreated

app = typer.Typer(
    help="API tokens with roles: admin, operator (holds, mirrors, backups), monitor.",
    no_args_is_help=True,
)


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _write_secret(path: Path, secret: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Conflict(f"{path} exists; choose a new file for the token") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="a name for the token (shown in the audit trail)"),
    role: str = typer.Option(..., "--role", help="admin, operator or monitor"),
    out: Path | None = typer.Option(
        None, "--out", help="write the secret to this new file (mode 0600) instead of stdout"
    ),
) -> None:
    """Create a token; its secret is shown this once."""
    Role.parse(role)  # a clear error before anything is sent
    with client(ctx) as api:
        created = api.create_token(name, role.strip().lower())
    if out is not None:
        _write_secret(out, created.secret)
        shown = TokenCreated(**{**created.model_dump(), "secret": f"(written to {out})"})
    else:
        shown = created

    def human() -> None:
        console.print(f"token {shown.name} created, role {shown.role}", highlight=False)
        if out is not None:
            console.print(f"secret written to {out}", highlight=False)
        else:
            console.print(
                "its secret (shown only now; use it with --token-file or $LUNSEAL_TOKEN):",
                highlight=False,
            )
            console.print(shown.secret, highlight=False)

    emit(ctx, shown, human)


@app.command("list")
def list_tokens(ctx: typer.Context) -> None:
    """The tokens, their roles and when they were last used (never their secrets)."""
    with client(ctx) as api:
        tokens = api.list_tokens()

    def human() -> None:
        t = table("NAME", "ROLE", "CREATED", "LAST USED")
        for tok in tokens:
            t.add_row(tok.name, tok.role, _when(tok.created_at), _when(tok.last_used))
        console.print(t)

    emit(ctx, tokens, human)


@app.command("revoke")
def revoke(ctx: typer.Context, name: str = typer.Argument(..., help="the token's name")) -> None:
    """Revoke a token: from now on it is refused (401)."""
    with client(ctx) as api:
        api.revoke_token(name)
    emit(ctx, None, lambda: console.print(f"token {name} revoked", highlight=False))
