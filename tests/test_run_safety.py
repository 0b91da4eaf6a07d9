"""Run directories under concurrent, killed and failing jobs: one writing job per output directory (a second one is
refused at once, naming the holder; a lock left by a killed job is taken over, naming it), a resume writes every
step once to `metrics.jsonl` and to MLflow, and a checkpoint on a full disk is one exit-2 line naming the file.

A killed `train.resume=never --overwrite`: tests/test_kill.py. The pieces of a save on a full disk, with a fake
engine: tests/test_checkpoints.py.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.infra.locks import OutputLock, OutputLockedError, lock_path, output_lock
from pipeline.training.trainer import StepMetrics, Trainer, trim_metrics_log
from tests.train_fixtures import BIN, FAST_TRAIN, TINY_CONFIG, TinyCache, launcher_env

HOST = socket.gethostname()
HOLD = textwrap.dedent(
    """
    import sys, time
    from pipeline.infra.locks import OutputLock
    OutputLock.acquire(sys.argv[1], "train.output_dir", "distill train")
    print("locked", flush=True)
    time.sleep(600)
    """
)
"""A job that takes the lock of the directory argv[1] and keeps it until it is killed."""
AT_THE_BARRIER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline import cli
    import pipeline.stages.cache, pipeline.stages.train  # the seconds of imports, before the barrier
    gate, name = Path(sys.argv[1]), sys.argv[2]
    (gate / name).touch()
    while len(list(gate.iterdir())) < 2:
        time.sleep(0.002)
    sys.exit(cli.main(sys.argv[3:]))
    """
)
"""`distill ARGV[3:]` started the moment both jobs of the gate directory ARGV[1] are ready."""
SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 238336 vs 238224"


def _holder(directory: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], env=launcher_env(), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


# --------------------------------------------------------------------------------------------------------------------
# The lock


def test_a_second_job_is_refused_at_once_naming_the_directory_and_the_holder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    holder = _holder(runs)
    try:
        with pytest.raises(OutputLockedError) as error:
            OutputLock.acquire(runs, "train.output_dir", "distill train")
    finally:
        holder.kill()
        holder.wait()
    message = str(error.value)
    assert f"train.output_dir {str(runs)!r} is in use" in message
    assert f"pid {holder.pid} on host {HOST} (distill train, since " in message
    assert str(tmp_path / ".runs.lock") in message and "another directory" in message


def test_a_lock_released_cleanly_leaves_nothing_and_is_taken_again(tmp_path: Path) -> None:
    with output_lock(tmp_path / "data", "data.output_dir", "distill prepare") as lock:
        assert lock.path == tmp_path / ".data.lock"
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []
    with output_lock(tmp_path / "data", "data.output_dir", "distill prepare"):
        pass
    assert lock_path("runs/") == lock_path(Path.cwd() / "runs") == Path.cwd() / ".runs.lock"


def test_a_lock_left_by_a_killed_job_is_taken_over_naming_the_dead_pid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel released the killed job's flock; its record in the lock file names it in a warning."""
    runs = tmp_path / "runs"
    holder = _holder(runs)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".runs.lock").is_file()  # left behind, naming the dead holder
    with caplog.at_level(logging.WARNING, logger="pipeline"), output_lock(runs, "train.output_dir", "distill train"):
        assert json.loads((tmp_path / ".runs.lock").read_text())["pid"] == os.getpid()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"taking over the lock left by pid {holder.pid} on host {HOST} (distill train" in warnings[0]
    assert "no longer running" in warnings[0]


def _contend(directory: str, gate: multiprocessing.Barrier, results: multiprocessing.Queue) -> None:
    gate.wait()
    try:
        lock = OutputLock.acquire(directory, "cache.output_dir", "distill cache")
    except OutputLockedError:
        lock = None
    results.put("refused" if lock is None else "locked")
    gate.wait()  # the winner holds the lock until every contender has tried
    if lock is not None:
        lock.release()


