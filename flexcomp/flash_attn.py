"""flash-attn 2's functions on flexcomp: the same names, arguments, layouts and semantics.

Code written for ``flash_attn`` switches with one import line::

    from flexcomp.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Layouts are flash-attn's: ``q [batch, seqlen_q, nheads, headdim]``, ``k`` / ``v [batch, seqlen_k,
nheads_k, headdim]`` (``nheads`` a multiple of ``nheads_k``: GQA / MQA); the varlen functions take
sequences packed along one axis, ``q [total_q, nheads, headdim]``, with ``cu_seqlens_q`` /
``cu_seqlens_k`` (int32 ``[batch + 1]``, cumulative lengths) for the queries and the keys.

Semantics, as flash-attn documents them:

- ``causal``: aligned to the bottom right when ``seqlen_q != seqlen_k``: query ``i`` sees key ``j``
  iff ``j <= i + seqlen_k - seqlen_q``;
- ``window_size=(left, right)``: query ``i`` sees keys in ``[i + seqlen_k - seqlen_q - left,
  i + seqlen_k - seqlen_q + right]`` (``-1``: no limit on that side; ``causal`` sets ``right = 0``);
- ``softcap``: ``softcap * tanh(score / softcap)`` on the scaled scores (0: off);
- ``alibi_slopes`` ``[nheads]`` or ``[batch, nheads]``: ``-slope * |i + seqlen_k - seqlen_q - j|``
  added to the score;
- ``softmax_scale``: default ``1 / sqrt(headdim)``; ``deterministic``: a deterministic backward;
- ``return_attn_probs``: also the LSE ``[batch, nheads, seqlen_q]`` (float32; varlen:
  ``[nheads, total_q]``) and the attention probabilities ``[batch, nheads, seqlen_q, seqlen_k]``
  (for testing only, as flash-attn says: computed densely).

In the varlen functions each sequence is its own batch element for these rules (its own lengths,
alignment and ALiBi row ``slopes[i]``). Their BlockMask is built from ``cu_seqlens`` on the device
by arithmetic on each row's key range (:mod:`flexcomp.block_ranges`: no trace, no mask evaluation, no
tensor of ``total_q x total_k``, no host read); a new packing reuses the traced mask_mod.

``dropout_p``: attention dropout, in the kernels (forward and backward; the keep pattern is a hash
of a per-call seed drawn from torch's generator and the pair's coordinates, regenerated in the
backward, never stored: :mod:`flexcomp.dropout`); ``torch.manual_seed`` repeats it. As flash-attn,
each pair is decided with 8 random bits: ``dropout_p`` is rounded to a multiple of 1/256 (at least
1/256 when positive) and the kept pairs are weighted ``1 / (1 - rounded p)``.
"""
from __future__ import annotations

import collections
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .compile import eager_under_compile
from .api import AuxRequest, attention
from .block_ranges import RowEnds, in_index_window, in_window, lists_from_ranges, window_ranges
from .blockmask import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask
from .blockmask_build import _use_kernels, create_block_mask
from .dropout import Dropout, keep_mask
from .errors import FlexcompError, FlexcompTypeError
from .tiles import cdiv

Window = tuple[int, int]


# ---- the rules, as mask_mods and score_mods over (document, local position) --------------------
def _window_mod(shift: Optional[Tensor], left: int, right: int, doc_q: Optional[Tensor] = None,
                doc_k: Optional[Tensor] = None):
    """Keep ``d = j - i - shift`` in ``[-left, right]`` (``-1``: unbounded), ``i`` / ``j`` the query's
    and key's positions; batched: ``shift = [Lk - Lq]``. Varlen (``doc_*``: each token's sequence)
    also keeps only pairs of one sequence, and ``i`` / ``j`` are global token indices: within sequence
    ``s`` the local rule is ``j - i - shift[i]`` with ``shift[i] = cu_k[s + 1] - cu_q[s + 1]`` per query
    token (None: one packing for queries and keys, ``shift = 0``). Every capture is indexed by
    ``q_idx`` or ``kv_idx`` itself, so the block analysis bounds them per block exactly."""
    def window(b, h, q_idx, kv_idx):
        if doc_q is None:
            d = kv_idx - q_idx - shift[0]
            keep = d == d
        elif shift is None:  # one packing: compare the indices themselves
            return in_index_window(doc_q[q_idx] == doc_k[kv_idx], q_idx, kv_idx, left, right)
        else:
            d = kv_idx - q_idx - shift[q_idx]
            keep = doc_q[q_idx] == doc_k[kv_idx]
        return in_window(keep, d, left, right)

    return window


