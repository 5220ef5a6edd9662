"""The array daemon: one process, one event loop, NBD and the API side by side.

Start-up order: bind the TCP listeners (so a busy port fails before a data
directory, catalog or demo LUN is created, and port 0 resolves to a real
port), lock and open the data directory, serve, then publish ``daemon.json``
so the CLI can find us.  SIGTERM/SIGINT: stop accepting, let connections send what they owe,
flush every LUN, record a clean shutdown, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from lunseal import __version__
from lunseal.engine.array import CATALOG_FILE, Array
from lunseal.engine.lun import run_on_lun
from lunseal.errors import AddressInUse, InvalidArgument, LunsealError
from lunseal.frontends.api.app import DaemonContext, create_app
from lunseal.frontends.api.metrics import Exposure, exposure_warnings
from lunseal.frontends.iscsi.acl import CatalogAccess
from lunseal.frontends.iscsi.server import IscsiServer, default_target_name
from lunseal.frontends.nbd.server import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    NbdServer,
)
from lunseal.fsutil import atomic_write_json
from lunseal.home import Home
from lunseal.tlsconfig import ServerTls, TlsFiles, TlsMode

log = logging.getLogger("lunseal.daemon")

DEMO_LUN = "demo"
DEMO_SIZE = 1 << 30


@dataclass
class DaemonConfig:
    home: Path
    nbd_host: str = "127.0.0.1"
    nbd_port: int = 10809
    unix_socket: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 10810
    demo_lun: bool = True
    #: Seconds without changes after which a LUN's state is recorded as clean.
    clean_after: float = 2.0
    nbd_max_connections: int = DEFAULT_MAX_CONNECTIONS
    nbd_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    #: Serve iSCSI too (``--no-iscsi`` turns it off).
    iscsi: bool = True
    iscsi_host: str = "127.0.0.1"
    iscsi_port: int = 3260
    #: ``None``: ``iqn.2026-12.io.lunseal:lunseal.<array id>``.
    iscsi_target_name: str | None = None
    #: STARTTLS on the NBD TCP listener: off, allow or require.
    tls: TlsMode = TlsMode.OFF
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA of client certificates (NBD); clients that show one get identities.
    tls_ca: Path | None = None
    tls_verify_client: bool = False
    #: Serve the API over HTTPS with the same certificate.
    api_tls: bool = False
    #: Directories under which LUNs may use files named by a user (``path=``).
    allowed_backing_dirs: list[Path] = field(default_factory=list)
    #: The configuration file serve read (re-read on SIGHUP), if any.
    config_file: Path | None = None
    #: serve options given on the command line: a reload leaves them alone (flags win).
    from_command_line: frozenset[str] = frozenset()


def server_tls(cfg: DaemonConfig) -> ServerTls | None:
    """The daemon's TLS configuration, checked and loaded, or one clear error."""
    wanted = cfg.tls != TlsMode.OFF or cfg.api_tls
    if not wanted:
        if cfg.tls_cert or cfg.tls_key or cfg.tls_ca or cfg.tls_verify_client:
            raise InvalidArgument(
                "TLS files given but TLS is off: add --tls allow|require (NBD) or --api-tls"
            )
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise InvalidArgument("TLS needs --tls-cert FILE and --tls-key FILE")
    files = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_verify_client)
    return ServerTls(files, cfg.tls)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run(config: DaemonConfig) -> int:
    # A file-size limit (ulimit -f) must fail the one write that hits it (EFBIG,
    # reported to the client) instead of killing the array with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return int(uvloop.run(_serve(config)))


