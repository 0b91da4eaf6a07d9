"""The distillation objective as a list of terms: each term owns its name, what it needs and its (sum, unit count).

    loss = Σ_terms w_term(step) · (Σ_units loss) / (global unit count)

A `Term` declares the student layers whose attention inputs it needs, the cached target maps it reads (with the
temperature of their tail sums) and its unit (CE: labels ≠ -100; KD: positions; attention and relations: query
rows, each row already averaged over heads and matched layers), and returns the SUM over its units of one batch.
The trainer divides each sum once by the unit count of all micro-batches of all ranks (`dist.term_means`), so the
loss and gradient do not depend on how a global batch is split. The trainer, the evaluator, MLflow metric names
(`train/loss_<name>`, `eval/loss_<name>`) and the cache reader all iterate over the configured terms: adding a term
touches this module and the config, nothing else.

The student runs with SDPA; its matched layers record their post-RoPE queries and keys (`AttentionCapture` with
`eager=False`) and the attention and relation terms recompute scores from them in row blocks (`map_losses`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.models.capture import AttentionCapture, ScoreInputs
from pipeline.ops.kd import IGNORE_INDEX, logit_losses
from pipeline.ops.map_losses import map_loss_sum
from pipeline.ops.relations import RELATIONS, relation_loss_sum, states_for_relations
from pipeline.targets.layout import TargetRequest, map_name, relation_name


@dataclass
class StudentForward:
    """One student forward on one batch, shared by the terms: logits, the captured score inputs of its matched
    layers, and the fused CE/KD sums (one pass over the vocabulary serves both terms)."""

    logits: Tensor
    inputs: dict[int, ScoreInputs]
    batch: dict[str, Any]
    _logit_sums: dict[float, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def logit_sums(self, kd_temperature: float) -> tuple[Tensor, Tensor]:
        """(Σ CE over labels ≠ -100, Σ τ²-scaled top-k KD over positions), computed once per temperature."""
        if kd_temperature not in self._logit_sums:
            labels = self.batch["labels"]
            self._logit_sums[kd_temperature] = logit_losses(
                self.logits,
                labels,
                self.batch["topk_values"],
                self.batch["topk_indices"],
                self.batch["topk_tail"],
                torch.ones_like(labels, dtype=torch.bool),
                temperature=kd_temperature,
                reduction="sum",
            )
        return self._logit_sums[kd_temperature]


class Term(ABC):
    """One loss term. Subclasses set `name` and implement `count` and `loss_sum`."""

    name: str
    weight: float

    def capture_layers(self) -> set[int]:
        """Student layers whose score inputs (q, k, v) this term reads."""
        return set()

    def maps(self) -> list[tuple[str, float]]:
        """Cached target maps this term reads, each with the temperature of the tail sums it needs."""
        return []

    @abstractmethod
    def count(self, batch: dict[str, Any]) -> float:
        """The number of units of `batch` the term's sum runs over."""

    @abstractmethod
    def loss_sum(self, forward: StudentForward) -> Tensor:
        """Σ over the batch's units of this term's loss: fp32 scalar with autograd graph."""


@dataclass
class CrossEntropy(Term):
    """Task cross-entropy of the next token, summed over labels ≠ -100."""

    weight: float
    kd_temperature: float
    name: str = "ce"

    def count(self, batch: dict[str, Any]) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, forward: StudentForward) -> Tensor:
        return forward.logit_sums(self.kd_temperature)[0]


@dataclass
class LogitKD(Term):
    """τ² · KL over the teacher's top k + one tail bucket, exact at every cached τ; summed over positions."""

    weight: float
    temperature: float
    name: str = "kd"

    def count(self, batch: dict[str, Any]) -> float:
        return float(batch["labels"].numel())

    def loss_sum(self, forward: StudentForward) -> Tensor:
        return forward.logit_sums(self.temperature)[1]


def _query_rows(batch: dict[str, Any]) -> float:
    """Query rows of a batch: packed sequences have no padding, so every position is one."""
    return float(batch["input_ids"].numel())


