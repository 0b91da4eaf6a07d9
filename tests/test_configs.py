"""Every shipped config parses and validates; bad keys and values are refused with the key's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, config_from_dict, load_config, load_yaml
from pipeline.study.layout import SECTION as STUDY_SECTION
from pipeline.study.layout import load_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    # a study config is a pipeline config plus its `study:` section, which `distill study` checks
    config = load_study(path)[1] if STUDY_SECTION in load_yaml(path.read_text()) else load_config(path)
    assert isinstance(config, Config)
    if config.deepspeed.preset:
        assert (CONFIGS.parent / config.deepspeed.preset).is_file(), config.deepspeed.preset


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_presets_are_json(path: Path) -> None:
    preset = json.loads(path.read_text())
    assert preset["zero_optimization"]["stage"] == int(path.stem.removeprefix("zero"))


def test_overrides_are_typed() -> None:
    config = config_from_dict(
        {}, ["student.num_heads=2", "train.lr=1", "distill.layer_map=[0, 3]", "student.num_layers=2"]
    )
    assert config.student.num_heads == 2
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.distill.layer_map == [0, 3]


@pytest.mark.parametrize(("written", "value"), [("1e-3", 1e-3), ("2E-4", 2e-4), ("+5.e+2", 500.0), (".5e1", 5.0)])
def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path, written: str, value: float) -> None:
    """YAML 1.1 reads `1e-3` as a string; from a file or an override, typed field or not, it is the float."""
    assert config_from_dict({}, [f"train.lr={written}"]).train.lr == value
    path = tmp_path / "config.yaml"
    path.write_text(f"train:\n  lr: {written}\n")
    assert load_config(path).train.lr == value
    with pytest.raises(ConfigError, match=r"train\.lr: got '1e-3x', expected float"):
        config_from_dict({}, ["train.lr=1e-3x"])
    with pytest.raises(ConfigError, match=r"train\.lr: got '1e-3', expected float"):
        config_from_dict({}, ["train.lr='1e-3'"])
    nested = config_from_dict({}, [f"deepspeed.overrides={{optimizer: {{params: {{eps: {written}}}}}}}"])
    assert nested.deepspeed.overrides["optimizer"]["params"]["eps"] == value


@pytest.mark.parametrize(
    ("values", "overrides", "named"),
    [
        ({"student": {"num_head": 3}}, [], "student.num_head"),
        ({"bogus": {}}, [], "bogus"),
        ({}, ["train.max_step=3"], "train.max_step"),
        ({"distill": {"squeeze": "average"}}, [], "distill.attn.squeeze"),
        ({"distill": {"attn_loss": "l1"}}, [], "distill.attn.loss"),
        ({"distill": {"layer_map": "middle"}}, [], "distill.layer_map"),
        ({"student": {"num_layers": 2}, "distill": {"layer_map": [1, 2, 3]}}, [], "distill.layer_map"),
        ({"student": {"hidden_size": 100, "num_heads": 3}}, [], "student.hidden_size"),
        ({"student": {"num_heads": 4, "num_kv_heads": 3}}, [], "student.num_kv_heads"),
        ({"distill": {"attn_temperature": 0}}, [], "distill.attn.temperature"),
        ({"distill": {"w_kd": -1}}, [], "distill.kd.weight"),
        ({"cache": {"head_counts": [2, "three"]}}, [], "cache.head_counts[1]"),
        ({"cache": {"head_counts": [2, 2]}}, [], "cache.head_counts"),
        ({"cache": {"encoding": "sparse"}}, [], "cache.encoding"),
        ({"cache": {"encoding": "topk", "attn_row_fraction": 0}}, [], "cache.attn_row_fraction: got 0"),
        ({"cache": {"encoding": "topk", "attn_row_fraction": 1.5}}, [], "cache.attn_row_fraction: got 1.5"),
        ({"cache": {"attn_row_fraction": 0.5}}, [], "cache.attn_row_fraction: got 0.5, expected 1.0 with cache.enc"),
        ({"cache": {"attn_value_bits": 8}}, [], "cache.attn_value_bits: got 8, expected 16 with cache.encoding: dense"),
        ({"cache": {"attn_value_bits": 4}}, [], "cache.attn_value_bits: got 4, expected 16 | 8"),
        ({"cache": {"logit_value_bits": 12}}, [], "cache.logit_value_bits: got 12, expected 16 | 8"),
        ({"cache": {"encoding": "topk", "attn_top_m": 300}}, [], "cache.attn_top_m: got 300, expected at most"),
        ({"data": {"val_fraction": 1.5}}, [], "data.val_fraction"),
        ({"train": {"micro_batch_size": 0}}, [], "train.micro_batch_size"),
        ({"train": {"precision": "fp16"}}, [], "train.precision"),
        ({"deepspeed": {"zero_stage": 4}}, [], "deepspeed.zero_stage"),
        ({"mlflow": {"enabled": "yes"}}, [], "mlflow.enabled"),
    ],
)
def test_errors_name_the_key(values: dict, overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(values, overrides)
    assert named in str(error.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("student:\n  num_heads: two\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: student\.num_heads: got 'two', expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(CONFIGS / "tiny.yaml", ["student.num_heads"])


def test_dump_round_trips() -> None:
    import yaml

    config = load_config(CONFIGS / "tiny.yaml")
    assert config_from_dict(yaml.safe_load(config.dump())) == config
    assert config.flat()["student.num_heads"] == config.student.num_heads


DUPLICATES = {
    "a second section": (
        "train:\n  lr: 0.5\n  output_dir: mine\nstudent:\n  num_heads: 3\ntrain:\n  max_steps: 3\n",
        "key 'train' appears twice (line 1 and line 6)",
    ),
    "a nested key": (
        "train:\n  lr: 0.5\n  max_steps: 3\n  lr: 0.1\n",
        "key 'train.lr' appears twice (line 2 and line 4)",
    ),
    "a flow mapping": (
        "train: {lr: 1, lr: 2}\n",
        "key 'train.lr' appears twice (line 1, column 9 and line 1, column 16)",
    ),
    "a mapping in a list": (
        "run:\n  variants:\n    a: [train.lr=1]\ndeepspeed:\n  overrides:\n    x: [{y: 1, y: 2}]\n",
        "key 'deepspeed.overrides.x[0].y' appears twice",
    ),
}


@pytest.mark.parametrize("case", DUPLICATES, ids=str)
def test_a_key_given_twice_is_refused_naming_the_file_the_key_and_both_lines(tmp_path: Path, case: str) -> None:
    """PyYAML keeps the last of two equal keys silently: a second `train:` block would drop the first one's lr."""
    text, expected = DUPLICATES[case]
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {expected}"), str(error.value)
    assert "merge the two into one" in str(error.value)