async def _serve(cfg: DaemonConfig) -> int:
    tls = server_tls(cfg)  # bad certificate files fail before anything is bound or created
    nbd_sock, api_sock = _bind_listeners(cfg)
    try:
        check_api_exposure(str(api_sock.getsockname()[0]), api_tls=cfg.api_tls)
    except BaseException:
        nbd_sock.close()
        api_sock.close()
        raise
    try:
        iscsi_sock = (
            _bind_tcp("iSCSI", "--iscsi-port", cfg.iscsi_host, cfg.iscsi_port)
            if cfg.iscsi
            else None
        )
    except BaseException:
        nbd_sock.close()
        api_sock.close()
        raise
    try:
        home = Home(cfg.home)
        home.ensure()
        token = home.load_or_create_token()
        fresh = not (home.root / CATALOG_FILE).exists()
        array = Array.open(home.root)
        array.allowed_backing_dirs = tuple(d.resolve() for d in cfg.allowed_backing_dirs)
    except BaseException:
        nbd_sock.close()
        api_sock.close()
        if iscsi_sock is not None:
            iscsi_sock.close()
        raise
    try:
        if fresh and cfg.demo_lun and not array.luns():
            array.create_lun(DEMO_LUN, DEMO_SIZE)
        return await _run_servers(cfg, home, array, token, (nbd_sock, api_sock), iscsi_sock, tls)
    finally:
        array.close()
        log.info("array closed cleanly")


async def _run_servers(
    cfg: DaemonConfig,
    home: Home,
    array: Array,
    token: str,
    sockets: tuple[socket.socket, socket.socket],
    iscsi_sock: socket.socket | None,
    tls: ServerTls | None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(cfg, array)
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)

    nbd_sock, api_sock = sockets
    nbd = NbdServer(
        array,
        max_connections=cfg.nbd_max_connections,
        handshake_timeout=cfg.nbd_handshake_timeout,
        tls=tls,
    )
    await nbd.listen_tcp_socket(nbd_sock)
    _warn_if_open(nbd, cfg)
    if cfg.unix_socket:
        await nbd.listen_unix(home.nbd_socket)

    iscsi = await _start_iscsi(cfg, array, iscsi_sock) if iscsi_sock is not None else None

    api_host, api_port = api_sock.getsockname()[:2]
    ctx = DaemonContext(array=array, nbd=nbd, token=token)
    if iscsi is not None:
        ctx.iscsi_target, ctx.iscsi_portal = iscsi.target_name, iscsi.portal
        ctx.iscsi_connections = partial(len, iscsi.connections)
    ctx.exposures = partial(_exposures, cfg, array, nbd, iscsi, api_host)
    ctx.reloads = lambda: {"ok": reloader.reloads, "failed": reloader.failures}
    if tls is not None:
        reloader.hooks.append(partial(_reload_tls, tls))
    scheme = "https" if cfg.api_tls else "http"
    ctx.api_url = f"{scheme}://{_url_host(api_host)}:{api_port}"
    api_config = uvicorn.Config(
        create_app(ctx), log_level="warning", lifespan="off", access_log=False
    )
    if cfg.api_tls:
        assert tls is not None
        api_config.load()
        # Our own context (TLS 1.2+, reloadable) rather than uvicorn's.
        api_config.ssl = tls.pinned_context()
    api = _EmbeddedUvicorn(api_config)
    api_task = asyncio.create_task(api.serve(sockets=[api_sock]))

    checkpoints = asyncio.create_task(_checkpoint_loop(array, cfg.clean_after))
    copier = asyncio.create_task(_mirror_copy_loop(array))
    _publish(home, nbd, ctx.api_url, iscsi, cfg)
    _print_banner(home, array, nbd, ctx.api_url, iscsi)
    try:
        await _wait_for_stop(stop, api_task)
    finally:
        log.info("shutting down: closing listeners and connections")
        checkpoints.cancel()
        copier.cancel()
        api.should_exit = True
        with contextlib.suppress(Exception):
            await api_task
        if iscsi is not None:
            await iscsi.close()
        await nbd.close()
        home.daemon_info.unlink(missing_ok=True)
    return 0


