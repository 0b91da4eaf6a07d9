"""Response evaluation of chat students (`pipeline.training.generations`): ROUGE-L against an independent LCS
reference, prompts and references cut from prepared chat data, the fixed-step greedy loop against HF `generate`, the
teacher's replies made once per run, the published generation file, and the config keys' refusals."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, config_from_dict
from pipeline.data.prepare import load_prepared, prepare_dataset
from pipeline.models.loading import load_teacher, load_tokenizer
from pipeline.reports.generations import GENERATIONS_DIR, ROW_FIELDS, generations_file
from pipeline.training import generations
from pipeline.training.generations import (
    ResponseEvaluator,
    cut_at_stop,
    greedy_continuation,
    held_out_prompts,
    publish_generations,
    rouge_l,
    stop_token_ids,
    teacher_generations,
)

CONVERSATIONS = [
    [
        ("user", "What does a head do?"),
        ("assistant", "It compares a query with every earlier key."),
        ("user", "And then?"),
        ("assistant", "It turns the scores into probabilities."),
    ],
    [("system", "Be brief."), ("user", "Why cache?"), ("assistant", "Teacher passes are costly.")],
    [("user", "Which split?"), ("assistant", "By sample id.")],
]


def _lcs_f1(reference: str, text: str) -> float:
    """ROUGE-L F1 written out: lowercase alphanumeric words, the longest common subsequence by dynamic programming,
    F = 2PR / (P + R) in float64."""
    ref, hyp = re.findall(r"[a-z0-9]+", reference.lower()), re.findall(r"[a-z0-9]+", text.lower())
    table = np.zeros((len(ref) + 1, len(hyp) + 1), dtype=np.float64)
    for i, word in enumerate(ref):
        for j, other in enumerate(hyp):
            table[i + 1, j + 1] = table[i, j] + 1 if word == other else max(table[i, j + 1], table[i + 1, j])
    common = table[-1, -1]
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return float(2 * precision * recall / (precision + recall))


def test_rouge_l_is_the_lcs_f_measure_on_lowercase_alphanumeric_words() -> None:
    """Hand-picked pairs (case, punctuation, order, empty text, words a stemmer would merge) and random word
    sequences: the scorer agrees with the float64 LCS reference to 1e-12."""
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "7", "Key", "key,"]
    rng = random.Random(0)
    pairs = [
        ("The cat sat on the mat.", "the cat, on a MAT"),
        ("a b c d", "d c b a"),
        ("", "anything at all"),
        ("something", ""),
        ("running dogs", "runs dog"),  # 0 without stemming
        ("It compares a query with every earlier key.", "It compares every key."),
    ]
    pairs += [
        (" ".join(rng.choices(words, k=rng.randint(1, 12))), " ".join(rng.choices(words, k=rng.randint(1, 12))))
        for _ in range(30)
    ]
    scores = rouge_l([reference for reference, _ in pairs], [text for _, text in pairs])
    expected = [_lcs_f1(reference, text) for reference, text in pairs]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    assert scores[4] == 0.0 and 0 < scores[0] < 1


def _prepared_chat(teacher_dir: Path, output: Path) -> Any:
    source = output.parent / "chat.jsonl"
    records = [{"messages": [{"role": role, "content": text} for role, text in turns]} for turns in CONVERSATIONS]
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    prepare_dataset(
        [str(source)], teacher_dir, output, seq_len=96, val_fraction=0.0, num_proc=1, seed=0, data_format="chat"
    )
    splits, _ = load_prepared(output)
    return splits["train"]


@pytest.fixture(scope="module")
def chat_rows(tiny_chat_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The prepared train split of `CONVERSATIONS` (in sample id order) with the tiny chat template."""
    return _prepared_chat(tiny_chat_teacher_dir, tmp_path_factory.mktemp("chat") / "packed")


