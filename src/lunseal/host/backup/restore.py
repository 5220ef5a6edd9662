"""``restore``: from the disk copy when its token proves it is the backup,
else from the archive, or both (changed regions from the archive, the rest
from the mirror).  Always says which path it took and why.

Nothing is trusted that can be checked: the disk copy may have been written
behind the array's back (a ``dd`` into its backing file leaves its token
alone while the daemon runs).  So every chunk the mirror is about to supply
is first compared with the backup's digest, and a mismatching one is taken
from the archive instead.  Because the disk copy could change again between
that check and the copy, the destination is read back afterwards and any
chunk that landed wrong is rewritten from the archive too; only then is the
restore reported done.  A restore therefore ends with exactly the backup's
data or fails (exit non-zero) saying where it differs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

from lunseal.errors import Conflict, InvalidArgument, LunsealError, NotFound
from lunseal.host.archive import Manifest, Repository
from lunseal.host.backup.common import Log, ProgressFn, nbd_uri, wait_mirror
from lunseal.host.backup.record import BackupRecord
from lunseal.host.client import ArrayClient
from lunseal.host.nbd_client import NbdClient

log = logging.getLogger(__name__)


class RestorePath(StrEnum):
    """Where a restore takes the backup's data from."""

    MIRROR = "mirror"  # the disk copy, its token unchanged since the backup
    ARCHIVE = "archive"
    HYBRID = "hybrid"  # changed regions from the archive, the rest from the disk copy


class VerifyMirror(StrEnum):
    """--verify-mirror: check the chunks the mirror will copy, or every chunk of the copy."""

    COPIED = "copied"
    FULL = "full"


VERIFY_CONNECTIONS = 2
#: How often (and how far apart) the destination's connections are looked at.
IN_USE_CHECKS, IN_USE_INTERVAL = 10, 0.1
_SOURCES = {
    RestorePath.MIRROR: "from the mirror",
    RestorePath.ARCHIVE: "from the archive",
    RestorePath.HYBRID: "from the archive and the mirror",
}


@dataclass
class RestorePlan:
    backup: Manifest
    dest: str
    path: RestorePath
    reason: str
    #: Bytes the mirror (the disk copy) and the archive would supply.
    mirror_bytes: int = 0
    archive_bytes: int = 0
    archive_chunks: list[int] = field(default_factory=list)
    #: Restore even while hosts are connected to the destination.
    force: bool = False
    verify_mirror: VerifyMirror = VerifyMirror.COPIED
    #: Chunks of the disk copy found to differ from the backup (taken from the archive).
    mirror_mismatches: list[int] = field(default_factory=list)
    #: Chunks that landed wrong on the destination and were rewritten from the archive.
    repaired: list[int] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"restore backup {self.backup.id} to LUN {self.dest} {_SOURCES[self.path]}: "
            f"{self.reason}; the mirror supplies {self.mirror_bytes} bytes, "
            f"the archive {self.archive_bytes} bytes"
        )

    def uses_mirror(self) -> bool:
        return self.path in (RestorePath.MIRROR, RestorePath.HYBRID)

    def take_from_archive(self, chunks: Iterable[int]) -> None:
        added = sorted(set(chunks) - set(self.archive_chunks))
        self.archive_chunks = sorted([*self.archive_chunks, *added])
        self.archive_bytes += sum(self.backup.chunk_length(i) for i in added)


class VerifyFailed(LunsealError):
    exit_code = 10
    code = "verify_failed"


def plan_restore(
    api: ArrayClient,
    repo: Repository,
    backup_id: str,
    *,
    to: str | None = None,
    force_from: str | None = None,
    i_know: bool = False,
    force: bool = False,
    verify_mirror: str = VerifyMirror.COPIED,
) -> RestorePlan:
    try:
        verify = VerifyMirror(verify_mirror)
    except ValueError:
        raise InvalidArgument("--verify-mirror takes copied or full") from None
    forced = None
    if force_from is not None:
        if force_from not in (RestorePath.ARCHIVE, RestorePath.MIRROR):
            raise InvalidArgument("--from takes archive or mirror")
        forced = RestorePath(force_from)
    manifest = repo.manifest(backup_id)
    BackupRecord.of(manifest)  # a manifest without a backup record stops here, in one line
    plan = _choose(api, manifest, to, forced, i_know)
    plan.force, plan.verify_mirror = force, verify
    return plan


