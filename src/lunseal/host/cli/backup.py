"""``lunseal backup ...``, ``lunseal restore`` and ``lunseal archive ...``."""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path

import typer

from lunseal.errors import ArchiveCorrupt, InvalidArgument
from lunseal.host.archive import LocalStorage, Manifest, Repository
from lunseal.host.archive.crypto import ENCRYPTION_MODES, Unlock, read_key_file, write_key_file
from lunseal.host.backup.common import Log
from lunseal.host.backup.create import create_backup
from lunseal.host.backup.restore import plan_restore, run_restore
from lunseal.host.cli.common import client, console, options, progress_bar, table
from lunseal.host.job_metrics import ENV_TEXTFILE, record_job, textfile
from lunseal.host.secret_file import read_secret
from lunseal.units import format_size

app = typer.Typer(help="Back up LUNs through their mirrors into an archive.", no_args_is_help=True)
archive_app = typer.Typer(help="Create and inspect the archive repository.", no_args_is_help=True)
key_app = typer.Typer(
    help="Export or import the key of an encrypted archive.", no_args_is_help=True
)
archive_app.add_typer(key_app, name="key")

ENV_ARCHIVE = "LUNSEAL_ARCHIVE"
ARCHIVE_OPTION = typer.Option(
    None, "--archive", envvar=ENV_ARCHIVE, help="archive directory [default: ./lunseal-archive]"
)


ENV_PASSPHRASE = "LUNSEAL_PASSPHRASE"
# Never a --passphrase option: a command line is visible to every user in ps.
PASSPHRASE_FILE_OPTION = typer.Option(
    None,
    "--passphrase-file",
    envvar="LUNSEAL_PASSPHRASE_FILE",
    help=f"file holding the archive passphrase ('-': stdin) [default: ${ENV_PASSPHRASE}, "
    "else asked on a terminal]",
)
KEY_FILE_OPTION = typer.Option(
    None,
    "--key-file",
    envvar="LUNSEAL_KEY_FILE",
    help="key file of a keyfile-mode archive [default: ~/.config/lunseal/keys/]",
)


def _archive_path(path: Path | None) -> Path:
    return (path or Path(os.environ.get(ENV_ARCHIVE) or "lunseal-archive")).absolute()


def unlock_from(
    passphrase_file: Path | None,
    key_file: Path | None,
    *,
    ask: bool = False,
    confirm: bool = False,
) -> Unlock:
    """The passphrase from a file or the environment; with ``ask``, and neither
    given, it is asked for on the terminal (never echoed), twice with ``confirm``."""
    passphrase = read_secret(passphrase_file, ENV_PASSPHRASE, "passphrase")
    if passphrase is None and ask and sys.stdin.isatty():
        passphrase = getpass.getpass("archive passphrase: ")
        if confirm and getpass.getpass("the same again: ") != passphrase:
            raise InvalidArgument("the two passphrases differ")
    return Unlock(passphrase, key_file)