def _score_mod(softcap: float, slopes: Optional[Tensor], shift: Optional[Tensor], doc_q: Optional[Tensor] = None):
    """Soft-cap, then ALiBi ``-slopes[b, h] * |i + shift - j|`` (varlen: ``b`` the query's sequence,
    positions and ``shift`` as in :func:`_window_mod`)."""
    def flash_score(score, b, h, q_idx, kv_idx):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            if doc_q is None:
                score = score - slopes[b, h] * torch.abs(q_idx + shift[0] - kv_idx)
            else:
                dist = torch.abs(q_idx - kv_idx) if shift is None else torch.abs(q_idx + shift[q_idx] - kv_idx)
                score = score - slopes[doc_q[q_idx], h] * dist
        return score

    return flash_score


# ---- argument checks -------------------------------------------------------------------------------
def _check(where: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float, window_size, softcap: float, dims: int):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise FlexcompTypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            layout = "[batch, seqlen, nheads, headdim]" if dims == 4 else "[total, nheads, headdim]"
            raise FlexcompError(f"{where}: {name} must be {layout} ({dims} dims), got shape {tuple(t.shape)}")
    hq, hk = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hk or hq % hk:
        raise FlexcompError(f"{where}: nheads of q ({hq}) must be a multiple of nheads of k and v (got {hk} and "
                            f"{v.shape[-2]}, which must be equal)")
    if q.shape[-1] != k.shape[-1]:
        raise FlexcompError(f"{where}: q and k must have the same headdim, got {q.shape[-1]} and {k.shape[-1]}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise FlexcompError(f"{where}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise FlexcompError(f"{where}: window_size must be (left, right) ints >= -1 (-1: unlimited), got "
                            f"{window_size!r}")
    if softcap < 0:
        raise FlexcompError(f"{where}: softcap must be >= 0 (0: off), got {softcap}")


def _slopes(where: str, alibi_slopes: Optional[Tensor], batch: int, heads: int) -> Optional[Tensor]:
    """``[batch, heads]`` float32 slopes (a ``[heads]`` vector broadcast), or None."""
    if alibi_slopes is None:
        return None
    s = alibi_slopes
    if s.shape == (heads,):
        return s.float().view(1, heads).expand(batch, heads)
    if s.shape == (batch, heads):
        return s.float()
    raise FlexcompError(f"{where}: alibi_slopes must be [nheads] = ({heads},) or [batch, nheads] = ({batch}, {heads}), "
                        f"got {tuple(s.shape)}")


def _window(causal: bool, window_size) -> Window:
    left, right = int(window_size[0]), int(window_size[1])
    return (left, 0 if causal else right)


def _options(deterministic: bool) -> Optional[dict]:
    return {"DETERMINISTIC": True} if deterministic else None


def _probs(q: Tensor, k: Tensor, scale: float, score_mod, mask_mod, lse: Tensor, dropout: Optional[Dropout]) -> Tensor:
    """Dense attention probabilities ``[B, H, L, S]`` (return_attn_probs: for tests, as flash-attn), the
    dropped pairs negative (flash-attn's ``S_dmask`` encoding: ``-p``)."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    s = (q.float() @ kk.float().transpose(-1, -2)) * scale
    b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=q.device).view(1, -1, 1, 1)
    i = torch.arange(L, device=q.device).view(1, 1, -1, 1)
    j = torch.arange(S, device=q.device).view(1, 1, 1, -1)
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    if mask_mod is not None:
        s = torch.where(torch.broadcast_to(mask_mod(b, h, i, j), s.shape), s, float("-inf"))
    p = torch.nan_to_num(torch.exp(s - lse.unsqueeze(-1)), nan=0.0)
    if dropout is not None:
        p = torch.where(keep_mask(dropout, b, h, i, j), p, -p)
    return p


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, score_mod, mask_mod, block_mask, deterministic: bool,
            return_attn_probs: bool, dropout_p: float):
    """flex_attention on ``[B, H, L, D]`` views, with dropout when ``dropout_p > 0`` (a fresh seed from
    torch's generator); (out, lse, probs) when asked."""
    gqa = q.shape[1] != k.shape[1]
    dropout = Dropout.draw(dropout_p) if dropout_p > 0 else None
    out, aux = attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                         kernel_options=_options(deterministic), return_aux=AuxRequest(lse=True), dropout=dropout)
    if not return_attn_probs:
        return out, None, None
    return out, aux.lse, _probs(q, k, scale, score_mod, mask_mod, aux.lse, dropout)


# ---- batched ---------------------------------------------------------------------------------------
@eager_under_compile
def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size: Window = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """flash-attn's ``flash_attn_func``: ``q [B, Lq, H, D]``, ``k`` / ``v [B, Lk, Hk, D]`` ->
    ``out [B, Lq, H, D]`` (and ``(out, lse [B, H, Lq], probs [B, H, Lq, Lk])`` with
    ``return_attn_probs``). See the module docstring for each argument's meaning.

    >>> import torch
    >>> q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    >>> flash_attn_func(q, k, v, causal=True).shape
    torch.Size([1, 5, 2, 8])
    """
    _check("flash_attn_func", q, k, v, dropout_p, window_size, softcap, dims=4)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    left, right = _window(causal, window_size)
    shift, mask_mod, block_mask = _batched_mask(Lq, Lk, left, right, q.device)
    slopes = _slopes("flash_attn_func", alibi_slopes, B, H)
    score_mod = _score_mod(float(softcap), slopes, shift) if (softcap or slopes is not None) else None
    out, lse, probs = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, score_mod, mask_mod,
                              block_mask, deterministic, return_attn_probs, dropout_p)
    out = out.transpose(1, 2).contiguous()
    return (out, lse, probs) if return_attn_probs else out


