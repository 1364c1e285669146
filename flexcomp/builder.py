"""Building IR graphs: type promotion, constant folding, algebraic identities and CSE.

Every node of every graph goes through :meth:`GraphBuilder.emit`, so each graph the tracer or a
pass produces is already folded and free of common subexpressions: ``q_idx - kv_idx`` written twice
is one node, ``True & m`` is ``m``, and ``2 * 3`` is ``6``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from .ir import (
    OPS,
    Arg,
    BufferSpec,
    Const,
    DType,
    Family,
    Graph,
    ModKind,
    Node,
    Op,
    ScalarSpec,
    Signature,
    promote,
)

Number = bool | int | float

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def const(value: Number) -> Const:
    """A Python number as an IR constant of the narrowest type of its category."""
    if isinstance(value, bool):
        return Const(value, DType.BOOL)
    if isinstance(value, int):
        return Const(value, DType.I32 if _I32_MIN <= value <= _I32_MAX else DType.I64)
    return Const(float(value), DType.F32)


def wrap_int(value: int, dtype: DType) -> int:
    """Two's-complement wrap-around of an integer to ``i32`` or ``i64``, as the hardware does."""
    bits = 32 if dtype is DType.I32 else 64
    return ((int(value) + (1 << (bits - 1))) % (1 << bits)) - (1 << (bits - 1))


def _coerce(value: Number, dtype: DType) -> Number:
    if dtype is DType.BOOL:
        return bool(value)
    if dtype.is_int:
        if isinstance(value, float):
            if math.isnan(value) or math.isinf(value):
                raise ValueError("cannot fold a non-finite float into an int")
            value = int(value)  # truncation, as torch's .to(int)
        return wrap_int(value, dtype)
    return float(value)


