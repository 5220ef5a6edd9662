"""Backup and restore results for Prometheus, as a node_exporter textfile.

The host tools run apart from the daemon (often on another machine), so they
report where a scraper already looks: a ``.prom`` file that node_exporter's
textfile collector serves (``--collector.textfile.directory``).  Each run
updates its own series (job and LUN) and keeps everybody else's; the file is
replaced atomically under a lock, so concurrent runs neither tear nor lose it.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lunseal.errors import InvalidArgument
from lunseal.fsutil import atomic_write

ENV_TEXTFILE = "LUNSEAL_METRICS_TEXTFILE"

#: name -> (type, help); every series carries the labels job and lun.
FAMILIES = {
    "lunseal_job_last_duration_seconds": ("gauge", "seconds the last run took"),
    "lunseal_job_last_success": ("gauge", "1 if the last run succeeded, else 0"),
    "lunseal_job_last_end_timestamp_seconds": ("gauge", "when the last run ended"),
    "lunseal_job_last_success_timestamp_seconds": ("gauge", "when a run last succeeded"),
    "lunseal_job_runs": ("counter", "runs by result"),
}

Key = tuple[str, tuple[tuple[str, str], ...]]


def textfile(option: Path | None) -> Path | None:
    """The ``--metrics-textfile`` option, else ``$LUNSEAL_METRICS_TEXTFILE``."""
    if option is not None:
        return option
    env = os.environ.get(ENV_TEXTFILE)
    return Path(env) if env else None


@dataclass
class Run:
    job: str
    #: The LUN the run is about; the body may settle it once it knows (a restore).
    lun: str


@contextmanager
def record_job(job: str, lun: str, path: Path | None) -> Iterator[Run]:
    """Time the body; afterwards, whether it succeeded or raised, update ``path``."""
    if path is not None and not path.parent.is_dir():
        raise InvalidArgument(f"--metrics-textfile: directory {path.parent} does not exist")
    run = Run(job, lun)
    start = time.monotonic()
    ok = False
    try:
        yield run
        ok = True
    finally:
        if path is not None:
            update(path, run.job, run.lun, ok=ok, seconds=time.monotonic() - start)


def update(path: Path, job: str, lun: str, *, ok: bool, seconds: float) -> None:
    with _locked(path):
        samples = _read(path)
        labels = (("job", job), ("lun", lun))
        now = time.time()
        samples[("lunseal_job_last_duration_seconds", labels)] = seconds
        samples[("lunseal_job_last_success", labels)] = 1.0 if ok else 0.0
        samples[("lunseal_job_last_end_timestamp_seconds", labels)] = now
        if ok:
            samples[("lunseal_job_last_success_timestamp_seconds", labels)] = now
        runs = ("lunseal_job_runs_total", (*labels, ("result", "ok" if ok else "failed")))
        samples[runs] = samples.get(runs, 0.0) + 1
        atomic_write(path, _render(samples).encode(), mode=0o644)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> dict[Key, float]:
    """Our series from an earlier file; anything unreadable starts afresh."""
    # Imported here: every lunseal command loads this module, few write metrics.
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    samples: dict[Key, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("lunseal_job_") and math.isfinite(s.value):
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError:
        return {}
    return samples


def _render(samples: dict[Key, float]) -> str:
    lines: list[str] = []
    for family, (kind, help_text) in FAMILIES.items():
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}"]
        name = f"{family}_total" if kind == "counter" else family
        for (sample, labels), value in sorted(samples.items()):
            if sample == name:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {value!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
