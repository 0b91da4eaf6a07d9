"""Carving a student out of the teacher: importance on calibration batches, head prune/merge with GQA kept
consistent, MLP and hidden channel pruning, exact reproduction of the teacher when nothing is removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PretrainedConfig, PreTrainedModel

from pipeline.models.capture import AttentionCapture, attention_dims, model_family
from pipeline.models.loading import load_teacher, make_student_config, write_tiny_teacher
from pipeline.ops.matching import head_groups, squeeze_groups
from pipeline.ops.shd_maps import head_importance
from pipeline.students.blocks import decoder_layers
from pipeline.students.carve import CarveError, CarvePlan, carve_student, plan_carve, plan_heads, select_layers
from pipeline.students.fill import fill_dropped_layers
from pipeline.students.importance import Importance, measure_importance


def calibration(seed: int = 0, samples: int = 6, tokens: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 380, (samples, tokens), generator=generator)


def student_config(teacher: PreTrainedModel, **shape: int | None) -> PretrainedConfig:
    """The teacher's config with `shape` (defaults: the teacher's own), keeping the teacher's head dim."""
    dims = attention_dims(teacher.config)
    gpt2 = model_family(teacher.config) == "gpt2"
    values = {
        "num_layers": dims.num_layers,
        "hidden_size": dims.d_model,
        "num_heads": dims.num_heads,
        "num_kv_heads": dims.num_kv_heads,
        "intermediate_size": 4 * dims.d_model if gpt2 else teacher.config.intermediate_size,
        **shape,
    }
    return make_student_config(teacher.config, head_dim=dims.head_dim, **values)


def carve(
    teacher: PreTrainedModel,
    config: PretrainedConfig,
    layers: list[int],
    method: str,
    importance: Importance | None = None,
    alphas: dict[int, torch.Tensor] | None = None,
) -> tuple[PreTrainedModel, CarvePlan]:
    importance = importance or measure_importance(teacher, calibration(), batch_size=4)
    groups = squeeze_groups(attention_dims(teacher.config).num_heads, attention_dims(config).num_heads)
    plan = plan_carve(teacher.config, config, layers, importance, method, dict.fromkeys(layers, groups), alphas)
    return carve_student(teacher, config, plan).eval(), plan


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("method", ["prune", "merge"])
def test_teacher_shaped_carve_reproduces_the_teacher_exactly(
    fixture: str, method: str, request: pytest.FixtureRequest
) -> None:
    teacher = load_teacher(request.getfixturevalue(fixture))
    layers = list(range(attention_dims(teacher.config).num_layers))
    alphas = {layer: torch.rand(attention_dims(teacher.config).num_heads) for layer in layers}
    student, _ = carve(teacher, student_config(teacher), layers, method, alphas=alphas)
    ids = calibration(seed=1)
    assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_gqa_prune_keeps_each_head_with_its_own_kv_head(tiny_llama_dir: Path) -> None:
    """6 heads on 2 KV heads → 2 heads on 2 KV heads: every kept query head reads its own teacher KV head, so with
    the full width its attention maps in the first layer are the teacher's maps of the kept heads, exactly."""
    teacher = load_teacher(tiny_llama_dir)
    config = student_config(teacher, num_layers=2, num_heads=2, num_kv_heads=2)
    student, plan = carve(teacher, config, [0, 3], "prune")
    kept = [heads[0] for heads in plan.heads[0].teacher_heads()]
    assert kept[0] in (0, 1, 2) and kept[1] in (3, 4, 5)
    assert plan.heads[0].teacher_kv_heads() == [[0], [1]]
    ids = calibration(seed=2)
    with AttentionCapture(teacher, [0]) as teacher_capture:
        teacher(input_ids=ids)
    with AttentionCapture(student, [0]) as student_capture:
        student(input_ids=ids)
    assert torch.equal(student_capture.maps[0], teacher_capture.maps[0][:, kept])


