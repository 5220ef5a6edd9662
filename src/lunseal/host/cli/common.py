"""What every CLI subcommand shares: finding the array and printing results."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import typer
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lunseal.errors import InvalidArgument
from lunseal.home import resolve_home
from lunseal.host.backup.common import Log, ProgressFn
from lunseal.host.client import ArrayClient
from lunseal.host.secret_file import read_secret

TOKEN_ENV = "LUNSEAL_TOKEN"
TOKEN_FILE_ENV = "LUNSEAL_TOKEN_FILE"

# soft_wrap: never fold long lines (URIs, paths) so they survive pipes and copy-paste.
# Piped output is read by scripts and copied from: give tables room so tokens
# and UUIDs stay on one line (a terminal keeps its own width).
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


class _Options(Protocol):
    home: Any
    url: str | None
    token: str | None
    token_file: Path | None
    json: bool
    ca_file: Any


def options(ctx: typer.Context) -> _Options:
    obj = ctx.find_root().obj
    assert obj is not None
    return obj  # type: ignore[no-any-return]


def api_token(opts: _Options) -> str | None:
    """The API token the user chose, or None for the data directory's admin token.

    In order: ``--token`` (discouraged: ``ps`` shows it), ``--token-file``,
    ``$LUNSEAL_TOKEN``, ``$LUNSEAL_TOKEN_FILE``.
    """
    if opts.token:
        return opts.token
    if opts.token_file is not None:
        return _token_from(opts.token_file, "--token-file")
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return _token_from(Path(os.environ[TOKEN_FILE_ENV]), f"${TOKEN_FILE_ENV}")
    return None


def _token_from(path: Path, what: str) -> str:
    token = (read_secret(path, TOKEN_ENV, f"API token ({what})") or "").strip()
    if not token:
        raise InvalidArgument(f"the API token file {path} ({what}) is empty")
    return token


def client(ctx: typer.Context) -> ArrayClient:
    """The array at --url, else the daemon of the data directory; with the token of
    :func:`api_token`, else (local daemon only) the data directory's admin token."""
    opts = options(ctx)
    token = api_token(opts)
    if opts.url:
        if not token:
            raise InvalidArgument(
                f"--url needs --token-file FILE (or ${TOKEN_ENV} / ${TOKEN_FILE_ENV})"
            )
        return ArrayClient(opts.url, token, ca_file=opts.ca_file)
    return ArrayClient.for_home(resolve_home(opts.home), token, ca_file=opts.ca_file)


def emit(
    ctx: typer.Context, data: BaseModel | Sequence[BaseModel] | None, human: Callable[[], None]
) -> None:
    """Print ``data`` as JSON with --json, else call ``human`` to print for people."""
    if options(ctx).json:
        if data is None:
            payload: Any = None
        elif isinstance(data, BaseModel):
            payload = data.model_dump(mode="json")
        else:
            payload = [item.model_dump(mode="json") for item in data]
        typer.echo(json.dumps(payload, indent=2))
    else:
        human()


class PlainTable(Table):
    """A table whose cells are text, never rich markup: names, paths, audit
    details and error messages may hold brackets ("[/PREFIX]") that markup
    would misread or choke on."""

    def add_row(self, *renderables: RenderableType | None, **kwargs: Any) -> None:
        cells = [escape(c) if isinstance(c, str) else c for c in renderables]
        super().add_row(*cells, **kwargs)


def table(*columns: str) -> Table:
    t = PlainTable(show_edge=False, header_style="bold")
    for col in columns:
        if col in {"#", "SIZE", "CONNS"}:
            t.add_column(col, justify="right", overflow="fold")
        else:
            t.add_column(col, justify="left", overflow="fold")
    return t


@contextlib.contextmanager
def progress_bar(ctx: typer.Context, log: Log | None = None) -> Iterator[ProgressFn]:
    """A (what, bytes done, bytes total) progress callback: live rich bars on a
    terminal, silent with --json or when output is piped.

    While the bars are live, ``log``'s step lines are printed *above* them
    (through the bars' console, when both streams are the terminal): a line
    printed past a live display is overwritten by its next refresh.  A bar
    disappears when its work is done, so no stale 100% lines pile up.
    """
    show = sys.stderr.isatty() and not options(ctx).json
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                if done >= total:
                    return  # nothing to show: no empty "0/0 bytes" bar
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)
            if done >= total:
                bar.remove_task(tasks.pop(what))

        say = log.say if log is not None else None
        if log is not None and show and sys.stdout.isatty():
            log.say = lambda m: bar.console.print(m, highlight=False, soft_wrap=True)
        try:
            yield update
        finally:
            if log is not None and say is not None:
                log.say = say
