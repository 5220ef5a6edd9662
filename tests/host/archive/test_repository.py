"""The archive repository against real files: roundtrip, dedup, crashes, damage, prune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lunseal.errors import (
    ERRORS_BY_CODE,
    ArchiveCorrupt,
    Conflict,
    InvalidArgument,
    NotFound,
    NotSupported,
)
from lunseal.host.archive import LocalStorage, Manifest, Repository, Storage
from lunseal.host.archive.repository import chunk_key, manifest_key

CS = 64 * 1024  # small chunks keep the tests fast


class Clock:
    """A settable clock, so tests can craft backup times."""

    def __init__(self) -> None:
        self.now = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)  # distinct times, still in order
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(tmp_path: Path, clock: Clock) -> Repository:
    return Repository.open_local(tmp_path / "archive", chunk_size=CS, clock=clock)


def root(repo: Repository) -> Path:
    assert isinstance(repo.storage, LocalStorage)
    return repo.storage.root


def chunk_path(repo: Repository, digest: str) -> Path:
    return root(repo) / chunk_key(digest)


def manifest_path(repo: Repository, backup_id: str) -> Path:
    return root(repo) / manifest_key(backup_id)


def chunk_files(repo: Repository) -> list[str]:
    """Chunk objects on disk (temp files of interrupted puts start with a dot)."""
    files = (p.name for p in (root(repo) / "chunks").rglob("*") if p.is_file())
    return sorted(name for name in files if not name.startswith("."))


def temp_files(repo: Repository) -> list[Path]:
    return [p for p in root(repo).rglob(".*.tmp") if p.is_file()]


def backup(repo: Repository, chunks: list[bytes], **meta: object) -> Manifest:
    size = sum(len(c) for c in chunks)
    with repo.begin_backup(dict(meta), size) as writer:
        for i, data in enumerate(chunks):
            writer.add_chunk(i, data)
        return writer.commit()


def restore(repo: Repository, manifest: Manifest) -> bytes:
    return b"".join(repo.read_backup_chunk(manifest, i) for i in range(len(manifest.chunks)))


def rand(n: int = CS) -> bytes:
    return os.urandom(n)


# -- opening --------------------------------------------------------------------


def test_open_local_writes_and_reads_the_config(tmp_path: Path) -> None:
    Repository.open_local(tmp_path / "a", chunk_size=CS)
    config = json.loads((tmp_path / "a" / "config").read_bytes())
    assert config == {"format": "lunseal-archive", "version": 1, "chunk_size": CS}
    # The stored chunk size wins over the argument: it is a property of the repository.
    assert Repository.open_local(tmp_path / "a", create=False).chunk_size == CS


def test_open_missing_repository_without_create(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        Repository.open_local(tmp_path / "none", create=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no config"):
        Repository.open_local(tmp_path / "empty", create=False)


def test_bad_or_future_config(tmp_path: Path) -> None:
    (tmp_path / "config").write_bytes(b"{not json")
    with pytest.raises(ArchiveCorrupt, match="config"):
        Repository.open_local(tmp_path)
    (tmp_path / "config").write_text('{"format": "lunseal-archive", "version": 99}')
    with pytest.raises(NotSupported, match="99"):
        Repository.open_local(tmp_path)


@pytest.mark.parametrize("size", [0, 1000, 4097, 128 * 1024 * 1024])
def test_invalid_chunk_sizes(tmp_path: Path, size: int) -> None:
    with pytest.raises(InvalidArgument):
        Repository.open_local(tmp_path, chunk_size=size)


def test_archive_corrupt_error_codes() -> None:
    assert ArchiveCorrupt.exit_code == 8
    assert ERRORS_BY_CODE["archive_corrupt"] is ArchiveCorrupt


# -- writing and reading --------------------------------------------------------


def test_roundtrip_random_zero_and_short_tail(repo: Repository) -> None:
    chunks = [rand(), bytes(CS), rand(), rand(1000)]
    manifest = backup(repo, chunks, source="lun0", mode="full")
    assert manifest.size == 3 * CS + 1000
    assert manifest.chunk_size == CS
    assert manifest.chunks[1] is None  # zero chunks are not stored
    assert all(isinstance(d, str) for i, d in enumerate(manifest.chunks) if i != 1)
    assert len(chunk_files(repo)) == 3
    assert restore(repo, manifest) == b"".join(chunks)
    assert repo.manifest(manifest.id) == manifest
    assert repo.manifests() == [manifest]
    assert manifest.meta == {"source": "lun0", "mode": "full"}


def test_chunk_objects_are_compressed_with_a_header(repo: Repository) -> None:
    data = b"lunseal " * (CS // 8)
    manifest = backup(repo, [data])
    digest = manifest.chunks[0]
    assert digest is not None
    blob = chunk_path(repo, digest).read_bytes()
    assert blob.startswith(b"LSCHUNK\x01")
    assert len(blob) < CS // 10
    assert repo.read_chunk(digest) == data


def test_manifest_id_and_json(repo: Repository, clock: Clock) -> None:
    manifest = backup(repo, [rand()])
    assert manifest.id.startswith(clock.now.strftime("%Y%m%dT%H%M%SZ-"))
    assert len(manifest.id.rpartition("-")[2]) == 6
    assert manifest.created == clock.now
    assert manifest.created_at.endswith("Z")
    stored = json.loads(manifest_path(repo, manifest.id).read_bytes())
    assert stored["digest"] == manifest.digest
    assert stored["chunks"] == manifest.chunks


def test_manifests_are_listed_oldest_first(repo: Repository) -> None:
    ids = [backup(repo, [rand()]).id for _ in range(4)]
    assert [m.id for m in repo.manifests()] == ids == sorted(ids)
    assert repo.manifest_ids() == ids


def test_meta_is_stored_as_json(repo: Repository) -> None:
    manifest = backup(repo, [rand()], parent=None, token=(1, 2), bytes_read=123)
    assert manifest.meta == {"parent": None, "token": [1, 2], "bytes_read": 123}
    assert repo.manifest(manifest.id) == manifest


def test_meta_can_be_completed_before_commit(repo: Repository) -> None:
    with repo.begin_backup({"source": "lun0"}, CS) as writer:
        writer.add_chunk(0, rand())
        writer.meta["bytes_read"] = CS  # known only at the end
        manifest = writer.commit()
    assert repo.manifest(manifest.id).meta == {"source": "lun0", "bytes_read": CS}


@pytest.mark.parametrize("meta", [{"x": object()}, {"x": float("nan")}])
def test_meta_must_be_plain_json(repo: Repository, meta: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match="JSON"):
        repo.begin_backup(meta, CS)
    with repo.begin_backup({}, CS) as writer:
        writer.add_chunk(0, rand())
        writer.meta.update(meta)
        with pytest.raises(InvalidArgument, match="JSON"):
            writer.commit()
    assert repo.manifest_ids() == []


def test_empty_image(repo: Repository) -> None:
    manifest = backup(repo, [])
    assert manifest.chunks == []
    assert restore(repo, manifest) == b""


def test_dedup_within_and_across_backups(repo: Repository) -> None:
    data = rand()
    with repo.begin_backup({}, 2 * CS) as writer:
        writer.add_chunk(0, data)
        writer.add_chunk(1, data)
        first = writer.commit()
    assert (writer.stats.chunks_written, writer.stats.chunks_deduplicated) == (1, 1)
    assert writer.stats.bytes_stored == chunk_path(repo, first.chunks[0] or "").stat().st_size
    before = chunk_path(repo, first.chunks[0] or "").stat().st_mtime_ns
    second = backup(repo, [data, data])
    assert second.chunks == first.chunks
    assert len(chunk_files(repo)) == 1
    assert chunk_path(repo, first.chunks[0] or "").stat().st_mtime_ns == before  # not rewritten


def test_parallel_writers_threads(repo: Repository) -> None:
    chunks = [rand() if i % 3 else bytes(CS) for i in range(24)]
    with repo.begin_backup({}, len(chunks) * CS) as writer, ThreadPoolExecutor(4) as pool:
        list(pool.map(writer.add_chunk, range(len(chunks)), chunks))
        manifest = writer.commit()
    assert restore(repo, manifest) == b"".join(chunks)
    assert writer.stats.chunks_zero == 8


def test_incremental_reuses_previous_chunks(repo: Repository) -> None:
    base = [rand(), bytes(CS), rand(), rand(10)]
    full = backup(repo, base, mode="full")
    changed = rand()
    with repo.begin_backup({"mode": "incremental", "parent": full.id}, full.size) as writer:
        for i in (0, 1, 3):
            writer.reuse_chunk(i, full.chunks[i])
        writer.add_chunk(2, changed)
        incremental = writer.commit()
    assert writer.stats.chunks_reused == 3
    assert incremental.chunks[0] == full.chunks[0]
    assert incremental.chunks[1] is None
    assert incremental.chunks[2] != full.chunks[2]
    assert incremental.meta["parent"] == full.id
    assert restore(repo, incremental) == base[0] + base[1] + changed + base[3]
    assert restore(repo, full) == b"".join(base)


def test_reuse_rejects_unknown_chunks(repo: Repository) -> None:
    with repo.begin_backup({}, CS) as writer:
        with pytest.raises(ArchiveCorrupt, match="not in the archive"):
            writer.reuse_chunk(0, "ab" * 32)
        with pytest.raises(InvalidArgument):
            writer.reuse_chunk(0, "not-a-digest")


def test_writer_rejects_misuse(repo: Repository) -> None:
    with repo.begin_backup({}, CS + 10) as writer:
        with pytest.raises(InvalidArgument, match="must be 10 bytes"):
            writer.add_chunk(1, rand(CS))
        with pytest.raises(InvalidArgument, match="outside"):
            writer.add_chunk(2, rand(10))
        writer.add_chunk(0, rand())
        with pytest.raises(InvalidArgument, match="already added"):
            writer.add_chunk(0, rand())
        with pytest.raises(InvalidArgument, match="incomplete"):
            writer.commit()
        writer.add_chunk(1, rand(10))
        writer.commit()
        with pytest.raises(InvalidArgument, match="already committed"):
            writer.add_chunk(1, rand(10))
    with pytest.raises(InvalidArgument):
        repo.begin_backup({}, -1)


def test_works_on_any_storage_implementation(tmp_path: Path) -> None:
    """The repository needs only the Storage interface: an in-memory store suffices."""
    from contextlib import nullcontext

    class MemoryStorage(Storage):
        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}

        def put(self, key: str, data: bytes) -> None:
            self.objects[key] = bytes(data)

        def get(self, key: str) -> bytes:
            if key not in self.objects:
                raise NotFound(key)
            return self.objects[key]

        def exists(self, key: str) -> bool:
            return key in self.objects

        def size(self, key: str) -> int:
            return len(self.get(key))

        def list(self, prefix: str) -> list[str]:
            return sorted(k for k in self.objects if k.startswith(prefix))

        def delete(self, key: str) -> None:
            self.objects.pop(key, None)

        def lock(self, *, exclusive: bool, timeout: float = 0.0) -> nullcontext[None]:
            return nullcontext()

    store = MemoryStorage()
    repo = Repository.open(store, chunk_size=CS)
    chunks = [rand(), bytes(CS), rand(5)]
    first = backup(repo, chunks)
    backup(repo, [rand()])
    assert restore(Repository.open(store, create=False), first) == b"".join(chunks)
    assert repo.check(read_data=True).ok
    assert repo.prune(keep_last=1, keep_daily=None).removed == [first.id]
    assert len(repo.storage.list("chunks/")) == 1


# -- crashes --------------------------------------------------------------------


def test_uncommitted_backup_leaves_only_garbage(repo: Repository) -> None:
    kept = backup(repo, [rand()])
    with repo.begin_backup({}, 2 * CS) as writer:
        writer.add_chunk(0, rand())
    assert repo.manifest_ids() == [kept.id]
    report = repo.check(read_data=True)
    assert report.ok
    assert report.unreferenced_chunks == 1
    pruned = repo.prune(keep_last=5, keep_daily=None)
    assert (pruned.removed, pruned.chunks_removed) == ([], 1)
    assert chunk_files(repo) == [kept.chunks[0]]


def test_leftovers_of_killed_puts_are_invisible(repo: Repository) -> None:
    """Temp files as a writer killed before its rename leaves them."""
    good = backup(repo, [rand()])
    half = manifest_path(repo, good.id).read_bytes()[:50]
    leftovers = [
        root(repo) / "manifests" / f".{good.id[:-1]}0.json.0123456789ab.tmp",
        root(repo) / "chunks" / "ff" / f".{'f' * 64}.0123456789ab.tmp",
    ]
    leftovers[1].parent.mkdir(exist_ok=True)  # "ff" may hold a real chunk too
    leftovers[0].write_bytes(half)
    leftovers[1].write_bytes(b"LSCHUNK\x01trunc")
    assert repo.manifest_ids() == [good.id]
    report = repo.check(read_data=True)
    assert report.ok
    assert (report.manifests_checked, report.chunks_checked) == (1, 1)
    second = backup(repo, [rand()])
    for path in leftovers:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    repo.prune(keep_last=2, keep_daily=None)
    assert not any(p.exists() for p in leftovers)
    assert [m.id for m in repo.manifests()] == [good.id, second.id]


WRITER_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from lunseal.host.archive import Repository

    repo = Repository.open_local(Path(sys.argv[1]), chunk_size={cs})
    n = 100_000
    with repo.begin_backup({{"source": "doomed"}}, n * {cs}) as writer:
        for i in range(n):
            writer.add_chunk(i, os.urandom({cs}))
            if i == 3:
                print("writing", flush=True)
        writer.commit()
    """
)