@functools.lru_cache(maxsize=64)
def _batched_mask(Lq: int, Lk: int, left: int, right: int, device: torch.device):
    """``(shift, mask_mod, block_mask)`` of the batched functions' window, built once per lengths,
    window and device (a training loop's calls then trace nothing and build no mask); ``shift`` is
    ``[Lk - Lq]`` on the device, the mods' bottom-right alignment. No window: no mask_mod, no BlockMask."""
    shift = torch.tensor([Lk - Lq], device=device)
    if left < 0 and right < 0:
        return shift, None, None
    mask_mod = _window_mod(shift, left, right)
    return shift, mask_mod, create_block_mask(mask_mod, 1, None, Lq, Lk, device=device)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: Window = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False):
    """``qkv [B, L, 3, H, D]`` -> :func:`flash_attn_func` of its three parts."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size: Window = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """``q [B, Lq, H, D]``, ``kv [B, Lk, 2, Hk, D]`` -> :func:`flash_attn_func`."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# ---- varlen ------------------------------------------------------------------------------------------
def _sequence_ids(cu: Tensor, total: int) -> Tensor:
    """Per token its sequence (int64), from ``cu`` (int64 ``[batch + 1]`` cumulative lengths); empty
    sequences hold no token."""
    tokens = torch.arange(total, device=cu.device, dtype=torch.int64)
    return torch.clamp(torch.searchsorted(cu[1:].contiguous(), tokens, right=True), max=cu.numel() - 2)


