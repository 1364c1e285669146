"""The reference backend: attention from the IR with torch ops, in query chunks, with autograd.

It runs on any device and float dtype and is flexcomp's CPU path (training included, which
torch's own flex_attention cannot do on CPU) and the oracle for the Triton kernels.

Memory stays ``O(B * H * chunk * KV_LEN)``: the forward keeps only the output and the LSE; the
backward recomputes each chunk under autograd and accumulates dK, dV and the gradients of captured
tensors. No ``S x S`` tensor exists at any time. On the CPU, a BlockMask shared by every batch
element and head is run one block row at a time instead (:mod:`flexcomp.reference_tiles`: only the
row's non-empty blocks, mask_mod only inside partial ones, and torch's fused CPU flash kernels for
tiles without a score_mod or dropout): the CPU training path.

Semantics, as torch's flex_attention: ``s = (q @ k^T) * scale``, then ``score_mod``, then pairs in
empty blocks and, inside partial blocks, pairs where ``mask_mod`` is False get ``-inf``; full
blocks skip mask_mod. Softmax rows with nothing kept give output 0 and LSE ``-inf``, with zero
(never NaN) gradients. Non-finite scores follow torch's eager ``logsumexp``: a row with a ``+inf``
score (an ``inf`` in a key or query, or from the score_mod) has LSE ``+inf`` and output NaN; a NaN
score makes both NaN. ``max_scores`` is the row maximum of those post-mod, masked scores (natural
units, ``-inf`` for rows with nothing kept), in the LSE's dtype, and carries no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .blockmask import _ordered_to_dense
from .cache import CACHE
from .errors import zero_division_names
from .evaluate import evaluate
from .options import DEFAULT_CHUNK_ELEMENTS
from .dropout import Dropout
from .problem import Grads, Outputs
from .reference_tiles import (MaskScratch, fused_applies, fused_forward, fused_grads, index_inputs, row_plans,
                              softmax_forward, softmax_grads, tile_forward, tile_grads)
from .sparsity import BlockKind
from .trace import TracedMod


@dataclass(frozen=True)
class BlockMap:
    """A BlockMask unpacked for the reference: ``kind`` int8 ``[Bm, Hm, num_q, num_kv]``
    (0 empty, 1 partial, 2 full) and the block sizes ``q_block``, ``kv_block``."""

    kind: Tensor
    q_block: int
    kv_block: int


@dataclass(frozen=True)
class ReferencePlan:
    """Everything but the tensors: the traced mods, the block map, the scale and the chunking.

    Fields:
        score: the traced score_mod (None: identity).
        mask: the traced mask_mod applied inside partial blocks (None: keep all).
        blocks: the block map (None: every block partial, i.e. mask_mod everywhere).
        mask_buffers: captured tensors of the mask_mod (never differentiated).
        scale: the factor on ``q @ k^T``.
        chunk_elements: size of one score tile, which bounds memory.
        dropout: attention dropout (:mod:`flexcomp.dropout`, the kernels' keep pattern); None: none.
        batch_offset: the batch index of the tensors' first element (one element of a batch at a
            time, :func:`_per_batch_plans`): the mods see ``b`` from here.
    """

    score: Optional[TracedMod]
    mask: Optional[TracedMod]
    blocks: Optional[BlockMap]
    mask_buffers: tuple
    scale: float
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    dropout: Optional[Dropout] = None
    batch_offset: int = 0


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kv_span(plan: ReferencePlan, q0: int, c: int, kv_len: int) -> tuple[int, int]:
    """The kv range ``[lo, hi)`` covering every non-empty block of query rows ``q0 .. q0 + c``."""
    if plan.blocks is None:
        return 0, kv_len
    bm = plan.blocks
    rows = bm.kind[:, :, q0 // bm.q_block:(q0 + c - 1) // bm.q_block + 1, :]
    cols = (rows != 0).flatten(0, 2).any(dim=0).nonzero()
    if cols.numel() == 0:
        return 0, 0
    return int(cols[0]) * bm.kv_block, min(kv_len, (int(cols[-1]) + 1) * bm.kv_block)


def _keep(plan: ReferencePlan, idx: dict, q0: int, c: int, lo: int, KV: int, dev) -> Optional[Tensor]:
    """Where the chunk's pairs are kept (mask_mod inside partial blocks, full blocks whole), bool
    broadcastable to ``[B, H, c, KV]``; None: every pair."""
    keep = None
    if plan.mask is not None:
        # masks are evaluated in float32 whatever the inputs, as torch and create_block_mask do
        with zero_division_names(plan.mask.graph, plan.mask.fn):
            keep = evaluate(plan.mask.graph, idx, plan.mask_buffers, plan.mask.scalars, torch.float32)
    if plan.blocks is not None:
        bm = plan.blocks
        kind = bm.kind[:, :, (q0 + torch.arange(c, device=dev)) // bm.q_block, :]
        kind = kind[..., (lo + torch.arange(KV, device=dev)) // bm.kv_block]
        partial = kind == int(BlockKind.PARTIAL)
        keep = (kind == int(BlockKind.FULL)) | (partial & keep if keep is not None else partial)
    return keep


def _grouped_scores(plan: ReferencePlan, q: Tensor, q0: int, k: Tensor) -> tuple:
    """``(lo, hi, qg, kc, s)`` for queries ``q0 .. q0 + c``: the kv span of their non-empty blocks,
    the queries with a GQA group's rows stacked (``qg [B, Hkv, G * c, D]``, so K is never
    broadcast, i.e. copied), the span's keys ``kc`` and the scaled scores ``s [B, Hq, c, hi - lo]``,
    all in the working dtype."""
    B, Hq, c, D = q.shape
    Hkv = k.shape[1]
    wd = _working_dtype(q.dtype)
    lo, hi = _kv_span(plan, q0, c, k.shape[2])
    kc = k[:, :, lo:hi].to(wd)
    qg = q.to(wd).reshape(B, Hkv, (Hq // Hkv) * c, D)
    s = (qg @ kc.transpose(-1, -2)).mul_(plan.scale).view(B, Hq, c, hi - lo)
    return lo, hi, qg, kc, s


def _chunk_forward(plan: ReferencePlan, q: Tensor, q0: int, k: Tensor, v: Tensor,
                   score_buffers) -> tuple[Tensor, Tensor, Tensor]:
    """Output ``[B, Hq, c, Dv]`` (input dtype), LSE and row max ``[B, Hq, c]`` for queries ``q0 .. q0 + c``.

    Only the kv columns of the chunk's non-empty blocks are computed (a causal mask halves the work).
    """
    B, Hq, c, D = q.shape
    Hkv = k.shape[1]
    wd = _working_dtype(q.dtype)
    dev = q.device
    lo, hi, qg, _, s = _grouped_scores(plan, q, q0, k)
    v = v[:, :, lo:hi]
    KV = hi - lo
    idx = (index_inputs(B, Hq, c, q0, KV, lo, dev, plan.batch_offset) if (plan.mask or plan.score or plan.dropout)
           else {})
    keep = _keep(plan, idx, q0, c, lo, KV, dev)
    if plan.score is not None:
        if keep is not None and s.requires_grad:
            # masked pairs send no gradient into score_mod (0 * NaN would, where the mod is NaN there)
            s.register_hook(lambda g, keep=keep: torch.where(keep, g, 0.0))
        with zero_division_names(plan.score.graph, plan.score.fn):
            s = torch.broadcast_to(evaluate(plan.score.graph, {"score": s, **idx}, score_buffers,
                                            plan.score.scalars, wd, grad_keep=keep), s.shape)
    if keep is not None:
        s = torch.where(keep, s, -torch.inf)
    o, lse, row_max = softmax_forward(plan, s, v.to(wd), idx, Hkv)
    return o.to(q.dtype), lse, row_max


def _chunk_len(plan: ReferencePlan, q: Tensor, k: Tensor) -> int:
    per_row = q.shape[0] * q.shape[1] * k.shape[2]
    return max(1, plan.chunk_elements // max(1, per_row))


def _tiles(plan: ReferencePlan, q: Tensor, k: Tensor) -> Optional[list]:
    """The block-row tiles (:mod:`flexcomp.reference_tiles`) when they apply: a block map shared by
    every batch element and head, on the CPU, over more than one q-block row; else None."""
    bm = plan.blocks
    if (bm is None or q.device.type != "cpu" or tuple(bm.kind.shape[:2]) != (1, 1)
            or q.shape[2] <= bm.q_block or k.shape[2] == 0):
        return None
    per_row = q.shape[0] * q.shape[1]
    return row_plans(bm, q.shape[2], k.shape[2], lambda span: plan.chunk_elements // max(1, per_row * span))


def _per_batch_plans(plan: ReferencePlan, q: Tensor, k: Tensor) -> Optional[list[ReferencePlan]]:
    """One plan per batch element when the block map differs by batch element but not by head (a
    padding mask): each element then runs on block-row tiles of its own map. None otherwise."""
    bm = plan.blocks
    if (bm is None or q.device.type != "cpu" or bm.kind.shape[0] == 1 or bm.kind.shape[1] != 1
            or bm.kind.shape[0] != q.shape[0] or k.shape[0] != q.shape[0]
            or q.shape[2] <= bm.q_block or k.shape[2] == 0):
        return None
    return [replace(plan, blocks=BlockMap(bm.kind[b:b + 1], bm.q_block, bm.kv_block),
                    batch_offset=plan.batch_offset + b) for b in range(q.shape[0])]


def chunked_forward(plan: ReferencePlan, q: Tensor, k: Tensor, v: Tensor, score_buffers: tuple,
                    want_max: bool = True) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Output, LSE and (``want_max``) row max for every query, a chunk (or block-row tile) at a time
    (no autograd). Tiles without a score_mod or dropout run on torch's fused CPU flash kernel
    unless the row max is asked for (that kernel does not give it)."""
    plans = _per_batch_plans(plan, q, k)
    if plans is not None:
        parts = [chunked_forward(p, q[b:b + 1], k[b:b + 1], v[b:b + 1], score_buffers, want_max)
                 for b, p in enumerate(plans)]
        return (torch.cat([o for o, _, _ in parts]), torch.cat([lse for _, lse, _ in parts]),
                torch.cat([mx for _, _, mx in parts]) if want_max else None)
    tiles = _tiles(plan, q, k)
    if tiles is not None:
        B, H, L, _ = q.shape
        wd = _working_dtype(q.dtype)
        out = q.new_empty(B, H, L, v.shape[-1])
        lse, mx = (torch.empty(B, H, L, dtype=wd, device=q.device) for _ in range(2))
        fused = not want_max and fused_applies(plan, q, k, v)
        scratch = MaskScratch(tiles, q.dtype, q.device) if fused else None
        for t in tiles:
            rows = slice(t.q0, t.q1)
            if fused:
                out[:, :, rows], lse[:, :, rows] = fused_forward(plan, q, k, v, t, scratch)
            else:
                out[:, :, rows], lse[:, :, rows], mx[:, :, rows] = tile_forward(plan, q, k, v, score_buffers, t)
        return out, lse, None if fused else mx
    step = _chunk_len(plan, q, k)
    if 0 < q.shape[2] <= step:  # one chunk (a decoding step, short sequences): no concatenation
        return _chunk_forward(plan, q, 0, k, v, score_buffers)
    B, H = q.shape[:2]
    outs = [q.new_empty(B, H, 0, v.shape[-1])]  # so that Q_LEN = 0 gives empty outputs
    lses = [q.new_empty(B, H, 0, dtype=_working_dtype(q.dtype))]
    maxes = [lses[0]]
    for s in range(0, q.shape[2], step):
        o, lse, mx = _chunk_forward(plan, q[:, :, s:s + step], s, k, v, score_buffers)
        outs.append(o)
        lses.append(lse)
        maxes.append(mx)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), torch.cat(maxes, dim=2)


