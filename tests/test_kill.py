"""Random kill -9 trials: `distill cache` and `distill train` killed at a random moment, then run again, end exactly
where an uninterrupted run ends — the cache byte-identical (every shard and the manifest, nothing else left), the
training run with the same losses in `metrics.jsonl` (to 1e-6, each step once) and equal exported weights (fp32, one
rank). A `train.resume=never --overwrite` killed at a random step leaves the earlier run byte-identical.

`DISTILL_KILL_TRIALS` trials of each (default 2; the full run uses 10), kill moments drawn from `DISTILL_KILL_SEED`
(default 0): uniformly over the window in which the uninterrupted reference run writes its output, from the moment
its output directory appears to its exit (redrawn within the run's own time when a run exits before its kill).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.stages.prepare import prepare_stage
from pipeline.stages.teacher import teacher_stage

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
DISTILL = Path(sys.executable).parent / "distill"
TRIALS = int(os.environ.get("DISTILL_KILL_TRIALS", "2"))
SEED = int(os.environ.get("DISTILL_KILL_SEED", "0"))
CACHE_SETTINGS = ("cache.shard_size=1", "cache.batch_size=1")
"""One sample per shard: many shard writes, so a kill lands between, during or after any of them."""
TRAIN_SETTINGS = (
    "train.max_steps=10",
    "train.save_every=2",
    "train.eval_every=4",
    "train.keep_checkpoints=2",
    "mlflow.enabled=false",
)
"""Checkpoints, evaluations and the pruning of old checkpoints all happen inside the kill window."""
UNTIMED = ("train/tokens_per_s", "train/loader_wait_frac", "train/step_time_s")


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: where it wrote, and the window (seconds after its output directory appeared) in which a
    trial's kill is drawn."""

    output: Path
    window: float


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(DISTILL), *argv], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    while not path.exists() and process.poll() is None:
        time.sleep(0.005)


def _timed_run(argv: list[str], output: Path) -> Reference:
    """Run `distill ARGV` to the end; the window lasts from `output` appearing to the exit."""
    process = _start(argv)
    _wait_for(output, process)
    appeared = time.monotonic()
    _finish(process)
    return Reference(output, time.monotonic() - appeared)


def _kill_then_finish(argv: list[str], output: Path, delay: float, attempts: int = 3) -> float:
    """Start `distill ARGV`, kill -9 it `delay` seconds after `output` appears, then run it again to the end.

    Runs are slower or faster from one moment to the next on a shared machine; when the run exits before the kill,
    its output is removed and the trial starts over with a delay drawn within the time that run took after
    `output` appeared (at most `attempts` starts). Returns the delay at which the kill landed.
    """
    for _ in range(attempts):
        process = _start(argv)
        _wait_for(output, process)
        appeared = time.monotonic()
        try:
            printed, _ = process.communicate(timeout=delay)
            assert process.returncode == 0, printed[-4000:]
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            _finish(_start(argv))
            return delay
        delay = random.Random(f"{SEED}:{delay}").uniform(0.0, time.monotonic() - appeared)
        shutil.rmtree(output)
    raise AssertionError(f"the run exited before the kill in {attempts} attempts")


def _delay(kind: str, trial: int, window: float) -> float:
    return random.Random(f"{SEED}:{kind}:{trial}").uniform(0.0, window)


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _cache_argv(prepared: Path, directory: Path) -> list[str]:
    return [
        "cache",
        str(CONFIG),
        f"teacher.path={prepared}/teacher",
        f"data.output_dir={prepared}/data",
        f"cache.output_dir={directory}",
        *CACHE_SETTINGS,
    ]


