"""Where a student starts (`student.init`), on the real teacher: perplexity at step 0 and after the demo's budget.

Every run is the real `distill train` (`stages.train.train_stage`: DeepSpeed, one process, fp32, MLflow off) on the
demo config, one after the other in this process: the demo's student shape (4 layers × 384, 3 heads on 1 KV head,
MLP 1024), data, budget (24 steps of 4 × 256 tokens, lr 2e-3, warm-up 3, cosine) and cache size (the first 64 train
and validation samples), evaluated at step 0 (before the first update) and at the end on the demo's 4 validation
batches.

Rows, each with KD (CE + top-k logit KD, `distill.attn.weight=0`) and with SHD + KD (the demo's objective at
attention weight 1, constant, the sink kept):

  scratch             random weights, layer map `uniform` ([6, 14, 21, 29] of 30)
  teacher, prune      carved from the teacher: layers by `distill.layer_map=spread` ([0, 10, 19, 29]), each head the
                      most important of its SHD group, KV heads averaged, MLP and width pruned by activation
  teacher, merge      the same, each head the α-weighted average of its group (α from the cache's SHD statistics)
  teacher, fill       merge, and each kept layer fitted to the teacher's hidden state after the layers it stands for
                      (`student.carve.fill=linear`, ridge `student.carve.fill_ridge`, the config's: 1 by default)
  teacher, importance the better head init of the two, layers by block importance (`student.carve.layers`)
  teacher, selective  (SHD + KD replaced by selective + KD) each head the cache's selected teacher head

The cache is built first into `--work-dir` (the demo's cache holds only the `uniform` layers): every teacher layer any
row matches (the importance layers come from a calibration pass made before it), SHD and selective targets for 3
heads. The carve's wall time is read from each run's `student_init.json` (teacher load, calibration once per process,
the carve itself). Afterwards the `--sample-row` student (default: the carved row the demo's `shd_kd` variant
uses, merge heads, linear fill, SHD + KD) writes greedy text from `--prompt` before training (the carve, rebuilt
exactly) and after (its export), next to the teacher and the scratch student of the same objective.

The machine is shared: perplexities do not depend on the load, wall times do.

    .venv/bin/python benchmarks/student_init.py
    .venv/bin/python benchmarks/student_init.py --rows scratch merge fill --seeds 0 1 2   # the headline, 3 seeds
    .venv/bin/python benchmarks/student_init.py --max-steps 2 --rows scratch prune   # a smoke run

With several `--seeds` (`train.seed`: the data order, and a scratch student's weights) every run is repeated per
seed and the table gives the mean and each seed's figure; the headline ratio is of the means, with its per-seed
values.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _common import greedy_text, step0_student  # benchmarks/ is on sys.path when run as a script

from pipeline.config import Config, load_config
from pipeline.infra.runtime import configure_logging
from pipeline.models.loading import load_teacher, load_teacher_config
from pipeline.objective.loss import matched_layers
from pipeline.ops.matching import layer_map
from pipeline.stages.cache import cache_stage
from pipeline.stages.prepare import prepare_stage
from pipeline.stages.teacher import teacher_stage
from pipeline.stages.train import train_stage
from pipeline.students import resolve
from pipeline.students.carved import RECORD_FILE
from pipeline.training.trainer import METRICS_LOG

REPO = Path(__file__).resolve().parents[1]
KD = ("distill.attn.weight=0",)
SHD_KD = ("distill.attn.weight=1", "distill.attn.match=headwise", "distill.attn.squeeze=shd")
CARVED = ("student.init=teacher", "distill.layer_map=spread", "student.carve.fill=none")
"""A carved row without the fill unless it says so (the demo config fills)."""
ROWS = ("scratch", "prune", "merge", "fill", "importance", "selective")


@dataclass
class Run:
    """One training run of the table."""

    name: str
    init: str
    objective: str
    overrides: tuple[str, ...]
    seed: int = 0
    ppl_start: float = float("nan")
    ppl_end: float = float("nan")
    top1_end: float = float("nan")
    seconds: float = float("nan")
    record: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shakespeare.yaml")
    parser.add_argument("--work-dir", type=Path, default=REPO / "work" / "bench" / "student_init")
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps (default: the config's)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed values; each run per seed")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument(
        "--sample-row",
        default="fill_shd_kd",
        help="the carved run whose text is shown (default: the demo's shd_kd student); else the best carved",
    )
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.3,
        help="greedy decoding with this penalty on tokens already written (1: plain greedy, which settles into a "
        "loop of newlines or commas at these perplexities)",
    )
    return parser.parse_args()


def base_config(args: argparse.Namespace, cache_layers: list[int], *extra: str) -> Config:
    """The demo config with this benchmark's cache, evaluation at step 0 and the end only, no MLflow."""
    overrides = [
        f"cache.output_dir={args.work_dir / 'targets'}",
        f"cache.layers={json.dumps(cache_layers)}",
        "cache.head_counts=[3]",
        "cache.attn_targets=[shd, selective]",
        f"train.output_dir={args.work_dir / 'runs'}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.keep_checkpoints=1",
        "train.resume=never",
        "mlflow.enabled=false",
        # The objective of the table's rows as measured, whatever the demo's defaults became since.
        "distill.schedule=constant",
        "distill.attn.sink=keep",
        *([f"train.max_steps={args.max_steps}"] if args.max_steps else []),
        *extra,
    ]
    return load_config(args.config, overrides)