class Reloader:
    """SIGHUP: re-read the configuration file and apply what can change while
    serving (log level, allowed backing directories, and whatever other parts
    register in :attr:`hooks`, such as TLS certificates and ACL defaults).

    A file that cannot be used changes nothing: one error is logged and the
    old settings stay."""

    def __init__(self, cfg: DaemonConfig, array: Array) -> None:
        self.cfg = cfg
        self.array = array
        #: Called with the new serve settings (option name -> value, defaults
        #: filled in); each returns what it reloaded, for the log line, or "".
        self.hooks: list[Callable[[dict[str, Any]], str]] = []
        self.reloads = 0
        self.failures = 0

    def reload(self) -> None:
        if self.cfg.config_file is None and not self.hooks:
            log.info("SIGHUP: no configuration file (--config) to reload; nothing changed")
            return
        try:
            # Without a file the hooks still run (certificates are re-read).
            done = self._apply(self._read() if self.cfg.config_file is not None else {})
        except Exception as exc:
            self.failures += 1
            message = exc.message if isinstance(exc, LunsealError) else str(exc)
            log.error("SIGHUP: configuration not reloaded, the old settings stay: %s", message)
            return
        self.reloads += 1
        source = self.cfg.config_file or "the command line"
        log.info("SIGHUP: reloaded %s from %s", ", ".join(done) or "nothing", source)

    def _read(self) -> dict[str, Any]:
        from lunseal.config import load
        from lunseal.host.cli.serve import serve

        assert self.cfg.config_file is not None
        return load(self.cfg.config_file, serve).effective(serve)

    def _apply(self, new: dict[str, Any]) -> list[str]:
        # Flags given on the command line still win over the file.
        new = {k: v for k, v in new.items() if k not in self.cfg.from_command_line}
        level = logging.getLevelName(str(new.get("log_level", "")).upper())
        if "log_level" in new and not isinstance(level, int):
            raise InvalidArgument(f"serve.log_level: unknown log level {new['log_level']!r}")
        done: list[str] = []
        for hook in self.hooks:  # before anything is changed: a failing hook changes nothing
            what = hook(new)
            if what:
                done.append(what)
        if "log_level" in new:
            logging.getLogger().setLevel(level)
            done.insert(0, f"log level {new['log_level']}")
        if "allowed_backing_dirs" in new:
            dirs = (Path(d).expanduser().resolve() for d in new["allowed_backing_dirs"])
            self.array.allowed_backing_dirs = tuple(dict.fromkeys(dirs))
            done.append(f"allowed backing directories ({len(self.array.allowed_backing_dirs)})")
        return done


async def _start_iscsi(cfg: DaemonConfig, array: Array, sock: socket.socket) -> IscsiServer:
    # Imported here: the SCSI layer is only needed when iSCSI is on.
    from lunseal.frontends.scsi.reservations import Reservations
    from lunseal.frontends.scsi.target import ScsiTarget

    policy = CatalogAccess(array)
    server = IscsiServer(
        ScsiTarget(array, Reservations.for_array(array)),
        target_name=cfg.iscsi_target_name or default_target_name(array.array_id),
        policy=policy,
    )
    await server.listen_socket(sock)
    loop = asyncio.get_running_loop()

    def acl_changed(_name: str) -> None:
        # Every session is checked, not only the named initiator's: the first
        # entry of an empty ACL takes access from everyone else.  On the loop
        # (the API's routes) at once, so the change holds when the call returns.
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            server.access_changed()
        else:
            loop.call_soon_threadsafe(server.access_changed)

    array.catalog.iscsi_acl.on_change.append(acl_changed)
    host = server.address[0] if server.address else cfg.iscsi_host
    if not _is_loopback(host) and not policy.configured:
        log.warning(
            "the iSCSI portal %s listens beyond loopback and no initiator ACL is configured: "
            "any host that reaches it can read and write every LUN "
            "(configure one with 'lunseal iscsi allow')",
            server.portal,
        )
    return server


def check_api_exposure(host: str, *, api_tls: bool) -> None:
    """Plain HTTP only on loopback: elsewhere the bearer token would cross the network."""
    if not api_tls and not _is_loopback(host):
        raise InvalidArgument(
            f"the API would listen on {host} without TLS, where its bearer token "
            "could be read off the network: add --api-tls (with --tls-cert and --tls-key) "
            "or keep --api-listen on loopback"
        )


def _warn_if_open(nbd: NbdServer, cfg: DaemonConfig) -> None:
    host, port = nbd.tcp_address or (cfg.nbd_host, cfg.nbd_port)
    warning = open_nbd_warning(host, port, cfg.tls, verify_client=cfg.tls_verify_client)
    if warning:
        log.warning("%s", warning)


