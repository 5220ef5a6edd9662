"""NBD over TLS with real clients: qemu-img (gnutls), nbdinfo and nbdcopy (libnbd)
against a daemon that requires TLS and verifies client certificates."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.host.client import ArrayClient
from tests.interop.helpers import MiB, random_file, run, sha256
from tests.support.daemon import Daemon
from tests.support.tlscerts import Pki, make_pki
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

SIZE = 8 * MiB


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Pki) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path / "home",
        extra_args=[
            "--no-demo",
            "--tls",
            "require",
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-ca",
            str(pki.ca_file),
            "--tls-verify-client",
        ],
    ).start()
    try:
        with ArrayClient(d.api_url, d.token) as api:
            api.create_lun("disk", SIZE)
        yield d
    finally:
        d.kill()


def qemu_tls(d: Daemon, certs: Path, export: str = "disk") -> list[str]:
    host, port = d.tcp.rsplit(":", 1)
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
        "--image-opts",
        f"driver=nbd,host={host},port={port},export={export},tls-creds=tls0",
    ]


def nbds(d: Daemon, certs: Path, export: str = "disk") -> str:
    return f"nbds://{d.tcp}/{export}?tls-certificates={certs}"


def wait_for_log(d: Daemon, text: str, timeout: float = 30.0) -> None:
    """The daemon logs a refusal just after the client gave up: wait for the line."""
    deadline = time.monotonic() + timeout
    while text not in d.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{d.log()[-3000:]}"
        time.sleep(0.05)


def lun_digest(d: Daemon, tmp_path: Path, name: str = "check.raw") -> str:
    """The LUN's content, read over the (clear) Unix socket."""
    out = tmp_path / name
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("disk"), str(out))
    return sha256(out)


def test_qemu_img_convert_both_ways_and_compare_over_tls(
    tls_daemon: Daemon, pki: Pki, tmp_path: Path
) -> None:
    require_tools("qemu-img")
    certs = pki.client_dir("qemu")
    src = random_file(tmp_path / "src.raw", SIZE)
    out = tmp_path / "out.raw"
    tls = qemu_tls(tls_daemon, certs)

    run("qemu-img", "convert", "-n", "-f", "raw", str(src), "--target-image-opts", *tls[:2],
        tls[3])  # fmt: skip
    run("qemu-img", "convert", *tls, "-O", "raw", str(out))
    assert sha256(out) == sha256(src)
    run("qemu-img", "compare", *tls[:2], "--image-opts", tls[3],
        f"driver=raw,file.driver=file,file.filename={src}")  # fmt: skip
    assert lun_digest(tls_daemon, tmp_path) == sha256(src)
    assert "upgraded to TLS" in tls_daemon.log()


def test_nbdcopy_and_nbdinfo_over_tls(tls_daemon: Daemon, pki: Pki, tmp_path: Path) -> None:
    require_tools("nbdcopy", "nbdinfo")
    certs = pki.client_dir("libnbd")
    src = random_file(tmp_path / "src.raw", SIZE)
    out = tmp_path / "out.raw"

    listed = run("nbdinfo", "--list", nbds(tls_daemon, certs, "")).stdout
    assert 'export="disk"' in listed
    run("nbdcopy", "--flush", str(src), nbds(tls_daemon, certs))
    run("nbdcopy", nbds(tls_daemon, certs), str(out))
    assert sha256(out) == sha256(src)


def test_clear_text_is_refused_nothing_listed_nothing_written(
    tls_daemon: Daemon, tmp_path: Path
) -> None:
    require_tools("qemu-img", "nbdinfo")
    before = lun_digest(tls_daemon, tmp_path, "before.raw")
    src = random_file(tmp_path / "src.raw", SIZE)

    listing = run("nbdinfo", "--list", f"nbd://{tls_daemon.tcp}", check=False)
    assert listing.returncode != 0
    assert "disk" not in listing.stdout
    info = run("nbdinfo", "--size", f"nbd://{tls_daemon.tcp}/disk", check=False)
    assert info.returncode != 0
    assert str(SIZE) not in info.stdout
    write = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                f"nbd://{tls_daemon.tcp}/disk", check=False)  # fmt: skip
    assert write.returncode != 0
    assert lun_digest(tls_daemon, tmp_path, "after.raw") == before


