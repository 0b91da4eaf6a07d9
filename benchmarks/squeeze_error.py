"""How much of a layer's attention output each squeeze loses, on the real teacher and real packed text.

For every sample, captured teacher layer and student head count H_s, the squeeze error of a grouping and its weights
is Σ_g ‖Σ_{i∈g} A_i X_i − (Σ_{i∈g} α_i A_i) Σ_{i∈g} X_i‖²_F (`shd.reconstruction_error`: each student head applies
one map to its group's summed value–output circuit), printed relative to the layer's attention output
‖Σ_h A_h X_h‖²_F. Methods:

- `uniform`: α = 1/r on `head_groups` (the baseline every ratio is taken against, sample by sample);
- `shd`: the exact simplex solve per group (`group_alphas`) on `head_groups`;
- `shd_pairwise`: SHD's Algorithm 1, adjacent pairs merged pass by pass with the closed-form pair α, on its own
  grouping (`squeeze_groups(..., "shd_pairwise")`, 9 → 3: [0..3] [4..7] [8]);
- `exact on pairwise groups`: `group_alphas` on the pairwise grouping (the best any α can do on those groups, so
  never above `shd_pairwise`), and `uniform on pairwise groups` beside it: together they separate what the grouping
  costs from what the pairwise α cost.

The ratio columns are the mean and the largest (worst) of error / uniform error over samples; "all" pools the
layers. α time is the wall time of the α computation alone, summed over batches (information only: a shared CPU).

    .venv/bin/python benchmarks/squeeze_error.py                              # 16 samples, layers 6 14 21 29, H_s 3 2
    .venv/bin/python benchmarks/squeeze_error.py --samples 4 --layers 14 --head-counts 3
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pipeline.data.prepare import load_prepared
from pipeline.models.capture import AttentionCapture, attention_dims
from pipeline.models.loading import load_teacher
from pipeline.ops.matching import head_groups, squeeze_groups
from pipeline.ops.shd import Circuits
from pipeline.ops.shd_maps import group_alphas, reconstruction_error, squeeze_heads

METHODS = ("uniform", "shd", "shd_pairwise", "exact on pairwise groups", "uniform on pairwise groups")


def layer_output_norm(maps: Tensor, circuits: Circuits) -> Tensor:
    """‖Σ_h A_h X_h‖²_F per sample [B] fp64, from `maps` [B, H, T, T] and the factored circuits."""
    values, output, kv_heads = circuits
    projected = maps.float() @ values.float()[:, list(kv_heads)]
    return torch.einsum("bhtk,hkd->btd", projected, output.float()).square().sum((-2, -1), dtype=torch.float64)


def exact_alphas(maps: Tensor, circuits: Circuits, groups: list[list[int]]) -> Tensor:
    """`group_alphas` on each of `groups` (contiguous) → α [B, H_t] fp32."""
    values, output, kv_heads = circuits
    alphas = maps.new_ones(maps.shape[:2], dtype=torch.float32)
    for group in groups:
        heads = slice(group[0], group[-1] + 1)
        # The group's heads with every KV head's values: `group_alphas` reads only the KV heads they use.
        alphas[:, heads] = group_alphas(maps[:, heads], Circuits(values, output[heads], kv_heads[heads]))
    return alphas


def uniform_alphas(num_teacher_heads: int, groups: list[list[int]], batch: int) -> Tensor:
    """1/r for every head of a group of r → [B, H_t] fp32."""
    alphas = torch.ones(batch, num_teacher_heads)
    for group in groups:
        alphas[:, group] = 1 / len(group)
    return alphas


def method_alphas(
    maps: Tensor, circuits: Circuits, num_student_heads: int
) -> dict[str, tuple[list[list[int]], Callable[[], Tensor]]]:
    """Each method's grouping and a thunk computing its α [B, H_t]."""
    num_teacher_heads = maps.shape[1]
    contiguous = head_groups(num_teacher_heads, num_student_heads)
    pairwise = squeeze_groups(num_teacher_heads, num_student_heads, "shd_pairwise")
    return {
        "uniform": (contiguous, lambda: squeeze_heads(maps, None, num_student_heads, "uniform")[1]),
        "shd": (contiguous, lambda: squeeze_heads(maps, circuits, num_student_heads, "shd")[1]),
        "shd_pairwise": (pairwise, lambda: squeeze_heads(maps, circuits, num_student_heads, "shd_pairwise")[1]),
        "exact on pairwise groups": (pairwise, lambda: exact_alphas(maps, circuits, pairwise)),
        "uniform on pairwise groups": (pairwise, lambda: uniform_alphas(num_teacher_heads, pairwise, maps.shape[0])),
    }


