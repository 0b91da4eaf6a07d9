"""The registry of target kinds: every module of this package that defines `KINDS` contributes its kinds.

Adding a kind of teacher target is adding a module here (a `TargetKind` subclass, see `base`); nothing else in the
pipeline names kinds. `get(name)` finds one, `names()` lists them (what `cache.attn_targets` accepts).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

import torch

from pipeline.targets.kinds.base import MapSpec, TargetKind, TargetSettings, TeacherPass, layer_key

__all__ = [
    "MapSpec",
    "TargetKind",
    "TargetSettings",
    "TeacherPass",
    "fingerprint_field_names",
    "fingerprint_fields",
    "get",
    "layer_key",
    "names",
    "needs_capture",
    "settings_from_fingerprint",
    "variants_of",
]


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


def variants_of(kind_names: tuple[str, ...] | list[str], setting: Callable[[str], Any]) -> dict[str, int]:
    """`TargetSettings.variants` of `kind_names`: each kind with a `variant_key` → `setting(variant_key)` (a config
    value, or what a run's needs name)."""
    return {name: setting(kind.variant_key) for name in kind_names if (kind := get(name)).variant_key is not None}


def fingerprint_fields(settings: TargetSettings) -> dict[str, Any]:
    """Every kind's fingerprint field (`TargetKind.fingerprint_field`) with the variant `settings` store, None for
    kinds they do not store: the part of a cache's fingerprint the kinds contribute."""
    return {
        kind.fingerprint_field: settings.variants.get(kind.name) if kind.name in settings.kinds else None
        for kind in _KINDS.values()
        if kind.fingerprint_field is not None
    }


def settings_from_fingerprint(fingerprint: dict[str, Any], dtype: torch.dtype, **extra: Any) -> TargetSettings:
    """The settings that write a cache with this fingerprint (`dtype`: what the tensors are stored as)."""
    kinds = tuple(fingerprint["attn_targets"])
    return TargetSettings(
        layers=tuple(fingerprint["cached_layers"]),
        head_counts=tuple(fingerprint["student_head_counts"]),
        kinds=kinds,
        encoding=fingerprint["encoding"],
        attn_top_m=fingerprint["attn_top_m"] or 1,
        top_k=fingerprint["top_k"],
        temperatures=tuple(fingerprint["temperatures"]),
        dtype=dtype,
        variants=variants_of(kinds, lambda key: fingerprint[get_by_key(key).fingerprint_field]),
        **extra,
    )


def fingerprint_field_names() -> tuple[str, ...]:
    """The fingerprint fields the kinds add (`TargetKind.fingerprint_field`), sorted."""
    return tuple(sorted(kind.fingerprint_field for kind in _KINDS.values() if kind.fingerprint_field is not None))


def get_by_key(variant_key: str) -> TargetKind:
    """The kind whose variant `variant_key` sets."""
    return next(kind for kind in _KINDS.values() if kind.variant_key == variant_key)
