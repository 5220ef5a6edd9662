"""Entry point of the ``lunseal`` command: global options and the one error handler.

Subcommands live in one module each.  User errors (any :class:`LunsealError`)
print one line to stderr and exit with the error's code; only real bugs show
a traceback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from lunseal import __version__
from lunseal.errors import InvalidArgument, LunsealError
from lunseal.host.cli import (
    audit,
    backup,
    config,
    demo,
    iscsi,
    lun,
    mirror,
    nbd,
    serve,
    state,
    status,
    token,
)

app = typer.Typer(
    name="lunseal",
    help="lunseal: a software disk array with trustworthy LUN state tokens.\n\n"
    "The global options --home, --url, --token-file and --json may also follow the subcommand "
    "(lunseal lun list --json --home DIR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass
class GlobalOptions:
    home: Path | None
    url: str | None
    token: str | None
    token_file: Path | None
    json: bool
    ca_file: Path | None = None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lunseal {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Path | None = typer.Option(
        None, "--home", envvar="LUNSEAL_HOME", help="data directory [default: ./lunseal-data]"
    ),
    url: str | None = typer.Option(
        None, "--url", envvar="LUNSEAL_URL", help="API URL of a remote array"
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        envvar="LUNSEAL_TOKEN_FILE",
        help="file holding the API token ($LUNSEAL_TOKEN holds one directly) "
        "[default: the data directory's admin token]",
    ),
    token: str | None = typer.Option(
        None, "--token", help="API token (discouraged: ps shows it; use --token-file)"
    ),
    json_output: bool = typer.Option(False, "--json", help="print JSON for scripts"),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", envvar="LUNSEAL_CA_FILE", help="CA that signed the API's certificate"
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version"
    ),
) -> None:
    if token is not None:
        # Kept for old scripts; a token in argv is readable by every local user.
        print(
            "lunseal: warning: --token shows in ps and shell history; use --token-file "
            "FILE or $LUNSEAL_TOKEN",
            file=sys.stderr,
        )
    ctx.obj = GlobalOptions(
        home=home, url=url, token=token, token_file=token_file, json=json_output, ca_file=ca_file
    )


app.command("serve")(serve.serve)
app.command("status")(status.status)
app.add_typer(lun.app, name="lun")
app.add_typer(state.app, name="state")
app.add_typer(mirror.app, name="mirror")
app.add_typer(backup.app, name="backup")
app.add_typer(backup.archive_app, name="archive")
app.add_typer(iscsi.app, name="iscsi")
app.add_typer(token.app, name="token")
app.command("audit")(audit.audit)
app.add_typer(config.app, name="config")
app.add_typer(nbd.app, name="nbd")
app.command("restore")(backup.restore)
app.command("demo")(demo.demo)


#: Global options: accepted anywhere before ``--``, moved in front of the subcommand.
GLOBAL_FLAGS = frozenset({"--json"})
GLOBAL_VALUED = frozenset({"--home", "--url", "--token", "--token-file", "--ca-file"})


def normalise_argv(argv: list[str]) -> list[str]:
    """Two conveniences click cannot express directly.

    Global options are accepted after the subcommand too (``lunseal serve --home
    X``, ``lunseal lun list --json``): click only knows them before it, so they
    are moved there, in order, so the last one given still wins.  ``--track-changes``
    takes an optional value: given bare, it means the default granularity.
    """
    front: list[str] = []
    args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_value, _ = arg.partition("=")
        if arg == "--":
            args.extend(argv[i:])
            break
        if arg in GLOBAL_FLAGS or (has_value and name in GLOBAL_VALUED):
            front.append(arg)
        elif arg in GLOBAL_VALUED:
            if i + 1 == len(argv):
                raise InvalidArgument(f"{arg} needs a value")
            front.extend(argv[i : i + 2])
            i += 1
        elif arg == "--track-changes":
            args.append(f"--track-changes={state.TRACK_CHANGES_DEFAULT}")
        else:
            args.append(arg)
        i += 1
    return front + args


def main() -> None:
    try:
        args = normalise_argv(sys.argv[1:])
        # Without standalone mode click returns a command's typer.Exit code
        # instead of exiting with it.
        code = app(args=args, prog_name="lunseal", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except LunsealError as exc:
        print(f"lunseal: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("lunseal: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.TyperException as exc:
        # Usage errors: typer vendors click, so these are not click.ClickException.
        show = getattr(exc, "show", None)
        if callable(show):
            show()  # usage line, hint and message, as click prints them
        else:
            print(f"lunseal: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