def _choose(
    api: ArrayClient, m: Manifest, to: str | None, force_from: RestorePath | None, i_know: bool
) -> RestorePlan:
    dest = to or BackupRecord.of(m).source
    dest_size = api.show_lun(dest).size  # before anything is written, for every path
    if dest_size < m.size:
        raise Conflict(f"LUN {dest} is {dest_size} bytes; backup {m.id} needs {m.size}")
    if force_from == RestorePath.ARCHIVE:
        return _archive_plan(m, dest, "forced with --from archive")
    other_disk = _other_disk(api, m)
    if force_from == RestorePath.MIRROR and other_disk:
        raise Conflict(f"{other_disk}: refusing to restore from it (not even with --i-know)")
    intact, why = (False, other_disk) if other_disk else _target_intact(api, m)
    if force_from == RestorePath.MIRROR:
        if not intact and not i_know:
            raise Conflict(
                f"the disk copy changed since backup {m.id} ({why}); restoring from it would "
                "not give the backup: add --i-know to do it anyway"
            )
        if not intact:
            log.warning("restore of %s forced from a changed mirror: %s", m.id, why)
        return _mirror_plan(api, m, dest, f"forced with --from mirror ({why})")
    if intact:
        return _mirror_plan(api, m, dest, f"the disk copy is intact: {why}")
    altered = None if other_disk else _altered_chunks(api, m)
    if altered is None:
        return _archive_plan(m, dest, f"the disk copy changed ({why})")
    plan = _mirror_plan(api, m, dest, "")
    plan.path = RestorePath.HYBRID
    plan.reason = (
        f"the disk copy changed ({why}); its change map names {len(altered)} altered chunk(s), "
        "taken from the archive, the rest from the mirror"
    )
    plan.take_from_archive(altered)
    return plan


def _other_disk(api: ArrayClient, m: Manifest) -> str:
    """Why the LUN named as the backup's disk copy is not that disk ('' when it is).

    A LUN re-created under the same name is a different disk, whatever it holds."""
    rec = BackupRecord.of(m)
    target, want = rec.target, rec.target_uuid
    try:
        found = api.show_lun(target).uuid
    except NotFound:
        return ""  # no copy at all: the token check says so
    if want and found != want:
        return (
            f"LUN {target} is not the disk copy of backup {m.id}: its UUID is {found}, "
            f"the copy's was {want}"
        )
    return ""


def _target_intact(api: ArrayClient, m: Manifest) -> tuple[bool, str]:
    rec = BackupRecord.of(m)
    try:
        check = api.check_token(rec.target, rec.token)
    except NotFound as exc:
        return False, exc.message
    try:
        mirror = api.mirror(rec.mirror)
    except NotFound as exc:
        return False, exc.message
    if check.result == "intact" and mirror.state != "split":
        return False, f"mirror {mirror.name} is {mirror.state}, not split"
    return check.result == "intact", check.reason


def _altered_chunks(api: ArrayClient, m: Manifest) -> list[int] | None:
    """Chunks the target's change map says changed since the backup, if it can say."""
    rec = BackupRecord.of(m)
    target, hold = rec.target, rec.hold
    try:
        if api.mirror(rec.mirror).state != "split":
            return None
        changes = api.changes(target, hold)
    except NotFound:
        return None
    return sorted(_chunks_of(m.chunk_size, ((e.offset, e.length) for e in changes.extents)))


def _chunks_of(chunk_size: int, extents: Iterable[tuple[int, int]]) -> set[int]:
    chunks: set[int] = set()
    for offset, length in extents:
        chunks.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return chunks


def _archive_plan(m: Manifest, dest: str, reason: str) -> RestorePlan:
    chunks = list(range(len(m.chunks)))
    data = sum(m.chunk_length(i) for i in chunks if m.chunks[i] is not None)
    return RestorePlan(
        m, dest, RestorePath.ARCHIVE, reason, archive_bytes=data, archive_chunks=chunks
    )


def _mirror_plan(api: ArrayClient, m: Manifest, dest: str, reason: str) -> RestorePlan:
    # Another LUN gets the whole disk copy; the source only the reverse resync's regions.
    supplied = m.size
    if _reverse_resync(m, dest):
        supplied = api.mirror(BackupRecord.of(m).mirror).bytes_left
    return RestorePlan(m, dest, RestorePath.MIRROR, reason, mirror_bytes=supplied)


def _reverse_resync(m: Manifest, dest: str) -> bool:
    return dest == BackupRecord.of(m).source


# -- running a plan ---------------------------------------------------------------------


