"""`student.init`: resolving the student shape (scratch defaults, pretrained directory, carved from the teacher) and
building the student from it, LoRA included; a carve by layer importance is recorded so a resume needs no
calibration."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from pipeline import students
from pipeline.config import Config, ConfigError, config_from_dict, load_config
from pipeline.data.prepare import prepare_dataset
from pipeline.models.capture import CAPTURE_ATTENTION, AttentionCapture
from pipeline.models.loading import TINY_CORPUS, build_student, load_teacher, write_tiny_teacher
from pipeline.students import calibration, carve
from pipeline.students.carved import RECORD_FILE
from pipeline.students.importance import measure_importance
from pipeline.targets.kinds.selective import SELECTION_SAMPLES


@dataclass
class Targets:
    """What a carve reads of the run's `TargetSource`: the α statistics and the selective heads."""

    alpha_stats: dict = field(default_factory=dict)
    selected_heads: dict = field(default_factory=dict)


CORPUS = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def llama_data(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("llama_data")
    prepare_dataset([str(CORPUS)], tiny_llama_dir, output, seq_len=16, val_fraction=0.1, num_proc=1, seed=0)
    return output


@pytest.fixture(scope="module")
def gpt2_data(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("gpt2_data")
    prepare_dataset([str(CORPUS)], tiny_gpt2_dir, output, seq_len=16, val_fraction=0.1, num_proc=1, seed=0)
    return output


def make_config(teacher: Path, data: Path, output: Path, student: dict[str, Any], **sections: Any) -> Config:
    values = {
        "teacher": {"path": str(teacher), "dtype": "float32"},
        "data": {"output_dir": str(data)},
        "cache": {"batch_size": 4},
        "train": {"output_dir": str(output)},
        "student": {"calibration_samples": 8, **student},
        **sections,
    }
    return config_from_dict(values)


def shape(config: Config) -> tuple[int | None, ...]:
    return tuple(getattr(config.student, key) for key in students.SHAPE_KEYS)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 380, (3, 16), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# Scratch


def test_scratch_resolution_keeps_todays_defaults(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    llama = students.resolve(make_config(tiny_llama_dir, tmp_path, tmp_path, {}))
    assert shape(llama) == (4, 384, 3, 3, 768)  # the teacher's MLP ratio 96 / 48
    gpt2 = students.resolve(make_config(tiny_gpt2_dir, tmp_path, tmp_path, {"num_heads": 4}))
    assert shape(gpt2) == (4, 384, 4, 4, 1536)
    tiny_yaml = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    tiny = students.resolve(load_config(tiny_yaml, [f"teacher.path={tiny_llama_dir}"]))
    assert shape(tiny) == (2, 48, 3, 1, 96)
    assert students.resolve(llama) == llama


def test_scratch_student_is_todays_student(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Same weights as `models.build_student` with the shape keys left to their old defaults (KV and MLP None)."""
    config = students.resolve(make_config(tiny_llama_dir, tmp_path, tmp_path, {"num_layers": 2, "hidden_size": 48}))
    teacher_config = AutoConfig.from_pretrained(tiny_llama_dir)
    built = students.build_student_model(config, teacher_config)
    before = build_student(teacher_config, num_layers=2, hidden_size=48, num_heads=3, seed=0)
    assert built.state_dict().keys() == before.state_dict().keys()
    assert all(torch.equal(value, before.state_dict()[key]) for key, value in built.state_dict().items())


@pytest.mark.parametrize(
    ("student", "named"),
    [
        ({"hidden_size": 40, "num_heads": 3}, r"student\.hidden_size: got 40, expected a multiple"),
        ({"hidden_size": 30, "num_heads": 6}, r"student\.hidden_size: got 30, expected an even head dim"),
        ({"num_heads": 4, "num_kv_heads": 3}, r"student\.num_kv_heads: got 3"),
    ],
)
def test_scratch_shape_errors_name_the_key(student: dict, named: str, tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=named):
        students.resolve(config_from_dict({"teacher": {"path": str(tiny_llama_dir)}, "student": student}))


# --------------------------------------------------------------------------------------------------------------------
# Carved from the teacher: resolution


def test_teacher_resolution(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    def resolved(teacher: Path, **student: Any) -> tuple[int | None, ...]:
        return shape(students.resolve(make_config(teacher, tmp_path, tmp_path, {"init": "teacher", **student})))

    with pytest.raises(ConfigError, match=r"student\.num_layers: got null"):
        resolved(tiny_llama_dir)
    every_layer = make_config(
        tiny_llama_dir, tmp_path, tmp_path, {"init": "teacher"}, distill={"layer_map": [0, 1, 2, 3]}
    )
    assert shape(students.resolve(every_layer)) == (4, 48, 6, 2, 96)
    assert resolved(tiny_llama_dir, num_layers=2, num_heads=3) == (2, 48, 3, 1, 96)
    assert resolved(tiny_llama_dir, num_layers=2, num_heads=4, hidden_size=24) == (2, 24, 4, 2, 96)
    assert resolved(tiny_gpt2_dir, num_layers=2, num_heads=2) == (2, 32, 2, 2, 256)
    for teacher, student, named in [
        (tiny_gpt2_dir, {"num_heads": 2, "hidden_size": 48}, r"student\.hidden_size: got 48, expected 32"),
        (tiny_llama_dir, {"hidden_size": 60}, r"student\.hidden_size: got 60, expected at most the teacher's 48"),
        (tiny_llama_dir, {"intermediate_size": 200}, r"student\.intermediate_size: got 200"),
        (tiny_llama_dir, {"num_layers": 5, "carve_layers": "importance"}, r"student\.num_layers: got 5"),
        (tiny_llama_dir, {"num_layers": 6}, r"distill\.layer_map"),
    ]:
        with pytest.raises(ConfigError, match=named):
            resolved(teacher, **{"num_layers": 2, **student})


# --------------------------------------------------------------------------------------------------------------------
# Pretrained directory


def test_pretrained_directory_gives_the_shape_and_weights(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = students.resolve(make_config(tiny_gpt2_dir, tmp_path, tmp_path, {"init": str(tiny_gpt2_dir)}))
    assert shape(config) == (4, 64, 4, 4, 256)
    model = students.build_student_model(config, AutoConfig.from_pretrained(tiny_gpt2_dir))
    teacher = load_teacher(tiny_gpt2_dir)
    assert model.training and model.config.attn_pdrop == 0.0  # dropout off, as for every student
    assert model.config._attn_implementation == CAPTURE_ATTENTION
    assert all(torch.equal(value, teacher.state_dict()[key]) for key, value in model.state_dict().items())
    with pytest.raises(ConfigError, match=r"student\.num_heads: got 2, but the pretrained student .* has 4"):
        students.resolve(make_config(tiny_gpt2_dir, tmp_path, tmp_path, {"init": str(tiny_gpt2_dir), "num_heads": 2}))


def test_pretrained_directory_errors_name_student_init(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for init, message in [
        (tmp_path / "missing", r"student\.init: .*missing.* is neither 'scratch', 'teacher' nor an existing directory"),
        (empty, r"student\.init: .*empty.* holds no config\.json"),
        (tiny_gpt2_dir, r"student\.init: .* is a gpt2 model .*expected the teacher's family"),
    ]:
        with pytest.raises(ConfigError, match=message):
            students.resolve(make_config(tiny_llama_dir, tmp_path, tmp_path, {"init": str(init)}))


def test_pretrained_student_with_another_tokenizer_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    other = write_tiny_teacher(
        tmp_path / "other", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, corpus=TINY_CORPUS.upper()
    )
    config = make_config(tiny_llama_dir, tmp_path, tmp_path, {"init": str(other)})
    with pytest.raises(ConfigError) as error:
        students.resolve(config)
    message = str(error.value)
    assert "student.init" in message and "tokenises differently" in message and "pipeline" in message
    no_tokenizer = tmp_path / "weights_only"
    shutil.copytree(other, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with pytest.raises(ConfigError, match=r"student\.init: .* holds none of the tokenizer files"):
        students.resolve(make_config(tiny_llama_dir, tmp_path, tmp_path, {"init": str(no_tokenizer)}))


def test_pretrained_student_with_a_resaved_teacher_tokenizer_is_accepted(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A tokenizer saved again by transformers (which writes loader settings such as `is_local` into
    tokenizer_config.json) tokenises as the teacher's: accepted, though its files' bytes differ; one more special
    token makes it differ and is refused, naming what differs."""
    student = tmp_path / "student"
    shutil.copytree(tiny_llama_dir, student)
    tokenizer = AutoTokenizer.from_pretrained(student, local_files_only=True)
    tokenizer.save_pretrained(student)
    assert (student / "tokenizer_config.json").read_bytes() != (tiny_llama_dir / "tokenizer_config.json").read_bytes()
    students.resolve(make_config(tiny_llama_dir, tmp_path, tmp_path, {"init": str(student)}))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tokenizer.save_pretrained(student)
    with pytest.raises(ConfigError, match=r"student\.init: .* tokenises differently .*added tokens"):
        students.resolve(make_config(tiny_llama_dir, tmp_path, tmp_path, {"init": str(student)}))


# --------------------------------------------------------------------------------------------------------------------
# Carved from the teacher: building


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("head_init", ["prune", "merge"])
def test_carved_student_of_the_teachers_shape_is_the_teacher(
    family: str, head_init: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    teacher_dir = request.getfixturevalue(f"tiny_{family}_dir")
    data = request.getfixturevalue(f"{family}_data")
    config = students.resolve(
        make_config(
            teacher_dir,
            data,
            tmp_path,
            {"init": "teacher", "head_init": head_init},
            distill={"layer_map": [0, 1, 2, 3]},
        )
    )
    model = students.build_student_model(config, AutoConfig.from_pretrained(teacher_dir)).eval()
    assert model.config._attn_implementation == CAPTURE_ATTENTION
    teacher = load_teacher(teacher_dir)
    assert torch.equal(model(input_ids=ids()).logits, teacher(input_ids=ids()).logits)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["teacher_layers"] == [0, 1, 2, 3] and record["head_init"] == head_init
    assert record["carve_seconds"] >= 0 and len(record["block_importance"]) == 4


def test_linear_fill_is_applied_and_recorded(tiny_llama_dir: Path, llama_data: Path, tmp_path: Path) -> None:
    student = {"init": "teacher", "num_layers": 2, "carve_fill": "linear", "carve_fill_ridge": 0.5}
    config = students.resolve(make_config(tiny_llama_dir, llama_data, tmp_path, student, distill={"layer_map": [0, 2]}))
    filled = students.build_student_model(config, AutoConfig.from_pretrained(tiny_llama_dir)).eval()
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["carve_fill"] == "linear" and record["carve_fill_ridge"] == 0.5
    assert [fill["teacher_layers"] for fill in record["fills"]] == [[0, 1], [2, 3]]
    assert all(after < before for before, after in (fill["relative_error"] for fill in record["fills"]))
    plain_config = students.resolve(
        make_config(
            tiny_llama_dir,
            llama_data,
            tmp_path / "plain",
            {**student, "carve_fill": "none"},
            distill={"layer_map": [0, 2]},
        )
    )
    plain = students.build_student_model(plain_config, AutoConfig.from_pretrained(tiny_llama_dir)).eval()
    assert json.loads((tmp_path / "plain" / RECORD_FILE).read_text())["fills"] == []
    assert not torch.equal(filled(input_ids=ids()).logits, plain(input_ids=ids()).logits)


@pytest.mark.parametrize("ridge", [0, -1.0, float("inf")])
def test_carve_fill_ridge_must_be_positive_and_finite(ridge: float, tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"student\.carve\.fill_ridge: got .*expected a finite ridge strength > 0"):
        config_from_dict({"teacher": {"path": str(tiny_llama_dir)}, "student": {"carve_fill_ridge": ridge}})


def test_merge_takes_alpha_from_the_cache_statistics(
    tiny_llama_dir: Path, llama_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """6 heads → 3: groups [0, 1], [2, 3], [4, 5]; layer 1 has cached α, layer 3 none (uniform, with a warning)."""
    config = students.resolve(
        make_config(
            tiny_llama_dir,
            llama_data,
            tmp_path,
            {"init": "teacher", "head_init": "merge", "num_heads": 3, "num_kv_heads": 1},
            distill={"layer_map": [1, 3]},
        )
    )
    alpha = [0.9, 0.1, 0.25, 0.75, 0.5, 0.5]
    decoy = {"per_teacher_head_mean": [0.0] * 6}  # another head count or squeeze: not this student's α
    stats = {"L1.H3.shd": {"per_teacher_head_mean": alpha}, "L1.H2.shd": decoy, "L3.H3.uniform": decoy}
    with caplog.at_level(logging.WARNING, logger="pipeline.students.carved"):
        model = students.build_student_model(
            config, AutoConfig.from_pretrained(tiny_llama_dir), targets=Targets(alpha_stats=stats)
        )
    assert "teacher layers [3]" in caplog.text
    teacher = load_teacher(tiny_llama_dir)
    for student_layer, teacher_layer, weights in [(0, 1, alpha), (1, 3, [0.5] * 6)]:
        source = teacher.model.layers[teacher_layer].self_attn.q_proj.weight.double().reshape(6, 8, 48)
        expected = torch.cat(
            [weights[2 * g] * source[2 * g] + weights[2 * g + 1] * source[2 * g + 1] for g in range(3)]
        )
        carved = model.model.layers[student_layer].self_attn.q_proj.weight.double()
        torch.testing.assert_close(carved, expected, rtol=1e-6, atol=1e-7)


def test_importance_carve_sets_the_layer_map_and_resumes_without_calibration(
    tiny_llama_dir: Path, llama_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_config(
        tiny_llama_dir,
        llama_data,
        tmp_path,
        {"init": "teacher", "carve_layers": "importance", "num_layers": 2, "num_heads": 3, "intermediate_size": 64},
    )
    config = students.resolve(raw)
    teacher = load_teacher(tiny_llama_dir)
    importance = measure_importance(teacher, calibration.calibration_ids(raw), batch_size=4)
    assert config.distill.layer_map == carve.select_layers(importance.block, 2)
    assert students.resolve(config) == config
    teacher_config = AutoConfig.from_pretrained(tiny_llama_dir)
    model = students.build_student_model(config, teacher_config)
    assert json.loads((tmp_path / RECORD_FILE).read_text())["teacher_layers"] == config.distill.layer_map

    calibration._MEMO.clear()

    def no_calibration(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("calibration ran on resume")

    monkeypatch.setattr(calibration, "measure_importance", no_calibration)
    assert students.resolve(raw) == config
    structure = students.build_student_model(config, teacher_config, structure_only=True)
    assert structure.config._attn_implementation == CAPTURE_ATTENTION
    assert {key: value.shape for key, value in structure.state_dict().items()} == {
        key: value.shape for key, value in model.state_dict().items()
    }
    other = [layer for layer in range(4) if layer not in config.distill.layer_map][:2]
    with pytest.raises(ConfigError, match=r"distill\.layer_map: got .* keeps teacher layers"):
        students.resolve(
            make_config(
                tiny_llama_dir,
                llama_data,
                tmp_path,
                {"init": "teacher", "carve_layers": "importance", "num_layers": 2},
                distill={"layer_map": other},
            )
        )


def test_lora_on_a_carved_student(tiny_llama_dir: Path, llama_data: Path, tmp_path: Path) -> None:
    config = students.resolve(
        make_config(
            tiny_llama_dir,
            llama_data,
            tmp_path,
            {"init": "teacher", "num_layers": 2, "num_heads": 3, "lora": {"r": 4}},
        )
    )
    teacher_config = AutoConfig.from_pretrained(tiny_llama_dir)
    model = students.build_student_model(config, teacher_config)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    structure = students.build_student_model(config, teacher_config, structure_only=True)
    assert structure.state_dict().keys() == model.state_dict().keys()
    overridden = config_from_dict(config.to_dict(), ["student.lora.r=8", "student.lora.target_modules=[q_proj]"])
    assert overridden.student.lora.r == 8 and overridden.student.lora.target_modules == ["q_proj"]
    assert overridden.student.num_heads == 3  # the rest of student is kept


@pytest.mark.parametrize("head_init", ["prune", "merge"])
def test_selective_matching_carves_each_head_from_its_target_head(
    head_init: str, tiny_llama_dir: Path, llama_data: Path, tmp_path: Path
) -> None:
    """`attn_match: selective`: student head j is the cache's j-th selected teacher head (q and o slices copied,
    whatever `head_init`), the one KV head the mean of the teacher KV heads those heads read (6 heads on 2 KV:
    heads 0-2 read KV 0, 3-5 read KV 1), checked against float64 slices of the teacher."""
    config = students.resolve(
        make_config(
            tiny_llama_dir,
            llama_data,
            tmp_path,
            {"init": "teacher", "head_init": head_init, "num_heads": 3, "num_kv_heads": 1},
            distill={"layer_map": [1, 3], "attn_match": "selective"},
        )
    )
    selected = {"L1.H3": [0, 3, 5], "L3.H3": [1, 2, 4], "L1.H2": [0, 1]}
    model = students.build_student_model(
        config,
        AutoConfig.from_pretrained(tiny_llama_dir),
        targets=Targets(
            alpha_stats={"L1.H3.shd": {"per_teacher_head_mean": [0.9, 0.1, 0.25, 0.75, 0.5, 0.5]}},
            selected_heads=selected,
        ),
    )
    teacher = load_teacher(tiny_llama_dir)
    for student_layer, teacher_layer, heads, kv_weights in [
        (0, 1, [0, 3, 5], [1 / 3, 2 / 3]),
        (1, 3, [1, 2, 4], [2 / 3, 1 / 3]),
    ]:
        source, carved = teacher.model.layers[teacher_layer].self_attn, model.model.layers[student_layer].self_attn
        q = source.q_proj.weight.double().reshape(6, 8, 48)
        o = source.o_proj.weight.double().reshape(48, 6, 8)
        k = source.k_proj.weight.double().reshape(2, 8, 48)
        assert torch.equal(carved.q_proj.weight.double(), q[heads].reshape(24, 48))
        assert torch.equal(carved.o_proj.weight.double(), o[:, heads].reshape(48, 24))
        expected_k = kv_weights[0] * k[0] + kv_weights[1] * k[1]
        torch.testing.assert_close(carved.k_proj.weight.double(), expected_k, rtol=1e-6, atol=1e-7)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["heads"] == [[[0], [3], [5]], [[1], [2], [4]]]
    assert record["head_groups"].startswith("selective") and record["merge_alpha_layers"] is None


def test_selective_heads_without_a_cache_are_chosen_as_the_cache_chooses(
    tiny_llama_dir: Path, llama_data: Path, tmp_path: Path
) -> None:
    """No manifest: the heads of the largest mean output share ‖A_h X_h‖ / Σ‖A X‖ on the first 16 train samples,
    against a float64 reference from the captured maps and dense value–output circuits."""
    config = students.resolve(
        make_config(
            tiny_llama_dir,
            llama_data,
            tmp_path,
            {"init": "teacher", "num_heads": 2},
            distill={"layer_map": [0, 2], "attn_match": "selective"},
            cache={"output_dir": str(tmp_path / "no_cache"), "batch_size": 4},
        )
    )
    students.build_student_model(config, AutoConfig.from_pretrained(tiny_llama_dir))
    teacher = load_teacher(tiny_llama_dir)
    samples = calibration.calibration_ids(config, SELECTION_SAMPLES)
    assert samples.shape[0] == SELECTION_SAMPLES
    with torch.no_grad(), AttentionCapture(teacher, [0, 2], circuits=True) as capture:
        teacher(input_ids=samples)
    expected = []
    for layer in (0, 2):
        norms = (capture.maps[layer].double() @ capture.circuits[layer].dense().double()).square().sum((-2, -1)).sqrt()
        shares = (norms / norms.sum(1, keepdim=True)).mean(0)
        expected.append([[head] for head in sorted(shares.argsort(descending=True)[:2].tolist())])
    assert json.loads((tmp_path / RECORD_FILE).read_text())["heads"] == expected
