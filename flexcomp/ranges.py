"""Whole-domain value ranges of a traced mod: integer width, and loads proven inside their tensors.

Two questions about a mod over *every* ``(b, h, q_idx, kv_idx)`` of a problem, both answered by the
interval propagation of :mod:`flexcomp.sparsity` with the whole domain as one block:

1. **Does 32-bit integer arithmetic give torch's answer?** torch evaluates mods on int64 index
   tensors; the IR's indices are ``i32``, and ``(q_idx * 2**20) % 7`` wraps in 32 bits. At trace
   time :func:`needs_int64` bounds every integer node for indices below :data:`INDEX_LIMIT`; if a
   node that torch computes in int64 (it depends on an index) can leave the int32 range, the mod is
   traced again with its indices cast to ``i64`` first, so every value has torch's type and result.
   Mods that stay in range (nearly all) keep 32-bit arithmetic, which the kernels prefer.
   :func:`check_index_limit` refuses, clearly, a problem larger than the bound a graph was proven for.
2. **Does every load index inside its captured tensor?** :func:`loads_in_range` proves it for a
   problem's sizes and the captured tensors' values; where it cannot, the Triton kernels run a
   checked variant of the mod that flags an out-of-range index on the device (torch raises
   ``IndexError`` there; reading a made-up value is never an answer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import FlexcompError, FlexcompRuntimeError
from .ir import Const, DType, Graph, Node, Op
from .ir_rules import Interval
from .sparsity import _INT_RANGE, propagate
from .trace_cache import value_ranges

if TYPE_CHECKING:  # annotations only: the trace stage imports this module
    from .trace import TracedMod

# Indices (and batch, head counts) a graph is proven for at trace time: 2**24 = 16,777,216 tokens.
INDEX_LIMIT = 1 << 24

_INDEX_INPUTS = ("b", "h", "q_idx", "kv_idx")
_STORAGE_RANGE = {
    "bool": (0, 1), "uint8": (0, 255), "int8": (-128, 127), "int16": (-(2 ** 15), 2 ** 15 - 1),
    "int32": _INT_RANGE[DType.I32], "int64": _INT_RANGE[DType.I64],
}


@dataclass(frozen=True)
class Domain:
    """Exclusive upper bounds of the mod's index inputs: ``b < batch``, ``h < heads``,
    ``q_idx < q_len``, ``kv_idx < kv_len``."""

    batch: int
    heads: int
    q_len: int
    kv_len: int

    def inputs(self, like: torch.Tensor) -> dict[str, Interval]:
        """The index inputs' bounds (``score`` unbounded)."""
        def iv(n):
            return Interval(like, like + float(max(n, 1) - 1))

        return {"b": iv(self.batch), "h": iv(self.heads), "q_idx": iv(self.q_len), "kv_idx": iv(self.kv_len),
                "score": Interval(like - math.inf, like + math.inf)}


def _like() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


def _storage_bounds(g: Graph, value_ranges: dict | None = None):
    """Loads bounded by ``value_ranges`` (by buffer name), else by their storage type."""
    spec = {b.name: b for b in g.buffers}
    value_ranges = value_ranges or {}
    like = _like()

    def load(n: Node, xs) -> Interval:
        lo, hi = value_ranges.get(n.attr) or _STORAGE_RANGE.get(spec[n.attr].storage, (-math.inf, math.inf))
        return Interval(like + float(lo), like + float(hi))

    return load


def _depends_on_index(g: Graph) -> list[bool]:
    dep = [False] * len(g.nodes)
    for n in g.nodes:
        dep[n.id] = (n.op is Op.INPUT and n.attr in _INDEX_INPUTS) or any(
            not isinstance(a, Const) and dep[a] for a in n.args)
    return dep


def overflowing_nodes(g: Graph, scalars: dict, domain: Domain, value_ranges: dict | None = None) -> list[Node]:
    """The ``i32`` nodes computed from an index whose exact value may leave the int32 range
    (torch computes them in int64, so 32 bits would give another answer). ``value_ranges``
    bounds integer captures by name (else their storage type does)."""
    vals = propagate(g, domain.inputs(_like()), scalars, _storage_bounds(g, value_ranges), _like(), wrap_guard=False)
    dep = _depends_on_index(g)
    lo32, hi32 = _INT_RANGE[DType.I32]
    return [n for n in g.nodes if n.dtype is DType.I32 and dep[n.id] and n.op is not Op.INPUT
            and (float(vals[n.id].lo) < lo32 or float(vals[n.id].hi) > hi32)]