def test_of_jobs_started_together_exactly_one_gets_the_lock(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    contenders = 4
    gate, results = context.Barrier(contenders), context.Queue()
    processes = [
        context.Process(target=_contend, args=(str(tmp_path / "targets"), gate, results)) for _ in range(contenders)
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert outcomes == ["locked", "refused", "refused", "refused"]
    assert list(tmp_path.iterdir()) == []


def _two_ranks(rank: int, port: int, directory: str, results: multiprocessing.Queue) -> None:
    import torch.distributed as torch_dist

    from pipeline.infra.locks import rank_zero_output_lock

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with rank_zero_output_lock(directory, "train.output_dir", "distill train"):
            results.put((rank, "locked"))
    except OutputLockedError as error:
        results.put((rank, str(error)))
    torch_dist.destroy_process_group()


@pytest.mark.multiprocess
def test_a_multi_rank_job_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone tries the lock; its refusal reaches every rank, so that no rank goes on to write."""
    runs = tmp_path / "runs"
    holder = _holder(runs)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        ranks = [context.Process(target=_two_ranks, args=(rank, port, str(runs), results)) for rank in (0, 1)]
        for process in ranks:
            process.start()
        outcomes = dict(results.get(timeout=180) for _ in ranks)
        for process in ranks:
            process.join(timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(outcomes) == [0, 1]
    for message in outcomes.values():
        assert f"pid {holder.pid} on host {HOST}" in message, outcomes


# --------------------------------------------------------------------------------------------------------------------
# Two real jobs on one directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    """The tiny LLaMA teacher, its packed data and a dense cache (tiny.yaml's targets)."""
    from pipeline.stages.cache import cache_stage
    from pipeline.stages.prepare import prepare_stage
    from pipeline.stages.teacher import teacher_stage

    cache = TinyCache(tmp_path_factory.mktemp("run_safety"))
    config = cache.config(cache.root / "runs")
    teacher_stage(config)
    prepare_stage(config)
    cache_stage(config)
    return cache


def _together(argv: list[str], gate: Path) -> list[tuple[int, int, str]]:
    """`distill ARGV` twice, released at one moment once both processes have imported everything: (pid, exit code,
    output) of each."""
    gate.mkdir()
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", AT_THE_BARRIER, str(gate), name, *argv],
            cwd=TINY_CONFIG.parents[1],
            env=launcher_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("first", "second")
    ]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    return [(job.pid, job.returncode, output) for job, output in zip(jobs, outputs, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "cache"])
def test_two_jobs_started_together_on_one_directory_one_is_refused(
    tiny: TinyCache, tmp_path: Path, command: str
) -> None:
    """Without the lock both ran to exit 0, the training runs' lines interleaved in one `metrics.jsonl`."""
    if command == "train":
        directory = tmp_path / "runs"
        argv = ["train", str(TINY_CONFIG), *tiny.overrides(directory, *FAST_TRAIN, "mlflow.enabled=false")]
        argv += ["train.max_steps=60", "train.save_every=30", "train.eval_every=30"]
        key = "train.output_dir"
    else:
        directory = tmp_path / "targets"
        argv = ["cache", str(TINY_CONFIG), *tiny.overrides(tmp_path / "runs"), f"cache.output_dir={directory}"]
        key = "cache.output_dir"
    jobs = _together(argv, tmp_path / "gate")
    assert sorted(code for _, code, _ in jobs) == [0, 2], [output[-3000:] for _, _, output in jobs]
    (winner, _, _), (_, _, refused) = sorted(jobs, key=lambda job: job[1])
    errors = [line for line in refused.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in refused, refused[-3000:]
    assert f"{key} {str(directory)!r} is in use: pid {winner} on host {HOST} (distill {command}" in errors[0]
    assert str(tmp_path / f".{directory.name}.lock") in errors[0]
    assert not (tmp_path / f".{directory.name}.lock").exists()  # released by the winner
    if command == "train":
        lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines if "train/loss" in line] == list(range(1, 61))
        assert [line["step"] for line in lines if "train/loss" not in line] == [0, 30, 60]


# --------------------------------------------------------------------------------------------------------------------
# A resume writes each step once


def test_a_resume_drops_the_lines_after_its_checkpoint_and_a_line_cut_short(tmp_path: Path) -> None:
    lines = [{"step": 0, "eval/ppl": 9.0}, {"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}]
    lines += [{"step": 2, "eval/ppl": 8.0}, {"step": 3, "train/loss": 1.0}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 4, "train/lo')  # killed mid-line
    dropped = trim_metrics_log(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(line) + "\n" for line in lines[:4])
    assert dropped == {("train", 3): lines[4]}
    assert trim_metrics_log(tmp_path / "none", 2) == {}


@pytest.mark.slow
@pytest.mark.parametrize("changed", [(), ("distill.attn.weight=0.5",)], ids=["same config", "loss weight changed"])
def test_a_resume_writes_each_step_once_to_metrics_and_to_mlflow(
    tiny: TinyCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    changed: tuple[str, ...],
) -> None:
    """Killed after step 6 (and its evaluation) with the checkpoint at step 4: the resumed job runs steps 5 and 6
    again. Before, their lines were in `metrics.jsonl` twice and their points in MLflow twice. Now each line is
    there once; a point is not logged again where the resumed job reproduces it, and is (with a warning) where it
    does not: resumed with another attention weight, the total loss of steps 5 and 6 and the evaluation at 6 differ
    (the LR would not do: the checkpoint restores the scheduler's)."""
    from mlflow.tracking import MlflowClient

    from pipeline.stages.train import train_stage

    settings = ("train.max_steps=8", "train.save_every=4", "train.eval_every=3", "train.log_every=1")
    config = tiny.config(tmp_path, *FAST_TRAIN, *settings, "mlflow.run_name=resumed-once")
    step = Trainer.train_step

    def killed_after_step_6(self: Trainer) -> StepMetrics:
        if self.state.step == 6:
            raise KeyboardInterrupt("killed after step 6")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_stage(config)
    interrupted = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert interrupted == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # steps 5, 6 and the evaluation at 6 come after the checkpoint
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        train_stage(tiny.config(tmp_path, *FAST_TRAIN, *settings, "mlflow.run_name=resumed-once", *changed))

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == list(range(1, 9))
    assert [line["step"] for line in lines if "train/loss" not in line] == [0, 3, 6, 8]
    client = MlflowClient(tracking_uri=tiny.tracking_uri)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    train_points = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda point: point.step)
    eval_steps = sorted(point.step for point in client.get_metric_history(run_id, "eval/ppl"))
    warnings = [record.getMessage() for record in caplog.records if "interrupted attempt" in record.getMessage()]
    if not changed:
        assert [point.step for point in train_points] == list(range(1, 9)) and eval_steps == [0, 3, 6, 8]
        assert warnings == []
        by_step = {line["step"]: line for line in lines if "train/loss" in line}
        for point in train_points:  # the points kept are the lines' values
            assert point.value == pytest.approx(by_step[point.step]["train/loss"], rel=1e-6)
    else:
        assert [point.step for point in train_points] == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8]
        assert eval_steps == [0, 3, 6, 6, 8]
        assert [warning.split(":")[0] for warning in warnings] == ["train step 5", "train step 6", "eval step 6"]


# --------------------------------------------------------------------------------------------------------------------
# A checkpoint on a full disk


def _can_mount_tmpfs(where: Path) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True
    )
    return probe.returncode == 0


def _full_disk_argv(tiny: TinyCache, runs: Path) -> list[str]:
    settings = ("train.max_steps=4", "train.save_every=2", "train.eval_every=0", "mlflow.enabled=false")
    return ["train", str(TINY_CONFIG), *tiny.overrides(runs, *FAST_TRAIN, *settings)]


@pytest.mark.slow
def test_a_checkpoint_on_a_full_tmpfs_is_one_exit_2_line_naming_the_file_and_its_disk(
    tiny: TinyCache, tmp_path: Path
) -> None:
    """A 1.5 MB disk holds the checkpoint of step 2 (~1 MB), not that of step 4: torch's zip writer stops with
    "unexpected pos …" (before: exit 1 and a traceback). Nothing is lost: `latest` names step 2, complete."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (no user namespaces): the monkeypatched test covers the message")
    runs = disk / "runs"
    script = f'mount -t tmpfs -o size=1500k tmpfs {disk} && "$@"; code=$?; cp -r {disk} {tmp_path}/after; exit $code'
    job = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(BIN / "distill"), *_full_disk_argv(tiny, runs)],
        cwd=TINY_CONFIG.parents[1],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 2, output[-4000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-4000:]
    assert f"{runs}/checkpoints/step-00000004/" in errors[0] and ".pt: writing it failed" in errors[0]
    assert f"the disk is the one mounted at {disk}" in errors[0] and "free some space" in errors[0]
    after = tmp_path / "after" / "runs" / "checkpoints"
    assert (after / "latest").read_text() == "step-00000002"
    assert sorted(path.name for path in after.glob("step-*")) == ["step-00000002"]


@pytest.mark.slow
def test_a_checkpoint_write_error_is_one_exit_2_line_naming_the_file(
    tiny: TinyCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The full-disk failure without a tmpfs: DeepSpeed's `torch.save` of the step-4 checkpoint writes half its
    file, then fails as torch's zip writer does on a full disk."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    save = TorchCheckpointEngine.save

    def full_at_step_4(self: TorchCheckpointEngine, state_dict: dict, path: str) -> None:
        if "step-00000004" in path and "optim_states" in path:
            Path(path).write_bytes(b"half a file")
            raise RuntimeError(SHORT_WRITE)
        save(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", full_at_step_4)
    runs = tmp_path / "runs"
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert cli.main(_full_disk_argv(tiny, runs)) == 2
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    failed = runs / "checkpoints" / "step-00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert f"{failed}: writing it failed ({SHORT_WRITE}" in message and "the disk is the one mounted at /" in message
    assert (runs / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not (runs / "checkpoints" / "step-00000004").exists()
