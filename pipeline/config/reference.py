"""The configuration reference (every key, its type, default and meaning), generated from the schema's field
docstrings: `distill config --reference` prints it, docs/config.md holds it (a test keeps it current)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import typing
from typing import Any

from pipeline.config.loader import type_name
from pipeline.config.schema import Config


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (Python keeps none of them at run time)."""
    docs: dict[str, str] = {}
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs.update(_field_docs(base))
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs  # a class made at run time (`DistillConfig`): its own fields are sections, documented there
    body = ast.parse(textwrap.dedent(source)).body[0].body
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[statement.target.id] = " ".join(str(following.value.value).split())
    return docs


def reference_markdown() -> str:
    """The config reference (every key, its default and meaning) as markdown tables, generated from this module."""
    lines: list[str] = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"#### `{section.name}` — {cls.__doc__}", "", "| key | default | meaning |", "|---|---|---|"]
        lines += _reference_rows(cls, getattr(defaults, section.name), "")
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type, defaults: Any, prefix: str) -> list[str]:
    """Table rows of a config dataclass's keys; a nested dataclass (e.g. `student.lora`) as `lora.r` … rows."""
    rows: list[str] = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        default = getattr(defaults, item.name)
        if dataclasses.is_dataclass(hints[item.name]):
            rows += _reference_rows(hints[item.name], default, f"{prefix}{item.name}.")
            continue
        allowed = type_name(hints[item.name]).replace("|", "\\|")
        rows.append(f"| `{prefix}{item.name}` ({allowed}) | `{json.dumps(default)}` | {docs.get(item.name, '')} |")
    return rows
