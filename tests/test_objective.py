"""The objective as a list of terms: which terms a config makes, what they read, their weights over steps, and their
sums on a real (tiny) student against independent references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.models.capture import AttentionCapture
from pipeline.models.loading import build_student, load_teacher
from pipeline.objective.loss import Objective, build_objective, evaluation_objective
from pipeline.objective.terms.attention import AttentionKD
from pipeline.objective.terms.relations import RelationKD
from pipeline.ops.kd import cross_entropy, logit_losses, topk_targets
from pipeline.targets.layout import LAYOUT_VERSION, shard_bytes, shard_file_name
from pipeline.targets.logits import stored_logit_tensors
from pipeline.targets.manifest import Manifest, ShardEntry, sha256_bytes, write_manifest
from pipeline.targets.needs import MapNeed, TargetNeeds
from pipeline.targets.stream import TargetStream
from tests import reference_maps
from tests.cache_fixtures import SAMPLE_ID_OFFSET, encode_maps, synthetic_fingerprint
from tests.reference_maps import relation_maps
from tests.teacher_batches import teacher_batch

ROOT = Path(__file__).resolve().parents[1]


def _config(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def test_terms_follow_the_config() -> None:
    assert build_objective(_config(), [1, 3]).names == ["ce", "kd", "attn"]
    assert build_objective(_config("distill.attn.weight=0"), [1, 3]).names == ["ce", "kd"]
    evaluation = build_objective(_config("distill.attn.weight=0"), [1, 3], evaluation=True)
    assert evaluation.names == ["ce", "kd", "attn"]
    with_relations = build_objective(_config("distill.rel.weight=0.5", "distill.rel.heads=4"), [1, 3])
    assert with_relations.names == ["ce", "kd", "attn", "rel"]
    relation = with_relations.terms[-1]
    assert isinstance(relation, RelationKD) and relation.targets[1] == ("rel.L3.R4.q", "rel.L3.R4.k", "rel.L3.R4.v")
    attention = build_objective(_config("distill.attn.match=global"), [1, 3]).terms[-1]
    assert isinstance(attention, AttentionKD) and attention.targets == ("attn.L1.global", "attn.L3.global")
    assert attention.head_mean
    selective = build_objective(_config("distill.attn.match=selective"), [2, 3]).terms[-1]
    assert selective.targets == ("attn.L2.H3.selective", "attn.L3.H3.selective")
    pairwise = build_objective(_config("distill.attn.squeeze=shd_pairwise"), [1, 3]).terms[-1]
    assert pairwise.targets == ("attn.L1.H3.shd_pairwise", "attn.L3.H3.shd_pairwise")


def test_needs_name_every_map_once_with_its_temperature() -> None:
    objective = build_objective(
        _config("distill.rel.weight=1", "distill.attn.temperature=2", "distill.kd.temperature=4"), [1, 3]
    )
    needs = objective.needs()
    assert (needs.kd_temperature, needs.top_k) == (4.0, 16)
    assert needs.maps[:2] == (MapNeed("shd", 1, 3, 2.0), MapNeed("shd", 3, 3, 2.0))
    reads = needs.reads()
    assert reads[:2] == (("attn.L1.H3.shd", 2.0), ("attn.L3.H3.shd", 2.0))
    assert ("rel.L3.R4.v", 1.0) in reads and len(reads) == 2 + 6
    assert needs.kinds() == ("relations", "shd") and needs.layers() == (1, 3)
    assert needs.temperatures() == (1.0, 2.0, 4.0)
    assert objective.capture_layers() == [0, 1]
    assert build_objective(_config("distill.attn.weight=0"), [1, 3]).capture_layers() == []


def test_linear_schedule_decays_the_attention_terms_only() -> None:
    objective = build_objective(
        _config("distill.schedule=linear", "distill.decay_steps=4", "distill.attn.weight=2", "distill.rel.weight=1"),
        [1, 3],
    )
    weights = [objective.weights(step).tolist() for step in (0, 1, 2, 4, 9)]
    assert weights == [[1, 1, 2, 1], [1, 1, 1.5, 0.75], [1, 1, 1, 0.5], [1, 1, 0, 0], [1, 1, 0, 0]]
    constant = build_objective(_config(), [1, 3])
    assert constant.weights(0).tolist() == constant.weights(50).tolist() == [1.0, 1.0, 1.0]
    assert build_objective(_config("distill.schedule=linear", "train.max_steps=10"), [1]).schedule.decay_steps == 10


@pytest.mark.parametrize("match", ["headwise", "global"])
def test_term_sums_on_a_student_equal_independent_references(tiny_llama_dir: Path, match: str) -> None:
    """A 2-layer GQA student (3 heads on 1 KV head): the objective's sums against the teacher's own targets equal
    F.cross_entropy, kd_loss_topk and fp64 KL / relation KL formulas on the student's eager attention maps."""
    teacher = load_teacher(tiny_llama_dir)
    student = build_student(teacher.config, num_layers=2, hidden_size=48, num_heads=3, num_kv_heads=1, seed=3)
    config = _config(f"distill.attn.match={match}", "distill.rel.weight=1", "distill.rel.heads=4")
    objective = build_objective(config, [1, 3])
    input_ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batch, teacher_capture = teacher_batch(teacher, objective, input_ids, head_mean=match == "global")
    with objective.forward(student, student, batch) as forward:
        sums = dict(zip(objective.names, objective.sums(forward).tolist(), strict=True))
    counts = dict(zip(objective.names, objective.counts(batch).tolist(), strict=True))
    assert counts == {"ce": 22.0, "kd": 24.0, "attn": 24.0, "rel": 24.0}

    with torch.no_grad(), AttentionCapture(student, [0, 1], qkv=True) as eager:
        logits = student(input_ids=input_ids).logits
    labels = batch["labels"]
    assert sums["ce"] == pytest.approx(cross_entropy(logits, labels, "sum").item(), rel=1e-5)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    targets = (batch["topk_values"], batch["topk_indices"], batch["topk_tail"])
    kd = logit_losses(logits, labels, *targets, mask, 1.0, "sum")[1]
    assert sums["kd"] == pytest.approx(kd.item(), rel=1e-5)
    attention = 0.0
    relations = 0.0
    for student_layer, teacher_layer in enumerate((1, 3)):
        student_maps = eager.maps[student_layer].double()
        if match == "global":
            student_maps = student_maps.mean(1, keepdim=True)
        target = teacher_capture.maps[teacher_layer].double()
        target = target.mean(1, keepdim=True) if match == "global" else target[:, ::2]
        kl = torch.where(target > 0, target * (target.clamp_min(1e-300).log() - student_maps.log()), 0.0)
        attention += kl.sum(-1).mean(1).sum().item() / 2
        for teacher_states, student_states in zip(
            teacher_capture.qkv[teacher_layer], eager.qkv[student_layer], strict=True
        ):
            teacher_rel = relation_maps(teacher_states.double(), 4)
            student_rel = relation_maps(student_states.double(), 4)
            terms = torch.where(teacher_rel > 0, teacher_rel * (teacher_rel.log() - student_rel.log()), 0.0)
            relations += terms.sum(-1).mean(1).sum().item() / 2 / 3
    assert sums["attn"] == pytest.approx(attention, rel=1e-4)
    assert sums["rel"] == pytest.approx(relations, rel=1e-4)
    assert all(math.isfinite(value) and value > 0 for value in sums.values())


