"""Greedy text from the teacher and from the students of a `distill run`, each before and after training.

A perplexity says how far a student is from the teacher; a few lines of text say what that means. For every
variant named (default: all of the config's `run.variants` that finished), the student is rebuilt as its run built
it at step 0 (random weights from the run's seed, the pretrained directory, or the carve from the teacher with the
train cache's α statistics; in a scratch directory, so the run's own records stay untouched) and its export in
`train.output_dir/<variant>/student` is loaded; both continue `--prompt` greedily with a repetition penalty (plain
greedy settles into a loop of newlines at these perplexities). Reproducible: no sampling.

    .venv/bin/python benchmarks/samples.py configs/shakespeare.yaml --variants carved_shd_kd shd_kd
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

from _common import greedy_text, step0_student  # benchmarks/ is on sys.path when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import config_from_dict, load_config, variant
from pipeline.infra.runtime import configure_logging
from pipeline.models.loading import load_teacher
from pipeline.training.checkpoints import STUDENT


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the config `distill run` trained (e.g. configs/demo.yaml)")
    parser.add_argument("--variants", nargs="+", default=None, help="run.variants to show (default: every finished)")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repetition-penalty", type=float, default=1.3, help="1: plain greedy")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    configure_logging("WARNING")
    config = load_config(args.config)
    unknown = sorted(set(args.variants or ()) - set(config.run.variants))
    if unknown:
        raise SystemExit(f"--variants: {unknown} not in run.variants of {args.config} ({sorted(config.run.variants)})")
    names = args.variants or [
        name for name in config.run.variants if (Path(variant(config, name).train.output_dir) / STUDENT).is_dir()
    ]
    if not names:
        raise SystemExit(f"{args.config}: no finished variant under {config.train.output_dir} (run distill run first)")
    tokenizer = AutoTokenizer.from_pretrained(config.teacher.path)
    greedy = partial(
        greedy_text,
        tokenizer=tokenizer,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        repetition_penalty=args.repetition_penalty,
    )
    print(
        f"greedy continuations of {args.prompt!r}, {args.new_tokens} tokens, repetition penalty "
        f"{args.repetition_penalty:g}"
    )
    print(f"\n[teacher]\n{greedy(load_teacher(config.teacher.path))}")
    for name in names:
        run = variant(config, name)
        with tempfile.TemporaryDirectory(prefix="samples-") as scratch:
            # The run's own directory keeps its records: the rebuilt carve writes its record into the scratch one.
            before = step0_student(config_from_dict(run.to_dict(), [f"train.output_dir={scratch}"]))
            print(f"\n[{name}, step 0]\n{greedy(before)}")
        after = AutoModelForCausalLM.from_pretrained(Path(run.train.output_dir) / STUDENT)
        print(f"\n[{name}, step {run.train.max_steps}]\n{greedy(after)}")


if __name__ == "__main__":
    main()
