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


def _where(mark: yaml.Mark, other: yaml.Mark) -> str:
    """`line N` of a key, with its column where the other key is on the same line (a flow mapping)."""
    return f"line {mark.line + 1}" + (f", column {mark.column + 1}" if mark.line == other.line else "")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (YAML 1.1 reads `1e-3`, an exponent without a dot as every user
    writes a learning rate, as a string) and no duplicate keys at any depth (PyYAML keeps the last one silently: a
    second `train:` block would drop the first one's `lr` and `output_dir`)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._refuse_duplicate_keys(node, "", set())
        return self.construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, path: str, visited: set[int]) -> None:
        """Walk the document's nodes (an anchor's node once) and refuse a mapping key given twice, naming its dotted
        path and both lines. Keys that are not scalars are left to PyYAML (it refuses the unhashable ones)."""
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_duplicate_keys(item, f"{path}[{index}]", visited)
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            dotted = f"{path}.{key}" if path else str(key)
            if key in seen:
                first, second = seen[key].start_mark, key_node.start_mark
                raise ConfigError(
                    f"key '{dotted}' appears twice ({_where(first, second)} and {_where(second, first)}); YAML would "
                    "keep only the second silently — merge the two into one"
                )
            seen[key] = key_node
            self._refuse_duplicate_keys(value_node, dotted, visited)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def load_yaml(text: str) -> Any:
    """The value of a YAML document (a config file or an override's value): safe types only, YAML 1.2 floats, each
    key once per mapping."""
    return yaml.load(text, Loader=_Loader)


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """`load_yaml` of a file (a config, a study): every problem is a ConfigError that starts with the file's path."""
    try:
        return load_yaml(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the {what} ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a text file (byte {error.start} is not UTF-8); expected a YAML {what}"
        ) from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(error)}") from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and its line and column (PyYAML's own text spans several lines)."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return " ".join(str(error).split())
    mark = error.problem_mark
    context = f" ({error.context})" if error.context else ""
    return f"{error.problem}{context} at line {mark.line + 1}, column {mark.column + 1}"


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


def _shown(value: Any) -> str:
    """A value as an error quotes it: its YAML type and its first characters."""
    text, kind = repr(value), type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({text[:60]}{'…' if len(text) > 60 else ''})"


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{prefix}: got {_shown(values)}, expected a mapping of its keys ({', '.join(sorted(known))}); write "
            f"them as indented `key: value` lines under `{prefix}:`"
        )
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
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(error)})") from error
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
        sections = ", ".join(field.name for field in dataclasses.fields(Config))
        raise ConfigError(
            f"the document is {_shown(values)}, expected a mapping of sections ({sections}), each `section:` followed "
            "by its indented `key: value` lines (see configs/tiny.yaml)"
        )
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
    values = read_yaml_file(path)
    try:
        return config_from_dict(values if values is not None else {}, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
