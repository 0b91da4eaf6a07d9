"""Response evaluation of chat students: greedy generations of held-out prompts, scored with ROUGE-L.

Perplexity and top-1 agreement say how a student predicts the teacher's tokens; this says what it answers. From a
prepared chat split (`data.format: chat | prompt_response`) the first `train.generations` conversations give
- the prompt: every token before the first response token (the chat template's assistant header included), the
  oldest tokens left out when it is longer than the model's positions minus `train.max_new_tokens` (counted);
- the reference: the first reply (the first run of `response_mask`), decoded without special tokens, so without the
  end-of-turn token.

A model continues each prompt greedily with exactly `train.max_new_tokens` forward calls (a prefill, then one token
at a time on the KV cache), whatever it generates: under ZeRO-3 every forward gathers the parameters collectively, so
every rank must make the same calls, and every rank generates every prompt. The tokens are then cut before the first
stop token (the tokenizer's eos and the teacher's generation-config eos ids) and decoded. ROUGE-L F1 against the
reference (`rouge_score`, no stemming: lowercase alphanumeric words, so text without Latin letters or digits scores 0)
is averaged over the prompts.

The teacher's own generations, the yardstick beside the student's, are made on rank 0 and kept in
`generations/teacher-<split>.json` of the run's directory, keyed by the prompts, the step count, the stop tokens, the
teacher's weights digest, its dtype and the device type (made again when any differs). Runs side by side (the demo's
variants, a study's runs: run directories with one parent) share them through `<parent>/teacher-replies/<key>.json`,
so the teacher answers the same prompts once, not once per run (best effort: an unwritable store or a damaged
record only makes the replies again).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor, nn
from tqdm import tqdm
from transformers import GenerationConfig

from pipeline.infra import dist
from pipeline.infra.atomic import StorageError, atomic_write_text
from pipeline.models.loading import load_teacher
from pipeline.reports.generations import GENERATIONS_DIR, ROW_FIELDS, rows_markdown

logger = logging.getLogger(__name__)

TEACHER_REPLIES_DIR = "teacher-replies"
"""Beside a run's directory: the teacher's replies of every run with that parent, one `<key>.json` per key."""


@dataclass(frozen=True)
class HeldOutPrompt:
    """One held-out conversation cut at its first reply."""

    sample_id: int
    prompt_ids: list[int]
    """The tokens before the first response token, left-truncated to what fits."""
    prompt: str
    """`prompt_ids` decoded with the template's special tokens: what the model was given."""
    reference: str
    """The first reply, decoded without special tokens (its end-of-turn token left out)."""


def held_out_prompts(
    rows: Dataset, tokenizer: Any, count: int, max_prompt_tokens: int
) -> tuple[list[HeldOutPrompt], int]:
    """The first `count` conversations of a prepared chat split (in sample id order), and how many prompts were
    longer than `max_prompt_tokens` and lost their oldest tokens."""
    prompts, truncated = [], 0
    for row in rows.select(range(min(count, len(rows)))):
        input_ids = np.asarray(row["input_ids"], dtype=np.int64)[: row["length"]]
        mask = np.asarray(row["response_mask"], dtype=bool)[: row["length"]]
        first = int(np.argmax(mask))  # a prepared conversation has at least one response token
        after = np.flatnonzero(~mask[first:])
        end = first + int(after[0]) if len(after) else len(mask)
        prompt_ids = input_ids[:first].tolist()
        if len(prompt_ids) > max_prompt_tokens:
            prompt_ids, truncated = prompt_ids[-max_prompt_tokens:], truncated + 1
        prompts.append(
            HeldOutPrompt(
                sample_id=int(row["sample_id"]),
                prompt_ids=prompt_ids,
                prompt=tokenizer.decode(prompt_ids, skip_special_tokens=False),
                reference=tokenizer.decode(input_ids[first:end].tolist(), skip_special_tokens=True).strip(),
            )
        )
    return prompts, truncated


