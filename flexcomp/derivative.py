"""Derivatives of score_mods, derived from the IR (forward mode, one tangent per node).

``score_derivative(g)`` is a graph with the score_mod's own signature that returns
``d score_mod / d score`` at each (b, h, q_idx, kv_idx): the backward kernels multiply the
incoming ``dS`` by it. ``load_derivative(g, load)`` returns ``d score_mod / d (value read by that
load)``, from which gradients into captured tensors are scattered. Both are rebuilt through the
:class:`~flexcomp.builder.GraphBuilder`, so the forward values a derivative needs (``tanh`` for
soft-cap's ``1 - tanh^2``) are the same nodes, shared and CSE'd, and zero tangents are never emitted.
Each op's tangent rule is its row's ``derivative`` in :mod:`flexcomp.ir_ops`.

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

from .builder import GraphBuilder
from .errors import FlexcompError
from .ir import OPS, Arg, Const, DType, Graph, ModKind, Node, Op, verify
from .ir_ops import TangentBuilder

_ONE, _ZERO = Const(1.0, DType.F32), Const(0.0, DType.F32)


class _Tangents(TangentBuilder):
    """The four primitives the derivative rules of :mod:`flexcomp.ir_ops` build with, on a builder."""

    def __init__(self, gb: GraphBuilder):
        self.gb = gb

    def emit(self, op: Op, dtype: DType, args: tuple) -> Arg:
        """A node through the builder (folded, simplified, CSE'd)."""
        return self.gb.emit(op, dtype, args)

    def dtype_of(self, a: Arg) -> DType:
        """The type of a value."""
        return self.gb.dtype_of(a)

    def const(self, value: float) -> Const:
        """An ``f32`` literal."""
        return Const(float(value), DType.F32)

    def literal(self, a: Arg):
        """The number a literal holds; None for a node."""
        return a.value if isinstance(a, Const) else None


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
    d = _Tangents(gb)
    for seed in seeds:
        tan: dict[int, Arg | None] = {}  # old node id -> tangent (None: zero)
        for n in g.nodes:
            if n.id == seed:
                tan[n.id] = _ONE
            elif n.dtype.is_float:
                rule = OPS[n.op].derivative
                if rule is None:  # pragma: no cover - every op that can give a float has a rule (test_ir_ops)
                    raise FlexcompError(f"no derivative rule for {n.op.value}")
                args = tuple(x if isinstance(x, Const) else new[x] for x in n.args)
                targs = [None if isinstance(x, Const) else tan[x] for x in n.args]
                tan[n.id] = rule(d, args, new[n.id], targs)
            else:
                tan[n.id] = None
        t = None if isinstance(g.output, Const) else tan[g.output]
        result.append(t if t is not None else _ZERO)
    return gb, out, result


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
