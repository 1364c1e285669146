"""The IR: typed SSA graphs of score_mod / mask_mod bodies.

A :class:`Graph` is what :mod:`flexcomp.trace` records from one call of a user's mod. Every later
stage reads it: :mod:`flexcomp.symbolic` simplifies it, :mod:`flexcomp.sparsity` classifies blocks
with it, :mod:`flexcomp.evaluate` runs it with torch ops, and ``flexcomp.codegen`` lowers it to
Triton.

Printout, one line per node (pinned in ``tests/test_ir.py``)::

    graph score_mod(score: f32, b: i32, h: i32, q_idx: i32, kv_idx: i32) buffers(slopes: f32[1]):
      %0 = load slopes[h] : f32
      %1 = sub kv_idx, q_idx : i32
      %2 = cast %1 : f32
      %3 = mul %0, %2 : f32
      %4 = add score, %3 : f32
      return %4

Types: ``bool``, ``i32``, ``i64`` and ``f32``. ``f32`` is the *working float*: the kernels compute
scores in float32; the reference backend evaluates it in float64 when the inputs are float64.
Float buffers of any storage dtype load as ``f32``.

The types and ops are defined in :mod:`flexcomp.ir_ops`, one row per op (re-exported here).

Semantics follow torch: ``floordiv`` rounds towards -inf and ``mod`` takes the sign of the divisor
(Python's ``//`` and ``%``); ``truediv`` of integers gives a float.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field

from .errors import FlexcompIRError
from .ir_ops import OPS, DType, Family, Op, OpInfo, Signature, promote

__all__ = ["OPS", "Arg", "BufferSpec", "Const", "DType", "Family", "Graph", "ModKind", "Node", "Op", "OpInfo",
           "ScalarSpec", "Signature", "promote", "verify"]


class ModKind(enum.Enum):
    """Which user function a graph came from; fixes the inputs and the output type."""

    SCORE = "score_mod"
    MASK = "mask_mod"

    @property
    def input_names(self) -> tuple[str, ...]:
        idx = ("b", "h", "q_idx", "kv_idx")
        return ("score",) + idx if self is ModKind.SCORE else idx


@dataclass(frozen=True, eq=False)
class Const:
    """A literal operand, printed inline (``31``, ``-inf``, ``True``).

    Two constants are equal when they print the same and have one type: ``0.0`` and ``-0.0``
    differ (``1 / x`` tells them apart), and ``nan`` equals ``nan``.
    """

    value: bool | int | float
    dtype: DType

    def _key(self) -> tuple:
        return (self.dtype, type(self.value), repr(self.value))

    def __eq__(self, other) -> bool:
        return isinstance(other, Const) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        if self.dtype is DType.F32:
            v = float(self.value)
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return repr(v)
        return repr(self.value)


Arg = int | Const  # an int names a node by its id


@dataclass(frozen=True)
class Node:
    """One SSA value. ``args`` are node ids (always smaller than ``id``) or :class:`Const`."""

    id: int
    op: Op
    dtype: DType
    args: tuple[Arg, ...] = ()
    attr: str | None = None


@dataclass(frozen=True)
class BufferSpec:
    """A captured tensor read by the mod: its name, element type as loaded, and number of dims.

    ``storage`` is the torch dtype name of the tensor (``"float32"``, ``"int64"``); it decides the
    load but not the IR type, which is the working type of its category. ``site`` says where the
    user's mod first reads it (``file:line``), so errors about the tensor can point there.
    """

    name: str
    dtype: DType
    ndim: int
    storage: str
    site: str = field(default="", compare=False)  # "file:line" of the user's first read, for errors


@dataclass(frozen=True)
class ScalarSpec:
    """A captured Python number, passed to kernels as an argument so its value is not baked in."""

    name: str
    dtype: DType


@dataclass(frozen=True)
class Graph:
    """A traced mod: nodes in topological order, the declared inputs, and the output.

    Fields:
        kind: score_mod or mask_mod; fixes the input names (``kind.input_names``).
        fn_name: the user's function name, for printouts and error messages.
        nodes: ``nodes[i].id == i``; INPUT and SCALAR nodes come first.
        buffers: captured tensors, in the order their values are passed.
        scalars: captured numbers, in the order their values are passed (also SCALAR nodes).
        output: the node id (or constant) returned: ``f32`` for a score_mod, ``bool`` for a mask_mod.
        extra_outputs: more ``f32`` values returned after ``output`` (derivatives, for the backward
            kernels: :func:`flexcomp.derivative.value_and_derivatives`); empty for a traced mod.
    """

    kind: ModKind
    fn_name: str
    nodes: tuple[Node, ...]
    buffers: tuple[BufferSpec, ...]
    scalars: tuple[ScalarSpec, ...]
    output: Arg
    extra_outputs: tuple[Arg, ...] = ()
    _names: dict = field(default=None, init=False, compare=False, repr=False, hash=False)
    _key: str = field(default=None, init=False, compare=False, repr=False, hash=False)
    _used_inputs: frozenset = field(default=None, init=False, compare=False, repr=False, hash=False)

    # ---- naming and printing -------------------------------------------------------------
    def value_names(self) -> dict[int, str]:
        """Printed name of every node: inputs by name, other nodes ``%0, %1, ...``."""
        if self._names is None:
            names, k = {}, 0
            for n in self.nodes:
                if n.op in (Op.INPUT, Op.SCALAR):
                    names[n.id] = n.attr
                else:
                    names[n.id] = f"%{k}"
                    k += 1
            object.__setattr__(self, "_names", names)
        return self._names

    def fmt(self, a: Arg) -> str:
        return str(a) if isinstance(a, Const) else self.value_names().get(a, f"%<bad ref {a}>")

    def format_node(self, n: Node) -> str:
        """One line: ``%3 = mul %1, %2 : f32``; loads print as ``load slopes[h]``."""
        name = self.value_names().get(n.id, f"%<bad id {n.id}>")
        if n.op is Op.LOAD:
            body = f"load {n.attr}[{', '.join(self.fmt(a) for a in n.args)}]"
        else:
            body = " ".join([n.op.value] + ([", ".join(self.fmt(a) for a in n.args)] if n.args else []))
        return f"{name} = {body} : {n.dtype.value}"

    def header(self) -> str:
        ins = ", ".join(f"{nm}: {'f32' if nm == 'score' else 'i32'}" for nm in self.kind.input_names)
        s = f"graph {self.kind.value}({ins})"
        if self.buffers:
            s += " buffers(" + ", ".join(f"{b.name}: {b.dtype.value}[{b.ndim}]" for b in self.buffers) + ")"
        if self.scalars:
            s += " scalars(" + ", ".join(f"{c.name}: {c.dtype.value}" for c in self.scalars) + ")"
        return s + ":"

    def __str__(self) -> str:
        lines = [self.header()]
        lines += ["  " + self.format_node(n) for n in self.nodes if n.op not in (Op.INPUT, Op.SCALAR)]
        lines.append(f"  return {', '.join(self.fmt(a) for a in self.outputs)}")
        return "\n".join(lines)

    @property
    def outputs(self) -> tuple[Arg, ...]:
        """``output`` followed by ``extra_outputs``."""
        return (self.output, *self.extra_outputs)

    # ---- identity ------------------------------------------------------------------------
    def structural_key(self) -> str:
        """A hash of the structure only: ops, types, literal constants, buffer types and ranks.

        Names of the function, buffers and scalars and the *values* of buffers and scalars do not
        enter it, so a kernel compiled for one key serves every such value.
        """
        if self._key is None:
            object.__setattr__(self, "_key", self._structural_key())
        return self._key

    def _structural_key(self) -> str:
        parts = [self.kind.value]
        parts += [f"B{b.dtype.value}/{b.ndim}/{b.storage}" for b in self.buffers]
        parts += [f"S{c.dtype.value}" for c in self.scalars]
        buf_pos = {b.name: i for i, b in enumerate(self.buffers)}
        scalar_pos = {c.name: i for i, c in enumerate(self.scalars)}
        for n in self.nodes:
            if n.op is Op.LOAD:
                attr = f"buf{buf_pos[n.attr]}"
            elif n.op is Op.SCALAR:
                attr = f"s{scalar_pos[n.attr]}"
            else:
                attr = n.attr or ""
            args = ",".join(f"{a.dtype.value}:{a.value!r}" if isinstance(a, Const) else str(a) for a in n.args)
            parts.append(f"{n.op.value}/{n.dtype.value}/{attr}/{args}")
        for out in self.outputs:
            parts.append(f"out {out.dtype.value}:{out.value!r}" if isinstance(out, Const) else f"out {out}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def dtype_of(self, a: Arg) -> DType:
        return a.dtype if isinstance(a, Const) else self.nodes[a].dtype

    def uses_input(self, name: str) -> bool:
        """Whether input ``name`` (``b``, ``h``, ``q_idx``, ...) is read by a node or returned."""
        if self._used_inputs is None:
            read = {a for n in self.nodes for a in n.args if not isinstance(a, Const)}
            read |= {o for o in self.outputs if not isinstance(o, Const)}
            used = frozenset(n.attr for n in self.nodes if n.op is Op.INPUT and n.id in read)
            object.__setattr__(self, "_used_inputs", used)  # the graph is immutable: worked out once
        return name in self._used_inputs

    # ---- back to Python ------------------------------------------------------------------
    def to_python(self) -> str:
        """Source of a runnable Python factory that rebuilds the mod from its buffers and scalars.

        ``make(*buffers, *scalars)`` returns a function with the mod's signature; tracing it gives a
        graph with the same :meth:`structural_key` (checked in tests).
        """
        params = [b.name for b in self.buffers] + [c.name for c in self.scalars]
        lines = ["import torch", "", "", f"def make({', '.join(params)}):"]
        lines.append(f"    def {self.fn_name}({', '.join(self.kind.input_names)}):")
        py = {}
        for n in self.nodes:
            if n.op in (Op.INPUT, Op.SCALAR):
                py[n.id] = n.attr
                continue
            var = f"v{len(py)}"
            args = [_py_arg(a, py) for a in n.args]
            if n.op is Op.LOAD:
                expr = f"{n.attr}[{', '.join(args)}]" if args else n.attr  # a 0-d tensor is used whole
            elif OPS[n.op].family is Family.MINMAX and any(isinstance(a, Const) for a in n.args):
                # torch.minimum takes tensors only; clamp takes a number
                x, c = (args[1], args[0]) if isinstance(n.args[0], Const) else (args[0], args[1])
                expr = f"torch.clamp({x}, {'max' if n.op is Op.MINIMUM else 'min'}={c})"
            else:
                expr = OPS[n.op].python.format(*args, dtype=_TORCH_DTYPE_NAMES[n.dtype])
            lines.append(f"        {var} = {expr}  # {self.format_node(n)}")
            py[n.id] = var
        lines.append(f"        return {', '.join(_py_arg(a, py) for a in self.outputs)}")
        lines.append(f"    return {self.fn_name}")
        return "\n".join(lines) + "\n"


_TORCH_DTYPE_NAMES = {DType.BOOL: "torch.bool", DType.I32: "torch.int32", DType.I64: "torch.int64",
                      DType.F32: "torch.float32"}


def _py_arg(a: Arg, py: dict[int, str]) -> str:
    if isinstance(a, Const):
        v = a.value
        if a.dtype is DType.F32 and (math.isinf(v) or math.isnan(v)):
            return f"float('{v}')"
        return repr(v)
    return py[a]


# ---- the verifier ------------------------------------------------------------------------
def verify(g: Graph) -> Graph:
    """Check the IR's invariants; raise :class:`FlexcompIRError` naming the broken one.

    - node ids equal positions, and every argument names an earlier node;
    - INPUT nodes are exactly the kind's inputs, SCALAR nodes match ``scalars``;
    - arity and operand types per op, by its :class:`~flexcomp.ir_ops.Signature`: binary operands
      share one type, comparisons give bool, logic ops take bool or int, shifts take ints, float
      math takes and gives ``f32``, WHERE takes a bool condition;
    - a LOAD names a declared buffer, with one integer index per dim, and has the buffer's type;
    - the output is ``f32`` for a score_mod and ``bool`` for a mask_mod.
    """
    def fail(msg: str):
        raise FlexcompIRError(f"IR verifier: {msg}\n{g}")

    buffers = {b.name: b for b in g.buffers}
    if len(buffers) != len(g.buffers):
        fail("duplicate buffer names")
    seen_inputs, seen_scalars = [], []
    for i, n in enumerate(g.nodes):
        if n.id != i:
            fail(f"node at position {i} has id {n.id}")
        for a in n.args:
            if not isinstance(a, Const) and not (0 <= a < i):
                fail(f"node {i} ({n.op.value}) uses %{a}, which is not an earlier node")
        ts = [g.dtype_of(a) for a in n.args]
        if n.op is Op.INPUT:
            seen_inputs.append(n.attr)
            want = DType.F32 if n.attr == "score" else DType.I32
            if n.dtype is not want:
                fail(f"input {n.attr} has type {n.dtype.value}, expected {want.value}")
        elif n.op is Op.SCALAR:
            seen_scalars.append(n.attr)
        elif n.op is Op.LOAD:
            b = buffers.get(n.attr)
            if b is None:
                fail(f"load of undeclared buffer {n.attr!r}")
            if len(n.args) != b.ndim:
                fail(f"load {n.attr} has {len(n.args)} indices, buffer has {b.ndim} dims")
            if not all(t.is_int or t is DType.BOOL for t in ts):
                fail(f"load {n.attr} has a non-integer index")
            if n.dtype is not b.dtype:
                fail(f"load {n.attr} has type {n.dtype.value}, buffer has {b.dtype.value}")
        else:
            err = _operand_error(n, ts)
            if err is not None:
                fail(err)
    if tuple(seen_inputs) != g.kind.input_names:
        fail(f"inputs {seen_inputs}, expected {list(g.kind.input_names)}")
    if tuple(seen_scalars) != tuple(c.name for c in g.scalars):
        fail(f"scalar nodes {seen_scalars} do not match declared scalars")
    for a in g.outputs:
        if not isinstance(a, Const) and not (0 <= a < len(g.nodes)):
            fail(f"output %{a} is not a node")
    out_t = g.dtype_of(g.output)
    want = DType.F32 if g.kind is ModKind.SCORE else DType.BOOL
    if out_t is not want:
        fail(f"output has type {out_t.value}, a {g.kind.value} must return {want.value}")
    if any(g.dtype_of(a) is not DType.F32 for a in g.extra_outputs):
        fail("extra outputs must be f32")
    return g


_REJECTED = {  # why a binary op's (one) operand type is not allowed, by signature
    Signature.FLOAT: "{op} operands must be f32",
    Signature.BITS: "{op} on floats",
    Signature.INT: "{op} needs integers, got {t}",
}


def _operand_error(n: Node, ts: list[DType]) -> str | None:
    """What is wrong with the operand and result types of a non-structural node, or None."""
    info: OpInfo = OPS[n.op]
    name, sig = n.op.value, info.signature
    if sig is Signature.SELECT:
        if len(ts) != 3 or ts[0] is not DType.BOOL or ts[1] is not ts[2] or n.dtype is not ts[1]:
            return f"{name} needs (bool, T, T) -> T, got {[t.value for t in ts]} -> {n.dtype.value}"
        return None
    if info.arity == 2:
        if len(ts) != 2 or ts[0] is not ts[1]:
            return f"{name} needs two operands of one type, got {[t.value for t in ts]}"
        if not sig.accepts(ts[0]):
            return _REJECTED[sig].format(op=name, t=ts[0].value)
        want = sig.result(ts[0])
        if n.dtype is not want:
            return f"{name} gives {n.dtype.value}, expected {want.value}"
        return None
    if info.arity != 1:
        return f"unknown op {n.op}"
    if len(ts) != 1:
        return f"{name} takes one operand"
    if sig is Signature.ANY_TO_ANY:
        return None
    if sig is Signature.FLOAT and (ts[0] is not DType.F32 or n.dtype is not DType.F32):
        return f"{name} needs f32 -> f32"
    if sig is not Signature.FLOAT and n.dtype is not ts[0]:
        return f"{name} changes type {ts[0].value} -> {n.dtype.value}"
    if not sig.accepts(ts[0]):
        return f"{name} on a float"
    return None