def test_the_prompt_ends_with_the_assistant_header_and_the_reference_is_the_first_reply(
    chat_rows: Any, tiny_chat_teacher_dir: Path
) -> None:
    """Prompt = the conversation rendered up to the first reply with the generation prompt (the template's
    `<s>assistant` header included); reference = that reply's text, without its `</s>` end-of-turn token."""
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    prompts, truncated = held_out_prompts(chat_rows, tokenizer, count=10, max_prompt_tokens=96)
    assert truncated == 0 and [prompt.sample_id for prompt in prompts] == [0, 1, 2]
    for prompt, turns in zip(prompts, CONVERSATIONS, strict=True):
        messages = [{"role": role, "content": text} for role, text in turns]
        first_reply = next(at for at, message in enumerate(messages) if message["role"] == "assistant")
        rendered = tokenizer.apply_chat_template(messages[:first_reply], tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<s>assistant\n")
        assert prompt.prompt_ids == tokenizer(rendered, add_special_tokens=False).input_ids
        assert prompt.prompt == rendered
        assert prompt.reference == messages[first_reply]["content"]


def test_a_long_prompt_keeps_its_last_tokens_and_is_counted(chat_rows: Any, tiny_chat_teacher_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    whole, _ = held_out_prompts(chat_rows, tokenizer, count=2, max_prompt_tokens=96)
    cut, truncated = held_out_prompts(chat_rows, tokenizer, count=2, max_prompt_tokens=5)
    assert truncated == 2
    assert [prompt.prompt_ids for prompt in cut] == [prompt.prompt_ids[-5:] for prompt in whole]
    assert [prompt.reference for prompt in cut] == [prompt.reference for prompt in whole]


class CountingCalls:
    """Counts the forward calls of a model (what ZeRO-3 needs equal on every rank)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_fixed_step_loop_is_greedy_generate_cut_at_the_stop_token(
    family: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    """On a tiny random model: the loop's tokens are HF `generate(do_sample=False)`'s, with a stop token it never
    meets (all steps) and with one it meets mid-way (cut there); it makes exactly `steps` forward calls."""
    model = load_teacher(tiny_llama_dir if family == "llama" else tiny_gpt2_dir, dtype=torch.float32)
    steps = 12
    prompt = torch.randint(4, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    counter = CountingCalls(model)
    with torch.no_grad():
        ours = greedy_continuation(model, prompt, steps).tolist()
    assert counter.calls == steps and len(ours) == steps
    never = next(token for token in range(4, model.config.vocab_size) if token not in ours)
    met = ours[steps // 2]
    for stop in (never, met):
        with torch.no_grad():
            theirs = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=steps,
                eos_token_id=stop,
                pad_token_id=stop,
            )[0, prompt.shape[1] :].tolist()
        assert cut_at_stop(ours, [stop]) == cut_at_stop(theirs, [stop])
    assert cut_at_stop(ours, [never]) == ours
    assert len(cut_at_stop(ours, [met])) == ours.index(met) < steps


def test_the_stop_tokens_are_the_eos_of_the_tokenizer_and_of_the_generation_config(
    tiny_chat_teacher_dir: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    assert stop_token_ids(tokenizer, tiny_chat_teacher_dir) == [tokenizer.eos_token_id]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, 7]}))
    assert stop_token_ids(tokenizer, tmp_path) == sorted({tokenizer.eos_token_id, 7})


class RecordingTracker:
    """What a run logged: artifacts (copied as text) and texts, by artifact path."""

    def __init__(self) -> None:
        self.logged: dict[str, str] = {}

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.logged[f"{artifact_path}/{Path(path).name}"] = Path(path).read_text()

    def log_text(self, text: str, artifact_file: str) -> None:
        self.logged[artifact_file] = text


def _teacher_replies_setup(
    chat_rows: Any, teacher_dir: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[Any, list, dict[str, Any], list[int]]:
    """(the tokenizer, two held-out prompts, `teacher_generations`' keyword settings with `overrides`, a list that
    grows by one each time the teacher is loaded)."""
    tokenizer = load_tokenizer(teacher_dir)
    prompts, _ = held_out_prompts(chat_rows, tokenizer, count=2, max_prompt_tokens=96)
    settings = {
        "max_new_tokens": 6,
        "stop_ids": stop_token_ids(tokenizer, teacher_dir),
        "teacher_dir": teacher_dir,
        "teacher_sha": "abc",
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        **overrides,
    }
    loads: list[int] = []
    real_load = generations.load_teacher
    monkeypatch.setattr(
        generations, "load_teacher", lambda *args, **kwargs: loads.append(1) or real_load(*args, **kwargs)
    )
    return tokenizer, prompts, settings, loads


def test_the_teachers_replies_are_made_once_and_again_when_the_prompts_change(
    chat_rows: Any, tiny_chat_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, prompts, settings, loads = _teacher_replies_setup(chat_rows, tiny_chat_teacher_dir, monkeypatch)
    path = tmp_path / GENERATIONS_DIR / "teacher-validation.json"
    first = teacher_generations(path, prompts, tokenizer, **settings)
    again = teacher_generations(path, prompts, tokenizer, **settings)
    assert again == first and len(first) == 2 and len(loads) == 1
    teacher_generations(path, prompts[:1], tokenizer, **settings)
    teacher_generations(path, prompts[:1], tokenizer, **settings | {"teacher_sha": "def"})
    assert len(loads) == 3
    assert json.loads(path.read_text())["sample_ids"] == [prompts[0].sample_id]


def test_runs_side_by_side_share_the_teachers_replies_through_the_store(
    chat_rows: Any, tiny_chat_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, prompts, settings, loads = _teacher_replies_setup(
        chat_rows, tiny_chat_teacher_dir, monkeypatch, store=tmp_path / "runs" / "teacher-replies"
    )
    paths = [tmp_path / "runs" / name / GENERATIONS_DIR / "teacher-validation.json" for name in ("a", "b", "c")]
    first = teacher_generations(paths[0], prompts, tokenizer, **settings)
    second = teacher_generations(paths[1], prompts, tokenizer, **settings)
    assert second == first and len(loads) == 1
    assert json.loads(paths[1].read_text()) == json.loads(paths[0].read_text())
    assert len(list(settings["store"].glob("*.json"))) == 1
    teacher_generations(paths[2], prompts, tokenizer, **settings | {"dtype": torch.bfloat16})
    assert len(loads) == 2 and len(list(settings["store"].glob("*.json"))) == 2
    stored = {path.name: json.loads(path.read_text()) for path in settings["store"].glob("*.json")}
    assert all(f"{record['key']}.json" == name for name, record in stored.items())


def test_a_damaged_or_unwritable_store_costs_only_the_replies(
    chat_rows: Any,
    tiny_chat_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = tmp_path / "runs" / "teacher-replies"
    tokenizer, prompts, settings, loads = _teacher_replies_setup(
        chat_rows, tiny_chat_teacher_dir, monkeypatch, max_new_tokens=4, store=store
    )
    first_path = tmp_path / "runs" / "a" / GENERATIONS_DIR / "teacher-validation.json"
    texts = teacher_generations(first_path, prompts, tokenizer, **settings)
    (record,) = store.glob("*.json")
    for damage in ('{"key": "', "[1, 2]", json.dumps({"key": record.stem, "texts": ["one reply"]})):
        record.write_text(damage)
        first_path.write_text(damage)
        with caplog.at_level("INFO", logger=generations.__name__):
            again = teacher_generations(first_path, prompts, tokenizer, **settings)
        assert again == texts and "made again" in caplog.text
        assert "not made for these prompts" not in caplog.text  # one message for a damaged record, not two
        assert json.loads(record.read_text())["texts"] == texts == json.loads(first_path.read_text())["texts"]
        caplog.clear()
    assert len(loads) == 4
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder would be")
    with caplog.at_level("WARNING", logger=generations.__name__):
        replies = teacher_generations(
            tmp_path / "runs" / "b" / GENERATIONS_DIR / "teacher-validation.json",
            prompts,
            tokenizer,
            **settings | {"store": blocked / "teacher-replies"},
        )
    assert replies == texts and "not written" in caplog.text


def test_the_teacher_as_student_scores_as_the_teacher_and_the_file_holds_the_rows(
    chat_rows: Any, tiny_chat_teacher_dir: Path, tmp_path: Path
) -> None:
    """The student's replies come from the same loop as the teacher's: the teacher as student repeats them, with
    the same ROUGE-L; the published file and its MLflow copy hold every row, the metrics are the rows' means."""
    tokenizer = load_tokenizer(tiny_chat_teacher_dir)
    prompts, _ = held_out_prompts(chat_rows, tokenizer, count=3, max_prompt_tokens=96)
    stops = stop_token_ids(tokenizer, tiny_chat_teacher_dir)
    teacher_texts = ["It turns the scores.", "Teacher passes", "by id"]  # stand-ins: no teacher pass needed here
    evaluator = ResponseEvaluator(prompts, tokenizer, teacher_texts, max_new_tokens=5, stop_ids=stops)
    model = load_teacher(tiny_chat_teacher_dir, dtype=torch.float32)
    model.train()
    scores = evaluator.run(model, torch.device("cpu"))
    assert model.training  # put back as it was
    assert [row["teacher"] for row in scores.rows] == teacher_texts
    assert scores.metrics == {
        "eval/rougeL": pytest.approx(np.mean([row["rougeL"] for row in scores.rows])),
        "eval/rougeL_teacher": pytest.approx(np.mean(rouge_l([p.reference for p in prompts], teacher_texts))),
    }
    mirrored = ResponseEvaluator(
        prompts, tokenizer, [row["student"] for row in scores.rows], max_new_tokens=5, stop_ids=stops
    ).run(model, torch.device("cpu"), prefix="test")
    assert mirrored.metrics["test/rougeL"] == mirrored.metrics["test/rougeL_teacher"] == scores.metrics["eval/rougeL"]
    tracker = RecordingTracker()
    path = publish_generations(scores, tmp_path, generations_file(10), tracker, step=10, split="validation")
    assert path == tmp_path / GENERATIONS_DIR / "step-00000010.json"
    stored = json.loads(path.read_text())
    assert stored["step"] == 10 and stored["metrics"] == scores.metrics
    assert [list(row) for row in stored["rows"]] == [list(ROW_FIELDS)] * 3
    assert json.loads(tracker.logged["generations/step-00000010.json"]) == stored
    table = tracker.logged["generations/step-00000010.md"].splitlines()
    assert table[0] == "| sample_id | prompt | reference | teacher | student | rougeL |" and len(table) == 5


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train": {"generations": -1}, "data": {"format": "chat"}}, "train.generations"),
        ({"train": {"generations": 4}}, "train.generations"),  # text data: no reference replies
        ({"train": {"generations": 4, "max_new_tokens": 0}, "data": {"format": "chat"}}, "train.max_new_tokens"),
    ],
)
def test_bad_generation_settings_are_refused_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(overrides)
    assert config_from_dict({"train": {"generations": 4, "max_new_tokens": 1}, "data": {"format": "chat"}})


