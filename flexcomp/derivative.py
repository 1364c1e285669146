"""Derivatives of score_mods, derived from the IR (forward mode, one tangent per node).

``score_derivative(g)`` is a graph with the score_mod's own signature that returns
``d score_mod / d score`` at each (b, h, q_idx, kv_idx): the backward kernels multiply the
incoming ``dS`` by it. ``load_derivative(g, load)`` returns ``d score_mod / d (value read by that
load)``, from which gradients into captured tensors are scattered. Both are rebuilt through the
:class:`~flexcomp.builder.GraphBuilder`, so the forward values a derivative needs (``tanh`` for
soft-cap's ``1 - tanh^2``) are the same nodes, shared and CSE'd, and zero tangents are never emitted.

>>> from flexcomp.trace import trace
>>> from flexcomp.ir import ModKind
>>> from flexcomp.masks import softcap
>>> print(score_derivative(trace(softcap(30.0), ModKind.SCORE).graph))
graph score_mod(score: f32, b: i32, h: i32, q_idx: i32, kv_idx: i32) scalars(cap: f32):
  %0 = truediv score, cap : f32
  %1 = tanh %0 : f32
  %2 = truediv 1.0, cap : f32
  %3 = mul %1, %1 : f32
  %4 = sub 1.0, %3 : f32
  %5 = mul %2, %4 : f32
  %6 = mul cap, %5 : f32
  return %6
"""
from __future__ import annotations

import math
from typing import Optional

from .builder import GraphBuilder
from .errors import FlexcompError
from .ir import Arg, Const, DType, Graph, ModKind, Node, Op, verify

_ONE, _ZERO = Const(1.0, DType.F32), Const(0.0, DType.F32)


def _tangents(g: Graph, seeds: tuple[int, ...]) -> tuple[GraphBuilder, Arg, list[Arg]]:
    """Re-emit ``g`` and, for each seed node, the tangent of ``g.output`` when that node moves with
    unit speed. Returns the builder, the new output and one tangent per seed (zero: ``0.0``)."""
    if g.kind is not ModKind.SCORE:
        raise FlexcompError(f"derivatives are taken of score_mods, got a {g.kind.value}")
    gb = GraphBuilder(g.kind, g.fn_name)
    for b in g.buffers:
        gb.add_buffer(b.name, b.dtype, b.ndim, b.storage, b.site)
    new: dict[int, Arg] = {}  # old node id -> new value
    for n in g.nodes:
        if n.op is Op.INPUT:
            new[n.id] = gb.inputs[n.attr]
        elif n.op is Op.SCALAR:
            new[n.id] = gb.add_scalar(n.attr, n.dtype)
        else:
            new[n.id] = gb.emit(n.op, n.dtype, tuple(x if isinstance(x, Const) else new[x] for x in n.args), n.attr)
    out = g.output if isinstance(g.output, Const) else new[g.output]
    result = []
    for seed in seeds:
        tan: dict[int, Optional[Arg]] = {}  # old node id -> tangent (None: zero)
        for n in g.nodes:
            if n.id == seed:
                tan[n.id] = _ONE
            elif n.dtype.is_float and n.op not in (Op.INPUT, Op.SCALAR):
                args = tuple(x if isinstance(x, Const) else new[x] for x in n.args)
                targs = [None if isinstance(x, Const) else tan[x] for x in n.args]
                tan[n.id] = _rule(gb, n, args, new[n.id], targs)
            else:
                tan[n.id] = None
        t = None if isinstance(g.output, Const) else tan[g.output]
        result.append(t if t is not None else _ZERO)
    return gb, out, result


