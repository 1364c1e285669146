"""Block classification: which (q-block, kv-block) tiles a traced mask_mod keeps fully, partly, or not.

Two steps, both driven by the IR, never by an S x S tensor:

1. **Interval analysis** (:func:`block_intervals`): every node gets a lower and upper bound per
   block, computed from the block's index ranges (``q_idx`` in ``[q0, q1]``, ...). For a bool
   node ``lo = 1`` means "true everywhere in the block" and ``hi = 0`` "false everywhere". Loads
   from captured tensors use exact range min/max (a sparse table along the one ranged dim), so
   ``doc[q_idx] == doc[kv_idx]`` decides most blocks too. The bounds are sound, never exact:
   anything unsure is UNKNOWN.
2. **Dense evaluation** of the UNKNOWN blocks only (:func:`_evaluate_blocks`), a bounded batch of
   blocks at a time.

For a causal mask at 65,536 tokens with 128-blocks, step 1 decides 261,632 of 262,144 blocks and
step 2 evaluates the 512 diagonal ones.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .evaluate import evaluate
from .ir import OPS, Const, DType, Graph, Node, Op
from .ir_rules import Interval, IntervalArgs

if TYPE_CHECKING:  # annotations only: the trace stage imports ranges, which imports this module
    from .trace import TracedMod


# Elements of the mask evaluated at once in step 2 (bounded peak memory: a few hundred MB).
EVAL_BUDGET = 1 << 22


class BlockKind(enum.IntEnum):
    """What a block of the mask is."""

    EMPTY = 0  # every pair masked: skipped
    PARTIAL = 1  # some pairs masked: mask_mod applied
    FULL = 2  # no pair masked (and the block lies inside the sequence): mask_mod skipped
    UNKNOWN = 3  # interval analysis could not decide (internal to this module)


@dataclass(frozen=True)
class BlockGrid:
    """The blocking of a Q_LEN x KV_LEN mask.

    Fields: ``q_len``, ``kv_len`` (sequence lengths), ``q_block``, ``kv_block`` (block sizes);
    ``num_q``, ``num_kv`` are the block counts (the last block may hang over the end).
    """

    q_len: int
    kv_len: int
    q_block: int
    kv_block: int

    @property
    def num_q(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def num_kv(self) -> int:
        return -(-self.kv_len // self.kv_block)


def _f(x) -> torch.Tensor:
    return x.to(torch.float64)


def _range_load(buf: torch.Tensor, iv: list[Interval], device) -> tuple[Interval, torch.Tensor]:
    """Sound bounds of ``buf[i0, i1, ...]`` with each index in its interval, and where an index may
    fall outside ``[0, size)`` (bool, broadcastable): such blocks are evaluated pair by pair, where an
    index out of torch's range raises as torch does (negative indices count from the end there)."""
    buf = buf.detach().to(device)
    if buf.dtype == torch.bool:
        buf = buf.to(torch.int8)
    safe = torch.ones((), dtype=torch.bool, device=device)
    for d, v in enumerate(iv):
        safe = safe & torch.isfinite(v.lo) & torch.isfinite(v.hi) & (v.lo >= 0) & (v.hi < buf.shape[d])
    if buf.numel() == 0:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return Interval(z, z), ~safe
    gmin, gmax = _f(buf.min()), _f(buf.max())
    fallback = Interval(gmin, gmax)
    if buf.dim() == 0:
        return Interval(_f(buf), _f(buf)), ~safe
    if not bool(safe.all()):
        return fallback, ~safe  # some block may index out of range: global bounds, and those blocks evaluated
    ranged = [d for d, v in enumerate(iv) if bool((v.lo != v.hi).any())]
    if len(ranged) > 1 or (ranged and buf.numel() > (1 << 24)):
        return fallback, ~safe  # (a sparse table of a huge tensor would cost more than it saves)
    if not ranged:
        idx = tuple(v.lo.long() for v in iv)
        val = _f(buf[idx])
        return Interval(val, val), ~safe
    d = ranged[0]
    # sparse table of min / max along dim d: level k covers 2**k elements
    x = buf.movedim(d, -1)
    mins, maxs = [_f(x)], [_f(x)]
    n = x.shape[-1]
    k = 1
    while (1 << k) <= n:
        half = 1 << (k - 1)
        mins.append(torch.minimum(mins[-1][..., :-half], mins[-1][..., half:]))
        maxs.append(torch.maximum(maxs[-1][..., :-half], maxs[-1][..., half:]))
        k += 1
    lo_i, hi_i = iv[d].lo.long(), iv[d].hi.long()
    length = hi_i - lo_i + 1
    level = torch.floor(torch.log2(length.double())).long()
    others = [v.lo.long() for j, v in enumerate(iv) if j != d]
    shape = torch.broadcast_shapes(lo_i.shape, hi_i.shape, *[o.shape for o in others])
    lo_i, hi_i, level = (t.expand(shape) for t in (lo_i, hi_i, level))
    others = [o.expand(shape) for o in others]
    out_lo = torch.full(shape, math.inf, dtype=torch.float64, device=device)
    out_hi = torch.full(shape, -math.inf, dtype=torch.float64, device=device)
    for k, (mn, mx) in enumerate(zip(mins, maxs)):
        sel = level == k
        if not sel.any():
            continue
        a = lo_i[sel]
        b = hi_i[sel] - (1 << k) + 1
        oth = [o[sel] for o in others]
        out_lo[sel] = torch.minimum(mn[(*oth, a)], mn[(*oth, b)])
        out_hi[sel] = torch.maximum(mx[(*oth, a)], mx[(*oth, b)])
    return Interval(out_lo, out_hi), ~safe


