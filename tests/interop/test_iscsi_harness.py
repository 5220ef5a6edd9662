"""The conformance harness itself: iscsi-test-cu output parsing, and a real run
against tgtd (the reference target lunseal is compared with)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.support.iscsi import (
    TGT_BASELINE,
    HarnessError,
    Tgtd,
    list_families,
    parse_list,
    parse_output,
    run_test_cu,
)
from tests.support.tools import require_tools

FAMILIES = {"Read10": "SCSI", "Unmap": "SCSI", "Reserve6": "SCSI", "iSCSITMF": "iSCSI"}

# The shapes iscsi-test-cu 1.19 prints (verbose mode): a verdict right after
# "...", a skip that CUnit counts as passed, a failure with its assertion lines,
# a message printed after the verdict, and a "[FAILED]" message in a test that
# CUnit still passes.
OUTPUT = """\
     CUnit - A unit testing framework for C - Version 2.1-3

Suite: Read10
  Test: Simple ...passed
  Test: BeyondEol ...    [FAILED] READ10 successful but should have failed
FAILED
    1. test_read10_beyond_eol.c:42  - CU_ASSERT_EQUAL(_r,0)
Suite: Unmap
  Test: Simple ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
passed
  Test: VPD ...    [FAILED] WRITESAME10 command failed with status 2
passed
Suite: Reserve6
  Test: LUNReset ...passed    [FAILED] PRIN command: failed with sense.

Suite: iSCSITMF
  Test: AbortTaskSimpleAsync ...    Send ABORT TASK
    [SKIPPED] ABORT TASK is not implemented.

passed

Run Summary:    Type  Total    Ran Passed Failed Inactive
              suites      4      4    n/a      0        0
               tests      6      6      5      1        0
             asserts    100    100     99      1      n/a
"""


def test_parse_output_reads_every_outcome() -> None:
    results = {r.name: r for r in parse_output(OUTPUT, FAMILIES)}

    assert {name: r.outcome for name, r in results.items()} == {
        "SCSI.Read10.Simple": "passed",
        "SCSI.Read10.BeyondEol": "failed",
        "SCSI.Unmap.Simple": "skipped",
        "SCSI.Unmap.VPD": "passed",
        "SCSI.Reserve6.LUNReset": "passed",
        "iSCSI.iSCSITMF.AbortTaskSimpleAsync": "skipped",
    }
    assert "test_read10_beyond_eol.c:42" in results["SCSI.Read10.BeyondEol"].detail
    assert "tests" not in results["iSCSI.iSCSITMF.AbortTaskSimpleAsync"].detail
    assert results["SCSI.Unmap.Simple"].skip_reason.startswith("Logical unit is fully")
    assert results["iSCSI.iSCSITMF.AbortTaskSimpleAsync"].skip_reason == (
        "ABORT TASK is not implemented."
    )


def test_parse_output_checks_cunit_summary() -> None:
    """A miscount (here CUnit says 2 failed) is an error, not a wrong result."""
    wrong = OUTPUT.replace("6      6      5      1", "6      6      4      2")
    with pytest.raises(HarnessError, match="CUnit ran 6: 4 passed, 2 failed"):
        parse_output(wrong, FAMILIES)


def test_parse_output_without_summary_is_an_error() -> None:
    """The tool died half-way (no summary): never read as a clean partial run."""
    truncated = OUTPUT.split("Run Summary")[0]
    with pytest.raises(HarnessError, match="no CUnit run summary"):
        parse_output(truncated, FAMILIES)


def test_parse_list_maps_suites_to_families() -> None:
    listing = "ALL\nALL.Read10\nSCSI\nSCSI.Read10\nSCSI.Read10.Simple\niSCSI.iSCSITMF\n"
    listing += "LINUX.Read10\n"
    assert parse_list(listing) == {"Read10": "SCSI", "iSCSITMF": "iSCSI"}
    with pytest.raises(HarnessError):
        parse_list("ALL\nALL.Read10\n")


@pytest.mark.interop
def test_installed_suite_lists_both_families() -> None:
    require_tools("iscsi-test-cu")
    families = list_families()
    assert families["Read10"] == "SCSI"
    assert families["iSCSIcmdsn"] == "iSCSI"
    assert len(families) >= 50


@pytest.mark.interop
def test_tgt_baseline(tmp_path: Path) -> None:
    """tgtd on a 1 GiB file: the run parses to the baseline lunseal must beat, and
    the tgtd the harness started is gone afterwards (only that pid was stopped)."""
    require_tools("tgtd", "tgtadm", "iscsi-test-cu")
    backing = tmp_path / "lu.img"
    with backing.open("wb") as f:
        f.truncate(1 << 30)
    tgtd = Tgtd(tmp_path / "tgt")
    with tgtd:
        url = tgtd.add_lun(1, backing)
        run = run_test_cu(url, ["ALL"], cwd=tmp_path)
    print(run.summary(suites=False))
    assert tgtd.proc is not None
    assert tgtd.proc.poll() is not None

    counts = run.counts()
    assert (counts["passed"], counts["failed"], counts["skipped"]) == TGT_BASELINE
    outcomes = {r.name: r.outcome for r in run.results}
    assert outcomes["SCSI.Read10.Simple"] == "passed"
    assert outcomes["SCSI.GetLBAStatus.BeyondEol"] == "failed"
    assert outcomes["SCSI.CompareAndWrite.Simple"] == "skipped"
    assert set(run.by_family()) == {"SCSI", "iSCSI"}


@pytest.mark.interop
def test_a_hanging_target_is_a_bounded_failure() -> None:
    """A portal that accepts and never answers: the tool is killed at the timeout
    and the run is an error, not a hang or a pass."""
    require_tools("iscsi-test-cu")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"iscsi://127.0.0.1:{silent.getsockname()[1]}/iqn.2026-12.test.lunseal:x/0"
        started = time.monotonic()
        with pytest.raises(HarnessError, match="did not finish within 3"):
            run_test_cu(url, ["SCSI.TestUnitReady"], timeout=3)
    assert time.monotonic() - started < 60
