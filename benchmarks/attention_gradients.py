"""Where the attention term's gradient spikes come from: a diagnostic of the attention-distillation gradient along a
short training run, on the real cache of a config (the demo's by default).

The run mirrors `distill train` in one process without DeepSpeed (the same student — scratch, pretrained or carved
— objective, AdamW, LR schedule and gradient clipping, the cache read in the trainer's order) and records at every
step, on the step's own batch and parameters, before the update:

- the pre-clip gradient norm of the whole loss, of the logit terms alone (CE + KD) and of the attention term alone
  (each term's own `torch.autograd.grad`), the cosine between the logit and attention gradients, and the norm of
  the attention term's gradient with respect to the captured queries and keys (where it enters the network);
- the attention term's gradient as the previous round computed it — the student's full maps softmax(q kᵀ · scale)
  formed in the forward and KL taken with log of the probabilities clamped at the smallest normal fp32 — and its
  relative difference from the gradient from scores (`map_losses`): if they agree, the formulation is not what
  spikes;
- what the targets ask for: the target mass on the first key (the attention sink) and the student's, the largest
  score |q·k·scale| of the student, and the share of the attention loss from rows whose target puts ≥ 0.5 on the sink.

    .venv/bin/python benchmarks/attention_gradients.py                         # demo config, 24 steps
    .venv/bin/python benchmarks/attention_gradients.py --steps 48 distill.attn.temperature=2.0
    .venv/bin/python benchmarks/attention_gradients.py --csv reports/attention_gradients.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, load_config
from pipeline.infra import dist
from pipeline.infra.runtime import configure_logging, to_device
from pipeline.objective.loss import build_objective
from pipeline.objective.terms.attention import AttentionKD
from pipeline.ops.map_losses import ScoreInputs, student_log_probs
from pipeline.stages.context import open_run
from pipeline.students import build_student_model
from pipeline.targets.encoding import unpack_triangle
from pipeline.training.schedule import make_scheduler

TINY = torch.finfo(torch.float32).tiny


def _norm(gradients: list[torch.Tensor | None]) -> float:
    squares = [gradient.double().square().sum() for gradient in gradients if gradient is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def _flat(gradients: list[torch.Tensor | None], parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [
            (gradient if gradient is not None else torch.zeros_like(parameter)).flatten().double()
            for gradient, parameter in zip(gradients, parameters, strict=True)
        ]
    )


def clamped_log_attention_sum(term: AttentionKD, forward: Any) -> torch.Tensor:
    """The previous round's attention KL summed over query rows (dense targets, τ = 1): full student maps formed in
    the forward, log of the probabilities clamped at the smallest normal fp32, averaged over heads and layers."""
    total = None
    for layer, name in enumerate(term.targets):
        inputs = forward.inputs[layer]
        seq_len = inputs.query.shape[2]
        maps = student_log_probs(inputs.query, inputs.key, inputs.scale, 0, seq_len, head_mean=term.head_mean).exp()
        target = unpack_triangle(forward.batch["maps"][name].packed, seq_len)
        log_ratio = target.clamp_min(TINY).log() - maps.clamp_min(TINY).log()
        part = torch.where(target > 0, target * log_ratio, 0.0).sum(-1).mean(1).sum()
        total = part if total is None else total + part
    return total / len(term.targets)


def attention_input_gradient_norm(term: AttentionKD, forward: Any, factor: float) -> float:
    """Norm of the attention term's gradient at each matched layer's captured queries and keys — the partial
    derivative there (recomputed on detached copies, so no later layer's path is counted), where the term's
    gradient enters the network."""
    copies = {
        layer: ScoreInputs(*(tensor.detach().requires_grad_() for tensor in inputs[:3]), inputs.scale)
        for layer, inputs in forward.inputs.items()
    }
    loss = term.loss_sum(dataclasses.replace(forward, inputs=copies)) * factor
    leaves = [tensor for inputs in copies.values() for tensor in inputs[:2]]
    gradients = torch.autograd.grad(loss, leaves, allow_unused=True)
    return _norm(list(gradients))


def sink_figures(term: AttentionKD, forward: Any) -> dict[str, float]:
    """Target and student mass on key 0 (rows 1..T−1), the largest |score|, and the share of the attention loss from
    rows whose target puts ≥ 0.5 on key 0."""
    target_sink, student_sink, max_score, sink_loss, all_loss = [], [], 0.0, 0.0, 0.0
    with torch.no_grad():
        for layer, name in enumerate(term.targets):
            inputs = forward.inputs[layer]
            seq_len = inputs.query.shape[2]
            log_probs = student_log_probs(
                inputs.query.float(), inputs.key.float(), inputs.scale, 0, seq_len, head_mean=term.head_mean
            )
            target = unpack_triangle(forward.batch["maps"][name].packed, seq_len)
            target_sink.append(target[..., 1:, 0].mean().item())
            student_sink.append(log_probs[..., 1:, 0].exp().mean().item())
            key = inputs.key.float().repeat_interleave(inputs.query.shape[1] // inputs.key.shape[1], dim=1)
            scores = inputs.query.float() @ key.transpose(-1, -2) * inputs.scale
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
            max_score = max(max_score, scores.masked_fill(~causal, 0.0).abs().max().item())
            rows = torch.where(target > 0, target * (target.clamp_min(TINY).log() - log_probs), 0.0).sum(-1)
            sink_loss += rows[target[..., 0] >= 0.5].sum().item()
            all_loss += rows.sum().item()
    return {
        "target_sink": statistics.mean(target_sink),
        "student_sink": statistics.mean(student_sink),
        "max_score": max_score,
        "sink_row_loss_share": sink_loss / max(all_loss, 1e-30),
    }


def diagnose(config: Config, steps: int) -> list[dict[str, float]]:
    context = open_run(config)
    config = context.config
    objective = build_objective(config, context.teacher_layers)
    attention = next((term for term in objective.terms if isinstance(term, AttentionKD)), None)
    if attention is None:
        raise SystemExit("the config has no attention term (distill.attn.weight = 0): nothing to diagnose")
    if not attention.is_yardstick():
        print(
            "note: the attention term is not the τ = 1 KL with the sink kept (distill.attn.temperature, "
            "distill.attn.sink), which the clamped-log gradient computes: old_vs_new_attn_grad includes that difference"
        )
    # The run's targets and its student, as `distill train` builds them (a carve reads the cache's α statistics).
    targets = context.target_source(objective.needs())
    student = build_student_model(config, context.teacher_config, targets=targets)
    named = [(name, parameter) for name, parameter in student.named_parameters() if parameter.requires_grad]
    parameters = [parameter for _, parameter in named]
    train = config.train
    optimizer = torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = make_scheduler(optimizer, config)
    batches = targets.batches(
        batch_size=train.micro_batch_size, seed=train.seed, start_position=0, rank=0, world_size=1
    )
    names = objective.names
    records = []
    for step in range(steps):
        batch = to_device(next(batches), torch.device("cpu"))
        weights = objective.weights(step)
        counts = objective.counts(batch)
        with objective.forward(student, student, batch) as forward:
            sums = objective.sums(forward)
            terms = dict(zip(names, (sums / counts.clamp_min(1)).unbind(), strict=True))
            attn, ce, kd = names.index("attn"), names.index("ce"), names.index("kd")
            logit_loss = weights[ce] * terms["ce"] + weights[kd] * terms["kd"]
            attention_loss = weights[attn] * terms["attn"]
            old_loss = weights[attn] * clamped_log_attention_sum(attention, forward) / counts[attn]
            logit_grad = torch.autograd.grad(logit_loss, parameters, retain_graph=True, allow_unused=True)
            attention_grad = torch.autograd.grad(attention_loss, parameters, retain_graph=True, allow_unused=True)
            old_grad = torch.autograd.grad(old_loss, parameters, retain_graph=True, allow_unused=True)
            input_norm = attention_input_gradient_norm(attention, forward, weights[attn] / counts[attn])
            figures = sink_figures(attention, forward)
            optimizer.zero_grad(set_to_none=True)
            (sums * (weights / counts.clamp_min(1)).float()).sum().backward()
        total_norm = float(torch.nn.utils.clip_grad_norm_(parameters, train.grad_clip or float("inf")))
        optimizer.step()
        scheduler.step()
        attention_flat, old_flat = _flat(attention_grad, parameters), _flat(old_grad, parameters)
        logit_flat = _flat(logit_grad, parameters)
        record = {
            "step": step + 1,
            **{f"loss_{name}": float(value.detach()) for name, value in terms.items()},
            "grad_norm": total_norm,
            "grad_norm_logits": _norm(list(logit_grad)),
            "grad_norm_attn": _norm(list(attention_grad)),
            "grad_norm_attn_inputs": input_norm,
            "attn_grad_top_params": " ".join(
                f"{name}={norm:.3g}"
                for norm, name in sorted(
                    (
                        (float(gradient.norm()), name)
                        for (name, _), gradient in zip(named, attention_grad, strict=True)
                        if gradient is not None
                    ),
                    reverse=True,
                )[:3]
            ),
            "cos_logits_attn": float(
                (logit_flat @ attention_flat) / (logit_flat.norm() * attention_flat.norm()).clamp_min(1e-30)
            ),
            "old_vs_new_attn_grad": float((old_flat - attention_flat).norm() / attention_flat.norm().clamp_min(1e-30)),
            **figures,
        }
        records.append(record)
        print(
            json.dumps({key: round(value, 5) if isinstance(value, float) else value for key, value in record.items()})
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    parser.add_argument("--config", type=Path, default=Path("configs/shakespeare.yaml"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-step records here")
    args = parser.parse_args()
    configure_logging("WARNING")
    config = load_config(args.config, ["train.mode=cached", "mlflow.enabled=false", *args.overrides])
    if config.distill.attn.loss != "kl" or config.distill.attn.match == "global":
        raise SystemExit(
            "this diagnostic compares per-head KL formulations: use distill.attn.loss=kl and distill.attn.match "
            "headwise or selective"
        )
    with dist.launcher_environment():
        records = diagnose(config, args.steps)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    peak = max(records, key=lambda record: record["grad_norm"])
    print(
        f"\nsteps {len(records)}: max pre-clip grad norm {peak['grad_norm']:.3g} at step {peak['step']} "
        f"(attention alone {peak['grad_norm_attn']:.3g}, logits alone {peak['grad_norm_logits']:.3g}); "
        f"median grad norm {statistics.median(r['grad_norm'] for r in records):.3g}; "
        f"largest relative difference of the clamped-log attention gradient from the gradient from scores: "
        f"{max(r['old_vs_new_attn_grad'] for r in records):.2e}"
    )


if __name__ == "__main__":
    main()
