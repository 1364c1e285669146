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
import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import CACHE
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


@dataclass(frozen=True)
class IndexKind:
    """What the analysis knows of one index of a load, from the graph alone.

    ``ranged``: it depends on ``q_idx`` or ``kv_idx`` (so it spans a range within a block);
    ``block``: when the index *is* ``q_idx`` (or ``kv_idx``), the block size along it: its range in
    every block is then one aligned run of ``block`` elements, reduced once per block."""

    ranged: bool
    block: int = 0
    extent: int = 0  # with ``block``: the input's length (the index stays below it)


def _run_bounds(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each aligned run of ``width`` elements of the last dim (the last run padded
    with its last element), float64 ``[..., runs]``."""
    n = x.shape[-1]
    runs = -(-n // width)
    pad = runs * width - n
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    x = x.reshape(*x.shape[:-1], runs, width)
    return _f(x.amin(-1)), _f(x.amax(-1))


def _aligned_bounds(runs: tuple[torch.Tensor, torch.Tensor], lo: torch.Tensor, width: int,
                    others: list[torch.Tensor]) -> Interval:
    """Bounds of ``x[..., i]`` for ``i`` in the aligned run ``[lo, lo + width)`` from the runs'
    bounds (:func:`_run_bounds`); ``lo`` is an index input's lower bounds (``[..., blocks, ...]``, one
    axis long). A plain slice when nothing else indexes ``x`` and it covers every block; else one
    gather (runs past the end are clamped: the caller marks those blocks unsafe)."""
    mins, maxs = runs
    blocks = lo.numel()
    if not others and mins.shape[-1] >= blocks:
        return Interval(mins[:blocks].view(lo.shape), maxs[:blocks].view(lo.shape), exact=True)
    run = torch.clamp(lo.long() // width, 0, mins.shape[-1] - 1)
    shape = torch.broadcast_shapes(run.shape, *[o.shape for o in others])
    idx = (*[o.expand(shape) for o in others], run.expand(shape))
    return Interval(mins[idx], maxs[idx], exact=True)


# Below this many elements along the ranged dim, any range's bounds come from an all-pairs table
# (a few device ops); above it, from a sparse table (two ops per level).
_PAIR_TABLE = 2048


def _range_bounds(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, others: list[torch.Tensor]) -> Interval:
    """Bounds of ``x[..., i]`` (the last dim) for ``i`` in ``[lo, hi]`` (clamped into range)."""
    n = x.shape[-1]
    lo_i, hi_i = torch.clamp(lo, 0, n - 1).long(), torch.clamp(hi, 0, n - 1).long()
    hi_i = torch.maximum(lo_i, hi_i)
    shape = torch.broadcast_shapes(lo_i.shape, hi_i.shape, *[o.shape for o in others])
    lo_i, hi_i = lo_i.expand(shape), hi_i.expand(shape)
    others = [o.expand(shape) for o in others]
    if n <= _PAIR_TABLE:  # table[..., i, j] = min / max of x[..., i..j]: cummin along j from each i
        ar = torch.arange(n, device=x.device)
        before = ar.view(1, -1) < ar.view(-1, 1)
        rows = x.unsqueeze(-2).expand(*x.shape[:-1], n, n)
        mins = torch.where(before, math.inf, _f(rows)).cummin(-1).values
        maxs = torch.where(before, -math.inf, _f(rows)).cummax(-1).values
        return Interval(mins[(*others, lo_i, hi_i)], maxs[(*others, lo_i, hi_i)], exact=True)
    # sparse table: level k holds the min / max of 2**k elements from each start
    length = hi_i - lo_i + 1
    level = torch.floor(torch.log2(length.double())).long()
    out_lo = torch.full(shape, math.inf, dtype=torch.float64, device=x.device)
    out_hi = torch.full(shape, -math.inf, dtype=torch.float64, device=x.device)
    mn = mx = _f(x)
    k = 0
    while True:
        sel = level == k
        b = torch.clamp(hi_i - (1 << k) + 1, min=0)
        out_lo = torch.where(sel, torch.minimum(mn[(*others, lo_i)], mn[(*others, b)]), out_lo)
        out_hi = torch.where(sel, torch.maximum(mx[(*others, lo_i)], mx[(*others, b)]), out_hi)
        k += 1
        if (1 << k) > n:
            return Interval(out_lo, out_hi, exact=True)
        half = 1 << (k - 1)
        pad_lo = mn[..., -1:].expand(*mn.shape[:-1], half)
        pad_hi = mx[..., -1:].expand(*mx.shape[:-1], half)
        mn = torch.minimum(mn, torch.cat([mn[..., half:], pad_lo], dim=-1))
        mx = torch.maximum(mx, torch.cat([mx[..., half:], pad_hi], dim=-1))


def _range_load(buf: torch.Tensor, iv: list[Interval], kinds: tuple[IndexKind, ...], device,
                memo: dict | None = None) -> tuple[Interval, torch.Tensor | None]:
    """Sound bounds of ``buf[i0, i1, ...]`` with each index in its interval, and where an index may
    fall outside ``[0, size)`` (bool, broadcastable; None where no block can): such blocks are
    evaluated pair by pair, where an index out of torch's range raises as torch does (negative
    indices count from the end there). ``memo`` keeps per-run bounds of a tensor between its loads.

    Nothing is read back to the host: on a GPU the whole analysis is queued without a wait."""
    buf_id = id(buf)  # the capture itself (the analysis keeps it alive): its runs are kept per id
    buf = buf.detach().to(device)
    if buf.dtype == torch.bool:
        buf = buf.to(torch.int8)
    unsafe = None
    for d, (v, k) in enumerate(zip(iv, kinds)):
        if k.block and k.extent <= buf.shape[d]:
            continue  # an index input inside the dim: every block is safe (known from the shapes)
        outside = v.hi >= buf.shape[d]
        if not k.block:
            outside = outside | (v.lo < 0) | ~torch.isfinite(v.lo)
        unsafe = outside if unsafe is None else unsafe | outside
    if buf.numel() == 0:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return Interval(z, z, exact=True), unsafe
    if buf.dim() == 0:
        return Interval(_f(buf), _f(buf), exact=True), unsafe
    ranged = [d for d, k in enumerate(kinds) if k.ranged]
    if len(ranged) > 1 or (ranged and not kinds[ranged[0]].block and buf.numel() > (1 << 24)):
        # (a sparse table of a huge tensor would cost more than it saves)
        return Interval(_f(buf.min()), _f(buf.max()), exact=True), unsafe
    points = []
    for d, v in enumerate(iv):
        if d not in ranged:  # negative or outside: unsafe there, any in-range stand-in will do
            points.append(torch.clamp(v.lo, 0, buf.shape[d] - 1).long())
    if not ranged:
        val = _f(buf[tuple(points)])
        return Interval(val, val, exact=True), unsafe
    d = ranged[0]
    x = buf.movedim(d, -1)
    width = kinds[d].block
    if width:
        memo = {} if memo is None else memo
        key = (buf_id, d, width)
        if key not in memo:
            memo[key] = _run_bounds(x, width)
        return _aligned_bounds(memo[key], iv[d].lo, width, points), unsafe
    return _range_bounds(x, iv[d].lo, iv[d].hi, points), unsafe


# The bounds are computed in float64; the mask runs in float32. Each float op may round by half
# an ulp of float32 (transcendentals by a few): widening every float bound outward by 2**-20
# relative (~8 float32 ulps) keeps the analysis sound; ties then land in UNKNOWN and are evaluated.
_FLOAT_SLACK = 2.0 ** -20


def _widen(iv: Interval) -> Interval:
    return Interval(iv.lo - iv.lo.abs() * _FLOAT_SLACK - 1e-30, iv.hi + iv.hi.abs() * _FLOAT_SLACK + 1e-30)


_INT_RANGE = {DType.I32: (-(2.0 ** 31), 2.0 ** 31 - 1), DType.I64: (-(2.0 ** 63), 2.0 ** 63 - 1)}

LoadBounds = Callable[[Node, list[Interval]], Interval]


def _magnitude(n: Node, m: list[float], extent: float, scalars: dict[str, float]) -> float:
    """An upper bound of ``|value|`` of node ``n`` over the whole domain from the graph alone (inputs
    at most ``extent``), inf where the op or a load makes it unknown; ``m`` holds its operands'."""
    def arg(a) -> float:
        return abs(float(a.value)) if isinstance(a, Const) else m[a]

    xs = [arg(a) for a in n.args]
    op = n.op
    if op is Op.INPUT:
        return extent
    if op is Op.SCALAR:
        v = scalars[n.attr]
        return abs(float(v)) if isinstance(v, numbers.Real) else math.inf  # a run-time value: unbounded
    if op in (Op.ADD, Op.SUB):
        return xs[0] + xs[1]
    if op is Op.MUL:
        return xs[0] * xs[1]
    if op in (Op.NEG, Op.ABS, Op.CAST):
        return xs[0]
    if op in (Op.MINIMUM, Op.MAXIMUM):
        return max(xs)
    if op is Op.WHERE:
        return max(xs[1], xs[2])
    if op is Op.FLOORDIV:
        return xs[0] + 1
    if op is Op.MOD:
        return xs[1]
    return math.inf


