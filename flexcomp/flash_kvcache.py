"""flash-attn 2's ``flash_attn_with_kvcache`` on flexcomp (re-exported by :mod:`flexcomp.flash_attn`).

One call per decoding step: the new keys and values (``k``, ``v``) are written into the cache in place
at each sequence's ``cache_seqlens``, rotary embeddings applied to ``q`` and the new keys if given,
and the queries attend to the cache, bottom-right aligned with each sequence's length, through the
split-KV decode kernels (prefill kernels for longer queries). The cache is read where it lies:
``k_cache [batch_cache, seqlen_cache, nheads_k, headdim]`` rows chosen by ``cache_batch_idx``, or a
paged cache ``[num_blocks, page_block_size, nheads_k, headdim]`` through ``block_table [batch,
max_blocks]``; either is viewed as one long key axis and each sequence's BlockMask row lists only its
own blocks (from its key range, :mod:`flexcomp.block_ranges`: a few device ops per step, no trace,
no host read).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .compile import eager_under_compile
from .api import AuxRequest, attention
from .block_ranges import RowEnds, in_window, lists_from_ranges, window_ranges
from .blockmask import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask
from .errors import FlexcompError
from .paged import _logical_index

Window = tuple[int, int]


def _key_position(start: Tensor, seqlen: Tensor, logical: Optional[Tensor], page: int):
    """``(b, kv_idx) -> (pos, valid)``: the key's position in sequence ``b`` and whether it is one of its
    cached keys (``0 <= pos < seqlen[b]``): ``kv_idx - start[b]`` in a contiguous cache, or through a paged
    cache's ``logical`` table (``[batch, pages]``: each physical page's logical page in sequence ``b``,
    -1 if not its own; :func:`flexcomp.paged._logical_index`)."""
    if logical is not None:
        return _logical_index(logical, page, seqlen)

    def contiguous(b, kv_idx):
        pos = kv_idx - start[b]
        return pos, (pos >= 0) & (pos < seqlen[b])

    return contiguous


def _cache_mod(start: Tensor, seqlen: Tensor, leftpad: Tensor, q_len: int, left: int, right: int,
               logical: Optional[Tensor], page: int):
    """Keep key ``j`` of query ``i`` (batch ``b``) where ``j`` is one of sequence ``b``'s keys from
    ``leftpad[b]`` on (:func:`_key_position`) inside the window around ``i + seqlen[b] - q_len``."""
    position = _key_position(start, seqlen, logical, page)

    def kvcache_mask(b, h, q_idx, kv_idx):
        pos, keep = position(b, kv_idx)
        return in_window(keep & (pos >= leftpad[b]), pos - q_idx - (seqlen[b] - q_len), left, right)

    return kvcache_mask


def _cache_score(softcap: float, slopes: Optional[Tensor], start: Tensor, seqlen: Tensor, q_len: int,
                 logical: Optional[Tensor], page: int):
    """Soft-cap, then ALiBi ``-slopes[b, h] * |i + seqlen[b] - q_len - pos|`` (``pos``: :func:`_key_position`)."""
    position = _key_position(start, seqlen, logical, page)

    def kvcache_score(score, b, h, q_idx, kv_idx):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            pos, _ = position(b, kv_idx)
            score = score - slopes[b, h] * torch.abs(q_idx + seqlen[b] - q_len - pos)
        return score

    return kvcache_score


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotary embedding of ``x [B, L, H, D]`` at ``positions [B, L]`` on its first ``2 * cos.shape[1]`` dims
    (flash-attn's: ``interleaved`` pairs dims 0/1, 2/3, ...; otherwise the two halves)."""
    rd = 2 * cos.shape[1]
    work = torch.promote_types(x.dtype, torch.float32)  # float32 for half inputs, float64 stays
    c = cos[positions].unsqueeze(2).to(work)  # [B, L, 1, rd / 2]
    s = sin[positions].unsqueeze(2).to(work)
    rot, rest = x[..., :rd].to(work), x[..., rd:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([out.to(x.dtype), rest], -1)


@eager_under_compile
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size: Window = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """flash-attn's ``flash_attn_with_kvcache``: ``q [B, Lq, H, D]`` attends to each sequence's cached keys
    (and the new ``k`` / ``v [B, Lnew, Hk, D]``, written into the cache first, in place, at
    ``cache_seqlens``). Returns ``out [B, Lq, H, D]`` (and the LSE ``[B, H, Lq]``, float32, with
    ``return_softmax_lse``).

    Args as flash-attn's: ``cache_seqlens`` (int or ``[B]``): tokens already cached per sequence;
    ``cache_batch_idx [B]``: the cache row of each sequence (default ``0..B-1``); ``cache_leftpad [B]``:
    where each sequence's keys start in its row; ``block_table [B, max_blocks]`` (int32): a paged cache's
    pages per sequence; ``rotary_cos`` / ``rotary_sin [seqlen_ro, rotary_dim / 2]``: rotary embedding of
    the new keys at positions ``cache_seqlens + i``, and of ``q`` there too when ``causal`` or windowed
    (otherwise all of ``q`` at ``cache_seqlens``); ``causal`` / ``window_size`` / ``softcap`` /
    ``alibi_slopes`` / ``softmax_scale`` as in :func:`flexcomp.flash_attn.flash_attn_func`, aligned to
    each sequence's length after the new keys; ``num_splits`` is accepted (the decode kernels choose
    their splits).

    >>> import torch
    >>> kc, vc = torch.zeros(2, 16, 1, 8), torch.zeros(2, 16, 1, 8)
    >>> q, k, v = (torch.randn(2, 1, 2, 8) for _ in range(3))
    >>> out = flash_attn_with_kvcache(q, kc, vc, k[:, :, :1], v[:, :, :1], cache_seqlens=torch.tensor([3, 7]))
    >>> out.shape, bool(kc[1, 7].eq(k[1, 0, :1]).all())
    (torch.Size([2, 1, 2, 8]), True)
    """
    from .flash_attn import _check, _slopes, _window  # the shared argument rules (that module imports this one)

    where = "flash_attn_with_kvcache"
    _check(where, q, k_cache, v_cache, 0.0, window_size, softcap, dims=4)
    if (k is None) != (v is None):
        raise FlexcompError(f"{where}: k and v must be given together (the new keys and values), got "
                            f"k={'None' if k is None else 'a tensor'} and v={'None' if v is None else 'a tensor'}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise FlexcompError(f"{where}: rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None and cache_leftpad is not None:
        raise FlexcompError(f"{where}: rotary embeddings with cache_leftpad are not supported (their positions "
                            f"would depend on the padding); rotate q and k before the call instead")
    B, Lq, H, D = q.shape
    device = q.device
    paged = block_table is not None
    Hk = k_cache.shape[2]
    if paged:
        page = k_cache.shape[1]
        if page % 16:
            raise FlexcompError(f"{where}: the paged cache's page_block_size must be a multiple of 16, got {page}")
        rows = torch.arange(B, device=device)
        capacity = block_table.shape[1] * page
    else:
        page = 0
        rows = (cache_batch_idx.to(device=device, dtype=torch.int64) if cache_batch_idx is not None
                else torch.arange(B, device=device))
        capacity = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = 0
    old = (torch.full((B,), int(cache_seqlens), device=device, dtype=torch.int64) if isinstance(cache_seqlens, int)
           else cache_seqlens.to(device=device, dtype=torch.int64).expand(B))
    new = 0 if k is None else k.shape[1]
    if device.type == "cpu" and B and int(old.max()) + new > capacity:  # on a GPU (a wait): trusted, as flash-attn
        raise FlexcompError(f"{where}: cache_seqlens + new tokens must fit the cache ({capacity} tokens per sequence), "
                            f"got up to {int(old.max())} + {new}")
    seqlen = old + new
    positions = old.view(-1, 1) + torch.arange(max(new, Lq), device=device).view(1, -1)
    if rotary_cos is not None:
        if k is not None:
            k = _rotate(k, rotary_cos, rotary_sin, positions[:, :new], rotary_interleaved)
        at = positions[:, :Lq] if (causal or window_size != (-1, -1)) else old.view(-1, 1).expand(B, Lq)
        q = _rotate(q, rotary_cos, rotary_sin, at, rotary_interleaved)
    if k is not None:  # append in place: sequence b's new tokens at cache positions old[b] ..
        at = positions[:, :new]
        if paged:
            pages = torch.gather(block_table.to(device=device, dtype=torch.int64), 1, at // page)
            k_cache[pages, at % page] = k.to(k_cache.dtype)
            v_cache[pages, at % page] = v.to(v_cache.dtype)
        else:
            k_cache[rows.view(-1, 1), at] = k.to(k_cache.dtype)
            v_cache[rows.view(-1, 1), at] = v.to(v_cache.dtype)
    try:  # the cache as one long key axis: [1, Hk, rows * seqlen_cache, D], a view (never a copy of the cache)
        keys = k_cache.view(1, -1, Hk, k_cache.shape[-1]).transpose(1, 2)
        values = v_cache.view(1, -1, Hk, v_cache.shape[-1]).transpose(1, 2)
    except RuntimeError:
        raise FlexcompError(f"{where}: k_cache and v_cache must have their first two dims contiguous (one stride "
                            f"over all cached tokens), got strides {tuple(k_cache.stride())} and "
                            f"{tuple(v_cache.stride())}") from None
    total = keys.shape[2]
    left, right = _window(causal, window_size)
    leftpad = (cache_leftpad.to(device=device, dtype=torch.int64) if cache_leftpad is not None
               else torch.zeros(B, device=device, dtype=torch.int64))
    bk = page if paged else _DEFAULT_SPARSE_BLOCK_SIZE
    logical = None
    if paged:  # per sequence, each physical page's logical page (-1: not its own)
        table = block_table.to(device=device, dtype=torch.int64)
        logical = torch.full((B, k_cache.shape[0]), -1, device=device, dtype=torch.int64)
        logical.scatter_(1, torch.clamp(table, min=0), torch.arange(table.shape[1], device=device).expand(B, -1))
        start = torch.zeros(B, device=device, dtype=torch.int64)
    else:
        start = rows * k_cache.shape[1]
    block_mask = _cache_block_mask(start, seqlen, leftpad, Lq, left, right, bk, total, capacity,
                                   table if paged else None, device)
    block_mask.mask_mod = _cache_mod(start, seqlen, leftpad, Lq, left, right, logical, page)
    slopes = _slopes(where, alibi_slopes, B, H)
    score_mod = (_cache_score(float(softcap), slopes, start, seqlen, Lq, logical, page)
                 if (softcap or slopes is not None) else None)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out, aux = attention(q.transpose(1, 2), keys, values, score_mod=score_mod, block_mask=block_mask, scale=scale,
                         enable_gqa=H != Hk, return_aux=AuxRequest(lse=True))
    out = out.transpose(1, 2).contiguous()
    return (out, aux.lse) if return_softmax_lse else out


def _cache_block_mask(start: Tensor, seqlen: Tensor, leftpad: Tensor, q_len: int, left: int, right: int, bk: int,
                      total: int, capacity: int, table: Optional[Tensor], device) -> BlockMask:
    """Per sequence, its q-block rows' key ranges over the long key axis (logical for a paged cache, whose
    blocks are then mapped to their pages)."""
    bq = _DEFAULT_SPARSE_BLOCK_SIZE
    first = torch.arange(0, q_len, bq, device=device).view(1, -1)
    last = torch.clamp(first + bq - 1, max=q_len - 1)
    B = seqlen.shape[0]
    base = (start + leftpad).view(-1, 1).expand(B, first.shape[1])
    keys = (seqlen - leftpad).view(-1, 1).expand_as(base)
    shift = keys - q_len
    ends = RowEnds(base, keys, first.expand_as(base), shift, base, keys, last.expand_as(base), shift,
                   torch.ones_like(base, dtype=torch.bool))
    span = capacity if table is not None else total
    lists = list(lists_from_ranges(*window_ranges(ends, left, right), bk, -(-span // bk)))
    if table is not None:  # logical blocks -> pages, the lists widened to every page (as torch's converted masks)
        for i in (1, 3):
            idx = lists[i].to(torch.int64)
            pages = torch.gather(torch.clamp(table, min=0), 1, idx.view(B, -1)).view(idx.shape).to(torch.int32)
            lists[i] = torch.nn.functional.pad(pages, (0, total // bk - pages.shape[-1]))
    return BlockMask._build(*(t.unsqueeze(1) for t in lists), (bq, bk), None, (q_len, total), True)