def test_client_without_certificate_is_refused(
    tls_daemon: Daemon, pki: Pki, tmp_path: Path
) -> None:
    require_tools("qemu-img", "nbdinfo")
    before = lun_digest(tls_daemon, tmp_path, "before.raw")
    certs = pki.client_dir("anonymous", with_cert=False)
    src = random_file(tmp_path / "src.raw", SIZE)

    listing = run("nbdinfo", "--list", nbds(tls_daemon, certs, ""), check=False)
    assert listing.returncode != 0
    assert "disk" not in listing.stdout
    tls = qemu_tls(tls_daemon, certs)
    write = run("qemu-img", "convert", "-n", "-f", "raw", str(src), "--target-image-opts",
                *tls[:2], tls[3], check=False)  # fmt: skip
    assert write.returncode != 0
    assert lun_digest(tls_daemon, tmp_path, "after.raw") == before
    wait_for_log(tls_daemon, "PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_wrong_ca_is_refused_both_ways(tls_daemon: Daemon, pki: Pki, tmp_path: Path) -> None:
    require_tools("nbdinfo")
    other = make_pki(tmp_path / "other")
    # The client trusts another CA: the server's certificate does not verify.
    distrusting = pki.client_dir("distrusting", ca=other.ca_file)
    # The client shows a certificate of another CA: the server refuses it.
    stranger = other.client_dir("stranger", ca=pki.ca_file)
    for certs in (distrusting, stranger):
        listing = run("nbdinfo", "--list", nbds(tls_daemon, certs, ""), check=False)
        assert listing.returncode != 0, certs
        assert "disk" not in listing.stdout
    # The server refused the stranger's certificate itself (the distrusting
    # client just hangs up on ours).
    wait_for_log(tls_daemon, "certificate verify failed")


def test_fio_nbd_engine_over_tls(tls_daemon: Daemon, pki: Pki) -> None:
    """fio's nbd engine (libnbd) writes and verifies the whole LUN over nbds://.

    fio may not name a certificate directory in its URI (libnbd refuses local
    file access there), so it runs as an unprivileged user whose home holds the
    certificates where libnbd looks by default (``~/.pki/libnbd``); as root it
    would read ``/etc/pki/libnbd``, which a test must not touch."""
    require_tools("fio", "setpriv")
    home = Path(tempfile.mkdtemp(prefix="lunseal-fio-"))
    try:
        certs = home / ".pki" / "libnbd"
        certs.parent.mkdir()
        shutil.copytree(pki.client_dir("fio"), certs)
        for path in (home, *home.rglob("*")):
            path.chmod(0o777 if path.is_dir() else 0o644)
        result = home / "fio.json"
        run(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "env", f"HOME={home}",
            "fio", "--name=tls", "--ioengine=nbd", f"--uri=nbds://{tls_daemon.tcp}/disk",
            "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={SIZE}",
            "--verify=crc32c", "--do_verify=1",
            "--output-format=json", f"--output={result}",
            cwd=home,
            timeout=120,
        )  # fmt: skip
        [job] = json.loads(result.read_text())["jobs"]
    finally:
        shutil.rmtree(home)
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == SIZE
    assert job["read"]["io_bytes"] == SIZE  # the verify pass read it all back


def test_export_acl_matches_the_client_certificate(
    tls_daemon: Daemon, pki: Pki, tmp_path: Path
) -> None:
    """`cert:` entries of the export ACL match the verified client certificate's
    name: the client's LUN is listed and writable, another client's is hidden."""
    require_tools("nbdinfo", "nbdcopy")
    with ArrayClient(tls_daemon.api_url, tls_daemon.token) as api:
        api.create_lun("other", SIZE)
        api.allow_nbd("disk", "cert:backup-host", "rw")  # make_pki's client name
        api.allow_nbd("other", "cert:someone-else", "rw")
    certs = pki.client_dir("libnbd")
    listed = run("nbdinfo", "--list", nbds(tls_daemon, certs, "")).stdout
    assert 'export="disk"' in listed
    assert "other" not in listed
    src = random_file(tmp_path / "src.raw", SIZE)
    run("nbdcopy", "--flush", str(src), nbds(tls_daemon, certs))
    back = tmp_path / "back.raw"
    run("nbdcopy", nbds(tls_daemon, certs), str(back))
    assert sha256(back) == sha256(src)
    # The Unix socket has no certificate: the ACL hides the LUN there too.
    unix = run("qemu-img", "info", tls_daemon.uri("disk"), check=False)
    assert unix.returncode != 0
    refused = run("nbdcopy", str(src), nbds(tls_daemon, certs, "other"), check=False)
    assert refused.returncode != 0
