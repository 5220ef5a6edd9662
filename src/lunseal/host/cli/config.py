"""``lunseal config``: check a configuration file, print a commented default one."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lunseal.host.cli.common import options

app = typer.Typer(help="Check or write the configuration file of lunseal serve.")


@app.command("check")
def check(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="the TOML file to check"),
) -> None:
    """Exit 0 if FILE is a usable configuration file, else one line saying what is wrong.

    With --json, print the settings serve would use (file values over defaults)."""
    from lunseal.config import load
    from lunseal.host.cli.serve import serve

    settings = load(file, serve)
    if options(ctx).json:
        typer.echo(json.dumps(settings.effective(serve), indent=2, sort_keys=True))
    else:
        typer.echo(f"{file}: ok ({len(settings.serve)} setting(s) besides the defaults)")


@app.command("show")
def show() -> None:
    """Print a configuration file with every option at its default, commented out."""
    from lunseal.config import commented_default
    from lunseal.host.cli.serve import serve

    typer.echo(commented_default(serve), nl=False)
