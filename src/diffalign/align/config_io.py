"""Configs for trainers: documented dataclasses, filled from a YAML file and `key=value` overrides.

`load_config(DPOConfig, "cfg.yaml", ["beta=2000", "optim.lr=1e-5"])` reads the YAML (a mapping whose
keys are the dataclass's fields; nested dataclasses are nested mappings, an empty one keeps the
defaults), applies each override (dotted keys reach nested fields; values are parsed as YAML scalars, so
`1e-5`, `true`, `[1, 2]` work), and checks every value against the field's type. Unknown keys (with the
nearest known one suggested), duplicate keys and wrong types are errors naming the file and line or
the override, and the key.

The YAML is read as YAML 1.1 (PyYAML) with three YAML 1.2 number rules, so a value means what it
looks like: `1e-5` is a number (1.1 reads it as text), `010` is ten (1.1: octal 8) and `1:30` is text
(1.1: the base-60 number 90). Octal and hex need their prefixes (`0o17`, `0x1f`).

What is accepted besides the exact types: an int for a float field; a whole float for an int field
(`steps: 1e3`); a comma-separated value for a list or tuple field (`timestep_range=0.5,1.0`); and for a
text field an override's value as written (`model=2024-05-01`, `reward=1`: YAML would read a date, a
number). Numbers must be finite (no `.nan`, `.inf`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass.

    Attributes:
        key: the dotted key at fault, when known (the error message names it either way).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader refusing duplicate keys, with YAML 1.2's int and float forms (module doc)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
            if digits.lower().startswith(prefix):
                return sign * int(digits[2:], base)
        return sign * int(digits)


_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0[xX][0-9a-fA-F][0-9a-fA-F_]*|0[oO][0-7][0-7_]*|0[bB][01][01_]*)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _yaml(text: str) -> Any:
    """`text` parsed by the config loader (`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def _suggest(name: Any, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _text_kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", type(None): "null"}
    kind = next((k for t, k in kinds.items() if isinstance(value, t)), type(value).__name__)
    return f"{value!r} ({kind}; quote it to make it text)"


def _split_list(value: str) -> list:
    """'0.5,1.0', '(0.5, 1.0)' or '[a, b]' -> its items, each parsed as a YAML scalar."""
    inner = value.strip()
    if inner[:1] + inner[-1:] in ("()", "[]"):
        inner = inner[1:-1]
    try:
        return [_yaml(item) if item.strip() else "" for item in inner.split(",")]
    except yaml.YAMLError:
        return [item.strip() for item in inner.split(",")]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` checked (and widened where lossless, int -> float, 3.0 -> 3) against the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        message = errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {annotation}"
        raise ConfigError(message, key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}", key)
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if value is None:  # an empty section (`runtime:` with every line commented out): the defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}", key
            )
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if isinstance(value, str) and "," in value:
            value = _split_list(value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}", key)
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)!r}", key)
        types_ = args if fixed else [args[0] if args else Any] * len(value)
        items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, types_, strict=True))]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        return dict(value)
    if annotation is float:
        if isinstance(value, str):
            # `1e-5` written as text (quoted, or by another YAML reader) is the number
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", key)
        return float(value)
    if annotation is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", key)
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {_text_kind(value)}", key)
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}", key)
    return value


def _field_named(message: str, names: set[str]) -> str | None:
    """The field a dataclass's own check names first in `message` ('steps must be >= 1' -> 'steps')."""
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", message)
    first = words[0].split(".")[-1] if words else ""
    return first if first in names else None


def from_dict(cls: type[T], values: dict, prefix: str = "") -> T:
    """Build the dataclass `cls` from a mapping, checking keys and types (errors name the key)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((k for k in values if k not in names), key=str)
    if unknown:
        listed = [f"{prefix}{u}" for u in unknown]
        hint = _suggest(unknown[0], sorted(names)) if len(unknown) == 1 else ""
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {listed}{hint}; known: {sorted(names)}", listed[0]
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        named = _field_named(str(err), names)
        raise ConfigError(f"{cls.__name__}: {err}", prefix + named if named else None) from err


def to_dict(config: Any) -> dict:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


_MISSING = object()


def _get_dotted(tree: dict, key: str) -> Any:
    """The value at dotted `key` in nested dicts, or `_MISSING`."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {key!r}: an empty name between dots", key)
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a nested config", key)
        node = child
    node[parts[-1]] = value


