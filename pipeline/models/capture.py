"""Capture per-layer, per-head attention through transformers' ``AttentionInterface``.

SHD needs the teacher's attention probabilities (and, for its α, each head's value–output circuit) at cache time,
and the student's probabilities with their autograd graph at training time. transformers 5 returns probabilities
only from eager attention, so instead of copying model code we register one attention function,
``CAPTURE_ATTENTION``: layers inside an ``AttentionCapture`` block are computed eagerly (fp32 softmax) and recorded,
every other layer — and every layer outside a block — is delegated to transformers' SDPA function unchanged, so a
teacher forward costs what an SDPA forward costs plus the captured layers. A capture with ``eager=False`` (students
in training) keeps SDPA for the captured layers too and records only what the attention function was given — the
post-RoPE queries and keys, the values and the score scale — so that a loss can recompute the scores blockwise
(``pipeline.ops.map_losses``) without the [B, H, T, T] maps ever existing in the forward pass.

Layer identity is ``module.layer_idx``; a capture finds attention modules by walking ``model.modules()``, so it
works on a model wrapped by another module (a DeepSpeed engine, a DDP wrapper).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from pipeline.ops.map_losses import ScoreInputs
from pipeline.ops.shd import Circuits

CAPTURE_ATTENTION = "shd_capture"
"""The ``attn_implementation`` name to load teachers and build students with."""

_CAPTURE_ATTR = "_shd_capture"
_LLAMA_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


class QKV(NamedTuple):
    """Queries, keys and values of one layer as the attention function sees them, each ``[B, H, T, dh]`` float32.

    Queries and keys are post-RoPE; under GQA keys and values are repeated per query head.
    """

    query: Tensor
    key: Tensor
    value: Tensor


@dataclass(frozen=True)
class AttentionDims:
    """Attention geometry of a model, as the cache and train stages need it."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int


def model_family(config: PretrainedConfig) -> Literal["llama", "gpt2"]:
    """Classify a config: ``gpt2``, or ``llama`` for any LLaMA-like family (LLaMA, Mistral, Qwen2, …).

    LLaMA-like means the config has the standard keys ``num_hidden_layers, hidden_size, num_attention_heads,
    num_key_value_heads, intermediate_size``; their attention modules share LLaMA's q/k/v/o projections.
    """
    if config.model_type == "gpt2":
        return "gpt2"
    keys = config.to_dict()
    if all(key in keys for key in _LLAMA_KEYS):
        return "llama"
    raise ValueError(
        f"unsupported model_type {config.model_type!r}: expected 'gpt2' or a LLaMA-like config with the keys "
        f"{', '.join(_LLAMA_KEYS)}"
    )


