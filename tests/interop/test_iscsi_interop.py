"""Real iSCSI initiators against a lunseal daemon: qemu's iscsi:// driver
(qemu-img, qemu-io) and libiscsi's tools (iscsi-ls, iscsi-inq,
iscsi-readcapacity16).  The same LUNs are reachable over NBD, which the tests
use as an independent view of what iSCSI wrote."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lunseal.frontends.scsi.interface import CHECK_CONDITION, GOOD
from lunseal.host.iscsi.initiator import Initiator, Response
from tests.interop.helpers import (
    TOOL_TIMEOUT,
    MiB,
    QemuIoSession,
    qemu_io,
    random_file,
    run,
    sha256,
)
from tests.support.daemon import Daemon
from tests.support.iscsi import INITIATOR_1, INITIATOR_2, lunseal_portal, lunseal_url
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

SIZE = 64 * MiB


@pytest.fixture
def iscsi_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with its iSCSI portal on a free loopback port and no LUNs."""
    require_tools("qemu-img", "qemu-io", "iscsi-ls", "iscsi-inq", "iscsi-readcapacity16")
    d = Daemon(tmp_path / "home", ["--no-demo"]).start()
    try:
        yield d
    finally:
        d.kill()


def create(daemon: Daemon, name: str, size: int = SIZE, *, read_only: bool = False) -> str:
    """Create a LUN; returns its iscsi:// URL."""
    with daemon.client() as api:
        number = api.create_lun(name, size, read_only=read_only).number
    return lunseal_url(daemon.info, number)


def as_initiator(daemon: Daemon, lun: int, initiator: str) -> str:
    """A qemu ``json:`` file name for a LUN that logs in as ``initiator``
    (qemu's iscsi:// URLs cannot name the initiator)."""
    portal, target = lunseal_portal(daemon.info)
    spec = {
        "driver": "iscsi",
        "transport": "tcp",
        "portal": portal,
        "target": target,
        "lun": lun,
        "initiator-name": initiator,
    }
    return "json:" + json.dumps({"file": spec})


# -- qemu-img / qemu-io --------------------------------------------------------------


def test_qemu_img_convert_into_and_out_of_a_lun(iscsi_daemon: Daemon, tmp_path: Path) -> None:
    url = create(iscsi_daemon, "disk")
    src = random_file(tmp_path / "src.raw", SIZE)
    out = tmp_path / "out.raw"

    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))

    assert sha256(out) == sha256(src)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url)
    # What iSCSI wrote is the LUN's data, whichever protocol reads it.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", url, iscsi_daemon.uri("disk"))


def test_qemu_img_compare_sees_a_change_made_over_nbd(iscsi_daemon: Daemon, tmp_path: Path) -> None:
    """The comparisons above can fail: one sector changed over NBD shows over iSCSI."""
    url = create(iscsi_daemon, "disk", 8 * MiB)
    src = random_file(tmp_path / "src.raw", 8 * MiB)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url)

    qemu_io(iscsi_daemon.uri("disk"), "write -P 0x5a 8192 512")

    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "8192" in proc.stdout


def test_qemu_io_patterns(iscsi_daemon: Daemon) -> None:
    url = create(iscsi_daemon, "disk")
    qemu_io(
        url,
        "write -P 0xa1 0 4k",
        "write -P 0xb2 1M 1M",  # larger than one burst: R2T/Data-Out sequences
        "write -P 0xc3 512 512",  # one logical block inside a physical one
        "write -P 0xd4 1234 100",  # unaligned: qemu reads, merges, writes
        "write -z 8M 2M",  # WRITE SAME / zeroes
        f"write -P 0xe5 {SIZE - 4096} 4k",  # the last block
    )
    qemu_io(
        url,
        "read -P 0xa1 0 512",
        "read -P 0xc3 512 512",
        "read -P 0xa1 1024 210",
        "read -P 0xd4 1234 100",
        "read -P 0xa1 1334 2762",
        "read -P 0xb2 1M 1M",
        "read -P 0 8M 2M",
        f"read -P 0xe5 {SIZE - 4096} 4k",
        read_only=True,
    )
    # The same bytes over NBD.
    qemu_io(iscsi_daemon.uri("disk"), "read -P 0xb2 1M 1M", "read -P 0xd4 1234 100")
    # A wrong pattern is noticed (the reads above can fail).
    proc = qemu_io(url, "read -P 0xb3 1M 4k", check=False, read_only=True)
    assert "Pattern verification failed" in proc.stdout + proc.stderr


