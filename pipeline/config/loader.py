"""Read a config: YAML (safe types, YAML 1.2 floats, no duplicate keys) plus `section.key=value` overrides, the
deprecated flat keys mapped onto their sections, each value checked against its key's type, then validated.

Every error is a `ConfigError` naming the file, the dotted key, the value found and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.config.schema import DISTILL_ALIASES, STUDENT_ALIASES, Config
from pipeline.config.validation import validate
from pipeline.errors import ConfigError
from pipeline.objective.terms import specs as term_specs

logger = logging.getLogger(__name__)


def _aliases() -> dict[tuple[str, ...], tuple[str, ...]]:
    """Deprecated flat key path → its place now (`distill.w_attn` → `distill.attn.weight` …)."""
    table = {("student", flat): ("student", *place) for flat, place in STUDENT_ALIASES.items()}
    table.update({("distill", flat): ("distill", *place) for flat, place in DISTILL_ALIASES.items()})
    for spec in term_specs():
        table.update({("distill", flat): ("distill", spec.name, key) for flat, key in spec.aliases.items()})
    return table


ALIASES = _aliases()
_warned: set[tuple[str, ...]] = set()


def canonical_path(path: list[str]) -> list[str]:
    """A key path with a deprecated flat key replaced by its place now (warned once per key and process)."""
    head = tuple(path[:2])
    if head not in ALIASES:
        return path
    if head not in _warned:
        _warned.add(head)
        logger.warning(
            "config key '%s' is deprecated: write '%s' (the flat keys go in the next release)",
            ".".join(head),
            ".".join(ALIASES[head]),
        )
    return [*ALIASES[head], *path[2:]]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (YAML 1.1 reads `1e-3`, an exponent without a dot as every user
    writes a learning rate, as a string) and no duplicate keys (PyYAML keeps the last one silently: a second
    `train:` block would drop the first one's keys)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); each key may appear "
                    "once — merge the two into one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def load_yaml(text: str) -> Any:
    """The value of a YAML document (a config file or an override's value): safe types only, YAML 1.2 floats, each
    key once per mapping."""
    return yaml.load(text, Loader=_Loader)


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's annotation; return it (ints widened to float where a float is expected)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(annotation)
            return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Any:
        return value
    raise ConfigError(f"{key}: got {value!r}, expected {type_name(annotation)}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key '{where}'; allowed keys here: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` (or a nested key, `student.lora.r=16`) → (the dotted path as a list, the YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"override {text!r}: expected section.key=value (e.g. student.num_heads=3, student.lora.r=16)"
        )
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from error
    return path, value


def _assign(values: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `values[path[0]][path[1]]… = value`, copying the mappings on the way (the caller's stay untouched)."""
    *parents, key = path
    node = values
    for depth, name in enumerate(parents):
        child = node.get(name)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: depth + 1])}: expected a mapping of keys, got {child!r}")
        node[name] = child = dict(child)
        node = child
    node[key] = value


def _canonical(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its deprecated flat keys moved to their places; a key given both ways is refused."""
    merged = {section: dict(content) if isinstance(content, dict) else content for section, content in values.items()}
    for (section, flat), place in ALIASES.items():
        content = merged.get(section)
        if not isinstance(content, dict) or flat not in content:
            continue
        value = content.pop(flat)
        *parents, key = canonical_path([section, flat])
        node = merged
        for depth, name in enumerate(parents):
            child = node.get(name)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parents[: depth + 1])}: expected a mapping of keys, got {child!r}")
            node[name] = child = dict(child)
            node = child
        if key in node:
            raise ConfigError(
                f"{'.'.join(place)} and its deprecated alias {section}.{flat} are both set; keep {'.'.join(place)}"
            )
        node[key] = value
    return merged


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a `Config` from a nested dict plus `section.key=value` overrides."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {values!r}")
    merged = _canonical(values)
    for text in overrides or []:
        path, value = parse_override(text)
        _assign(merged, canonical_path(path), value)
    config = _build(Config, merged, "")
    validate(config)
    for name in config.run.variants:
        variant(config, name)
    return config


def variant(config: Config, name: str) -> Config:
    """`config` with variant `name`'s overrides, its own output directory and MLflow run name (`distill run`)."""
    values = config.to_dict()
    values["run"]["variants"] = {}
    try:
        return config_from_dict(values, config.variant_overrides(name))
    except ConfigError as error:
        raise ConfigError(f"run.variants.{name}: {error}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, apply `section.key=value` overrides, validate; errors name the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file ({error.reason} at byte {error.start})") from error
    try:
        values = load_yaml(text) or {}
        return config_from_dict(values, overrides)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
