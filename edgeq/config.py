"""edgeq.toml: a build's options in a file, so CI runs exactly what a developer ran.

`edgeq config [options]` resolves the options like `edgeq build` (target defaults filled in) and
writes them; `edgeq build --config edgeq.toml` replays them, with options given on the command line
taking precedence. The keys are the long options of `edgeq build` with underscores (`calib_samples`,
`eval`, `modes`); paths are relative to the file's folder. An unknown key, or a value of the wrong
type, is a one-line user error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from edgeq.core import EdgeqError, load_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# file key -> parameter name of `edgeq build`, where they differ
_KEY_TO_PARAM = {"eval": "eval_path", "mode": "modes"}
_PARAM_TO_KEY = {"eval_path": "eval"}
_NOT_IN_FILE = {"config_file"}
PATH_KEYS = ("model", "calib", "eval", "tokenizer", "out", "target")
HEADER = ("# edgeq build configuration: `edgeq build --config edgeq.toml` replays it; options given on the\n"
          "# command line override it. Paths are relative to this file's folder. Written by `edgeq config`.\n")


def read_config_file(source: str | tuple[dict, Path], command: click.Command) -> dict[str, Any]:
    """{parameter name: value} from an edgeq.toml path (or already-parsed options and their base
    folder), each value checked and converted by the build option's own type."""
    if isinstance(source, tuple):
        data, base, label = source[0], source[1], "the build's options"
    else:
        path = Path(source).expanduser()
        label = str(source)
        if not path.is_file():
            raise EdgeqError(f"config file not found: {source}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise EdgeqError(f"{label}: not valid TOML ({' '.join(str(e).split())})") from None
        except OSError as e:
            raise EdgeqError(f"{label}: cannot read it ({e.strerror})") from None
        base = path.resolve().parent
    params = {p.name: p for p in command.params if p.name not in _NOT_IN_FILE}
    known = sorted(_PARAM_TO_KEY.get(n, n) for n in params if n in _build_params(command))
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _KEY_TO_PARAM.get(key, key)
        if name not in params or name not in _build_params(command):
            hint = " (options belong at the top level, not in a [table])" if isinstance(value, dict) else ""
            raise EdgeqError(f"{label}: unknown key '{key}'{hint} (known: {', '.join(known)})")
        out[name] = _convert(label, key, value, params[name], base)
    return out


def _build_params(command: click.Command) -> set[str]:
    from edgeq.cli import BUILD_OPTIONS

    names = set()
    for deco in BUILD_OPTIONS:  # the decorators carry the parameter they add
        probe = deco(lambda: None)
        names.update(p.name for p in getattr(probe, "__click_params__", []))
    return names - _NOT_IN_FILE


def _convert(label: str, key: str, value: Any, param: click.Parameter, base: Path) -> Any:
    def bad(why: str) -> EdgeqError:
        return EdgeqError(f"{label}: key '{key}': {why}")

    if isinstance(param, click.Option) and param.is_flag:
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {_show(value)}")
        return value
    if key == "input_shape" and isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad(f"expected a list of integers, got {_show(value)}")
        value = ",".join(str(v) for v in value)
    if param.multiple:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad(f"expected a list of strings, got {_show(value)}")
        return tuple(values)
    if isinstance(value, (dict, list, bool)) or not isinstance(value, (str, int, float)):
        raise bad(f"expected a {param.type.name}, got {_show(value)}")
    try:
        value = param.type.convert(value, param, None)
    except click.BadParameter as e:
        raise bad(" ".join(e.format_message().split())) from None
    if key in PATH_KEYS and isinstance(value, str):
        value = _from_base(key, value, base)
    return value


def _from_base(key: str, value: str, base: Path) -> str:
    from edgeq.build import MODULE_RE

    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if key == "model" and MODULE_RE.fullmatch(value) and not (base / p).exists():
        return value  # package.module:factory
    if key == "target" and not value.endswith(".toml"):
        return value  # a profile name
    return str(base / p)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_toml(options: dict[str, Any], base: Path) -> str:
    """The resolved options as edgeq.toml text: unset options left out (the default model and data
    are the bundled ones), paths relative to `base` where they are inside it."""
    import tomli_w

    doc = {}
    for name, value in options.items():
        if value is None:
            continue
        key = _PARAM_TO_KEY.get(name, name)
        if key in PATH_KEYS and isinstance(value, str) and Path(value).is_absolute():
            value = _relative(Path(value), base)
        doc[key] = value
    return HEADER + tomli_w.dumps(doc)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix() or "."
    except ValueError:
        return str(path)


def options_from_build(build_dir: Path) -> tuple[dict, Path]:
    """The options a finished build used, for `edgeq config --from-build`."""
    manifest = load_manifest(build_dir)
    options = (manifest.get("config") or {}).get("options")
    if not isinstance(options, dict):
        raise EdgeqError(f"{build_dir}: its manifest has no recorded options (built by an older edgeq)")
    data = {_PARAM_TO_KEY.get(k, k): v for k, v in options.items() if v is not None}
    return data, Path(os.sep)
