"""TLS for the NBD listener and the API: ``ssl.SSLContext``s built from PEM files.

One :class:`ServerTls` holds the daemon's certificate configuration.  NBD
connections take :attr:`ServerTls.context` when they upgrade, so
:meth:`ServerTls.reload` (SIGHUP) takes effect for every later handshake;
connections already encrypted keep the keys they negotiated.

Client identities: a verified client certificate is reduced to strings the
NBD export ACL can match exactly (``cert:CN=...``, ``san:DNS:...``,
``san:URI:...``, ``san:email:...``, ``san:IP:...``).
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lunseal.errors import InvalidArgument


class TlsMode(enum.StrEnum):
    #: No TLS: STARTTLS is refused as unsupported.
    OFF = "off"
    #: Clients may upgrade with STARTTLS or stay in clear text.
    ALLOW = "allow"
    #: Nothing is listed, described or opened before STARTTLS.
    REQUIRE = "require"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    #: CA bundle client certificates are checked against (none: no client certificates).
    ca: Path | None = None
    #: Refuse the handshake of a client without a certificate the CA signed.
    verify_client: bool = False


def build_server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.2+ server context, or one clear InvalidArgument naming the bad file."""
    if files.verify_client and files.ca is None:
        raise InvalidArgument("--tls-verify-client needs --tls-ca (the CA of client certificates)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, files.cert, files.key)
    if files.ca is not None:
        _load_ca(context, files.ca)
        # OPTIONAL still verifies a certificate that is offered: a client that
        # shows one gets identities, one that does not stays anonymous.
        context.verify_mode = ssl.CERT_REQUIRED if files.verify_client else ssl.CERT_OPTIONAL
    return context


def build_client_context(
    ca: Path | None, *, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A verifying TLS 1.2+ client context (system CAs when ``ca`` is None)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(context, ca)
    if cert is not None:
        _load_chain(context, cert, key or cert)
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise InvalidArgument(f"cannot read the TLS certificate or key: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgument(
            f"cannot load the TLS certificate {cert} with key {key}: {_reason(exc)}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise InvalidArgument(f"cannot read the TLS CA file {ca}") from None
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgument(f"cannot load the TLS CA file {ca}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc)


class ServerTls:
    """The daemon's server-side TLS: the current context, rebuilt on reload."""

    def __init__(self, files: TlsFiles, mode: TlsMode = TlsMode.ALLOW) -> None:
        self.files = files
        self.mode = mode
        self._context = build_server_context(files)
        self._pinned: list[ssl.SSLContext] = []

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    @property
    def verifies_clients(self) -> bool:
        return self.files.verify_client

    def pinned_context(self) -> ssl.SSLContext:
        """A context for a server that keeps the object it was given (uvicorn):
        :meth:`reload` loads the new files into it in place."""
        context = build_server_context(self.files)
        self._pinned.append(context)
        return context

    def reload(self) -> None:
        """Read the files again; on any error keep serving with the old context.

        Raises InvalidArgument (the old context stays) so the caller can log why."""
        fresh = build_server_context(self.files)  # proves the files load before anything changes
        for context in self._pinned:
            # In place: a CA added before stays trusted until a restart (OpenSSL
            # cannot forget one); certificate and key are replaced.
            _load_chain(context, self.files.cert, self.files.key)
            if self.files.ca is not None:
                _load_ca(context, self.files.ca)
        self._context = fresh


def peer_identities(peercert: dict[str, Any] | None) -> list[str]:
    """The identities of a verified peer certificate (empty without one).

    ``peercert`` is ``SSLObject.getpeercert()``: it is only filled in when the
    certificate was verified against the CA, so nothing here is self-asserted."""
    if not peercert:
        return []
    found: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                found.append(f"cert:CN={value}")
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "URI", "email"):
            found.append(f"san:{kind}:{value}")
        elif kind == "IP Address":
            found.append(f"san:IP:{value}")
    return found