def _field_type(cls: type | None, key: str) -> Any:
    """The annotation of the dotted field `key` of the dataclass `cls` (None where there is none)."""
    annotation: Any = cls
    for part in key.split("."):
        if not dataclasses.is_dataclass(annotation):
            return None
        annotation = typing.get_type_hints(annotation).get(part)
    return annotation


def _is_text(annotation: Any) -> bool:
    """A `str` or `str | None` field."""
    return annotation is str or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and set(typing.get_args(annotation)) == {str, type(None)}
    )


def _override_value(item: str, raw: str, annotation: Any) -> Any:
    """An override's value: YAML, except that a text field takes unquoted text as written."""
    text = raw.strip()
    if not text:
        return ""
    if _is_text(annotation) and text[0] not in "'\"":
        try:
            parsed = _yaml(text)
        except yaml.YAMLError:
            return text
        return None if parsed is None and annotation is not str else text
    try:
        return _yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not YAML: {err}") from err


def parse_overrides(overrides: Sequence[str], cls: type | None = None) -> dict:
    """`["a=1", "b.c=x"]` -> {"a": 1, "b": {"c": "x"}}, values parsed as YAML scalars; with the config
    dataclass `cls`, a text field's unquoted value is kept as written (`model=2024-05-01`)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. runtime.seed=1)")
        _set_dotted(tree, key, _override_value(item, raw, _field_type(cls, key)))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """{dotted key: 1-based line} of every key in a composed YAML mapping."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, f"{key}."))
    return lines


def _read_yaml(file: Path) -> tuple[Any, dict[str, int]]:
    """The YAML document of `file` and the line of each of its keys."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {file}: {err.strerror or err}") from err
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {file}, line {line}: not UTF-8 text (byte {data[err.start]:#04x}); "
            "save the file as UTF-8"
        ) from err
    loader = _Loader(text)
    loader.name = str(file)  # YAML errors point at the file's line and column
    try:
        node = loader.get_single_node()
        loaded = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {file}: not valid YAML: {err}") from err
    finally:
        loader.dispose()
    return loaded, _key_lines(node) if node is not None else {}


def _origin(key: str | None, sources: dict[str, str]) -> str | None:
    """Where the value of dotted `key` (or of the section holding it) was set."""
    key = re.sub(r"\[\d+\]", "", key or "")
    while key:
        if sources.get(key):
            return sources[key]
        key = key.rpartition(".")[0]
    return None


def _sources(tree: dict, where: str | Callable[[str], str], prefix: str = "") -> dict[str, str]:
    """{dotted key: where it was set} for every key of `tree`."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out[dotted] = where(dotted) if callable(where) else where
        if isinstance(value, dict):
            out.update(_sources(value, where, f"{dotted}."))
    return out


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> T:
    """The config `cls` from defaults, then the YAML file at `path`, then `key=value` overrides, then
    `options` ({dotted key: value}, taken as given, e.g. a command's --model; None values left out).
    `fixed` ({dotted key: value}) are values the caller decides, such as the method a command trains:
    set like `options`, but a file or override giving such a key another value is refused rather than
    silently replaced.

    Raises:
        ConfigError: naming where the bad value came from (the file and line, or the override) and the key.
    """
    values: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        file = Path(path)
        loaded, lines = _read_yaml(file)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {file}: expected a mapping of {cls.__name__} fields (key: value lines), "
                f"got {type(loaded).__name__}"
            )
        values = loaded
        sources = _sources(values, lambda k: f"config file {file}, line {lines[k]}" if k in lines else "")
    for item in overrides:
        parsed = parse_overrides([item], cls)
        values = _merge(values, parsed)
        sources.update(_sources(parsed, f"override {item!r}"))
    for key, value in (fixed or {}).items():
        given = _get_dotted(values, key)
        if given is not _MISSING and given != value:
            raise ConfigError(
                f"{_origin(key, sources) or key}: {key}={given!r} conflicts with the command, which runs "
                f"{key}={value!r}; drop it or run that command instead",
                key,
            )
    for key, value in {**(options or {}), **(fixed or {})}.items():
        if value is not None:
            parsed = {}
            _set_dotted(parsed, key, value)
            values = _merge(values, parsed)
            sources.update(_sources(parsed, f"option {key}={value}"))
    try:
        return from_dict(cls, values)
    except ConfigError as err:
        where = _origin(err.key, sources)
        if not where:
            given = [f"config file {path}"] if path is not None else []
            given += ["overrides"] if overrides or options else []
            where = " with ".join(given) or cls.__name__
        raise ConfigError(f"{where}: {err}", err.key) from err