TOP_M, SEQ_LEN, SAMPLES = 4, 10, 3
SELECTED = [0, 2, 4]
"""The teacher heads behind the cached `selective` targets of the 3-head student."""


def _write_top_m_cache(
    directory: Path, input_ids: torch.Tensor, logits: torch.Tensor, maps: dict[str, torch.Tensor], temperature: float
) -> None:
    """One shard of top-m target `maps` (name → [N, H, T, T] probabilities) with tail sums at τ = 1 and
    `temperature`, encoded and checksummed as `distill cache` writes them, plus the teacher's top-16 logits."""
    temperatures = (1.0, temperature)
    fingerprint = synthetic_fingerprint(SEQ_LEN, [2], [3], "topk", 16, TOP_M, "float16", 0, teacher_heads=6)
    fingerprint.update(
        vocab_size=logits.shape[-1], attn_targets=["selective", "global"], temperatures=list(temperatures)
    )
    values, indices, tails = topk_targets(logits, 16, temperatures)
    tensors = {
        "sample_ids": torch.arange(SAMPLES) + SAMPLE_ID_OFFSET,
        "input_ids": input_ids.int(),
        **stored_logit_tensors(values, indices, tails, logits.shape[-1], temperatures, torch.float16, 16),
    }
    for name, target in maps.items():
        tensors.update(
            encode_maps(name, target, encoding="topk", attn_top_m=TOP_M, dtype=torch.float16, temperatures=temperatures)
        )
    data = shard_bytes(tensors, {"layout_version": LAYOUT_VERSION, "first_sample": 0, "num_samples": SAMPLES})
    (directory / shard_file_name(0)).write_bytes(data)
    entry = ShardEntry(
        shard_file_name(0), 0, SAMPLES, len(data), sha256_bytes(data), SAMPLE_ID_OFFSET, SAMPLE_ID_OFFSET + SAMPLES - 1
    )
    manifest = Manifest(fingerprint, SAMPLES, SAMPLES, [entry], selected_heads={"L2.H3": SELECTED}, complete=True)
    write_manifest(directory, manifest)


