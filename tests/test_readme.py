"""The README and docs/ are part of the product: the README's commands are the ones CI runs, the config reference in
docs/config.md is current, and every relative link in them leads to a file and heading that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_REFERENCE = ROOT / "docs" / "config.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCED_BLOCK = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def _with_reference(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


def update() -> None:
    """Rewrite docs/config.md's generated tables from pipeline/config (the text around the markers is kept)."""
    CONFIG_REFERENCE.write_text(_with_reference(CONFIG_REFERENCE.read_text()))


def _without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where `[a](b)` is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCED_BLOCK.sub("", text))


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces as hyphens, and
    `-1`, `-2` … appended to repeats."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCED_BLOCK.sub("", text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def broken_links(document: Path) -> list[str]:
    """The relative links of a markdown document whose file, or heading anchor in that file, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(document.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        linked = (document.parent / path) if path else document
        if not linked.exists() or (anchor and anchor not in heading_anchors(linked.read_text())):
            broken.append(target)
    return broken


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
    text = CONFIG_REFERENCE.read_text()
    assert text == _with_reference(text), (
        "docs/config.md is stale: run .venv/bin/python -c 'from tests.test_readme import update; update()'"
    )


def test_every_relative_link_resolves() -> None:
    broken = {document.relative_to(ROOT).as_posix(): broken_links(document) for document in DOCUMENTS}
    assert not any(broken.values()), {name: links for name, links in broken.items() if links}


def test_link_check_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Does SHD pay? The quality study\n## `teacher` — The frozen teacher.\n## Notes\n## Notes\n"
        "[a](#notes-1) [b](#teacher--the-frozen-teacher) [c](page.md#does-shd-pay-the-quality-study) [d](https://x.y)\n"
        "[e](#missing) [f](absent.md) [g](page.md#notes-2) `[code](absent.md)`\n```\n[block](absent.md)\n```\n"
    )
    assert broken_links(page) == ["#missing", "absent.md", "page.md#notes-2"]


def test_launch_scripts_parse_and_document_their_usage() -> None:
    for script in sorted((ROOT / "launch").iterdir()):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert "usage" in script.read_text().lower() or script.suffix == ".sbatch", script.name