def propagate(g: Graph, inputs: dict[str, Interval], scalars: dict[str, float], load: LoadBounds,
              like: torch.Tensor, wrap_guard: bool = True, extent: float = math.inf) -> list[Interval]:
    """Bounds of every node of ``g`` from bounds of its inputs (tensors of any broadcastable shape).

    The bounds may also be other objects with tensor arithmetic and ``__torch_function__``
    (:mod:`flexcomp.codegen.bounds` passes proxies that write the same computation as Triton source),
    and a captured number may then be such an object too (a run-time value: unbounded magnitude, and
    never a literal to the rules).

    Each op's bounds come from its row's ``interval`` rule (:mod:`flexcomp.ir_rules`); inputs,
    scalars, loads, the float widening and the wrap guard are handled here.
    ``load(node, index_bounds)`` bounds a load; ``scalars`` are the captured numbers by name.
    ``wrap_guard``: an integer node whose exact bounds leave its type's range may wrap, so it is
    unknown there (sound); without it the exact, unwrapped bounds are kept (to find such nodes).
    ``extent``: a bound on ``|input|``; integer nodes that provably stay in range by it (no load
    upstream) skip the guard. Nothing is read back to the host.
    """
    vals: list = [None] * len(g.nodes)
    mags: list[float] = [math.inf] * len(g.nodes)
    known: dict[int, int] = {}  # integer captured numbers (and int casts of them): rules see them as literals

    def iv(a) -> Interval:
        if isinstance(a, Const):
            v = like + float(a.value)
            return Interval(v, v, exact=True)
        return vals[a]

    for n in g.nodes:
        xs = [iv(a) for a in n.args]
        op = n.op
        mags[n.id] = _magnitude(n, mags, extent, scalars)
        if op is Op.INPUT:
            out = inputs[n.attr]
        elif op is Op.SCALAR:
            value = scalars[n.attr]
            literal = isinstance(value, numbers.Real)  # else a run-time value (a generated kernel's argument)
            v = like + (float(value) if literal else value)
            out = Interval(v, v)
            if n.dtype.is_int and literal:
                known[n.id] = int(value)
        elif op is Op.LOAD:
            out = load(n, xs)
        else:
            consts = tuple(a.value if isinstance(a, Const) else known.get(a) for a in n.args)
            arg_dtypes = tuple(g.dtype_of(a) for a in n.args)
            out = OPS[op].interval(IntervalArgs(tuple(xs), consts, n.dtype, arg_dtypes, like))
            if op is Op.CAST and n.dtype.is_int and consts[0] is not None:
                tmin, tmax = _INT_RANGE[n.dtype]
                if tmin <= consts[0] <= tmax:
                    known[n.id] = int(consts[0])
        if n.dtype is DType.F32 and op is not Op.SCALAR:
            out = _widen(out)
        elif wrap_guard and n.dtype.is_int and op not in (Op.INPUT, Op.SCALAR):
            tmin, tmax = _INT_RANGE[n.dtype]
            if not (mags[n.id] <= tmax):
                wraps = (out.lo < tmin) | (out.hi > tmax)
                out = Interval(torch.where(wraps, -math.inf, out.lo), torch.where(wraps, math.inf, out.hi), exact=True)
        vals[n.id] = out
    return vals