def run_and_kill(path: Path, delay: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT.format(cs=CS), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"writing\n", proc.stderr
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_backup_killed_by_sigkill(repo: Repository, delay: float) -> None:
    earlier = backup(repo, [rand(), rand()])
    run_and_kill(root(repo), delay)
    assert repo.manifest_ids() == [earlier.id]
    report = repo.check(read_data=True)
    assert report.ok, report.lines()
    assert report.unreferenced_chunks >= 4
    # The dead writer's shared lock died with it: backup and prune both proceed.
    later = backup(repo, [rand(), bytes(CS)])
    pruned = repo.prune(keep_last=2, keep_daily=None)
    assert pruned.removed == []
    assert pruned.chunks_removed == report.unreferenced_chunks
    assert sorted(chunk_files(repo)) == sorted(
        d for d in earlier.chunks + later.chunks if d is not None
    )
    assert repo.check(read_data=True).ok
    # A kill in the middle of a put leaves a temp file: invisible, and swept later.
    assert len(temp_files(repo)) <= 1
    repo.storage.sweep(older_than=0)
    assert temp_files(repo) == []


# -- damage ---------------------------------------------------------------------


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def shared(repo: Repository) -> tuple[str, list[Manifest]]:
    """Three backups, two of which share one chunk; returns (that chunk, backups)."""
    common = rand()
    backups = [backup(repo, [common, rand()]), backup(repo, [rand()]), backup(repo, [common])]
    digest = backups[0].chunks[0]
    assert digest is not None
    return digest, backups


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "bit flip in body": lambda p: flip_bit(p, p.stat().st_size // 2),
    "bit flip in header": lambda p: flip_bit(p, 2),
    "bit flip in length": lambda p: flip_bit(p, 9),
    "truncated": damage_truncate,
    "empty": lambda p: p.write_bytes(b""),
    "foreign content": lambda p: p.write_bytes(b"some other file\n" * 100),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_chunk_names_chunk_and_backups(
    repo: Repository, shared: tuple[str, list[Manifest]], damage: object
) -> None:
    digest, backups = shared
    assert callable(damage)
    damage(chunk_path(repo, digest))
    assert repo.check(read_data=False).ok  # presence only: the object is still there
    report = repo.check(read_data=True)
    assert not report.ok
    assert [p.digest for p in report.chunk_problems] == [digest]
    assert report.chunk_problems[0].backups == [backups[0].id, backups[2].id]
    assert report.affected_backups() == [backups[0].id, backups[2].id]
    assert report.chunks_checked == 3
    assert digest in report.lines()[0]
    with pytest.raises(ArchiveCorrupt, match=digest) as exc:
        repo.read_chunk(digest)
    assert backups[0].id in exc.value.message
    assert backups[2].id in exc.value.message
    assert backups[1].id not in exc.value.message
    assert exc.value.exit_code == 8
    assert restore(repo, backups[1])  # unaffected backups still restore


def test_chunk_with_another_chunks_content(
    repo: Repository, shared: tuple[str, list[Manifest]]
) -> None:
    digest, backups = shared
    other = backups[1].chunks[0]
    assert other is not None
    chunk_path(repo, digest).write_bytes(chunk_path(repo, other).read_bytes())
    problems = repo.check(read_data=True).chunk_problems
    assert [(p.digest, p.problem) for p in problems] == [(digest, "digest mismatch")]


def test_missing_chunk(repo: Repository, shared: tuple[str, list[Manifest]]) -> None:
    digest, backups = shared
    chunk_path(repo, digest).unlink()
    report = repo.check(read_data=False)
    assert [(p.digest, p.problem, p.backups) for p in report.chunk_problems] == [
        (digest, "missing", [backups[0].id, backups[2].id])
    ]
    with pytest.raises(ArchiveCorrupt, match=f"{digest} is missing.*{backups[0].id}"):
        repo.read_chunk(digest)
    with pytest.raises(NotFound):
        repo.read_chunk("ab" * 32)  # referenced by nobody: merely absent


def test_corrupt_unreferenced_chunk_is_reported(repo: Repository) -> None:
    """Dedup could make a future backup use it, so check reads garbage chunks too."""
    with repo.begin_backup({}, CS) as writer:
        digest = writer.add_chunk(0, rand())
    assert digest is not None
    flip_bit(chunk_path(repo, digest), 100)
    report = repo.check(read_data=True)
    assert [(p.digest, p.backups) for p in report.chunk_problems] == [(digest, [])]
    assert "affects no backup" in report.lines()[0]


def rewrite_json(path: Path, **changes: object) -> None:
    obj = json.loads(path.read_bytes())
    obj.update(changes)
    path.write_text(json.dumps(obj))


MANIFEST_DAMAGE = {
    "truncated": damage_truncate,
    "empty": lambda p: p.write_bytes(b""),
    "not json": lambda p: p.write_bytes(b"\x00garbage"),
    "json list": lambda p: p.write_text("[]"),
    "edited size": lambda p: rewrite_json(p, size=1),
    "edited meta": lambda p: rewrite_json(p, meta={"token": "forged"}),
    "edited chunk": lambda p: rewrite_json(p, chunks=["ab" * 32]),
    "missing field": lambda p: rewrite_json(p, chunk_size=None),
    "future version": lambda p: rewrite_json(p, version=2),
    "bit flip": lambda p: flip_bit(p, p.read_bytes().index(b'"digest"') + 20),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE.keys())
def test_damaged_manifest_is_detected(
    repo: Repository, shared: tuple[str, list[Manifest]], damage: object
) -> None:
    _digest, backups = shared
    bad = backups[1].id
    assert callable(damage)
    damage(manifest_path(repo, bad))
    report = repo.check(read_data=True)
    assert list(report.bad_manifests) == [bad]
    assert bad in report.bad_manifests[bad]
    assert report.manifests_checked == 3
    assert report.affected_backups() == [bad]
    with pytest.raises(ArchiveCorrupt, match=bad):
        repo.manifest(bad)
    with pytest.raises(ArchiveCorrupt, match=bad):
        repo.manifests()
    assert repo.manifest(backups[0].id) == backups[0]


def test_manifest_under_another_id(repo: Repository) -> None:
    manifest = backup(repo, [rand()])
    other = manifest.id[:-6] + "000000"
    manifest_path(repo, manifest.id).rename(manifest_path(repo, other))
    with pytest.raises(ArchiveCorrupt, match="different backup id"):
        repo.manifest(other)


def test_unknown_and_invalid_backup_ids(repo: Repository) -> None:
    with pytest.raises(NotFound):
        repo.manifest("20240101T000000Z-abcdef")
    with pytest.raises(InvalidArgument):
        repo.manifest("../config")


def test_prune_refuses_while_a_manifest_is_damaged(
    repo: Repository, shared: tuple[str, list[Manifest]]
) -> None:
    _digest, backups = shared
    damage_truncate(manifest_path(repo, backups[0].id))
    before = chunk_files(repo)
    with pytest.raises(ArchiveCorrupt, match=backups[0].id):
        repo.prune(keep_last=1, keep_daily=None)
    assert chunk_files(repo) == before
    assert repo.manifest_ids() == [m.id for m in backups]


# -- prune ----------------------------------------------------------------------


def at(day: int, hour: int) -> datetime:
    return datetime(2024, 3, day, hour, tzinfo=UTC)


@pytest.fixture
def history(tmp_path: Path) -> tuple[Repository, dict[str, Manifest], bytes]:
    """Backups at crafted times, each with one own chunk plus one shared chunk."""
    times = {"d1a": at(1, 10), "d1b": at(1, 15), "d2": at(2, 9), "d3a": at(3, 8), "d3b": at(3, 20)}
    current = [at(1, 0)]
    repo = Repository.open_local(tmp_path / "archive", chunk_size=CS, clock=lambda: current[0])
    common = rand()
    made = {}
    for name, when in times.items():
        current[0] = when
        made[name] = backup(repo, [common, rand(), bytes(CS)], name=name)
    return repo, made, common


def disk_usage(repo: Repository) -> int:
    return sum(p.stat().st_size for p in root(repo).rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("keep_last", "keep_daily", "kept"),
    [
        (2, None, ["d3a", "d3b"]),
        (None, 2, ["d2", "d3b"]),
        (1, 3, ["d1b", "d2", "d3b"]),
        (None, 10, ["d1b", "d2", "d3b"]),
        (3, 1, ["d2", "d3a", "d3b"]),
        (10, None, ["d1a", "d1b", "d2", "d3a", "d3b"]),
        (1, None, ["d3b"]),
    ],
)
def test_prune_policies(
    history: tuple[Repository, dict[str, Manifest], bytes],
    keep_last: int | None,
    keep_daily: int | None,
    kept: list[str],
) -> None:
    repo, made, common = history
    removed = [name for name in made if name not in kept]
    before = disk_usage(repo)
    report = repo.prune(keep_last=keep_last, keep_daily=keep_daily)
    assert report.kept == [made[n].id for n in kept]
    assert report.removed == [made[n].id for n in removed]
    assert report.chunks_removed == len(removed)  # each had one own chunk
    assert report.bytes_freed == before - disk_usage(repo)
    assert not report.dry_run
    assert [m.meta["name"] for m in repo.manifests()] == kept
    for name in kept:  # kept backups restore completely
        assert restore(repo, made[name])[:CS] == common
    survivors = {d for n in kept for d in made[n].chunks if d is not None}
    assert set(chunk_files(repo)) == survivors
    assert repo.check(read_data=True).ok


def test_prune_dry_run_changes_nothing(
    history: tuple[Repository, dict[str, Manifest], bytes],
) -> None:
    repo, _made, _common = history
    before = sorted(p for p in root(repo).rglob("*") if p.is_file())
    report = repo.prune(keep_last=1, keep_daily=None, dry_run=True)
    assert report.dry_run
    assert len(report.removed) == 4
    assert report.chunks_removed == 4
    assert report.bytes_freed > 4 * CS  # random chunks do not compress
    assert sorted(p for p in root(repo).rglob("*") if p.is_file()) == before
    assert repo.prune(keep_last=1, keep_daily=None).bytes_freed == report.bytes_freed


@pytest.mark.parametrize(
    ("keep_last", "keep_daily"), [(None, None), (0, None), (0, 0), (-1, 3), (3, -1)]
)
def test_prune_needs_a_policy(
    repo: Repository, keep_last: int | None, keep_daily: int | None
) -> None:
    backup(repo, [rand()])
    with pytest.raises(InvalidArgument):
        repo.prune(keep_last=keep_last, keep_daily=keep_daily)
    assert len(repo.manifest_ids()) == 1


def test_prune_waits_for_no_running_backup(repo: Repository) -> None:
    """A running backup's chunks are referenced by no manifest yet: prune must not run."""
    old = backup(repo, [rand()])
    with repo.begin_backup({}, CS) as writer:
        writer.reuse_chunk(0, old.chunks[0])
        with pytest.raises(Conflict, match="backup is running"):
            repo.prune(keep_last=1, keep_daily=None)
        new = writer.commit()
    repo.prune(keep_last=1, keep_daily=None)
    assert restore(repo, new) == restore(repo, old)


def test_prune_of_an_empty_repository(repo: Repository) -> None:
    report = repo.prune(keep_last=1, keep_daily=1)
    assert (report.kept, report.removed, report.chunks_removed, report.bytes_freed) == (
        [],
        [],
        0,
        0,
    )