def needs_int64(g: Graph, scalars: dict, value_ranges: dict | None = None) -> bool:
    """Whether 32-bit integers could give another answer than torch for indices below
    :data:`INDEX_LIMIT` (and integer captures within ``value_ranges``): then the tracer traces the
    mod again with its indices as int64 (``Tracer(wide=True)``), which is torch's promotion exactly.

    >>> from flexcomp.trace import trace
    >>> from flexcomp.ir import ModKind
    >>> g = trace(lambda b, h, q_idx, kv_idx: (q_idx * 2**20) % 7 == kv_idx % 7, ModKind.MASK).graph
    >>> print(g)
    graph mask_mod(b: i32, h: i32, q_idx: i32, kv_idx: i32):
      %0 = cast q_idx : i64
      %1 = cast kv_idx : i64
      %2 = mul %0, 1048576 : i64
      %3 = mod %2, 7 : i64
      %4 = mod %1, 7 : i64
      %5 = eq %3, %4 : bool
      return %5
    """
    limit = Domain(INDEX_LIMIT, INDEX_LIMIT, INDEX_LIMIT, INDEX_LIMIT)
    return bool(overflowing_nodes(g, scalars, limit, value_ranges))


def check_runnable(tm, device, domain: Domain) -> None:
    """Before a traced mod runs on ``device`` over ``domain``: its captures hold values there
    (:func:`check_captures`), and its integer widths were proven for the sizes
    (:func:`check_index_limit`). What ``create_block_mask``, ``create_mask`` and ``flex_attention`` ask."""
    check_captures(tm, device)
    check_index_limit(tm, domain)


def check_index_limit(tm, domain: Domain) -> None:
    """Refuse a problem beyond :data:`INDEX_LIMIT` whose 32-bit arithmetic was not proven for it."""
    if max(domain.batch, domain.heads, domain.q_len, domain.kv_len) <= INDEX_LIMIT:
        return
    g = tm.graph
    scalars = {c.name: v for c, v in zip(g.scalars, tm.scalars)}
    ints = [(b, t) for b, t in zip(g.buffers, tm.buffers) if b.storage == "int32"]
    ranges = {b.name: r for (b, _), r in zip(ints, value_ranges([t for _, t in ints]))}
    bad = overflowing_nodes(g, scalars, domain, ranges)
    if bad:
        raise FlexcompError(
            f"{g.kind.value} {g.fn_name!r}: '{g.format_node(bad[0])}' may leave the int32 range for "
            f"{domain} (flexcomp proves 32-bit index arithmetic for sizes up to {INDEX_LIMIT}); cast the "
            f"index to int64 in the mod (q_idx.to(torch.int64)) to compute it in 64 bits")


def loads_in_range(tm, batch: int, heads: int, q_len: int, kv_len: int) -> bool:
    """Whether every load of the traced mod ``tm`` indexes inside its captured tensor (negative
    indices counted from the end, as torch) for every ``b < batch, h < heads, q_idx < q_len,
    kv_idx < kv_len``, given the captured tensors' current values. A sound proof: False means
    "not proven", and the caller checks at run time.

    >>> from flexcomp.trace import trace
    >>> from flexcomp.ir import ModKind
    >>> bias = torch.randn(8, 100)
    >>> tm = trace(lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx], ModKind.SCORE)
    >>> loads_in_range(tm, 1, 8, 100, 50), loads_in_range(tm, 1, 8, 101, 50)
    (True, False)
    """
    return _prove(tm, Domain(batch, heads, q_len, kv_len), divisors=False)


def proven_by_shapes(tm, domain: Domain) -> bool:
    """Whether every load of ``tm`` indexes only with the index inputs themselves or literals, each
    inside its captured tensor's dim for ``domain``, and no integer ``//`` / ``%`` has a divisor that
    could be 0: a proof from shapes alone, reading no value (no device round trip). The usual
    ``doc[q_idx] == doc[kv_idx]`` is proven this way; an index computed from values is not.

    >>> from flexcomp.trace import trace
    >>> from flexcomp.ir import ModKind
    >>> doc = torch.zeros(64, dtype=torch.int32)
    >>> tm = trace(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], ModKind.MASK)
    >>> proven_by_shapes(tm, Domain(1, 1, 64, 64)), proven_by_shapes(tm, Domain(1, 1, 64, 65))
    (True, False)
    """
    g = tm.graph
    extents = {"b": domain.batch, "h": domain.heads, "q_idx": domain.q_len, "kv_idx": domain.kv_len}
    shapes = {b.name: tuple(t.shape) for b, t in zip(g.buffers, tm.buffers)}
    for n in g.nodes:
        if n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int:
            divisor = n.args[1]
            if not isinstance(divisor, Const) or divisor.value == 0:
                return False
        if n.op is not Op.LOAD:
            continue
        for a, size in zip(n.args, shapes[n.attr]):
            if isinstance(a, Const):
                if not -size <= int(a.value) < size:
                    return False
                continue
            src = g.nodes[a]
            if not (src.op is Op.INPUT and src.attr in extents and extents[src.attr] <= size):
                return False
    return True