def zero_divisors(g: Graph, vals: list[Interval]) -> list:
    """Per integer ``//`` or ``%`` by a node, where (broadcastable to the blocks) its divisor may be 0:
    those blocks are evaluated, where torch raises ZeroDivisionError. ``vals``: :func:`propagate`'s."""
    return [(vals[n.args[1]].lo <= 0) & (vals[n.args[1]].hi >= 0) for n in g.nodes
            if n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int and not isinstance(n.args[1], Const)]


def index_kinds(g: Graph, grid: BlockGrid) -> dict[int, tuple[IndexKind, ...]]:
    """For each load node: what each of its indices is (:class:`IndexKind`), from the graph alone."""
    blocks = {"q_idx": grid.q_block, "kv_idx": grid.kv_block}
    lengths = {"q_idx": grid.q_len, "kv_idx": grid.kv_len}
    ranged: list[bool] = [False] * len(g.nodes)
    out = {}
    for n in g.nodes:
        args = [a for a in n.args if not isinstance(a, Const)]
        ranged[n.id] = (n.op is Op.INPUT and blocks.get(n.attr, 1) > 1) or any(ranged[a] for a in args)
        if n.op is Op.LOAD:
            kinds = []
            for a in n.args:
                if isinstance(a, Const):
                    kinds.append(IndexKind(False))
                    continue
                src = g.nodes[a]
                aligned = src.op is Op.INPUT and src.attr in blocks and ranged[a]
                kinds.append(IndexKind(ranged[a], blocks[src.attr], lengths[src.attr]) if aligned
                             else IndexKind(ranged[a]))
            out[n.id] = tuple(kinds)
    return out


