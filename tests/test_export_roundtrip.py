"""The export of `distill train` fed back as `student.init`: export → student.init → train → eval, in this process on
the tiny teacher's cache. The export carries the teacher's tokenizer files byte for byte, so its tokenizer
fingerprint is the teacher's (a re-save through transformers adds `is_local`/`local_files_only` to
tokenizer_config.json, and the pipeline used to refuse its own export as a student)."""

from __future__ import annotations

import math

import pytest

from pipeline.data.prepare import TOKENIZER_FILES, tokenizer_fingerprint
from pipeline.stages.evaluate import eval_stage
from pipeline.stages.train import train_stage
from pipeline.training.checkpoints import STUDENT
from tests.train_fixtures import FAST_TRAIN, TinyCache, build_tiny_cache

pytestmark = [pytest.mark.slow]

SHORT = (*FAST_TRAIN, "train.max_steps=2", "train.eval_every=0", "train.save_every=2", "mlflow.enabled=false")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    return build_tiny_cache(tmp_path_factory.mktemp("roundtrip"))


def test_an_exported_student_trains_again_and_evaluates(tiny_cache: TinyCache) -> None:
    first = tiny_cache.root / "first"
    train_stage(tiny_cache.config(first, *SHORT))
    export, teacher = first / STUDENT, tiny_cache.root / "teacher"
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            assert (export / name).read_bytes() == (teacher / name).read_bytes(), name
    assert tokenizer_fingerprint(export) == tokenizer_fingerprint(teacher)

    second = tiny_cache.root / "second"
    metrics = train_stage(tiny_cache.config(second, *SHORT, f"student.init={export}"))
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics
    evaluated = eval_stage(tiny_cache.config(second, *SHORT, f"student.init={export}"))
    assert "eval/ppl" in evaluated and all(math.isfinite(value) for value in evaluated.values()), evaluated
    assert (second / "eval.json").is_file()