def run_restore(
    api: ArrayClient, repo: Repository, plan: RestorePlan, *, log: Log, progress: ProgressFn
) -> None:
    log(plan.describe())
    # Before this tool opens any connection of its own to the destination.
    _refuse_if_in_use(api, plan)
    if plan.uses_mirror() and _reverse_resync(plan.backup, plan.dest):
        _check_mirror(api, plan, log, progress)
    if plan.archive_chunks:
        _prevalidate(repo, plan.backup, plan.archive_chunks, progress)  # never from damage
    if plan.uses_mirror():
        _from_mirror(api, repo, plan, log, progress)
    if plan.archive_chunks:
        _from_archive(api, repo, plan, plan.archive_chunks, progress)
        log(f"wrote {len(plan.archive_chunks)} chunk(s) from the archive to {plan.dest}")
    _verify_and_repair(api, repo, plan, log, progress)


def _refuse_if_in_use(api: ArrayClient, plan: RestorePlan) -> None:
    if plan.force:
        return
    info = api.show_lun(plan.dest)
    # A client that has just disconnected may take a moment to be gone: look a few times.
    for _ in range(IN_USE_CHECKS - 1):
        if not info.connections:
            return
        time.sleep(IN_USE_INTERVAL)
        info = api.show_lun(plan.dest)
    if info.connections:
        raise Conflict(
            f"LUN {plan.dest} is in use by {info.connections} host connection(s) "
            f"({', '.join(info.clients) or 'unknown peers'}): a restore rewrites it under "
            "them; disconnect them or add --force"
        )


def _span(m: Manifest, chunks: list[int]) -> str:
    """Human-readable byte ranges of chunks, e.g. "chunk 2 (bytes 2097152-3145727)"."""
    parts = [
        f"chunk {i} (bytes {i * m.chunk_size}-{i * m.chunk_size + m.chunk_length(i) - 1})"
        for i in chunks[:8]
    ]
    more = f" and {len(chunks) - 8} more" if len(chunks) > 8 else ""
    return ", ".join(parts) + more


def _check_mirror(api: ArrayClient, plan: RestorePlan, log: Log, progress: ProgressFn) -> None:
    """Compare the chunks the reverse resync will copy (or, with --verify-mirror
    full, every chunk) of the disk copy with the backup; take bad ones from the archive."""
    m, rec = plan.backup, BackupRecord.of(plan.backup)
    if plan.verify_mirror == VerifyMirror.FULL:
        wanted = set(range(len(m.chunks)))
    else:
        regions = api.mirror_regions(rec.mirror).extents
        wanted = _chunks_of(m.chunk_size, ((e.offset, e.length) for e in regions))
    todo = sorted(wanted - set(plan.archive_chunks))
    bad = _mismatches(api, m, rec.target, todo, progress, "check disk copy")
    log(f"checked {len(todo)} chunk(s) of the disk copy {rec.target} against the backup")
    if bad:
        log(
            f"the disk copy differs from backup {m.id} in {len(bad)} chunk(s): "
            f"{_span(m, bad)}; taken from the archive"
        )
        plan.mirror_mismatches = bad
        plan.take_from_archive(bad)