@dataclass
class AttentionKD(Term):
    """Attention distillation: per student layer j, its maps against the cached teacher map `targets[j]` (headwise
    squeezed, selective, or with `head_mean` the global mean map), per query row averaged over heads and matched
    layers; summed over query rows."""

    weight: float
    targets: tuple[str, ...]
    """Target map name of each student layer j (`layout.map_name` of teacher layer m(j))."""
    kind: str = "kl"
    temperature: float = 1.0
    head_mean: bool = False
    drop_sink: bool = False
    """Leave out the first key (the attention sink) on both sides, the rows renormalised over the others, and the
    first query row (it sees only that key)."""
    name: str = "attn"

    def capture_layers(self) -> set[int]:
        return set(range(len(self.targets)))

    def maps(self) -> list[tuple[str, float]]:
        return [(target, self.temperature) for target in self.targets]

    def count(self, batch: dict[str, Any]) -> float:
        batch_size, seq_len = batch["input_ids"].shape
        return float(batch_size * (seq_len - 1)) if self.drop_sink else _query_rows(batch)

    def loss_sum(self, forward: StudentForward) -> Tensor:
        mask = None
        if self.drop_sink:
            mask = torch.ones_like(forward.batch["input_ids"], dtype=torch.bool)
            mask[:, 0] = False
        total = None
        for layer, target in enumerate(self.targets):
            inputs = forward.inputs[layer]
            part = map_loss_sum(
                inputs.query,
                inputs.key,
                inputs.scale,
                forward.batch["maps"][target],
                kind=self.kind,
                temperature=self.temperature,
                head_mean=self.head_mean,
                query_mask=mask,
                key_mask=mask,
            )
            total = part if total is None else total + part
        return total / len(self.targets)


@dataclass
class RelationKD(Term):
    """MiniLMv2 Q-Q/K-K/V-V relations over R relation heads (τ = 1), averaged over relations and matched layers;
    summed over query rows."""

    weight: float
    targets: tuple[tuple[str, str, str], ...]
    """(q, k, v) relation map names of each student layer j."""
    relation_heads: int
    name: str = "rel"

    def capture_layers(self) -> set[int]:
        return set(range(len(self.targets)))

    def maps(self) -> list[tuple[str, float]]:
        return [(target, 1.0) for names in self.targets for target in names]

    def count(self, batch: dict[str, Any]) -> float:
        return _query_rows(batch)

    def loss_sum(self, forward: StudentForward) -> Tensor:
        total = None
        for layer, names in enumerate(self.targets):
            inputs = forward.inputs[layer]
            states = states_for_relations(inputs.query, inputs.key, inputs.value)
            targets = [forward.batch["maps"][name] for name in names]
            part = relation_loss_sum(states, targets, self.relation_heads)
            total = part if total is None else total + part
        return total / len(self.targets)


@dataclass
class WeightSchedule:
    """Weights of the attention-transfer terms over optimizer steps: constant, or linear decay to 0."""

    kind: str = "constant"
    decay_steps: int = 1
    scheduled: tuple[str, ...] = ("attn", "rel")

    def varies(self, name: str) -> bool:
        """Whether term `name`'s weight changes over the steps (then the trainer logs it as `train/w_<name>`)."""
        return self.kind != "constant" and name in self.scheduled

    def factor(self, name: str, step: int) -> float:
        """Multiplier of term `name`'s weight at the optimizer step with 0-based index `step`."""
        if not self.varies(name):
            return 1.0
        return max(0.0, 1.0 - step / self.decay_steps)


