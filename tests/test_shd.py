"""Head squeezing and attention losses: the SHD α against brute force, squeezed-map invariants, loss masking."""

import itertools
import math

import pytest
import torch

from pipeline.ops.matching import head_groups, layer_map, select_heads, squeeze_groups
from pipeline.ops.shd import Circuits
from pipeline.ops.shd_maps import group_alphas, head_importance, pairwise_alphas, reconstruction_error, squeeze_heads


def pair_alpha(a_p: torch.Tensor, a_q: torch.Tensor, x_p: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """SHD's closed-form pair weight α of head p, as the pipeline computes it: `group_alphas` of a two-head group."""
    return group_alphas(torch.stack([a_p, a_q], dim=1), torch.stack([x_p, x_q], dim=1))[:, 0]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _causal(seq: int) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool).tril()


def _scores(batch: int, heads: int, seq: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    """Causally masked attention scores whose softmax is a random row-stochastic causal map."""
    scores = torch.randn(batch, heads, seq, seq, generator=_generator(seed)) * sharpness
    return scores.masked_fill(~_causal(seq), -math.inf)


def _maps(batch: int, heads: int, seq: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    return torch.softmax(_scores(batch, heads, seq, seed, sharpness), dim=-1)


def _circuits(batch: int, heads: int, seq: int, width: int, seed: int) -> torch.Tensor:
    """Value-output circuits with a different scale per head, so the optimal α is far from uniform."""
    scales = torch.rand(batch, heads, 1, 1, generator=_generator(seed + 1)) * 3 + 0.1
    return torch.randn(batch, heads, seq, width, generator=_generator(seed)) * scales


def _objective(maps: torch.Tensor, circuits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """‖Σ A_i X_i − (Σ w_i A_i) Σ X_i‖² for one group, `maps` [r, T, T], `circuits` [r, T, d], `weights` [P, r] → [P],
    evaluated directly in fp64."""
    maps, circuits, weights = maps.double(), circuits.double(), weights.double()
    target = (maps @ circuits).sum(0)
    merged = torch.einsum("pr,rqk->pqk", weights, maps)
    return (target - merged @ circuits.sum(0)).square().sum((-2, -1))


def _simplex_grid(steps: int) -> torch.Tensor:
    """All points of the 3-simplex with coordinates in multiples of 1/steps."""
    first, second = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = first + second <= steps
    first, second = first[keep], second[keep]
    return torch.stack([first, second, steps - first - second], dim=1).double() / steps


# ---------------------------------------------------------------------------------------------- head grouping


def test_head_groups_documented_examples() -> None:
    assert head_groups(9, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert [len(group) for group in head_groups(9, 4)] == [3, 2, 2, 2]
    assert [len(group) for group in head_groups(25, 12)] == [3] + [2] * 11
    assert head_groups(4, 4) == [[0], [1], [2], [3]]
    assert head_groups(2, 5) == [[0], [0], [0], [1], [1]]


def test_head_groups_cover_every_teacher_head() -> None:
    for teacher, student in itertools.product(range(1, 26), range(1, 13)):
        _check_head_groups(teacher, student)


def _check_head_groups(teacher: int, student: int) -> None:
    groups = head_groups(teacher, student)
    assert len(groups) == student
    used = [head for group in groups for head in group]
    if student <= teacher:
        assert used == list(range(teacher))
        sizes = [len(group) for group in groups]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    else:
        assert set(used) == set(range(teacher)) and all(len(group) == 1 for group in groups)
        assert used == sorted(used)


# ------------------------------------------------------------------------------------------------ pair alpha


def test_pair_alpha_matches_brute_force() -> None:
    """The closed form reaches the minimum of a 10001-point α grid, including optima clipped at 0 and at 1."""
    batch, seq, width = 12, 6, 4
    maps = _maps(batch, 2, seq, seed=0)
    circuits = _circuits(batch, 2, seq, width, seed=1)
    noise = 0.05 * torch.randn(4, seq, width, generator=_generator(2))
    circuits[-4:-2, 1] = -0.5 * circuits[-4:-2, 0] + noise[:2]  # S = ½ x_p: unclipped α* ≈ 2
    circuits[-2:, 1] = -2.0 * circuits[-2:, 0] + noise[2:]  # S = −x_p: unclipped α* ≈ −1
    alpha = pair_alpha(maps[:, 0], maps[:, 1], circuits[:, 0], circuits[:, 1])
    assert alpha.shape == (batch,) and alpha.dtype == torch.float32

    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    grid_weights = torch.stack([grid, 1 - grid], dim=1)
    for sample in range(batch):
        objective = _objective(maps[sample], circuits[sample], grid_weights)
        best = objective.argmin()
        ours = _objective(maps[sample], circuits[sample], torch.stack([alpha[sample], 1 - alpha[sample]])[None])
        assert ours.item() <= objective[best].item() * (1 + 1e-7) + 1e-12
        assert abs(alpha[sample].item() - grid[best].item()) <= 1e-4
    assert torch.all(alpha[-4:-2] == 1) and torch.all(alpha[-2:] == 0)
    assert ((alpha[:-4] > 0.01) & (alpha[:-4] < 0.99)).sum() >= 4


def test_pair_alpha_degenerate_is_half() -> None:
    seq, width = 5, 3
    maps = _maps(2, 2, seq, seed=3)
    circuits = _circuits(2, 2, seq, width, seed=4)
    identical = pair_alpha(maps[:, 0], maps[:, 0], circuits[:, 0], circuits[:, 1])
    # Circuits summing to a matrix with constant columns: D S = 0 because every row of D sums to 0.
    constant = torch.randn(1, 1, width, generator=_generator(5)).expand(2, seq, width)
    flat_sum = pair_alpha(maps[:, 0], maps[:, 1], circuits[:, 0], constant - circuits[:, 0])
    assert torch.all(identical == 0.5) and torch.all(flat_sum == 0.5)


# ----------------------------------------------------------------------------------------------- group alphas


def _reference_simplex_minimum(maps: torch.Tensor, circuits: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """Accelerated projected gradient (FISTA) on the simplex in fp64 from uniform, `maps` [B, r, T, T], `circuits`
    [B, r, T, d] → [B, r]: an independent, iterative reference for the exact solver."""
    maps, circuits = maps.double(), circuits.double()
    basis = (maps @ circuits.sum(1, keepdim=True)).flatten(2)
    target = (maps @ circuits).sum(1).flatten(1)
    gram, linear = basis @ basis.transpose(1, 2), (basis @ target[..., None]).squeeze(-1)
    step = 1 / torch.linalg.eigvalsh(gram)[:, -1:]
    weights = previous = torch.full(linear.shape, 1 / linear.shape[1], dtype=torch.float64)
    momentum = 1.0
    for _ in range(steps):
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        point = weights + (momentum - 1) / next_momentum * (weights - previous)
        gradient = (gram @ point[..., None]).squeeze(-1) - linear
        previous, weights = weights, _project(point - step * gradient)
        momentum = next_momentum
    return weights


def _project(points: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of rows [B, r] onto the simplex (Duchi et al. 2008)."""
    ordered = points.sort(-1, descending=True).values
    cumulative = ordered.cumsum(-1) - 1
    support = (ordered - cumulative / torch.arange(1, points.shape[1] + 1) > 0).sum(-1, keepdim=True)
    return (points - cumulative.gather(-1, support - 1) / support).clamp_min(0)


def test_group_alphas_three_heads_match_simplex_grid() -> None:
    batch, seq, width = 6, 6, 4
    maps = _maps(batch, 3, seq, seed=10)
    circuits = _circuits(batch, 3, seq, width, seed=11)
    alphas = group_alphas(maps, circuits)
    grid = _simplex_grid(300)
    for sample in range(batch):
        grid_minimum = _objective(maps[sample], circuits[sample], grid).min().item()
        ours = _objective(maps[sample], circuits[sample], alphas[sample][None]).item()
        assert ours <= grid_minimum * (1 + 1e-7) + 1e-12
    torch.testing.assert_close(alphas.sum(1), torch.ones(batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [3, 4, 5, 6])
def test_group_alphas_are_the_simplex_optimum(size: int) -> None:
    """Exact for r > 2: agrees with a converged FISTA reference, is never above 20000 random simplex points, and the KKT
    conditions hold (gradient equal on the support, not smaller off it)."""
    batch, seq, width = 6, 7, 5
    maps = _maps(batch, size, seq, seed=20 + size)
    circuits = _circuits(batch, size, seq, width, seed=30 + size)
    alphas = group_alphas(maps, circuits)
    assert alphas.shape == (batch, size) and torch.all(alphas >= 0)
    exponentials = -torch.rand(20000, size, generator=_generator(size), dtype=torch.float64).log()
    random_points = exponentials / exponentials.sum(1, keepdim=True)
    references = _reference_simplex_minimum(maps, circuits)
    faces = 0
    for sample in range(batch):
        group_maps, group_circuits = maps[sample], circuits[sample]
        ours = _objective(group_maps, group_circuits, alphas[sample][None]).item()
        reference = _objective(group_maps, group_circuits, references[sample][None])
        assert abs(ours - reference.item()) <= 1e-6 * reference.item()
        assert ours <= _objective(group_maps, group_circuits, random_points).min().item()

        basis = (group_maps.double() @ group_circuits.double().sum(0)).flatten(1)
        target = (group_maps.double() @ group_circuits.double()).sum(0).flatten()
        gradient = basis @ (basis.T @ alphas[sample].double() - target)
        support = alphas[sample] > 0
        scale = gradient.abs().max().item()
        assert gradient[support].max() - gradient.min() <= 1e-4 * scale
        faces += int(not support.all())
    assert faces >= 1


def test_group_alphas_fallback_and_degenerate_cases() -> None:
    batch, size, seq, width = 4, 5, 6, 4
    maps = _maps(batch, size, seq, seed=40)
    circuits = _circuits(batch, size, seq, width, seed=41)
    exact = group_alphas(maps, circuits)
    fallback = group_alphas(maps, circuits, max_exact_group_size=2)
    uniform = torch.full((1, size), 1 / size)
    for sample in range(batch):
        exact_error = _objective(maps[sample], circuits[sample], exact[sample][None]).item()
        fallback_error = _objective(maps[sample], circuits[sample], fallback[sample][None]).item()
        uniform_error = _objective(maps[sample], circuits[sample], uniform).item()
        assert exact_error <= fallback_error * (1 + 1e-6) + 1e-12
        assert fallback_error <= exact_error * 1.01 + 1e-9
        assert fallback_error < uniform_error
    assert torch.all(group_alphas(maps, torch.zeros_like(circuits)) == 1 / size)
    assert torch.all(group_alphas(maps[:, :1], circuits[:, :1]) == 1)


# ------------------------------------------------------------------------------------------------ squeezing


@pytest.mark.parametrize(("teacher", "student"), [(9, 2), (9, 3), (9, 4), (8, 2), (25, 12)])
def test_shd_reconstructs_better_than_uniform(teacher: int, student: int) -> None:
    batch, seq, width = 4, 8, 6
    maps = _maps(batch, teacher, seq, seed=teacher * 100 + student)
    circuits = _circuits(batch, teacher, seq, width, seed=teacher * 100 + student + 1)
    _, alphas = squeeze_heads(maps, circuits, student)
    _, uniform_alphas = squeeze_heads(maps, None, student, method="uniform")
    shd_error = reconstruction_error(maps, circuits, student, alphas)
    uniform_error = reconstruction_error(maps, circuits, student, uniform_alphas)
    assert torch.all(shd_error <= uniform_error * (1 + 1e-6))
    assert (shd_error / uniform_error).mean() < 0.9
    for group in head_groups(teacher, student):
        torch.testing.assert_close(alphas[:, group].sum(1), torch.ones(batch), atol=1e-6, rtol=0)
        torch.testing.assert_close(uniform_alphas[:, group], torch.full((batch, len(group)), 1 / len(group)))


@pytest.mark.parametrize("method", ["shd", "uniform"])
@pytest.mark.parametrize(("teacher", "student"), [(9, 2), (9, 4), (6, 3), (4, 4), (3, 5)])
def test_squeezed_maps_are_causal_and_stochastic(teacher: int, student: int, method: str) -> None:
    batch, seq, width = 3, 7, 4
    maps = _maps(batch, teacher, seq, seed=50)
    circuits = _circuits(batch, teacher, seq, width, seed=51)
    squeezed, alphas = squeeze_heads(maps, circuits, student, method=method)
    assert squeezed.shape == (batch, student, seq, seq) and squeezed.dtype == torch.float32
    assert alphas.shape == (batch, teacher) and torch.all(alphas >= 0)
    torch.testing.assert_close(squeezed.sum(-1), torch.ones(batch, student, seq), atol=1e-5, rtol=0)
    assert torch.all(squeezed[..., ~_causal(seq)] == 0)
    for j, group in enumerate(head_groups(teacher, student)):
        expected = torch.einsum("br,brqk->bqk", alphas[:, group], maps[:, group])
        torch.testing.assert_close(squeezed[:, j], expected)


def _factored_circuits(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, width: int) -> Circuits:
    """GQA-shaped circuits: `kv_heads` value heads shared by contiguous runs of query heads, scaled per head."""
    values = torch.randn(batch, kv_heads, seq, head_dim, generator=_generator(70))
    scales = torch.rand(heads, 1, 1, generator=_generator(71)) * 3 + 0.1
    output = torch.randn(heads, head_dim, width, generator=_generator(72)) * scales
    return Circuits(values, output, tuple(head // (heads // kv_heads) for head in range(heads)))


@pytest.mark.parametrize(
    ("teacher", "kv_heads", "student"), [(9, 3, 3), (9, 3, 2), (9, 3, 4), (6, 2, 4), (8, 2, 2), (4, 4, 2)]
)
def test_factored_circuits_give_the_dense_alphas(teacher: int, kv_heads: int, student: int) -> None:
    """α from the factors (groups within one KV head, across two, pairs, no GQA) equals α from X = V W itself."""
    batch, seq, head_dim, width = 3, 7, 4, 10
    maps = _maps(batch, teacher, seq, seed=teacher + kv_heads + student)
    circuits = _factored_circuits(batch, teacher, kv_heads, seq, head_dim, width)
    dense = circuits.dense()
    repeated = circuits.values.repeat_interleave(teacher // kv_heads, dim=1)
    torch.testing.assert_close(dense, torch.einsum("bhtk,hkd->bhtd", repeated, circuits.output))
    squeezed, alphas = squeeze_heads(maps, circuits, student)
    dense_squeezed, dense_alphas = squeeze_heads(maps, dense, student)
    torch.testing.assert_close(alphas, dense_alphas, rtol=0, atol=1e-5)
    torch.testing.assert_close(squeezed, dense_squeezed, rtol=0, atol=1e-5)
    _, uniform_alphas = squeeze_heads(maps, None, student, method="uniform")
    shd_error = reconstruction_error(maps, circuits, student, alphas)
    assert torch.all(shd_error <= reconstruction_error(maps, dense, student, uniform_alphas) * (1 + 1e-6))


def test_circuits_of_the_wrong_shape_are_refused() -> None:
    maps = _maps(2, 6, 5, seed=73)
    circuits = _factored_circuits(2, 6, 2, 5, 4, 8)
    with pytest.raises(ValueError, match=r"circuits with values \(2, 2, 5, 4\).*5 kv_heads"):
        squeeze_heads(maps, circuits._replace(kv_heads=circuits.kv_heads[:5]), 2)
    with pytest.raises(ValueError, match=r"expected values \[2, H_kv, 5, dh\]"):
        squeeze_heads(maps, circuits._replace(values=circuits.values[:, :, :4]), 2)
    with pytest.raises(ValueError, match="kv_heads in"):
        squeeze_heads(maps, circuits._replace(kv_heads=(0, 0, 0, 1, 1, 2)), 3)
    with pytest.raises(ValueError, match=r"circuits \(2, 6, 4, 3\): expected \[2, 6, 5, d\]"):
        squeeze_heads(maps, torch.zeros(2, 6, 4, 3), 2)


def test_squeeze_identity_and_shared_heads() -> None:
    maps = _maps(2, 4, 6, seed=60)
    squeezed, alphas = squeeze_heads(maps, None, 4)
    assert torch.equal(squeezed, maps) and torch.all(alphas == 1)
    shared, shared_alphas = squeeze_heads(maps, None, 6)
    assert torch.equal(shared, maps[:, [0, 0, 1, 2, 2, 3]]) and torch.all(shared_alphas == 1)
    with pytest.raises(ValueError, match="circuits"):
        squeeze_heads(maps, None, 2)
    with pytest.raises(ValueError, match="method"):
        squeeze_heads(maps, None, 2, method="mean")


def test_squeeze_upcasts_half_precision_maps() -> None:
    maps = _maps(2, 4, 6, seed=61)
    circuits = _circuits(2, 4, 6, 3, seed=62)
    squeezed, alphas = squeeze_heads(maps.bfloat16(), circuits.bfloat16(), 2)
    assert squeezed.dtype == alphas.dtype == torch.float32
    assert torch.all(squeezed[..., ~_causal(6)] == 0)


# ------------------------------------------------------------------------------------------- pairwise squeeze


def test_squeeze_groups_follow_the_pairwise_passes() -> None:
    assert squeeze_groups(9, 5, "shd_pairwise") == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert squeeze_groups(9, 3, "shd_pairwise") == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert squeeze_groups(9, 2, "shd_pairwise") == [list(range(8)), [8]]
    assert squeeze_groups(8, 2, "shd_pairwise") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert squeeze_groups(25, 12, "shd_pairwise") == [[0, 1, 2, 3]] + [[h, h + 1] for h in range(4, 24, 2)] + [[24]]
    assert squeeze_groups(9, 1, "shd_pairwise") == [list(range(9))]
    for teacher, student in itertools.product(range(1, 26), range(1, 13)):
        groups = squeeze_groups(teacher, student, "shd_pairwise")
        assert len(groups) == student
        if student >= teacher:
            assert groups == head_groups(teacher, student)
        else:
            assert [head for group in groups for head in group] == list(range(teacher))
        for method in ("shd", "uniform"):
            assert squeeze_groups(teacher, student, method) == head_groups(teacher, student)
    with pytest.raises(ValueError, match="method='pairs'"):
        squeeze_groups(9, 3, "pairs")
    with pytest.raises(ValueError, match="student=0"):
        squeeze_groups(9, 0, "shd_pairwise")


def _papers_pairwise_loop(
    maps: torch.Tensor, circuits: torch.Tensor, student: int
) -> tuple[list[list[int]], torch.Tensor]:
    """SHD's Algorithm 1 written out per sample in fp64 with dense circuits: while more than `student` heads remain,
    merge the first min(⌊H/2⌋, H − student) adjacent pairs with the clipped closed-form α, the merged head keeping
    α A_p + (1 − α) A_q and X_p + X_q. Returns (final groups, effective weights [B, H_t])."""
    batch, teacher = maps.shape[:2]
    weights = torch.ones(batch, teacher, dtype=torch.float64)
    groups: list[list[int]] = []
    for sample in range(batch):
        heads = [([h], maps[sample, h].double(), circuits[sample, h].double()) for h in range(teacher)]
        while len(heads) > student:
            pairs = min(len(heads) // 2, len(heads) - student)
            merged = []
            for i in range(pairs):
                (group_p, map_p, circuit_p), (group_q, map_q, circuit_q) = heads[2 * i], heads[2 * i + 1]
                diff, summed = map_p - map_q, circuit_p + circuit_q
                denominator = (diff @ summed).square().sum()
                assert denominator > 1e-6  # random data: the degenerate case (α = ½) is tested elsewhere
                alpha = (((diff @ circuit_p) * (diff @ summed)).sum() / denominator).clamp(0, 1)
                weights[sample, group_p] *= alpha
                weights[sample, group_q] *= 1 - alpha
                merged.append((group_p + group_q, alpha * map_p + (1 - alpha) * map_q, summed))
            heads = merged + heads[2 * pairs :]
        groups = [group for group, _, _ in heads]
    return groups, weights


PAIRWISE_CASES = [(9, 3), (9, 2), (8, 2), (25, 12)]


@pytest.mark.parametrize(("teacher", "student"), PAIRWISE_CASES)
def test_shd_pairwise_equals_the_papers_loop(teacher: int, student: int) -> None:
    batch, seq, width = 4, 5, 4
    maps = _maps(batch, teacher, seq, seed=200 + teacher + student)
    circuits = _circuits(batch, teacher, seq, width, seed=300 + teacher + student)
    groups, weights = _papers_pairwise_loop(maps, circuits, student)
    assert squeeze_groups(teacher, student, "shd_pairwise") == groups
    squeezed, alphas = squeeze_heads(maps, circuits, student, method="shd_pairwise")
    assert alphas.shape == (batch, teacher) and alphas.dtype == torch.float32
    torch.testing.assert_close(alphas.double(), weights, rtol=0, atol=1e-5)
    assert ((weights > 0.01) & (weights < 0.99)).sum() >= batch * (teacher - 1) // 2
    expected = torch.stack([torch.einsum("br,brqk->bqk", weights[:, g], maps[:, g].double()) for g in groups], 1)
    torch.testing.assert_close(squeezed.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pairwise_alphas(maps, circuits, student), alphas, rtol=0, atol=0)


@pytest.mark.parametrize(("teacher", "student"), [*PAIRWISE_CASES, (9, 5)])
def test_shd_pairwise_error_is_at_least_the_exact_solve_on_its_groups(teacher: int, student: int) -> None:
    """Pairwise α are feasible for each group's simplex QP, so the exact solve on the same groups is never worse;
    where every group is a pair (9 → 5) both are the closed form."""
    batch, seq, width = 5, 6, 4
    maps = _maps(batch, teacher, seq, seed=400 + teacher + student)
    circuits = _circuits(batch, teacher, seq, width, seed=500 + teacher + student)
    groups = squeeze_groups(teacher, student, "shd_pairwise")
    _, alphas = squeeze_heads(maps, circuits, student, method="shd_pairwise")
    exact = torch.zeros(batch, teacher)
    for group in groups:
        torch.testing.assert_close(alphas[:, group].sum(1), torch.ones(batch), atol=1e-6, rtol=0)
        exact[:, group] = group_alphas(maps[:, group], circuits[:, group])
    pairwise_error = reconstruction_error(maps, circuits, student, alphas, groups)
    exact_error = reconstruction_error(maps, circuits, student, exact, groups)
    assert torch.all(exact_error <= pairwise_error * (1 + 1e-6))
    if max(len(group) for group in groups) > 2:
        assert torch.all(exact_error < pairwise_error * 0.999)
    else:
        torch.testing.assert_close(alphas, exact, rtol=0, atol=1e-5)
    if groups != head_groups(teacher, student):  # the default grouping is another objective
        assert not torch.allclose(reconstruction_error(maps, circuits, student, alphas), pairwise_error)


@pytest.mark.parametrize(("teacher", "kv_heads", "student"), [(9, 3, 3), (9, 3, 2), (8, 2, 2), (6, 2, 4), (4, 4, 2)])
def test_shd_pairwise_factored_circuits_give_the_dense_alphas(teacher: int, kv_heads: int, student: int) -> None:
    """Merged heads reading several KV heads (9 → 3 merges heads 2, 3 of KV heads 0 and 1) agree with dense X."""
    batch, seq, head_dim, width = 3, 7, 4, 10
    maps = _maps(batch, teacher, seq, seed=600 + teacher + student)
    circuits = _factored_circuits(batch, teacher, kv_heads, seq, head_dim, width)
    squeezed, alphas = squeeze_heads(maps, circuits, student, method="shd_pairwise")
    dense_squeezed, dense_alphas = squeeze_heads(maps, circuits.dense(), student, method="shd_pairwise")
    _, reference = _papers_pairwise_loop(maps, circuits.dense(), student)
    torch.testing.assert_close(alphas, dense_alphas, rtol=0, atol=1e-5)
    torch.testing.assert_close(alphas.double(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(squeezed, dense_squeezed, rtol=0, atol=1e-5)


def test_shd_pairwise_without_squeezing_is_like_shd() -> None:
    maps = _maps(2, 4, 6, seed=700)
    for student in (4, 6):
        squeezed, alphas = squeeze_heads(maps, None, student, method="shd_pairwise")
        expected, expected_alphas = squeeze_heads(maps, None, student, method="shd")
        assert torch.equal(squeezed, expected) and torch.equal(alphas, expected_alphas)
    with pytest.raises(ValueError, match="method='shd_pairwise' squeezing 4 -> 2 heads needs the value-output"):
        squeeze_heads(maps, None, 2, method="shd_pairwise")


def test_reconstruction_error_refuses_groups_that_do_not_fit() -> None:
    maps, circuits = _maps(2, 4, 5, seed=701), _circuits(2, 4, 5, 3, seed=702)
    alphas = torch.full((2, 4), 0.5)
    with pytest.raises(ValueError, match=r"groups \[\[0, 1\], \[2, 3\]\]: expected 3 non-empty lists"):
        reconstruction_error(maps, circuits, 3, alphas, [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"groups \[\[0, 1\], \[2, 4\]\].*in \[0, 4\)"):
        reconstruction_error(maps, circuits, 2, alphas, [[0, 1], [2, 4]])
    with pytest.raises(ValueError, match=r"groups \[\[0, 1, 2, 3\], \[\]\]"):
        reconstruction_error(maps, circuits, 2, alphas, [[0, 1, 2, 3], []])


# --------------------------------------------------------------------------------------------- head importance


def _hand_built_heads() -> tuple[torch.Tensor, Circuits]:
    """Four heads over T = 2 on two KV heads (heads 0, 1 read V_0 = e_0, heads 2, 3 read V_1 = e_1), dh = 1; head h's
    second query row is [p_h, 1 − p_h] with p = (0, ¾, 0, ½) and W_O^h = c_h · (0.6, 0.8) with c = (2, 4, −1, 8).
    By hand: A_h V_0 = (1, p_h), A_h V_1 = (0, 1 − p_h), so ‖A_h X_h‖ = |c_h| ‖A_h V‖ = 2 · 1, 4 · 5/4, 1 · 1, 8 · ½
    = (2, 5, 1, 4), shares (2, 5, 1, 4) / 12."""
    maps = torch.zeros(1, 4, 2, 2)
    maps[..., 0, 0] = 1.0
    for head, p in enumerate((0.0, 0.75, 0.0, 0.5)):
        maps[0, head, 1] = torch.tensor([p, 1 - p])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
    output = torch.tensor([2.0, 4.0, -1.0, 8.0]).reshape(4, 1, 1) * torch.tensor([0.6, 0.8])
    return maps, Circuits(values, output, (0, 0, 1, 1))


def test_head_importance_selection_and_global_map_by_hand() -> None:
    maps, circuits = _hand_built_heads()
    expected = torch.tensor([[2.0, 5.0, 1.0, 4.0]]) / 12
    torch.testing.assert_close(head_importance(maps, circuits), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(head_importance(maps, circuits.dense()), expected, rtol=0, atol=1e-7)
    assert select_heads(head_importance(maps, circuits), 1) == [1]
    assert select_heads(head_importance(maps, circuits), 2) == [1, 3]
    assert select_heads(head_importance(maps, circuits)[0], 3) == [0, 1, 3]
    global_map, weights = squeeze_heads(maps, None, 1, method="uniform")  # the mean over all heads
    mean_p = (0 + 0.75 + 0 + 0.5) / 4
    torch.testing.assert_close(global_map, torch.tensor([[[[1.0, 0.0], [mean_p, 1 - mean_p]]]]), rtol=0, atol=0)
    assert torch.all(weights == 0.25)
    silent = circuits._replace(output=torch.zeros(4, 1, 2))
    assert torch.equal(head_importance(maps, silent), torch.full((1, 4), 0.25))


@pytest.mark.parametrize(("teacher", "kv_heads"), [(9, 3), (4, 4), (6, 1)])
def test_head_importance_matches_the_dense_formula(teacher: int, kv_heads: int) -> None:
    batch, seq, head_dim, width = 3, 7, 4, 10
    maps = _maps(batch, teacher, seq, seed=800 + teacher)
    circuits = _factored_circuits(batch, teacher, kv_heads, seq, head_dim, width)
    norms = (maps.double() @ circuits.dense().double()).square().sum((-2, -1)).sqrt()
    expected = (norms / norms.sum(1, keepdim=True)).float()
    importance = head_importance(maps, circuits)
    assert importance.shape == (batch, teacher) and importance.dtype == torch.float32
    torch.testing.assert_close(importance, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head_importance(maps, circuits.dense()), expected, rtol=1e-5, atol=1e-7)
    assert importance.max() / importance.min() > 2
    with pytest.raises(ValueError, match=r"maps \(3, 7, 7\)"):
        head_importance(maps[:, 0], circuits)


def test_select_heads_ranks_the_mean_and_breaks_ties_by_index() -> None:
    importance = torch.tensor([[0.4, 0.1, 0.2, 0.3], [0.0, 0.5, 0.2, 0.3]])  # mean (0.2, 0.3, 0.2, 0.3)
    assert select_heads(importance, 2) == [1, 3]
    assert select_heads(importance, 3) == [0, 1, 3]
    assert select_heads(importance, 4) == [0, 1, 2, 3]
    assert select_heads(torch.full((4,), 0.25), 2) == [0, 1]
    with pytest.raises(ValueError, match=r"num_student_heads=5: expected an int in \[1, 4\]"):
        select_heads(importance, 5)
    with pytest.raises(ValueError, match="num_student_heads=0"):
        select_heads(importance, 0)
    with pytest.raises(ValueError, match=r"importance \(1, 2, 4\): expected \[N, H_t\] or \[H_t\]"):
        select_heads(importance[None], 2)
    with pytest.raises(ValueError, match=r"importance \(0, 4\)"):
        select_heads(importance[:0], 2)


# ------------------------------------------------------------------------------------------------ layer map


def test_layer_map_specs() -> None:
    assert layer_map(4, 30, "uniform") == [6, 14, 21, 29]
    assert layer_map(30, 30, "uniform") == list(range(30))
    assert layer_map(4, 30, "last") == [26, 27, 28, 29]
    assert layer_map(4, 30, "spread") == [0, 10, 19, 29]
    assert layer_map(2, 4, "spread") == [0, 3] and layer_map(1, 30, "spread") == [29]
    assert layer_map(30, 30, "spread") == list(range(30))
    assert layer_map(3, 30, [0, 0, 29]) == [0, 0, 29]
    assert layer_map(4, 2, [0, 0, 1, 1]) == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([0, 1], "2 entries, expected one per student layer \\(3\\)"),
        ([0, 30, 29], "entry 1 is 30: expected an int in \\[0, 29\\]"),
        ([0, -1, 2], "entry 1 is -1"),
        ([0, 5, 4], "entry 2 is 4 < entry 1 \\(5\\): must be non-decreasing"),
        ([0, 1.5, 2], "entry 1 is 1.5"),
        ("middle", "'middle': expected 'uniform', 'spread', 'last' or a list"),
    ],
)
def test_layer_map_rejects_bad_specs(spec: list | str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_map(3, 30, spec)


def test_layer_map_uniform_needs_fewer_student_layers() -> None:
    with pytest.raises(ValueError, match="explicit list"):
        layer_map(4, 2, "uniform")