class GraphBuilder:
    """Accumulates nodes for one graph.

    >>> gb = GraphBuilder(ModKind.MASK, "causal")
    >>> out = gb.binary(Op.GE, gb.inputs["q_idx"], gb.inputs["kv_idx"])
    >>> print(gb.finish(out))
    graph mask_mod(b: i32, h: i32, q_idx: i32, kv_idx: i32):
      %0 = ge q_idx, kv_idx : bool
      return %0
    """

    def __init__(self, kind: ModKind, fn_name: str, bool_int: DType = DType.I32):
        self.kind = kind
        self.fn_name = fn_name
        # the integer type arithmetic on bools gives: i32 (narrowest) or i64 (torch's, in a graph whose
        # indices are int64 because 32 bits could wrap: flexcomp.ranges)
        self.bool_int = bool_int
        self.nodes: list[Node] = []
        self.memo: dict[tuple, int] = {}
        self.buffers: list[BufferSpec] = []
        self.scalars: list[ScalarSpec] = []
        self.inputs = {
            name: self._append(Op.INPUT, DType.F32 if name == "score" else DType.I32, (), name)
            for name in kind.input_names
        }

    # ---- declarations --------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        taken = {b.name for b in self.buffers} | {c.name for c in self.scalars} | set(self.kind.input_names)
        base, k = name, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def add_scalar(self, name: str, dtype: DType) -> int:
        spec = ScalarSpec(self._unique(name), dtype)
        self.scalars.append(spec)
        return self._append(Op.SCALAR, dtype, (), spec.name)

    def add_buffer(self, name: str, dtype: DType, ndim: int, storage: str, site: str = "") -> BufferSpec:
        spec = BufferSpec(self._unique(name), dtype, ndim, storage, site)
        self.buffers.append(spec)
        return spec

    # ---- the one way nodes are made ------------------------------------------------------
    def dtype_of(self, a: Arg) -> DType:
        return a.dtype if isinstance(a, Const) else self.nodes[a].dtype

    def _append(self, op: Op, dtype: DType, args: tuple, attr: str | None) -> int:
        node = Node(len(self.nodes), op, dtype, args, attr)
        self.nodes.append(node)
        return node.id

    def emit(self, op: Op, dtype: DType, args: tuple[Arg, ...], attr: str | None = None) -> Arg:
        """Add a node whose operand types are already right: fold, simplify, or reuse."""
        info = OPS[op]
        if info.commutative:
            args = tuple(sorted(args, key=lambda a: (1, str(a.value)) if isinstance(a, Const) else (0, a)))
        if info.fold is not None and all(isinstance(a, Const) for a in args):
            try:
                return Const(_coerce(info.fold(*(a.value for a in args)), dtype), dtype)
            except (ArithmeticError, ValueError):
                pass  # left for run time, where torch gives inf / nan / an error as usual
        if op is Op.CAST and all(isinstance(a, Const) for a in args):
            return Const(_coerce(args[0].value, dtype), dtype)
        simpler = self._identity(op, dtype, args)
        if simpler is not None:
            return simpler
        key = (op, dtype, args, attr)
        if key not in self.memo:
            self.memo[key] = self._append(op, dtype, args, attr)
        return self.memo[key]

    def _identity(self, op: Op, dtype: DType, args: tuple[Arg, ...]) -> Arg | None:
        def is_c(a, v):
            return isinstance(a, Const) and not isinstance(a.value, bool) and a.value == v

        if op is Op.CAST and self.dtype_of(args[0]) is dtype:
            return args[0]
        if op is Op.WHERE and isinstance(args[0], Const):
            return args[1] if args[0].value else args[2]
        if op is Op.WHERE and args[1] == args[2]:
            return args[1]
        if len(args) != 2:
            if op is Op.NOT and not isinstance(args[0], Const):
                inner = self.nodes[args[0]]
                if inner.op is Op.NOT:
                    return inner.args[0]
            return None
        a, b = args
        if dtype is DType.BOOL and op in (Op.AND, Op.OR):
            for x, y in ((a, b), (b, a)):
                if isinstance(x, Const):
                    if op is Op.AND:
                        return y if x.value else Const(False, DType.BOOL)
                    return Const(True, DType.BOOL) if x.value else y
            if a == b:
                return a
        unit = {Op.ADD: 0, Op.SUB: 0, Op.MUL: 1, Op.TRUEDIV: 1}.get(op)  # x op unit == x
        if unit is not None and is_c(b, unit):
            return a
        if unit is not None and OPS[op].commutative and is_c(a, unit):
            return b
        return None

    # ---- typed helpers: promotion as torch does it ---------------------------------------
    # Operands are node ids or Const; a Python number must come wrapped by const().
    def cast(self, a: Arg, dtype: DType) -> Arg:
        return self.emit(Op.CAST, dtype, (a,))

    def binary(self, op: Op, a: Arg, b: Arg) -> Arg:
        info = OPS[op]
        assert info.arity == 2, op
        sig = info.signature
        ta, tb = self.dtype_of(a), self.dtype_of(b)
        t = promote(ta, tb)
        if sig is Signature.FLOAT:
            t = DType.F32
        elif sig is Signature.BITS:
            if t.is_float:
                raise TypeError(f"bitwise '{op.value}' is not defined on floats")
        elif op is Op.POW and t.is_int and isinstance(b, Const) and b.value < 0:
            raise TypeError("integers to negative integer powers are not allowed (as torch); convert to float first")
        elif sig is Signature.INT:
            if t.is_float:
                raise TypeError(f"shift '{'<<' if op is Op.SHL else '>>'}' is not defined on floats")
            t = DType.I32 if t is DType.BOOL else t
        elif info.family is Family.ARITH and t is DType.BOOL:
            t = self.bool_int  # arithmetic on bools counts them as integers
        if t.is_int and self.bool_int is DType.I64 and sig is not Signature.SAME_TO_BOOL and DType.BOOL in (ta, tb) \
                and isinstance(a if tb is DType.BOOL else b, Const):
            t = DType.I64  # torch: a bool tensor with a Python int gives int64
        a, b = self.cast(a, t), self.cast(b, t)
        return self.emit(op, sig.result(t), (a, b))

    def unary(self, op: Op, a: Arg) -> Arg:
        info = OPS[op]
        t = self.dtype_of(a)
        if info.signature is Signature.FLOAT:
            return self.emit(op, DType.F32, (self.cast(a, DType.F32),))
        if info.signature is Signature.BITS:  # ~
            if t.is_float:
                raise TypeError("'~' is not defined on floats")
            return self.emit(op, t, (a,))
        if op in (Op.FLOOR, Op.CEIL) and not t.is_float:
            return a
        if op is Op.NEG and t is DType.BOOL:
            raise TypeError("negation '-' is not defined on bools; use '~' for logical not")
        return self.emit(op, t, (a,))

    def where(self, c: Arg, a: Arg, b: Arg) -> Arg:
        c = self.cast(c, DType.BOOL) if self.dtype_of(c) is not DType.BOOL else c
        t = promote(self.dtype_of(a), self.dtype_of(b))
        return self.emit(Op.WHERE, t, (c, self.cast(a, t), self.cast(b, t)))

    def load(self, buf: BufferSpec, indices: list[Arg]) -> Arg:
        idx = []
        for i in indices:
            t = self.dtype_of(i)
            if t.is_float:
                raise TypeError("tensors can only be indexed by integers")
            idx.append(self.cast(i, DType.I32) if t is DType.BOOL else i)
        return self.emit(Op.LOAD, buf.dtype, tuple(idx), buf.name)

    # ---- the end -------------------------------------------------------------------------
    def finish(self, output: Arg, extra_outputs: tuple[Arg, ...] = ()) -> Graph:
        """Drop dead nodes (and buffers and scalars nothing reads), renumber, return the :class:`Graph`."""
        live = set()
        stack = [a for a in (output, *extra_outputs) if not isinstance(a, Const)]
        while stack:
            i = stack.pop()
            if i in live:
                continue
            live.add(i)
            stack += [a for a in self.nodes[i].args if not isinstance(a, Const)]
        remap: dict[int, int] = {}
        nodes: list[Node] = []
        for n in self.nodes:
            if n.op is Op.INPUT or n.id in live:
                remap[n.id] = len(nodes)
                args = tuple(a if isinstance(a, Const) else remap[a] for a in n.args)
                nodes.append(Node(len(nodes), n.op, n.dtype, args, n.attr))
        out = output if isinstance(output, Const) else remap[output]
        extras = tuple(a if isinstance(a, Const) else remap[a] for a in extra_outputs)
        loaded = {n.attr for n in nodes if n.op is Op.LOAD}
        used_scalars = {n.attr for n in nodes if n.op is Op.SCALAR}
        buffers = tuple(b for b in self.buffers if b.name in loaded)
        scalars = tuple(c for c in self.scalars if c.name in used_scalars)
        return Graph(self.kind, self.fn_name, tuple(nodes), buffers, scalars, out, extras)


