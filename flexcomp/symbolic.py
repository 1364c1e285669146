"""Symbolic passes with sympy: canonical integer arithmetic.

Why sympy, and where: index arithmetic in mods is written many ways (``q_idx - kv_idx + 31``,
``31 + q_idx - kv_idx``, ``-(kv_idx - q_idx) + 31``). Expanding each integer ``add/sub/mul/neg``
tree into a sympy polynomial and re-emitting it in sympy's canonical term order makes all of them
one graph: one structural key, one compiled kernel, one CSE'd value, and affine forms that the
block-sparsity analysis (:mod:`flexcomp.sparsity`) reads directly. Integer ring arithmetic is exact
in sympy and wraps identically modulo 2**32, so the rewrite never changes a result. Floats are left
alone: reassociating float arithmetic changes rounding. Results are cached per graph (in
:data:`flexcomp.cache.CACHE` under ``("simplify", graph)``), so sympy runs once per distinct mod,
not once per call.

Issue 4 (autograd) adds symbolic derivatives of score_mods here.
"""
from __future__ import annotations

import sympy

from .builder import GraphBuilder, rebuild, wrap_int
from .cache import CACHE
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
    """Emit ``expr`` as ``t0 (+|-) t1 ... (+|-) c``: terms in sympy's canonical order, positive
    terms first, the constant last. Coefficients wrap to the type's width, as the hardware does."""
    expr = sympy.expand(expr)
    const_term = wrap_int(int(expr.as_coeff_Add()[0]), dtype)
    terms = []
    for t in (expr - expr.as_coeff_Add()[0]).as_ordered_terms() if expr.free_symbols else []:
        coeff, rest = t.as_coeff_Mul()
        c = wrap_int(int(coeff), dtype)
        if c:
            terms.append((c, rest))

    def monomial(c: int, rest) -> Arg:
        value: Arg | None = None
        for f in sympy.Mul.make_args(rest):
            base, exp = f.as_base_exp()
            for _ in range(int(exp)):
                leaf = leaves[base]
                value = leaf if value is None else gb.emit(Op.MUL, dtype, (value, leaf))
        if abs(c) != 1:
            value = gb.emit(Op.MUL, dtype, (value, Const(wrap_int(abs(c), dtype), dtype)))
        return value

    out: Arg | None = None
    for c, rest in sorted(terms, key=lambda cr: cr[0] < 0):  # stable: positive terms first
        value = monomial(c, rest)
        if out is None:
            out = value if c > 0 else gb.emit(Op.NEG, dtype, (value,))
        else:
            out = gb.emit(Op.ADD if c > 0 else Op.SUB, dtype, (out, value))
    if out is None:
        return Const(const_term, dtype)
    if const_term:
        out = gb.emit(Op.ADD if const_term > 0 else Op.SUB, dtype, (out, Const(wrap_int(abs(const_term), dtype), dtype)))
    return out


def canonicalize_int_arith(g: Graph) -> Graph:
    """Rewrite every integer add/sub/mul/neg tree into its canonical polynomial form.

    Only the *roots* of arithmetic trees (values read by something other than integer
    arithmetic of their type) are emitted, so the source's intermediate forms leave no trace
    and two spellings of one polynomial give one graph.
    """
    memo: dict = {}
    arith = {n.id for n in g.nodes if n.op in _ARITH and n.dtype.is_int}
    if not arith:
        return g
    roots = set(arith) & {a for a in g.outputs if not isinstance(a, Const)}
    for n in g.nodes:
        inner = n.id in arith and all(g.dtype_of(x) is n.dtype for x in n.args)
        for a in n.args:
            if not isinstance(a, Const) and a in arith and not (inner and g.nodes[a].dtype is n.dtype):
                roots.add(a)
    exprs = {i: to_sympy(g, i, memo) for i in roots}

    def rewrite(gb: GraphBuilder, n: Node, args, new: dict[int, Arg]):
        if n.id not in arith:
            return None
        if n.id not in roots:
            return Const(0, n.dtype)  # read only by arithmetic that is re-emitted from its root
        leaves = {s: new[int(s.name[1:])] for s in exprs[n.id].free_symbols}
        return _emit_poly(gb, exprs[n.id], leaves, n.dtype)

    return rebuild(g, rewrite)


def simplify(g: Graph) -> Graph:
    """All simplification passes, in order (cached by the graph in :data:`~flexcomp.cache.CACHE`
    under ``("simplify", g)``, so sympy runs once per mod).

    1. folding, identities and CSE (done by every :class:`GraphBuilder`);
    2. :func:`canonicalize_int_arith`.
    """
    return CACHE.get_or_make(("simplify", g), lambda: canonicalize_int_arith(g))
