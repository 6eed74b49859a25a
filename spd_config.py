"""Typed configs from YAML: dataclasses whose fields carry a one-line doc and bounds, loaded with
clear one-line errors (unknown key, wrong type, missing key, out-of-range value) and
`key.sub=value` command-line overrides typed by the dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class SPDError(Exception):
    """A user-facing error: printed as one line by `run_main`, never as a traceback."""


def option(default: Any = dataclasses.MISSING, doc: str = "", *, gt: float | None = None,
           ge: float | None = None, le: float | None = None) -> Any:
    """A config field with a one-line doc and optional bounds (checked when the config is loaded)."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"a {origin.__name__} of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against type `tp`, converting where YAML is loose (1 -> 1.0, '1e-3' -> 0.001)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = SPDError(f"key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args and dataclasses.is_dataclass(args[0]):
            return _build_dataclass(args[0], value, key)  # an optional section: keep its own error message
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(arg, value, key)
                except SPDError:
                    pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config type {tp} for '{key}'")


def _build_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    where = f"'{prefix}'" if prefix else "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SPDError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise SPDError(f"unknown key '{prefix}{'.' if prefix else ''}{k}'; "
                           f"valid keys at {where}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SPDError(f"missing required key '{key}' ({f.metadata.get('doc', _type_name(hints[name]))})")
            continue
        v = _coerce(hints[name], raw[name], key)
        meta = f.metadata
        for bound, ok, word in (("gt", lambda x, b: x > b, ">"), ("ge", lambda x, b: x >= b, ">="),
                                ("le", lambda x, b: x <= b, "<=")):
            b = meta.get(bound)
            if b is not None and isinstance(v, (int, float)) and not ok(v, b):
                raise SPDError(f"key '{key}' = {v!r} is out of range: must be {word} {b} ({meta['doc']})")
        values[name] = v
    try:
        return cls(**values)
    except SPDError as e:  # from __post_init__
        raise SPDError(f"{where}: {e}") from None


def _apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw YAML dict; the value is parsed as YAML (typed later)."""
    if "=" not in override:
        raise SPDError(f"override '{override}' must look like key.sub=value")
    dotted, value = override.split("=", 1)
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SPDError(f"override '{override}': '{k}' is not a section")
    node[keys[-1]] = yaml.safe_load(value) if value else None


def load_config(cls: type, path: str | Path, overrides: list[str] = (), section: str | None = None) -> Any:
    """Load YAML `path` (or its top-level `section`) into dataclass `cls`, applying `key.sub=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise SPDError(f"config file {path} not found; pass the path of a YAML file, e.g. configs/tms_5-2.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise SPDError(f"{path}: malformed YAML{line}: {getattr(e, 'problem', e)}; fix the file's syntax") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SPDError(f"{path}: expected a mapping of keys to values at the top level")
    try:
        for o in overrides:
            _apply_override(raw, o)
        if section is not None:
            return _build_dataclass(cls, raw.get(section), section)
        return _build_dataclass(cls, raw)
    except SPDError as e:
        raise SPDError(f"{path}{' (with overrides)' if overrides else ''}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