# The bounds are computed in float64; the mask runs in float32. Each float op may round by half
# an ulp of float32 (transcendentals by a few): widening every float bound outward by 2**-20
# relative (~8 float32 ulps) keeps the analysis sound; ties then land in UNKNOWN and are evaluated.
_FLOAT_SLACK = 2.0 ** -20


def _widen(iv: Interval) -> Interval:
    return Interval(iv.lo - iv.lo.abs() * _FLOAT_SLACK - 1e-30, iv.hi + iv.hi.abs() * _FLOAT_SLACK + 1e-30)


_INT_RANGE = {DType.I32: (-(2.0 ** 31), 2.0 ** 31 - 1), DType.I64: (-(2.0 ** 63), 2.0 ** 63 - 1)}

LoadBounds = Callable[[Node, list[Interval]], Interval]


def propagate(g: Graph, inputs: dict[str, Interval], scalars: dict[str, float], load: LoadBounds,
              like: torch.Tensor, wrap_guard: bool = True) -> list[Interval]:
    """Bounds of every node of ``g`` from bounds of its inputs (tensors of any broadcastable shape).

    Each op's bounds come from its row's ``interval`` rule (:mod:`flexcomp.ir_rules`); inputs,
    scalars, loads, the float widening and the wrap guard are handled here.
    ``load(node, index_bounds)`` bounds a load; ``scalars`` are the captured numbers by name.
    ``wrap_guard``: an integer node whose exact bounds leave its type's range may wrap, so it is
    unknown there (sound); without it the exact, unwrapped bounds are kept (to find such nodes).
    """
    vals: list = [None] * len(g.nodes)

    def iv(a) -> Interval:
        if isinstance(a, Const):
            v = like + float(a.value)
            return Interval(v, v)
        return vals[a]

    for n in g.nodes:
        xs = [iv(a) for a in n.args]
        op = n.op
        if op is Op.INPUT:
            out = inputs[n.attr]
        elif op is Op.SCALAR:
            v = like + float(scalars[n.attr])
            out = Interval(v, v)
        elif op is Op.LOAD:
            out = load(n, xs)
        else:
            consts = tuple(a.value if isinstance(a, Const) else None for a in n.args)
            arg_dtypes = tuple(g.dtype_of(a) for a in n.args)
            out = OPS[op].interval(IntervalArgs(tuple(xs), consts, n.dtype, arg_dtypes, like))
        if n.dtype is DType.F32 and op is not Op.SCALAR:
            out = _widen(out)
        elif wrap_guard and n.dtype.is_int and op not in (Op.INPUT, Op.SCALAR):
            tmin, tmax = _INT_RANGE[n.dtype]
            wraps = (out.lo < tmin) | (out.hi > tmax)
            if bool(wraps.any()):
                out = Interval(torch.where(wraps, -math.inf, out.lo), torch.where(wraps, math.inf, out.hi))
        vals[n.id] = out
    return vals


def block_intervals(tm: TracedMod, grid: BlockGrid, B: int, H: int, device,
                    unsafe: list | None = None) -> Interval:
    """Bounds of the mask output for every block: tensors broadcastable to ``[B, H, num_q, num_kv]``.

    ``unsafe`` (a list, filled in): for each load, where (broadcastable to the blocks) an index may
    leave its captured tensor: those blocks must be evaluated, not decided from bounds.
    """
    g: Graph = tm.graph
    nq, nkv = grid.num_q, grid.num_kv

    def ar(n: int) -> torch.Tensor:
        return torch.arange(n, device=device, dtype=torch.float64)

    q0 = ar(nq) * grid.q_block
    k0 = ar(nkv) * grid.kv_block
    inputs = {
        "b": Interval(ar(B).view(-1, 1, 1, 1), ar(B).view(-1, 1, 1, 1)),
        "h": Interval(ar(H).view(1, -1, 1, 1), ar(H).view(1, -1, 1, 1)),
        "q_idx": Interval(q0.view(1, 1, -1, 1), torch.clamp(q0 + grid.q_block - 1, max=grid.q_len - 1).view(1, 1, -1, 1)),
        "kv_idx": Interval(k0.view(1, 1, 1, -1), torch.clamp(k0 + grid.kv_block - 1, max=grid.kv_len - 1).view(1, 1, 1, -1)),
    }
    buf_of = {b.name: t for b, t in zip(g.buffers, tm.buffers)}
    unsafe = [] if unsafe is None else unsafe

    def load(n: Node, xs: list[Interval]) -> Interval:
        out, maybe_out = _range_load(buf_of[n.attr], xs, device)
        unsafe.append(maybe_out)
        return out

    like = torch.zeros((), dtype=torch.float64, device=device)
    scalar_of = {c.name: v for c, v in zip(g.scalars, tm.scalars)}
    vals = propagate(g, inputs, scalar_of, load, like)
    out = g.output
    if isinstance(out, Const):
        v = like + float(out.value)
        return Interval(v, v)
    return vals[out]


