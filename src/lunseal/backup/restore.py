"""``restore``: from the disk copy when its token proves it is the backup,
else from the archive, or both (changed regions from the archive, the rest
from the mirror).  Always says which path it took and why, and verifies the
result against the manifest's chunk digests.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from lunseal.archive import Manifest, Repository
from lunseal.backup.common import Log, ProgressFn, nbd_uri, wait_mirror
from lunseal.client import ArrayClient
from lunseal.errors import Conflict, LunsealError, NotFound
from lunseal.nbd.client import NbdClient

log = logging.getLogger(__name__)

MIRROR, ARCHIVE, HYBRID = "mirror", "archive", "hybrid"
VERIFY_CONNECTIONS = 2
_SOURCES = {
    MIRROR: "from the mirror",
    ARCHIVE: "from the archive",
    HYBRID: "from the archive and the mirror",
}


@dataclass
class RestorePlan:
    backup: Manifest
    dest: str
    path: str
    reason: str
    #: Bytes the mirror (the disk copy) and the archive would supply.
    mirror_bytes: int = 0
    archive_bytes: int = 0
    archive_chunks: list[int] = field(default_factory=list)
    #: False when --i-know forced a changed disk copy: a difference from the
    #: backup is then expected, and verification only reports it.
    exact: bool = True

    def describe(self) -> str:
        return (
            f"restore backup {self.backup.id} to LUN {self.dest} {_SOURCES[self.path]}: "
            f"{self.reason}; the mirror supplies {self.mirror_bytes} bytes, "
            f"the archive {self.archive_bytes} bytes"
        )


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
) -> RestorePlan:
    m = repo.manifest(backup_id)
    dest = to or str(m.meta["source"])
    dest_size = api.show_lun(dest).size  # before anything is written, for every path
    if dest_size < m.size:
        raise Conflict(f"LUN {dest} is {dest_size} bytes; backup {m.id} needs {m.size}")
    intact, why = _target_intact(api, m)
    if force_from == ARCHIVE:
        return _archive_plan(m, dest, "forced with --from archive")
    if force_from == MIRROR:
        if not intact and not i_know:
            raise Conflict(
                f"the disk copy changed since backup {m.id} ({why}); restoring from it would "
                "not give the backup: add --i-know to do it anyway"
            )
        plan = _mirror_plan(api, m, dest, f"forced with --from mirror ({why})")
        if not intact:
            log.warning("restore of %s forced from a changed mirror: %s", m.id, why)
            plan.exact = False
        return plan
    if intact:
        return _mirror_plan(api, m, dest, f"the disk copy is intact: {why}")
    altered = _altered_chunks(api, m)
    if altered is None:
        return _archive_plan(m, dest, f"the disk copy changed ({why})")
    plan = _mirror_plan(api, m, dest, "")
    plan.path = HYBRID
    plan.reason = (
        f"the disk copy changed ({why}); its change map names {len(altered)} altered chunk(s), "
        "taken from the archive, the rest from the mirror"
    )
    plan.archive_chunks = altered
    plan.archive_bytes = sum(m.chunk_length(i) for i in altered)
    return plan


def _target_intact(api: ArrayClient, m: Manifest) -> tuple[bool, str]:
    try:
        check = api.check_token(str(m.meta["target"]), str(m.meta["token"]))
    except NotFound as exc:
        return False, exc.message
    try:
        mirror = api.mirror(str(m.meta["mirror"]))
    except NotFound as exc:
        return False, exc.message
    if check.result == "intact" and mirror.state != "split":
        return False, f"mirror {mirror.name} is {mirror.state}, not split"
    return check.result == "intact", check.reason


def _altered_chunks(api: ArrayClient, m: Manifest) -> list[int] | None:
    """Chunks the target's change map says changed since the backup, if it can say."""
    target, hold = str(m.meta["target"]), str(m.meta.get("hold", ""))
    try:
        if api.mirror(str(m.meta["mirror"])).state != "split":
            return None
        changes = api.changes(target, hold)
    except NotFound:
        return None
    cs = m.chunk_size
    chunks: set[int] = set()
    for ext in changes.extents:
        chunks.update(range(ext.offset // cs, (ext.offset + ext.length - 1) // cs + 1))
    return sorted(chunks)


def _archive_plan(m: Manifest, dest: str, reason: str) -> RestorePlan:
    chunks = list(range(len(m.chunks)))
    data = sum(m.chunk_length(i) for i in chunks if m.chunks[i] is not None)
    return RestorePlan(m, dest, ARCHIVE, reason, archive_bytes=data, archive_chunks=chunks)


def _mirror_plan(api: ArrayClient, m: Manifest, dest: str, reason: str) -> RestorePlan:
    # Another LUN gets the whole disk copy; the source only the reverse resync's regions.
    supplied = m.size
    if dest == m.meta["source"]:
        supplied = api.mirror(str(m.meta["mirror"])).bytes_left
    return RestorePlan(m, dest, MIRROR, reason, mirror_bytes=supplied)


# -- running a plan ---------------------------------------------------------------------


def run_restore(
    api: ArrayClient, repo: Repository, plan: RestorePlan, *, log: Log, progress: ProgressFn
) -> None:
    log(plan.describe())
    if plan.archive_chunks:
        _prevalidate(repo, plan, progress)  # never write from a damaged archive
    if plan.path in (MIRROR, HYBRID):
        _from_mirror(api, plan, log, progress)
    if plan.archive_chunks:
        _from_archive(api, repo, plan, progress)
        log(f"wrote {len(plan.archive_chunks)} chunk(s) from the archive to {plan.dest}")
    try:
        verify(api, plan.backup, plan.dest, log=log, progress=progress)
    except VerifyFailed as exc:
        if plan.exact:
            raise
        log(f"warning: {exc.message} (expected: restored from a changed disk copy with --i-know)")


def _prevalidate(repo: Repository, plan: RestorePlan, progress: ProgressFn) -> None:
    m = plan.backup
    for n, i in enumerate(plan.archive_chunks, 1):
        repo.read_backup_chunk(m, i)  # raises ArchiveCorrupt naming chunk and backups
        progress("checking archive", n, len(plan.archive_chunks))


def _from_mirror(api: ArrayClient, plan: RestorePlan, log: Log, progress: ProgressFn) -> None:
    m = plan.backup
    mirror, target = str(m.meta["mirror"]), str(m.meta["target"])
    if plan.dest == m.meta["source"]:
        api.restore_mirror(mirror)
        wait_mirror(api, mirror, progress)
        log(f"reverse resync of mirror {mirror}: {target} -> {plan.dest} done")
        return
    size = m.size
    with NbdClient(nbd_uri(api, target)) as src, NbdClient(nbd_uri(api, plan.dest)) as dst:
        cs = m.chunk_size
        ranges = [(o, min(cs, size - o)) for o in range(0, size, cs)]
        for offset, data in src.read_ranges(ranges):
            dst.write(offset, data)
            progress(f"copy {target} -> {plan.dest}", offset + len(data), size)
        dst.flush()
    log(f"copied disk copy {target} to {plan.dest}")


def _from_archive(
    api: ArrayClient, repo: Repository, plan: RestorePlan, progress: ProgressFn
) -> None:
    m = plan.backup
    total = len(plan.archive_chunks)
    with NbdClient(nbd_uri(api, plan.dest)) as nbd:
        if nbd.size < m.size:
            raise Conflict(f"LUN {plan.dest} is {nbd.size} bytes; the backup needs {m.size}")
        for n, i in enumerate(plan.archive_chunks, 1):
            offset, length = i * m.chunk_size, m.chunk_length(i)
            if m.chunks[i] is None:
                nbd.zero(offset, length)
            else:
                nbd.write(offset, repo.read_backup_chunk(m, i))
            progress(f"restore {plan.dest}", n, total)
        nbd.flush()


def verify(api: ArrayClient, m: Manifest, lun: str, *, log: Log, progress: ProgressFn) -> None:
    """Read ``lun`` back and compare every chunk with the manifest's digest.

    Reads on VERIFY_CONNECTIONS connections at once (the array advertises
    multi-conn): one stream is bounded by a single receiving thread.
    """
    uri = nbd_uri(api, lun)
    done = [0]

    def part(k: int) -> list[int]:
        indexes = range(k, len(m.chunks), VERIFY_CONNECTIONS)
        ranges = [(i * m.chunk_size, m.chunk_length(i)) for i in indexes]
        with NbdClient(uri) as nbd:
            bad = [o // m.chunk_size for o, d in nbd.read_ranges(ranges) if not _matches(m, o, d)]
        done[0] += len(ranges)
        progress(f"verify {lun}", done[0], len(m.chunks))
        return bad

    with ThreadPoolExecutor(VERIFY_CONNECTIONS) as pool:
        bad = sorted(i for found in pool.map(part, range(VERIFY_CONNECTIONS)) for i in found)
    if bad:
        raise VerifyFailed(
            f"LUN {lun} differs from backup {m.id} in {len(bad)} chunk(s), first at byte "
            f"{bad[0] * m.chunk_size}"
        )
    log(f"verified: LUN {lun} equals backup {m.id} ({len(m.chunks)} chunks)")


def _matches(m: Manifest, offset: int, data: bytes) -> bool:
    expected = m.chunks[offset // m.chunk_size]
    if expected is None:
        return data.count(0) == len(data)
    return blake3.blake3(data).hexdigest() == expected
