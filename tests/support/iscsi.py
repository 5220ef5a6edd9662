"""iSCSI test helpers: run libiscsi's ``iscsi-test-cu`` and read its results; run tgtd.

``iscsi-test-cu`` is a CUnit program.  CUnit knows only "passed" and "FAILED":
a libiscsi test that skips prints ``[SKIPPED] reason`` and then *passes*.  So
the per-test outcome comes from the text output, and the parse is checked
against CUnit's own "Run Summary" (a test counted as passed by CUnit is
either passed or skipped here, a failed one failed) - an output the parser
misreads is an error, never a silently wrong count.

tgtd (the Linux SCSI target framework daemon) is the reference target the
harness is developed and compared against; :class:`Tgtd` runs one without
systemd on a free portal port and a free control-socket number, and stops
only the process it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Outcome = Literal["passed", "failed", "skipped"]
OUTCOMES: tuple[Outcome, ...] = ("passed", "failed", "skipped")

#: The two initiator names iscsi-test-cu logs in with (``-i`` / ``-I`` defaults);
#: the two-initiator tests (RESERVE(6), persistent reservations) use both.
INITIATOR_1 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
INITIATOR_2 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2"

#: What tgt 1.0.85 (Debian 12) gets for ``-t ALL`` on a 1 GiB file LU, as
#: (passed, failed, skipped); ``tests/interop/test_iscsi_harness.py`` checks it
#: still holds, and lunseal's conformance run must pass more tests than it.
TGT_BASELINE = (160, 8, 62)

#: A whole conformance run takes under a minute against a working target, even
#: on a loaded machine; only a hang gets near this.  It stays below pytest's
#: per-test timeout (300 s) so that a hang fails with the tool's output.
TEST_CU_TIMEOUT = 240.0
TOOL_TIMEOUT = 60.0

_SUITE = re.compile(r"^Suite: (?P<suite>\S+)\s*$")
_TEST = re.compile(r"^  Test: (?P<test>\S+) \.\.\.(?P<rest>.*)$")
# CUnit writes the verdict right after "..." or at the start of a line of its
# own; libiscsi's own messages are indented and bracketed ("    [FAILED] ...").
_VERDICT = re.compile(r"^(?P<verdict>passed|FAILED)(?P<rest>.*)$")
_SKIPPED = re.compile(r"\[SKIPPED\]\s*(?P<reason>.*)")
_SUMMARY = re.compile(
    r"^\s+tests\s+(?P<total>\d+)\s+(?P<ran>\d+)\s+(?P<passed>\d+)\s+(?P<failed>\d+)\s+\d+\s*$",
    re.MULTILINE,
)


class HarnessError(Exception):
    """iscsi-test-cu or tgtd did something the harness cannot make sense of."""


@dataclass(frozen=True)
class CaseResult:
    family: str
    suite: str
    test: str
    outcome: Outcome
    #: Everything the test printed (skip reasons, failure messages and asserts).
    detail: str = ""

    @property
    def name(self) -> str:
        return f"{self.family}.{self.suite}.{self.test}"

    @property
    def skip_reason(self) -> str:
        found = _SKIPPED.search(self.detail)
        return found.group("reason").strip() if found else ""


@dataclass
class ConformanceRun:
    """One iscsi-test-cu run: its command, raw output and per-test results."""

    command: list[str]
    output: str
    returncode: int
    results: list[CaseResult] = field(default_factory=list)

    def with_outcome(self, outcome: Outcome) -> list[CaseResult]:
        return [r for r in self.results if r.outcome == outcome]

    @property
    def failed(self) -> list[CaseResult]:
        return self.with_outcome("failed")

    @property
    def skipped(self) -> list[CaseResult]:
        return self.with_outcome("skipped")

    @property
    def passed(self) -> list[CaseResult]:
        return self.with_outcome("passed")

    def counts(self) -> Counter[Outcome]:
        return Counter(r.outcome for r in self.results)

    def by_family(self) -> dict[str, Counter[Outcome]]:
        families: dict[str, Counter[Outcome]] = {}
        for r in self.results:
            families.setdefault(r.family, Counter())[r.outcome] += 1
        return families

    def by_suite(self) -> dict[str, Counter[Outcome]]:
        suites: dict[str, Counter[Outcome]] = {}
        for r in self.results:
            suites.setdefault(f"{r.family}.{r.suite}", Counter())[r.outcome] += 1
        return suites

    def summary(self, *, suites: bool = True) -> str:
        """A table of passed/failed/skipped per family (and suite), then every
        failure and skip with its message."""
        rows = [("", *OUTCOMES)]
        for name, c in sorted(self.by_family().items()):
            rows.append((name, *(str(c[o]) for o in OUTCOMES)))
        total = self.counts()
        rows.append(("total", *(str(total[o]) for o in OUTCOMES)))
        if suites:
            rows.append(("", "", "", ""))
            for name, c in sorted(self.by_suite().items()):
                rows.append((name, *(str(c[o]) for o in OUTCOMES)))
        width = max(len(r[0]) for r in rows)
        lines = [f"{r[0]:<{width}}  {r[1]:>7} {r[2]:>7} {r[3]:>7}".rstrip() for r in rows]
        for r in self.failed:
            lines.append(f"FAILED  {r.name}: {_one_line(r.detail)}")
        for r in self.skipped:
            lines.append(f"SKIPPED {r.name}: {r.skip_reason}")
        return "\n".join(lines)


def _one_line(text: str, limit: int = 300) -> str:
    flat = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- parsing --------------------------------------------------------------------------


def parse_list(text: str) -> dict[str, str]:
    """Suite name -> family (``SCSI``/``iSCSI``) from ``iscsi-test-cu --list``.

    The listing also has the pseudo-families ``ALL`` and ``LINUX``, which
    repeat the same suites; they are left out."""
    families: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(".")
        if len(parts) == 2 and parts[0] in ("SCSI", "iSCSI"):
            families[parts[1]] = parts[0]
    if not families:
        raise HarnessError(f"iscsi-test-cu --list printed no SCSI/iSCSI suites:\n{text[:2000]}")
    return families


def parse_output(text: str, families: Mapping[str, str]) -> list[CaseResult]:
    """Per-test results of an iscsi-test-cu run (verbose mode, the default).

    Raises :class:`HarnessError` when the output does not end in CUnit's run
    summary (the tool died or was killed) or when the parsed outcomes do not
    add up to that summary."""
    results: list[CaseResult] = []
    suite = ""
    test: str | None = None
    detail: list[str] = []

    def finish(verdict: str) -> None:
        nonlocal test
        assert test is not None
        text = "\n".join(detail).strip()
        outcome: Outcome
        if verdict == "FAILED":
            outcome = "failed"
        else:
            outcome = "skipped" if _SKIPPED.search(text) else "passed"
        family = families.get(suite, "?")
        results.append(CaseResult(family, suite, test, outcome, text))
        test = None

    for line in text.splitlines():
        if test is None:
            if line.startswith("Run Summary"):
                break
            if found := _SUITE.match(line):
                suite = found.group("suite")
            elif found := _TEST.match(line):
                test, detail = found.group("test"), []
                rest = found.group("rest")
                if verdict := _VERDICT.match(rest):
                    finish(verdict.group("verdict"))
                else:
                    detail.append(rest)
            elif results and line.startswith("    "):
                # Assertion lines CUnit prints after "FAILED" belong to that test.
                last = results[-1]
                results[-1] = CaseResult(
                    last.family, last.suite, last.test, last.outcome, f"{last.detail}\n{line}"
                )
            continue
        if verdict := _VERDICT.match(line):
            finish(verdict.group("verdict"))
        else:
            detail.append(line)
    _check_summary(text, results)
    return results


def _check_summary(text: str, results: Sequence[CaseResult]) -> None:
    found = _SUMMARY.search(text)
    if found is None:
        raise HarnessError(f"no CUnit run summary (did iscsi-test-cu die?):\n{text[-3000:]}")
    c = Counter(r.outcome for r in results)
    ran, passed, failed = (int(found.group(k)) for k in ("ran", "passed", "failed"))
    if (len(results), c["passed"] + c["skipped"], c["failed"]) != (ran, passed, failed):
        raise HarnessError(
            f"parsed {len(results)} tests ({dict(c)}) but CUnit ran {ran}: "
            f"{passed} passed, {failed} failed"
        )


# -- running iscsi-test-cu ------------------------------------------------------------


def list_families(timeout: float = TOOL_TIMEOUT) -> dict[str, str]:
    out = subprocess.run(
        ["iscsi-test-cu", "--list"], capture_output=True, text=True, timeout=timeout, check=True
    )
    return parse_list(out.stdout)


def run_test_cu(
    url: str,
    tests: Iterable[str] = ("ALL",),
    *,
    multipath_url: str | None = None,
    dataloss: bool = True,
    initiators: tuple[str, str] = (INITIATOR_1, INITIATOR_2),
    timeout: float = TEST_CU_TIMEOUT,
    cwd: Path | None = None,
) -> ConformanceRun:
    """Run ``iscsi-test-cu`` on ``url`` (``iscsi://HOST:PORT/IQN/LUN``) and parse it.

    ``tests`` are families, suites or tests (``SCSI``, ``SCSI.Read10``, ...).
    ``multipath_url`` (a second path to the same LUN) enables the MultipathIO
    suite.  The tool is killed (its process group) when it outlives
    ``timeout``; that is a :class:`HarnessError` carrying what it printed."""
    cmd = ["iscsi-test-cu", "-i", initiators[0], "-I", initiators[1]]
    cmd += ["--dataloss"] if dataloss else []
    cmd += ["-t", ",".join(tests), url]
    cmd += [multipath_url] if multipath_url else []
    families = list_families()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
    )
    try:
        raw, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may just have exited
            os.killpg(proc.pid, signal.SIGKILL)
        raw, _ = proc.communicate()
        raise HarnessError(
            f"{' '.join(cmd)} did not finish within {timeout}s:\n"
            f"{raw.decode(errors='replace')[-3000:]}"
        ) from None
    output = raw.decode(errors="replace")
    run = ConformanceRun(cmd, output, proc.returncode)
    run.results = parse_output(output, families)
    return run


# -- tgtd -----------------------------------------------------------------------------

TGTD_CONTROL_DIR = Path("/var/run/tgtd")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the caller retries if it is taken later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _free_control_number() -> int:
    # tgtadm finds its daemon by this number (/var/run/tgtd/socket.N); stay
    # clear of the default 0 and of any other tgtd on the machine.
    start = 100 + os.getpid() % 800
    for n in range(start, start + 1000):
        if not (TGTD_CONTROL_DIR / f"socket.{n}").exists():
            return n
    raise HarnessError("no free tgtd control-socket number")


@dataclass
class Tgtd:
    """A tgtd on ``127.0.0.1:port`` with a private control socket, one target."""

    workdir: Path
    iqn: str = "iqn.2026-12.test.lunseal:tgt"
    port: int = 0
    control: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, attempts: int = 5) -> Tgtd:
        """Start tgtd and create target 1 (bound to every initiator)."""
        for _ in range(attempts):
            self.port, self.control = free_port(), _free_control_number()
            self.workdir.mkdir(parents=True, exist_ok=True)
            with (self.workdir / "tgtd.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal={self._portal}"],
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            if self._wait_ready():
                self.adm("--mode", "target", "--op", "new", "--tid", "1", "-T", self.iqn)
                self.adm("--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL")
                return self
            self._terminate()
            self._remove_control_socket()
        raise HarnessError(f"tgtd did not start; log:\n{self.log()[-3000:]}")

    @property
    def _portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        """Both the control socket and the portal answer (a port taken meanwhile: False)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            shown = self.adm("--mode", "system", "--op", "show", check=False)
            if shown.returncode == 0 and self._portal_answers():
                return True
            time.sleep(0.1)
        return False

    def _portal_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        if check and proc.returncode != 0:
            raise HarnessError(f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}")
        return proc

    def add_lun(self, lun: int, backing: Path) -> str:
        """Serve ``backing`` (a file, read-write) as ``lun``; returns its iscsi:// URL."""
        self.adm(
            "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", str(lun),
            "--backing-store", str(backing), "--bstype", "rdwr",
        )  # fmt: skip
        return self.url(lun)

    def url(self, lun: int) -> str:
        return f"iscsi://{self._portal}/{self.iqn}/{lun}"

    def log(self) -> str:
        path = self.workdir / "tgtd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Delete the target and shut the daemon down through its control socket;
        SIGTERM, then SIGKILL, the started process if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.adm("--mode", "target", "--op", "delete", "--force", "--tid", "1", check=False)
        self.adm("--mode", "system", "--op", "delete", check=False)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self._terminate()
        self._remove_control_socket()

    def _remove_control_socket(self) -> None:
        # tgtd leaves its socket and lock file behind; they are ours to remove.
        for suffix in ("", ".lock"):
            (TGTD_CONTROL_DIR / f"socket.{self.control}{suffix}").unlink(missing_ok=True)

    def _terminate(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Tgtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a lunseal daemon's iSCSI portal --------------------------------------------------


def lunseal_portal(info: Mapping[str, object]) -> tuple[str, str]:
    """(``HOST:PORT``, target IQN) of a daemon from its ``daemon.json``."""
    portal, target = info.get("iscsi_portal"), info.get("iscsi_target")
    if not isinstance(portal, str) or not isinstance(target, str):
        raise HarnessError(f"daemon.json names no iSCSI portal/target: {dict(info)}")
    return portal, target


def lunseal_url(info: Mapping[str, object], lun: int, credentials: str = "") -> str:
    """``iscsi://[user%secret@]HOST:PORT/IQN/LUN`` for LUN number ``lun``."""
    portal, target = lunseal_portal(info)
    auth = f"{credentials}@" if credentials else ""
    return f"iscsi://{auth}{portal}/{target}/{lun}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.support.iscsi URL [TESTS] [MULTIPATH-URL]``: run the suite
    with ``--dataloss`` and print the summary (exit 1 on any failure)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print(main.__doc__)
        return 2
    tests = args[1].split(",") if len(args) > 1 else ["SCSI", "iSCSI"]
    run = run_test_cu(args[0], tests, multipath_url=args[2] if len(args) > 2 else None)
    print(run.summary())
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