def _block_inputs(grid: BlockGrid, B: int, H: int, device) -> dict[str, Interval]:
    """Each index input's bounds per block (kept per grid and device: a few small tensors)."""
    def ar(n: int) -> torch.Tensor:
        return torch.arange(n, device=device, dtype=torch.float64)

    def point(t: torch.Tensor) -> Interval:
        return Interval(t, t, exact=True)

    q0 = ar(grid.num_q) * grid.q_block
    k0 = ar(grid.num_kv) * grid.kv_block
    q1 = torch.clamp(q0 + grid.q_block - 1, max=grid.q_len - 1)
    k1 = torch.clamp(k0 + grid.kv_block - 1, max=grid.kv_len - 1)
    return {"b": point(ar(B).view(-1, 1, 1, 1)), "h": point(ar(H).view(1, -1, 1, 1)),
            "q_idx": Interval(q0.view(1, 1, -1, 1), q1.view(1, 1, -1, 1), exact=True),
            "kv_idx": Interval(k0.view(1, 1, 1, -1), k1.view(1, 1, 1, -1), exact=True)}


def block_intervals(tm: TracedMod, grid: BlockGrid, B: int, H: int, device,
                    unsafe: list | None = None) -> Interval:
    """Bounds of the mask output for every block: tensors broadcastable to ``[B, H, num_q, num_kv]``.

    ``unsafe`` (a list, filled in): for each load, where (broadcastable to the blocks) an index may
    leave its captured tensor, and for each integer ``//`` / ``%``, where its divisor may be 0: those
    blocks must be evaluated (where torch raises), not decided from bounds.
    """
    g: Graph = tm.graph
    inputs = CACHE.get_or_make(("block_inputs", grid, B, H, torch.device(device)),
                               lambda: _block_inputs(grid, B, H, device))
    buf_of = {b.name: t for b, t in zip(g.buffers, tm.buffers)}
    kinds = index_kinds(g, grid)
    unsafe = [] if unsafe is None else unsafe
    memo: dict = {}

    def load(n: Node, xs: list[Interval]) -> Interval:
        out, maybe_out = _range_load(buf_of[n.attr], xs, kinds[n.id], device, memo)
        if maybe_out is not None:
            unsafe.append(maybe_out)
        return out

    like = torch.zeros((), dtype=torch.float64, device=device)
    scalar_of = {c.name: v for c, v in zip(g.scalars, tm.scalars)}
    extent = float(max(B, H, grid.q_len, grid.kv_len))
    vals = propagate(g, inputs, scalar_of, load, like, extent=extent)
    unsafe += zero_divisors(g, vals)
    out = g.output
    if isinstance(out, Const):
        v = like + float(out.value)
        return Interval(v, v, exact=True)
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


