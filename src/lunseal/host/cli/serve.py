"""``lunseal serve``: run the array daemon in the foreground."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import typer
from typer._click.core import ParameterSource

from lunseal.home import resolve_home

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager: the file's values become serve's defaults before any other option is read."""
    if value is not None:
        from lunseal.config import load

        settings = load(value, serve)
        ctx.default_map = {**(ctx.default_map or {}), **settings.serve}
        ctx.meta["lunseal.config"] = settings
    return value


def serve(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        "--config",
        is_eager=True,
        callback=_load_config,
        help="TOML file whose [serve] keys set these options (flags win); see lunseal config",
    ),
    nbd_listen: str = typer.Option("127.0.0.1", help="address of the NBD TCP listener"),
    nbd_port: int = typer.Option(10809, min=0, max=65535, help="NBD TCP port (0 picks a free one)"),
    unix_socket: bool = typer.Option(True, help="also serve NBD on HOME/nbd.sock"),
    api_listen: str = typer.Option("127.0.0.1", help="address of the management API"),
    api_port: int = typer.Option(
        10810, min=0, max=65535, help="management API port (0 picks a free one)"
    ),
    iscsi: bool = typer.Option(True, help="serve the LUNs over iSCSI too"),
    iscsi_listen: str = typer.Option("127.0.0.1", help="address of the iSCSI portal"),
    iscsi_port: int = typer.Option(
        3260, min=0, max=65535, help="iSCSI portal port (0 picks a free one)"
    ),
    iscsi_target_name: str | None = typer.Option(
        None, help="the target's IQN (default iqn.2026-12.io.lunseal:lunseal.<array id>)"
    ),
    demo: bool = typer.Option(True, help="create a 1G LUN 'demo' in a new data directory"),
    max_connections: int = typer.Option(
        256, help="NBD connections served at once; more are refused with a log line"
    ),
    handshake_timeout: float = typer.Option(
        10.0, help="seconds an NBD client may take to negotiate before it is dropped"
    ),
    tls: str = typer.Option(
        "off",
        help="NBD over TLS (STARTTLS) on the TCP listener: off, allow (clients choose) or "
        "require (nothing is listed or opened in clear text); the Unix socket stays clear",
    ),
    tls_cert: Path | None = typer.Option(None, help="server certificate (PEM, chain first)"),
    tls_key: Path | None = typer.Option(None, help="private key of --tls-cert (PEM)"),
    tls_ca: Path | None = typer.Option(
        None, help="CA bundle that client certificates are verified against (PEM)"
    ),
    tls_verify_client: bool = typer.Option(
        False, help="refuse NBD clients without a certificate signed by --tls-ca"
    ),
    api_tls: bool = typer.Option(
        False, help="serve the API over HTTPS with --tls-cert/--tls-key (needed beyond loopback)"
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    log_file: Path | None = typer.Option(None, help="also append logs to this file"),
    clean_after: float = typer.Option(
        2.0,
        help="seconds without writes after which a LUN's state is recorded as clean "
        "(a crash before that gives the LUN a new state epoch)",
    ),
    allowed_backing_dirs: list[Path] = typer.Option(
        [],
        "--allow-backing-dir",
        help="directory under which LUNs may use existing or new files (path=); repeatable. "
        "Without one, backing files live only in the data directory",
    ),
) -> None:
    """Run the array: serve LUNs over NBD, iSCSI and the management API until SIGTERM.

    Exit codes: 0 after SIGTERM or Ctrl-C; 6 when a port or the data directory
    is in use; 2 when an address cannot be listened on. The ports are checked
    before the data directory is created.
    """
    # Imported here: the daemon pulls in uvicorn and FastAPI, which every other
    # subcommand would otherwise pay for at start-up.
    from lunseal.daemon import DaemonConfig, run
    from lunseal.tlsconfig import TlsMode

    if tls not in {m.value for m in TlsMode}:
        raise typer.BadParameter("off, allow or require", param_hint="--tls")

    if clean_after <= 0:
        raise typer.BadParameter("must be positive", param_hint="--clean-after")
    if max_connections < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--max-connections")
    if handshake_timeout <= 0:
        raise typer.BadParameter("must be positive", param_hint="--handshake-timeout")
    if iscsi_target_name is not None and not _valid_iqn(iscsi_target_name):
        raise typer.BadParameter(
            "an iSCSI name: iqn.YYYY-MM.reversed.domain[:anything], lower case, at most 223 bytes",
            param_hint="--iscsi-target-name",
        )
    configure_logging(log_level, log_file)
    settings = ctx.meta.get("lunseal.config")
    home = resolve_home(
        (ctx.obj.home if ctx.obj else None) or (settings.home if settings is not None else None)
    )
    code = run(
        DaemonConfig(
            home=home,
            nbd_host=nbd_listen,
            nbd_port=nbd_port,
            unix_socket=unix_socket,
            api_host=api_listen,
            api_port=api_port,
            demo_lun=demo,
            clean_after=clean_after,
            nbd_max_connections=max_connections,
            nbd_handshake_timeout=handshake_timeout,
            iscsi=iscsi,
            iscsi_host=iscsi_listen,
            iscsi_port=iscsi_port,
            iscsi_target_name=iscsi_target_name,
            tls=TlsMode(tls),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            tls_verify_client=tls_verify_client,
            api_tls=api_tls,
            allowed_backing_dirs=[d.expanduser().absolute() for d in allowed_backing_dirs],
            config_file=config.absolute() if config is not None else None,
            from_command_line=frozenset(
                name
                for name in ctx.params
                if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
            ),
        )
    )
    raise typer.Exit(code)


def _valid_iqn(name: str) -> bool:
    return (
        len(name.encode()) <= 223
        and re.fullmatch(
            r"iqn\.\d{4}-\d{2}\.[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[a-z0-9.:_-]+)?", name
        )
        is not None
    )


def configure_logging(level: str, log_file: Path | None) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}", param_hint="--log-level")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=numeric, format=LOG_FORMAT, handlers=handlers, force=True)
