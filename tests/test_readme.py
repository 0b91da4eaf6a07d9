"""The README is part of the product: its commands are the ones CI runs and its config reference is current."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def _with_reference(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


def update() -> None:
    """Rewrite the README's config reference from pipeline/config.py."""
    README.write_text(_with_reference(README.read_text()))


def test_ci_runs_exactly_the_readme_test_command() -> None:
    blocks = _bash_blocks(README.read_text())
    test_commands = [block for block in blocks if "pytest" in block]
    assert len(test_commands) == 1, "the README must show exactly one test command"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_commands[0] in ci_lines, f".ci/run must call {test_commands[0]!r}"


def test_readme_main_command_runs_the_pipeline() -> None:
    blocks = _bash_blocks(README.read_text())
    assert any(block.startswith("bash launch/setup-env.sh && .venv/bin/distill run configs/") for block in blocks)


def test_config_reference_is_current() -> None:
    text = README.read_text()
    assert text == _with_reference(text), (
        "README config reference is stale: run .venv/bin/python -c 'from tests.test_readme import update; update()'"
    )


def test_launch_scripts_parse_and_document_their_usage() -> None:
    for script in sorted((ROOT / "launch").iterdir()):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert "usage" in script.read_text().lower() or script.suffix == ".sbatch", script.name