def attention_dims(config: PretrainedConfig) -> AttentionDims:
    """Layers, query heads, KV heads, head dim and model width of a LLaMA-like or GPT-2 config."""
    family = model_family(config)
    num_heads = config.num_attention_heads
    num_kv_heads = config.num_key_value_heads if family == "llama" else num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return AttentionDims(config.num_hidden_layers, num_heads, num_kv_heads, head_dim, config.hidden_size)


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Self-attention modules of a (possibly wrapped) model keyed by ``layer_idx``.

    An attention module is one with a ``layer_idx`` and LLaMA-style ``q_proj/o_proj`` or GPT-2 ``c_attn/c_proj``
    projections; GPT-2 cross-attention modules are skipped.
    """
    modules: dict[int, nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        is_attention = hasattr(module, "o_proj") or hasattr(module, "c_attn")
        if layer_idx is None or not is_attention or getattr(module, "is_cross_attention", False):
            continue
        if layer_idx in modules:
            raise ValueError(f"two attention modules claim layer_idx {layer_idx}: {modules[layer_idx]} and {module}")
        modules[layer_idx] = module
    return modules


def _additive_mask(attention_mask: Tensor | None, query: Tensor, key: Tensor, is_causal: bool) -> Tensor | None:
    """Eager-style float32 additive mask ``[B|1, 1, Tq, Tk]`` (0 keep, finfo.min drop) from the mask the model built.

    The mask interface registered for ``CAPTURE_ATTENTION`` is transformers' SDPA one, so the mask is boolean, or
    None when SDPA may rely on ``is_causal`` (then upper-left causal, exactly what SDPA would apply); a 4D float mask
    passed by the caller is used as is. finfo.min rather than -inf keeps fully masked (padding) rows finite, as eager
    attention does.
    """
    if attention_mask is None:
        q_length, kv_length = query.shape[2], key.shape[2]
        if not (is_causal and q_length > 1):
            return None
        keep = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril()
        attention_mask = keep[None, None]
    if attention_mask.dtype == torch.bool:
        blocked = torch.full((), torch.finfo(torch.float32).min, device=query.device)
        return torch.where(attention_mask, torch.zeros((), device=query.device), blocked)
    return attention_mask.float()


def _output_projection_per_head(module: nn.Module, num_heads: int, head_dim: int) -> Tensor:
    """Per-head slices of the output projection as ``[H, dh, d_model]``: ``W_O^h`` maps head h's values to the model.

    LLaMA ``o_proj`` is an ``nn.Linear`` (weight ``[d_model, H·dh]``); GPT-2 ``c_proj`` is a ``Conv1D`` (weight
    ``[H·dh, d_model]``). The bias is not per head and is excluded.
    """
    projection = module.o_proj if hasattr(module, "o_proj") else module.c_proj
    if isinstance(projection, Conv1D):
        weight = projection.weight
    elif isinstance(projection, nn.Linear):
        weight = projection.weight.T
    else:
        raise TypeError(f"layer {module.layer_idx}: unsupported output projection {type(projection).__name__}")
    if weight.shape[0] != num_heads * head_dim:
        raise RuntimeError(
            f"layer {module.layer_idx}: output projection weight has shape {tuple(weight.shape)}, expected "
            f"{num_heads * head_dim} input rows; circuits need the full weight (an unpartitioned model, not ZeRO-3)"
        )
    return weight.reshape(num_heads, head_dim, -1)


def layer_circuits(model: nn.Module, layers: Iterable[int]) -> dict[int, tuple[Tensor, tuple[int, ...]]]:
    """Per layer: (each query head's slice of the output projection [H, dh, d_model] fp32, the KV head each query
    head reads) — with the values the attention function sees, a layer's value–output circuits (`ops.shd.Circuits`)."""
    modules = find_attention_modules(model)
    circuits = {}
    for layer in layers:
        module = modules[layer]
        dims = attention_dims(module.config)
        output = _output_projection_per_head(module, dims.num_heads, dims.head_dim).detach().float()
        group = dims.num_heads // dims.num_kv_heads
        circuits[layer] = (output, tuple(head // group for head in range(dims.num_heads)))
    return circuits


def capture_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``CAPTURE_ATTENTION`` attention function: eager and recorded inside a capture, SDPA otherwise.

    Args follow transformers' attention-function contract: query ``[B, H, Tq, dh]``, key/value ``[B, KV, Tk, dh]``,
    ``scaling`` already includes GPT-2's ``scale_attn_by_inverse_layer_idx`` factor. Returns the attention output
    ``[B, Tq, H, dh]`` in the value dtype and, for a captured layer, the fp32 probabilities ``[B, H, Tq, Tk]``.
    """
    capture: AttentionCapture | None = getattr(module, _CAPTURE_ATTR, None)
    if capture is None or not capture.eager:
        output = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
        if capture is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            capture.inputs[module.layer_idx] = ScoreInputs(query, key, value, scale, output[0])
        return output
    num_key_value_groups = getattr(module, "num_key_value_groups", 1)
    key_states = repeat_kv(key, num_key_value_groups)
    value_states = repeat_kv(value, num_key_value_groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Scores and softmax in fp32 whatever the model dtype: the probabilities are distillation targets/inputs.
    scores = torch.matmul(query.float(), key_states.float().transpose(2, 3)) * scaling
    mask = _additive_mask(attention_mask, query, key_states, causal)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    weights = nn.functional.dropout(probs, p=dropout, training=module.training).to(value_states.dtype)
    attn_output = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
    capture._record(module, query, key_states, value, value_states, probs)
    return attn_output, probs


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
# Without a mask entry transformers passes no mask at all to a custom attention function (padding would be ignored).
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


class AttentionCapture:
    """Record attention of selected layers during forward passes run inside ``with``.

    ```python
    with AttentionCapture(model, layers=[1, 3], circuits=True) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask)
    capture.maps[3]  # [B, H, T, T] float32
    ```

    With ``eager=False`` the captured layers keep SDPA and record only ``inputs``: a ``ScoreInputs`` (post-RoPE
    queries, keys and values as the attention function received them, and the score scale), with their autograd
    graph — what a student needs for a loss from scores. The options below need ``eager=True`` (the default).

    Recorded per captured layer by an eager capture (dicts keyed by layer index; H = query heads, GQA expanded):

    - ``maps``: attention probabilities ``[B, H, T, T]`` float32, causal, padding keys at 0, rows summing to 1
      (before attention dropout). They keep their autograd graph when grad is enabled.
    - ``circuits`` (``circuits=True``): value–output circuits ``X_h = V_h W_O^h`` as their factors, a
      ``shd.Circuits`` of the values ``[B, H_kv, T, dh]`` float32 (each KV head once), the per-head output projections
      ``[H, dh, d_model]`` float32 (bias excluded) and the KV head of each query head; ``.dense()`` gives
      ``[B, H, T, d_model]``. Factored, they cost H_kv · dh instead of H · d_model floats per token.
    - ``qkv`` (``qkv=True``): ``QKV`` of ``[B, H, T, dh]`` float32 (post-RoPE q/k, k/v repeated per query head).

    Only requested layers hold tensors; a second forward inside one block replaces the first's records, and nothing
    is recorded outside a block. The model must use ``attn_implementation=CAPTURE_ATTENTION``. With activation
    checkpointing, call ``backward`` inside the block: recomputation must take the same (eager) path as the forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int],
        *,
        eager: bool = True,
        circuits: bool = False,
        qkv: bool = False,
    ) -> None:
        if not eager and (circuits or qkv):
            raise ValueError("circuits and qkv are recorded by eager captures only (eager=True)")
        self.layers = sorted(set(layers))
        self.eager = eager
        self._model = model
        self._record_circuits = circuits
        self._record_qkv = qkv
        self._modules: list[nn.Module] = []
        self.maps: dict[int, Tensor] = {}
        self.circuits: dict[int, Circuits] = {}
        self.qkv: dict[int, QKV] = {}
        self.inputs: dict[int, ScoreInputs] = {}

    def __enter__(self) -> "AttentionCapture":
        modules = find_attention_modules(self._model)
        missing = [layer for layer in self.layers if layer not in modules]
        if missing:
            raise ValueError(f"cannot capture layers {missing}: the model has attention layers {sorted(modules)}")
        selected = [modules[layer] for layer in self.layers]
        for module in selected:
            implementation = module.config._attn_implementation
            if implementation != CAPTURE_ATTENTION:
                raise ValueError(
                    f"layer {module.layer_idx} uses attn_implementation={implementation!r}; load or build the model "
                    f"with attn_implementation={CAPTURE_ATTENTION!r} to capture attention"
                )
            if getattr(module, _CAPTURE_ATTR, None) is not None:
                raise RuntimeError(f"layer {module.layer_idx} is already inside another AttentionCapture")
        self.maps, self.circuits, self.qkv, self.inputs = {}, {}, {}, {}
        for module in selected:
            setattr(module, _CAPTURE_ATTR, self)
        self._modules = selected
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for module in self._modules:
            delattr(module, _CAPTURE_ATTR)
        self._modules = []

    def _record(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        kv_values: Tensor,
        value: Tensor,
        probs: Tensor,
    ) -> None:
        """Store one layer's tensors; query ``[B, H, T, dh]``, key/value repeated to ``[B, H, T, dh]``, ``kv_values``
        the values per KV head ``[B, H_kv, T, dh]``."""
        layer = module.layer_idx
        self.maps[layer] = probs
        if self._record_qkv:
            self.qkv[layer] = QKV(query.float(), key.float(), value.float())
        if self._record_circuits:
            num_heads, num_kv_heads, head_dim = value.shape[1], kv_values.shape[1], value.shape[3]
            per_head_output = _output_projection_per_head(module, num_heads, head_dim).float()
            group = num_heads // num_kv_heads
            kv_heads = tuple(head // group for head in range(num_heads))
            self.circuits[layer] = Circuits(kv_values.float(), per_head_output, kv_heads)
