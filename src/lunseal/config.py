"""The configuration file: TOML whose ``[serve]`` table holds ``lunseal serve``'s options.

Each key of ``[serve]`` is the name of one of serve's options with underscores
(``nbd_listen``, ``api_port``, ``allowed_backing_dirs``, ...).  The values
become the command's defaults, so a flag on the command line still wins, and
an option added to serve later is accepted in the file without more code here.
One extra key, ``home``, names the data directory (``--home`` and
``$LUNSEAL_HOME`` win over it).

Everything that is wrong with a file is one :class:`ConfigError` naming the
file and the key; a file is checked as a whole before anything of it is used.
"""

from __future__ import annotations

import enum
import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from typer.models import OptionInfo

from lunseal.errors import InvalidArgument

#: Keys of ``[serve]`` that are not serve options.
EXTRA_KEYS = frozenset({"home"})
#: serve's own options that make no sense in a file.
NOT_IN_FILE = frozenset({"config"})
SECTIONS = frozenset({"serve"})
#: A configuration file is a handful of lines; anything far bigger is a mistake.
MAX_FILE_BYTES = 1 << 20


class ConfigError(InvalidArgument):
    """A configuration file cannot be used: one line naming the file (and key)."""

    code = "config_error"


@dataclass(frozen=True)
class OptionSpec:
    """One option of serve as the file sees it."""

    name: str
    #: bool, int, float, str or Path.
    kind: type
    is_list: bool
    default: Any
    help: str
    low: float | None = None
    high: float | None = None


def options_of(command: Callable[..., Any]) -> dict[str, OptionSpec]:
    """serve's options, read from its signature (typer's ``Option`` defaults)."""
    hints = typing.get_type_hints(command)
    specs: dict[str, OptionSpec] = {}
    for name, param in inspect.signature(command).parameters.items():
        info = param.default
        if not isinstance(info, OptionInfo) or name in NOT_IN_FILE:
            continue
        kind, is_list = _base_type(hints[name])
        specs[name] = OptionSpec(
            name=name,
            kind=kind,
            is_list=is_list,
            default=_plain(info.default),
            help=info.help or "",
            low=info.min,
            high=info.max,
        )
    return specs


@dataclass(frozen=True)
class Settings:
    """One checked configuration file."""

    path: Path
    #: serve's option values from the file, by parameter name.
    serve: dict[str, Any] = field(default_factory=dict)
    home: Path | None = None

    def effective(self, command: Callable[..., Any]) -> dict[str, Any]:
        """Every serve option with the value it takes from this file or its default."""
        out = {n: self.serve.get(n, spec.default) for n, spec in options_of(command).items()}
        out["home"] = str(self.home) if self.home is not None else None
        return out


def load(path: Path, command: Callable[..., Any]) -> Settings:
    """Read and check ``path`` against ``command``'s options (serve's)."""
    raw = _read(path)
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {unknown[0]!r} (known: [serve])")
    table = raw.get("serve", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'serve' must be a table ([serve])")
    specs = options_of(command)
    values: dict[str, Any] = {}
    home: Path | None = None
    for key, value in table.items():
        if key == "home":
            home = Path(_expect_str(path, key, value)).expanduser()
            continue
        spec = specs.get(key)
        if spec is None:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if "-" in key else ""
            raise ConfigError(f"{path}: unknown key serve.{key}{hint}")
        values[key] = _check_value(f"{path}: serve.{key}", spec, value)
    return Settings(path=path, serve=values, home=home)


def dump(settings: Mapping[str, Any]) -> str:
    """TOML text of a ``[serve]`` table (``None`` values left out: TOML has no null)."""
    table = {k: v for k, v in settings.items() if v is not None}
    return tomli_w.dumps({"serve": table})


def commented_default(command: Callable[..., Any]) -> str:
    """A configuration file with every option at its default, commented out."""
    lines = [
        "# lunseal configuration (lunseal serve --config FILE).",
        "# Keys are serve's options with underscores; flags on the command line win.",
        "# Uncomment and change what you need; `lunseal config check FILE` checks it.",
        "",
        "[serve]",
        "# data directory (--home and $LUNSEAL_HOME win over it)",
        '# home = "/var/lib/lunseal"',
    ]
    for name, spec in options_of(command).items():
        if spec.help:
            lines.append(f"# {spec.help}")
        if spec.default is None:
            lines.append(f"# {name} = ...")
        else:
            lines.append("# " + tomli_w.dumps({name: spec.default}).strip())
    return "\n".join(lines) + "\n"


def _base_type(hint: Any) -> tuple[type, bool]:
    """(element type, is it a list) of an annotation such as ``Path | None``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(rest[0])
    if origin is list:
        return _base_type(typing.get_args(hint)[0])[0], True
    if isinstance(hint, type):
        return hint, False
    return str, False


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a configuration file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _check_value(where: str, spec: OptionSpec, value: Any) -> Any:
    """The value as serve would get it from its flag, or one error naming the key."""
    if spec.is_list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {_toml_type(value)}")
        return [_check_scalar(where, spec, item) for item in value]
    return _check_scalar(where, spec, value)


def _check_scalar(where: str, spec: OptionSpec, value: Any) -> Any:
    expected = {bool: "true or false", int: "an integer", float: "a number"}
    want = expected.get(spec.kind, "a string")
    # bool is an int in Python, never one in a configuration file.
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where} must be {want}, not {_toml_type(value)}")
    if issubclass(spec.kind, enum.Enum):  # e.g. tls = "off" | "allow" | "require"
        choices = [str(member.value) for member in spec.kind]
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
    too_low = spec.low is not None and value < spec.low
    if too_low or (spec.high is not None and value > spec.high):
        raise ConfigError(f"{where} must be between {spec.low} and {spec.high}, not {value}")
    return float(value) if spec.kind is float else value


def _expect_str(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: serve.{key} must be a non-empty string")
    return value


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _plain(value: Any) -> Any:
    """A default as TOML/JSON can hold it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