def _rule(gb: GraphBuilder, n: Node, a, out, t) -> Optional[Arg]:
    """Tangent of node ``n`` (new value ``out``, new args ``a``) from its args' tangents ``t``."""
    F = DType.F32

    def mul(x, y):
        return gb.emit(Op.MUL, F, (x, y))

    def add(x, y):
        if x is None:
            return y
        if y is None:
            return x
        return gb.emit(Op.ADD, F, (x, y))

    def neg(x):
        return None if x is None else gb.emit(Op.NEG, F, (x,))

    def scale(x, factor):
        return None if x is None else mul(factor, x)

    op = n.op
    if not n.dtype.is_float or op in (Op.INPUT, Op.SCALAR, Op.LOAD, Op.SIGN, Op.FLOOR, Op.CEIL, Op.FLOORDIV):
        return None
    if op is Op.CAST:
        return t[0] if gb.dtype_of(a[0]).is_float else None
    if op is Op.ADD:
        return add(t[0], t[1])
    if op is Op.SUB:
        return add(t[0], neg(t[1]))
    if op is Op.NEG:
        return neg(t[0])
    if op is Op.MUL:
        return add(scale(t[0], a[1]), scale(t[1], a[0]))
    if op is Op.TRUEDIV:
        first = None if t[0] is None else gb.emit(Op.TRUEDIV, F, (t[0], a[1]))
        second = None
        if t[1] is not None:  # - a * tb / b^2 = - out * tb / b
            second = neg(gb.emit(Op.TRUEDIV, F, (mul(out, t[1]), a[1])))
        return add(first, second)
    if op is Op.MOD:  # a - b * floor(a / b)
        fl = gb.emit(Op.FLOOR, F, (gb.emit(Op.TRUEDIV, F, (a[0], a[1])),))
        return add(t[0], neg(scale(t[1], fl)))
    if op is Op.POW:
        base, exp = a
        if t[0] is not None and isinstance(exp, Const) and exp.value == 0.5:  # sqrt: 0.5 / out, lowerable
            first = mul(gb.emit(Op.TRUEDIV, F, (Const(0.5, F), out)), t[0])
        elif t[0] is not None:
            dbase = mul(exp, gb.emit(Op.POW, F, (base, gb.emit(Op.SUB, F, (exp, _ONE)))))
            first = mul(dbase, t[0])
        else:
            first = None
        second = scale(t[1], mul(out, gb.emit(Op.LOG, F, (base,)))) if t[1] is not None else None
        return add(first, second)
    if op in (Op.MINIMUM, Op.MAXIMUM):
        if t[0] is None and t[1] is None:
            return None
        ta, tb = (x if x is not None else _ZERO for x in t)
        first = gb.emit(Op.LT if op is Op.MINIMUM else Op.GT, DType.BOOL, (a[0], a[1]))
        second = gb.emit(Op.LT if op is Op.MINIMUM else Op.GT, DType.BOOL, (a[1], a[0]))
        half = mul(Const(0.5, F), add(ta, tb))  # ties split the gradient, as torch does
        return gb.emit(Op.WHERE, F, (first, ta, gb.emit(Op.WHERE, F, (second, tb, half))))
    if op is Op.WHERE:
        if t[1] is None and t[2] is None:
            return None
        return gb.emit(Op.WHERE, F, (a[0], t[1] if t[1] is not None else _ZERO, t[2] if t[2] is not None else _ZERO))
    if op is Op.ABS:
        return scale(t[0], gb.emit(Op.SIGN, F, (a[0],)))
    if t[0] is None:
        return None
    x = a[0]
    local = {
        Op.EXP: lambda: out,
        Op.EXP2: lambda: mul(out, Const(math.log(2.0), F)),
        Op.LOG: lambda: gb.emit(Op.TRUEDIV, F, (_ONE, x)),
        Op.LOG2: lambda: gb.emit(Op.TRUEDIV, F, (_ONE, mul(x, Const(math.log(2.0), F)))),
        Op.SQRT: lambda: gb.emit(Op.TRUEDIV, F, (Const(0.5, F), out)),
        Op.RSQRT: lambda: mul(Const(-0.5, F), mul(out, mul(out, out))),
        Op.TANH: lambda: gb.emit(Op.SUB, F, (_ONE, mul(out, out))),
        Op.SIGMOID: lambda: mul(out, gb.emit(Op.SUB, F, (_ONE, out))),
        Op.SIN: lambda: gb.emit(Op.COS, F, (x,)),
        Op.TAN: lambda: gb.emit(Op.ADD, F, (_ONE, mul(out, out))),
        Op.ATAN: lambda: gb.emit(Op.TRUEDIV, F, (_ONE, gb.emit(Op.ADD, F, (_ONE, mul(x, x))))),
        Op.ERF: lambda: mul(Const(2.0 / math.sqrt(math.pi), F), gb.emit(Op.EXP, F, (neg(mul(x, x)),))),
        Op.LOG1P: lambda: gb.emit(Op.TRUEDIV, F, (_ONE, gb.emit(Op.ADD, F, (_ONE, x)))),
        Op.EXPM1: lambda: gb.emit(Op.ADD, F, (out, _ONE)),
        Op.COS: lambda: neg(gb.emit(Op.SIN, F, (x,))),
    }
    if op not in local:  # pragma: no cover - every float op of the IR has a rule above
        raise FlexcompError(f"no derivative rule for {op.value}")
    return mul(t[0], local[op]())


def _score_input(g: Graph) -> int:
    return next(n.id for n in g.nodes if n.op is Op.INPUT and n.attr == "score")


def score_derivative(g: Graph) -> Graph:
    """``d score_mod / d score`` as a graph with the score_mod's signature."""
    gb, _, (t,) = _tangents(g, (_score_input(g),))
    return verify(gb.finish(t))


def float_loads(g: Graph) -> list[Node]:
    """The loads of float captured tensors: the only places gradients flow into captures."""
    return [n for n in g.nodes if n.op is Op.LOAD and n.dtype.is_float]


def load_derivative(g: Graph, load: Node) -> Graph:
    """``d score_mod / d (the value read by load)`` as a graph with the score_mod's signature."""
    _check_load(g, load)
    gb, _, (t,) = _tangents(g, (load.id,))
    return verify(gb.finish(t))


def _check_load(g: Graph, load: Node) -> None:
    if load.op is not Op.LOAD or not load.dtype.is_float:
        raise FlexcompError(f"derivative wrt '{g.format_node(load)}': only float loads carry gradients")


def value_and_derivatives(g: Graph, loads: tuple[Node, ...] = ()) -> Graph:
    """One graph returning the score_mod's value, ``d/d score`` and ``d/d`` each of ``loads``.

    What the backward kernels call: the forward value gives the probabilities, the derivatives
    turn ``dP``-side gradients into ``dS`` and captured-tensor gradients, and every forward node
    they share is computed once (soft-cap's ``tanh`` serves the value and ``1 - tanh^2``).

    >>> from flexcomp.trace import trace
    >>> from flexcomp.masks import softcap
    >>> print(value_and_derivatives(trace(softcap(30.0), ModKind.SCORE).graph))
    graph score_mod(score: f32, b: i32, h: i32, q_idx: i32, kv_idx: i32) scalars(cap: f32):
      %0 = truediv score, cap : f32
      %1 = tanh %0 : f32
      %2 = mul cap, %1 : f32
      %3 = truediv 1.0, cap : f32
      %4 = mul %1, %1 : f32
      %5 = sub 1.0, %4 : f32
      %6 = mul %3, %5 : f32
      %7 = mul cap, %6 : f32
      return %2, %7
    """
    for load in loads:
        _check_load(g, load)
    gb, out, tangents = _tangents(g, (_score_input(g), *(n.id for n in loads)))
    return verify(gb.finish(out, tuple(tangents)))