def open_nbd_warning(host: str, port: int, mode: TlsMode, *, verify_client: bool) -> str | None:
    """The start-up warning (in the iSCSI portal's words) for an NBD listener that
    any host reaching it may use; None when it is on loopback or needs a certificate."""
    if _is_loopback(host) or (mode == TlsMode.REQUIRE and verify_client):
        return None
    if mode == TlsMode.REQUIRE:
        why = "client certificates are not verified (--tls-verify-client)"
    elif mode == TlsMode.ALLOW:
        why = "TLS is optional (clients may stay in clear text)"
    else:
        why = "TLS is off"
    return (
        f"the NBD listener {_url_host(host)}:{port} listens beyond loopback and {why}: "
        "any host that reaches it can read and write every LUN "
        "(use --tls require --tls-verify-client)"
    )


def _reload_tls(tls: ServerTls, new: dict[str, Any]) -> str:
    """SIGHUP: the certificate files are read again (new connections get them)."""
    tls.reload()
    return "TLS certificates"


def _exposures(
    cfg: DaemonConfig, array: Array, nbd: NbdServer, iscsi: IscsiServer | None, api_host: str
) -> list[Exposure]:
    tcp = nbd.tcp_address
    address = iscsi.address if iscsi is not None else None
    return exposure_warnings(
        nbd=tcp[0] if tcp else None,
        iscsi=address[0] if address else None,
        iscsi_acl=array.catalog.iscsi_acl.configured,
        api=api_host,
        nbd_protected=cfg.tls == TlsMode.REQUIRE and cfg.tls_verify_client,
        api_tls=cfg.api_tls,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Retry:
    """Error handling of a background loop: the loop survives any error, logs
    each kind of failure once (not once per round), and waits longer between
    attempts while failures go on (exponential backoff up to ``most``)."""

    def __init__(self, what: str, *, first: float = 0.5, most: float = 30.0) -> None:
        self.what = what
        self.first = first
        self.most = most
        self.delay = 0.0
        self._logged: set[str] = set()

    def failed(self, exc: Exception) -> float:
        """Record a failure; returns how long to wait before the next attempt."""
        # By class: messages carry offsets and would make every round a new kind.
        kind = type(exc).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.error(
                "%s failed (retrying with backoff; further %s errors are not logged until "
                "it works again): %s",
                self.what,
                kind,
                exc,
                exc_info=exc,
            )
        self.delay = min(self.most, max(self.first, self.delay * 2))
        return self.delay

    def succeeded(self) -> None:
        if self._logged:
            log.warning("%s works again", self.what)
        self._logged.clear()
        self.delay = 0.0


async def _checkpoint_loop(array: Array, clean_after: float) -> None:
    """Mark LUNs clean once their changes have been idle (see engine.state).

    The timer runs here; each LUN's checkpoint (the tamper check, flush and
    catalog commit, its mirrors' too) runs on that LUN's worker, ordered with
    its writes, so a slow disk delays only its own LUN."""
    interval = max(0.05, min(1.0, clean_after / 4))
    retry = Retry("checkpoint")
    while True:
        await asyncio.sleep(interval)
        jobs = [
            run_on_lun(array.mirrors.writer_of(lun), partial(array.checkpoint, clean_after, lun))
            for lun in array.luns()
            if lun.available
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:  # the loop must outlive any failure
            await asyncio.sleep(retry.failed(failed))
        else:
            retry.succeeded()


async def _mirror_copy_loop(array: Array) -> None:
    """Drive mirror copies in bounded steps, each on its source LUN's worker:
    the source's host I/O runs between steps, other LUNs are not involved, and
    the event loop only waits for the step to finish."""
    loop = asyncio.get_running_loop()
    work = asyncio.Event()

    def wake() -> None:  # copies start on a worker thread (resync, restore)
        loop.call_soon_threadsafe(work.set)

    array.mirrors.wake = wake
    retry = Retry("mirror copy step")
    while True:
        copying = array.mirrors.copying()
        if not copying:
            work.clear()
            if not array.mirrors.busy():  # a copy may have started since the check
                await work.wait()
            continue
        results = await asyncio.gather(
            *(run_on_lun(m.source, m.copy_step) for m in copying), return_exceptions=True
        )
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:  # never stop every mirror's copy for good
            await asyncio.sleep(retry.failed(failed))
        else:
            retry.succeeded()
        await asyncio.sleep(0)  # inline steps (LUNs without a worker) still let hosts in


async def _wait_for_stop(stop: asyncio.Event, api_task: asyncio.Task[None]) -> None:
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopper, api_task}, return_when=asyncio.FIRST_COMPLETED)
    if api_task in done:
        stopper.cancel()
        api_task.result()  # surface why the API server died
        raise RuntimeError("the API server stopped unexpectedly")


