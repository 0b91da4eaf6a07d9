"""`distill` command line: options, config and overrides in any order for every sub-command; exit code 2 and one
message for a user's mistake (a traceback only with --debug), bugs keep their traceback; `distill mlflow sync`."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli
from pipeline.cli import parse_arguments
from pipeline.config import ConfigError
from pipeline.stages.run import run_stage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["config", "C", "a.b=1"], {"config": Path("C"), "overrides": ["a.b=1"]}),
        (["config", "--reference"], {"config": None, "reference": True}),
        (["teacher", "import", "C", "a.b=1", "--overwrite"], {"config": Path("C"), "overwrite": True}),
        (["teacher", "import", "--overwrite", "C", "a.b=1"], {"config": Path("C"), "overwrite": True}),
        (["prepare", "--overwrite", "C", "a.b=1", "--debug", "c.d=2"], {"overrides": ["a.b=1", "c.d=2"]}),
        (["prepare", "C", "--log-level", "WARNING", "a.b=1"], {"log_level": "WARNING", "overrides": ["a.b=1"]}),
        (["cache", "C", "a.b=1", "--debug", "c.d=2"], {"config": "C", "overrides": ["a.b=1", "c.d=2"]}),
        (["cache", "--debug", "verify", "DIR"], {"config": "verify", "overrides": ["DIR"], "debug": True}),
        (["cache", "--overwrite", "C", "a.b=1"], {"config": "C", "overrides": ["a.b=1"], "overwrite": True}),
        (["cache", "C", "a.b=1"], {"config": "C", "overwrite": False}),
        (["train", "C", "a.b=1", "--overwrite"], {"config": Path("C"), "overwrite": True}),
        (["run", "--overwrite", "C"], {"config": Path("C"), "overwrite": True}),
        (["--local_rank=0", "train", "C", "a.b=1"], {"config": Path("C"), "overrides": ["a.b=1"]}),
        (["train", "--debug", "C", "a.b=1"], {"config": Path("C"), "debug": True}),
        (["eval", "C", "--model", "M"], {"config": Path("C"), "model": Path("M"), "overrides": []}),
        (["eval", "--model", "M", "C"], {"config": Path("C"), "model": Path("M"), "overrides": []}),
        (
            ["eval", "C", "a.b=1", "--checkpoint", "K", "c.d=2"],
            {"checkpoint": Path("K"), "overrides": ["a.b=1", "c.d=2"]},
        ),
        (["eval", "--checkpoint", "K", "C", "a.b=1"], {"config": Path("C"), "overrides": ["a.b=1"]}),
        (["run", "C", "--debug", "a.b=1"], {"config": Path("C"), "overrides": ["a.b=1"], "debug": True}),
        (["compare", "--experiment", "E", "C", "a.b=1"], {"config": Path("C"), "experiment": "E"}),
        (["compare", "C", "--experiment", "E", "a.b=1"], {"config": Path("C"), "overrides": ["a.b=1"]}),
        (["mlflow", "sync", "R", "--tracking-uri", "U"], {"run_dir": Path("R"), "tracking_uri": "U"}),
        (["mlflow", "sync", "--tracking-uri", "U", "R"], {"run_dir": Path("R"), "tracking_uri": "U"}),
        (["--debug", "mlflow", "sync", "R"], {"run_dir": Path("R"), "debug": True}),
    ],
)
def test_options_config_and_overrides_in_any_order(argv: list[str], expected: dict[str, Any]) -> None:
    args = vars(parse_arguments(argv))
    assert {key: args[key] for key in expected} == expected
    assert args.get("debug") in (True, False) and args.get("log_level")


@pytest.mark.parametrize(
    "argv", [["eval", "C", "--modle", "M"], ["mlflow", "sync", "R", "extra"], ["train", "C", "--overwrite-all"]]
)
def test_unknown_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_arguments(argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


STAGE_MODULES = {
    "teacher_stage": "teacher",
    "prepare_stage": "prepare",
    "cache_stage": "cache",
    "train_stage": "train",
    "eval_stage": "evaluate",
    "run_stage": "run",
}
"""The module of each stage driver (the CLI imports a stage's module only when that command runs)."""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, dict]]:
    """Replace every stage driver by a recorder of (name, config, keyword arguments)."""
    recorded: list[tuple[str, Any, dict]] = []
    for name in ("teacher_stage", "prepare_stage", "cache_stage", "train_stage", "eval_stage", "run_stage"):

        def record(config: Any, *args: Any, name: str = name, **kwargs: Any) -> None:
            recorded.append((name, config, kwargs))

        monkeypatch.setattr(f"pipeline.stages.{STAGE_MODULES[name]}.{name}", record)
    monkeypatch.setattr(
        "pipeline.stages.cache.verify_stage", lambda directory: recorded.append(("verify_stage", directory, {}))
    )
    return recorded


@pytest.mark.parametrize(
    ("argv", "stage", "kwargs"),
    [
        (["teacher", "import", "--overwrite", str(CONFIG), "train.max_steps=3"], "teacher_stage", {"overwrite": True}),
        (["prepare", str(CONFIG), "train.max_steps=3"], "prepare_stage", {"overwrite": False}),
        (["prepare", "train.max_steps=3", "--overwrite", str(CONFIG)], None, None),
        (["cache", str(CONFIG), "--debug", "train.max_steps=3"], "cache_stage", {"overwrite": False}),
        (["cache", "--overwrite", str(CONFIG), "train.max_steps=3"], "cache_stage", {"overwrite": True}),
        (["train", str(CONFIG), "--log-level", "INFO", "train.max_steps=3"], "train_stage", {"overwrite": False}),
        (["train", str(CONFIG), "train.max_steps=3", "--overwrite"], "train_stage", {"overwrite": True}),
        (["eval", "--model", "M", str(CONFIG), "train.max_steps=3"], "eval_stage", {"model_dir": Path("M")}),
        (["eval", str(CONFIG), "train.max_steps=3", "--checkpoint", "K"], "eval_stage", {"checkpoint": Path("K")}),
        (["run", str(CONFIG), "--debug", "train.max_steps=3"], "run_stage", {"overwrite": False}),
        (["run", str(CONFIG), "--overwrite", "train.max_steps=3"], "run_stage", {"overwrite": True}),
    ],
)
def test_each_stage_gets_the_config_with_its_overrides(
    calls: list, argv: list[str], stage: str | None, kwargs: dict | None
) -> None:
    if stage is None:  # the first plain word is the config: an override there is not a file
        assert cli.main(argv) == 2
        return
    assert cli.main(argv) == 0
    [(name, config, given)] = calls
    assert name == stage and config.train.max_steps == 3
    assert {key: given[key] for key in kwargs} == kwargs


def test_cache_verify_takes_its_directory_in_any_order(calls: list) -> None:
    assert cli.main(["cache", "--debug", "verify", "/some/cache"]) == 0
    assert calls == [("verify_stage", Path("/some/cache"), {})]
    assert cli.main(["cache", "verify", "/some/cache", "--overwrite"]) == 2  # verify writes nothing to replace
    assert len(calls) == 1


def test_run_hands_overwrite_to_every_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """`distill run --overwrite` reaches teacher import, prepare, and the cache and train stage of every variant."""
    seen: list[tuple[str, bool]] = []
    for name in ("teacher_stage", "prepare_stage", "cache_stage", "train_stage"):

        def record(config: Any, *, overwrite: bool = False, name: str = name) -> None:
            seen.append((name, overwrite))

        monkeypatch.setattr(f"pipeline.stages.{STAGE_MODULES[name]}.{name}", record)
    monkeypatch.setattr("pipeline.stages.done.is_done", lambda stage, config: False)  # whatever work/tiny holds
    monkeypatch.setattr("pipeline.stages.done.mark_done", lambda stage, config: None)
    config = cli.load_config(CONFIG, ["mlflow.enabled=false"])
    for overwrite in (True, False):
        seen.clear()
        run_stage(config, overwrite=overwrite)
        variants = len(config.run.variants)
        assert seen == [
            ("teacher_stage", overwrite),
            ("prepare_stage", overwrite),
            *[(name, overwrite) for _ in range(variants) for name in ("cache_stage", "train_stage")],
        ]


def _fail_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def stage(config: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr("pipeline.stages.prepare.prepare_stage", stage)


def test_a_user_error_exits_2_with_one_message_and_a_traceback_only_with_debug(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fail_with(monkeypatch, ConfigError("data.seq_len = 4096: the fix is here"))
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert cli.main(["prepare", str(CONFIG)]) == 2
    [record] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert record.getMessage() == "data.seq_len = 4096: the fix is here" and record.exc_info is None
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert cli.main(["prepare", str(CONFIG), "--debug"]) == 2
    [record] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert record.exc_info is not None and record.exc_info[0] is ConfigError


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, IndexError("index 5 is out of bounds"))
    with pytest.raises(IndexError, match="out of bounds"):
        cli.main(["prepare", str(CONFIG)])


def test_a_full_disk_anywhere_is_a_clean_error_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    _fail_with(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard.tmp")))
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert cli.main(["prepare", str(CONFIG)]) == 2
    assert f"{tmp_path / 'shard.tmp'}: no space left on the device" in caplog.text
    _fail_with(monkeypatch, OSError(errno.EACCES, "Permission denied", str(tmp_path)))
    with pytest.raises(PermissionError):  # not a full disk: whoever raised it did not expect it
        cli.main(["prepare", str(CONFIG)])


def test_an_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli.main(["prepare", str(CONFIG)]) == 130


@pytest.mark.slow
def test_the_console_script_prints_no_traceback_for_a_mistake_unless_debug(tmp_path: Path) -> None:
    argv = [str(BIN / "distill"), "prepare", str(CONFIG), f"teacher.path={tmp_path / 'no_teacher'}"]
    plain = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 2, plain.stderr
    assert "Traceback" not in plain.stderr and f"{tmp_path / 'no_teacher'}" in plain.stderr
    assert "distill teacher import CONFIG" in plain.stderr
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ModelDirectoryError" in debug.stderr


@pytest.mark.slow
def test_mlflow_sync_command_copies_a_fallback_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    from mlflow.tracking import MlflowClient

    from pipeline.config import config_from_dict
    from pipeline.infra.tracking import create_tracker

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    values = {"mlflow": {"tracking_uri": f"http://127.0.0.1:{closed}"}, "train": {"output_dir": str(tmp_path / "run")}}
    tracker = create_tracker(config_from_dict({**values, "student": {"num_layers": 2, "num_heads": 2}}), rank=0)
    assert tracker.local
    tracker.log_metrics({"train/loss": 1.5}, step=7)
    tracker.finish()
    target = f"sqlite:///{tmp_path / 'server.db'}"
    assert cli.main(["mlflow", "sync", str(tmp_path / "run"), "--tracking-uri", target]) == 0
    local_id, copy_id = capsys.readouterr().out.split()[:3:2]
    assert local_id == tracker.run_id
    history = MlflowClient(tracking_uri=target).get_metric_history(copy_id, "train/loss")
    assert [(point.step, point.value) for point in history] == [(7, 1.5)]
    assert cli.main(["mlflow", "sync", str(tmp_path / "nothing-here")]) == 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_local_launcher_finds_the_venv_from_any_directory(tmp_path: Path) -> None:
    """Right after `launch/setup-env.sh`: no activated venv (a bare PATH), another working directory, a config path
    relative to the caller (absolutised) or to the repository; DeepSpeed's launcher starts `distill` in the venv."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "mine.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STAGE": "config", "MASTER_PORT": str(port)}
    for config in ("mine.yaml", "configs/tiny.yaml"):
        launched = subprocess.run(
            ["bash", str(REPO / "launch" / "local.sh"), "1", config, "train.max_steps=7"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
        assert "max_steps: 7" in launched.stdout and "[rank 0]" in launched.stderr
