"""Build any tree of dataclasses from YAML files and dotted `key=value` overrides.

One generic loader for the whole config: each dataclass keeps its own defaults next to the code it
configures, a YAML preset overrides a few of them, `key=value` arguments override last.

- `load_yaml_chain(path)` reads a preset; `extends: other.yaml` (relative to the file) is merged first,
  so a preset lists only what differs from its base.
- `apply_override(tree, "optim.lr=0.001")` sets one dotted key; the value is parsed as YAML
  (`0.1` -> float, `true` -> bool, `[1, 2]` -> list, `null` -> None).
- `build(cls, tree, base=None)` builds the dataclass field by field from the type hints; a nested
  dataclass starts from the base's current value (so defaults set by a parent's default factory are
  kept). Unknown keys and wrong types raise `ConfigError` naming the dotted key.
- `register_preset(cls, factory)`: a mapping for `cls` may carry `preset: NAME`, which starts the
  section from `factory(NAME)` instead of the dataclass defaults (used for `recipe: {preset: adclr}`);
  a bare string in place of the mapping means the same.
- `to_plain(obj)` turns a dataclass tree back into YAML-ready dicts/lists (the resolved config).

Decision: ints are accepted where a float is expected (YAML writes `1` for 1.0), nothing else is
coerced (a string "3" for an int field is an error, so typos do not pass silently); tuples are read from
YAML lists and checked element by element.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the dotted key."""


_PRESETS: dict[type, Callable[[str], Any]] = {}


def register_preset(cls: type, factory: Callable[[str], Any]) -> None:
    _PRESETS[cls] = factory


def load_yaml_chain(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML preset, merging the files it `extends:` first (depth-first, cycles rejected)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, _seen))})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {yaml_error_line(error)}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (at byte offset {error.start}); save it as UTF-8") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    parents = tree.pop("extends", None) or []
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, load_yaml_chain(path.parent / parent, _seen + (path,)))
    return deep_merge(merged, tree)


def yaml_error_line(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where (1-based line and column) and what."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    hint = " (YAML indents with spaces, never tabs)" if "'\\t'" in problem else ""
    return f"not valid YAML at {where}{problem}{hint}"


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `update` over `base`, merging nested mappings key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), str):
            out[key] = {"preset": out[key]}  # a bare preset name, then fields on top of it
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(tree: dict, assignment: str) -> dict:
    """Set `a.b.c=value` in a nested dict (value parsed as YAML); returns the new tree."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {assignment!r}: empty key in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {dotted}: cannot parse value {raw!r}: {error}") from None
    update: Any = value
    for key in reversed(keys):
        update = {key: update}
    return deep_merge(tree, update)


def build(cls: type, tree: Any, base: Any = None, prefix: str = "") -> Any:
    """The dataclass `cls` with every key of `tree` applied over `base` (or the defaults)."""
    if isinstance(tree, str) and cls in _PRESETS:
        tree = {"preset": tree}
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping for {cls.__name__}, got {tree!r}")
    tree = dict(tree)
    if "preset" in tree and cls in _PRESETS:
        name = tree.pop("preset")
        try:
            base = _PRESETS[cls](name)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"{_join(prefix, 'preset')}: {error}") from None
    if base is None:
        base = cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in tree.items():
        name = _join(prefix, key)
        if key not in known:
            raise ConfigError(f"{name}: unknown config key; {cls.__name__} has: {', '.join(sorted(known))}")
        values[key] = _convert(hints[key], value, name, getattr(base, key))
    return dataclasses.replace(base, **values)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _convert(hint: Any, value: Any, name: str, current: Any) -> Any:
    """Check/convert one YAML value against a type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in [a for a in args if a is not type(None)]:
            try:
                return _convert(option, value, name, current if isinstance(current, _base_type(option)) else None)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        base = current if isinstance(current, hint) else None
        return build(hint, value, base, name)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list for {hint}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{name}[{i}]", None) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(a, v, f"{name}[{i}]", None) for i, (a, v) in enumerate(zip(args, value))) if args else tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{name}[{i}]", None) for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    return _convert_scalar(hint, value, name)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert_scalar(hint: Any, value: Any, name: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-12 as a string
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    elif not isinstance(hint, type):
        return value  # an exotic annotation: accept, the section's validate() decides
    type_name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{name}: expected {type_name}, got {type(value).__name__} {value!r}")


def _base_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is not None:
        return origin if isinstance(origin, type) else object
    return hint if isinstance(hint, type) else object


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists/scalars (tuples become lists), ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