def _evaluate_blocks(tm: TracedMod, grid: BlockGrid, coords: torch.Tensor, device) -> torch.Tensor:
    """Count the kept pairs of each block in ``coords`` (``[n, 4]``: b, h, q-block, kv-block)."""
    QB, KVB = grid.q_block, grid.kv_block
    per = max(1, EVAL_BUDGET // (QB * KVB))
    counts = []
    aq = torch.arange(QB, device=device, dtype=torch.int32)
    ak = torch.arange(KVB, device=device, dtype=torch.int32)
    for s in range(0, coords.shape[0], per):
        c = coords[s:s + per].to(torch.int32)
        q = (c[:, 2:3] * QB + aq).view(-1, QB, 1)
        kv = (c[:, 3:4] * KVB + ak).view(-1, 1, KVB)
        valid = (q < grid.q_len) & (kv < grid.kv_len)
        inputs = {"b": c[:, 0].view(-1, 1, 1), "h": c[:, 1].view(-1, 1, 1),
                  "q_idx": q.clamp(max=grid.q_len - 1), "kv_idx": kv.clamp(max=grid.kv_len - 1)}
        m = evaluate(tm.graph, inputs, tm.buffers, tm.scalars)
        m = torch.broadcast_to(m, valid.shape) & valid
        # an int32 sum: counts stay below QB * KVB, and torch's CPU sums bools to int32 ~30x faster than
        # count_nonzero or an int64 sum
        counts.append(m.reshape(m.shape[0], -1).sum(1, dtype=torch.int32))
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int32, device=device)


def classify_blocks(tm: TracedMod, grid: BlockGrid, B: int, H: int, device) -> torch.Tensor:
    """The :class:`BlockKind` of every block: int8 ``[B, H, num_q, num_kv]`` (a broadcast view
    where the mask ignores ``b`` or ``h``)."""
    g = tm.graph
    if any(t.device != torch.device(device) for t in tm.buffers):
        tm = dataclasses.replace(tm, buffers=tuple(t.to(device) for t in tm.buffers))
    Bx = B if g.uses_input("b") else 1
    Hx = H if g.uses_input("h") else 1
    with torch.no_grad():
        unsafe: list = []
        out = block_intervals(tm, grid, Bx, Hx, device, unsafe)
        shape = (Bx, Hx, grid.num_q, grid.num_kv)
        lo, hi = torch.broadcast_to(out.lo, shape), torch.broadcast_to(out.hi, shape)
        kind = torch.full(shape, int(BlockKind.UNKNOWN), dtype=torch.int8, device=device)
        kind[hi == 0] = int(BlockKind.EMPTY)
        kind[lo == 1] = int(BlockKind.FULL)
        for u in unsafe:  # an index may leave its tensor there: evaluate (torch raises IndexError if it does)
            if bool(u.any()):
                kind[torch.broadcast_to(u, shape)] = int(BlockKind.UNKNOWN)
        unknown = (kind == int(BlockKind.UNKNOWN)).nonzero()
        if unknown.numel():
            counts = _evaluate_blocks(tm, grid, unknown, device)
            k = torch.where(counts == 0, int(BlockKind.EMPTY),
                            torch.where(counts == grid.q_block * grid.kv_block, int(BlockKind.FULL),
                                        int(BlockKind.PARTIAL))).to(torch.int8)
            kind[tuple(unknown.T)] = k
        # blocks that hang over the end of the sequence are never FULL (as in torch)
        if grid.q_len % grid.q_block:
            edge = kind[:, :, -1, :]
            edge[edge == int(BlockKind.FULL)] = int(BlockKind.PARTIAL)
        if grid.kv_len % grid.kv_block:
            edge = kind[:, :, :, -1]
            edge[edge == int(BlockKind.FULL)] = int(BlockKind.PARTIAL)
    return kind.expand(B, H, grid.num_q, grid.num_kv)
