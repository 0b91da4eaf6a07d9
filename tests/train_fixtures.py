"""Helpers for the training tests: one tiny cache per session, config overrides, DeepSpeed launcher runs.

Run as a script under the DeepSpeed launcher, this module trains several configs one after the other in the same
processes (`deepspeed --num_gpus 2 tests/train_fixtures.py RUNS.json`): a launch costs ~20 s of imports per process
on 2 cores, so the 2-rank tests share one launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
"""The virtual environment's scripts (`deepspeed`, `distill`)."""

FAST_TRAIN = (
    "train.lr=0.01",
    "train.min_lr=0.0",
    "train.schedule=constant",
    "train.warmup_steps=2",
    "train.eval_batches=2",
    "train.keep_checkpoints=0",
)
"""A constant LR after a short warm-up: the tiny student's loss falls within a dozen steps, and the LR of a step
does not depend on `train.max_steps`, so a short run and its resumed continuation see the LRs of one long run."""


@dataclass(frozen=True)
class TinyCache:
    """A tiny teacher, its packed data and the target cache under `root` (built once per test session)."""

    root: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def overrides(self, output_dir: Path | str, *extra: str) -> list[str]:
        """Config overrides pointing every stage at this cache, training into `output_dir`."""
        return [
            f"teacher.path={self.root}/teacher",
            f"data.output_dir={self.root}/data",
            f"cache.output_dir={self.root}/targets",
            f"train.output_dir={output_dir}",
            f"mlflow.tracking_uri={self.tracking_uri}",
            *extra,
        ]

    def config(self, output_dir: Path | str, *extra: str) -> Any:
        from pipeline.config import load_config

        return load_config(TINY_CONFIG, self.overrides(output_dir, *extra))


ALL_TARGETS = (
    "cache.attn_targets=[shd, shd_pairwise, uniform, selective, global, relations]",
    "cache.temperatures=[2.0]",
)
"""Every target map kind, and tail sums at τ = 2 besides τ = 1: one cache serves every matching mode's tests."""


def build_tiny_cache(root: Path) -> TinyCache:
    """Teacher (4 layers, 6 heads on 2 KV heads) → packed data (77 train, 9 validation samples of 32 tokens) →
    dense cache of teacher layers [1, 3] for 2- and 3-head students, every target kind (`ALL_TARGETS`)."""
    from pipeline.stages.cache import cache_stage
    from pipeline.stages.prepare import prepare_stage
    from pipeline.stages.teacher import teacher_stage

    cache = TinyCache(root)
    config = cache.config(root / "runs", *ALL_TARGETS)
    teacher_stage(config)
    prepare_stage(config)
    cache_stage(config)
    return cache


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """The environment of launched ranks: one thread each (2 cores), CPU accelerator, no inherited rank variables."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def start_launcher(arguments: list[str]) -> subprocess.Popen:
    """`deepspeed ARGUMENTS…` from the repository root, output captured."""
    return subprocess.Popen(
        [str(BIN / "deepspeed"), *arguments],
        cwd=REPO,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ok(process: subprocess.Popen, timeout: float = 400) -> str:
    """Wait for a launcher; fail with the end of its output unless it exited 0. Returns the output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"launcher timed out after {timeout} s:\n{output[-6000:]}") from None
    assert process.returncode == 0, f"launcher exited {process.returncode}:\n{output[-6000:]}"
    return output


def run_two_ranks(runs_file: Path) -> str:
    """Train every run of `runs_file` (see `main`) on 2 ranks in one DeepSpeed launch."""
    return wait_ok(start_launcher(["--num_gpus", "2", "--master_port", str(free_port()), __file__, str(runs_file)]))


def read_metrics(output_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records, eval records) of `metrics.jsonl`, each step → its last record."""
    train: dict[int, dict] = {}
    evaluation: dict[int, dict] = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (train if "train/loss" in record else evaluation)[record["step"]] = record
    return train, evaluation


def main(argv: list[str]) -> None:
    """Under the launcher: `train_fixtures.py RUNS.json`, RUNS.json = [{"overrides": [...]}, ...] on tiny.yaml."""
    from pipeline.config import load_config
    from pipeline.infra.runtime import configure_logging
    from pipeline.stages.train import train_stage as train

    configure_logging("WARNING")
    arguments = [argument for argument in argv if not argument.startswith("--local_rank")]
    for run in json.loads(Path(arguments[0]).read_text()):
        train(load_config(TINY_CONFIG, run["overrides"]))


if __name__ == "__main__":
    main(sys.argv[1:])
