"""CLI tables show their cells as text: brackets in names, paths or audit
details are neither markup nor an error."""

from __future__ import annotations

from rich.console import Console

from lunseal.host.cli.common import table


def test_table_cells_are_text_not_markup() -> None:
    t = table("DETAIL")
    t.add_row("net:PREFIX[/PREFIX] and [red]x[/red]")  # a closing tag with no opening one
    console = Console(width=200, record=True)
    console.print(t)
    assert "net:PREFIX[/PREFIX] and [red]x[/red]" in console.export_text()
