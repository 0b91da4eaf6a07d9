"""Chat data trains only its replies: the loss mask from the prepared `response_mask`, the stored attention rows drawn
among trained positions, every loss term and the evaluation restricted to them, through the cache and online."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from pipeline.config import load_config
from pipeline.data.prepare import calibration_sequences, load_prepared
from pipeline.models.capture import AttentionCapture
from pipeline.models.loading import build_student, load_teacher
from pipeline.objective.loss import build_objective
from pipeline.ops.kd import IGNORE_INDEX, cross_entropy, logit_losses
from pipeline.ops.map_losses import DenseTarget
from pipeline.stages.cache import cache_stage
from pipeline.stages.context import open_run
from pipeline.stages.evaluate import load_student_for_eval
from pipeline.stages.prepare import prepare_stage
from pipeline.stages.train import evaluator, train_stage
from pipeline.targets.codecs import bits_for, unpack_bits
from pipeline.targets.encoding import pack_triangle
from pipeline.targets.logits import pack_loss_mask, response_masks, trained_positions, unpack_loss_mask
from pipeline.targets.manifest import CacheError
from pipeline.targets.plan import bytes_per_token
from pipeline.targets.rows import stored_row_count, stored_rows
from pipeline.targets.store import verify_cache
from tests.reference_maps import relation_maps
from tests.teacher_batches import teacher_batch
from tests.train_fixtures import FAST_TRAIN, TINY_CONFIG, read_metrics


def test_a_position_is_trained_when_the_next_token_is_a_reply_token() -> None:
    response = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 1]])
    trained = trained_positions(response)
    assert trained.tolist() == [
        [False, False, True, True, False, False, True, False],
        [True, False, False, False, False, False, True, False],
    ]
    assert torch.equal(unpack_loss_mask(pack_loss_mask(trained), 8), trained)
    odd = torch.rand(3, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(unpack_loss_mask(pack_loss_mask(odd), 13), odd)


def test_stored_rows_of_chat_data_are_drawn_among_its_trained_positions() -> None:
    """R = 8 of T = 32 rows: a sample with ≥ R trained rows stores only trained ones, one per stratum of them, the same
    for its id every time; a sample with fewer stores all of them plus its first untrained rows; over many ids every
    trained row of a sample whose n = 16 trained rows R divides is stored with probability R / n."""
    seq_len, fraction = 32, 0.25
    count = stored_row_count(seq_len, fraction)
    trained = torch.zeros(2, seq_len, dtype=torch.bool)
    trained[0, 10:26] = True  # 16 trained rows
    trained[1, 5:8] = True  # 3 trained rows < R
    rows = stored_rows(torch.tensor([7, 8]), seq_len, fraction, trained)
    assert rows.shape == (2, count)
    assert trained[0, rows[0]].all()
    assert ((rows[0] - 10) // 2).tolist() == list(range(count))  # one in each stratum of two trained rows
    assert rows[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert torch.equal(rows, stored_rows(torch.tensor([7, 8]), seq_len, fraction, trained))
    assert not torch.equal(rows[0], stored_rows(torch.tensor([9]), seq_len, fraction, trained[:1])[0])

    ids = torch.arange(4000)
    drawn = stored_rows(ids, seq_len, fraction, trained[:1].expand(len(ids), seq_len))
    frequency = torch.zeros(seq_len).index_add_(0, drawn.flatten(), torch.ones(drawn.numel())) / len(ids)
    assert frequency[~trained[0]].sum() == 0
    assert frequency[trained[0]].sub(count / 16).abs().max() < 0.04


def _masked_batch(teacher, objective, input_ids: torch.Tensor, trained: torch.Tensor) -> tuple[dict, Any]:
    """The teacher's own targets of `input_ids` for `objective` (`tests.teacher_batches`), trained only where
    `trained` [B, T] says (labels -100 elsewhere, the loss mask set); and the teacher's capture."""
    batch, capture = teacher_batch(teacher, objective, input_ids)
    batch["labels"] = batch["labels"].masked_fill(~trained, IGNORE_INDEX)
    batch["loss_mask"] = trained
    return batch, capture