def mod_proven_safe(tm, batch: int, heads: int, q_len: int, kv_len: int) -> bool:
    """:func:`loads_in_range`, and every integer ``//`` / ``%`` has a divisor that cannot be 0 (torch
    raises for a zero divisor; a kernel would compute garbage). What the Triton launcher asks before
    running a mod unchecked.

    >>> from flexcomp.trace import trace
    >>> from flexcomp.ir import ModKind
    >>> tm = trace(lambda b, h, q_idx, kv_idx: q_idx // (kv_idx + 1) < 2, ModKind.MASK)
    >>> mod_proven_safe(tm, 1, 1, 64, 64), mod_proven_safe(trace(lambda b, h, q, kv: q // kv < 2, ModKind.MASK), 1, 1, 8, 8)
    (True, False)
    """
    domain = Domain(batch, heads, q_len, kv_len)
    return proven_by_shapes(tm, domain) or _prove(tm, domain, divisors=True)  # the shapes' proof reads nothing


def _feeding_indices(g: Graph, divisors: bool) -> set[int]:
    """Ids of the nodes whose values reach an index of a load (or, with ``divisors``, the divisor of
    an integer ``//`` / ``%``): the only values :func:`_prove` needs."""
    need = []
    for n in g.nodes:
        if n.op is Op.LOAD:
            need += [a for a in n.args if not isinstance(a, Const)]
        elif divisors and n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int and not isinstance(n.args[1], Const):
            need.append(n.args[1])
    seen: set[int] = set()
    while need:
        i = need.pop()
        if i in seen:
            continue
        seen.add(i)
        need += [a for a in g.nodes[i].args if not isinstance(a, Const)]
    return seen


def _prove(tm, domain: Domain, divisors: bool) -> bool:
    g = tm.graph
    buf_of = {b.name: t for b, t in zip(g.buffers, tm.buffers)}
    proven = [True]
    like = _like()
    valued = _feeding_indices(g, divisors)

    def load(n: Node, xs: list[Interval]) -> Interval:
        t = buf_of[n.attr].detach()
        if t.dtype == torch.bool:
            t = t.to(torch.int8)
        lows = [float(x.lo) for x in xs]
        highs = [float(x.hi) for x in xs]
        inside = all(lo >= -size and hi < size for lo, hi, size in zip(lows, highs, t.shape))
        proven[0] = proven[0] and inside
        if t.numel() == 0:
            return Interval(like, like)
        if n.id not in valued:  # its values reach no index or divisor: not read (a device read waits)
            return Interval(like - math.inf, like + math.inf)
        region = t
        if inside and all(lo >= 0 for lo in lows):  # exact: the box of indices reached
            region = t[tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(lows, highs))]
        return Interval(like + float(region.min()), like + float(region.max()))

    scalars = {c.name: v for c, v in zip(g.scalars, tm.scalars)}
    with torch.no_grad():
        vals = propagate(g, domain.inputs(like), scalars, load, like)
    if divisors and proven[0]:
        for n in g.nodes:
            if n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int:
                d = n.args[1]
                lo, hi = (d.value, d.value) if isinstance(d, Const) else (float(vals[d].lo), float(vals[d].hi))
                if lo <= 0 <= hi:
                    return False
    return proven[0]


def check_captures(tm: TracedMod, device) -> None:
    """Refuse captured tensors that hold no values (the meta device) where the mod must run on
    ``device``: the message names the mod, the tensor and the line that reads it."""
    if torch.device(device).type == "meta":
        return
    for spec, t in zip(tm.graph.buffers, tm.buffers):
        if t.device.type == "meta":
            raise FlexcompRuntimeError(
                f"{tm.graph.kind.value} {tm.graph.fn_name!r} at {spec.site or '?'}: the captured tensor {spec.name!r} "
                f"of shape {tuple(t.shape)} is on the meta device and holds no values, but the mod runs on {device}; "
                f"capture a tensor with data (on the CPU or the attention's device)")