def test_qemu_io_beyond_the_end_is_refused(iscsi_daemon: Daemon) -> None:
    """qemu knows the size from READ CAPACITY: I/O past the end never reaches the LUN."""
    url = create(iscsi_daemon, "disk", 8 * MiB)
    proc = qemu_io(url, f"write -P 1 {8 * MiB} 4k", check=False)
    assert proc.returncode != 0
    assert "wrote" not in proc.stdout


def test_two_initiators_at_once(iscsi_daemon: Daemon) -> None:
    """Two qemu-io processes, logged in under different initiator names, keep their
    sessions open together and see each other's writes."""
    create(iscsi_daemon, "shared")
    with iscsi_daemon.client() as api:
        number = api.show_lun("shared").number
    first = as_initiator(iscsi_daemon, number, INITIATOR_1)
    second = as_initiator(iscsi_daemon, number, INITIATOR_2)
    with QemuIoSession(first) as a, QemuIoSession(second) as b:
        for i in range(8):
            writer, reader = (a, b) if i % 2 == 0 else (b, a)
            out = writer.command(f"write -P {0x10 + i} {i * MiB} 64k")
            assert "wrote 65536/65536" in out, out
            out = reader.command(f"read -P {0x10 + i} {i * MiB} 64k")
            assert "read 65536/65536" in out, out
            assert "failed" not in out, out


# -- libiscsi tools ------------------------------------------------------------------


def test_iscsi_ls_lists_the_target_and_its_luns(iscsi_daemon: Daemon) -> None:
    create(iscsi_daemon, "first")
    with iscsi_daemon.client() as api:
        second = api.create_lun("second", 16 * MiB, number=7).number
    portal, target = lunseal_portal(iscsi_daemon.info)

    out = run("iscsi-ls", "-s", f"iscsi://{portal}").stdout

    assert f"Target:{target} Portal:{portal}" in out, out
    luns = dict(re.findall(r"Lun:(\d+)\s+Type:(\S+)", out))
    assert luns.get(str(second)) == "DIRECT_ACCESS", out
    assert len([t for t in luns.values() if t == "DIRECT_ACCESS"]) == 2, out
    # libiscsi prints the size rounded down from the last LBA: 15M or 16M.
    assert re.search(rf"Lun:{second}\s+Type:DIRECT_ACCESS \(Size:1[56]M\)", out), out


def test_iscsi_inq_standard_and_device_identification(iscsi_daemon: Daemon) -> None:
    url = create(iscsi_daemon, "disk")
    other = create(iscsi_daemon, "other")

    out = run("iscsi-inq", url).stdout
    assert "Peripheral Device Type:DIRECT_ACCESS" in out, out
    assert "Removable:0" in out, out

    pages = run("iscsi-inq", "-e", "1", url).stdout
    for page in ("0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"):
        assert f"Page:{page}" in pages, pages

    # iscsi-inq prints binary designators as text, so only their types are
    # compared here; the identifier's bytes are the SCSI layer's unit tests'.
    page83 = vpd_page(url, 0x83)
    assert "DEVICE_IDENTIFICATION" in page83, page83
    assert "Designator Type:(3) NAA" in page83, page83
    assert "Association:(0) LOGICAL_UNIT" in page83, page83
    assert "Designator Type:(3) NAA" in vpd_page(other, 0x83)