def test_gqa_prune_shapes_and_pooled_kv_heads(tiny_llama_dir: Path) -> None:
    """6 heads on 2 KV → 3 heads on 1 KV, width 42 of 48 (heads × head dim = 24 ≠ 42 is allowed for LLaMA),
    MLP 64 of 96: shapes, each kept head from its group, and the one KV head averaging the teacher KV heads that
    the kept heads read, weighted by how many read each."""
    teacher = load_teacher(tiny_llama_dir)
    importance = measure_importance(teacher, calibration(), batch_size=4)
    config = student_config(teacher, num_layers=2, hidden_size=42, num_heads=3, num_kv_heads=1, intermediate_size=64)
    student, plan = carve(teacher, config, [1, 3], "prune", importance)
    attention = student.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (24, 42) and attention.k_proj.weight.shape == (8, 42)
    assert attention.o_proj.weight.shape == (42, 24)
    assert student.model.layers[0].mlp.down_proj.weight.shape == (42, 64)
    assert student.model.embed_tokens.weight.shape == (teacher.config.vocab_size, 42)
    hidden = plan.hidden
    for student_layer, teacher_layer in enumerate([1, 3]):
        kept = [heads[0] for heads in plan.heads[student_layer].teacher_heads()]
        for group, head in zip([[0, 1], [2, 3], [4, 5]], kept, strict=True):
            assert head == max(group, key=lambda h: importance.heads[teacher_layer, h].item())
        reads = torch.tensor([head // 3 for head in kept])
        expected_weights = torch.bincount(reads, minlength=2).double() / 3
        source = teacher.model.layers[teacher_layer].self_attn.k_proj.weight.double().reshape(2, 8, 48)
        expected_k = torch.einsum("t,tkd->kd", expected_weights, source)[:, hidden]
        torch.testing.assert_close(
            student.model.layers[student_layer].self_attn.k_proj.weight.double(), expected_k, rtol=1e-6, atol=1e-7
        )
    assert torch.isfinite(student(input_ids=calibration()).logits).all()


def test_merge_weights_follow_the_formula(tiny_llama_dir: Path) -> None:
    """merge, 6 heads on 2 KV → 2 heads on 2 KV: q slices α-averaged over each group, o slices summed, each KV head
    the α-mass average of the KV heads its group reads (here its own), checked against a float64 formula."""
    teacher = load_teacher(tiny_llama_dir)
    alpha = torch.tensor([0.5, 0.3, 0.2, 0.1, 0.1, 0.8])
    config = student_config(teacher, num_layers=1, num_heads=2, num_kv_heads=2)
    student, _ = carve(teacher, config, [2], "merge", alphas={2: alpha})
    source, carved = teacher.model.layers[2].self_attn, student.model.layers[0].self_attn
    q = source.q_proj.weight.double().reshape(6, 8, 48)
    o = source.o_proj.weight.double().reshape(48, 6, 8)
    weights = alpha.double()
    expected_q = torch.stack(
        [torch.einsum("t,tkd->kd", weights[g] / weights[g].sum(), q[g]) for g in ([0, 1, 2], [3, 4, 5])]
    )
    expected_o = torch.stack([o[:, g].sum(1) for g in ([0, 1, 2], [3, 4, 5])], dim=1)
    torch.testing.assert_close(carved.q_proj.weight.double(), expected_q.reshape(16, 48), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(carved.o_proj.weight.double(), expected_o.reshape(48, 16), rtol=1e-6, atol=1e-7)
    assert torch.equal(carved.v_proj.weight, source.v_proj.weight)


def test_gpt2_prune_carves_heads_and_width(tiny_gpt2_dir: Path) -> None:
    """GPT-2 4 heads (head dim 16, width 64) → 2 heads: the width must be 2 × 16 = 32; each head's q/k/v/o slices
    are its kept teacher head's, restricted to the kept hidden channels."""
    teacher = load_teacher(tiny_gpt2_dir)
    config = student_config(teacher, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=100)
    student, plan = carve(teacher, config, [0, 2], "prune")
    hidden = plan.hidden
    assert hidden.numel() == 32 and student.transformer.wte.weight.shape == (teacher.config.vocab_size, 32)
    source = teacher.transformer.h[2].attn.c_attn.weight.reshape(64, 3, 4, 16)
    kept = [heads[0] for heads in plan.heads[1].teacher_heads()]
    expected = source[hidden][:, :, kept].reshape(32, 96)
    assert torch.equal(student.transformer.h[1].attn.c_attn.weight, expected)
    assert student.transformer.h[1].mlp.c_fc.weight.shape == (32, 100)
    assert torch.isfinite(student(input_ids=calibration()).logits).all()


def _zero_mlp_channels(directory: Path, output: Path, channels: list[int]) -> Path:
    """A copy of the teacher whose MLP intermediate `channels` are exactly 0 on every input, in every layer."""
    teacher = load_teacher(directory)
    with torch.no_grad():
        for layer in teacher.transformer.h if model_family(teacher.config) == "gpt2" else teacher.model.layers:
            if model_family(teacher.config) == "gpt2":
                layer.mlp.c_fc.weight[:, channels] = 0  # gelu(0 + 0) = 0
                layer.mlp.c_fc.bias[channels] = 0
            else:
                layer.mlp.gate_proj.weight[channels] = 0  # silu(0) · up = 0
    teacher.save_pretrained(output)
    return output


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_pruning_dead_mlp_channels_leaves_the_logits_unchanged(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dead = [1, 5, 6, 20, 33, 60]
    teacher = load_teacher(_zero_mlp_channels(request.getfixturevalue(fixture), tmp_path, dead))
    importance = measure_importance(teacher, calibration(), batch_size=4)
    width = importance.mlp.shape[1]
    assert (importance.mlp[:, dead] == 0).all() and (importance.mlp.sum(0) > 0).sum() == width - len(dead)
    layers = list(range(attention_dims(teacher.config).num_layers))
    config = student_config(teacher, intermediate_size=width - len(dead))
    student, plan = carve(teacher, config, layers, "prune", importance)
    assert all(set(channels.tolist()) == set(range(width)) - set(dead) for channels in plan.mlp)
    ids = calibration(seed=3)
    # Exact zeros drop out of the down projection's sums; only the summation order differs, so compare in fp64.
    carved, reference = student.double()(input_ids=ids).logits, teacher.double()(input_ids=ids).logits
    torch.testing.assert_close(carved, reference, rtol=1e-12, atol=1e-12)


def test_block_importance_matches_hidden_states(tiny_llama_dir: Path) -> None:
    """1 − cos(block input, block output) averaged over tokens, against the model's own hidden states (float64);
    the last block is left out because LLaMA's last hidden state is after the final norm."""
    teacher = load_teacher(tiny_llama_dir)
    ids = calibration()
    importance = measure_importance(teacher, ids, batch_size=4)
    states = [state.double() for state in teacher(input_ids=ids, output_hidden_states=True).hidden_states]
    for layer in range(len(states) - 2):
        before, after = states[layer], states[layer + 1]
        cosine = (before * after).sum(-1) / (before.norm(dim=-1) * after.norm(dim=-1))
        assert importance.block[layer].item() == pytest.approx((1 - cosine).mean().item(), rel=1e-5)
    assert select_layers(torch.tensor([0.1, 0.5, 0.2, 0.5]), 2) == [1, 3]
    assert select_layers(torch.tensor([0.3, 0.1, 0.2, 0.0]), 3) == [0, 1, 2]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_head_importance_is_the_share_of_the_attention_output(fixture: str, request: pytest.FixtureRequest) -> None:
    """Each head's share ‖A_h X_h‖_F / Σ_h' ‖A_h' X_h'‖_F per sample, averaged over samples, against a float64
    reference from the captured maps and dense value–output circuits."""
    teacher = load_teacher(request.getfixturevalue(fixture))
    ids = calibration()
    importance = measure_importance(teacher, ids, batch_size=4)
    layers = list(range(attention_dims(teacher.config).num_layers))
    with torch.no_grad(), AttentionCapture(teacher, layers, circuits=True) as capture:
        teacher(input_ids=ids)
    for layer in layers:
        contributions = capture.maps[layer].double() @ capture.circuits[layer].dense().double()
        norms = contributions.square().sum((-2, -1)).sqrt()
        shares = (norms / norms.sum(1, keepdim=True)).mean(0)
        torch.testing.assert_close(importance.heads[layer], shares, rtol=1e-5, atol=1e-7)
        from_maps = head_importance(capture.maps[layer], capture.circuits[layer]).double().mean(0)
        torch.testing.assert_close(importance.heads[layer], from_maps, rtol=1e-5, atol=1e-7)


def test_hidden_channels_without_activation_are_pruned_first(tmp_path: Path) -> None:
    """A teacher whose residual stream never uses six hidden channels: the carve to width 42 drops those six."""
    directory = write_tiny_teacher(tmp_path / "t", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2)
    teacher = load_teacher(directory)
    dead = [3, 7, 11, 20, 30, 41]
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, dead] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    importance = measure_importance(teacher, calibration(), batch_size=4)
    assert (importance.hidden[:, dead] == 0).all()
    config = student_config(teacher, hidden_size=42)
    _, plan = carve(teacher, config, [0, 1], "prune", importance)
    assert set(plan.hidden.tolist()) == set(range(48)) - set(dead)


def test_plan_heads_gqa_rule_and_more_student_heads() -> None:
    """The KV rule on a 9-head / 3-KV teacher (SmolLM2's grouping) and H_s > H_t sharing teacher heads: a teacher
    head copied into two student heads has its o slice halved, so the copies together write what it wrote."""
    importance = torch.tensor([0.1, 0.3, 0.2, 0.05, 0.05, 0.4, 0.2, 0.2, 0.1], dtype=torch.float64)
    plan = plan_heads(head_groups(9, 3), importance, 3, 1, "prune")
    assert plan.teacher_heads() == [[1], [5], [6]]
    torch.testing.assert_close(plan.kv, torch.full((1, 3), 1 / 3, dtype=torch.float64))
    merged = plan_heads(head_groups(9, 3), importance, 3, 3, "merge", torch.ones(9))
    torch.testing.assert_close(merged.kv, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(merged.output, torch.repeat_interleave(torch.eye(3, dtype=torch.float64), 3, dim=1))
    shared = plan_heads(head_groups(2, 4), torch.ones(2, dtype=torch.float64), 2, 4, "prune")
    assert shared.teacher_heads() == [[0], [0], [1], [1]]
    torch.testing.assert_close(shared.output.sum(0), torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------------
# Linear fill of the dropped layers


def _mlp_output(model: PreTrainedModel, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP output, block output) of `layer` on `ids`, float64, read by hooks."""
    block = decoder_layers(model)[layer]
    projection = block.mlp.c_proj if hasattr(block.mlp, "c_proj") else block.mlp.down_proj
    seen: dict[str, torch.Tensor] = {}
    handles = [
        projection.register_forward_hook(lambda module, args, output: seen.__setitem__("mlp", output)),
        block.register_forward_hook(
            lambda module, args, output: seen.__setitem__("block", output[0] if isinstance(output, tuple) else output)
        ),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen["mlp"].double(), seen["block"].double()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("ridge", [0.05, 1.0])
def test_linear_fill_solves_the_ridge_problem(fixture: str, ridge: float, request: pytest.FixtureRequest) -> None:
    """Student layer 0 stands for teacher layers 0 and 1 (layers [0, 2] kept, width pruned): after the fill its
    output is M T + R with T = argmin ‖M T + R − Y‖² + ρ̄ ‖T − I‖² (Y the teacher's hidden state after layer 1),
    solved here independently as a float64 least-squares problem on the stacked system; the reported errors are
    the measured ones and the fill lowers the error."""
    teacher = load_teacher(request.getfixturevalue(fixture)).eval()
    dims = attention_dims(teacher.config)
    # GPT-2's width is its heads × head dim: it loses a head; LLaMA keeps its heads and loses a channel per head.
    gpt2 = model_family(teacher.config) == "gpt2"
    heads = dims.num_heads - 1 if gpt2 else dims.num_heads
    width = heads * dims.head_dim if gpt2 else dims.d_model - dims.num_heads
    config = student_config(
        teacher, num_layers=2, num_heads=heads, num_kv_heads=heads if gpt2 else None, hidden_size=width
    )
    student, plan = carve(teacher, config, [0, 2], "merge")
    ids = calibration()
    mlp, block = _mlp_output(student, 0, ids)
    with torch.no_grad():
        target = teacher(input_ids=ids, output_hidden_states=True).hidden_states[2].double()[..., plan.hidden]
    width = plan.hidden.numel()
    m, rest, y = mlp.reshape(-1, width), (block - mlp).reshape(-1, width), target.reshape(-1, width)
    strength = ridge * (m * m).sum() / width
    eye = torch.eye(width, dtype=torch.float64)
    stacked = torch.cat([m, strength.sqrt() * eye])
    wanted = torch.cat([y - rest, strength.sqrt() * eye])
    expected = torch.linalg.lstsq(stacked, wanted, driver="gelsd").solution

    fills = fill_dropped_layers(teacher, student, plan, ids, batch_size=4, ridge=ridge)
    assert [(fill.student_layer, fill.teacher_layers) for fill in fills] == [(0, (0, 1)), (1, (2, 3))]
    student.eval()
    filled_mlp, filled_block = _mlp_output(student, 0, ids)
    torch.testing.assert_close(filled_mlp.reshape(-1, width), m @ expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(filled_block - filled_mlp, block - mlp, rtol=1e-5, atol=1e-5)
    before = ((block - target).norm() / target.norm()).item()
    after = ((filled_block - target).norm() / target.norm()).item()
    assert fills[0].error_before == pytest.approx(before, rel=1e-4)
    assert fills[0].error_after == pytest.approx(after, rel=1e-3)
    assert after < before


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_linear_fill_keeps_a_carve_without_dropped_layers_exact(fixture: str, request: pytest.FixtureRequest) -> None:
    teacher = load_teacher(request.getfixturevalue(fixture)).eval()
    layers = list(range(attention_dims(teacher.config).num_layers))
    student, plan = carve(teacher, student_config(teacher), layers, "merge")
    assert fill_dropped_layers(teacher, student, plan, calibration(), batch_size=4, ridge=1.0) == []
    ids = calibration(seed=1)
    assert torch.equal(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_linear_fill_with_a_huge_ridge_is_the_plain_carve(tiny_llama_dir: Path) -> None:
    teacher = load_teacher(tiny_llama_dir).eval()
    student, plan = carve(teacher, student_config(teacher, num_layers=2), [1, 3], "prune")
    before = {key: value.clone() for key, value in student.state_dict().items()}
    fills = fill_dropped_layers(teacher, student, plan, calibration(), batch_size=4, ridge=1e12)
    assert [fill.teacher_layers for fill in fills] == [(1, 2)]
    assert fills[0].error_after == pytest.approx(fills[0].error_before, rel=1e-6)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-8)


def test_linear_fill_needs_increasing_layers(tiny_llama_dir: Path) -> None:
    teacher = load_teacher(tiny_llama_dir).eval()
    student, plan = carve(teacher, student_config(teacher, num_layers=2), [2, 0], "prune")
    state = {key: value.clone() for key, value in student.state_dict().items()}
    with pytest.raises(CarveError, match=r"student\.carve\.fill: linear .* must increase; got \[2, 0\]"):
        fill_dropped_layers(teacher, student, plan, calibration(), batch_size=4, ridge=1.0)
    assert all(torch.equal(value, state[key]) for key, value in student.state_dict().items())
