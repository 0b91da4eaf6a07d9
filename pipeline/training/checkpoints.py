"""Checkpoints of `distill train`: where they live, what they hold, how a run resumes (the final export of the
student is `training.export`).

A checkpoint is `train.output_dir/checkpoints/<tag>` (DeepSpeed's `latest` file names the newest): DeepSpeed's files
plus `trainer_state.json` (step, global sample position, world size, ZeRO stage, precision, student shape, MLflow
run id); DeepSpeed's client state holds the same and every rank's RNG state.

DeepSpeed 0.19 restores ZeRO-partitioned optimizer state (ZeRO ≥ 1, and bf16 whose optimizer is partitioned too)
only at the world size it was saved with ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
world size is not currently supported"). Across world sizes or ZeRO stages the checkpoint is converted once with
DeepSpeed's `ds_to_universal` into `<tag>_universal` and loaded with `checkpoint.load_universal`. Unpartitioned fp32
state (ZeRO 0) loads at any world size as is. Either way the run continues from the saved global sample position.

Trust boundary. DeepSpeed's files are pickles, and unpickling runs code. After every save (and every universal
conversion) rank 0 writes `checkpoint.sha256.json`, the sha256 and size of every file of the checkpoint, and only
then moves `latest`; `verify_checkpoint` checks it before anything opens a checkpoint (`plan_resume`, the universal
conversion, `load_checkpoint_weights`), so a changed, added or missing file — or a checkpoint without a manifest,
such as one received from someone else — is refused before a byte is unpickled. The manifest proves that files
are unchanged since a save, not who saved them: load only checkpoints your own runs wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra import dist
from pipeline.infra.atomic import (
    atomic_write_text,
    is_write_failure,
    recover_directory,
    replacement_directory,
    storage_error,
    swap_directory,
)

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STUDENT = "student"
RUN_ID_FILE = "mlflow_run_id"
"""The MLflow run a resumed job (and `distill eval` of its export) continues, in `train.output_dir`."""
TRAINER_STATE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
LATEST = "latest"
CHECKPOINT_MANIFEST = "checkpoint.sha256.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 22
TRUST_ADVICE = (
    "checkpoints are pickles that can run code when loaded, so only checkpoints whose files match the sha256 "
    "manifest their own save wrote are loaded; load only checkpoints your own runs wrote — resume from another "
    "checkpoint, or start a new run (train.resume=never, another train.output_dir)"
)


class CheckpointError(PipelineError):
    """A checkpoint cannot be found, read or continued as configured; the message names the path and the field."""


@dataclass
class TrainState:
    """What a resumed run needs beyond DeepSpeed's own state."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Global sample position: samples consumed so far, over all ranks (the next step starts here)."""
    world_size: int = 1
    zero_stage: int = 0
    bf16: bool = False
    mlflow_run_id: str | None = None
    student: dict[str, Any] = field(default_factory=dict)
    """The `student` config section the weights were trained with."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The other config values the weights were trained with (`training_recipe`); empty in older checkpoints."""


RECIPE_TRAIN_KEYS = (
    "mode",
    "micro_batch_size",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "grad_clip",
    "precision",
    "seed",
)
"""The `train` keys that change the trained weights (not how often the run saves, evaluates or logs)."""


def training_recipe(config: Config) -> dict[str, Any]:
    """The config values besides the student's shape that the trained weights depend on, flattened: every
    `distill.*` key and `RECIPE_TRAIN_KEYS`. A finished run is only "already trained" for the same recipe."""
    recipe = {key: value for key, value in config.flat().items() if key.startswith("distill.")}
    recipe.update({f"train.{key}": getattr(config.train, key) for key in RECIPE_TRAIN_KEYS})
    return recipe


