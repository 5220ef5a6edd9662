"""``lunseal status``: is the array up, where does it listen, what does it serve."""

from __future__ import annotations

import typer

from lunseal.host.cli.common import client, console, emit


def status(ctx: typer.Context) -> None:
    """Show the array's identity, listeners, uptime and load."""
    with client(ctx) as api:
        st = api.status()

    def human() -> None:
        rows = [
            ("array", st.array_id),
            ("version", st.version),
            ("pid", str(st.pid)),
            ("data dir", st.data_dir),
            ("uptime", f"{st.uptime_seconds:.0f}s"),
            ("last shutdown", "clean" if st.last_shutdown_clean else "unclean (crash or kill)"),
            ("LUNs", str(st.luns)),
            ("NBD connections", str(st.connections)),
            ("NBD tcp", st.nbd.tcp or "-"),
            ("NBD unix", st.nbd.unix or "-"),
            ("API", st.api_url),
            *(("WARNING", warning) for warning in st.warnings),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            console.print(f"{key:<{width}}  {value}", highlight=False)

    emit(ctx, st, human)
