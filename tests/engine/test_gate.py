"""The change gate is a property of the code: nothing outside the engine's LUN
and layer code can reach a backend to change data.

Two halves: the source tree is scanned (so a new module that grabs a backend
fails here, not in a review), and a real LUN shows that what it hands out
cannot write.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.base import Backend
from lunseal.engine.backends.layers import FaultyBackend, MirroredBackend
from lunseal.engine.lun import BackendView
from lunseal.errors import InvalidArgument

SRC = Path(__file__).resolve().parents[2] / "src" / "lunseal"
#: Where backend objects may be held and called: the LUN (the gate), the layers
#: it stacks, and the backend implementations themselves.
GATE = {"engine/lun.py", "engine/backends/layers.py"}
BACKENDS = {"engine/backends/base.py", "engine/backends/file.py", "engine/backends/memory.py"}
#: Modules that may create a backend (and hand it straight to a Lun) or name a
#: layer type to push through the LUN.
MAKERS = {"engine/array.py": {"FileBackend"}, "engine/mirror/registry.py": {"MirroredBackend"}}
IMPLEMENTATIONS = {
    "FileBackend",
    "MemoryBackend",
    "Layer",
    "MirroredBackend",
    "FaultyBackend",
    "PowerLossBackend",
}
#: What a view may be asked (none of it changes data).
READ_ONLY = {
    "read",
    "read_slice",
    "extents",
    "stamp",
    "flush",
    "flush_own",
    "cache",
    "size",
    "kind",
}


def modules() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        found.append((rel, ast.parse(path.read_text(), filename=str(path))))
    assert len(found) > 30, "the scan found too few modules: wrong source root?"
    return found


def violations(rel: str, tree: ast.Module) -> list[str]:
    """Every way ``tree`` could reach a backend past the gate."""
    if rel in GATE | BACKENDS:
        return []
    bad = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if node.attr in ("_backend", "inner"):
                bad.append(f"{where}: reaches .{node.attr}")
            if (
                isinstance(node.value, ast.Attribute)
                and node.value.attr == "backend"
                and node.attr not in READ_ONLY
            ):
                bad.append(f"{where}: .backend.{node.attr}")
            if node.attr == "backend" and isinstance(node.ctx, ast.Store):
                bad.append(f"{where}: replaces a LUN's backend")
        if isinstance(node, ast.ImportFrom):
            names = {alias.name for alias in node.names} & IMPLEMENTATIONS
            if names - MAKERS.get(rel, set()):
                bad.append(f"{where}: imports {sorted(names)}")
    return bad


def test_no_module_outside_the_gate_touches_a_backend() -> None:
    found = [v for rel, tree in modules() for v in violations(rel, tree)]
    assert found == []


@pytest.mark.parametrize(
    "snippet",
    [
        "lun.backend.write(0, b'x')",
        "lun._backend.write(0, b'x')",
        "lun.backend = other",
        "lun.backend.inner.trim(0, 1)",
        "from lunseal.engine.backends.file import FileBackend",
        "from lunseal.engine.backends.layers import PowerLossBackend",
    ],
)
def test_the_scan_catches_each_way_around_the_gate(snippet: str) -> None:
    assert violations("frontends/nbd/anything.py", ast.parse(snippet)) != []


def test_a_luns_backend_is_a_read_only_view(tmp_path: Path) -> None:
    array = Array.open(tmp_path / "home")
    try:
        lun = array.create_lun("a", 1 << 20)
        view = lun.backend
        assert isinstance(view, BackendView)
        assert not isinstance(view, Backend)
        for method in ("write", "trim", "zero", "resize", "close", "inner"):
            assert not hasattr(view, method), method
        seen: list[tuple[int, int]] = []
        lun.listeners.append(lambda _lun, offset, length: seen.append((offset, length)))
        lun.write(4096, b"through the gate")
        assert view.read(4096, 16) == b"through the gate"
        assert seen == [(4096, 16)]
    finally:
        array.close()


def test_layers_are_pushed_and_popped_through_the_lun(tmp_path: Path) -> None:
    array = Array.open(tmp_path / "home")
    try:
        source, target = array.create_lun("s", 1 << 20), array.create_lun("t", 1 << 20)
        mirror = array.mirrors.create(source, target)
        fan_out = source.top_layer(MirroredBackend)
        assert fan_out is not None
        assert fan_out.mirrors == [mirror]
        with pytest.raises(InvalidArgument, match="top layer"):
            source.pop_layer(FaultyBackend(fan_out))  # only the top layer comes off
        array.mirrors.delete(mirror.name)
        assert source.top_layer(MirroredBackend) is None
        faulty = target.push_layer(FaultyBackend)
        assert target.top_layer(FaultyBackend) is faulty
        target.pop_layer(faulty)
        assert target.top_layer(FaultyBackend) is None
    finally:
        array.close()