def _encrypted(path: Path) -> bool:
    """Whether the archive at ``path`` says it is encrypted (only to decide whether to
    ask for a passphrase: the repository checks what it finds for itself)."""
    try:
        config = json.loads((path / "config").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("encryption") in ("repokey", "keyfile")


def open_repo(
    path: Path | None,
    *,
    create: bool = False,
    passphrase_file: Path | None = None,
    key_file: Path | None = None,
) -> Repository:
    chosen = _archive_path(path)
    unlock = unlock_from(passphrase_file, key_file, ask=_encrypted(chosen))
    return Repository.open_local(chosen, create=create, unlock=unlock)


METRICS_OPTION = typer.Option(
    None,
    "--metrics-textfile",
    help="record the run's duration and result in this Prometheus textfile "
    f"(node_exporter's textfile collector) [env {ENV_TEXTFILE}]",
)


def _say(ctx: typer.Context) -> Log:
    """Steps go to stderr with --json (stdout is for the JSON), else stdout."""
    if options(ctx).json:
        return Log(say=lambda m: typer.echo(m, err=True))
    return Log(say=lambda m: console.print(m, highlight=False))


@app.command("create")
def create(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="LUN to back up"),
    mirror: str = typer.Option(
        ..., "--mirror", help="mirror (or target LUN) holding the disk copy"
    ),
    archive: Path | None = ARCHIVE_OPTION,
    pre_split: str | None = typer.Option(None, "--pre-split", help="command that quiesces"),
    post_split: str | None = typer.Option(None, "--post-split", help="command that thaws"),
    target_access: str = typer.Option("ro", "--target-access", help="hosts' access to the copy"),
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
    metrics_textfile: Path | None = METRICS_OPTION,
) -> None:
    """Resync, split and archive a disk copy of SOURCE; incremental when it can be."""
    log = _say(ctx)
    with (
        record_job("backup", source, textfile(metrics_textfile)),
        client(ctx) as api,
        progress_bar(ctx, log) as progress,
    ):
        result = create_backup(
            api,
            open_repo(archive, create=True, passphrase_file=passphrase_file, key_file=key_file),
            source,
            mirror,
            pre_split=pre_split,
            post_split=post_split,
            target_access=target_access,
            log=log,
            progress=progress,
        )
    if options(ctx).json:
        typer.echo(_dumps({**_manifest_json(result.manifest), "steps": log.steps}))
    else:  # the result, last, once the progress bars are gone
        console.print(f"backup ID: {result.manifest.id}", highlight=False)


