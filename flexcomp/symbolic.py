"""Symbolic passes with sympy: canonical integer arithmetic.

Why sympy, and where: index arithmetic in mods is written many ways (``q_idx - kv_idx + 31``,
``31 + q_idx - kv_idx``, ``-(kv_idx - q_idx) + 31``). Expanding each integer ``add/sub/mul/neg``
tree into a sympy polynomial and re-emitting it in sympy's canonical term order makes all of them
one graph: one structural key, one compiled kernel, one CSE'd value, and affine forms that the
block-sparsity analysis (:mod:`flexcomp.sparsity`) reads directly. Integer ring arithmetic is exact
in sympy and wraps identically modulo 2**32, so the rewrite never changes a result. Floats are left
alone: reassociating float arithmetic changes rounding. Results are cached per structural key, so
sympy runs once per distinct mod, not once per call.

Issue 4 (autograd) adds symbolic derivatives of score_mods here.
"""
from __future__ import annotations

import functools

import sympy

from .builder import GraphBuilder, rebuild
from .ir import Arg, Const, DType, Graph, Node, Op

_ARITH = (Op.ADD, Op.SUB, Op.MUL, Op.NEG)


def _sym(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"x{i:05d}", integer=True)


def to_sympy(g: Graph, a: Arg, memo: dict | None = None) -> sympy.Expr:
    """The integer polynomial a value is, over symbols ``x<id>`` for the non-arithmetic leaves."""
    memo = {} if memo is None else memo
    if isinstance(a, Const):
        return sympy.Integer(int(a.value))
    if a in memo:
        return memo[a]
    n = g.nodes[a]
    if n.op in _ARITH and n.dtype.is_int and all(g.dtype_of(x) is n.dtype for x in n.args):
        xs = [to_sympy(g, x, memo) for x in n.args]
        e = {Op.ADD: lambda: xs[0] + xs[1], Op.SUB: lambda: xs[0] - xs[1],
             Op.MUL: lambda: xs[0] * xs[1], Op.NEG: lambda: -xs[0]}[n.op]()
    else:
        e = _sym(a)
    memo[a] = e
    return e


def _emit_poly(gb: GraphBuilder, expr: sympy.Expr, leaves: dict[sympy.Symbol, Arg], dtype: DType) -> Arg:
    """Emit ``expr`` as ``t0 (+|-) t1 ... (+|-) c``: terms in sympy's order, the constant last."""
    expr = sympy.expand(expr)
    const_term = int(expr.as_coeff_Add()[0])
    terms = [t for t in sympy.Add.make_args(expr - const_term) if t != 0]

    def monomial(term) -> tuple[int, Arg]:
        coeff, rest = term.as_coeff_Mul()
        value: Arg | None = None
        for f in sympy.Mul.make_args(rest):
            base, exp = f.as_base_exp()
            for _ in range(int(exp)):
                leaf = leaves[base]
                value = leaf if value is None else gb.emit(Op.MUL, dtype, (value, leaf))
        c = int(coeff)
        if abs(c) != 1:
            value = gb.emit(Op.MUL, dtype, (value, Const(abs(c), dtype)))
        return (1 if c > 0 else -1), value

    out: Arg | None = None
    for sign, value in sorted((monomial(t) for t in terms), key=lambda sv: -sv[0]):
        if out is None:
            out = value if sign > 0 else gb.emit(Op.NEG, dtype, (value,))
        else:
            out = gb.emit(Op.ADD if sign > 0 else Op.SUB, dtype, (out, value))
    if out is None:
        return Const(const_term, dtype)
    if const_term:
        out = gb.emit(Op.ADD if const_term > 0 else Op.SUB, dtype, (out, Const(abs(const_term), dtype)))
    return out


def canonicalize_int_arith(g: Graph) -> Graph:
    """Rewrite every integer add/sub/mul/neg tree into its canonical polynomial form."""
    memo: dict = {}
    exprs = {n.id: to_sympy(g, n.id, memo) for n in g.nodes if n.op in _ARITH and n.dtype.is_int}
    if not exprs:
        return g

    def rewrite(gb: GraphBuilder, n: Node, args, new: dict[int, Arg]):
        if n.id not in exprs:
            return None
        expr = exprs[n.id]
        leaves = {s: new[int(s.name[1:])] for s in expr.free_symbols}
        return _emit_poly(gb, expr, leaves, n.dtype)

    return rebuild(g, rewrite)


@functools.lru_cache(maxsize=1024)
def simplify(g: Graph) -> Graph:
    """All simplification passes, in order (cached by the graph, so sympy runs once per mod).

    1. folding, identities and CSE (done by every :class:`GraphBuilder`);
    2. :func:`canonicalize_int_arith`.
    """
    return canonicalize_int_arith(g)