def _sums(objective, student, batch: dict) -> dict[str, float]:
    with objective.forward(student, student, batch) as forward:
        return dict(zip(objective.names, objective.sums(forward).tolist(), strict=True))


def _perturbed(batch: dict, positions: torch.Tensor, seq_len: int) -> dict:
    """`batch` with every target at the (sample, position) pairs of bool `positions` [B, T] replaced: the label, the
    teacher's top-k logits and tail, and each map's query row (a uniform row over the causal keys)."""
    changed = dict(batch)
    generator = torch.Generator().manual_seed(5)
    changed["labels"] = torch.where(
        positions, torch.randint(4, 300, positions.shape, generator=generator), batch["labels"]
    )
    changed["topk_values"] = torch.where(positions[..., None], batch["topk_values"].flip(-1), batch["topk_values"])
    changed["topk_indices"] = torch.where(
        positions[..., None], (batch["topk_indices"] + 7) % 300, batch["topk_indices"]
    )
    changed["topk_tail"] = torch.where(positions, 0.5, batch["topk_tail"])
    uniform = torch.tril(torch.ones(seq_len, seq_len)) / torch.arange(1, seq_len + 1)[:, None]
    maps = {}
    for name, target in batch["maps"].items():
        dense = torch.zeros(*target.packed.shape[:2], seq_len, seq_len)
        rows, cols = torch.tril_indices(seq_len, seq_len)
        dense[..., rows, cols] = target.packed
        dense = torch.where(positions[:, None, :, None], uniform, dense)
        maps[name] = DenseTarget(pack_triangle(dense))
    changed["maps"] = maps
    return changed


def test_only_the_trained_positions_carry_a_loss_in_every_term(tiny_llama_dir: Path) -> None:
    """A loss mask on half the positions: CE, KD, attention and relation sums equal the float64 references restricted to
    the trained positions (counts: the trained positions); changing every target of the untrained positions (labels,
    teacher logits, attention and relation rows) leaves every sum unchanged, changing one trained position's does
    not."""
    teacher = load_teacher(tiny_llama_dir)
    student = build_student(teacher.config, num_layers=2, hidden_size=48, num_heads=3, num_kv_heads=1, seed=3)
    config = load_config(TINY_CONFIG, ["distill.rel.weight=1", "distill.rel.heads=4"])
    objective = build_objective(config, [1, 3])
    seq_len = 12
    input_ids = torch.randint(4, 300, (2, seq_len), generator=torch.Generator().manual_seed(0))
    trained = torch.zeros(2, seq_len, dtype=torch.bool)
    trained[0, 4:8] = True
    trained[1, 2:11] = True
    batch, capture = _masked_batch(teacher, objective, input_ids, trained)
    sums = _sums(objective, student, batch)
    counts = dict(zip(objective.names, objective.counts(batch).tolist(), strict=True))
    assert counts == {"ce": 13.0, "kd": 13.0, "attn": 13.0, "rel": 13.0}

    with torch.no_grad(), AttentionCapture(student, [0, 1], qkv=True) as eager:
        logits = student(input_ids=input_ids).logits
    assert sums["ce"] == pytest.approx(cross_entropy(logits, batch["labels"], "sum").item(), rel=1e-5)
    kd = 0.0
    for sample, position in trained.nonzero().tolist():
        at = (slice(sample, sample + 1), slice(position, position + 1))
        parts = [batch[key][at] for key in ("labels", "topk_values", "topk_indices", "topk_tail")]
        kd += logit_losses(logits[at], *parts, torch.ones(1, 1, dtype=torch.bool), 1.0, "sum")[1].item()
    assert sums["kd"] == pytest.approx(kd, rel=1e-5)
    attention = relations = 0.0
    for student_layer, teacher_layer in enumerate((1, 3)):
        target = capture.maps[teacher_layer].double()[:, ::2]
        student_maps = eager.maps[student_layer].double()
        kl = torch.where(target > 0, target * (target.clamp_min(1e-300).log() - student_maps.log()), 0.0)
        attention += kl.sum(-1).mean(1)[trained].sum().item() / 2
        for teacher_states, student_states in zip(capture.qkv[teacher_layer], eager.qkv[student_layer], strict=True):
            teacher_rel = relation_maps(teacher_states.double(), 4)
            student_rel = relation_maps(student_states.double(), 4)
            terms = torch.where(teacher_rel > 0, teacher_rel * (teacher_rel.log() - student_rel.log()), 0.0)
            relations += terms.sum(-1).mean(1)[trained].sum().item() / 2 / 3
    assert sums["attn"] == pytest.approx(attention, rel=1e-4)
    assert sums["rel"] == pytest.approx(relations, rel=1e-4)

    unchanged = _sums(objective, student, _perturbed(batch, ~trained, seq_len))
    assert unchanged == pytest.approx(sums, rel=1e-6, abs=1e-6)
    one = torch.zeros_like(trained)
    one[1, 5] = True
    changed = _sums(objective, student, _perturbed(batch, one, seq_len))
    for name in ("ce", "kd", "attn", "rel"):
        assert abs(changed[name] - sums[name]) > 1e-4 * abs(sums[name]), name