def recipe_changes(trained: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key: trained → wanted` for every recipe value that differs (nothing when the run predates recipes)."""
    if not trained:
        return []
    keys = sorted(set(trained) | set(wanted))
    return [f"{key}: {trained.get(key)!r} → {wanted.get(key)!r}" for key in keys if trained.get(key) != wanted.get(key)]


@dataclass
class ResumePoint:
    """A checkpoint to continue from."""

    save_dir: Path
    tag: str
    state: TrainState
    universal: bool = False
    """Load the universal conversion (`<tag>_universal`): the optimizer state is re-partitioned."""

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.universal else self.tag


def checkpoint_tag(step: int) -> str:
    """`step-00000010` …"""
    return f"step-{step:08d}"


def find_checkpoint(config: Config) -> tuple[Path, str] | None:
    """(save dir, tag) to resume from per `train.resume`, or None to start fresh."""
    resume = config.train.resume
    if resume == "never":
        return None
    save_dir = Path(config.train.output_dir) / CHECKPOINTS if resume == "auto" else Path(resume)
    latest = read_latest(save_dir)
    if latest is not None:
        return save_dir, latest
    if resume == "auto":
        return None
    if (save_dir / TRAINER_STATE).is_file():
        return save_dir.parent, save_dir.name
    raise CheckpointError(
        f"train.resume: {resume!r} is neither a checkpoint directory (with {TRAINER_STATE}) nor a directory of "
        "checkpoints (with a 'latest' file)"
    )


def read_latest(save_dir: Path) -> str | None:
    """The tag `save_dir/latest` names, or None without one; a tag that is not a plain directory name (a path that
    would lead outside `save_dir`) is refused."""
    path = save_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or tag in (".", "..") or Path(tag).name != tag or "\\" in tag:
        raise CheckpointError(
            f"{path}: names {tag!r}, expected the name of a checkpoint directory beside it (e.g. step-00000010)"
        )
    return tag


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_entries(directory: Path) -> dict[str, Path]:
    """Every file, link or other non-directory entry below `directory` (links never followed), by relative POSIX
    path; the manifest itself and its temporaries are left out."""
    entries: dict[str, Path] = {}
    for root, directories, files in os.walk(directory, followlinks=False):
        for name in [*files, *(name for name in directories if Path(root, name).is_symlink())]:
            path = Path(root, name)
            relative = path.relative_to(directory).as_posix()
            if relative != CHECKPOINT_MANIFEST and not relative.startswith(f".{CHECKPOINT_MANIFEST}.tmp-"):
                entries[relative] = path
    return entries


def write_checkpoint_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file of the checkpoint `directory` in `checkpoint.sha256.json`
    (atomically); call once every rank has finished writing."""
    files = {
        relative: {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
        for relative, path in sorted(_checkpoint_entries(directory).items())
    }
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / CHECKPOINT_MANIFEST, text)


def _read_checkpoint_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / CHECKPOINT_MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing — this checkpoint has no sha256 manifest; {TRUST_ADVICE}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON manifest ({error}); {TRUST_ADVICE}") from error
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(
            f"{path}: expected {{'format': {MANIFEST_FORMAT}, 'files': {{…}}}}, found {str(manifest)[:200]}; "
            f"{TRUST_ADVICE}"
        )
    for relative, entry in files.items():
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{path}: lists {relative!r}, expected a path inside the checkpoint; {TRUST_ADVICE}")
        if not (
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(
                f"{path}: entry {relative!r} is {entry!r}, expected {{'bytes': int, 'sha256': str}}; {TRUST_ADVICE}"
            )
    return files


def verify_checkpoint(directory: Path) -> None:
    """Refuse `directory` unless its files are exactly those of its sha256 manifest, byte for byte; the error names
    the first file that is missing, added, a link, or changed. Reads no file as a pickle."""
    directory = Path(directory)
    listed = _read_checkpoint_manifest(directory)
    present = _checkpoint_entries(directory)
    for relative in sorted(set(present) - set(listed)):
        raise CheckpointError(
            f"{present[relative]}: not in the checkpoint's manifest {CHECKPOINT_MANIFEST} (added after the save); "
            f"{TRUST_ADVICE}"
        )
    for relative, entry in sorted(listed.items()):
        path = directory / relative
        if relative not in present:
            raise CheckpointError(f"{path}: listed in {CHECKPOINT_MANIFEST} but missing; {TRUST_ADVICE}")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: not a regular file (a link or a special file); {TRUST_ADVICE}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']} (changed after the save); {TRUST_ADVICE}"
            )
        digest = _file_sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 {digest[:16]}…, the manifest says {entry['sha256'][:16]}… (changed after the save); "
                f"{TRUST_ADVICE}"
            )


def existing_run(output_dir: Path) -> list[str]:
    """What of an earlier run `output_dir` holds: its checkpoints and its exported student (empty: no run)."""
    found = []
    save_dir = output_dir / CHECKPOINTS
    tags = sorted(path.name for path in save_dir.glob("step-*") if path.is_dir()) if save_dir.is_dir() else []
    if tags:
        found.append(f"{len(tags)} checkpoint(s) in {save_dir}, the newest {tags[-1]}")
    if (output_dir / STUDENT).exists():
        found.append(f"the exported student {output_dir / STUDENT}")
    return found


def _is_complete_run(directory: Path) -> bool:
    """A run is complete once its student is exported (the last thing it writes, published atomically)."""
    return (directory / STUDENT).is_dir()


def recover_run_directory(output_dir: Path, *, starting_over: bool) -> None:
    """Rank 0, under the run's lock, before anything reads `output_dir`: finish the swap of an `--overwrite` run
    killed between its renames (`infra.atomic.recover_directory`), and name an unfinished one left beside it
    unless this job is `starting_over` (`claim_fresh_run` empties it then)."""
    output_dir = Path(os.path.abspath(output_dir))  # `.` or `runs/` name the directory: its siblings are beside it
    recover_directory(output_dir, _is_complete_run)
    aside = replacement_directory(output_dir)
    if aside.is_dir() and not starting_over:
        logger.warning(
            "%s: an unfinished `train.resume=never --overwrite` run waits there (killed before it completed; the run "
            "in %s is the earlier one, intact); the next --overwrite starts it over, or delete it",
            aside,
            output_dir,
        )


def claim_fresh_run(config: Config, overwrite: bool) -> Path:
    """Before a run starts over (`train.resume: never`): the directory it writes. `train.output_dir` itself when it
    holds no earlier run; one that does is refused, or with `overwrite` left intact while the new run is built
    beside it (`infra.atomic.replacement_directory`, emptied first: a run that starts over continues nothing) and
    swapped in by `publish_run` only once complete — a kill or a failure before that leaves the earlier run as it
    was. Rank 0 empties the directory; every rank gets its path."""
    output_dir = Path(config.train.output_dir)
    found = existing_run(output_dir)
    if not found:
        return output_dir
    if not overwrite:
        raise CheckpointError(
            f"train.output_dir {str(output_dir)!r} already holds a run ({'; '.join(found)}) and train.resume is "
            "'never': starting over would replace it. Continue it with train.resume=auto, train into another "
            "train.output_dir, or pass --overwrite to replace it"
        )
    aside = replacement_directory(Path(os.path.abspath(output_dir)))
    if dist.is_main():
        logger.warning(
            "--overwrite: the run in %s (%s) is replaced by a new run trained in %s, swapped in once complete",
            output_dir,
            "; ".join(found),
            aside,
        )
        try:
            if aside.exists():
                shutil.rmtree(aside)
            aside.mkdir()
        except OSError as error:
            raise storage_error(error, aside) from error
    return aside


def publish_run(run_dir: Path, output_dir: Path) -> None:
    """Rank 0: swap a complete run trained aside (`claim_fresh_run`) into `output_dir`, retiring the earlier one."""
    if run_dir != output_dir:
        swap_directory(run_dir, Path(os.path.abspath(output_dir)))
        logger.info("%s: replaced the earlier run with the new one", output_dir)


def read_trainer_state(save_dir: Path, tag: str) -> TrainState:
    path = save_dir / tag / TRAINER_STATE
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: cannot read the trainer state of this checkpoint ({error})") from error


def plan_resume(config: Config, world_size: int, stage: int, bf16: bool) -> ResumePoint | None:
    """The checkpoint to continue and how to load it at this world size, ZeRO stage and precision; call on every
    rank before DeepSpeed loads anything.

    The checkpoint (and its universal conversion, where one exists) is verified against its sha256 manifest first
    (`verify_checkpoint`). `train.resume: never` resumes nothing (what a fresh run may replace: `claim_fresh_run`).

    DeepSpeed 0.19 loads ZeRO-partitioned optimizer state (ZeRO ≥ 1, or bf16, whose optimizer is partitioned too)
    only at the world size it was saved with; across world sizes or stages it goes through a universal checkpoint.
    Unpartitioned fp32 state (ZeRO 0) loads at any world size as is.
    """
    found = find_checkpoint(config)
    if found is None:
        return None
    save_dir, tag = found
    verify_checkpoint(save_dir / tag)
    state = read_trainer_state(save_dir, tag)
    for key, value in asdict(config.student).items():
        if key in state.student and state.student[key] != value:
            raise CheckpointError(
                f"{save_dir / tag}: trained with student.{key} = {state.student[key]!r}, the config has {value!r}; "
                "resume with the same student, or start a new run (another train.output_dir or train.resume: never)"
            )
    saved_partitioned = state.zero_stage >= 1 or state.bf16
    now_partitioned = stage >= 1 or bf16
    same_layout = (state.world_size, state.zero_stage, state.bf16) == (world_size, stage, bf16)
    if same_layout or not (saved_partitioned or now_partitioned):
        return ResumePoint(save_dir, tag, state)
    if not (saved_partitioned and now_partitioned):
        raise CheckpointError(
            f"{save_dir / tag}: saved with ZeRO stage {state.zero_stage}{' bf16' if state.bf16 else ''} on "
            f"{state.world_size} ranks; continuing with ZeRO stage {stage}{' bf16' if bf16 else ''} on {world_size} "
            "ranks would drop the optimizer state (DeepSpeed converts only between partitioned layouts); keep "
            "deepspeed.zero_stage and train.precision, or start a new run (train.resume: never)"
        )
    if (save_dir / (tag + UNIVERSAL_SUFFIX)).is_dir():
        verify_checkpoint(save_dir / (tag + UNIVERSAL_SUFFIX))
    return ResumePoint(save_dir, tag, state, universal=True)


def convert_to_universal(save_dir: Path, tag: str) -> None:
    """Run DeepSpeed's `ds_to_universal` on `save_dir/tag` once (rank 0), publishing `<tag>_universal` atomically.

    `--inject_missing_state`: plain (non-Megatron) models carry no universal-checkpoint metadata of their own. The
    source is verified first; the conversion gets its own sha256 manifest before it is published.
    """
    target = save_dir / (tag + UNIVERSAL_SUFFIX)
    if target.is_dir():
        verify_checkpoint(target)
        return
    verify_checkpoint(save_dir / tag)
    staging = save_dir / f".{tag}{UNIVERSAL_SUFFIX}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(save_dir / tag),
        "--output_folder",
        str(staging),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    logger.info("converting %s to a universal checkpoint (world size or ZeRO stage changed)", save_dir / tag)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(
            f"{save_dir / tag}: DeepSpeed's universal-checkpoint conversion failed:\n{result.stderr[-3000:]}"
        )
    write_checkpoint_manifest(staging)
    staging.rename(target)
    atomic_write_text(save_dir / f"{LATEST}{UNIVERSAL_SUFFIX}", target.name)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's RNG states (rank 0's when the checkpoint came from fewer ranks)."""
    if not states:
        return
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _failed_file(error: BaseException, directory: Path) -> Path:
    """The file a failed save was writing: the one the error names, else the newest file of the checkpoint (torch's
    writer names none), else the checkpoint directory."""
    named = getattr(error, "filename", None)
    if named:
        return Path(named)
    written = [path for path in directory.rglob("*") if path.is_file()] if directory.is_dir() else []
    return max(written, key=lambda path: path.stat().st_mtime_ns) if written else directory


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() or (not os.path.ismount(path) and path != path.parent):
        path = path.parent
    return path


def save_checkpoint(engine: Any, save_dir: Path, state: TrainState, keep: int) -> None:
    """Checkpoint on every rank, then publish it: DeepSpeed's files plus `trainer_state.json`, the sha256 manifest,
    and only then `latest` (so `latest` always names a complete, verifiable checkpoint); prune to the newest `keep`.

    A write that fails (full disk, quota) removes the unpublished checkpoint and raises a `CheckpointError` naming
    the file it was writing, its disk and the fix; `latest` and the checkpoints before it are untouched.
    """
    tag = checkpoint_tag(state.step)
    directory = save_dir / tag
    client_state = {"trainer": asdict(state), "rng_states": dist.gather_objects(rng_state())}
    previous = read_latest(save_dir)
    try:
        if dist.is_main():
            if directory.exists() and previous != tag:  # left by a save that crashed before it was published
                shutil.rmtree(directory)
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(directory / TRAINER_STATE, json.dumps(asdict(state), indent=2) + "\n")
        dist.barrier()
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
        if dist.is_main():
            write_checkpoint_manifest(directory)
            atomic_write_text(save_dir / LATEST, tag)
    except (OSError, RuntimeError, PipelineError) as error:
        if isinstance(error, RuntimeError) and not is_write_failure(error):
            raise
        # infra.atomic's writers name their file already; DeepSpeed's torch.save does not: find it
        reason = error if isinstance(error, PipelineError) else storage_error(error, _failed_file(error, directory))
        message = (
            f"{reason}; the disk is the one mounted at {_mount_point(directory)}; the run resumes from the last "
            f"complete checkpoint ({save_dir / previous if previous else 'none yet'})"
        )
        if previous != tag:
            shutil.rmtree(directory, ignore_errors=True)
        raise CheckpointError(message) from error
    if dist.is_main():
        _prune(save_dir, tag, keep)
    dist.barrier()
    logger.info("checkpoint %s (step %d, sample position %d)", directory, state.step, state.position)


def _prune(save_dir: Path, published: str, keep: int) -> None:
    """After publishing `published`: drop checkpoints after it (a timeline abandoned by a resume from an earlier
    one) and all but the newest `keep` complete ones up to it (0 keeps all). Checkpoints without a manifest
    before it are never touched."""
    tags = sorted(path.name for path in save_dir.glob("step-*") if not path.name.endswith(UNIVERSAL_SUFFIX))
    complete = [tag for tag in tags if tag <= published and (save_dir / tag / CHECKPOINT_MANIFEST).is_file()]
    doomed = [tag for tag in tags if tag > published] + (complete[:-keep] if keep > 0 else [])
    for old in doomed:
        shutil.rmtree(save_dir / old, ignore_errors=True)
        shutil.rmtree(save_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)


def load_checkpoint_weights(save_dir: Path, tag: str) -> dict[str, Tensor]:
    """Full fp32 weights of a training checkpoint, after `verify_checkpoint`: consolidated from ZeRO shards by
    DeepSpeed, or read from a ZeRO-0 file with `torch.load(weights_only=True)`."""
    directory = save_dir / tag
    verify_checkpoint(directory)
    if any(directory.glob("*optim_states.pt")):  # ZeRO ≥ 1 or bf16: fp32 weights live in the optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    states = directory / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"{directory}: not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt)")
    return torch.load(states, map_location="cpu", weights_only=True)["module"]
