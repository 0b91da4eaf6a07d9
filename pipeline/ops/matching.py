"""Which teacher heads and layers a student's heads and layers are matched to: head groups (per squeeze method),
the selective heads, the layer map. Pure functions of counts; nothing here touches a tensor of activations."""

from typing import Literal, get_args

from torch import Tensor

SqueezeMethod = Literal["shd", "shd_pairwise", "uniform"]
SQUEEZE_METHODS: tuple[str, ...] = get_args(SqueezeMethod)


def head_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Which teacher heads each student head is distilled from.

    H_s <= H_t: H_s contiguous groups whose sizes differ by at most one, larger groups first (numpy.array_split:
    9 → 2 is [0..4], [5..8]); every teacher head is in exactly one group, so H_s == H_t is the identity.
    H_s > H_t: student head j copies teacher head floor(j · H_t / H_s); every teacher head is used, some shared.
    """
    if num_teacher_heads < 1 or num_student_heads < 1:
        raise ValueError(f"head counts must be positive, got teacher={num_teacher_heads}, student={num_student_heads}")
    if num_student_heads > num_teacher_heads:
        return [[j * num_teacher_heads // num_student_heads] for j in range(num_student_heads)]
    base, extra = divmod(num_teacher_heads, num_student_heads)
    groups, start = [], 0
    for group in range(num_student_heads):
        size = base + (1 if group < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def pairwise_pass_sizes(num_teacher_heads: int, num_student_heads: int) -> list[int]:
    """Pairs merged by each pass of `shd_pairwise`: min(⌊H/2⌋, H − H_s) of the H current heads, until H_s remain
    (9 → 3: [4, 2]; 25 → 12: [12, 1]); empty when H_s >= H_t."""
    sizes, heads = [], num_teacher_heads
    while heads > num_student_heads:
        pairs = min(heads // 2, heads - num_student_heads)
        sizes.append(pairs)
        heads -= pairs
    return sizes


def squeeze_groups(num_teacher_heads: int, num_student_heads: int, method: SqueezeMethod = "shd") -> list[list[int]]:
    """Which teacher heads each student head is distilled from under `method`.

    "shd" and "uniform": `head_groups`. "shd_pairwise" (SHD's Algorithm 1) squeezes by passes: each pass merges the
    adjacent pairs (2i, 2i + 1) of the current head list, only the first min(⌊H/2⌋, H − H_s) of them so that the
    count can stop at any H_s, and carries the rest over; the groups are what the passes build, contiguous and in
    order (9 → 5: [0, 1], [2, 3], [4, 5], [6, 7], [8]; 9 → 3: [0..3], [4..7], [8]; 9 → 2: [0..7], [8]).
    H_s >= H_t: `head_groups` for every method.
    """
    if method not in SQUEEZE_METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(map(repr, SQUEEZE_METHODS))}")
    groups = head_groups(num_teacher_heads, num_student_heads)
    if method != "shd_pairwise" or num_student_heads >= num_teacher_heads:
        return groups
    groups = [[head] for head in range(num_teacher_heads)]
    for pairs in pairwise_pass_sizes(num_teacher_heads, num_student_heads):
        groups = [groups[2 * i] + groups[2 * i + 1] for i in range(pairs)] + groups[2 * pairs :]
    return groups


def select_heads(importance: Tensor, num_student_heads: int) -> list[int]:
    """The H_s teacher heads with the largest mean importance, in head order (ties go to the lower index).

    `importance` [N, H_t] (`head_importance` over N calibration samples) or [H_t] (already averaged).
    """
    if importance.dim() not in (1, 2) or importance.numel() == 0:
        raise ValueError(f"importance {tuple(importance.shape)}: expected [N, H_t] or [H_t]")
    mean = importance.double().reshape(-1, importance.shape[-1]).mean(0).tolist()
    if not 1 <= num_student_heads <= len(mean):
        raise ValueError(f"num_student_heads={num_student_heads}: expected an int in [1, {len(mean)}] (teacher heads)")
    ranked = sorted(range(len(mean)), key=lambda head: (-mean[head], head))
    return sorted(ranked[:num_student_heads])


def layer_map(num_student_layers: int, num_teacher_layers: int, spec: str | list[int]) -> list[int]:
    """Teacher layer matched by each student layer.

    "uniform": evenly spaced, last to last, m(j) = floor((j + 1) · L_t / L_s) − 1 (4 of 30 → [6, 14, 21, 29]);
    "spread": evenly spaced, first to last, m(j) = round(j · (L_t − 1) / (L_s − 1)) (4 of 30 → [0, 10, 19, 29]; one
    student layer → the last) — for students carved from the teacher, which then keep its first layer;
    "last": the last L_s teacher layers; a list: used as given after checking it has L_s entries, each in
    [0, L_t), non-decreasing (a list is also the way to share teacher layers when L_s > L_t).
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be positive, got student={num_student_layers}, teacher={num_teacher_layers}"
        )
    if isinstance(spec, str):
        if spec not in ("uniform", "spread", "last"):
            raise ValueError(
                f"layer map {spec!r}: expected 'uniform', 'spread', 'last' or a list of teacher layer indices"
            )
        if num_student_layers > num_teacher_layers:
            raise ValueError(
                f"layer map {spec!r} needs student layers ({num_student_layers}) <= teacher layers "
                f"({num_teacher_layers}); give an explicit list to share teacher layers"
            )
        if spec == "last":
            return list(range(num_teacher_layers - num_student_layers, num_teacher_layers))
        if spec == "spread":
            if num_student_layers == 1:
                return [num_teacher_layers - 1]
            span = (num_teacher_layers - 1) / (num_student_layers - 1)
            return [int(j * span + 0.5) for j in range(num_student_layers)]
        return [(j + 1) * num_teacher_layers // num_student_layers - 1 for j in range(num_student_layers)]
    mapping = list(spec)
    if len(mapping) != num_student_layers:
        raise ValueError(
            f"layer map {mapping} has {len(mapping)} entries, expected one per student layer ({num_student_layers})"
        )
    for j, layer in enumerate(mapping):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_teacher_layers:
            raise ValueError(f"layer map entry {j} is {layer!r}: expected an int in [0, {num_teacher_layers - 1}]")
        if j > 0 and layer < mapping[j - 1]:
            raise ValueError(
                f"layer map entry {j} is {layer} < entry {j - 1} ({mapping[j - 1]}): must be non-decreasing"
            )
    return mapping