def _train_argv(prepared: Path, cache: Path, runs: Path) -> list[str]:
    return [
        "train",
        str(CONFIG),
        f"teacher.path={prepared}/teacher",
        f"data.output_dir={prepared}/data",
        f"cache.output_dir={cache}",
        f"train.output_dir={runs}",
        *CACHE_SETTINGS,
        *TRAIN_SETTINGS,
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA teacher and the tiny corpus packed with its tokenizer."""
    root = tmp_path_factory.mktemp("kill-prepared")
    config = load_config(CONFIG, [f"teacher.path={root}/teacher", f"data.output_dir={root}/data"])
    teacher_stage(config)
    prepare_stage(config)
    return root


@pytest.fixture(scope="module")
def reference_cache(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted `distill cache` (also the cache the training trials read)."""
    directory = tmp_path_factory.mktemp("kill-cache") / "targets"
    return _timed_run(_cache_argv(prepared, directory), directory)


@pytest.fixture(scope="module")
def reference_run(prepared: Path, reference_cache: Reference, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted `distill train`."""
    runs = tmp_path_factory.mktemp("kill-train") / "runs"
    return _timed_run(_train_argv(prepared, reference_cache.output, runs), runs)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_cache_killed_at_a_random_moment_resumes_byte_identical(
    prepared: Path, reference_cache: Reference, tmp_path: Path, trial: int
) -> None:
    directory = tmp_path / "targets"
    delay = _delay("cache", trial, reference_cache.window)
    landed = _kill_then_finish(_cache_argv(prepared, directory), directory, delay)
    note = f"cache trial {trial}: killed {landed:.2f} s into a {reference_cache.window:.2f} s window"
    print(note)
    assert _digests(directory) == _digests(reference_cache.output), note
    assert not [path for path in directory.rglob(".*")], f"{note}: temporaries left behind"


def _records(runs: Path) -> list[dict]:
    return [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]


def _by_step(records: list[dict]) -> dict[tuple[str, int], dict]:
    return {("train" if "train/loss" in record else "eval", record["step"]): record for record in records}


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_training_killed_at_a_random_moment_resumes_with_the_same_losses_and_weights(
    prepared: Path, reference_cache: Reference, reference_run: Reference, tmp_path: Path, trial: int
) -> None:
    """Every record of the resumed run's log equals the uninterrupted run's record of that step in every metric but
    timings, to 1e-6; every step is logged once (the resume drops the lines after its checkpoint, which it writes
    again); the exported student's weights are equal."""
    runs = tmp_path / "runs"
    delay = _delay("train", trial, reference_run.window)
    landed = _kill_then_finish(_train_argv(prepared, reference_cache.output, runs), runs, delay)
    note = f"train trial {trial}: killed {landed:.2f} s into a {reference_run.window:.2f} s window"
    print(note, "; hidden entries left:", sorted(path.name for path in runs.rglob(".*")))
    expected = _by_step(_records(reference_run.output))
    records = _records(runs)
    assert set(_by_step(records)) == set(expected) and len(records) == len(expected), note
    for record in records:
        wanted = expected[("train" if "train/loss" in record else "eval", record["step"])]
        for key, value in wanted.items():
            if key not in UNTIMED:
                assert record[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (note, record["step"], key)
    weights = load_file(runs / "student" / "model.safetensors")
    reference_weights = load_file(reference_run.output / "student" / "model.safetensors")
    assert weights.keys() == reference_weights.keys(), note
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), (note, name)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_an_overwrite_killed_at_a_random_step_leaves_the_earlier_run_intact(
    prepared: Path, reference_cache: Reference, reference_run: Reference, tmp_path: Path, trial: int
) -> None:
    """`train.resume=never --overwrite` on a finished run, killed -9 as soon as it logs a random step: the earlier
    run is byte-identical (before, its checkpoints and student were deleted as the new run started). Run again, it
    takes over the lock the killed job left (naming its pid), and the new run replaces the earlier one whole."""
    runs = tmp_path / "runs"
    shutil.copytree(reference_run.output, runs)
    before = _digests(runs)
    argv = [*_train_argv(prepared, reference_cache.output, runs), "train.resume=never", "train.seed=1", "--overwrite"]
    step = random.Random(f"{SEED}:overwrite:{trial}").randint(1, 10)  # of train.max_steps=10
    process = _start(argv)
    for line in process.stdout:  # text mode: tqdm's carriage returns end lines too
        if f" INFO pipeline.training.trainer: step {step}/10 " in line:
            process.send_signal(signal.SIGKILL)
            break
    process.communicate()
    note = f"overwrite trial {trial}: killed at step {step}"
    print(note)
    assert process.returncode == -signal.SIGKILL, note
    assert _digests(runs) == before, note
    rerun = _start(argv)
    output, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, output[-4000:]
    assert f"taking over the lock left by pid {process.pid}" in output, note
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"], note
    records = _records(runs)
    assert len(records) == len(_by_step(records)) == len(_records(reference_run.output)), note
    first = _by_step(records)[("train", 1)]["train/loss"]
    assert first != pytest.approx(_by_step(_records(reference_run.output))[("train", 1)]["train/loss"]), note
