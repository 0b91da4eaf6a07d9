"""Training runs of students that start somewhere (`student.init`), on the tiny teacher's real cache.

Every init kind resumes exactly: N steps, then a resumed run to N + M, give the losses and sample positions of N + M
uninterrupted steps (fp32, one rank, in this process), and the resumed run neither carves nor calibrates again.
ZeRO-3 + LoRA on 2 ranks (one DeepSpeed launch for every 2-rank run of this file): only the adapters train, a resume
restores the frozen base the structure-only rebuild lacks, and the export is a plain HF model whose weights are the
base plus the scaled adapter product, loadable without this package.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pipeline import students
from pipeline.stages.train import train_stage as train
from pipeline.students import calibration
from pipeline.students.carved import RECORD_FILE
from pipeline.students.lora import ADAPTER_BASE_DIR, ADAPTER_DIR
from tests.train_fixtures import FAST_TRAIN, TinyCache, read_metrics, run_two_ranks

pytestmark = [pytest.mark.slow]

CARVED = ("student.init=teacher",)
KINDS: dict[str, tuple[str, ...]] = {
    "scratch": (),
    "pretrained": ("student.init={pretrained}",),
    "teacher_prune": (*CARVED, "student.hidden_size=24", "student.intermediate_size=64"),
    "teacher_merge": (*CARVED, "student.carve.heads=merge"),
    "teacher_lora": (*CARVED, "student.lora.r=4"),
    "teacher_importance": (*CARVED, "student.carve.layers=importance"),
    "teacher_selective": (*CARVED, "distill.attn.match=selective"),
}
"""Every `student.init` kind (pretrained: a directory written by the `pretrained` fixture) and every carve option:
prune with the MLP and the width pruned too, merge with the cache's α, LoRA on the carve, layers by importance,
heads from the cache's selective targets."""
STEPS = ("train.eval_every=0", "train.save_every=2", "mlflow.enabled=false")
LORA_ZERO3 = (*CARVED, "student.lora.r=4", "deepspeed.zero_stage=3", *FAST_TRAIN, *STEPS)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    """The tiny teacher, its data, and a cache of every teacher layer (a carve by importance may keep any two) with
    SHD and selective targets for 2 and 3 heads."""
    from pipeline.stages.cache import cache_stage
    from pipeline.stages.prepare import prepare_stage
    from pipeline.stages.teacher import teacher_stage

    cache = TinyCache(tmp_path_factory.mktemp("student_runs"))
    config = cache.config(cache.root / "runs", "cache.layers=[0, 1, 2, 3]", "cache.attn_targets=[shd, selective]")
    teacher_stage(config)
    prepare_stage(config)
    cache_stage(config)
    return cache


@pytest.fixture(scope="module")
def pretrained(tiny_cache: TinyCache) -> Path:
    """A pretrained student of the tiny config's shape (another seed than scratch) with the teacher's tokenizer files
    (byte for byte: the tokenizer fingerprint hashes the files)."""
    from transformers import AutoConfig

    from pipeline.data.prepare import TOKENIZER_FILES
    from pipeline.models.loading import build_student

    teacher = tiny_cache.root / "teacher"
    directory = tiny_cache.root / "pretrained"
    model = build_student(
        AutoConfig.from_pretrained(teacher), num_layers=2, hidden_size=48, num_heads=3, num_kv_heads=1, seed=7
    )
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copyfile(teacher / name, directory / name)
    return directory