def _bind_listeners(cfg: DaemonConfig) -> tuple[socket.socket, socket.socket]:
    """The NBD and API sockets, bound and listening, or one clear error."""
    nbd = _bind_tcp("NBD", "--nbd-port", cfg.nbd_host, cfg.nbd_port)
    try:
        return nbd, _bind_tcp("the API", "--api-port", cfg.api_host, cfg.api_port)
    except BaseException:
        nbd.close()
        raise


def _bind_tcp(what: str, option: str, host: str, port: int) -> socket.socket:
    where = f"{_url_host(host)}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot listen for {what} on {where}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR only skips TIME_WAIT after a restart; a live listener still wins.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(
                f"cannot listen for {what} on {where}: the port is in use "
                f"(another lunseal?); choose another with {option} (0 picks a free one)"
            ) from None
        raise InvalidArgument(
            f"cannot listen for {what} on {where}: {exc.strerror or exc}"
        ) from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _publish(
    home: Home, nbd: NbdServer, api_url: str, iscsi: IscsiServer | None, cfg: DaemonConfig
) -> None:
    tcp = nbd.tcp_address
    address = iscsi.address if iscsi is not None else None
    atomic_write_json(
        home.daemon_info,
        {
            "pid": os.getpid(),
            "version": __version__,
            "api_url": api_url,
            "nbd_tcp": f"{_url_host(tcp[0])}:{tcp[1]}" if tcp else None,
            "nbd_unix": str(nbd.unix_path) if nbd.unix_path else None,
            "iscsi_host": address[0] if address else None,
            "iscsi_port": address[1] if address else None,
            "iscsi_portal": iscsi.portal if iscsi is not None else None,
            "iscsi_target": iscsi.target_name if iscsi is not None else None,
            "nbd_tls": str(cfg.tls),
            # The CLI on this host verifies the API with the CA that signed its certificate.
            "api_ca_file": str(cfg.tls_ca.resolve()) if cfg.api_tls and cfg.tls_ca else None,
        },
    )


def _print_banner(
    home: Home, array: Array, nbd: NbdServer, api_url: str, iscsi: IscsiServer | None
) -> None:
    lines = [f"lunseal {__version__} serving array {array.array_id} from {home.root}"]
    tcp = nbd.tcp_address
    scheme = "nbds" if nbd.tls_offered else "nbd"
    for lun in array.luns()[:5]:
        if tcp:
            lines.append(f"  NBD  {scheme}://{_url_host(tcp[0])}:{tcp[1]}/{lun.name}")
        if nbd.unix_path:
            lines.append(f"  NBD  nbd+unix:///{lun.name}?socket={nbd.unix_path}")
    if iscsi is not None:
        for lun in array.luns()[:5]:
            lines.append(f"  iSCSI iscsi://{iscsi.portal}/{iscsi.target_name}/{lun.record.number}")
    if not array.luns():
        lines.append("  no LUNs yet: lunseal lun create NAME SIZE")
    lines.append(f"  API  {api_url}  (bearer token in {home.api_token}; OpenAPI: /openapi.json)")
    cli = Path(sys.executable).with_name("lunseal")
    lines.append(f"  CLI  {cli if cli.exists() else 'lunseal'} --home {home.root} lun list")
    if tcp:
        first = array.luns()[0].name if array.luns() else ""
        if not nbd.tls_offered:
            lines.append(f"  try  qemu-img info nbd://{_url_host(tcp[0])}:{tcp[1]}/{first}")
        else:
            lines.append(
                f"  try  nbdinfo 'nbds://{_url_host(tcp[0])}:{tcp[1]}/{first}"
                "?tls-certificates=DIR'  (DIR holds ca-cert.pem; see docs/tls.md)"
            )
    print("\n".join(lines), flush=True)