WORDS = [
    "tea",
    "milk",
    "bread",
    "cheese",
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quick",
    "slow",
    "north",
    "south",
]


def _conversation(rng: random.Random) -> dict:
    def text(count: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(count))

    turns = [("user", text(rng.randint(2, 6))), ("assistant", text(rng.randint(3, 10)))]
    if rng.random() < 0.5:
        turns += [("user", text(rng.randint(2, 5))), ("assistant", text(rng.randint(2, 8)))]
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


@pytest.fixture(scope="module")
def chat_run(tiny_chat_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """60 random chats prepared at T 64 and cached compact (top-m 8, half the rows, 8-bit values and logits)."""
    root = tmp_path_factory.mktemp("chat_run")
    rng = random.Random(0)
    (root / "chat.jsonl").write_text("".join(json.dumps(_conversation(rng)) + "\n" for _ in range(60)))
    overrides = [
        f"teacher.path={tiny_chat_teacher_dir}",
        f"data.sources=[{root / 'chat.jsonl'}]",
        "data.format=chat",
        "data.seq_len=64",
        "data.val_fraction=0.15",
        f"data.output_dir={root / 'data'}",
        f"cache.output_dir={root / 'targets'}",
        "cache.encoding=topk",
        "cache.attn_top_m=8",
        "cache.attn_row_fraction=0.25",
        "cache.attn_value_bits=8",
        "cache.logit_value_bits=8",
        "mlflow.enabled=false",
    ]
    config = load_config(TINY_CONFIG, overrides)
    prepare_stage(config)
    cache_stage(config)
    return {"root": root, "overrides": overrides}


def test_a_chat_cache_stores_the_loss_mask_and_rows_only_where_replies_are_trained(chat_run: dict) -> None:
    root = chat_run["root"]
    splits, meta = load_prepared(root / "data")
    assert meta["data_format"] == "chat"
    manifest = verify_cache(root / "targets" / "train")
    assert manifest.fingerprint["loss_positions"] == "response"
    train = splits["train"].with_format("torch")
    by_id = {int(sample): index for index, sample in enumerate(train["sample_id"])}
    seq_len, count = 64, stored_row_count(64, 0.25)
    checked = full = tensor_bytes = 0
    for path in sorted((root / "targets" / "train").glob("shard-*.safetensors")):
        with safe_open(path, "pt") as shard:
            tensor_bytes += sum(shard.get_tensor(name).nbytes for name in shard.keys())  # noqa: SIM118
            ids = shard.get_tensor("sample_ids")
            mask = unpack_loss_mask(shard.get_tensor("loss_mask"), seq_len)
            rows = unpack_bits(shard.get_tensor("attn_rows"), bits_for(seq_len), count)
        for row, sample in enumerate(ids.tolist()):
            expected = trained_positions(train[by_id[sample]]["response_mask"][None])[0]
            assert torch.equal(mask[row], expected)
            stored = mask[row][rows[row]]
            if int(expected.sum()) >= count:
                assert stored.all()
                full += 1
            else:
                assert int(stored.sum()) == int(expected.sum())
            checked += 1
    assert checked == len(train) and full > 0
    # the planner (`distill cache --plan`) counts the loss mask too: its bytes are the shards' tensor bytes
    assert bytes_per_token(manifest.fingerprint) * seq_len * len(train) == tensor_bytes


def test_a_chat_student_trains_from_the_cache_like_the_live_teacher_on_its_replies(chat_run: dict) -> None:
    """Cached and online training see the same trained positions and rows (losses equal up to the 8-bit codes); the
    evaluation reports response-token perplexity and top-1 agreement."""
    root = chat_run["root"]
    common = (*chat_run["overrides"], *FAST_TRAIN, "train.max_steps=2", "train.eval_every=2")
    train_stage(load_config(TINY_CONFIG, [*common, f"train.output_dir={root / 'cached'}"]))
    train_stage(load_config(TINY_CONFIG, [*common, f"train.output_dir={root / 'online'}", "train.mode=online"]))
    cached, evaluation = read_metrics(root / "cached")
    online, _ = read_metrics(root / "online")
    for step in (1, 2):
        for key in ("train/loss_ce", "train/loss_kd", "train/loss_attn"):
            assert cached[step][key] > 0 and math.isfinite(cached[step][key])
            assert online[step][key] == pytest.approx(cached[step][key], rel=2e-2), (step, key)
    for key in ("eval/ppl", "eval/top1_agreement", "eval/attn_kl"):
        assert math.isfinite(evaluation[2][key])

    # the evaluation's perplexity is over the reply predictions: exp of the float64 CE at the trained positions of
    # every validation conversation, from the prepared rows and the exported student (not the cache)
    config = load_config(TINY_CONFIG, [*common, f"train.output_dir={root / 'cached'}"])
    student, _ = load_student_for_eval(config, root / "cached" / "student", None)
    metrics = evaluator(open_run(config), "validation", max_batches=None).run(student, student).metrics
    splits, _ = load_prepared(root / "data")
    rows = splits["validation"].with_format("torch", columns=["input_ids", "response_mask"])[:]
    trained = trained_positions(rows["response_mask"])
    with torch.no_grad():
        log_probs = student(input_ids=rows["input_ids"].long()).logits.double().log_softmax(-1)
    targets = rows["input_ids"].long().roll(-1, dims=1)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0][trained]
    assert metrics["eval/ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    everywhere = -log_probs[:, :-1].gather(-1, targets[:, :-1, None])[..., 0].mean().item()
    assert abs(math.log(metrics["eval/ppl"]) - everywhere) > 0.05  # all positions would give another figure


def test_chat_calibration_reads_real_tokens_only_and_rows_must_match_the_fingerprint(chat_run: dict) -> None:
    """Teacher statistics (carve, selective heads) read the conversations' real tokens packed back to back, never
    their padding; text rows are read as they are. A chat cache or online source given rows without the response
    mask is refused, not trained on every position."""
    splits, _ = load_prepared(chat_run["root"] / "data")
    train = splits["train"]
    packed = calibration_sequences(train, 3)
    real = torch.cat([torch.as_tensor(row["input_ids"][: row["length"]]) for row in train])
    assert packed.shape == (3, 64) and torch.equal(packed.flatten(), real[: 3 * 64])
    text = train.remove_columns(["length", "response_mask"])
    assert torch.equal(calibration_sequences(text, 2), torch.as_tensor(train[:2]["input_ids"]))
    with pytest.raises(CacheError, match=r"lack a response_mask column, but the targets are for chat data"):
        response_masks({"input_ids": torch.zeros(1, 64)}, {"loss_positions": "response"}, "the rows")
    with pytest.raises(CacheError, match=r"carry a response_mask column, but the targets are for text data"):
        response_masks({"response_mask": torch.zeros(1, 64)}, {}, "the rows")
