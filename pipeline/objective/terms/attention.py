"""`attn`: attention distillation (`distill.attn`). Per student layer j, the student's attention maps against the
teacher's cached target map of teacher layer m(j) — headwise squeezed (SHD), selective, or the global mean map —
per query row averaged over heads and matched layers; summed over the trained query rows the targets hold (every
row, or the sample of `cache.attn_row_fraction`; of chat data only the rows that predict a reply token — the prompt's
tokens stay keys every row may attend to).

The student's maps are recomputed from its captured post-RoPE queries and keys in row blocks
(`pipeline.ops.map_losses.map_loss_sum`); the forward keeps SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pipeline.errors import require
from pipeline.objective.terms.base import StudentForward, Term, TermContext, TermSpec
from pipeline.ops.map_losses import map_loss_sum
from pipeline.targets import kinds
from pipeline.targets.needs import MapNeed, stored_row_count, trained_rows

YARDSTICK = "attn_kl"
"""The evaluation metric `eval/attn_kl`: KL at τ = 1 against the run's own targets, sink included."""


@dataclass
class AttentionSection:
    """Attention distillation (`attn`): which teacher maps the student's attention is matched to, and how."""

    weight: float = 1.0
    """Weight of the attention term (see `match`)."""
    match: Literal["headwise", "global", "selective"] = "headwise"
    """What the term matches: `headwise` (each student head ↔ its teacher head group squeezed by `squeeze`),
    `global` (the mean of all teacher heads ↔ the mean of all student heads, one map per layer), or `selective`
    (the H_s teacher heads with the largest output share ‖A_h X_h‖, chosen once per cache, each ↔ one student
    head: the "hard head selection" baseline)."""
    squeeze: Literal["shd", "shd_pairwise", "uniform"] = "shd"
    """`headwise` targets: SHD α solved exactly per group (`shd`), the SHD paper's progressive pairwise merge of
    adjacent heads (`shd_pairwise`), or the uniform-α baseline (`uniform`)."""
    loss: Literal["kl", "mse", "cosine"] = "kl"
    """Loss per query row: KL(teacher ‖ student), squared error, or 1 − cosine (top-m targets: kl only)."""
    sink: Literal["keep", "drop"] = "keep"
    """The first key of every row (where LLMs park attention, the "sink": ~40 % of SmolLM2's mass): `keep` it, or
    `drop` it on both sides (rows renormalised over the other keys): a student from scratch on packed text cannot
    tell the first position by its content, and chasing the sink makes the attention gradient spike."""
    temperature: float = 1.0
    """Temperature τ applied to both maps before comparison (top-m targets: must be in `cache.temperatures`)."""

    def validate(self, key: str) -> None:
        require(self.weight >= 0, f"{key}.weight", self.weight, "a loss weight ≥ 0")
        require(self.temperature > 0, f"{key}.temperature", self.temperature, "a temperature > 0")

    def kind(self) -> str:
        """The target kind matched: the squeeze (headwise), `global` or `selective`."""
        return self.squeeze if self.match == "headwise" else self.match


@dataclass
class AttentionKD(Term):
    """The student's maps of layer j against the target map `targets[j]`, per query row averaged over heads and
    matched layers; summed over query rows."""

    weight: float
    needed: tuple[MapNeed, ...]
    """The target of each student layer j (one map each)."""
    kind: str = "kl"
    temperature: float = 1.0
    head_mean: bool = False
    drop_sink: bool = False
    """Leave out the first key (the attention sink) on both sides, the rows renormalised over the others, and the
    first query row (it sees only that key)."""
    name: str = "attn"

    @property
    def targets(self) -> tuple[str, ...]:
        """Target map name of each student layer."""
        return tuple(need.specs()[0].name for need in self.needed)

    def capture_layers(self) -> set[int]:
        return set(range(len(self.needed)))

    def needs(self) -> list[MapNeed]:
        return list(self.needed)

    def temperature_keys(self) -> list[tuple[str, float]]:
        return [("distill.attn.temperature", self.temperature)]

    def cache_problem(self, fingerprint: dict[str, Any]) -> str | None:
        if fingerprint["encoding"] != "dense" and self.kind != "kl":
            return (
                f"distill.attn.loss: got {self.kind!r}, but the targets store top-m attention rows "
                f"(cache.encoding: {fingerprint['encoding']}), which only the 'kl' loss can use; use 'kl' or a dense "
                "cache"
            )
        heads = {need.variant for need in self.needed if need.kind == "selective"}
        if heads and max(heads) > fingerprint["teacher_num_heads"]:
            return (
                f"distill.attn.match: 'selective' picks student.num_heads = {max(heads)} teacher heads, but the "
                f"teacher has {fingerprint['teacher_num_heads']}"
            )
        return None

    def count(self, batch: dict[str, Any]) -> float:
        return stored_row_count(batch, skip_first=self.drop_sink)

    def loss_sum(self, forward: StudentForward) -> Tensor:
        rows = trained_rows(forward.batch, skip_first=self.drop_sink)
        keys = None
        if self.drop_sink:
            keys = torch.ones_like(forward.batch["input_ids"], dtype=torch.bool)
            keys[:, 0] = False
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
                query_mask=rows,
                key_mask=keys,
            )
            total = part if total is None else total + part
        return total / len(self.targets)

    def yardstick(self) -> AttentionKD:
        """The τ = 1 KL against the same targets, sink included (`eval/attn_kl`): comparable across runs whatever
        attention loss, temperature, sink handling or weight they trained with."""
        needed = tuple(MapNeed(need.kind, need.layer, need.variant, 1.0) for need in self.needed)
        return AttentionKD(1.0, needed, head_mean=self.head_mean, name=YARDSTICK)

    def is_yardstick(self) -> bool:
        """Whether this term already is the yardstick's measurement."""
        return (self.kind, self.temperature, self.drop_sink) == ("kl", 1.0, False)


def build(section: AttentionSection, context: TermContext) -> Term | None:
    """On when weighted; in evaluation always (every run reports its attention KL)."""
    if section.weight <= 0 and not context.evaluation:
        return None
    kind = section.kind()
    variant = context.student_heads if kinds.get(kind).per_student_heads else None
    needed = tuple(MapNeed(kind, layer, variant, section.temperature) for layer in context.teacher_layers)
    return AttentionKD(
        section.weight,
        needed,
        kind=section.loss,
        temperature=section.temperature,
        head_mean=kind == "global",
        drop_sink=section.sink == "drop",
    )


SPEC = TermSpec(
    "attn",
    AttentionSection,
    build,
    order=2,
    scheduled=True,
    aliases={
        "w_attn": "weight",
        "attn_match": "match",
        "squeeze": "squeeze",
        "attn_loss": "loss",
        "attn_sink": "sink",
        "attn_temperature": "temperature",
    },
)