def _mismatches(
    api: ArrayClient, m: Manifest, lun: str, chunks: list[int], progress: ProgressFn, what: str
) -> list[int]:
    total = sum(m.chunk_length(i) for i in chunks)
    done, bad = 0, []
    with NbdClient(nbd_uri(api, lun)) as nbd:
        ranges = [(i * m.chunk_size, m.chunk_length(i)) for i in chunks]
        for offset, data in nbd.read_ranges(ranges):
            if not _matches(m, offset, data):
                bad.append(offset // m.chunk_size)
            done += len(data)
            progress(what, done, total)
    return bad


def _prevalidate(repo: Repository, m: Manifest, chunks: list[int], progress: ProgressFn) -> None:
    stored = [i for i in chunks if m.chunks[i] is not None]  # zero chunks are not stored
    total, done = sum(m.chunk_length(i) for i in stored), 0
    for i in stored:
        repo.read_backup_chunk(m, i)  # raises ArchiveCorrupt naming chunk and backups
        done += m.chunk_length(i)
        progress("checking archive", done, total)


def _from_mirror(
    api: ArrayClient, repo: Repository, plan: RestorePlan, log: Log, progress: ProgressFn
) -> None:
    m = plan.backup
    rec = BackupRecord.of(m)
    mirror, target = rec.mirror, rec.target
    if _reverse_resync(m, plan.dest):
        api.restore_mirror(mirror, force=plan.force)
        wait_mirror(api, mirror, progress)
        log(f"reverse resync of mirror {mirror}: {target} -> {plan.dest} done")
        return
    bad = _copy_checked(api, plan, progress)
    log(f"copied disk copy {target} to {plan.dest}")
    if bad:
        log(
            f"the disk copy differs from backup {m.id} in {len(bad)} chunk(s): "
            f"{_span(m, bad)}; taken from the archive"
        )
        plan.mirror_mismatches = bad
        plan.take_from_archive(bad)
        _prevalidate(repo, m, bad, progress)


def _copy_checked(api: ArrayClient, plan: RestorePlan, progress: ProgressFn) -> list[int]:
    """Copy the disk copy chunk by chunk to another LUN; a chunk whose digest is
    not the backup's is not written (the archive supplies it) and is returned."""
    m, target = plan.backup, BackupRecord.of(plan.backup).target
    skip, bad = set(plan.archive_chunks), []
    ranges = [(i * m.chunk_size, m.chunk_length(i)) for i in range(len(m.chunks)) if i not in skip]
    with NbdClient(nbd_uri(api, target)) as src, NbdClient(nbd_uri(api, plan.dest)) as dst:
        for offset, data in src.read_ranges(ranges):
            if _matches(m, offset, data):
                dst.write(offset, data)
            else:
                bad.append(offset // m.chunk_size)
            progress(f"copy {target} -> {plan.dest}", offset + len(data), m.size)
        dst.flush()
    return bad


def _from_archive(
    api: ArrayClient, repo: Repository, plan: RestorePlan, chunks: list[int], progress: ProgressFn
) -> None:
    m = plan.backup
    total, done = sum(m.chunk_length(i) for i in chunks), 0
    with NbdClient(nbd_uri(api, plan.dest)) as nbd:
        if nbd.size < m.size:
            raise Conflict(f"LUN {plan.dest} is {nbd.size} bytes; the backup needs {m.size}")
        for i in chunks:
            offset, length = i * m.chunk_size, m.chunk_length(i)
            if m.chunks[i] is None:
                nbd.zero(offset, length)
            else:
                nbd.write(offset, repo.read_backup_chunk(m, i))
            done += length
            progress(f"restore {plan.dest}", done, total)
        nbd.flush()


def _verify_and_repair(
    api: ArrayClient, repo: Repository, plan: RestorePlan, log: Log, progress: ProgressFn
) -> None:
    """Read the destination back; chunks that landed wrong (the disk copy changed
    after it was checked) are rewritten from the archive and checked again."""
    m = plan.backup
    bad = find_differences(api, m, plan.dest, progress)
    if bad:
        log(
            f"{len(bad)} chunk(s) landed on {plan.dest} different from backup {m.id}: "
            f"{_span(m, bad)}; rewritten from the archive"
        )
        plan.repaired = bad
        _from_archive(api, repo, plan, bad, progress)
        still = _mismatches(api, m, plan.dest, bad, progress, f"verify {plan.dest}")
        if still:
            raise VerifyFailed(
                f"LUN {plan.dest} differs from backup {m.id} in {len(still)} chunk(s) even "
                f"after rewriting them from the archive: {_span(m, still)}"
            )
    log(f"verified: LUN {plan.dest} equals backup {m.id} ({len(m.chunks)} chunks)")


def find_differences(api: ArrayClient, m: Manifest, lun: str, progress: ProgressFn) -> list[int]:
    """Read ``lun`` back and return the chunks whose content is not the backup's.

    Reads on VERIFY_CONNECTIONS connections at once (the array advertises
    multi-conn): one stream is bounded by a single receiving thread.
    """
    uri = nbd_uri(api, lun)
    done = [0]
    lock = threading.Lock()  # one figure, in order: a stale one would redraw a finished bar

    def part(k: int) -> list[int]:
        indexes = range(k, len(m.chunks), VERIFY_CONNECTIONS)
        ranges = [(i * m.chunk_size, m.chunk_length(i)) for i in indexes]
        bad = []
        with NbdClient(uri) as nbd:
            for o, d in nbd.read_ranges(ranges):
                if not _matches(m, o, d):
                    bad.append(o // m.chunk_size)
                with lock:
                    done[0] += len(d)
                    progress(f"verify {lun}", done[0], m.size)
        return bad

    with ThreadPoolExecutor(VERIFY_CONNECTIONS) as pool:
        return sorted(i for found in pool.map(part, range(VERIFY_CONNECTIONS)) for i in found)


def verify(api: ArrayClient, m: Manifest, lun: str, *, log: Log, progress: ProgressFn) -> None:
    """Raise VerifyFailed unless ``lun`` holds exactly the backup's data."""
    bad = find_differences(api, m, lun, progress)
    if bad:
        raise VerifyFailed(
            f"LUN {lun} differs from backup {m.id} in {len(bad)} chunk(s): {_span(m, bad)}"
        )
    log(f"verified: LUN {lun} equals backup {m.id} ({len(m.chunks)} chunks)")


def _matches(m: Manifest, offset: int, data: bytes) -> bool:
    expected = m.chunks[offset // m.chunk_size]
    if expected is None:
        return data.count(0) == len(data)
    return m.chunk_id(data) == expected