def _chunk_grads(plan: ReferencePlan, q: Tensor, q0: int, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                 do: Tensor, dlse: Optional[Tensor]) -> tuple:
    """FlashAttention's backward for queries ``q0 .. q0 + c`` without a score_mod, from the saved
    output and LSE: ``p = exp(s - lse)``, ``dV = p_d^T dO``, ``dS = p * (dP_d - delta)`` with
    ``delta = rowsum(dO * O) - dLSE`` (``_d``: dropout's pattern applied). Returns ``(dq [B, Hq, c, D],
    dk, dv [B, Hkv, KV, *] for keys lo .. hi, lo, hi)`` in the working dtype."""
    B, Hq, c, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    wd = _working_dtype(q.dtype)
    dev = q.device
    lo, hi, qg, kc, s = _grouped_scores(plan, q, q0, k)
    KV = hi - lo
    if KV == 0:
        return torch.zeros(B, Hq, c, D, dtype=wd, device=dev), None, None, lo, hi
    vc = v[:, :, lo:hi].to(wd)
    idx = index_inputs(B, Hq, c, q0, KV, lo, dev, plan.batch_offset) if (plan.mask or plan.dropout) else {}
    keep = _keep(plan, idx, q0, c, lo, KV, dev)
    if keep is not None:
        s.masked_fill_(~torch.broadcast_to(keep, s.shape), -torch.inf)
    p, pd, dp, delta, dog = softmax_grads(plan, s, lse, o, do, dlse, vc, idx, Hkv)
    dv = pd.reshape(B, Hkv, G * c, KV).transpose(-1, -2) @ dog
    ds = p.mul_(dp.sub_(delta.unsqueeze(-1))).view(B, Hkv, G * c, KV)  # p is not needed after this
    dq = (ds @ kc).mul_(plan.scale).view(B, Hq, c, D)
    dk = (ds.transpose(-1, -2) @ qg).mul_(plan.scale)
    return dq, dk, dv, lo, hi


