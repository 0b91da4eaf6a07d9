"""`distill prepare`: tokenize and pack the corpus with the teacher's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import fetch_shakespeare
from pipeline.infra.locks import output_lock
from pipeline.models.loading import check_seq_len, load_teacher_config


def prepare_stage(config: Config, *, overwrite: bool = False) -> dict[str, Any]:
    """`distill prepare`: tokenize and pack the corpus with the teacher's tokenizer; refuses a `data.seq_len` longer
    than the teacher's positions, and output prepared from other inputs unless `overwrite`. Holds the lock of
    `data.output_dir` while it writes: one writing job per directory."""
    with output_lock(config.data.output_dir, "data.output_dir", "distill prepare"):
        return _prepare(config, overwrite)


def _prepare(config: Config, overwrite: bool) -> dict[str, Any]:
    check_seq_len(load_teacher_config(config.teacher.path), config.data.seq_len)
    sources = []
    for source in config.data.sources:
        if source == "shakespeare":
            sources.append(str(fetch_shakespeare(Path(config.data.output_dir).parent / "shakespeare")))
        else:
            sources.append(source)
    return prepare_dataset(
        sources,
        Path(config.teacher.path),
        Path(config.data.output_dir),
        seq_len=config.data.seq_len,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        num_proc=config.data.num_proc,
        seed=config.data.seed,
        text_field=config.data.text_field,
        data_format=config.data.format,
        prompt_field=config.data.prompt_field,
        response_field=config.data.response_field,
        system_field=config.data.system_field,
        strict=config.data.strict,
        overwrite=overwrite,
    )
