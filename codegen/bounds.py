"""Lowering of the block analysis: a mask_mod's interval bounds as a generated Triton function.

The torch analysis (:func:`flexcomp.sparsity.block_intervals`) bounds the mask over every block with
the interval rules of :mod:`flexcomp.ir_rules`: a few torch ops per node of the graph, each paid on
the host (~20 µs per op on the H200's host: 50 ops for a sliding window). Here the very same code,
:func:`flexcomp.sparsity.propagate` and the rules, runs once on proxy values (:class:`Expr`) whose
arithmetic, comparisons and ``__torch_function__`` write each step as a Triton statement instead of
computing it. The result is a ``@triton.jit`` function::

    bounds(B, H, Q_LO, Q_HI, KV_LO, KV_HI, ZERO, SCALARS, ARGS, RUNS, ...) -> (lo, hi, unsafe)

over float64 vectors of blocks (the block's index ranges in, the mask's bounds and the blocks that
must be evaluated pair by pair out), which :func:`flexcomp.codegen.kernels.blockmask.classify_by_bounds`
calls for one chunk of blocks before it evaluates the undecided ones: one launch for the whole map.

Captured numbers are run-time values read from ``SCALARS`` (float64), so a new window size compiles
nothing; integer ones that a rule must see as literals (the divisor of ``//`` and ``%``, a shift
count, an ``&`` mask) are written into the source, and the function is kept per structure and those
values. Loads of captured tensors (:class:`_Loads`, from the mod's flat argument tuple ``ARGS``) are
bounded inside the function when each index is a point within a block (``doc_ids[b, ...]``,
``scale[h]``) or is ``q_idx`` / ``kv_idx`` itself (the block's run of the tensor, reduced to its
min and max once per run by the generated ``runs`` kernel, :class:`Run`: document masks). Graphs
with other loads (``bias[q_idx - kv_idx]``, ``table[q_idx, kv_idx]``, bounded by the torch
analysis' sparse tables) or with a step no rule renders have no such function
(:func:`bounds_function` returns None) and keep the torch analysis.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import textwrap
from dataclasses import dataclass
from typing import Optional

from flexcomp.cache import CACHE
from flexcomp.ir import Const, Graph, Op
from flexcomp.sparsity import BlockGrid, IndexKind, Interval, index_kinds, propagate, zero_divisors
from flexcomp.tiles import cdiv

from .modules import source_dir

LITERAL_OPS = (Op.FLOORDIV, Op.MOD, Op.SHL, Op.SHR, Op.AND)  # rules that read their second operand's value
TRITON_MATH = ("floor", "ceil", "exp", "log", "sqrt", "rsqrt", "tanh", "sin", "cos")


class Unrenderable(Exception):
    """A value or torch function the bounds function cannot write: the torch analysis runs instead."""


class _Writer:
    """The statements written so far, one temporary each."""

    def __init__(self):
        self.lines: list[str] = []

    def let(self, expr: str) -> "Expr":
        name = f"t{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        return Expr(name, self)


def _code(v) -> str:
    if isinstance(v, Expr):
        return v.code
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, (int, float)):
        f = float(v)
        return repr(f) if math.isfinite(f) else ("float('inf')" if f > 0 else "float('-inf')")
    raise Unrenderable(f"no Triton rendering of a {type(v).__name__} in the bounds")


class Expr:
    """A float64 (or bool) Triton value of the bounds function: each operation writes one statement."""

    def __init__(self, code: str, writer: _Writer):
        self.code, self.w = code, writer

    def _bin(self, other, op: str, reflected: bool = False) -> "Expr":
        a, b = (_code(other), self.code) if reflected else (self.code, _code(other))
        return self.w.let(f"({a} {op} {b})")

    def __add__(self, o): return self._bin(o, "+")
    def __radd__(self, o): return self._bin(o, "+", True)
    def __sub__(self, o): return self._bin(o, "-")
    def __rsub__(self, o): return self._bin(o, "-", True)
    def __mul__(self, o): return self._bin(o, "*")
    def __rmul__(self, o): return self._bin(o, "*", True)
    def __truediv__(self, o): return self._bin(o, "/")
    def __rtruediv__(self, o): return self._bin(o, "/", True)
    def __ge__(self, o): return self._bin(o, ">=")
    def __gt__(self, o): return self._bin(o, ">")
    def __le__(self, o): return self._bin(o, "<=")
    def __lt__(self, o): return self._bin(o, "<")
    def __eq__(self, o): return self._bin(o, "==")  # noqa: PLE0307 (a Triton comparison, not identity)
    def __ne__(self, o): return self._bin(o, "!=")
    def __and__(self, o): return self._bin(o, "&")
    def __or__(self, o): return self._bin(o, "|")
    def __invert__(self): return self.w.let(f"(~{self.code})")
    def __neg__(self): return self.w.let(f"(-{self.code})")
    __hash__ = object.__hash__

    def abs(self) -> "Expr":
        return self.w.let(f"tl.abs({self.code})")

    def to(self, dtype) -> "Expr":  # the rules convert bools to float64 bounds
        return self.w.let(f"({self.code}).to(tl.float64)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = next(a.w for a in _flat(args) if isinstance(a, Expr))
        name = getattr(func, "__name__", "")
        if name in ("minimum", "maximum"):
            return w.let(f"tl.{name}({_code(args[0])}, {_code(args[1])})")
        if name == "where":
            return w.let(f"tl.where({_code(args[0])}, {_code(args[1])}, {_code(args[2])})")
        if name == "nan_to_num":  # the rules' infinities stay infinite: only nan is replaced
            x = _code(args[0])
            return w.let(f"tl.where({x} != {x}, {_code(kwargs.get('nan', 0.0))}, {x})")
        if name in TRITON_MATH:
            return w.let(f"tl.math.{name}({_code(args[0])})")
        if name == "trunc":
            x = _code(args[0])
            return w.let(f"tl.where({x} >= 0, tl.math.floor({x}), tl.math.ceil({x}))")
        if name == "zeros_like":
            return w.let("ZERO")
        if name == "ones_like":
            return w.let("ZERO + 1.0")
        if name == "full_like":
            return w.let(f"ZERO + {_code(args[1])}")
        if name == "broadcast_tensors":
            return list(args)
        if name == "stack":
            return _Stack(list(args[0]), w)
        if name == "abs":
            return w.let(f"tl.abs({_code(args[0])})")
        raise Unrenderable(f"no Triton rendering of torch.{name} in the bounds")


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


class _Stack:
    """``torch.stack(xs)``, only to be reduced along its first dim (the product rule's corners)."""

    def __init__(self, xs: list, w: _Writer):
        self.xs, self.w = xs, w

    def _fold(self, fn: str) -> Expr:
        acc = self.xs[0]
        for x in self.xs[1:]:
            acc = self.w.let(f"tl.{fn}({_code(acc)}, {_code(x)})")
        return acc

    def amin(self, dim: int) -> Expr:
        return self._fold("minimum")

    def amax(self, dim: int) -> Expr:
        return self._fold("maximum")


# index_kinds needs block sizes only to tell ranged indices (a block of more than one) from points
_STRUCTURAL_GRID = BlockGrid(2, 2, 2, 2)


def _supported_load(kinds: tuple[IndexKind, ...]) -> bool:
    """A load the kernel bounds itself: every index a point (the same within a block), or one index
    that *is* ``q_idx`` or ``kv_idx`` (a run of the block's length) and the others points. Other
    ranged loads (``bias[q_idx - kv_idx]``) keep the torch analysis, whose sparse tables bound them."""
    ranged = [k for k in kinds if k.ranged]
    return not ranged or (len(ranged) == 1 and ranged[0].block > 0)


@dataclass(frozen=True)
class Run:
    """One aligned run table: buffer ``buffer``'s dim ``dim`` cut into runs of ``BLOCK_M`` (``along_q``)
    or ``BLOCK_N`` elements, each reduced to its float64 min and max for every value of the other
    dims (contiguous, ``[..., runs, ...]`` with ``(min, max)`` innermost), by the generated ``runs``
    kernel before the map is classified."""

    buffer: int
    dim: int
    along_q: bool

    def items(self, shape: tuple[int, ...], q_block: int, kv_block: int) -> int:
        """Runs in the table of a buffer of ``shape`` (a 0-dim buffer as ``(1,)``)."""
        shape = shape or (1,)
        width = q_block if self.along_q else kv_block
        return math.prod(shape[:self.dim]) * cdiv(shape[self.dim], width) * math.prod(shape[self.dim + 1:])


class _Loads:
    """Bounds of loads inside the generated function, from the mod's flat argument tuple ``ARGS``
    (:func:`flexcomp.codegen.lower.flat_args`: pointers, then every buffer's strides, then sizes).

    A point index reads one element (clamped into the dim, as torch's analysis does); an aligned
    index reads its block's run of the tensor (``BLOCK_M`` or ``BLOCK_N`` elements from the block's
    first index, within the dim) as the min and max the ``runs`` kernel wrote into ``RUNS`` (:class:`Run`;
    a nan among them leaves the bounds unknown): two loads per block instead of a block's run.
    Blocks where an index may leave its dim are collected in ``unsafe`` (evaluated pair by pair,
    where torch raises)."""

    def __init__(self, g: Graph, kinds: dict, w: _Writer):
        self.g, self.kinds, self.w = g, kinds, w
        self.unsafe: list[Expr] = []
        self.runs: dict[Run, tuple] = {}  # each table's offset in RUNS, runs along its dim, strides
        nb = max(1, len(g.buffers))
        self.dims = [max(1, b.ndim) for b in g.buffers]
        nd = sum(self.dims) if g.buffers else 1
        starts = [sum(self.dims[:i]) for i in range(len(self.dims))]
        self.index = {b.name: i for i, b in enumerate(g.buffers)}
        self.stride = lambda i, d: f"ARGS[{nb + starts[i] + d}]"  # noqa: E731
        self.size = lambda i, d: f"ARGS[{nb + nd + starts[i] + d}]"  # noqa: E731

    def bounds(self, n, xs: list[Interval]) -> Interval:
        w, i = self.w, self.index[n.attr]
        kinds = self.kinds[n.id]
        points, ranged = {}, None  # the point indices (int64, per block) by dim
        for d, (x, k) in enumerate(zip(xs, kinds)):
            size = self.size(i, d)
            if k.ranged:
                ranged = (d, x)
                self.unsafe.append(w.let(f"{x.hi.code} >= {size}"))
                continue
            self.unsafe.append(w.let(f"({x.hi.code} >= {size}) | ({x.lo.code} < 0) | "
                                     f"(tl.abs({x.lo.code}) == float('inf')) | ({x.lo.code} != {x.lo.code})"))
            points[d] = w.let(f"tl.minimum(tl.maximum(tl.where({x.lo.code} == {x.lo.code}, {x.lo.code}, 0.0), 0.0), "
                              f"({size} - 1).to(tl.float64)).to(tl.int64)")
        if ranged is None:  # points only (a 0-dim tensor: its one value)
            offset = " + ".join(f"{p.code} * {self.stride(i, d)}" for d, p in points.items()) or "0"
            v = w.let(f"tl.load(ARGS[{i}] + (ZERO * 0).to(tl.int64) + {offset}).to(tl.float64)")
            nan = w.let(f"{v.code} != {v.code}")
            return Interval(w.let(f"tl.where({nan.code}, float('-inf'), {v.code})"),
                            w.let(f"tl.where({nan.code}, float('inf'), {v.code})"), exact=True)
        d, x = ranged
        run = Run(i, d, self._along_q(n, d))
        offset, runs, strides = self._table(run)
        width = "BLOCK_M" if run.along_q else "BLOCK_N"
        # x.lo is the block's first index (the index *is* q_idx / kv_idx); blocks past the dim are unsafe
        points[d] = w.let(f"tl.minimum(({x.lo.code}).to(tl.int64) // {width}, {runs.code} - 1)")
        at = " + ".join(f"{points[j].code} * {strides[j].code}" for j in sorted(points))
        slot = w.let(f"{offset.code} + 2 * ({at})")
        return Interval(w.let(f"tl.load(RUNS + {slot.code})"), w.let(f"tl.load(RUNS + {slot.code} + 1)"), exact=True)

    def _table(self, run: Run) -> tuple:
        """``run``'s table: its offset in ``RUNS``, its runs along the dim and its strides (in
        ``(min, max)`` pairs), written once per function where first used."""
        if run not in self.runs:
            w = self.w
            zero = w.let("(ZERO * 0).to(tl.int64)")
            runs = w.let(self.run_count(run, zero.code))
            sizes = self.table_sizes(run, runs.code)
            strides = [w.let(f"{zero.code} + 1")]
            for j in range(len(sizes) - 1, 0, -1):
                strides.insert(0, w.let(f"{strides[0].code} * {sizes[j]}"))
            if self.runs:
                last_offset, _, _, last_items = list(self.runs.values())[-1]
                offset = w.let(f"{last_offset.code} + 2 * {last_items.code}")
            else:
                offset = zero
            items = w.let(f"{strides[0].code} * {sizes[0]}")
            self.runs[run] = (offset, runs, strides, items)
        return self.runs[run][:3]

    def run_count(self, run: Run, zero: str) -> str:
        """``run``'s number of runs along its dim, as an int64 expression (``zero``: an int64 zero)."""
        width = "BLOCK_M" if run.along_q else "BLOCK_N"
        return f"({zero} + {self.size(run.buffer, run.dim)} + {width} - 1) // {width}"

    def table_sizes(self, run: Run, runs: str) -> list[str]:
        """The sizes of ``run``'s table, dim by dim (the runs, named ``runs``, in place of its dim):
        the one layout the bounds function reads and the ``runs`` kernel writes."""
        return [runs if j == run.dim else self.size(run.buffer, j) for j in range(self.dims[run.buffer])]

    def _along_q(self, n, d: int) -> bool:
        return self.g.nodes[n.args[d]].attr == "q_idx"


def _runs_source(loads: _Loads) -> str:
    """The ``runs`` kernel: one program per run of every table (:class:`Run`), a grid of the largest
    table's runs; each reduces its run of the captured tensor to ``(min, max)`` (nan: unknown)."""
    lines = ["pid = tl.program_id(0).to(tl.int64)", "offset = pid * 0"]
    for k, run in enumerate(loads.runs):
        i, d, dims = run.buffer, run.dim, loads.dims[run.buffer]
        width, pad = ("BLOCK_M", "PAD_M") if run.along_q else ("BLOCK_N", "PAD_N")
        sizes = loads.table_sizes(run, f"runs{k}")
        lines += [f"runs{k} = {loads.run_count(run, 'pid * 0')}",
                  f"items{k} = {' * '.join(sizes)}", f"if pid < items{k}:", "    rest = pid"]
        for j in range(dims - 1, -1, -1):
            lines += [f"    i{j} = rest % {sizes[j]}", f"    rest = rest // {sizes[j]}"]
        base = " + ".join(f"i{j} * {loads.stride(i, j)}" for j in range(dims) if j != d) or "0"
        lines += [f"    at = i{d} * {width} + tl.arange(0, {pad})",
                  f"    ok = (tl.arange(0, {pad}) < {width}) & (at < {loads.size(i, d)})",
                  f"    v = tl.load(ARGS[{i}] + {base} + at * {loads.stride(i, d)}, mask=ok, other=0).to(tl.float64)",
                  "    nan = tl.max((ok & (v != v)).to(tl.int32), 0) > 0",
                  "    lo = tl.where(nan, float('-inf'), tl.min(tl.where(ok, v, float('inf')), 0))",
                  "    hi = tl.where(nan, float('inf'), tl.max(tl.where(ok, v, float('-inf')), 0))",
                  "    tl.store(RUNS + offset + 2 * pid, lo)",
                  "    tl.store(RUNS + offset + 2 * pid + 1, hi)",
                  f"offset = offset + 2 * items{k}"]
    return ("\n\n@triton.jit\ndef runs(ARGS, RUNS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_M: tl.constexpr,\n"
            "         PAD_N: tl.constexpr):\n" + textwrap.indent("\n".join(lines), "    ") + "\n")


@dataclass(frozen=True)
class BoundsFunction:
    """A graph's generated bounds function, the captured numbers it reads at run time, in order
    (positions in the graph's scalars), and the run tables it reads (:class:`Run`) with the kernel
    that writes them (None without)."""

    fn: object
    runtime_scalars: tuple[int, ...]
    runs: tuple[Run, ...] = ()
    runs_fn: Optional[object] = None

    def table(self, shapes: list[tuple[int, ...]], grid: BlockGrid) -> tuple[int, int]:
        """``(float64 elements of RUNS, programs of the runs kernel)`` for captured tensors of ``shapes``."""
        items = [r.items(tuple(shapes[r.buffer]), grid.q_block, grid.kv_block) for r in self.runs]
        return 2 * sum(items), max(items, default=0)


def literal_scalars(g: Graph) -> frozenset[str]:
    """Captured integers a rule reads as a value (``x // n``, ``x % n``, shifts, ``& mask``), through casts."""
    names = set()
    for n in g.nodes:
        if n.op in LITERAL_OPS and len(n.args) > 1 and not isinstance(n.args[1], Const):
            a = n.args[1]
            while g.nodes[a].op is Op.CAST and not isinstance(g.nodes[a].args[0], Const):
                a = g.nodes[a].args[0]
            if g.nodes[a].op is Op.SCALAR:
                names.add(g.nodes[a].attr)
    return frozenset(names)


def render(g: Graph, scalars: tuple) -> Optional[tuple[str, tuple[int, ...], tuple[Run, ...]]]:
    """The source of ``g``'s bounds function (captured values ``scalars``, literal ones written in)
    and, where it reads run tables, of their ``runs`` kernel; the positions of the run-time scalars;
    the tables. None if ``g`` loads a captured tensor other than at points and ``q_idx`` /
    ``kv_idx`` runs (:func:`_supported_load`), or a step has no rendering."""
    kinds = index_kinds(g, _STRUCTURAL_GRID)
    if not all(_supported_load(k) for k in kinds.values()):
        return None
    w = _Writer()
    loads = _Loads(g, kinds, w)
    literal = literal_scalars(g)
    runtime = tuple(i for i, c in enumerate(g.scalars) if c.name not in literal)
    pre = [f"s{i} = tl.load(SCALARS + {k}).to(tl.float64)" for k, i in enumerate(runtime)]
    values = {c.name: (v if c.name in literal else Expr(f"s{i}", w))
              for i, (c, v) in enumerate(zip(g.scalars, scalars))}
    inputs = {"b": Interval(Expr("B", w), Expr("B", w), exact=True),
              "h": Interval(Expr("H", w), Expr("H", w), exact=True),
              "q_idx": Interval(Expr("Q_LO", w), Expr("Q_HI", w), exact=True),
              "kv_idx": Interval(Expr("KV_LO", w), Expr("KV_HI", w), exact=True)}
    zero = Expr("ZERO", w)
    try:
        vals = propagate(g, inputs, values, loads.bounds, zero)
        unsafe = [*loads.unsafe, *zero_divisors(g, vals)]
        out = g.output
        if isinstance(out, Const):
            lo = hi = w.let(f"ZERO + {_code(float(out.value))}")
        else:
            lo, hi = vals[out].lo, vals[out].hi
        flag = w.let("ZERO != ZERO")
        for u in unsafe:
            flag = flag | u
    except Unrenderable:
        return None
    body = "\n".join(pre + w.lines + [f"return {lo.code}, {hi.code}, {flag.code}"])
    source = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
              "def bounds(B, H, Q_LO, Q_HI, KV_LO, KV_HI, ZERO, SCALARS, ARGS, RUNS, BLOCK_M: tl.constexpr,\n"
              "           BLOCK_N: tl.constexpr, PAD_M: tl.constexpr, PAD_N: tl.constexpr):\n"
              + textwrap.indent(body, "    ") + "\n" + (_runs_source(loads) if loads.runs else ""))
    return source, runtime, tuple(loads.runs)


def bounds_function(tm) -> Optional[BoundsFunction]:
    """The generated bounds function of the traced mask ``tm``, once per structure and literal values;
    None where the torch analysis must run (see :func:`render`)."""
    g = tm.graph
    literal = literal_scalars(g)
    lits = tuple(repr(v) for c, v in zip(g.scalars, tm.scalars) if c.name in literal)
    key = ("kernel", "bounds", g.structural_key(), lits)
    return CACHE.get_or_make(key, lambda: _load(g, tm.scalars, key))


def _load(g: Graph, scalars: tuple, key: tuple) -> Optional[BoundsFunction]:
    rendered = render(g, scalars)
    if rendered is None:
        return None
    source, runtime, runs = rendered
    name = f"bounds_{g.kind.value}_{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"
    path = os.path.join(source_dir(), name + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"flexcomp_generated.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return BoundsFunction(module.bounds, runtime, runs, getattr(module, "runs", None))
