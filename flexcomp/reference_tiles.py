"""The reference backend's block-row tiles: the forward and FlashAttention's backward one q-block row
of the BlockMask at a time, on the kv span of that row's non-empty blocks, with ``mask_mod``
evaluated only inside its partial blocks (full blocks skip it; empty blocks inside the span are
filled with ``-inf``).

This is the CPU training path (:mod:`flexcomp.reference` picks it when the block map is shared by
every batch element and head, as a BlockMask made with ``B = H = None`` (or expanded from one) is,
and runs it per batch element when the maps differ only by batch element, as a padding mask's do;
the inputs on the CPU): a causal mask then computes the lower triangle at block granularity instead of whole
chunk spans, the score tiles stay small enough for the caches, and the mask's elementwise work
shrinks to the diagonal blocks. Memory stays bounded by ``chunk_elements`` (a block row is split
into fewer query rows when ``B * H * rows * span`` would exceed it).

>>> import torch
>>> from flexcomp.reference import BlockMap
>>> kind = torch.tensor([[[[1, 0, 0], [2, 1, 0], [2, 2, 1]]]], dtype=torch.int8)
>>> [(r.q0, r.q1, r.lo, r.hi, [(u.kind.name, u.start, u.stop) for u in r.runs])
...  for r in row_plans(BlockMap(kind, 4, 4), 12, 12, rows_per_tile=lambda span: 4)][1:]
[(4, 8, 0, 8, [('PARTIAL', 4, 8)]), (8, 12, 0, 12, [('PARTIAL', 8, 12)])]
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .dropout import keep_mask
from .errors import zero_division_names
from .evaluate import evaluate
from .sparsity import BlockKind


@dataclass(frozen=True)
class Run:
    """Consecutive blocks of one kind inside a row's span: key columns ``start .. stop`` (relative to
    the span's ``lo``), ``PARTIAL`` (mask_mod decides) or ``EMPTY`` (every pair masked)."""

    kind: BlockKind
    start: int
    stop: int


@dataclass(frozen=True)
class RowPlan:
    """One tile: query rows ``q0 .. q1``, the key span ``lo .. hi`` of their non-empty blocks (empty:
    ``lo == hi``, nothing kept) and the span's non-full runs."""

    q0: int
    q1: int
    lo: int
    hi: int
    runs: tuple[Run, ...]


def row_plans(bm, q_len: int, kv_len: int, rows_per_tile: Callable[[int], int]) -> list[RowPlan]:
    """The tiles of a block map shared by every batch element and head (``kind [1, 1, nq, nk]``);
    ``rows_per_tile(span)``: how many query rows one tile of that key span may hold (memory)."""
    kind = bm.kind[0, 0].cpu()
    plans = []
    for r in range(kind.shape[0]):
        q0, q1 = r * bm.q_block, min(q_len, (r + 1) * bm.q_block)
        if q0 >= q1:
            break
        nz = torch.nonzero(kind[r]).flatten()
        if nz.numel() == 0:
            plans.append(RowPlan(q0, q1, 0, 0, ()))
            continue
        b0, b1 = int(nz[0]), int(nz[-1]) + 1
        lo, hi = b0 * bm.kv_block, min(kv_len, b1 * bm.kv_block)
        runs: list[Run] = []
        for j, k in enumerate(kind[r, b0:b1].tolist(), start=b0):
            if k == BlockKind.FULL:
                continue
            start, stop = j * bm.kv_block - lo, min(kv_len, (j + 1) * bm.kv_block) - lo
            if start >= stop:
                continue
            what = BlockKind.PARTIAL if k == BlockKind.PARTIAL else BlockKind.EMPTY
            if runs and runs[-1].kind is what and runs[-1].stop == start:
                runs[-1] = Run(what, runs[-1].start, stop)
            else:
                runs.append(Run(what, start, stop))
        step = max(1, rows_per_tile(hi - lo))
        for a in range(q0, q1, step):
            plans.append(RowPlan(a, min(q1, a + step), lo, hi, tuple(runs)))
    return plans


def index_inputs(B: int, H: int, c: int, q0: int, KV: int, lo: int, dev, b0: int = 0) -> dict[str, Tensor]:
    """The mods' index inputs for queries ``q0 .. q0 + c`` against keys ``lo .. lo + KV``: int32,
    broadcastable to ``[B, H, c, KV]`` (batch from ``b0``)."""
    def ar(n: int, o: int) -> Tensor:
        return torch.arange(o, o + n, device=dev, dtype=torch.int32)

    return {"b": ar(B, b0).view(-1, 1, 1, 1), "h": ar(H, 0).view(1, -1, 1, 1),
            "q_idx": ar(c, q0).view(1, 1, -1, 1), "kv_idx": ar(KV, lo).view(1, 1, 1, -1)}


