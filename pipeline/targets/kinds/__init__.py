"""The registry of target kinds: every module of this package that defines `KINDS` contributes its kinds.

Adding a kind of teacher target is adding a module here (a `TargetKind` subclass, see `base`); nothing else in the
pipeline names kinds. `get(name)` finds one, `names()` lists them (what `cache.attn_targets` accepts).
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.targets.kinds.base import MapSpec, TargetKind, TargetSettings, TeacherPass, layer_key

__all__ = ["MapSpec", "TargetKind", "TargetSettings", "TeacherPass", "get", "layer_key", "names", "needs_capture"]


def _discover() -> dict[str, TargetKind]:
    kinds: dict[str, TargetKind] = {}
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for kind in getattr(module, "KINDS", ()):
            if kind.name in kinds:
                raise RuntimeError(f"target kind {kind.name!r} is defined twice (second in {module.__name__})")
            kinds[kind.name] = kind
    return dict(sorted(kinds.items()))


_KINDS = _discover()


def names() -> tuple[str, ...]:
    """Every kind's name, sorted."""
    return tuple(_KINDS)


def get(name: str) -> TargetKind:
    """The kind called `name`; a KeyError naming the known kinds otherwise."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown target kind {name!r}; known kinds: {', '.join(_KINDS)}") from None


def needs_capture(kinds: tuple[str, ...] | list[str], part: str) -> bool:
    """Whether any of `kinds` needs `part` (`circuits`, `qkv`) recorded by the teacher pass."""
    return any(part in get(name).capture for name in kinds)