def vpd_page(url: str, page: int) -> str:
    """iscsi-inq's print of a VPD page; it prints binary designators raw, so its
    output is decoded leniently."""
    proc = subprocess.run(
        ["iscsi-inq", "-e", "1", "-c", str(page), url],
        capture_output=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    return out


def test_iscsi_readcapacity16(iscsi_daemon: Daemon) -> None:
    url = create(iscsi_daemon, "disk", 48 * MiB)
    out = run("iscsi-readcapacity16", url).stdout
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{48 * MiB // 512 - 1}" in out, out
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out, out
    # 4 KiB physical blocks: 2^3 logical blocks per physical block.
    assert "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3" in out, out
    assert f"Total size:{48 * MiB}" in out, out


def test_readcapacity_follows_a_grown_lun(iscsi_daemon: Daemon) -> None:
    url = create(iscsi_daemon, "disk", 16 * MiB)
    with iscsi_daemon.client() as api:
        api.grow_lun("disk", 32 * MiB)
    out = run("iscsi-readcapacity16", url).stdout
    assert f"Total size:{32 * MiB}" in out, out


# -- write protection ----------------------------------------------------------------


def test_synced_mirror_target_refuses_iscsi_writes_until_split(
    iscsi_daemon: Daemon, tmp_path: Path
) -> None:
    src_url = create(iscsi_daemon, "src")
    image = random_file(tmp_path / "src.raw", SIZE)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), src_url)
    iscsi_daemon.cli("mirror", "create", "src", "dst", "--create-target", "--wait", check=True)
    with iscsi_daemon.client() as api:
        dst_url = lunseal_url(iscsi_daemon.info, api.show_lun("dst").number)

    # qemu reads the write-protect bit (MODE SENSE) and will not open it read-write.
    refused = qemu_io(dst_url, "write -P 0x77 0 4k", check=False)
    assert refused.returncode != 0
    assert "wrote" not in refused.stdout
    assert "protect" in (refused.stdout + refused.stderr).lower()
    # An initiator that writes anyway gets DATA PROTECT, and nothing is written.
    assert raw_write10(iscsi_daemon, "dst").sense_key == DATA_PROTECT
    # Reads work, and the target still holds exactly the source's data.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), dst_url)

    iscsi_daemon.cli("mirror", "split", "dst", "--target-access", "rw", check=True)
    qemu_io(dst_url, "write -P 0x77 0 4k")
    qemu_io(iscsi_daemon.uri("dst"), "read -P 0x77 0 4k")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), src_url)


def test_read_only_lun_refuses_iscsi_writes(iscsi_daemon: Daemon) -> None:
    url = create(iscsi_daemon, "ro", 8 * MiB, read_only=True)
    refused = qemu_io(url, "write -P 0x77 0 4k", check=False)
    assert refused.returncode != 0
    assert "wrote" not in refused.stdout
    assert raw_write10(iscsi_daemon, "ro").sense_key == DATA_PROTECT
    qemu_io(url, "read -P 0 0 4k", read_only=True)


DATA_PROTECT = 0x07


def raw_write10(daemon: Daemon, lun: str) -> Response:
    """WRITE(10) of 8 blocks of 0x77 at LBA 0 through the project's own initiator,
    which (unlike qemu) does not look at the write-protect bit first."""
    with daemon.client() as api:
        number = api.show_lun(lun).number
    host, port = daemon.iscsi_portal.rsplit(":", 1)
    with Initiator.connect(host, int(port)) as ini:
        ini.login(daemon.iscsi_target)
        # A new I_T nexus first gets its power-on UNIT ATTENTION; take it.
        for _ in range(3):
            if ini.command(number, bytes(6)).status == GOOD:  # TEST UNIT READY
                break
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0)
        response = ini.command(number, cdb, data_out=b"\x77" * 4096)
    assert response.status == CHECK_CONDITION, response
    return response


# -- access control ------------------------------------------------------------------

CHAP_USER, CHAP_SECRET = "backup-host", "sixteen-byte-pw"
TARGET_USER, TARGET_SECRET = "lunseal-array", "target-secret-1"


def allow(daemon: Daemon, initiator: str, **body: object) -> None:
    """POST /v1/iscsi/initiators/{initiator}: the API that manages the ACL."""
    response = httpx.post(
        f"{daemon.api_url}/v1/iscsi/initiators/{initiator}",
        json=body,
        headers={"Authorization": f"Bearer {daemon.token}"},
        timeout=30,
    )
    assert response.status_code in (200, 201), response.text


def inquiry(url: str, initiator: str) -> subprocess.CompletedProcess[str]:
    return run("iscsi-inq", "-i", initiator, url, check=False)


def test_chap_login_succeeds_only_with_the_secret(iscsi_daemon: Daemon) -> None:
    create(iscsi_daemon, "disk")
    allow(iscsi_daemon, INITIATOR_1, chap={"user": CHAP_USER, "secret": CHAP_SECRET})
    with iscsi_daemon.client() as api:
        number = api.show_lun("disk").number
    good = lunseal_url(iscsi_daemon.info, number, f"{CHAP_USER}%{CHAP_SECRET}")
    wrong = lunseal_url(iscsi_daemon.info, number, f"{CHAP_USER}%{CHAP_SECRET[::-1]}")
    bare = lunseal_url(iscsi_daemon.info, number)

    ok = inquiry(good, INITIATOR_1)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "DIRECT_ACCESS" in ok.stdout
    for url, initiator in ((wrong, INITIATOR_1), (bare, INITIATOR_1), (good, INITIATOR_2)):
        refused = inquiry(url, initiator)
        assert refused.returncode != 0, (url, initiator, refused.stdout)
        assert "DIRECT_ACCESS" not in refused.stdout
    # A refused login leaves the target serving: the right secret still works.
    assert inquiry(good, INITIATOR_1).returncode == 0


