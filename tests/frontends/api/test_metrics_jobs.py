"""Backup and restore durations and results in a Prometheus textfile: real
daemon, real ``lunseal backup create`` / ``restore`` processes, parsed with
Prometheus' own text parser; a failed run is recorded too and keeps the others."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.host.backup import MiB, backup, create_lun, lunseal, restore, write
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_backup_and_restore_report_duration_and_result(
    daemon: Daemon, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prom = tmp_path / "lunseal.prom"
    create_lun(daemon, "app", 8 * MiB)
    write(daemon, "app", 0, MiB)
    taken = backup(daemon, archive, "app", "app-copy", "--metrics-textfile", str(prom))
    first = samples(prom)
    app = (("job", "backup"), ("lun", "app"))
    assert first[("lunseal_job_last_success", app)] == 1
    assert first[("lunseal_job_last_duration_seconds", app)] > 0
    assert first[("lunseal_job_runs_total", (*app, ("result", "ok")))] == 1
    assert first[("lunseal_job_last_success_timestamp_seconds", app)] > 1e9

    # A failing backup (no such LUN) is recorded as such; the good one stays.
    failed = lunseal(
        daemon, archive, "backup", "create", "nope", "--mirror", "nope-copy",
        "--metrics-textfile", str(prom), ok=False,
    )  # fmt: skip
    assert failed.returncode != 0
    second = samples(prom)
    nope = (("job", "backup"), ("lun", "nope"))
    assert second[("lunseal_job_last_success", nope)] == 0
    assert second[("lunseal_job_runs_total", (*nope, ("result", "failed")))] == 1
    assert ("lunseal_job_last_success_timestamp_seconds", nope) not in second
    assert second[("lunseal_job_runs_total", (*app, ("result", "ok")))] == 1

    # The environment variable works as well as the option.
    write(daemon, "app", 0, MiB, 0x33)
    monkeypatch.setenv("LUNSEAL_METRICS_TEXTFILE", str(prom))
    assert restore(daemon, archive, taken["id"])["to"] == "app"
    third = samples(prom)
    restored = (("job", "restore"), ("lun", "app"))
    assert third[("lunseal_job_last_success", restored)] == 1
    assert third[("lunseal_job_runs_total", (*restored, ("result", "ok")))] == 1
    assert third[("lunseal_job_runs_total", (*app, ("result", "ok")))] == 1


def test_a_missing_directory_is_one_line(daemon: Daemon, archive: Path, tmp_path: Path) -> None:
    create_lun(daemon, "app", MiB)
    proc = lunseal(
        daemon, archive, "backup", "create", "app", "--mirror", "app-copy",
        "--metrics-textfile", str(tmp_path / "no" / "x.prom"), ok=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--metrics-textfile: directory" in proc.stderr
    assert "Traceback" not in proc.stderr
