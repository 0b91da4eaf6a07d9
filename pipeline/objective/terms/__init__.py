"""The registry of loss terms: every module of this package that defines `SPEC` (a `TermSpec`) is a term.

Adding a term is adding a module here (see `base`): its config section appears as `distill.<name>`, its loss in the
objective, its metric as `train|eval/loss_<name>`, and the targets it reads in what the cache and the online source
provide. `specs()` lists the terms in their fixed order.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.objective.terms.base import StudentForward, Term, TermContext, TermSpec

__all__ = ["StudentForward", "Term", "TermContext", "TermSpec", "specs"]


def _discover() -> tuple[TermSpec, ...]:
    found: dict[str, TermSpec] = {}
    for module_info in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "SPEC", None)
        if spec is None:
            continue
        if spec.name in found:
            raise RuntimeError(f"loss term {spec.name!r} is defined twice (second in module {module_info.name})")
        found[spec.name] = spec
    return tuple(sorted(found.values(), key=lambda spec: spec.order))


_SPECS = _discover()


def specs() -> tuple[TermSpec, ...]:
    """Every registered term, in its fixed order."""
    return _SPECS