def test_a_study_file_with_a_key_given_twice_is_refused_naming_the_file(tmp_path: Path) -> None:
    text = (CONFIGS / "quality.yaml").read_text().replace("  ce: {weight: 1.0}\n", "  ce: {weight: 1.0}\n  ce: {}\n", 1)
    path = tmp_path / "study.yaml"
    path.write_text(text)
    line = text.splitlines().index("  ce: {weight: 1.0}") + 1
    with pytest.raises(
        ConfigError, match=rf"^{path}: key 'distill\.ce' appears twice \(line {line} and line {line + 1}"
    ):
        load_study(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("teacher: 5\n", "teacher: got an int (5), expected a mapping of its keys (dtype, path, source)"),
        ("train: [lr, 1]\n", "train: got a list (['lr', 1]), expected a mapping of its keys"),
        ("- train\n- student\n", "the document is a list (['train', 'student']), expected a mapping of sections"),
        ("just words\n", "the document is a str ('just words'), expected a mapping of sections (teacher, student"),
        ("? [a, b]\n: 1\n", "not valid YAML: found unhashable key (while constructing a mapping) at line 1, column 3"),
        ("train:\n  lr: [1\nstudent: 3\n", "not valid YAML: expected ',' or ']', but got ':'"),
    ],
)
def test_a_document_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {expected}"), str(error.value)
    assert "\n" not in str(error.value)
