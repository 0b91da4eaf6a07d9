"""The set-up installs what CI tested: `requirements.lock` pins every dependency `pyproject.toml` names, inside its
ranges, and `launch/setup-env.sh` installs from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11 (CI's); the lock is checked there


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin name==version"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_lock_pins_every_declared_dependency_inside_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins = _lock()
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock has no pin for {requirement.name}: run launch/update-lock.sh --write"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_setup_installs_from_the_lock_and_the_update_script_writes_it() -> None:
    setup = (ROOT / "launch" / "setup-env.sh").read_text()
    assert "requirements.lock" in setup and "-c " in setup
    assert "requirements.lock" in (ROOT / "launch" / "update-lock.sh").read_text()