def evaluate_unknown(tm: TracedMod, grid: BlockGrid, kind: torch.Tensor) -> None:
    """Decide the UNKNOWN blocks of ``kind`` (``[Bx, Hx, num_q, num_kv]`` int8, in place) by evaluating
    the mask on each of their pairs with torch ops, a bounded batch of blocks at a time (the
    reference evaluator; ``flexcomp.codegen.blockmask`` does the same in one kernel)."""
    unknown = (kind == int(BlockKind.UNKNOWN)).nonzero()
    if not unknown.numel():
        return
    counts = _evaluate_blocks(tm, grid, unknown, kind.device)
    k = torch.where(counts == 0, int(BlockKind.EMPTY),
                    torch.where(counts == grid.q_block * grid.kv_block, int(BlockKind.FULL),
                                int(BlockKind.PARTIAL))).to(torch.int8)
    kind[tuple(unknown.T)] = k


UnknownEvaluator = Callable[["TracedMod", BlockGrid, torch.Tensor], None]


def classify_blocks(tm: TracedMod, grid: BlockGrid, B: int, H: int, device,
                    evaluate: UnknownEvaluator = evaluate_unknown) -> torch.Tensor:
    """The :class:`BlockKind` of every block: int8 ``[B, H, num_q, num_kv]`` (a broadcast view
    where the mask ignores ``b`` or ``h``).

    ``evaluate`` decides the blocks the interval analysis leaves UNKNOWN (in place): the torch
    evaluator here, or the generated kernel of ``flexcomp.codegen.blockmask``. Up to it, nothing is
    read back to the host."""
    g = tm.graph
    if any(t.device != torch.device(device) for t in tm.buffers):
        tm = dataclasses.replace(tm, buffers=tuple(t.to(device) for t in tm.buffers))
    Bx = B if g.uses_input("b") else 1
    Hx = H if g.uses_input("h") else 1
    with torch.no_grad():
        unsafe: list = []
        out = block_intervals(tm, grid, Bx, Hx, device, unsafe)
        shape = (Bx, Hx, grid.num_q, grid.num_kv)
        # blocks that hang over the end of the sequence are never FULL (as in torch); the evaluators
        # count the pairs inside the sequence, so they never call such a block FULL either
        full = int(BlockKind.FULL)
        if grid.q_len % grid.q_block or grid.kv_len % grid.kv_block:
            inside = torch.ones(grid.num_q, grid.num_kv, dtype=torch.bool, device=device)
            inside[-1, :] = grid.q_len % grid.q_block == 0
            inside[:, -1] &= grid.kv_len % grid.kv_block == 0
            full = torch.where(inside, int(BlockKind.FULL), int(BlockKind.PARTIAL))
        kind = torch.where(out.hi == 0, int(BlockKind.EMPTY),
                           torch.where(out.lo == 1, full, int(BlockKind.UNKNOWN)))
        if unsafe:  # an index may leave its tensor there: evaluate (torch raises IndexError if it does)
            kind = torch.where(functools.reduce(torch.logical_or, unsafe), int(BlockKind.UNKNOWN), kind)
        kind = torch.broadcast_to(kind.to(torch.int8), shape).contiguous()
        evaluate(tm, grid, kind)
    return kind.expand(B, H, grid.num_q, grid.num_kv)