def planned_runs(rows: list[str], head_init: str) -> list[Run]:
    """The runs of `rows`; the importance row carves heads with `head_init` (the better of prune and merge)."""
    runs = []
    for row in rows:
        if row == "scratch":
            init, carve = "scratch", ("student.init=scratch", "distill.layer_map=uniform")
        elif row in ("prune", "merge"):
            init, carve = f"teacher, {row}", (*CARVED, f"student.carve.heads={row}")
        elif row == "fill":
            init, carve = (
                "teacher, merge, linear fill",
                (*CARVED, "student.carve.heads=merge", "student.carve.fill=linear"),
            )
        elif row == "importance":
            init = f"teacher, {head_init}, layers by importance"
            carve = (
                "student.init=teacher",
                "student.carve.layers=importance",
                f"student.carve.heads={head_init}",
                "student.carve.fill=none",
            )
        else:
            selective = ("distill.attn.weight=1", "distill.attn.match=selective")
            runs.append(Run("selective_kd", "teacher, selective heads", "selective + KD", (*CARVED, *selective)))
            continue
        runs.append(Run(f"{row}_kd", init, "KD", (*carve, *KD)))
        runs.append(Run(f"{row}_shd_kd", init, "SHD + KD", (*carve, *SHD_KD)))
    return runs


def eval_records(output_dir: Path) -> dict[int, dict[str, float]]:
    """step → the evaluation record of `metrics.jsonl` (records without `train/loss`)."""
    records = {}
    for line in (output_dir / METRICS_LOG).read_text().splitlines():
        record = json.loads(line)
        if "eval/ppl" in record:
            records[record["step"]] = record
    return records


def train_run(args: argparse.Namespace, run: Run, cache_layers: list[int], num_teacher_layers: int) -> None:
    """Train `run` from scratch into its own directory and fill in its figures."""
    output_dir = args.work_dir / "runs" / f"{run.name}-seed{run.seed}"
    shutil.rmtree(output_dir, ignore_errors=True)
    config = base_config(args, cache_layers, f"train.output_dir={output_dir}", f"train.seed={run.seed}", *run.overrides)
    run.layers = matched_layers(resolve(config), num_teacher_layers)
    started = time.perf_counter()
    train_stage(config, overwrite=True)
    run.seconds = time.perf_counter() - started
    evaluations = eval_records(output_dir)
    first, last = evaluations[min(evaluations)], evaluations[max(evaluations)]
    run.ppl_start, run.ppl_end, run.top1_end = first["eval/ppl"], last["eval/ppl"], last["eval/top1_agreement"]
    record_file = output_dir / RECORD_FILE
    run.record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    print(
        f"  {run.name:<22} seed {run.seed} ppl {run.ppl_start:>12,.1f} → {run.ppl_end:>8,.1f}   layers {run.layers}   "
        f"{run.seconds:.0f} s",
        flush=True,
    )