def format_groups(groups: list[list[int]]) -> str:
    return " ".join(f"[{g[0]}..{g[-1]}]" if len(g) > 2 else str(g) for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="work/demo/teacher", help="teacher directory (default the demo's)")
    parser.add_argument(
        "--data", default="work/shakespeare/data", help="`distill prepare` output (default the text setting's)"
    )
    parser.add_argument("--samples", type=int, default=16, help="first N samples of the train split (default 16)")
    parser.add_argument("--batch", type=int, default=4, help="teacher batch size (default 4)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 14, 21, 29], help="teacher layers")
    parser.add_argument("--head-counts", type=int, nargs="+", default=[3, 2], help="student head counts H_s")
    args = parser.parse_args()

    splits, _ = load_prepared(Path(args.data))
    if not 1 <= args.samples <= splits["train"].num_rows:
        parser.error(f"--samples {args.samples}: expected 1 to {splits['train'].num_rows} (train rows)")
    rows = splits["train"].select(range(args.samples)).with_format("torch", columns=["input_ids"])
    input_ids = torch.as_tensor(rows[0 : args.samples]["input_ids"], dtype=torch.long)
    teacher = load_teacher(Path(args.teacher), dtype=torch.float32)
    dims = attention_dims(teacher.config)
    bad_layers = [layer for layer in args.layers if not 0 <= layer < dims.num_layers]
    if bad_layers:
        parser.error(f"--layers {bad_layers}: the teacher has layers 0 to {dims.num_layers - 1}")
    bad_counts = [count for count in args.head_counts if not 1 <= count < dims.num_heads]
    if bad_counts:
        parser.error(f"--head-counts {bad_counts}: expected 1 to {dims.num_heads - 1} (fewer than the teacher's)")

    # (H_s, layer, method) → per-sample relative errors and ratios to uniform; (H_s, method) → α seconds.
    relative: dict[tuple[int, int, str], list[Tensor]] = defaultdict(list)
    ratios: dict[tuple[int, int, str], list[Tensor]] = defaultdict(list)
    seconds: dict[tuple[int, str], float] = defaultdict(float)
    groupings: dict[tuple[int, str], list[list[int]]] = {}
    for batch in input_ids.split(args.batch):
        with torch.no_grad(), AttentionCapture(teacher, args.layers, circuits=True) as capture:
            teacher(input_ids=batch)
        for layer in args.layers:
            maps, circuits = capture.maps[layer], capture.circuits[layer]
            dense = circuits.dense()
            total = layer_output_norm(maps, circuits)
            for heads in args.head_counts:
                errors = {}
                for method, (groups, compute) in method_alphas(maps, circuits, heads).items():
                    start = time.perf_counter()
                    alphas = compute()
                    seconds[heads, method] += time.perf_counter() - start
                    groupings[heads, method] = groups
                    errors[method] = reconstruction_error(maps, dense, heads, alphas, groups)
                for method, error in errors.items():
                    relative[heads, layer, method].append(error / total)
                    ratios[heads, layer, method].append(error / errors["uniform"])

    print(
        f"teacher {args.teacher} ({dims.num_layers} layers, {dims.num_heads} heads on {dims.num_kv_heads} KV heads), "
        f"fp32; {args.samples} train samples of T {input_ids.shape[1]} from {args.data}; "
        f"error = Σ_g ‖Σ A_i X_i − (Σ α_i A_i) Σ X_i‖² relative to ‖Σ_h A_h X_h‖²"
    )
    for heads in args.head_counts:
        print(f"\n{dims.num_heads} → {heads} heads")
        for method in METHODS:
            groups = format_groups(groupings[heads, method])
            print(f"  {method:28s} groups {groups:28s} α time {seconds[heads, method]:.3f} s")
        print(f"| layer | {'method':28s} | rel. error (mean) | error ÷ uniform: mean | worst |")
        print(f"|---|{'-' * 30}|---:|---:|---:|")
        for layer in [*args.layers, "all"]:
            for method in METHODS:
                keys = [(heads, lay, method) for lay in args.layers] if layer == "all" else [(heads, layer, method)]
                rel = torch.cat([value for key in keys for value in relative[key]])
                ratio = torch.cat([value for key in keys for value in ratios[key]])
                print(
                    f"| {layer!s:>5} | {method:28s} | {rel.mean().item():17.4f} | {ratio.mean().item():21.3f} | "
                    f"{ratio.max().item():5.3f} |"
                )


if __name__ == "__main__":
    main()