def stop_token_ids(tokenizer: Any, teacher_dir: Path) -> list[int]:
    """Where a generation ends: the tokenizer's eos (SmolLM2's `<|im_end|>`, the end of a turn) and the eos ids of
    the teacher's generation config, when it has one."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if (Path(teacher_dir) / "generation_config.json").is_file():
        configured = GenerationConfig.from_pretrained(teacher_dir).eos_token_id
        stops.update([configured] if isinstance(configured, int) else configured or [])
    return sorted(stops)


def greedy_continuation(model: nn.Module, prompt_ids: Tensor, steps: int) -> Tensor:
    """The argmax continuation of `prompt_ids` [1, P]: [steps] token ids made with exactly `steps` forward calls
    (the prompt, then each new token on the KV cache) — no early stop, so every rank makes the same calls.
    `model`: an HF causal LM, or a DeepSpeed engine / peft wrapper around one."""
    tokens = []
    inputs, cache = prompt_ids, None
    for _ in range(steps):
        output = model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1)
        cache = output.cache
        inputs = output.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(inputs[0, 0])
    return torch.stack(tokens)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """`tokens` up to (without) the first stop token."""
    stops = set(stop_ids)
    return next(([*tokens[:at]] for at, token in enumerate(tokens) if token in stops), list(tokens))


def rouge_l(references: Sequence[str], texts: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each text against its reference (`rouge_score`, no stemming)."""
    # here, not at the top: rouge_score imports nltk, and only an evaluation with generations needs it
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    return [scorer.score(reference, text)["rougeL"].fmeasure for reference, text in zip(references, texts, strict=True)]


