"""The quality study at its old address: `distill study configs/quality.yaml` run from the repository root.

The study lives in `pipeline/study/` and its grid in `configs/quality.yaml`'s `study:` section; this script only
keeps earlier commands working. `--config PATH` picks another study config; every other argument is passed on:

    .venv/bin/python benchmarks/quality.py --plan      # = distill study configs/quality.yaml --plan
    .venv/bin/python benchmarks/quality.py --quick     # = distill study configs/quality.yaml --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import main as distill

REPO = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "quality.yaml")
    known, passed = parser.parse_known_args(argv)
    config = known.config.resolve()
    os.chdir(REPO)  # the config's relative paths are read from the repository root
    return distill(["study", str(config.relative_to(REPO) if config.is_relative_to(REPO) else config), *passed])


if __name__ == "__main__":
    sys.exit(main())