class Objective:
    """The configured terms, in a fixed order; every per-term tensor below is in this order."""

    def __init__(self, terms: Sequence[Term], schedule: WeightSchedule | None = None) -> None:
        if not terms:
            raise ValueError("an objective needs at least one term")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be distinct, got {names}")
        self.terms = list(terms)
        self.schedule = schedule or WeightSchedule()

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def capture_layers(self) -> list[int]:
        """Student layers to capture score inputs of: what the terms with a weight (or, in evaluation, any term)
        read."""
        return sorted(set().union(*(term.capture_layers() for term in self.terms)))

    def request(self) -> TargetRequest:
        """The cached tensors the terms read (logits always: CE and KD share their pass)."""
        maps = dict.fromkeys(pair for term in self.terms for pair in term.maps())
        kd_temperature = next((term.temperature for term in self.terms if isinstance(term, LogitKD)), 1.0)
        return TargetRequest(tuple(maps), kd_temperature)

    def weights(self, step: int) -> Tensor:
        """[n_terms] float64 weights at the optimizer step with 0-based index `step`."""
        return torch.tensor(
            [term.weight * self.schedule.factor(term.name, step) for term in self.terms], dtype=torch.float64
        )

    def counts(self, batch: dict[str, Any]) -> Tensor:
        """[n_terms] float64 unit counts of one batch."""
        return torch.tensor([term.count(batch) for term in self.terms], dtype=torch.float64)

    @contextlib.contextmanager
    def forward(self, model: nn.Module, module: nn.Module, batch: dict[str, Any]) -> Iterator[StudentForward]:
        """Run the student on `batch` (already on its device) and yield what the terms need; `model` is what is
        called (a DeepSpeed engine or the module), `module` the bare model whose attention is captured. With
        activation checkpointing, run the backward inside the block: the recomputed forward must record again."""
        with AttentionCapture(module, self.capture_layers(), eager=False) as capture:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            yield StudentForward(logits, capture.inputs, batch)

    def sums(self, forward: StudentForward) -> Tensor:
        """[n_terms] fp32 sums of one batch, with autograd graph."""
        return torch.stack([term.loss_sum(forward).float() for term in self.terms])


def build_objective(config: Config, teacher_layers: Sequence[int], *, evaluation: bool = False) -> Objective:
    """The terms of `config.distill` for a student whose layer j matches teacher layer `teacher_layers[j]`.

    Training keeps the terms with a positive weight (CE and KD always: their fused pass costs one vocabulary
    pass whatever their weights). `evaluation=True` keeps every term whose targets a run is guaranteed to have (CE,
    KD, attention; relations when configured), at the configured kinds and temperatures, weights left as set.
    """
    distill = config.distill
    heads = config.student.num_heads
    kind = config.attention_kind()
    terms: list[Term] = [
        CrossEntropy(distill.w_ce, distill.kd_temperature),
        LogitKD(distill.w_kd, distill.kd_temperature),
    ]
    if distill.w_attn > 0 or evaluation:
        terms.append(
            AttentionKD(
                distill.w_attn,
                tuple(map_name(layer, kind, heads) for layer in teacher_layers),
                kind=distill.attn_loss,
                temperature=distill.attn_temperature,
                head_mean=kind == "global",
                drop_sink=distill.attn_sink == "drop",
            )
        )
    if distill.w_rel > 0:
        rel_heads = distill.rel_heads
        terms.append(
            RelationKD(
                distill.w_rel,
                tuple(
                    tuple(relation_name(layer, rel_heads, relation) for relation in RELATIONS)
                    for layer in teacher_layers
                ),
                rel_heads,
            )
        )
    decay = distill.attn_decay_steps or config.train.max_steps
    return Objective(terms, WeightSchedule(distill.attn_schedule, decay))


def attention_yardstick(config: Config, teacher_layers: Sequence[int]) -> AttentionKD:
    """The attention KL at τ = 1 against the run's own targets, sink included: `eval/attn_kl`, comparable across runs
    whatever attention loss, temperature, sink handling or weight they trained with."""
    kind = config.attention_kind()
    return AttentionKD(
        1.0,
        tuple(map_name(layer, kind, config.student.num_heads) for layer in teacher_layers),
        head_mean=kind == "global",
        name="attn_kl",
    )