def samples(args: argparse.Namespace, carved: Run, scratch: Run, cache_layers: list[int]) -> list[tuple[str, str]]:
    """(who, text) for the teacher, the `carved` student before and after training, the `scratch` student after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The carve rebuilt exactly as the run's trainer built it (its record goes elsewhere, the run's stays).
    output_dir = args.work_dir / "step0"
    config = base_config(args, cache_layers, f"train.output_dir={output_dir}", *carved.overrides)
    greedy = partial(
        greedy_text,
        tokenizer=AutoTokenizer.from_pretrained(config.teacher.path),
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        repetition_penalty=args.repetition_penalty,
    )
    texts = [("teacher", greedy(load_teacher(config.teacher.path)))]
    texts.append((f"{carved.name}, step 0 (carved)", greedy(step0_student(config))))
    for run in (carved, scratch):
        exported = AutoModelForCausalLM.from_pretrained(
            args.work_dir / "runs" / f"{run.name}-seed{run.seed}" / "student"
        )
        texts.append((f"{run.name}, after training", greedy(exported)))
    return texts


def main() -> None:
    args = parse_args()
    configure_logging("WARNING")
    logging.getLogger("pipeline.students").setLevel(logging.INFO)
    args.work_dir = args.work_dir.resolve()
    demo = load_config(args.config)
    teacher_stage(demo)
    prepare_stage(demo)
    num_teacher_layers = load_teacher_config(demo.teacher.path).num_hidden_layers
    steps = args.max_steps or demo.train.max_steps

    started = time.perf_counter()
    num_layers = resolve(demo).student.num_layers
    layers = {spec: layer_map(num_layers, num_teacher_layers, spec) for spec in ("uniform", "spread")}
    if "importance" in args.rows:
        probe = base_config(args, layers["uniform"], "student.init=teacher", "student.carve.layers=importance")
        layers["importance"] = resolve(probe).distill.layer_map
    cache_layers = sorted({layer for chosen in layers.values() for layer in chosen})
    print(f"teacher layers: {layers}; caching {cache_layers} ({time.perf_counter() - started:.0f} s)", flush=True)
    started = time.perf_counter()
    cache_stage(base_config(args, cache_layers))
    print(f"cache stage: {time.perf_counter() - started:.0f} s", flush=True)

    runs: list[Run] = []
    first = [row for row in args.rows if row != "importance"]
    for seed in args.seeds:
        for run in planned_runs(first, "prune"):
            run.seed = seed
            train_run(args, run, cache_layers, num_teacher_layers)
            runs.append(run)
    heads = {
        head_init: min(mean_ppl(runs, run.name) for run in runs if run.name.startswith(head_init))
        for head_init in ("prune", "merge")
        if any(run.name.startswith(head_init) for run in runs)
    }
    winner = min(heads, key=heads.get) if heads else None
    if "importance" in args.rows:
        for seed in args.seeds:
            for run in planned_runs(["importance"], winner or "prune"):
                run.seed = seed
                train_run(args, run, cache_layers, num_teacher_layers)
                runs.append(run)
    report(args, runs, steps, winner, cache_layers)


def mean_ppl(runs: list[Run], name: str) -> float:
    """The mean final perplexity of run `name` over its seeds."""
    return statistics.fmean(run.ppl_end for run in runs if run.name == name)


def report(args: argparse.Namespace, runs: list[Run], steps: int, winner: str | None, cache_layers: list[int]) -> None:
    """The table (means over seeds, each seed's figure), the carve's wall time, the headline ratio, the samples;
    `winner` the better head init of prune and merge (None when neither row ran)."""
    names = list(dict.fromkeys(run.name for run in runs))
    first = {name: next(run for run in runs if run.name == name) for name in names}
    seeds = " / ".join(str(seed) for seed in args.seeds)
    print(f"\nstudent init, demo student 4 × 384, 3 heads on 1 KV head, MLP 1024; {steps} steps of 4 × 256 tokens")
    print(f"seeds {seeds}: eval ppl at the end is the mean over seeds, then each seed's\n")
    print(
        f"| init | objective | teacher layers | eval ppl step 0 | eval ppl step {steps} | per seed | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        mine = [run for run in runs if run.name == name]
        run = first[name]
        per_seed = " / ".join(f"{other.ppl_end:,.1f}" for other in mine)
        top1 = statistics.fmean(other.top1_end for other in mine)
        print(
            f"| {run.init} | {run.objective} | {run.layers} | {run.ppl_start:,.1f} | {mean_ppl(runs, name):,.1f} | "
            f"{per_seed} | {top1:.3f} |"
        )
    carved = [name for name in names if first[name].record]
    scratch = [name for name in names if not first[name].record]
    if carved:
        print("\ncarve wall time (s): teacher load / calibration (once per process) / carve (the fill included)")
        for name in carved:
            record = first[name].record
            print(
                f"  {name:<22} {record['teacher_load_seconds']:.1f} / {record['calibration_seconds']:.1f} / "
                f"{record['carve_seconds']:.2f}   heads {record['heads']}   fills {record.get('fills', [])}"
            )
    if carved and scratch:
        best = min(carved, key=lambda name: mean_ppl(runs, name))
        best_scratch = min(scratch, key=lambda name: mean_ppl(runs, name))
        ratio = mean_ppl(runs, best) / mean_ppl(runs, best_scratch)
        per_seed = [
            next(run.ppl_end for run in runs if run.name == best and run.seed == seed)
            / next(run.ppl_end for run in runs if run.name == best_scratch and run.seed == seed)
            for seed in args.seeds
        ]
        print(
            f"\nbest carved {best} {mean_ppl(runs, best):,.1f} ÷ best scratch {best_scratch} "
            f"{mean_ppl(runs, best_scratch):,.1f} = {ratio:.3f} (target ≤ 0.5; per seed "
            f"{' / '.join(f'{value:.3f}' for value in per_seed)})"
        )
        if winner is not None:
            print(f"better head init: {winner}")
        print(
            f"\ngreedy continuations of {args.prompt!r}, {args.new_tokens} tokens, repetition penalty "
            f"{args.repetition_penalty:g}:"
        )
        shown = first.get(args.sample_row, first[best])
        contrast = next(
            (first[name] for name in scratch if first[name].objective == shown.objective), first[best_scratch]
        )
        for who, text in samples(args, shown, contrast, cache_layers):
            print(f"\n[{who}]\n{text}")


if __name__ == "__main__":
    main()
