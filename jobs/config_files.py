"""`--config FILE` on every `refbank` command: the command's options from a YAML or JSON file.

Keys are the command's option names as Python spells them (`mask_kind`, `encoder`, `storage_option`; `mask-kind`
is read the same); positional arguments stay on the command line. The file fills the command's defaults
(click's `default_map`), so precedence is: command line, then environment variables (REFBANK_S3_ENDPOINT,
RAY_ADDRESS, REFBANK_TOKEN), then the file, then the built-in defaults. Every key and value is checked before
the command runs: an unknown key or a value of the wrong type fails with a line naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
import typer.main

CONFIG_HELP = ("Read this command's options from a YAML or JSON file: keys are the option names (e.g. mask_kind: "
               "class, encoder: clip-vit-b16); options given on the command line win.")
_NOT_FROM_FILE = frozenset({"config", "help"})


class ConfigFileError(ValueError):
    """A config file that cannot be read, is not a mapping, or has an unknown key or a wrongly typed value."""


def config_option() -> Any:
    """A new `--config FILE` parameter for a command: eager, so the file is read before any other option takes
    its value; not passed to the command's function. Built by typer from a declaration, like every option."""
    probe = typer.Typer()

    @probe.command()
    def _declaration(config: Optional[str] = typer.Option(None, "--config", metavar="FILE", is_eager=True,
                                                          expose_value=False, callback=_load, help=CONFIG_HELP)):
        """Only declares the option."""

    return typer.main.get_command(probe).params[0]


def _load(ctx: typer.Context, _param: Any, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    ctx.default_map = {**(ctx.default_map or {}), **options_from_file(ctx.command, Path(value))}


def options_from_file(command: Any, path: Path) -> dict[str, Any]:
    """The file's options for `command` (a click command), keyed by parameter name and type-checked."""
    data = read_config(path)
    options = {p.name: p for p in command.params if p.param_type_name == "option" and p.name not in _NOT_FROM_FILE}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        param = options.get(name)
        if param is None:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigFileError(f"unknown key {key!r} in {path.name}{hint}; known: {', '.join(sorted(options))}")
        out[name] = _checked(param, value, f"{path.name}: key {key!r}")
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The mapping in a .json file, or in a YAML one (.yaml, .yml, anything else)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as exc:
        raise ConfigFileError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of option names to values, not a "
                              f"{type(data).__name__}")
    return data


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def _checked(param: Any, value: Any, where: str) -> Any:
    """`value` if it suits the option (a list for a repeatable one); ConfigFileError naming `where` otherwise."""
    declared = getattr(getattr(param, "type_descriptor", None), "annotation", None)  # the function's annotation
    if not param.multiple:
        return _scalar(declared, value, where)
    if isinstance(value, dict) and param.name == "storage_option":  # {endpoint_url: ...} reads better than K=V
        value = [f"{k}={v}" for k, v in value.items()]
    if not isinstance(value, list):
        raise ConfigFileError(f"{where} must be a list (the option is repeatable), got {value!r}")
    item = (typing.get_args(declared) or (None,))[0]
    return [_scalar(item, v, where) for v in value]


def _scalar(declared: Any, value: Any, where: str) -> Any:
    """`value` checked against the option's declared type (int, float, bool, an Enum, str, Path). A type this does
    not know is left to typer, whose own conversion then names the option."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if declared is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif declared is int:
        ok, expected = number and isinstance(value, int), "an integer"
    elif declared is float:
        ok, expected = number, "a number"
    elif isinstance(declared, type) and issubclass(declared, Enum):
        choices = [str(member.value) for member in declared]
        ok, expected = isinstance(value, str) and value in choices, "one of " + ", ".join(choices)
    elif declared in (str, Path):  # a number where a string belongs (a port, a version tag) is taken as written
        ok, expected = isinstance(value, str) or number, "a string"
        value = str(value) if ok else value
    else:
        return value
    if not ok:
        raise ConfigFileError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")
    return value
