"""Does a compact cache teach as well as the dense one? Two runs of `distill study configs/compression.yaml` (the
quality study's carved3 setting and frozen choices, SHD + KD and KD only, three seeds, test split): one on the dense
cache, one on the compact cache (top-m 16 at a quarter of the query rows, 8-bit attention values and logits). Both
are resumable; a finished one is only read. Printed, per seed and as mean ± std over seeds:

- test ppl of SHD + KD on each cache and the paired relative difference compact ÷ dense − 1; beside it the seed
  spread (std over seeds of the dense SHD + KD ppl, relative to its mean);
- the same for KD only: the only difference there is the 8-bit logits (issue target |Δ| ≤ 0.3 %);
- on each cache, SHD + KD against KD only, seed by seed (wins: seeds where SHD + KD is lower).

    .venv/bin/python benchmarks/compression_quality.py            # both studies (about 25 min on 2 cores), table
    .venv/bin/python benchmarks/compression_quality.py --plan     # what would run
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
from pathlib import Path

from pipeline.cli import main as distill

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/compression.yaml"
COMPACT = (
    "cache.encoding=topk",
    "cache.attn_top_m=16",
    "cache.attn_row_fraction=0.25",
    "cache.attn_value_bits=8",
    "cache.logit_value_bits=8",
)
CACHES = {"dense": (), "compact": COMPACT}


def study(name: str, overrides: tuple[str, ...], plan: bool) -> None:
    arguments = ["study", CONFIG, "--work", f"work/compression/{name}", "--report", f"reports/compression/{name}"]
    code = distill([*arguments, *(["--plan"] if plan else []), *overrides])
    if code != 0:
        raise SystemExit(f"distill study ({name} cache) exited {code}")


def test_ppl(name: str) -> dict[tuple[str, int], float]:
    """(variant, seed) → test ppl of the finished study on the `name` cache."""
    with open(REPO / "reports" / "compression" / name / "results.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["stage"] == "grid"]
    return {(row["variant"], int(row["seed"])): float(row["test/ppl"]) for row in rows}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print what each study would run, then stop")
    args = parser.parse_args()
    os.chdir(REPO)  # the config's relative paths are read from the repository root
    for name, overrides in CACHES.items():
        study(name, overrides, args.plan)
    if args.plan:
        return
    ppl = {name: test_ppl(name) for name in CACHES}
    seeds = sorted({seed for _, seed in ppl["dense"]})
    print("test ppl, carved3, seeds " + ", ".join(map(str, seeds)))
    print("| | " + " | ".join(f"seed {seed}" for seed in seeds) + " | compact ÷ dense − 1, % (mean ± std) |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for variant in ("shd_kd", "kd_only"):
        for name in CACHES:
            values = " | ".join(f"{ppl[name][variant, seed]:.2f}" for seed in seeds)
            print(f"| {variant}, {name} | {values} | |")
        deltas = [100 * (ppl["compact"][variant, seed] / ppl["dense"][variant, seed] - 1) for seed in seeds]
        print(
            f"| {variant}: compact ÷ dense − 1 (%) | "
            + " | ".join(f"{d:+.2f}" for d in deltas)
            + f" | {mean_std(deltas)} |"
        )
    dense_shd = [ppl["dense"]["shd_kd", seed] for seed in seeds]
    spread = 100 * statistics.stdev(dense_shd) / statistics.mean(dense_shd)
    print(f"seed spread of dense SHD + KD: std over seeds ÷ mean = {spread:.2f} %")
    for name in CACHES:
        gaps = [ppl[name]["shd_kd", seed] - ppl[name]["kd_only", seed] for seed in seeds]
        wins = sum(gap < 0 for gap in gaps)
        print(f"{name}: SHD + KD − KD only per seed {[round(gap, 2) for gap in gaps]}, wins {wins}/{len(seeds)}")


if __name__ == "__main__":
    main()