def _explicit_backward(plan: ReferencePlan, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       d_out: Optional[Tensor], d_lse: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` chunk by chunk with :func:`_chunk_grads` (no autograd graph: about a third
    of the recompute-under-autograd cost)."""
    plans = _per_batch_plans(plan, q, k)
    if plans is not None:
        one = lambda t, b: None if t is None else t[b:b + 1]  # noqa: E731
        parts = [_explicit_backward(p, q[b:b + 1], k[b:b + 1], v[b:b + 1], out[b:b + 1], lse[b:b + 1],
                                    one(d_out, b), one(d_lse, b)) for b, p in enumerate(plans)]
        return tuple(torch.cat(g) for g in zip(*parts))
    step = _chunk_len(plan, q, k)
    wd = _working_dtype(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=wd, device=k.device)
    dv = torch.zeros(v.shape, dtype=wd, device=v.device)
    d_out = torch.zeros_like(out) if d_out is None else d_out
    tiles = _tiles(plan, q, k)
    fused = d_lse is None and tiles is not None and fused_applies(plan, q, k, v)
    scratch = MaskScratch(tiles, q.dtype, q.device) if fused else None
    for t in tiles or ():
        sl = slice(t.q0, t.q1)
        if fused:
            dq[:, :, sl] = fused_grads(plan, q, k, v, out[:, :, sl], lse[:, :, sl], d_out[:, :, sl], t, dk, dv,
                                       scratch)
        else:
            dq[:, :, sl] = tile_grads(plan, q, k, v, out[:, :, sl], lse[:, :, sl], d_out[:, :, sl],
                                      None if d_lse is None else d_lse[:, :, sl], t, dk, dv)
    for s in range(0, q.shape[2] if tiles is None else 0, step):
        sl = slice(s, s + step)
        g_q, g_k, g_v, lo, hi = _chunk_grads(plan, q[:, :, sl], s, k, v, out[:, :, sl], lse[:, :, sl],
                                             d_out[:, :, sl], None if d_lse is None else d_lse[:, :, sl])
        dq[:, :, sl] = g_q
        if g_k is not None:
            dk[:, :, lo:hi] += g_k
            dv[:, :, lo:hi] += g_v
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def chunked_backward(plan: ReferencePlan, q: Tensor, k: Tensor, v: Tensor, bufs: tuple, d_out: Optional[Tensor],
                     d_lse: Optional[Tensor], needs: tuple, out: Optional[Tensor] = None,
                     lse: Optional[Tensor] = None) -> tuple:
    """``(dq, dk, dv, *d_bufs)`` (None where ``needs`` is False).

    Without a score_mod, given the forward's ``out`` and ``lse`` (and keys and values per batch
    element, LSEs finite or -inf), FlashAttention's backward by hand (:func:`_explicit_backward`);
    otherwise each chunk is recomputed under autograd (gradients into captured tensors too)."""
    if (plan.score is None and out is not None and lse is not None and k.shape[0] == q.shape[0]
            and not bool(torch.isposinf(lse).any() | torch.isnan(lse).any())):
        dq, dk, dv = _explicit_backward(plan, q, k, v, out, lse, d_out, d_lse)
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None
    step = _chunk_len(plan, q, k)
    B, H, L = q.shape[:3]
    wd = _working_dtype(q.dtype)
    d_out = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype, device=q.device) if d_out is None else d_out
    d_lse = torch.zeros(B, H, L, dtype=wd, device=q.device) if d_lse is None else d_lse
    with torch.enable_grad():
        kk = k.detach().requires_grad_(needs[1])
        vv = v.detach().requires_grad_(needs[2])
        bb = [b.detach().requires_grad_(n and b.is_floating_point()) for b, n in zip(bufs, needs[3:])]
        dq = torch.zeros_like(q) if needs[0] else None
        acc = {id(x): None for x in [kk, vv, *bb]}
        for s in range(0, L, step):
            qc = q[:, :, s:s + step].detach().requires_grad_(needs[0])
            o, lse, _ = _chunk_forward(plan, qc, s, kk, vv, [_on(b, q.device) for b in bb])
            wrt = [x for x in [qc, kk, vv, *bb] if x.requires_grad]
            outs = [(t, g[:, :, s:s + step]) for t, g in ((o, d_out), (lse, d_lse)) if t.requires_grad]
            if not wrt or not outs:
                continue
            grads = torch.autograd.grad([t for t, _ in outs], wrt, [g for _, g in outs], allow_unused=True)
            for x, g in zip(wrt, grads):
                if g is None:
                    continue
                if x is qc:
                    dq[:, :, s:s + step] = g
                else:
                    acc[id(x)] = g if acc[id(x)] is None else acc[id(x)] + g

    def grad_of(x, n):
        if not n:
            return None
        g = acc[id(x)]
        return torch.zeros_like(x) if g is None else g.to(x.dtype)

    return (dq, grad_of(kk, needs[1]), grad_of(vv, needs[2]),
            *(grad_of(b, n and b.is_floating_point()) for b, n in zip(bb, needs[3:])))


def _on(t: Tensor, device) -> Tensor:
    return t if t.device == device else t.to(device)


class _ChunkedAttention(torch.autograd.Function):
    """:func:`reference_attention`'s autograd (``flex_attention`` runs the reference through
    ``flexcomp.runtime`` and :class:`ReferenceBackend`, on the same chunk functions)."""

    @staticmethod
    def forward(ctx, plan: ReferencePlan, q: Tensor, k: Tensor, v: Tensor, *score_buffers: Tensor):
        out, lse, max_scores = chunked_forward(plan, q, k, v, score_buffers)
        ctx.plan = plan
        ctx.n_score = len(score_buffers)  # the mask's captures are saved too, for torch's in-place check
        ctx.save_for_backward(q, k, v, *score_buffers, *plan.mask_buffers)
        ctx.mark_non_differentiable(max_scores)  # as torch's: no gradient through the max
        return out, lse, max_scores

    @staticmethod
    @torch.autograd.function.once_differentiable  # a gradient of the gradient raises, never silently 0
    def backward(ctx, d_out: Tensor, d_lse: Tensor, d_max: Optional[Tensor] = None):
        q, k, v, *saved = ctx.saved_tensors
        return (None, *chunked_backward(ctx.plan, q, k, v, tuple(saved[:ctx.n_score]), d_out, d_lse,
                                        ctx.needs_input_grad[1:]))


def reference_attention(q: Tensor, k: Tensor, v: Tensor, plan: ReferencePlan,
                        score_buffers: tuple = (), want_max: bool = False):
    """Attention output ``[B, Hq, Q_LEN, Dv]`` and LSE ``[B, Hq, Q_LEN]`` (natural log); with
    ``want_max``, also ``max_scores`` ``[B, Hq, Q_LEN]``: the row max of the post-mod, masked scores
    (``-inf`` where nothing is kept; no gradient).

    Differentiable in q, k, v and every float tensor in ``score_buffers``.

    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 8, 4)
    >>> out, lse = reference_attention(q, k, v, ReferencePlan(None, None, None, (), 0.5))
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 8, 4]), torch.Size([1, 2, 8]))
    >>> s = (q @ k.transpose(-1, -2)) * 0.5
    >>> _, _, mx = reference_attention(q, k, v, ReferencePlan(None, None, None, (), 0.5), want_max=True)
    >>> torch.allclose(mx, s.amax(-1)), mx.requires_grad
    (True, False)
    """
    out, lse, max_scores = _ChunkedAttention.apply(plan, q, k, v, *score_buffers)
    return (out, lse, max_scores) if want_max else (out, lse)


def _unexpanded(lists: list[Tensor]) -> list[Tensor]:
    """The lists with their batch and head dims cut to one where every list is a stride-0 expansion
    there (a mask built for ``B`` batch elements that does not read ``b`` is one map, expanded)."""
    if any(t.dim() != lists[0].dim() + (i % 2) for i, t in enumerate(lists)) or lists[0].dim() != 3:
        return lists
    for d in (0, 1):
        if all(t.shape[d] > 1 and t.stride(d) == 0 for t in lists):
            lists = [t.narrow(d, 0, 1) for t in lists]
    return lists


def block_map_of(block_mask, device) -> Optional[BlockMap]:
    """Unpack a BlockMask's partial/full lists into the reference's dense block map (``[1, ...]``
    along batch or heads where the lists are expansions of one, as ``create_block_mask`` makes them
    for mask_mods that do not read ``b`` or ``h``: the block-row tiles need a map shared by all).
    Kept while the BlockMask and its kv lists live, unmodified (a forward and its backward, the
    layers of a model and the steps of a decode loop unpack it once)."""
    if block_mask is None:
        return None
    bm = block_mask
    lists = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    key = ("reference_block_map", id(bm), tuple(bm.BLOCK_SIZE), device, *(id(t) for t in lists),
           *(t._version for t in lists if t is not None))  # an in-place write to a list unpacks anew
    try:
        return CACHE.get_or_make(key, lambda: _block_map(bm, device),
                                 owners=(bm, *(t for t in lists if t is not None)))
    except TypeError:  # a BlockMask that cannot be weakly referenced: no keeping
        return _block_map(bm, device)


def _block_map(bm, device) -> BlockMap:
    has_full = bm.full_kv_num_blocks is not None
    lists = _unexpanded([bm.kv_num_blocks, bm.kv_indices,
                         *((bm.full_kv_num_blocks, bm.full_kv_indices) if has_full else ())])
    n = bm.kv_indices.shape[-1]
    kind = _ordered_to_dense(lists[0], lists[1], n).to(torch.int8)
    if has_full:
        full = _ordered_to_dense(lists[2], lists[3], n).to(torch.int8)
        kind = torch.where(full.bool(), int(BlockKind.FULL), kind).to(torch.int8)
    while kind.dim() < 4:
        kind = kind.unsqueeze(0)
    return BlockMap(kind.to(device), bm.BLOCK_SIZE[0], bm.BLOCK_SIZE[1])


class ReferenceBackend:
    """The reference as a :class:`flexcomp.runtime.AttentionBackend`: runs anything, any device."""

    def check(self, problem) -> None:
        """The reference runs every problem the API accepts."""

    def prepare(self, problem, plan, backward: bool) -> None:
        """Nothing to compile: the reference runs torch ops."""

    def forward(self, problem, plan, q: Tensor, k: Tensor, v: Tensor):
        """Chunked attention; captured tensors are moved to q's device for the call."""
        out, lse, max_scores = chunked_forward(self._plan(problem, q.device), q, k, v, self._score_buffers(problem),
                                               problem.want_max)
        return Outputs(out, lse, max_scores if problem.want_max else None)

    def backward(self, problem, plan, saved, d_out, d_lse, wanted):
        """Each chunk recomputed under autograd; gradients of captured tensors on their own devices."""
        dq, dk, dv, *d_bufs = chunked_backward(self._plan(problem, saved.q.device), saved.q, saved.k, saved.v,
                                               saved.score_buffers, d_out, d_lse, wanted, saved.out, saved.lse)
        return Grads(dq, dk, dv, tuple(d_bufs))

    @staticmethod
    def _score_buffers(problem) -> tuple:
        return tuple(_on(t, problem.device) for t in problem.score.buffers) if problem.score is not None else ()

    @staticmethod
    def _plan(problem, device) -> ReferencePlan:
        mask = problem.mask
        return ReferencePlan(problem.score, mask, block_map_of(problem.block_mask, device),
                             tuple(_on(t, device) for t in mask.buffers) if mask is not None else (),
                             problem.scale, problem.options.chunk_elements, problem.dropout)


REFERENCE_BACKEND = ReferenceBackend()