def test_mutual_chap(iscsi_daemon: Daemon) -> None:
    """The target proves itself with its own secret; an initiator that expects
    another secret refuses the target."""
    create(iscsi_daemon, "disk")
    allow(
        iscsi_daemon,
        INITIATOR_1,
        chap={"user": CHAP_USER, "secret": CHAP_SECRET},
        mutual={"user": TARGET_USER, "secret": TARGET_SECRET},
    )
    with iscsi_daemon.client() as api:
        number = api.show_lun("disk").number
    base = lunseal_url(iscsi_daemon.info, number, f"{CHAP_USER}%{CHAP_SECRET}")

    ok = inquiry(f"{base}?target_user={TARGET_USER}&target_password={TARGET_SECRET}", INITIATOR_1)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    impostor = f"{base}?target_user={TARGET_USER}&target_password={TARGET_SECRET[::-1]}"
    assert inquiry(impostor, INITIATOR_1).returncode != 0


def test_lun_masking_and_read_only_access(iscsi_daemon: Daemon) -> None:
    """An initiator given one LUN read-only sees only that LUN, and cannot write it;
    another initiator with every LUN writes both."""
    create(iscsi_daemon, "shown")
    create(iscsi_daemon, "hidden")
    allow(iscsi_daemon, INITIATOR_1, luns={"shown": "ro"})
    allow(iscsi_daemon, INITIATOR_2, all_luns=True)
    with iscsi_daemon.client() as api:
        shown, hidden = api.show_lun("shown").number, api.show_lun("hidden").number
    portal, _ = lunseal_portal(iscsi_daemon.info)

    listing = run("iscsi-ls", "-s", "-i", INITIATOR_1, f"iscsi://{portal}").stdout
    luns = re.findall(r"Lun:(\d+)\s+Type:DIRECT_ACCESS", listing)
    assert luns == [str(shown)], listing
    assert inquiry(lunseal_url(iscsi_daemon.info, hidden), INITIATOR_1).returncode != 0

    refused = qemu_io(as_initiator(iscsi_daemon, shown, INITIATOR_1), "write 0 4k", check=False)
    assert refused.returncode != 0
    assert "wrote" not in refused.stdout
    for number in (shown, hidden):
        qemu_io(as_initiator(iscsi_daemon, number, INITIATOR_2), "write -P 0x42 0 4k")
    qemu_io(as_initiator(iscsi_daemon, shown, INITIATOR_1), "read -P 0x42 0 4k", read_only=True)


def test_header_digest(iscsi_daemon: Daemon, tmp_path: Path) -> None:
    """CRC32C header digests: qemu's ``header-digest=crc32c`` offers CRC32C alone,
    so the login must settle on it, and the data still round-trips.  (libiscsi's
    tools cannot require digests: their URL option offers "None,CRC32C", and the
    target rightly takes the first.)  What the target answers is checked with the
    project's initiator, which records the negotiated keys."""
    create(iscsi_daemon, "disk", 8 * MiB)
    with iscsi_daemon.client() as api:
        number = api.show_lun("disk").number
    portal, target = lunseal_portal(iscsi_daemon.info)
    spec = {
        "driver": "iscsi",
        "transport": "tcp",
        "portal": portal,
        "target": target,
        "lun": number,
        "header-digest": "crc32c",
    }
    name = "json:" + json.dumps({"file": spec})
    src = random_file(tmp_path / "src.raw", 8 * MiB)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), name)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), name)

    host, port = portal.rsplit(":", 1)
    with Initiator.connect(host, int(port)) as ini:
        session = ini.login(target, header_digest=True, data_digest=True)
        assert session.keys.get("HeaderDigest") == "CRC32C", session.keys
        assert session.keys.get("DataDigest") == "CRC32C", session.keys
        read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
        for _ in range(3):  # the first command of a new nexus gets a UNIT ATTENTION
            response = ini.command(number, read10, read_length=4096)
            if response.status == GOOD:
                break
        assert response.status == GOOD, response
        assert response.data == src.read_bytes()[:4096]