TOPICS = ["heads", "caches", "queries", "keys", "values", "layers", "students", "teachers", "tokens", "shards"]


@pytest.mark.slow
def test_a_chat_run_logs_generations_at_step_0_and_the_end_and_eval_repeats_the_last(
    tiny_chat_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare → cache → train (ZeRO-3, 2 steps, evaluating each) → eval on chat data: step 0 and the final step
    (not step 1) log eval/rougeL beside eval/rougeL_teacher and write their generation files; the teacher replies
    once per run; `distill eval` of the exported student (a plain HF model) repeats the replies the final step made
    through the ZeRO-3 engine's partitioned parameters."""
    from pipeline.config import load_config
    from pipeline.stages.cache import cache_stage
    from pipeline.stages.evaluate import eval_stage
    from pipeline.stages.prepare import prepare_stage
    from pipeline.stages.train import train_stage
    from tests.train_fixtures import TINY_CONFIG

    records = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about {topic}."},
                {"role": "assistant", "content": f"The {topic} are small."},
            ]
        }
        for topic in TOPICS * 2
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    run_dir = tmp_path / "run"
    config = load_config(
        TINY_CONFIG,
        [
            f"teacher.path={tiny_chat_teacher_dir}",
            f"data.sources=[{source}]",
            "data.format=chat",
            "data.seq_len=48",
            "data.val_fraction=0.2",
            f"data.output_dir={tmp_path / 'data'}",
            f"cache.output_dir={tmp_path / 'targets'}",
            "cache.head_counts=[3]",
            f"train.output_dir={run_dir}",
            "train.max_steps=2",
            "train.eval_every=1",
            "train.heatmaps=never",
            "train.generations=3",
            "train.max_new_tokens=5",
            "deepspeed.zero_stage=3",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ],
    )
    prepare_stage(config)
    cache_stage(config)
    loads = []
    real_load = generations.load_teacher
    monkeypatch.setattr(generations, "load_teacher", lambda *args, **kw: loads.append(1) or real_load(*args, **kw))
    train_stage(config)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = {line["step"]: line for line in lines if "eval/ppl" in line}
    assert sorted(evaluations) == [0, 1, 2]
    assert "eval/rougeL" not in evaluations[1]
    for step in (0, 2):
        stored = json.loads((run_dir / GENERATIONS_DIR / generations_file(step)).read_text())
        assert len(stored["rows"]) == 3 and stored["split"] == "validation"
        assert stored["metrics"]["eval/rougeL"] == pytest.approx(evaluations[step]["eval/rougeL"])
        assert evaluations[step]["eval/rougeL_teacher"] == evaluations[0]["eval/rougeL_teacher"]
    assert len(loads) == 1 and (run_dir / GENERATIONS_DIR / "teacher-validation.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    logged = {entry.path for entry in client.list_artifacts(run_id, GENERATIONS_DIR)}
    assert {"generations/step-00000000.json", "generations/step-00000002.md"} <= logged
    assert [point.step for point in client.get_metric_history(run_id, "eval/rougeL")] == [0, 2]

    metrics = eval_stage(config)
    assert len(loads) == 1  # the teacher's replies were read from the run, not made again
    evaluated = json.loads((run_dir / GENERATIONS_DIR / generations_file(2, "validation")).read_text())
    final = json.loads((run_dir / GENERATIONS_DIR / generations_file(2)).read_text())
    assert [row["student"] for row in evaluated["rows"]] == [row["student"] for row in final["rows"]]
    assert metrics["eval/rougeL"] == pytest.approx(evaluations[2]["eval/rougeL"])
