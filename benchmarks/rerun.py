"""A re-run of a finished `distill run` against its first run, side by side in one invocation of this script.

Runs `distill run CONFIG` (default configs/tiny.yaml: tiny teacher, two variants, compare) in a fresh work directory,
then `--reruns` times again with nothing changed, each a new process timed from its start to its exit (imports
included: they are what a re-run used to pay). A re-run decides "already done" from `stages.done` before importing
any stage, so it costs the interpreter, the config's imports and a few `stat()` calls. Prints the first run, every
re-run, the median re-run and the ratio first / median.

The machine may be shared: run both in the same invocation, and read the ratio rather than the seconds.

    .venv/bin/python benchmarks/rerun.py
    .venv/bin/python benchmarks/rerun.py --reruns 5 --work-dir /tmp/rerun
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(config: Path, work_dir: Path) -> float:
    """Seconds of one `distill run` process writing every output under `work_dir`."""
    overrides = [
        f"teacher.path={work_dir}/teacher",
        f"data.output_dir={work_dir}/data",
        f"cache.output_dir={work_dir}/targets",
        f"train.output_dir={work_dir}/runs",
        f"mlflow.tracking_uri=sqlite:///{work_dir}/mlflow.db",
        f"run.report_dir={work_dir}/reports",
    ]
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), *overrides]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"distill run exited {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    parser.add_argument("--reruns", type=int, default=3, help="re-runs after the first run (default 3)")
    parser.add_argument("--work-dir", type=Path, help="where the outputs go (default: a temporary directory)")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="rerun-"))
    if work_dir.exists():
        shutil.rmtree(work_dir)
    try:
        first = timed_run(args.config, work_dir)
        reruns = [timed_run(args.config, work_dir) for _ in range(args.reruns)]
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    median = statistics.median(reruns)
    print(f"distill run {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}")
    print("| run | seconds |\n|---|---|")
    print(f"| first run | {first:.1f} |")
    for index, seconds in enumerate(reruns, 1):
        print(f"| re-run {index} | {seconds:.1f} |")
    print(f"| re-run (median) | {median:.1f} |")
    print(f"\nfirst run / re-run: {first / median:.1f}×")


if __name__ == "__main__":
    main()
