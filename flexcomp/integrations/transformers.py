"""HF transformers: ``attn_implementation="flexcomp"``.

Importing this module registers flexcomp with transformers (:func:`register`), after which::

    import flexcomp.integrations.transformers  # noqa: F401  (registers "flexcomp")
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexcomp")
    model.set_attn_implementation("flexcomp")   # or switch a loaded model

Two functions are registered under one name:

- the **mask function** (transformers' ``AttentionMaskInterface``): transformers calls it once per
  forward and mask kind (full, sliding window, chunked) with its own mask functions (causal,
  sliding window, chunked, padding, packed sequences from ``position_ids``, query and key offsets
  of a KV cache); it returns one :class:`flexcomp.BlockMask`, which every layer of that kind shares;
- the **attention function** (``AttentionInterface``): ``flexcomp.flex_attention`` with that
  BlockMask, the layer's ``scaling``, Gemma-2's logit ``softcap`` as a score_mod, GQA without
  repeating K and V, and attention sinks (``s_aux``) by renormalising with the LSE, as transformers'
  own flex path does.

transformers is an optional dependency: ``pip install transformers`` (flexcomp's ``test`` extra has
it). Attention dropout (a model in training mode with ``attention_dropout > 0``) runs in flexcomp's
kernels, a fresh seed per call from torch's generator.

>>> import flexcomp.integrations.transformers as fct
>>> "flexcomp" in fct.registered()
True
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

try:
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("flexcomp.integrations.transformers needs HF transformers: pip install transformers") from e

from flexcomp.api import AuxRequest, attention
from flexcomp.blockmask import BlockMask
from flexcomp.blockmask_build import create_block_mask
from flexcomp.dropout import Dropout

NAME = "flexcomp"


def flexcomp_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Callable = _mu.causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    device: Any = "cpu",
    **kwargs,
) -> BlockMask:
    """transformers' mask interface: the :class:`flexcomp.BlockMask` of one forward.

    Args (as transformers passes them): ``batch_size``; ``q_length`` / ``kv_length`` the query and
    key lengths of the attention; ``q_offset`` / ``kv_offset`` the position of the first query /
    key (an int or a 0-d tensor: a KV cache); ``mask_function`` transformers' mask function
    (``(b, h, q_idx, kv_idx) -> bool``, already combined with packed-sequence and overlay masks);
    ``attention_mask`` the 2-D padding mask ``[batch, kv_offset + kv_length]`` or None. Other
    keywords (``dtype``, ``config``, ``allow_is_causal_skip``, ``use_vmap``) are accepted and unused.

    Returns a BlockMask ``[batch_size, 1, q_length, kv_length]`` (shared by the heads), built without
    a ``Q x KV`` tensor.
    """
    if attention_mask is not None and not _mu.fast_all(attention_mask):
        padding = _mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = _mu.and_masks(mask_function, _mu.padding_mask_function(padding))
    if q_length == 1 and isinstance(kv_offset, int) and kv_offset == 0:
        step = _decode_row(mask_function, batch_size, kv_length, q_offset, device)
        if step is not None:
            return step
    mask_function = _mu.add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(mask_function, batch_size, None, q_length, kv_length, device=device)


DECODE_CAPACITY_STEP = 4096  # a decode step's row comes from the mask of the next multiple of this many tokens


def _decode_row(mask_function: Callable, batch_size: int, kv_length: int, q_offset: Any, device: Any):
    """A decoding step's BlockMask ``[B, 1, 1, kv_length]`` as the row ``q_offset`` of the mask built
    for the whole cache (rounded up to :data:`DECODE_CAPACITY_STEP` tokens; ``create_block_mask``
    returns it again while the mask function's structure stays), cropped to the keys, with the
    mask function shifted by ``q_offset``: a few views and no analysis per step, instead of a new
    ``create_block_mask``. Only for mask functions that capture no tensor (their tensors, a padding
    mask say, are sized for this step, not for the cache); None otherwise."""
    from flexcomp.ir import ModKind
    from flexcomp.trace import trace

    if trace(mask_function, ModKind.MASK).buffers:
        return None
    capacity = -(-max(kv_length, 1) // DECODE_CAPACITY_STEP) * DECODE_CAPACITY_STEP
    full = create_block_mask(mask_function, batch_size, None, capacity, capacity, device=device)
    q_block = full.BLOCK_SIZE[0]
    if isinstance(q_offset, torch.Tensor):
        row = torch.div(q_offset.reshape(1).to(device=full.kv_num_blocks.device, dtype=torch.int64), q_block,
                        rounding_mode="floor")
    else:
        row = int(q_offset) // q_block
    step = full[:, :, row]._adjust(1, kv_length)
    step.mask_mod = _mu.add_offsets_to_mask_function(mask_function, q_offset, 0)
    return step


def flexcomp_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: Optional[float] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[torch.Tensor] = None,
    position_bias: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``flexcomp.flex_attention`` for one layer.

    ``query`` ``[B, Hq, L, D]``, ``key`` / ``value`` ``[B, Hkv, S, D]`` (GQA when ``Hkv < Hq``);
    ``attention_mask`` the BlockMask of :func:`flexcomp_mask`, a 4-D float (additive) or bool mask
    ``[B, 1, L, >= S]``, or None; ``scaling`` the score scale; ``softcap`` Gemma-2's logit cap;
    ``s_aux`` attention sinks ``[Hq]``; ``position_bias`` ``[B, Hq, L, S]`` added to the scores;
    ``dropout`` the attention dropout probability (applied in training mode only, as transformers does).
    Returns ``(out [B, L, Hq, D], None)`` (no attention weights), as transformers' own functions do.
    """
    drop = Dropout.draw(dropout) if dropout and module.training else None
    block_mask = attention_mask if isinstance(attention_mask, BlockMask) else None
    dense = None
    if isinstance(attention_mask, torch.Tensor):
        dense = attention_mask[:, :, :, : key.shape[-2]]
        if dense.dtype == torch.bool:
            dense = torch.where(dense, 0.0, float("-inf")).to(query.dtype)
    score_mod = _score_mod(softcap, dense, position_bias)
    gqa = query.shape[1] != key.shape[1]
    if s_aux is None:
        out = attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                        enable_gqa=gqa, dropout=drop)
    else:
        out, aux = attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                             enable_gqa=gqa, return_aux=AuxRequest(lse=True), dropout=drop)
        lse = aux.lse
        # sinks: one more logit per head in every row's softmax, renormalised with the LSE
        sinks = s_aux.to(lse.dtype).view(1, -1, 1)
        combined = torch.logaddexp(lse, sinks)
        out = out * torch.exp(lse - combined).unsqueeze(-1).to(out.dtype)
    return out.transpose(1, 2).contiguous(), None


def _score_mod(softcap: Optional[float], dense: Optional[torch.Tensor],
               position_bias: Optional[torch.Tensor]) -> Optional[Callable]:
    """The layer's score_mod, or None when it has nothing to add (the common case)."""
    if softcap is None and dense is None and position_bias is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if dense is not None:
            score = score + dense[b, 0, q_idx, kv_idx]
        if position_bias is not None:
            score = score + position_bias[b, h, q_idx, kv_idx]
        return score

    return score_mod


def register(name: str = NAME) -> None:
    """Register flexcomp's attention and mask functions with transformers under ``name`` (run on
    import); then ``attn_implementation=name`` works in ``from_pretrained``, ``from_config`` and
    ``set_attn_implementation``."""
    AttentionInterface.register(name, flexcomp_attention)
    _mu.AttentionMaskInterface.register(name, flexcomp_mask)


def registered() -> list[str]:
    """The attention implementations transformers knows (flexcomp's among them after :func:`register`)."""
    return list(AttentionInterface._global_mapping)


register()