def _read_batch(directory: Path, need: MapNeed, temperature: float) -> dict:
    need = MapNeed(need.kind, need.layer, need.variant, temperature)
    stream = TargetStream(
        directory=directory,
        needs=TargetNeeds((need,), 1.0, 16),
        batch_size=SAMPLES,
        shuffle=False,
        num_batches=1,
        prefetch=False,
    )
    return next(iter(stream))


@pytest.mark.parametrize("match", ["selective", "global"])
def test_top_m_attention_targets_from_the_cache_give_the_bucket_kl_at_their_temperature(
    tiny_llama_dir: Path, tmp_path: Path, match: str
) -> None:
    """Top-m targets (m = 4 of T = 10 keys) cached with R_1 and R_2, read back by `TargetStream` at τ = 2: the
    attention term equals the fp64 KL over the m + 1 buckets of the full teacher and student maps softened at τ = 2
    (global: the mean over heads of each side's τ = 1 maps, softened after). Read with the τ = 1 tail sums instead,
    the term is far off: the tail bucket is what m < T puts to the test."""
    temperature = 2.0
    teacher = load_teacher(tiny_llama_dir)
    student = build_student(teacher.config, num_layers=1, hidden_size=48, num_heads=3, num_kv_heads=1, seed=4)
    input_ids = torch.randint(4, 300, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), AttentionCapture(teacher, [2]) as capture:
        logits = teacher(input_ids=input_ids).logits
    teacher_maps = capture.maps[2].double()
    targets = {"attn.L2.H3.selective": teacher_maps[:, SELECTED], "attn.L2.global": teacher_maps.mean(1, keepdim=True)}
    _write_top_m_cache(tmp_path, input_ids, logits, {name: maps.float() for name, maps in targets.items()}, temperature)
    need = MapNeed("global", 2, None) if match == "global" else MapNeed("selective", 2, 3)
    name = need.specs()[0].name
    term = AttentionKD(
        1.0, (MapNeed(need.kind, 2, need.variant, temperature),), temperature=temperature, head_mean=match == "global"
    )

    def term_sum(tail_temperature: float) -> float:
        batch = _read_batch(tmp_path, need, tail_temperature)
        assert torch.equal(batch["input_ids"], input_ids)
        with torch.no_grad(), Objective([term]).forward(student, student, batch) as forward:
            return term.loss_sum(forward).item()

    with torch.no_grad(), AttentionCapture(student, [0]) as eager:
        student(input_ids=input_ids)
    student_maps = eager.maps[0].double()
    if match == "global":
        student_maps = student_maps.mean(1, keepdim=True)
    target = targets[name]
    kept = target.topk(TOP_M, dim=-1).indices
    per_row = reference_maps.bucket_kl(
        reference_maps.softened(student_maps, temperature), reference_maps.softened(target, temperature), kept
    )
    reference = per_row.mean(1).sum().item()
    assert term_sum(temperature) == pytest.approx(reference, rel=1e-3) and reference > 0.01
    assert abs(term_sum(1.0) - reference) > 0.1 * reference


def test_the_sink_option_leaves_out_the_first_key_and_row() -> None:
    term = build_objective(_config("distill.attn.sink=drop"), [1, 3]).terms[2]
    assert isinstance(term, AttentionKD) and term.drop_sink
    assert term.count({"input_ids": torch.zeros(3, 10, dtype=torch.long)}) == 27.0
    names = evaluation_objective(_config("distill.attn.sink=drop"), [1, 3]).names
    assert names == ["ce", "kd", "attn", "attn_kl"]  # the yardstick keeps the sink
    assert evaluation_objective(_config(), [1, 3]).names == ["ce", "kd", "attn"]