def _packing(cu: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per token its sequence and its position in it, and per sequence its length, from ``cu``
    (``[batch + 1]`` cumulative lengths), with device ops only. int64: a new packing's tables then
    need no read of their range (an int32 capture's range is checked against its trace's widths)."""
    cu = cu.to(torch.int64)
    doc = _sequence_ids(cu, total)
    return doc, torch.arange(total, device=cu.device, dtype=torch.int64) - cu[doc], (cu[1:] - cu[:-1]).contiguous()


@dataclass(frozen=True)
class Packing:
    """What one packing (``cu_seqlens_q``, ``cu_seqlens_k``) and window give every call on it: per query
    token its sequence (``doc_q``), per key token its sequence (``doc_k``), the mods' per-query shift on
    global indices (``global_shift``, None for one packing of queries and keys), the mask_mod and the
    BlockMask; ``batch`` sequences."""

    batch: int
    doc_q: Tensor
    doc_k: Tensor
    global_shift: Optional[Tensor]
    mask_mod: object
    block_mask: BlockMask


_PACKINGS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_PACKINGS_KEPT = 8  # a model's layers share one packing per step; a few steps' worth is plenty


def _packed(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, left: int, right: int,
            device: torch.device) -> Packing:
    """The :class:`Packing` of these ``cu_seqlens`` tensors, built once and reused while they are the
    same objects, unmodified (identity and version counter: an in-place change rebuilds), as a model's
    layers pass one ``cu_seqlens`` per step."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise FlexcompError(f"flash_attn_varlen_func: {name} must be an integer tensor [batch + 1] of cumulative "
                                f"lengths starting at 0, got {cu if not isinstance(cu, Tensor) else tuple(cu.shape)}")
    key = (id(cu_q), cu_q._version, id(cu_k), cu_k._version, total_q, total_k, left, right, device)
    hit = _PACKINGS.get(key)
    if hit is not None and hit[0]() is cu_q and hit[1]() is cu_k:
        _PACKINGS.move_to_end(key)
        return hit[2]
    packing = _build_packing(cu_q, cu_k, total_q, total_k, left, right, device)
    _PACKINGS[key] = (weakref.ref(cu_q), weakref.ref(cu_k), packing)
    while len(_PACKINGS) > _PACKINGS_KEPT:
        _PACKINGS.popitem(last=False)
    return packing


def _build_packing(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, left: int, right: int,
                   device: torch.device) -> Packing:
    reach = total_q + total_k  # |kv - q - shift| stays below this: a wider window is an unlimited one
    left, right = min(left, reach), min(right, reach)  # (and the mods' q_idx + right stays in int32)
    if _use_kernels(device) and total_q > 0 and total_k > 0:
        return _build_packing_on_device(cu_q, cu_k, total_q, total_k, left, right, device)
    doc_q, pos_q, len_q = _packing(cu_q.to(device), total_q)
    doc_k, _, len_k = _packing(cu_k.to(device), total_k)
    shift = (len_k - len_q)[doc_q]  # per query token: its sequence's Lk - Lq
    cu_q64, cu_k64 = cu_q.to(device, torch.int64), cu_k.to(device, torch.int64)
    global_shift = None if cu_q is cu_k else (cu_k64[1:] - cu_q64[1:])[doc_q]
    mask_mod = _window_mod(global_shift, left, right, doc_q, doc_k)
    block_mask = _varlen_block_mask(mask_mod, doc_q, pos_q, shift, cu_k64, len_k, total_q, total_k, left, right)
    return Packing(len_q.numel(), doc_q, doc_k, global_shift, mask_mod, block_mask)


