"""1-D sparsity patterns: dilated windows, global tokens, shared prefixes, block diffusion."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .causal import causal_mask


def _check_int(fn: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "positive" if low == 1 else "non-negative"
        raise ValueError(f"{fn}: {name} must be a {kind} int, got {value!r}")


def dilated_sliding_window(window: int, dilation: int) -> Callable:
    """Causal dilated window: ``q`` sees the ``window`` keys ``q, q - dilation, ..., q - (window-1)*dilation``.

    Mask: ``(q - kv >= 0) & (q - kv < window * dilation) & ((q - kv) % dilation == 0)``.
    ``dilation=1`` is a plain causal window of ``window`` keys (``sliding_window(window - 1)``).
    Unlike attention-gym's ``generate_dilated_sliding_window`` (symmetric, ``|q - kv| <= window``)
    this one is causal and ``window`` counts kept keys, not positions.

    >>> from flexcomp import create_mask
    >>> create_mask(dilated_sliding_window(2, 2), 1, 1, 5, 5, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 1]]
    """
    _check_int("dilated_sliding_window", "window", window, 1)
    _check_int("dilated_sliding_window", "dilation", dilation, 1)
    span = window * dilation

    def dilated_sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff < span) & (diff % dilation == 0)

    dilated_sliding_window_mask.__name__ = f"dilated_sliding_window_{window}_dilation_{dilation}"
    return dilated_sliding_window_mask


def global_tokens(n_global: int, inner: Optional[Callable] = None) -> Callable:
    """Global tokens (Longformer / BigBird style): the first ``n_global`` tokens see and are seen by all.

    Mask: ``(q_idx < n_global) | (kv_idx < n_global) | inner(b, h, q_idx, kv_idx)``; ``inner`` is
    any mask_mod for the other pairs (default :func:`causal_mask`), e.g. a ``sliding_window``.

    >>> from flexcomp import create_mask
    >>> create_mask(global_tokens(1), 1, 1, 4, 4, device="cpu")[0, 0].int().tolist()
    [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    _check_int("global_tokens", "n_global", n_global, 0)
    inner = causal_mask if inner is None else inner
    if not callable(inner):
        raise ValueError(f"global_tokens: inner must be a mask_mod, got {type(inner).__name__}")

    def global_tokens_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx < n_global) | (kv_idx < n_global) | inner(b, h, q_idx, kv_idx)

    global_tokens_mask.__name__ = f"global_tokens_{n_global}_{getattr(inner, '__name__', 'inner')}"
    return global_tokens_mask


def shared_prefix_mask(prefix_len: int, doc_ids: Tensor) -> Callable:
    """One prompt shared by several continuations (prompt caching, GRPO groups), all packed in one row.

    Positions ``[0, prefix_len)`` are the shared prefix; after it, ``doc_ids[t]`` names the
    continuation of token ``t`` (the ids of prefix positions are ignored). Every pair is causal
    (``kv_idx <= q_idx``); a key of the prefix is seen by everyone, a key after the prefix only
    by the queries of the same continuation:

    ``(kv_idx <= q_idx) & ((kv_idx < prefix_len) | (doc_ids[q_idx] == doc_ids[kv_idx]))``.

    ``doc_ids`` is ``[S]``, or ``[B, S]`` for one packing per batch element; it is a captured
    tensor (a new packing compiles nothing new). Continuations need not be contiguous.

    >>> import torch
    >>> from flexcomp import create_mask
    >>> ids = torch.tensor([-1, -1, 0, 0, 1, 1])
    >>> create_mask(shared_prefix_mask(2, ids), 1, 1, 6, 6, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
     [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]]
    """
    _check_int("shared_prefix_mask", "prefix_len", prefix_len, 0)
    doc = torch.as_tensor(doc_ids)
    if doc.dim() not in (1, 2) or doc.dtype.is_floating_point or doc.dtype == torch.bool:
        raise ValueError(f"shared_prefix_mask: doc_ids must be an integer tensor [S] or [B, S], got "
                         f"{doc.dtype} of shape {tuple(doc.shape)}")
    if prefix_len > doc.shape[-1]:
        raise ValueError(f"shared_prefix_mask: prefix_len {prefix_len} is longer than the sequence "
                         f"({doc.shape[-1]} doc_ids)")
    doc = doc.to(torch.int32)
    per_batch = doc.dim() == 2

    def shared_prefix(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same = doc[b, q_idx] == doc[b, kv_idx] if per_batch else doc[q_idx] == doc[kv_idx]
        return (kv_idx <= q_idx) & ((kv_idx < prefix_len) | same)

    shared_prefix.__name__ = f"shared_prefix_{prefix_len}"
    return shared_prefix


def block_diffusion_mask(block_size: int, n_tokens: int) -> Callable:
    """Block diffusion training mask (BD3-LM, Arriola et al., 2025) over ``[x_t | x_0]``.

    The sequence has ``2 * n_tokens`` positions: the noisy tokens ``x_t`` at ``[0, n_tokens)``,
    then the clean tokens ``x_0`` at ``[n_tokens, 2 * n_tokens)``; each half is cut into blocks of
    ``block_size`` (block ``j`` of a half is its tokens ``[j * block_size, (j+1) * block_size)``).
    With ``bq``, ``bkv`` the block numbers within each token's own half, a pair is kept when

    * block diagonal: same half and ``bq == bkv`` (bidirectional inside a block, both halves);
    * offset block causal: query noisy, key clean and ``bq > bkv`` (a noisy block sees the clean
      blocks strictly before it);
    * block causal: both clean and ``bq >= bkv``.

    Noisy keys are never seen by clean queries, nor by noisy queries of other blocks. This is
    ``block_diff_mask`` of the BD3-LM reference code with ``n = n_tokens``.

    >>> from flexcomp import create_mask
    >>> create_mask(block_diffusion_mask(1, 2), 1, 1, 4, 4, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    _check_int("block_diffusion_mask", "block_size", block_size, 1)
    _check_int("block_diffusion_mask", "n_tokens", n_tokens, 1)

    def block_diffusion(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        clean_q, clean_kv = q_idx >= n_tokens, kv_idx >= n_tokens
        block_q = torch.where(clean_q, q_idx - n_tokens, q_idx) // block_size
        block_kv = torch.where(clean_kv, kv_idx - n_tokens, kv_idx) // block_size
        diagonal = (block_q == block_kv) & (clean_q == clean_kv)
        offset_causal = (block_q > block_kv) & clean_kv & ~clean_q
        causal = (block_q >= block_kv) & clean_kv & clean_q
        return diagonal | offset_causal | causal

    block_diffusion.__name__ = f"block_diffusion_b{block_size}_n{n_tokens}"
    return block_diffusion