@app.command("list")
def list_(
    ctx: typer.Context,
    archive: Path | None = ARCHIVE_OPTION,
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """List the backups in the archive, oldest first (damaged ones are named on stderr)."""
    repo = open_repo(archive, passphrase_file=passphrase_file, key_file=key_file)
    manifests = []
    for backup_id in repo.manifest_ids():
        try:
            manifests.append(repo.manifest(backup_id))
        except ArchiveCorrupt as exc:
            typer.echo(f"lunseal: warning: {exc.message}", err=True)
    manifests.sort(key=lambda m: (m.created_at, m.id))  # ids resolve only to the second
    if options(ctx).json:
        typer.echo(_dumps([_manifest_json(m) for m in manifests]))
        return
    if not manifests:
        console.print("no backups")
        return
    t = table("BACKUP", "CREATED", "SOURCE", "TARGET", "MODE", "SIZE", "READ")
    for m in manifests:
        t.add_row(
            m.id,
            m.created_at,
            str(m.meta.get("source")),
            str(m.meta.get("target")),
            str(m.meta.get("mode")),
            format_size(m.size),
            format_size(int(m.meta.get("bytes_read", 0))),
        )
    console.print(t)


@app.command("show")
def show(
    ctx: typer.Context,
    backup: str = typer.Argument(...),
    archive: Path | None = ARCHIVE_OPTION,
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Show one backup's record."""
    m = open_repo(archive, passphrase_file=passphrase_file, key_file=key_file).manifest(backup)
    payload = _manifest_json(m)
    if options(ctx).json:
        typer.echo(_dumps(payload))
        return
    for key, value in payload.items():
        if key != "chunks":
            console.print(f"{key:<12} {value}", highlight=False)


@app.command("verify")
def verify_(
    ctx: typer.Context,
    backup: str = typer.Argument(...),
    archive: Path | None = ARCHIVE_OPTION,
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Read every chunk of BACKUP from the archive and check its digest."""
    repo = open_repo(archive, passphrase_file=passphrase_file, key_file=key_file)
    m = repo.manifest(backup)
    with progress_bar(ctx) as progress:
        for i in range(len(m.chunks)):
            repo.read_backup_chunk(m, i)
            progress(f"verify {m.id}", min(m.size, (i + 1) * m.chunk_size), m.size)
    typer.echo(
        _dumps({"backup": m.id, "ok": True})
        if options(ctx).json
        else f"backup {m.id}: all {len(m.chunks)} chunks verified"
    )


@app.command("prune")
def prune(
    ctx: typer.Context,
    keep_last: int | None = typer.Option(
        None, "--keep-last", help="keep the newest N backups of each source LUN"
    ),
    keep_daily: int | None = typer.Option(
        None, "--keep-daily", help="keep one a day for N days, per source LUN"
    ),
    source: str | None = typer.Option(None, "--source", help="prune only this LUN's backups"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would go"),
    archive: Path | None = ARCHIVE_OPTION,
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Delete backups outside the policy (applied to each source LUN's backups on
    their own) and the chunks no backup uses any more."""
    if keep_last is None and keep_daily is None:
        raise InvalidArgument("give --keep-last and/or --keep-daily")
    repo = open_repo(archive, passphrase_file=passphrase_file, key_file=key_file)
    report = repo.prune(keep_last, keep_daily, dry_run=dry_run, source=source)
    if options(ctx).json:
        payload = dict(vars(report))
        payload["decisions"] = [vars(d) for d in report.decisions]
        typer.echo(_dumps(payload))
        return
    if report.decisions:
        t = table("BACKUP", "SOURCE", "CREATED", "ACTION")
        for d in report.decisions:
            action = "keep" if d.keep else ("would remove" if dry_run else "removed")
            t.add_row(d.backup, d.source, d.created_at, action)
        console.print(t)
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {len(report.removed)} backup(s) and {report.chunks_removed} chunk(s), "
        f"{format_size(report.bytes_freed)}; kept {len(report.kept)}",
        highlight=False,
    )


@archive_app.command("check")
def check(
    ctx: typer.Context,
    repo_path: Path = typer.Argument(None, help="archive directory [default: $LUNSEAL_ARCHIVE]"),
    read_data: bool = typer.Option(False, "--read-data", help="also read and hash every chunk"),
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Verify the archive's manifests (and with --read-data every chunk)."""
    repo = open_repo(repo_path, passphrase_file=passphrase_file, key_file=key_file)
    report = repo.check(read_data=read_data)
    if options(ctx).json:
        typer.echo(
            _dumps(
                {"ok": report.ok, "problems": report.lines(), "affected": report.affected_backups()}
            )
        )
    else:
        for line in report.lines():
            console.print(line, highlight=False)
        console.print(
            "archive OK"
            if report.ok
            else f"archive DAMAGED: affects {', '.join(report.affected_backups()) or 'no backup'}"
        )
    if not report.ok:
        raise typer.Exit(1)


@archive_app.command("init")
def init(
    ctx: typer.Context,
    repo_path: Path = typer.Argument(None, help="archive directory [default: $LUNSEAL_ARCHIVE]"),
    encryption: str = typer.Option(
        ...,
        "--encryption",
        help="repokey (key in the archive, locked by the passphrase), keyfile (key in a "
        "separate file, locked by the passphrase) or none",
    ),
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Create an archive; choose encryption now, it cannot be changed later."""
    if encryption not in ENCRYPTION_MODES:
        raise InvalidArgument(f"--encryption takes {', '.join(ENCRYPTION_MODES)}")
    path = _archive_path(repo_path)
    encrypted = encryption != "none"
    unlock = unlock_from(passphrase_file, key_file, ask=encrypted, confirm=encrypted)
    repo, written = Repository.init_local(path, encryption, unlock)
    warning = _key_warning(path, encryption, written)
    if options(ctx).json:
        typer.echo(
            _dumps(
                {
                    "archive": str(path),
                    "encryption": encryption,
                    "repository": repo.key.repository if repo.key else None,
                    "key_file": str(written) if written else None,
                    "warning": warning,
                }
            )
        )
    else:
        console.print(f"archive {path} created, encryption: {encryption}", highlight=False)
    typer.echo(warning, err=True)


def _key_warning(path: Path, encryption: str, key_file: Path | None) -> str:
    if encryption == "none":
        return (
            "warning: this archive is not encrypted: whoever can read it reads every backup, "
            "and whoever can write it can forge backups that check and restore as valid"
        )
    where = (
        "the key is stored in the archive"
        if key_file is None
        else f"the key is in {key_file} (NOT in the archive: copy it somewhere safe)"
    )
    return (
        f"IMPORTANT: {where}. Without the key AND the passphrase nobody, you included, can "
        "read these backups ever again. Export the key now "
        f"(lunseal archive key export {path} FILE) and keep the copy and the passphrase "
        "somewhere other than the archive."
    )


@key_app.command("export")
def key_export(
    repo_path: Path = typer.Argument(..., help="archive directory"),
    file: Path = typer.Argument(..., help="file to write (it must not exist)"),
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Copy the archive's key (still locked by the passphrase) to FILE, after
    checking that the passphrase unlocks it."""
    repo = open_repo(repo_path, passphrase_file=passphrase_file, key_file=key_file)
    if repo.key_blob is None:
        raise InvalidArgument("this archive is not encrypted: it has no key")
    write_key_file(file, repo.key_blob)
    console.print(
        f"key of archive {_archive_path(repo_path)} exported to {file}; "
        "it is useless without the passphrase",
        highlight=False,
    )


@key_app.command("import")
def key_import(
    repo_path: Path = typer.Argument(..., help="archive directory"),
    file: Path = typer.Argument(..., help="a key exported with lunseal archive key export"),
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
) -> None:
    """Put an exported key back (after losing the key file or a damaged archive key);
    it must belong to this archive and unlock with the passphrase."""
    path = _archive_path(repo_path)
    unlock = unlock_from(passphrase_file, key_file, ask=True)
    written = Repository.import_key(LocalStorage(path), read_key_file(file), unlock)
    where = f"key file {written}" if written else "the archive"
    console.print(f"key imported into {where}", highlight=False)


def restore(
    ctx: typer.Context,
    backup: str = typer.Argument(..., help="backup id (see lunseal backup list)"),
    to: str | None = typer.Option(None, "--to", help="restore into this LUN instead of the source"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan only"),
    from_: str | None = typer.Option(None, "--from", help="force the source: archive or mirror"),
    i_know: bool = typer.Option(
        False, "--i-know", help="allow --from mirror when its token changed"
    ),
    force: bool = typer.Option(False, "--force", help="even while hosts use the LUN"),
    verify_mirror: str = typer.Option(
        "copied", "--verify-mirror", help="check the copied chunks of the mirror, or full"
    ),
    archive: Path | None = ARCHIVE_OPTION,
    passphrase_file: Path | None = PASSPHRASE_FILE_OPTION,
    key_file: Path | None = KEY_FILE_OPTION,
    metrics_textfile: Path | None = METRICS_OPTION,
) -> None:
    """Restore a backup: from the mirror if its token is unchanged, else the archive.
    The mirror's chunks are checked against the backup first, the result after."""
    if from_ not in (None, "archive", "mirror"):
        raise InvalidArgument("--from takes archive or mirror")
    log = _say(ctx)
    repo = open_repo(archive, passphrase_file=passphrase_file, key_file=key_file)
    path = None if dry_run else textfile(metrics_textfile)
    with record_job("restore", to or "unknown", path) as run, client(ctx) as api:
        plan = plan_restore(
            api,
            repo,
            backup,
            to=to,
            force_from=from_,
            i_know=i_know,
            force=force,
            verify_mirror=verify_mirror,
        )
        run.lun = plan.dest
        if dry_run:
            log(plan.describe())
        else:
            with progress_bar(ctx, log) as progress:
                run_restore(api, repo, plan, log=log, progress=progress)
    if not options(ctx).json:
        if not dry_run:  # the result, last, once the progress bars are gone
            console.print(
                f"restored backup {plan.backup.id} to LUN {plan.dest}: verified", highlight=False
            )
        return
    typer.echo(
        _dumps(
            {
                "backup": plan.backup.id,
                "to": plan.dest,
                "path": plan.path,
                "reason": plan.reason,
                "mirror_bytes": plan.mirror_bytes,
                "archive_bytes": plan.archive_bytes,
                "dry_run": dry_run,
                "mirror_mismatches": plan.mirror_mismatches,
                "repaired": plan.repaired,
                "steps": log.steps,
            }
        )
    )


def _manifest_json(m: Manifest) -> dict[str, object]:
    return {
        "id": m.id,
        "created_at": m.created_at,
        "size": m.size,
        "chunk_size": m.chunk_size,
        "chunks": len(m.chunks),
        "stored_chunks": sum(1 for c in m.chunks if c is not None),
        "digest": m.digest,
        **m.meta,
    }


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)