def _indices(B: int, H: int, t: RowPlan, dev, b0: int = 0) -> dict[str, Tensor]:
    """:func:`index_inputs` of a tile."""
    return index_inputs(B, H, t.q1 - t.q0, t.q0, t.hi - t.lo, t.lo, dev, b0)


def _scores(plan, q: Tensor, k: Tensor, t: RowPlan, score_buffers, idx: Optional[dict]) -> tuple:
    """``(qg, kc, s)``: the tile's queries times the scale with a GQA group's rows stacked, its keys,
    and its modified, masked scores ``[B, Hq, rows, span]`` (working dtype, writable)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    c = t.q1 - t.q0
    wd = torch.float64 if q.dtype == torch.float64 else torch.float32
    kc = k[:, :, t.lo:t.hi].to(wd)
    # the scale on the queries (rows x D) rather than on the scores (rows x span): one pass fewer
    qg = (q[:, :, t.q0:t.q1].to(wd) * plan.scale).reshape(B, Hkv, (Hq // Hkv) * c, D)
    s = (qg @ kc.transpose(-1, -2)).view(B, Hq, c, t.hi - t.lo)
    if plan.score is not None:
        with zero_division_names(plan.score.graph, plan.score.fn):
            s = evaluate(plan.score.graph, {"score": s, **idx}, score_buffers, plan.score.scalars, wd)
        s = torch.broadcast_to(s, (B, Hq, c, t.hi - t.lo)).contiguous()
    for run in t.runs:
        part = s[..., run.start:run.stop]
        if run.kind is BlockKind.EMPTY or plan.mask is None:
            if run.kind is BlockKind.EMPTY:
                part.fill_(-torch.inf)
            continue
        sub = {**idx, "kv_idx": idx["kv_idx"][..., run.start:run.stop]}
        # masks are evaluated in float32 whatever the inputs, as torch and create_block_mask do
        with zero_division_names(plan.mask.graph, plan.mask.fn):
            keep = evaluate(plan.mask.graph, sub, plan.mask_buffers, plan.mask.scalars, torch.float32)
        part.masked_fill_(~torch.broadcast_to(keep, part.shape), -torch.inf)
    return qg, kc, s


def softmax_forward(plan, s: Tensor, vc: Tensor, idx: dict, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """From the modified, masked scores ``s [B, Hq, c, KV]`` (overwritten when contiguous and not needing a
    gradient):
    ``(out [B, Hq, c, Dv], lse, row_max [B, Hq, c])`` in the working dtype, the dropout's pattern
    applied to the output only; rows with nothing kept give 0 and -inf, and a ``+inf`` score gives
    LSE ``+inf`` as torch's logsumexp (NaN stays NaN)."""
    B, Hq, c, KV = s.shape
    row_max = s.detach().amax(dim=-1, keepdim=True) if KV else s.new_full((B, Hq, c, 1), -torch.inf)
    m = torch.where(torch.isneginf(row_max), 0.0, row_max)
    p = torch.exp(s - m) if s.requires_grad or not s.is_contiguous() else s.sub_(m).exp_()
    l = p.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, 1.0, l)
    if plan.dropout is not None:  # the output sees the dropped, rescaled softmax; the LSE is the softmax's
        p = torch.where(keep_mask(plan.dropout, idx["b"], idx["h"], idx["q_idx"], idx["kv_idx"]),
                        p * plan.dropout.scale, 0.0)
    o = (p.reshape(B, Hkv, (Hq // Hkv) * c, KV) @ vc).reshape(B, Hq, c, vc.shape[-1]) / l_safe
    lse = torch.where(empty, -torch.inf, m + torch.log(l_safe))
    lse = torch.where(torch.isposinf(row_max), torch.inf, lse).squeeze(-1)
    return o, lse, row_max.squeeze(-1)


def tile_forward(plan, q: Tensor, k: Tensor, v: Tensor, score_buffers, t: RowPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Output ``[B, Hq, rows, Dv]`` (input dtype), LSE and row max ``[B, Hq, rows]`` of one tile."""
    B, Hq, _, _ = q.shape
    Hkv = k.shape[1]
    c, KV = t.q1 - t.q0, t.hi - t.lo
    wd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if KV == 0:
        return (q.new_zeros(B, Hq, c, v.shape[-1]), torch.full((B, Hq, c), -torch.inf, dtype=wd, device=q.device),
                torch.full((B, Hq, c), -torch.inf, dtype=wd, device=q.device))
    idx = _indices(B, Hq, t, q.device, plan.batch_offset)
    _, _, s = _scores(plan, q, k, t, score_buffers, idx)
    o, lse, row_max = softmax_forward(plan, s, v[:, :, t.lo:t.hi].to(wd), idx, Hkv)
    return o.to(q.dtype), lse, row_max


def softmax_grads(plan, s: Tensor, lse: Tensor, o: Tensor, do: Tensor, dlse: Optional[Tensor], vc: Tensor,
                  idx: dict, Hkv: int) -> tuple:
    """FlashAttention's backward from the masked scores ``s [B, Hq, c, KV]`` (overwritten) up to ``dP``:
    ``(p, p_d, dP_d, delta, dO)`` with ``p = exp(s - lse)`` (rows with nothing kept: 0), ``_d`` the
    dropout's pattern applied, ``delta = rowsum(dO * O) - dLSE`` and ``dO`` with a GQA group's rows
    stacked ``[B, Hkv, G * c, Dv]``. ``p`` and ``p_d`` may be one tensor: use ``p_d`` before
    overwriting ``p``."""
    B, Hq, c, KV = s.shape
    wd = s.dtype
    p = s.sub_(torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1)).exp_()
    dog = do.to(wd).reshape(B, Hkv, (Hq // Hkv) * c, do.shape[-1])
    dp = (dog @ vc.transpose(-1, -2)).view(B, Hq, c, KV)
    delta = (do.to(wd) * o.to(wd)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(wd)
    pd = p
    if plan.dropout is not None:
        kept = keep_mask(plan.dropout, idx["b"], idx["h"], idx["q_idx"], idx["kv_idx"])
        pd = torch.where(kept, p * plan.dropout.scale, 0.0)
        dp = torch.where(kept, dp * plan.dropout.scale, 0.0)
    return p, pd, dp, delta, dog


def tile_grads(plan, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Optional[Tensor],
               t: RowPlan, dk: Tensor, dv: Tensor) -> Tensor:
    """FlashAttention's backward of one tile without a score_mod (as ``reference._chunk_grads``):
    returns ``dq [B, Hq, rows, D]`` and adds the tile's contributions into ``dk`` / ``dv``
    (``[B, Hkv, S, *]``, contiguous, working dtype) in place."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G, c, KV = Hq // Hkv, t.q1 - t.q0, t.hi - t.lo
    wd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if KV == 0:
        return torch.zeros(B, Hq, c, D, dtype=wd, device=q.device)
    idx = _indices(B, Hq, t, q.device, plan.batch_offset)
    qg, kc, s = _scores(plan, q, k, t, (), idx)
    p, pd, dp, delta, dog = softmax_grads(plan, s, lse, o, do, dlse, v[:, :, t.lo:t.hi].to(wd), idx, Hkv)
    S = dk.shape[2]
    dv_span = dv.view(B * Hkv, S, dv.shape[-1])[:, t.lo:t.hi]
    dv_span.baddbmm_(pd.reshape(B * Hkv, G * c, KV).transpose(-1, -2), dog.reshape(B * Hkv, G * c, -1))
    ds = p.mul_(dp.sub_(delta.unsqueeze(-1))).view(B, Hkv, G * c, KV)
    dq = (ds @ kc).mul_(plan.scale).view(B, Hq, c, D)
    dk_span = dk.view(B * Hkv, S, D)[:, t.lo:t.hi]
    dk_span.baddbmm_(ds.reshape(B * Hkv, G * c, KV).transpose(-1, -2), qg.reshape(B * Hkv, G * c, D))  # qg: scaled
    return dq


# torch's fused CPU flash-attention kernels (what F.scaled_dot_product_attention runs on the CPU):
# for tiles without a score_mod or dropout they do a tile's softmax and matmuls in cache-sized blocks
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def fused_applies(plan, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`fused_forward` / :func:`fused_grads` can run this problem's tiles: no score_mod,
    no dropout, one head dim for q, k and v, keys and values per batch element, a dtype torch's CPU
    flash kernel takes, and finite inputs
    (an ``inf`` or NaN follows torch's eager semantics on the torch-op tiles instead)."""
    return (_FLASH is not None and _FLASH_BACKWARD is not None and plan.score is None and plan.dropout is None
            and q.device.type == "cpu" and q.dtype in _FUSED_DTYPES and v.shape[-1] == q.shape[-1]
            and k.shape[0] == v.shape[0] == q.shape[0]  # the kernels do not broadcast a key/value batch of one
            and _all_finite(q, k, v))


def _all_finite(*ts: Tensor) -> bool:
    """Whether every element is finite, in one pass per tensor: a sum is finite if and only if no
    element is inf or NaN, unless finite elements overflow it (then this says False, and the caller
    takes the path that handles non-finite inputs, which is right for finite ones too)."""
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in ts])
    return bool(torch.isfinite(sums).all())


class MaskScratch:
    """One pass's additive masks as views of a single zero buffer ``[rows, cols]``: each tile writes
    only its runs' columns and :meth:`clear` zeroes them again after its kernel, so no tile allocates
    and zero-fills a ``rows x span`` mask of its own (CPU flash kernels take row-strided masks)."""

    def __init__(self, tiles: list[RowPlan], dtype: torch.dtype, dev):
        rows = max((t.q1 - t.q0 for t in tiles if t.runs), default=0)
        cols = max((t.hi - t.lo for t in tiles if t.runs), default=0)
        self._buf = torch.zeros(rows, cols, dtype=dtype, device=dev) if rows and cols else None

    def take(self, lead: tuple, c: int, KV: int, dtype: torch.dtype, dev) -> Tensor:
        """A zero ``[*lead, c, KV]`` mask: a view of the buffer when the mask is one for every batch
        element and head, else a fresh tensor."""
        buf = self._buf
        if buf is None or tuple(lead) != (1, 1) or buf.dtype != dtype or c > buf.shape[0] or KV > buf.shape[1]:
            return torch.zeros(*lead, c, KV, dtype=dtype, device=dev)
        return buf[None, None, :c, :KV]

    def clear(self, mask: Optional[Tensor], t: RowPlan) -> None:
        """Zero the columns a tile's runs wrote into ``mask`` if it is a view of the buffer."""
        if mask is not None and self._buf is not None and mask.data_ptr() == self._buf.data_ptr():
            for run in t.runs:
                mask[..., run.start:run.stop].zero_()


def _additive_mask(plan, t: RowPlan, B: int, H: int, dtype, dev,
                   scratch: Optional[MaskScratch] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(mask, dead)``: the tile's additive mask (0 kept, -inf dropped; broadcastable to
    ``[B, H, rows, span]``; None when every pair is kept) and its rows with nothing kept (None: none;
    a row with a full block in its span always keeps something). Only the runs' columns are written
    (into a view of ``scratch``'s zeros when given: :meth:`MaskScratch.clear` after use)."""
    if not t.runs:
        return None, None
    c, KV = t.q1 - t.q0, t.hi - t.lo
    idx = _indices(B, H, t, dev, plan.batch_offset)
    keeps = []
    for run in t.runs:
        if run.kind is BlockKind.EMPTY or plan.mask is None:
            keeps.append(run.kind is not BlockKind.EMPTY)
            continue
        sub = {**idx, "kv_idx": idx["kv_idx"][..., run.start:run.stop]}
        with zero_division_names(plan.mask.graph, plan.mask.fn):
            keeps.append(evaluate(plan.mask.graph, sub, plan.mask_buffers, plan.mask.scalars, torch.float32))
    lead = torch.broadcast_shapes((1, 1), *(tuple(k.shape[:-2]) for k in keeps
                                             if isinstance(k, Tensor) and k.dim() == 4))
    mask = (scratch.take(lead, c, KV, dtype, dev) if scratch is not None
            else torch.zeros(*lead, c, KV, dtype=dtype, device=dev))
    for run, keep in zip(t.runs, keeps):
        part = mask[..., run.start:run.stop]
        if keep is False:
            part.fill_(-torch.inf)
        elif keep is not True:
            part.masked_fill_(~torch.broadcast_to(keep, part.shape), -torch.inf)
    dead = None
    if sum(run.stop - run.start for run in t.runs) == KV:  # no full block: a row may keep nothing
        dead = torch.isneginf(mask).all(-1)
        dead = dead if bool(dead.any()) else None
    return mask, dead


@functools.cache
def _native_gqa() -> bool:
    """Whether torch's CPU flash kernels take fewer key/value heads than query heads themselves
    (forward, and a backward returning dK / dV per key/value head), checked once on a tiny problem
    against repeated keys: then a GQA tile copies no keys."""
    try:
        g = torch.Generator().manual_seed(0)
        q, do = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(2))
        k, v = (torch.randn(1, 1, 4, 8, generator=g) for _ in range(2))
        kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        o, lse = _FLASH(q, k, v, 0.0, False, scale=0.5)[:2]
        o_r, lse_r = _FLASH(q, kr, vr, 0.0, False, scale=0.5)[:2]
        grads = _FLASH_BACKWARD(do, q, k, v, o, lse, 0.0, False, scale=0.5)
        want = _FLASH_BACKWARD(do, q, kr, vr, o_r, lse_r, 0.0, False, scale=0.5)
        return (torch.allclose(o, o_r) and grads[1].shape == k.shape and grads[2].shape == v.shape
                and torch.allclose(grads[1], want[1].sum(1, keepdim=True), atol=1e-5)
                and torch.allclose(grads[2], want[2].sum(1, keepdim=True), atol=1e-5))
    except (RuntimeError, TypeError, ValueError):
        return False


def _group_keys(x: Tensor, G: int) -> Tensor:
    """A tile's keys or values for the flash kernels: as they are where those take GQA natively,
    else each head repeated for its ``G`` query heads."""
    return x if G == 1 or _native_gqa() else x.repeat_interleave(G, dim=1)


def fused_forward(plan, q: Tensor, k: Tensor, v: Tensor, t: RowPlan,
                  scratch: Optional[MaskScratch] = None) -> tuple[Tensor, Tensor]:
    """Output ``[B, Hq, rows, D]`` and LSE ``[B, Hq, rows]`` of one tile by torch's CPU flash kernel
    (its additive mask a view of ``scratch`` when given)."""
    B, Hq, _, _ = q.shape
    G, c = Hq // k.shape[1], t.q1 - t.q0
    wd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if t.hi == t.lo:
        return q.new_zeros(B, Hq, c, v.shape[-1]), torch.full((B, Hq, c), -torch.inf, dtype=wd, device=q.device)
    mask, dead = _additive_mask(plan, t, B, Hq, q.dtype, q.device, scratch)
    out, lse = _FLASH(q[:, :, t.q0:t.q1], _group_keys(k[:, :, t.lo:t.hi], G), _group_keys(v[:, :, t.lo:t.hi], G),
                      0.0, False, attn_mask=mask, scale=plan.scale)[:2]
    if scratch is not None:
        scratch.clear(mask, t)
    lse = lse.to(wd)
    if dead is not None:  # rows with nothing kept: output 0 and LSE -inf (the kernel gives LSE 0)
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(dead, -torch.inf)
    return out, lse


def fused_grads(plan, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, t: RowPlan,
                dk: Tensor, dv: Tensor, scratch: Optional[MaskScratch] = None) -> Tensor:
    """:func:`tile_grads` by torch's CPU flash backward kernel (no gradient into the LSE): returns
    ``dq`` of the tile's rows and adds into ``dk`` / ``dv`` in place (mask as in :func:`fused_forward`)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G, c = Hq // Hkv, t.q1 - t.q0
    if t.hi == t.lo:
        return torch.zeros(B, Hq, c, D, dtype=dk.dtype, device=q.device)
    mask, _ = _additive_mask(plan, t, B, Hq, q.dtype, q.device, scratch)
    lse_k = torch.where(torch.isneginf(lse), 0.0, lse).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq, dk_t, dv_t = _FLASH_BACKWARD(do, q[:, :, t.q0:t.q1], _group_keys(k[:, :, t.lo:t.hi], G),
                                     _group_keys(v[:, :, t.lo:t.hi], G), o, lse_k.contiguous(), 0.0,
                                     False, attn_mask=mask, scale=plan.scale)
    if scratch is not None:
        scratch.clear(mask, t)
    if G > 1 and dk_t.shape[1] != Hkv:  # repeated keys: sum each group's query heads
        dk_t = dk_t.view(B, Hkv, G, *dk_t.shape[2:]).sum(2)
        dv_t = dv_t.view(B, Hkv, G, *dv_t.shape[2:]).sum(2)
    dk[:, :, t.lo:t.hi] += dk_t
    dv[:, :, t.lo:t.hi] += dv_t
    return dq
