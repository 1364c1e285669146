"""Lowering of the block analysis: a mask_mod's interval bounds as a generated Triton function.

The torch analysis (:func:`flexcomp.sparsity.block_intervals`) bounds the mask over every block with
the interval rules of :mod:`flexcomp.ir_rules`: a few torch ops per node of the graph, each paid on
the host (~20 µs per op on the H200's host: 50 ops for a sliding window). Here the very same code,
:func:`flexcomp.sparsity.propagate` and the rules, runs once on proxy values (:class:`Expr`) whose
arithmetic, comparisons and ``__torch_function__`` write each step as a Triton statement instead of
computing it. The result is a ``@triton.jit`` function::

    bounds(B, H, Q_LO, Q_HI, KV_LO, KV_HI, ZERO, SCALARS) -> (lo, hi, unsafe)

over float64 vectors of blocks (the block's index ranges in, the mask's bounds and the blocks that
must be evaluated pair by pair out), which :func:`flexcomp.codegen.kernels.blockmask.classify_by_bounds`
calls for one chunk of blocks before it evaluates the undecided ones: one launch for the whole map.

Captured numbers are run-time values read from ``SCALARS`` (float64), so a new window size compiles
nothing; integer ones that a rule must see as literals (the divisor of ``//`` and ``%``, a shift
count, an ``&`` mask) are written into the source, and the function is kept per structure and those
values. Graphs with loads of captured tensors, or with a step no rule renders, have no such function
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
from flexcomp.sparsity import Interval, propagate

from .modules import source_dir

LITERAL_OPS = (Op.FLOORDIV, Op.MOD, Op.SHL, Op.SHR, Op.AND)  # rules that read their second operand's value
TRITON_MATH = ("floor", "ceil", "exp", "log", "sqrt", "rsqrt", "tanh", "sin", "cos")


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
    raise NotImplementedError(f"no Triton rendering of a {type(v).__name__} in the bounds")


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
        raise NotImplementedError(f"no Triton rendering of torch.{name} in the bounds")


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


@dataclass(frozen=True)
class BoundsFunction:
    """A graph's generated bounds function and the captured numbers it reads at run time, in order
    (positions in the graph's scalars)."""

    fn: object
    runtime_scalars: tuple[int, ...]


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


def render(g: Graph, scalars: tuple) -> Optional[tuple[str, tuple[int, ...]]]:
    """The bounds function's source for ``g`` (captured values ``scalars``, literal ones written in)
    and the positions of the run-time scalars; None if ``g`` loads captured tensors or a rule has
    no rendering."""
    if any(n.op is Op.LOAD for n in g.nodes):
        return None
    w = _Writer()
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
        vals = propagate(g, inputs, values, None, zero)
        unsafe = []
        for n in g.nodes:  # an integer divisor that may be 0: evaluate there (torch raises)
            if n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int and not isinstance(n.args[1], Const):
                d = vals[n.args[1]]
                unsafe.append((d.lo <= 0) & (d.hi >= 0))
        out = g.output
        if isinstance(out, Const):
            lo = hi = w.let(f"ZERO + {_code(float(out.value))}")
        else:
            lo, hi = vals[out].lo, vals[out].hi
        flag = w.let("ZERO != ZERO")
        for u in unsafe:
            flag = flag | u
    except NotImplementedError:
        return None
    body = "\n".join(pre + w.lines + [f"return {lo.code}, {hi.code}, {flag.code}"])
    source = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
              "def bounds(B, H, Q_LO, Q_HI, KV_LO, KV_HI, ZERO, SCALARS):\n" + textwrap.indent(body, "    ") + "\n")
    return source, runtime


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
    source, runtime = rendered
    name = f"bounds_{g.kind.value}_{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"
    path = os.path.join(source_dir(), name + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"flexcomp_generated.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return BoundsFunction(module.bounds, runtime)
