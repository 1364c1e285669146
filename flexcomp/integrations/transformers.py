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

import functools
from typing import Any, Callable, Optional

import torch

try:
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("flexcomp.integrations.transformers needs HF transformers: pip install transformers") from e

from flexcomp.api import AuxRequest, attention, flex_attention
from flexcomp.blockmask import BlockMask
from flexcomp.blockmask_build import create_block_mask
from flexcomp.compile import eagerly
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
    if isinstance(attention_mask, BlockMask):
        return attention_mask  # prepared before the forward (generate's static cache: create_masks_for_generate)
    # a static cache's offset is a tensor that its update advances in place during the forward: the
    # mask must keep this step's value (the mods read captured tensors when they run)
    q_offset = q_offset.clone() if isinstance(q_offset, torch.Tensor) else q_offset
    kv_offset = kv_offset.clone() if isinstance(kv_offset, torch.Tensor) else kv_offset
    if torch.compiler.is_compiling():
        return _graph_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                           device, kwargs)
    if attention_mask is not None and not _mu.fast_all(attention_mask):
        padding = _mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = _mu.and_masks(mask_function, _mu.padding_mask_function(padding))
    if q_length == 1 and isinstance(kv_offset, int) and kv_offset == 0:
        step = _decode_row(mask_function, batch_size, kv_length, q_offset, device)
        if step is not None:
            return step
    mask_function = _mu.add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(mask_function, batch_size, None, q_length, kv_length, device=device)


def _hf_mask(b, h, q_idx, kv_idx, segments=None, padding=None, window=None, q_offset=0, kv_offset=0):
    """transformers' masks (causal; a sliding ``window``; packed sequences and chunks as ``segments``,
    ``[B, positions]`` ids of each absolute position's segment; ``padding`` ``[B, KV]`` keys kept) on
    absolute positions (``q_offset`` / ``kv_offset``: an int, or a 1-element tensor)."""
    q_abs = q_idx + (q_offset[0] if isinstance(q_offset, torch.Tensor) else q_offset)
    kv_abs = kv_idx + (kv_offset[0] if isinstance(kv_offset, torch.Tensor) else kv_offset)
    keep = kv_abs <= q_abs
    if window is not None:
        keep = keep & (q_abs - kv_abs < window)
    if segments is not None:
        keep = keep & (segments[b, q_abs] == segments[b, kv_abs])
    if padding is not None:
        keep = keep & padding[b, kv_idx]
    return keep


def _graph_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any, kv_offset: Any,
                mask_function: Callable, attention_mask: Optional[torch.Tensor], device: Any, kwargs: dict):
    """:func:`flexcomp_mask` under ``torch.compile``: transformers made ``mask_function`` inside the
    compiled region, where Dynamo hides its cells from flexcomp, so the mask is rebuilt as
    ``functools.partial(_hf_mask, ...)``, which goes into the graph (:mod:`flexcomp.graph_mods`).

    Its pieces: causal; the sliding window (``local_size``, the window of a sliding layer; a chunked
    layer's ``local_size`` is ``config.attention_chunk_size``); padding from ``attention_mask``; and
    every boundary where ``mask_function`` drops a token's predecessor (``(p, p - 1)``, evaluated
    for every absolute position ``p``: O(positions)), which are exactly the starts of packed
    sequences and of chunks. That is transformers' mask whenever it is causal, windowed, chunked
    and packed in any combination. A model that adds its own mask functions (``use_vmap``: an
    ``or_mask_function`` / ``and_mask_function``), a bidirectional mask and a key offset held in a
    tensor run the mask creation eagerly (one graph break)."""
    if (kwargs.get("use_vmap", False) or kwargs.get("allow_is_bidirectional_skip") is not None
            or not isinstance(kv_offset, int)):
        return eagerly(_eager_mask, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                       attention_mask, device)
    config = kwargs.get("config")
    local = kwargs.get("local_size")
    window = None
    if local is not None and getattr(config, "attention_chunk_size", None) != local:
        window = int(local)
    positions = kv_length + kv_offset  # keys' absolute positions: kv_offset .. positions - 1
    segments = None
    if mask_function is not _mu.causal_mask_function:  # (the plain causal mask has no boundaries)
        p = torch.arange(1, positions, device=device)
        b = torch.arange(batch_size, device=device)[:, None]
        starts = ~mask_function(b, 0, p[None, :], p[None, :] - 1).expand(batch_size, positions - 1)
        segments = torch.cat([torch.zeros(batch_size, 1, dtype=torch.int64, device=device),
                              starts.cumsum(-1)], dim=1)
    padding = None
    if attention_mask is not None:
        padding = _mu.prepare_padding_mask(attention_mask, kv_length, kv_offset).to(device)
    q_off = q_offset.reshape(1).to(device) if isinstance(q_offset, torch.Tensor) else int(q_offset)  # a copy
    mod = functools.partial(_hf_mask, segments=segments, padding=padding, window=window, q_offset=q_off,
                            kv_offset=kv_offset)
    return create_block_mask(mod, batch_size, None, q_length, kv_length, device=device)


def _eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device):
    return flexcomp_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         device)


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
    if dropout and module.training and torch.compiler.is_compiling():
        # attention dropout has no custom op: this layer runs eagerly (a graph break)
        return eagerly(flexcomp_attention, module, query, key, value, attention_mask, scaling=scaling,
                       softcap=softcap, s_aux=s_aux, position_bias=position_bias, dropout=dropout, **kwargs)
    drop = Dropout.draw(dropout) if dropout and module.training else None
    block_mask = attention_mask if isinstance(attention_mask, BlockMask) else None
    dense = None
    if isinstance(attention_mask, torch.Tensor):
        dense = attention_mask[:, :, :, : key.shape[-2]]
        if dense.dtype == torch.bool:
            dense = torch.where(dense, 0.0, float("-inf")).to(query.dtype)
    score_mod = _score_mod(softcap, dense, position_bias)
    gqa = query.shape[1] != key.shape[1]
    # under torch.compile (no dropout then): the public entry point, which is the custom op in the graph
    run = flex_attention if torch.compiler.is_compiling() else functools.partial(attention, dropout=drop)
    if s_aux is None:
        out = run(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    else:
        out, aux = run(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                       enable_gqa=gqa, return_aux=AuxRequest(lse=True))
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
    # a partial of a module-level function, not a closure: it can go into a compiled graph
    return functools.partial(_hf_score, softcap=softcap, dense=dense, position_bias=position_bias)


def _hf_score(score, b, h, q_idx, kv_idx, softcap=None, dense=None, position_bias=None):
    """A layer's score_mod: Gemma-2's logit ``softcap``, an additive ``dense`` mask ``[B, 1, L, S]``,
    a ``position_bias`` ``[B, H, L, S]``."""
    if softcap is not None:
        score = softcap * torch.tanh(score / softcap)
    if dense is not None:
        score = score + dense[b, 0, q_idx, kv_idx]
    if position_bias is not None:
        score = score + position_bias[b, h, q_idx, kv_idx]
    return score


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
