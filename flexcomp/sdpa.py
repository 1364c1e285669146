"""``torch.nn.functional.scaled_dot_product_attention`` on flexcomp: the same arguments and semantics.

    from flexcomp.sdpa import scaled_dot_product_attention

``attn_mask`` is mapped onto flexcomp's pieces: a **boolean** mask (True: the pair takes part)
becomes a BlockMask (blocks that are all False are skipped; the mask is read where a block is
mixed), a **float** mask is added to the scores by a score_mod; either may broadcast to
``[B, H, L, S]`` over any leading dim. ``is_causal`` is SDPA's: aligned to the top left
(query ``i`` sees keys ``j <= i``). Rows with nothing to attend give 0 (SDPA gives NaN there), with
a zero gradient. ``dropout_p``: attention dropout in the kernels, a fresh seed per call from
torch's generator (``torch.manual_seed`` repeats it; :mod:`flexcomp.dropout`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .compile import eager_under_compile
from .api import attention
from .blockmask_build import create_block_mask
from .dropout import Dropout
from .errors import FlexcompError, FlexcompTypeError


def _at(mask: Tensor, b, h, q_idx, kv_idx):
    """``mask`` (4 dims, each of size 1 or full) at the pair: size-1 dims read their one entry, so
    the BlockMask is built once per batch element / head only where the mask has them."""
    nb, nh, nl, ns = mask.shape
    return mask[b if nb > 1 else 0, h if nh > 1 else 0, q_idx if nl > 1 else 0, kv_idx if ns > 1 else 0]


def _bool_mask(mask: Tensor, causal: bool):
    def sdpa_bool_mask(b, h, q_idx, kv_idx):
        keep = _at(mask, b, h, q_idx, kv_idx)
        return keep & (q_idx >= kv_idx) if causal else keep
    return sdpa_bool_mask


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _additive(bias: Tensor):
    def sdpa_float_mask(score, b, h, q_idx, kv_idx):
        return score + _at(bias, b, h, q_idx, kv_idx)
    return sdpa_float_mask


@eager_under_compile
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """SDPA: ``softmax(q @ k^T * scale + mask) @ v``.

    Args:
        query ``[B, H, L, E]``, key ``[B, Hkv, S, E]``, value ``[B, Hkv, S, Ev]`` (``Hkv < H`` with
            ``enable_gqa``); leading dims other than these four are not supported.
        attn_mask: bool (True takes part) or float (added), broadcastable to ``[B, H, L, S]``.
        is_causal: top-left causal; with ``attn_mask`` both apply (SDPA refuses the pair; here it is
            their intersection).
        scale: default ``1 / sqrt(E)``.

    >>> import torch
    >>> q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    >>> out = scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    True
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise FlexcompTypeError(f"scaled_dot_product_attention: {name} must be a torch.Tensor, got "
                                    f"{type(t).__name__}")
        if t.dim() != 4:
            raise FlexcompError(f"scaled_dot_product_attention: {name} must be [B, H, L, E] (4 dims), got shape "
                                f"{tuple(t.shape)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise FlexcompError(f"scaled_dot_product_attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    B, H, L, E = query.shape
    S = key.shape[2]
    if key.shape[1] != H and not enable_gqa:
        raise FlexcompError(f"scaled_dot_product_attention: query has {H} heads and key {key.shape[1]}; pass "
                            f"enable_gqa=True for grouped-query attention")
    score_mod = block_mask = None
    mask_mod = _causal if is_causal else None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise FlexcompTypeError(f"scaled_dot_product_attention: attn_mask must be a torch.Tensor or None, got "
                                    f"{type(attn_mask).__name__}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, L, S))
        except RuntimeError:
            raise FlexcompError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does not "
                                f"broadcast to [B, H, L, S] = {(B, H, L, S)}") from None
        mask4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if mask4.dtype == torch.bool:
            mask_mod = _bool_mask(mask4, is_causal)
        elif mask4.dtype.is_floating_point:
            score_mod = _additive(mask4)
        else:
            raise FlexcompError(f"scaled_dot_product_attention: attn_mask must be bool or floating point, got "
                                f"{attn_mask.dtype}")
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B, H, L, S, device=query.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(E)
    dropout = Dropout.draw(dropout_p) if dropout_p > 0 else None
    return attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                     enable_gqa=key.shape[1] != H, dropout=dropout)