def _config(tiny_cache: TinyCache, output_dir: Path, kind: str, pretrained: Path, *extra: str) -> Any:
    overrides = [override.format(pretrained=pretrained) for override in KINDS[kind]]
    return tiny_cache.config(output_dir, *FAST_TRAIN, *STEPS, *overrides, *extra)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_init_kind_resumes_exactly(
    kind: str, tiny_cache: TinyCache, pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 steps, a resumed run to 4 = 4 uninterrupted steps (losses to 1e-6, positions); no carve on resume."""
    train(_config(tiny_cache, tmp_path / "whole", kind, pretrained, "train.max_steps=4"))
    train(_config(tiny_cache, tmp_path / "halves", kind, pretrained, "train.max_steps=2"))
    if kind.startswith("teacher"):
        first_carve = json.loads((tmp_path / "halves" / RECORD_FILE).read_text())

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resumed run carved or calibrated again")

    calibration._MEMO.clear()
    monkeypatch.setattr("pipeline.students.carved._carve", refuse)
    monkeypatch.setattr(calibration, "measure_importance", refuse)
    train(_config(tiny_cache, tmp_path / "halves", kind, pretrained, "train.max_steps=4"))

    whole, whole_eval = read_metrics(tmp_path / "whole")
    halves, halves_eval = read_metrics(tmp_path / "halves")
    assert sorted(halves) == sorted(whole) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert halves[step]["position"] == whole[step]["position"] == 4 * (step - 1)
        for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/loss_attn", "train/lr"):
            assert halves[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-6), (step, key)
    assert halves_eval[4]["eval/ppl"] == pytest.approx(whole_eval[4]["eval/ppl"], rel=1e-6)
    assert whole[1]["train/loss"] != pytest.approx(whole[4]["train/loss"], rel=1e-3)  # it trained
    if kind == "teacher_importance":
        assert (
            json.loads((tmp_path / "whole" / RECORD_FILE).read_text())["teacher_layers"]
            == (first_carve["teacher_layers"])
        )
    if kind == "teacher_selective":
        from pipeline.targets.manifest import read_manifest

        selected = read_manifest(tiny_cache.root / "targets" / "train").selected_heads
        assert first_carve["heads"] == [[[head] for head in selected[f"L{layer}.H3"]] for layer in (1, 3)]


# --------------------------------------------------------------------------------------------------------------------
# ZeRO-3 + LoRA on two ranks


@pytest.fixture(scope="module")
def two_rank_runs(tiny_cache: TinyCache, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A teacher-carved LoRA student under ZeRO-3 on 2 ranks: 4 steps, and 2 steps resumed to 4 (one launch)."""
    root = tmp_path_factory.mktemp("lora_zero3")
    runs = [
        (root / "whole", "train.max_steps=4"),
        (root / "halves", "train.max_steps=2"),
        (root / "halves", "train.max_steps=4"),
    ]
    spec = [{"overrides": tiny_cache.overrides(directory, *LORA_ZERO3, steps)} for directory, steps in runs]
    (root / "runs.json").write_text(json.dumps(spec))
    run_two_ranks(root / "runs.json")
    return {"whole": root / "whole", "halves": root / "halves"}


@pytest.mark.multiprocess
def test_zero3_lora_on_two_ranks_trains_only_the_adapters_and_resumes(
    two_rank_runs: dict[str, Path], tiny_cache: TinyCache, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    whole, _ = read_metrics(two_rank_runs["whole"])
    halves, _ = read_metrics(two_rank_runs["halves"])
    for step in range(1, 5):
        assert halves[step]["position"] == whole[step]["position"] == 8 * (step - 1)
        assert halves[step]["train/loss"] == pytest.approx(whole[step]["train/loss"], rel=1e-6), step
    assert all(math.isfinite(record["train/loss"]) for record in whole.values())

    # The frozen base of the export is the carve itself, to the bit: only the adapters trained.
    config = students.resolve(tiny_cache.config(tmp_path, *LORA_ZERO3, "student.lora.r=0"))
    carved = students.build_student_model(config, AutoConfig.from_pretrained(tiny_cache.root / "teacher")).state_dict()
    adapter = two_rank_runs["whole"] / "student" / ADAPTER_DIR
    base = load_file(adapter / ADAPTER_BASE_DIR / "model.safetensors")
    assert base and all(torch.equal(tensor, carved[key]) for key, tensor in base.items())
    lora = load_file(adapter / "adapter_model.safetensors")
    assert any(key.endswith("lora_B.weight") and tensor.abs().max() > 0 for key, tensor in lora.items())

    # The merged export: base + (alpha / r) · B A in every adapted projection (float64 reference).
    settings = json.loads((adapter / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    merged = load_file(two_rank_runs["whole"] / "student" / "model.safetensors")
    assert not any("lora" in key for key in merged)
    adapted = [key.removesuffix(".lora_A.weight") for key in lora if key.endswith(".lora_A.weight")]
    assert len(adapted) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in 2 layers
    names = set()
    for prefix in adapted:
        name = prefix.removeprefix("base_model.model.") + ".weight"
        update = lora[f"{prefix}.lora_B.weight"].double() @ lora[f"{prefix}.lora_A.weight"].double()
        expected = base[name].double() + scale * update
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6)
        names.add(name)
    assert merged.keys() == base.keys()
    assert all(torch.equal(merged[key], base[key]) for key in merged.keys() - names)  # embeddings, norms


@pytest.mark.multiprocess
def test_merged_lora_export_loads_with_plain_transformers(two_rank_runs: dict[str, Path]) -> None:
    """In a process that never imports `pipeline`: the merged export generates, and computes what PEFT's adapter on
    its saved base computes."""
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "directory = sys.argv[1]\n"
        "merged = AutoModelForCausalLM.from_pretrained(directory).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(directory)\n"
        "prompt = tokenizer('The quick brown fox', return_tensors='pt')\n"
        "output = merged.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)\n"
        "assert output.shape[1] == prompt['input_ids'].shape[1] + 8, output.shape\n"
        "base = AutoModelForCausalLM.from_pretrained(directory + '/adapter/base')\n"
        "adapted = PeftModel.from_pretrained(base, directory + '/adapter').eval()\n"
        "with torch.no_grad():\n"
        "    a, b = merged(**prompt).logits, adapted(**prompt).logits\n"
        "    with adapted.disable_adapter():\n"
        "        c = adapted(**prompt).logits\n"
        "torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)\n"
        "assert (a - c).abs().max() > 1e-4, 'the adapters changed nothing'\n"
        "print('generated:', repr(tokenizer.decode(output[0])))\n"
    )
    directory = str(two_rank_runs["whole"] / "student")
    result = subprocess.run([sys.executable, "-c", script, directory], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated:" in result.stdout
