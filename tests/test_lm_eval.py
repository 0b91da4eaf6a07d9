"""lm-evaluation-harness scores an exported student as it is: `lm_eval --model hf` on the plain HF directory that
`distill train` writes (`export.export_student`), with a local multiple-choice task (a YAML and a JSONL, nothing
downloaded). Its accuracy and its per-choice log-likelihoods must equal our own computation with transformers in
float64, so a student that lm-eval loads wrongly (a lost tokenizer file, a misread config) or scores differently
fails here rather than in a paper table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models.loading import build_student, load_teacher
from pipeline.training.export import export_student
from tests.train_fixtures import BIN

pytestmark = [pytest.mark.slow]  # the lm_eval CLI imports for ~10 s on 2 cores

TASK = "shd_tiny_mc"
ITEMS = [
    {"question": "An attention head compares a query with every earlier", "choices": ["key", "token", "layer"]},
    {"question": "A language model reads a sequence of tokens and predicts the next", "choices": ["head", "one"]},
    {"question": "The softmax turns the scores into", "choices": ["layers", "keys", "probabilities"]},
    {"question": "Each layer of a transformer mixes information between", "choices": ["positions", "files"]},
    {"question": "A student with fewer heads learns from its", "choices": ["cache", "teacher", "optimizer"]},
    {"question": "The small network transforms each position on its", "choices": ["own", "side", "way"]},
]
ANSWERS = [0, 1, 2, 0, 1, 0]
"""Questions on the tiny teacher's corpus and the index of each one's gold choice: gold at every position, choices
of unequal lengths so that acc (raw log-likelihood) and acc_norm (per character) pick differently."""

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
"""A local multiple-choice task: lm-eval reads `dataset_path: json` through `datasets.load_dataset("json",
data_files=...)`; each choice is scored as the continuation `" " + choice` (the default target_delimiter) of the
question."""

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def student_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 3-head student of the tiny LLaMA teacher, written by the export `distill train` ends with."""
    model = build_student(load_teacher(tiny_llama_dir).config, seed=0, num_layers=2, hidden_size=24, num_heads=3)
    return export_student(model, 0, tiny_llama_dir, tmp_path_factory.mktemp("lm_eval") / "student")


def write_task(directory: Path) -> Path:
    """The task's JSONL and YAML in `directory` (the `--include_path`)."""
    directory.mkdir(parents=True)
    data_file = directory / f"{TASK}.jsonl"
    data_file.write_text(
        "".join(json.dumps({**item, "answer": answer}) + "\n" for item, answer in zip(ITEMS, ANSWERS, strict=True))
    )
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data_file=data_file))
    return directory


def run_lm_eval(student: Path, tasks: Path, output: Path, workdir: Path) -> subprocess.CompletedProcess:
    """The command a user types, offline, with a datasets cache of its own."""
    command = [
        str(BIN / "lm_eval"),
        "--model", "hf",
        "--model_args", f"pretrained={student},dtype=float32",
        "--tasks", TASK,
        "--include_path", str(tasks),
        "--device", "cpu",
        "--batch_size", "1",
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(workdir / "datasets-cache")}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def choice_loglikelihoods(student: Path) -> list[np.ndarray]:
    """log p(" " + choice | question) of every choice of every item, by transformers in float64 (eager attention,
    not lm-eval's batching and sdpa): one forward pass over question + continuation, continuation tokens summed."""
    tokenizer = AutoTokenizer.from_pretrained(student, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        student, dtype=torch.float64, attn_implementation="eager", local_files_only=True
    ).eval()
    per_item = []
    for item in ITEMS:
        context_ids = tokenizer.encode(item["question"])
        scores = []
        for choice in item["choices"]:
            continuation_ids = tokenizer.encode(" " + choice)
            # The split is unambiguous only when the two parts tokenise as the whole does (lm-eval splits the whole).
            assert tokenizer.encode(item["question"] + " " + choice) == context_ids + continuation_ids, choice
            ids = torch.tensor([context_ids + continuation_ids])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            targets = ids[0, len(context_ids) :]
            scores.append(log_probs[len(context_ids) - 1 :].gather(-1, targets[:, None]).sum().item())
        per_item.append(np.array(scores))
    return per_item


def test_lm_eval_accuracy_and_loglikelihoods_match_transformers(student_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "results"
    finished = run_lm_eval(student_dir, write_task(tmp_path / "tasks"), output, tmp_path)
    assert finished.returncode == 0, finished.stderr[-6000:]
    (results_file,) = output.rglob("results_*.json")
    (samples_file,) = output.rglob(f"samples_{TASK}_*.jsonl")
    reported = json.loads(results_file.read_text())
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])

    expected_lls = choice_loglikelihoods(student_dir)
    lengths = [np.array([float(len(choice)) for choice in item["choices"]]) for item in ITEMS]
    for lls, length in zip(expected_lls, lengths, strict=True):  # no near-tie that float32 vs float64 could flip
        for scores in (lls, lls / length):
            best, runner_up = np.sort(scores)[::-1][:2]
            assert best - runner_up > 1e-3, scores
    assert len(samples) == len(ITEMS)
    for sample, lls in zip(samples, expected_lls, strict=True):
        reported_lls = np.array([float(loglikelihood) for loglikelihood, _greedy in sample["filtered_resps"]])
        np.testing.assert_allclose(reported_lls, lls, rtol=1e-4, atol=1e-4)

    expected_acc = np.mean([np.argmax(lls) == gold for lls, gold in zip(expected_lls, ANSWERS, strict=True)])
    expected_acc_norm = np.mean(
        [np.argmax(lls / n) == gold for lls, n, gold in zip(expected_lls, lengths, ANSWERS, strict=True)]
    )
    assert expected_acc != expected_acc_norm  # so a swapped or misread metric fails
    metrics = reported["results"][TASK]
    assert metrics["acc,none"] == pytest.approx(expected_acc)
    assert metrics["acc_norm,none"] == pytest.approx(expected_acc_norm)
    assert reported["n-samples"][TASK]["effective"] == len(ITEMS)