Rewrite = Callable[[GraphBuilder, Node, tuple[Arg, ...], dict[int, Arg]], Arg | None]


def rebuild(g: Graph, rewrite: Rewrite | None = None) -> Graph:
    """Re-emit every node of ``g`` through a fresh builder (folding and CSE again).

    ``rewrite(builder, node, new_args, new)`` may return a replacement value for a node, or None
    to keep it; ``new`` maps every earlier old node id to its new value. Passes in
    :mod:`flexcomp.symbolic` are written this way.
    """
    gb = GraphBuilder(g.kind, g.fn_name)
    for b in g.buffers:
        gb.add_buffer(b.name, b.dtype, b.ndim, b.storage, b.site)
    new: dict[int, Arg] = {}
    for n in g.nodes:
        if n.op is Op.INPUT:
            new[n.id] = gb.inputs[n.attr]
            continue
        if n.op is Op.SCALAR:
            new[n.id] = gb.add_scalar(n.attr, n.dtype)
            continue
        args = tuple(a if isinstance(a, Const) else new[a] for a in n.args)
        out = rewrite(gb, n, args, new) if rewrite is not None else None
        new[n.id] = out if out is not None else gb.emit(n.op, n.dtype, args, n.attr)
    outs = [a if isinstance(a, Const) else new[a] for a in g.outputs]
    return gb.finish(outs[0], tuple(outs[1:]))