@eager_under_compile
def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Window = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[Tensor] = None):
    """flash-attn's ``flash_attn_varlen_func``: sequences packed along the token axis,
    ``q [total_q, H, D]``, ``k`` / ``v [total_k, Hk, D]``, sequence ``i`` holding queries
    ``cu_seqlens_q[i] .. cu_seqlens_q[i + 1]`` and keys ``cu_seqlens_k[i] .. cu_seqlens_k[i + 1]``.
    Returns ``out [total_q, H, D]`` (with ``return_attn_probs``: ``(out, lse [H, total_q],
    probs [1, H, total_q, total_k])``). ``max_seqlen_*`` are accepted as flash-attn takes them.

    >>> import torch
    >>> q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    >>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True).shape
    torch.Size([7, 2, 8])
    """
    where = "flash_attn_varlen_func"
    _check(where, q, k, v, dropout_p, window_size, softcap, dims=3)
    if block_table is not None:
        raise FlexcompError(f"{where}: block_table (paged KV) is not supported yet; pass contiguous k and v")
    total_q, H, D = q.shape
    total_k = k.shape[0]
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise FlexcompError(f"{where}: cu_seqlens_q and cu_seqlens_k must both be [batch + 1], got "
                            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    left, right = _window(causal, window_size)
    pk = _packed(cu_seqlens_q, cu_seqlens_k, total_q, total_k, left, right, q.device)
    slopes = _slopes(where, alibi_slopes, pk.batch, H)
    score_mod = (_score_mod(float(softcap), slopes, pk.global_shift, pk.doc_q)
                 if (softcap or slopes is not None) else None)
    out, lse, probs = _attend(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                              v.transpose(0, 1).unsqueeze(0), scale, score_mod, pk.mask_mod, pk.block_mask,
                              deterministic, return_attn_probs, dropout_p)
    out = out[0].transpose(0, 1).contiguous()
    return (out, lse[0], probs) if return_attn_probs else out


def _build_packing_on_device(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, left: int, right: int,
                             device: torch.device) -> Packing:
    """:func:`_build_packing` in ~15 device ops: the sequence tables by ``searchsorted`` and the block
    lists by two launches (:func:`flexcomp.codegen.blockmask.varlen_lists`), the q lists by a third
    (the lists' kernel again) when a backward first reads them. Same lists as the torch-op path, no host read."""
    from flexcomp.codegen.blockmask import varlen_lists  # imports Triton: only when the kernels run

    cu_q64 = cu_q.to(device, torch.int64)
    cu_k64 = cu_q64 if cu_k is cu_q else cu_k.to(device, torch.int64)
    doc_q = _sequence_ids(cu_q64, total_q)
    doc_k = doc_q if cu_k is cu_q and total_k == total_q else _sequence_ids(cu_k64, total_k)
    global_shift = None if cu_q is cu_k else (cu_k64[1:] - cu_q64[1:])[doc_q]
    mask_mod = _window_mod(global_shift, left, right, doc_q, doc_k)
    block = _DEFAULT_SPARSE_BLOCK_SIZE
    kv_lists, q_lists = varlen_lists(cu_q64, cu_k64, total_q, total_k, left, right, block)
    block_mask = BlockMask._build(*kv_lists, (block, block), mask_mod, (total_q, total_k), q_lists)
    return Packing(cu_q.numel() - 1, doc_q, doc_k, global_shift, mask_mod, block_mask)


def _varlen_block_mask(mask_mod, doc_q: Tensor, pos_q: Tensor, shift: Tensor, cu_k: Tensor, len_k: Tensor,
                       total_q: int, total_k: int, left: int, right: int) -> BlockMask:
    """The packing's BlockMask from its per-row key ranges (:mod:`flexcomp.block_ranges`): a few device
    ops, no trace, no evaluation of ``mask_mod`` (which decides inside the partial blocks). ``cu_k``:
    int64 key offsets; ``pos_q`` / ``shift``: each query's position and its sequence's keys minus queries."""
    bq = bk = _DEFAULT_SPARSE_BLOCK_SIZE
    device = doc_q.device
    first = torch.arange(0, total_q, bq, device=device)
    last = torch.clamp(first + bq - 1, max=max(total_q - 1, 0))
    starts = cu_k[:-1]
    da, db = doc_q[first], doc_q[last]
    ends = RowEnds(starts[da], len_k[da], pos_q[first], shift[first], starts[db], len_k[db], pos_q[last], shift[last],
                   da == db)
    lists = lists_from_ranges(*window_ranges(ends, left, right), bk, cdiv(total_k, bk))
    return BlockMask._build(*(t[None, None] for t in lists), (bq, bk), mask_mod, (total_q, total_k), True)


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False,
                                     window_size: Window = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                     return_attn_probs: bool = False):
    """``qkv [total, 3, H, D]``, one packing for queries and keys -> :func:`flash_attn_varlen_func`."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size: Window = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                    return_attn_probs: bool = False):
    """``q [total_q, H, D]``, ``kv [total_k, 2, Hk, D]`` -> :func:`flash_attn_varlen_func`."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


from .flash_kvcache import flash_attn_with_kvcache  # noqa: E402, F401  (it reads this module's argument rules)
