"""``backup create``: the seed's hostCode backup, with an incremental series.

resync the mirror (or create it) -> wait until synced -> pre-split hook ->
split -> post-split hook -> hold with a change map on the target + its token
-> stream the target into the archive -> record the backup.

Incremental: when the previous backup of the same source on the same target
still checks ``intact``, only the chunks its hold's change map names (which
include what the resync wrote) are read; the rest reference its chunks.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from lunseal.engine.state.tracker import TrackingMode
from lunseal.errors import ArchiveCorrupt, Conflict, LunsealError, NotFound
from lunseal.host.archive import Manifest, Repository
from lunseal.host.backup.common import Log, ProgressFn, nbd_uri, wait_mirror
from lunseal.host.backup.hooks import run_hook
from lunseal.host.backup.record import BackupMode, BackupRecord
from lunseal.host.client import ArrayClient
from lunseal.host.nbd_client import NbdClient
from lunseal.schema.mirrors import MirrorInfo

HOLD_GRANULARITY = "64K"
#: The holds this tool takes (``backup-`` + 12 hex digits).
_HOLD_RE = re.compile(r"^backup-[0-9a-f]{12}$")


@dataclass
class BackupResult:
    manifest: Manifest
    mode: BackupMode
    reason: str
    bytes_read: int


@dataclass
class Basis:
    """What the new backup can build on."""

    parent: Manifest | None
    changed_chunks: set[int] | None  # None: read everything
    reason: str


def latest_backup(
    repo: Repository, source: str, target: str, log: Log | None = None
) -> Manifest | None:
    """The newest readable backup of ``source`` on ``target``.

    A damaged manifest must not stop every later backup: it is skipped (and
    said).  Building on an older backup is safe: its token or change map no
    longer matches the target, so the next backup reads everything.
    """
    series: list[Manifest] = []
    for backup_id in repo.manifest_ids():
        try:
            m = repo.manifest(backup_id)
        except ArchiveCorrupt as exc:
            if log is not None:
                log(f"warning: {exc.message}: not used as the basis of this backup")
            continue
        try:
            rec = BackupRecord.of(m)
        except ArchiveCorrupt:
            continue  # not a backup this tool made: nothing to build on
        if rec.source == source and rec.target == target:
            series.append(m)
    return max(series, key=lambda m: m.created_at, default=None)


def create_backup(
    api: ArrayClient,
    repo: Repository,
    source: str,
    mirror: str,
    *,
    pre_split: str | None = None,
    post_split: str | None = None,
    target_access: str = "ro",
    log: Log,
    progress: ProgressFn,
) -> BackupResult:
    src = api.show_lun(source)
    m = _ensure_mirror(api, source, mirror, log, progress)
    basis = _basis(api, repo, source, m.target, log)
    m = _resync(api, m, log, progress)
    run_hook("pre-split", pre_split)  # a failure leaves the mirror synced
    api.split_mirror(m.name, target_access=target_access)
    log(f"split mirror {m.name} (target {m.target}, hosts {target_access})")
    try:
        run_hook("post-split", post_split)
    except LunsealError as exc:
        log(f"warning: {exc.message} (the split copy is taken; continuing)")
    hold = f"backup-{uuid.uuid4().hex[:12]}"
    info = api.acquire_hold(m.target, hold, mode=TrackingMode.COUNTER, granularity=HOLD_GRANULARITY)
    log(f"target {m.target} token {info.token} (hold {hold})")
    rec = BackupRecord(
        source=source,
        source_uuid=src.uuid,
        mirror=m.name,
        target=m.target,
        target_uuid=api.show_lun(m.target).uuid,
        token=info.token,
        hold=hold,
        parent=basis.parent.id if basis.parent else None,
        mode=BackupMode.FULL if basis.changed_chunks is None else BackupMode.INCREMENTAL,
        reason=basis.reason,
    )
    manifest, read = _stream(api, repo, m.target, src.size, basis, rec, progress)
    log(f"backup {manifest.id}: {rec.mode}, read {read} bytes of {src.size}")
    _release_earlier_holds(api, m.target, hold, log)
    return BackupResult(manifest, rec.mode, basis.reason, read)


def _ensure_mirror(
    api: ArrayClient, source: str, mirror: str, log: Log, progress: ProgressFn
) -> MirrorInfo:
    try:
        m = api.mirror(mirror)
    except NotFound:
        log(f"no mirror {mirror}: creating it (target LUN {mirror})")
        m = api.create_mirror(source, mirror, create_target=True)
        return wait_mirror(api, m.name, progress)
    if m.source != source:
        raise Conflict(f"mirror {m.name} mirrors {m.source}, not {source}")
    return m


def _basis(api: ArrayClient, repo: Repository, source: str, target: str, log: Log) -> Basis:
    parent = latest_backup(repo, source, target, log)
    if parent is None:
        reason = f"no earlier backup of {source} on {target}: full read"
        log(reason)
        return Basis(None, None, reason)
    parent_rec = BackupRecord.of(parent)
    check = api.check_token(target, parent_rec.token)
    if check.result != "intact":
        reason = f"mirror was altered since backup {parent.id}: full read ({check.reason})"
        log(reason)
        return Basis(parent, None, reason)
    hold = parent_rec.hold
    if hold not in {h.name for h in api.list_holds(target) if h.granularity}:
        reason = f"the change map of backup {parent.id} is gone: full read"
        log(reason)
        return Basis(parent, None, reason)
    reason = f"mirror unchanged since backup {parent.id}: incremental"
    log(reason)
    return Basis(parent, set(), reason)


def _resync(api: ArrayClient, m: MirrorInfo, log: Log, progress: ProgressFn) -> MirrorInfo:
    if m.state in ("split", "degraded"):
        api.resync_mirror(m.name)
        log(f"resync mirror {m.name}: {m.bytes_left} bytes to copy")
    m = wait_mirror(api, m.name, progress)
    if m.state != "synced":
        raise Conflict(f"mirror {m.name} is {m.state}, expected synced")
    log(f"mirror {m.name} synced")
    return m


def _changed_chunks(api: ArrayClient, target: str, hold: str, chunk_size: int) -> set[int]:
    chunks: set[int] = set()
    for ext in api.changes(target, hold).extents:
        chunks.update(
            range(ext.offset // chunk_size, (ext.offset + ext.length - 1) // chunk_size + 1)
        )
    return chunks


def _stream(
    api: ArrayClient,
    repo: Repository,
    target: str,
    size: int,
    basis: Basis,
    rec: BackupRecord,
    progress: ProgressFn,
) -> tuple[Manifest, int]:
    cs = repo.chunk_size
    count = -(-size // cs)
    if basis.changed_chunks is not None and basis.parent is not None:
        wanted = _changed_chunks(api, target, BackupRecord.of(basis.parent).hold, cs)
    else:
        wanted = set(range(count))
    ranges = [(i * cs, min(cs, size - i * cs)) for i in sorted(wanted)]
    total = sum(n for _, n in ranges)
    read = 0
    with repo.begin_backup(rec.to_meta(), size) as writer, NbdClient(nbd_uri(api, target)) as nbd:
        if basis.parent is not None and basis.changed_chunks is not None:
            for i in range(count):
                if i not in wanted:
                    writer.reuse_chunk(i, basis.parent.chunks[i])
        for offset, data in nbd.read_ranges(ranges):
            writer.add_chunk(offset // cs, data)
            read += len(data)
            progress(f"backup {target}", read, total)
        # Unchanged since the token: what was read is the copy at the token, not
        # a torn image of a copy someone wrote (a host with rw access, a resync).
        check = api.check_token(target, rec.token)
        if check.result != "intact":
            raise Conflict(
                f"the disk copy {target} changed while it was read ({check.reason}): "
                "the backup is not recorded; run it again"
            )
        writer.meta["bytes_read"] = read  # known only now; the manifest is written last
        return writer.commit(), read


def _release_earlier_holds(api: ArrayClient, target: str, keep: str, log: Log) -> None:
    """Release every earlier backup hold on the target: the previous backup's, and those
    of runs that were killed or whose record is unreadable.  Only the newest backup's
    change map is ever used."""
    for h in api.list_holds(target):
        if h.name != keep and _HOLD_RE.match(h.name):
            try:
                api.release_hold(target, h.name)
                log(f"released hold {h.name} of an earlier backup")
            except NotFound:
                pass