def generate_texts(
    model: nn.Module,
    prompts: Sequence[HeldOutPrompt],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    device: torch.device,
    who: str,
) -> list[str]:
    """Each prompt's greedy reply, cut at the first stop token and decoded; `model` in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    texts = []
    with torch.no_grad():
        for prompt in tqdm(prompts, desc=f"generations ({who})", unit="prompt", disable=not dist.is_main()):
            prompt_ids = torch.tensor([prompt.prompt_ids], dtype=torch.long, device=device)
            tokens = greedy_continuation(model, prompt_ids, max_new_tokens).tolist()
            texts.append(tokenizer.decode(cut_at_stop(tokens, stop_ids), skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return texts


def generation_key(
    prompts: Sequence[HeldOutPrompt],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    teacher_sha: str,
    dtype: torch.dtype,
    device: torch.device,
) -> str:
    """What the teacher's generations depend on, as a digest: the prompts' tokens, the steps, the stops, the weights,
    and the precision and device type they were computed in (greedy choices can differ between them)."""
    settings = [[prompt.sample_id, prompt.prompt_ids] for prompt in prompts], max_new_tokens, list(stop_ids)
    return hashlib.sha256(json.dumps([*settings, teacher_sha, str(dtype), device.type]).encode()).hexdigest()


def _stored_texts(path: Path, key: str, count: int) -> tuple[list[str] | None, str]:
    """(the `count` texts of the record at `path` when it was made under `key`, else None; why: `used`, `absent`,
    `other` — made under another key — or `damaged`, which is made again and replaced, with a warning, never
    trusted)."""
    if not path.is_file():
        return None, "absent"
    try:
        stored = json.loads(path.read_text())
        if stored["key"] != key:
            return None, "other"
        texts = stored["texts"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(
            "%s: unreadable (%s: %s); the teacher's replies are made again", path, type(error).__name__, error
        )
        return None, "damaged"
    if not (isinstance(texts, list) and len(texts) == count and all(isinstance(text, str) for text in texts)):
        logger.warning("%s: does not hold %d replies; the teacher's replies are made again", path, count)
        return None, "damaged"
    return texts, "used"


def teacher_generations(
    path: Path,
    prompts: Sequence[HeldOutPrompt],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    teacher_dir: Path,
    teacher_sha: str,
    dtype: torch.dtype,
    device: torch.device,
    store: Path | None = None,
) -> list[str]:
    """The teacher's reply to each prompt: read from `path` when it was made under the same key (prompts, steps,
    stops, weights, dtype, device type), else from `store/<key>.json` (replies shared by runs side by side), else
    generated (the teacher loaded for it and released after); written atomically to `path` and to the store."""
    key = generation_key(prompts, max_new_tokens, stop_ids, teacher_sha, dtype, device)
    texts, verdict = _stored_texts(path, key, len(prompts))
    if texts is not None:
        return texts
    if verdict == "other":
        logger.info("%s: not made for these prompts, steps, teacher weights and precision; not used", path)
    shared = None if store is None else store / f"{key}.json"
    texts = None if shared is None else _stored_texts(shared, key, len(prompts))[0]
    if texts is not None:
        logger.info("teacher replies: %s (made by a run beside this one)", shared)
    else:
        teacher = load_teacher(teacher_dir, dtype=dtype, device=device)
        texts = generate_texts(
            teacher, prompts, tokenizer, max_new_tokens=max_new_tokens, stop_ids=stop_ids, device=device, who="teacher"
        )
        del teacher
    record = json.dumps({"key": key, "sample_ids": [prompt.sample_id for prompt in prompts], "texts": texts}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, record + "\n")
    if shared is not None:
        try:
            shared.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(shared, record + "\n")
        except (OSError, StorageError) as error:
            logger.warning("%s: not written (%s); runs beside this one will make the replies again", shared, error)
    return texts


@dataclass
class ResponseScores:
    """One evaluation's generations: a row per prompt (`ROW_FIELDS`) and the mean ROUGE-L of student and
    teacher as metrics (`<prefix>/rougeL`, `<prefix>/rougeL_teacher`)."""

    rows: list[dict[str, Any]]
    metrics: dict[str, float]


class ResponseEvaluator:
    """Generates the student's replies to a split's held-out prompts and scores them beside the teacher's
    (made once, `teacher_generations`); every rank calls `run` (the same forward calls on each)."""

    def __init__(
        self,
        prompts: Sequence[HeldOutPrompt],
        tokenizer: Any,
        teacher_texts: Sequence[str],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
    ) -> None:
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.teacher_texts = list(teacher_texts)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = list(stop_ids)
        self.references = [prompt.reference for prompt in self.prompts]
        self.teacher_scores = rouge_l(self.references, self.teacher_texts)

    def run(self, model: nn.Module, device: torch.device, prefix: str = "eval") -> ResponseScores:
        """Generate and score; `model` is the student (a DeepSpeed engine or the module itself)."""
        texts = generate_texts(
            model,
            self.prompts,
            self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            stop_ids=self.stop_ids,
            device=device,
            who="student",
        )
        scores = rouge_l(self.references, texts)
        columns = zip(
            [prompt.sample_id for prompt in self.prompts],
            [prompt.prompt for prompt in self.prompts],
            self.references,
            self.teacher_texts,
            texts,
            scores,
            self.teacher_scores,
            strict=True,
        )
        rows = [dict(zip(ROW_FIELDS, values, strict=True)) for values in columns]
        metrics = {
            f"{prefix}/rougeL": float(np.mean(scores)),
            f"{prefix}/rougeL_teacher": float(np.mean(self.teacher_scores)),
        }
        logger.info(
            "generations: ROUGE-L %.4f (teacher %.4f) over %d prompts",
            metrics[f"{prefix}/rougeL"],
            metrics[f"{prefix}/rougeL_teacher"],
            len(rows),
        )
        return ResponseScores(rows, metrics)


def publish_generations(scores: ResponseScores, run_dir: Path, file_name: str, tracker: Any, **about: Any) -> Path:
    """Rank 0: write `run_dir/generations/<file_name>` atomically (`about` — step, split, max_new_tokens — then the
    metrics and the rows) and log it to the tracker, with a markdown table of the rows beside it. Returns its path."""
    path = Path(run_dir) / GENERATIONS_DIR / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**about, "metrics": scores.metrics, "rows": scores.rows}, indent=2) + "\n")
    tracker.log_artifact(path, GENERATIONS_DIR)
    tracker.log_text(rows_markdown(scores.rows), f"{GENERATIONS_DIR}/{path.stem}.md")
    return path
