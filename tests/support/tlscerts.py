"""Test certificates (trustme): a CA, a server certificate for localhost and
127.0.0.1, a client certificate, written where lunseal, qemu and libnbd look."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from lunseal.tlsconfig import TlsFiles


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_files(self, *, verify_client: bool = False, ca: bool = True) -> TlsFiles:
        return TlsFiles(
            self.server_cert,
            self.server_key,
            self.ca_file if ca else None,
            verify_client=verify_client,
        )

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def client_dir(self, name: str, *, with_cert: bool = True, ca: Path | None = None) -> Path:
        """A directory as qemu's tls-creds-x509 and libnbd's tls-certificates want it."""
        target = self.dir / name
        target.mkdir()
        (target / "ca-cert.pem").write_bytes((ca or self.ca_file).read_bytes())
        if with_cert:
            (target / "client-cert.pem").write_bytes(self.client_cert.read_bytes())
            (target / "client-key.pem").write_bytes(self.client_key.read_bytes())
        return target


def make_pki(directory: Path, *, client_name: str = "backup-host") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="lunseal test CA")
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert(f"{client_name}.example", common_name=client_name)
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    paths = {n: directory / f"{n}.pem" for n in ("server", "server-key", "client", "client-key")}
    server.cert_chain_pems[0].write_to_path(str(paths["server"]))
    server.private_key_pem.write_to_path(str(paths["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client"]))
    client.private_key_pem.write_to_path(str(paths["client-key"]))
    return Pki(
        directory,
        ca,
        ca_file,
        paths["server"],
        paths["server-key"],
        paths["client"],
        paths["client-key"],
    )
