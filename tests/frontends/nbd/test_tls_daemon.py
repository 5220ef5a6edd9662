"""TLS through a real ``lunseal serve``: HTTPS for the API and the CLI verifying it,
lunseal's own NBD client over nbds://, backup and restore against a TLS-only array,
and the start-up checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.daemon import check_api_exposure, open_nbd_warning
from lunseal.errors import InvalidArgument, LunsealError
from lunseal.host.client import ArrayClient
from lunseal.host.nbd_client import NbdClient
from lunseal.tlsconfig import TlsMode, build_client_context
from tests.support.cli import lunseal, one_line_error
from tests.support.daemon import Daemon
from tests.support.tlscerts import Pki, make_pki

pytestmark = pytest.mark.daemon

MiB = 1 << 20


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_args(pki: Pki, *extra: str) -> list[str]:
    return [
        "--tls",
        "require",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-ca",
        str(pki.ca_file),
        "--api-tls",
        *extra,
    ]


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Pki) -> Iterator[Daemon]:
    # No Unix socket: every client of this array goes through TLS.
    d = Daemon(tmp_path / "home", extra_args=["--no-demo", "--no-unix-socket", *tls_args(pki)])
    d.start()
    try:
        yield d
    finally:
        d.kill()


def api(d: Daemon, pki: Pki) -> ArrayClient:
    return ArrayClient(d.api_url, d.token, ca_file=pki.ca_file)


# -- the API over HTTPS ----------------------------------------------------------------


def test_api_is_https_and_the_cli_verifies_it(tls_daemon: Daemon, pki: Pki) -> None:
    assert tls_daemon.api_url.startswith("https://")
    with api(tls_daemon, pki) as client:
        client.create_lun("disk", 4 * MiB)
        [info] = client.list_luns()
        assert info.nbd_uris == [f"nbds://{tls_daemon.tcp}/disk"]
    # The local CLI finds the CA in daemon.json.
    listed = lunseal("--home", str(tls_daemon.home), "lun", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"disk"' in listed.stdout
    remote = ["--url", tls_daemon.api_url, "lun", "list"]
    token = {"LUNSEAL_TOKEN": tls_daemon.token}
    # A remote CLI with no CA cannot verify the server and sends nothing.
    refused = lunseal(*remote, env=token)
    assert "certificate verify failed" in one_line_error(refused, 5)
    assert lunseal("--ca-file", str(pki.ca_file), *remote, env=token).returncode == 0
    with_ca = {**token, "LUNSEAL_CA_FILE": str(pki.ca_file)}
    assert lunseal(*remote, env=with_ca).returncode == 0


def test_plain_http_to_the_https_api_gets_nothing(tls_daemon: Daemon) -> None:
    plain = tls_daemon.api_url.replace("https://", "http://")
    with ArrayClient(plain, tls_daemon.token, timeout=10) as client, pytest.raises(LunsealError):
        client.list_luns()


# -- lunseal's own NBD client ----------------------------------------------------------------


def test_host_nbd_client_over_nbds(tls_daemon: Daemon, pki: Pki) -> None:
    with api(tls_daemon, pki) as client:
        client.create_lun("disk", 4 * MiB)
    uri = f"nbds://{tls_daemon.tcp}/disk"
    context = build_client_context(pki.ca_file, cert=pki.client_cert, key=pki.client_key)
    data = os.urandom(MiB)
    with NbdClient(uri, tls=context) as nbd:
        nbd.write(MiB, data)
        nbd.flush()
    with NbdClient(uri, tls=build_client_context(pki.ca_file)) as nbd:
        assert nbd.read(MiB, MiB) == data
    with pytest.raises(LunsealError, match="TLS is required"):
        NbdClient(f"nbd://{tls_daemon.tcp}/disk")
    with pytest.raises(LunsealError, match="TLS"):
        NbdClient(uri, tls=build_client_context(make_pki(pki.dir / "other").ca_file))


def test_backup_and_restore_against_a_tls_only_array(
    tls_daemon: Daemon, pki: Pki, tmp_path: Path
) -> None:
    with api(tls_daemon, pki) as client:
        client.create_lun("app", 8 * MiB)
    env = {
        "LUNSEAL_HOME": str(tls_daemon.home),
        "LUNSEAL_ARCHIVE": str(tmp_path / "archive"),
        "LUNSEAL_CA_FILE": str(pki.ca_file),
    }
    uri = f"nbds://{tls_daemon.tcp}/app"
    context = build_client_context(pki.ca_file)
    original = os.urandom(2 * MiB)
    with NbdClient(uri, tls=context) as nbd:
        nbd.write(0, original)
        nbd.flush()
    taken = lunseal("backup", "create", "app", "--mirror", "app-copy", "--json", env=env)
    assert taken.returncode == 0, taken.stderr
    with NbdClient(uri, tls=context) as nbd:
        nbd.write(0, bytes(2 * MiB))
        nbd.flush()
    backup_id = json.loads(taken.stdout)["id"]
    done = lunseal("restore", backup_id, "--json", env=env)
    assert done.returncode == 0, done.stderr
    with NbdClient(uri, tls=context) as nbd:
        assert nbd.read(0, 2 * MiB) == original


# -- start-up checks ---------------------------------------------------------------------


def test_missing_certificate_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path, pki: Pki
) -> None:
    home = tmp_path / "home"
    args = ["--tls", "require", "--tls-cert", str(tmp_path / "nope.pem")]
    result = lunseal("serve", "--home", str(home), *args, "--tls-key", str(pki.server_key))
    assert "cannot read the TLS certificate or key" in one_line_error(result, 2)
    assert not home.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls", "require"], "--tls-cert FILE and --tls-key FILE"),
        (["--tls-cert", "x.pem"], "TLS is off"),
        (["--tls", "sometimes"], "off, allow or require"),
    ],
)
def test_incomplete_tls_options_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    home = tmp_path / "home"
    result = lunseal("serve", "--home", str(home), "--nbd-port", "0", "--api-port", "0", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not home.exists()


def test_plain_http_is_refused_beyond_loopback() -> None:
    for host in ("0.0.0.0", "192.0.2.1", "::"):
        with pytest.raises(InvalidArgument, match="--api-tls"):
            check_api_exposure(host, api_tls=False)
        check_api_exposure(host, api_tls=True)
    check_api_exposure("127.0.0.1", api_tls=False)
    check_api_exposure("::1", api_tls=False)


def test_open_nbd_listener_warning() -> None:
    def warn(host: str, mode: TlsMode, verify: bool = False) -> str | None:
        return open_nbd_warning(host, 10809, mode, verify_client=verify)

    assert warn("127.0.0.1", TlsMode.OFF) is None
    assert warn("0.0.0.0", TlsMode.REQUIRE, verify=True) is None
    off = warn("0.0.0.0", TlsMode.OFF)
    assert off is not None
    assert "listens beyond loopback and TLS is off" in off
    assert "optional" in (warn("192.0.2.1", TlsMode.ALLOW) or "")
    assert "not verified" in (warn("::", TlsMode.REQUIRE) or "")


def _served_certificate(d: Daemon, pki: Pki) -> bytes:
    """The certificate the API's HTTPS listener shows a new client (DER)."""
    host, port = d.api_url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_sighup_reloads_the_certificate_files(tls_daemon: Daemon, pki: Pki) -> None:
    """A renewed certificate (same files, new contents) is served after SIGHUP,
    without a restart: the daemon's reload hook re-reads the TLS files."""
    before = _served_certificate(tls_daemon, pki)
    renewed = pki.ca.issue_cert("localhost", "127.0.0.1")
    renewed.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    renewed.private_key_pem.write_to_path(str(pki.server_key))
    assert _served_certificate(tls_daemon, pki) == before  # nothing re-read on its own
    assert tls_daemon.proc is not None
    os.kill(tls_daemon.proc.pid, signal.SIGHUP)
    for _ in range(100):  # bounded by count; each try is a fresh handshake
        if _served_certificate(tls_daemon, pki) != before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the renewed certificate was not served after SIGHUP")
    assert "TLS certificates" in tls_daemon.log()
