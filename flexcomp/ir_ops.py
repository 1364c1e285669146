"""The IR's types and ops: one :class:`OpInfo` row per op, in :data:`OPS`.

Everything a stage needs to know about an op is in its row, and every stage reads it from there:
the verifier (:func:`flexcomp.ir.verify`: ``signature``), the builder (``fold``, ``commutative``,
promotion by ``family`` and ``signature``), evaluation (``torch_fn``), printing back to Python
(``python``), the tracer's operators (``dunders``), derivatives (``derivative``), interval bounds
(``interval``) and the backward kernels' tiles (``transcendental``). ``tests/test_ir_ops.py``
checks that the rows agree with their families and with each other.

Numeric rules (folding, intervals) live in :mod:`flexcomp.ir_rules`; the derivative rules, which
emit IR ops, live here.
"""
from __future__ import annotations

import abc
import enum
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from . import ir_rules as R


class DType(enum.Enum):
    """Value types of the IR."""

    BOOL = "bool"
    I32 = "i32"
    I64 = "i64"
    F32 = "f32"

    @property
    def is_float(self) -> bool:
        """``f32``, the working float."""
        return self is DType.F32

    @property
    def is_int(self) -> bool:
        """``i32`` or ``i64``."""
        return self in (DType.I32, DType.I64)

    @property
    def is_bool(self) -> bool:
        """``bool``."""
        return self is DType.BOOL

    @property
    def rank(self) -> int:
        """Promotion order: bool < i32 < i64 < f32."""
        return _RANK[self]


_RANK = {DType.BOOL: 0, DType.I32: 1, DType.I64: 2, DType.F32: 3}


def promote(*dtypes: DType) -> DType:
    """torch-like promotion between IR types (all operands are tensors of one category)."""
    return max(dtypes, key=lambda d: d.rank)


class Op(enum.Enum):
    """Node operations. The value is the name printed in the IR."""

    INPUT = "input"  # attr: name (score, b, h, q_idx, kv_idx)
    SCALAR = "scalar"  # attr: name of a captured Python number
    LOAD = "load"  # attr: buffer name; args: one index per buffer dim
    CAST = "cast"
    WHERE = "where"
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    TRUEDIV = "truediv"
    FLOORDIV = "floordiv"
    MOD = "mod"
    POW = "pow"
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    XOR = "xor"
    MINIMUM = "minimum"
    MAXIMUM = "maximum"
    SHL = "shl"  # integer << (torch: 0 for shift counts outside [0, bits))
    SHR = "shr"  # integer >> (arithmetic; torch: 0 or -1 for counts outside [0, bits))
    # unary
    NEG = "neg"
    ABS = "abs"
    NOT = "not"
    EXP = "exp"
    EXP2 = "exp2"
    LOG = "log"
    LOG2 = "log2"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    SIN = "sin"
    COS = "cos"
    TAN = "tan"
    ATAN = "atan"
    ERF = "erf"
    LOG1P = "log1p"
    EXPM1 = "expm1"
    SIGN = "sign"
    FLOOR = "floor"
    CEIL = "ceil"


class Family(enum.Enum):
    """Kinds of op. Leaves and loads (``structural``) are handled by each stage itself."""

    INPUT = "input"  # an argument of the mod
    SCALAR = "scalar"  # a captured Python number
    LOAD = "load"  # a read of a captured tensor
    CAST = "cast"
    WHERE = "where"
    ARITH = "arith"  # + - * / // % **: bools count as integers
    COMPARE = "compare"
    LOGIC = "logic"  # & | ^ on bools and integers
    SHIFT = "shift"  # << >> on integers
    MINMAX = "minmax"
    UNARY = "unary"  # type-keeping: - abs ~ sign floor ceil
    FLOAT_UNARY = "float_unary"  # float math: exp, tanh, ...

    @property
    def arity(self) -> int:
        """Operands an op of this family takes (a load: one per dim of its buffer, written -1)."""
        return _FAMILY_ARITY[self]

    @property
    def structural(self) -> bool:
        """Inputs, scalars and loads: no folding, no torch function, bounds given by the caller."""
        return self in (Family.INPUT, Family.SCALAR, Family.LOAD)


PER_DIM = -1  # the arity of a load: one index per dim of its buffer
_FAMILY_ARITY = {
    Family.INPUT: 0, Family.SCALAR: 0, Family.LOAD: PER_DIM, Family.CAST: 1, Family.WHERE: 3,
    Family.ARITH: 2, Family.COMPARE: 2, Family.LOGIC: 2, Family.SHIFT: 2, Family.MINMAX: 2,
    Family.UNARY: 1, Family.FLOAT_UNARY: 1,
}


class Signature(enum.Enum):
    """Operand and result types, as :func:`flexcomp.ir.verify` checks them. ``T`` is any type;
    the operands of the one-type signatures (SAME ... FLOAT) all have one type."""

    LEAF = "() -> T"  # inputs and scalars: the type their declaration gives
    INDEX = "int... -> buffer"  # loads: integer (or bool) indices, the buffer's type
    ANY_TO_ANY = "T -> U"  # casts
    SELECT = "bool, T, T -> T"  # where
    SAME = "T... -> T"
    SAME_TO_BOOL = "T, T -> bool"
    BITS = "B... -> B (B: bool or int)"
    INT = "I... -> I (I: i32 or i64)"
    FLOAT = "f32... -> f32"

    def accepts(self, t: DType) -> bool:
        """Whether operands of type ``t`` are allowed (one-type signatures)."""
        if self is Signature.BITS:
            return not t.is_float
        if self is Signature.INT:
            return t.is_int
        if self is Signature.FLOAT:
            return t.is_float
        return True

    def result(self, t: DType) -> DType:
        """The result type for operands of type ``t`` (one-type signatures)."""
        if self is Signature.SAME_TO_BOOL:
            return DType.BOOL
        if self is Signature.FLOAT:
            return DType.F32
        return t


# ---- derivative rules ----------------------------------------------------------------------------
class TangentBuilder(abc.ABC):
    """What a derivative rule builds with; :mod:`flexcomp.derivative` implements the four primitives
    on its graph builder. A zero tangent is None and is never emitted."""

    @abc.abstractmethod
    def emit(self, op: Op, dtype: DType, args: tuple) -> Any:
        """Add (or fold, or reuse) a node; returns its value."""

    @abc.abstractmethod
    def dtype_of(self, a: Any) -> DType:
        """The type of a value."""

    @abc.abstractmethod
    def const(self, value: float) -> Any:
        """An ``f32`` literal."""

    @abc.abstractmethod
    def literal(self, a: Any) -> R.Number | None:
        """The number a literal value holds; None for a node."""

    def mul(self, x, y):
        """``x * y`` in f32."""
        return self.emit(Op.MUL, DType.F32, (x, y))

    def add(self, x, y):
        """``x + y``, where None is zero."""
        if x is None:
            return y
        if y is None:
            return x
        return self.emit(Op.ADD, DType.F32, (x, y))

    def neg(self, x):
        """``-x``, where None is zero."""
        return None if x is None else self.emit(Op.NEG, DType.F32, (x,))

    def scale(self, x, factor):
        """``factor * x``, where None is zero."""
        return None if x is None else self.mul(factor, x)


# rule(d, args, out, tangents) -> tangent of the node: its new args, its new value ``out`` and the
# tangents of its args (None: zero). Called for float-valued nodes only.
DerivativeRule = Callable[[TangentBuilder, tuple, Any, Sequence[Any]], Any]
F32 = DType.F32


def d_zero(d, a, out, t):
    """Zero (None): leaves, loads (unless seeded), and piecewise-constant ops, as torch's autograd."""


def _d_cast(d, a, out, t):
    """A float-to-float cast passes the tangent on; from an int or bool it is zero."""
    return t[0] if d.dtype_of(a[0]).is_float else None


def _d_add(d, a, out, t):
    """``ta + tb``."""
    return d.add(t[0], t[1])


def _d_sub(d, a, out, t):
    """``ta - tb``."""
    return d.add(t[0], d.neg(t[1]))


def _d_neg(d, a, out, t):
    """``-ta``."""
    return d.neg(t[0])


def _d_mul(d, a, out, t):
    """``ta * b + tb * a``."""
    return d.add(d.scale(t[0], a[1]), d.scale(t[1], a[0]))


def _d_truediv(d, a, out, t):
    """``ta / b - out * tb / b``."""
    first = None if t[0] is None else d.emit(Op.TRUEDIV, F32, (t[0], a[1]))
    second = None
    if t[1] is not None:  # - a * tb / b^2 = - out * tb / b
        second = d.neg(d.emit(Op.TRUEDIV, F32, (d.mul(out, t[1]), a[1])))
    return d.add(first, second)


def _d_mod(d, a, out, t):
    """``a % b`` is ``a - b * floor(a / b)``: ``ta - tb * floor(a / b)``."""
    fl = d.emit(Op.FLOOR, F32, (d.emit(Op.TRUEDIV, F32, (a[0], a[1])),))
    return d.add(t[0], d.neg(d.scale(t[1], fl)))


def _d_pow(d, a, out, t):
    """``ta * e * x ** (e - 1) + te * out * log(x)`` (``0.5 / out`` for a square root)."""
    base, exp = a
    if t[0] is not None and d.literal(exp) == 0.5:  # sqrt: 0.5 / out, lowerable
        first = d.mul(d.emit(Op.TRUEDIV, F32, (d.const(0.5), out)), t[0])
    elif t[0] is not None:
        dbase = d.mul(exp, d.emit(Op.POW, F32, (base, d.emit(Op.SUB, F32, (exp, d.const(1.0))))))
        first = d.mul(dbase, t[0])
    else:
        first = None
    second = d.scale(t[1], d.mul(out, d.emit(Op.LOG, F32, (base,)))) if t[1] is not None else None
    return d.add(first, second)


def _d_extreme(pick: Op) -> DerivativeRule:
    """minimum (``pick`` LT) or maximum (GT): the tangent of the picked side; ties split it, as torch."""
    def rule(d, a, out, t):
        """``where(a pick b, ta, where(b pick a, tb, (ta + tb) / 2))``."""
        if t[0] is None and t[1] is None:
            return None
        ta, tb = (x if x is not None else d.const(0.0) for x in t)
        first = d.emit(pick, DType.BOOL, (a[0], a[1]))
        second = d.emit(pick, DType.BOOL, (a[1], a[0]))
        half = d.mul(d.const(0.5), d.add(ta, tb))
        return d.emit(Op.WHERE, F32, (first, ta, d.emit(Op.WHERE, F32, (second, tb, half))))

    return rule


def _d_where(d, a, out, t):
    """The tangent of the branch taken."""
    if t[1] is None and t[2] is None:
        return None
    zero = d.const(0.0)
    return d.emit(Op.WHERE, F32, (a[0], t[1] if t[1] is not None else zero, t[2] if t[2] is not None else zero))


def _d_abs(d, a, out, t):
    """``ta * sign(a)``."""
    return d.scale(t[0], d.emit(Op.SIGN, F32, (a[0],)))


def _chain(local: Callable[[TangentBuilder, Any, Any], Any]) -> DerivativeRule:
    """The rule of a float function of one operand: ``t * local(d, x, out)`` (its derivative at x)."""
    def rule(d, a, out, t):
        """``ta * f'(a)``."""
        return None if t[0] is None else d.mul(t[0], local(d, a[0], out))

    return rule


_LN2 = math.log(2.0)
_d_exp = _chain(lambda d, x, out: out)
_d_exp2 = _chain(lambda d, x, out: d.mul(out, d.const(_LN2)))
_d_log = _chain(lambda d, x, out: d.emit(Op.TRUEDIV, F32, (d.const(1.0), x)))
_d_log2 = _chain(lambda d, x, out: d.emit(Op.TRUEDIV, F32, (d.const(1.0), d.mul(x, d.const(_LN2)))))
_d_sqrt = _chain(lambda d, x, out: d.emit(Op.TRUEDIV, F32, (d.const(0.5), out)))
_d_rsqrt = _chain(lambda d, x, out: d.mul(d.const(-0.5), d.mul(out, d.mul(out, out))))
_d_tanh = _chain(lambda d, x, out: d.emit(Op.SUB, F32, (d.const(1.0), d.mul(out, out))))
_d_sigmoid = _chain(lambda d, x, out: d.mul(out, d.emit(Op.SUB, F32, (d.const(1.0), out))))
_d_sin = _chain(lambda d, x, out: d.emit(Op.COS, F32, (x,)))
_d_cos = _chain(lambda d, x, out: d.neg(d.emit(Op.SIN, F32, (x,))))
_d_tan = _chain(lambda d, x, out: d.emit(Op.ADD, F32, (d.const(1.0), d.mul(out, out))))
_d_atan = _chain(lambda d, x, out: d.emit(Op.TRUEDIV, F32, (d.const(1.0), d.emit(Op.ADD, F32, (d.const(1.0), d.mul(x, x))))))
_d_erf = _chain(lambda d, x, out: d.mul(d.const(2.0 / math.sqrt(math.pi)), d.emit(Op.EXP, F32, (d.neg(d.mul(x, x)),))))
_d_log1p = _chain(lambda d, x, out: d.emit(Op.TRUEDIV, F32, (d.const(1.0), d.emit(Op.ADD, F32, (d.const(1.0), x)))))
_d_expm1 = _chain(lambda d, x, out: d.emit(Op.ADD, F32, (out, d.const(1.0))))


# ---- the rows ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpInfo:
    """Everything about one op.

    Fields:
        op, family, arity (operands; a load's is :data:`PER_DIM`), signature (types, for verify).
        commutative: operands may be swapped (the builder orders them, for CSE).
        transcendental: a float function the backward kernels budget registers for.
        fold: the op on Python numbers (builder); raises ArithmeticError / ValueError to leave it
            to run time. None: never folded this way (casts and where have their own rules).
        torch_fn: the op on tensors (evaluate); None for structural ops and casts.
        python: template for :meth:`flexcomp.ir.Graph.to_python` (``{0}``: operands, ``{dtype}``).
        dunders / reflected_dunders: Python operators of a traced value that record the op, with
            the value as the first / the second operand.
        derivative: forward-mode tangent rule; None only for ops that never give a float.
        interval: bounds rule (:mod:`flexcomp.ir_rules`); None for structural ops.
    """

    op: Op
    family: Family
    arity: int
    signature: Signature
    commutative: bool = False
    transcendental: bool = False
    fold: Callable[..., R.Number] | None = None
    torch_fn: Callable[..., torch.Tensor] | None = None
    python: str | None = None
    dunders: tuple[str, ...] = ()
    reflected_dunders: tuple[str, ...] = ()
    derivative: DerivativeRule | None = None
    interval: R.IntervalRule | None = None


def _float_unary(op: Op, fold, torch_fn, derivative, interval, transcendental: bool = True) -> OpInfo:
    """A row of float math: f32 -> f32, printed and evaluated as ``torch.<name>``."""
    return OpInfo(op, Family.FLOAT_UNARY, 1, Signature.FLOAT, transcendental=transcendental, fold=fold,
                  torch_fn=torch_fn, python=f"torch.{torch_fn.__name__}({{0}})", derivative=derivative,
                  interval=interval)


def _compare(op: Op, fold, torch_fn, symbol: str, dunder: str, interval, commutative: bool = False) -> OpInfo:
    """A row of a comparison: two operands of one type, a bool."""
    return OpInfo(op, Family.COMPARE, 2, Signature.SAME_TO_BOOL, commutative=commutative, fold=fold,
                  torch_fn=torch_fn, python=f"({{0}} {symbol} {{1}})", dunders=(dunder,), interval=interval)


_ROWS = (
    OpInfo(Op.INPUT, Family.INPUT, 0, Signature.LEAF, derivative=d_zero),
    OpInfo(Op.SCALAR, Family.SCALAR, 0, Signature.LEAF, derivative=d_zero),
    OpInfo(Op.LOAD, Family.LOAD, PER_DIM, Signature.INDEX, derivative=d_zero),
    OpInfo(Op.CAST, Family.CAST, 1, Signature.ANY_TO_ANY, python="{0}.to({dtype})", derivative=_d_cast,
           interval=R.iv_cast),
    OpInfo(Op.WHERE, Family.WHERE, 3, Signature.SELECT, torch_fn=torch.where, python="torch.where({0}, {1}, {2})",
           derivative=_d_where, interval=R.iv_where),
    # arithmetic
    OpInfo(Op.ADD, Family.ARITH, 2, Signature.SAME, commutative=True, fold=operator.add, torch_fn=torch.add,
           python="({0} + {1})", dunders=("__add__",), reflected_dunders=("__radd__",), derivative=_d_add,
           interval=R.iv_add),
    OpInfo(Op.SUB, Family.ARITH, 2, Signature.SAME, fold=operator.sub, torch_fn=torch.sub, python="({0} - {1})",
           dunders=("__sub__",), reflected_dunders=("__rsub__",), derivative=_d_sub, interval=R.iv_sub),
    OpInfo(Op.MUL, Family.ARITH, 2, Signature.SAME, commutative=True, fold=operator.mul, torch_fn=torch.mul,
           python="({0} * {1})", dunders=("__mul__",), reflected_dunders=("__rmul__",), derivative=_d_mul,
           interval=R.iv_mul),
    OpInfo(Op.TRUEDIV, Family.ARITH, 2, Signature.FLOAT, fold=R.fold_truediv, torch_fn=torch.true_divide,
           python="({0} / {1})", dunders=("__truediv__",), reflected_dunders=("__rtruediv__",),
           derivative=_d_truediv, interval=R.unknown),
    OpInfo(Op.FLOORDIV, Family.ARITH, 2, Signature.SAME, fold=R.fold_floordiv, torch_fn=torch.floor_divide,
           python="({0} // {1})", dunders=("__floordiv__",), reflected_dunders=("__rfloordiv__",),
           derivative=d_zero, interval=R.iv_floordiv),
    OpInfo(Op.MOD, Family.ARITH, 2, Signature.SAME, fold=R.fold_mod, torch_fn=torch.remainder, python="({0} % {1})",
           dunders=("__mod__",), reflected_dunders=("__rmod__",), derivative=_d_mod, interval=R.iv_mod),
    OpInfo(Op.POW, Family.ARITH, 2, Signature.SAME, transcendental=True, fold=R.fold_pow, torch_fn=torch.pow,
           python="({0} ** {1})", dunders=("__pow__",), reflected_dunders=("__rpow__",), derivative=_d_pow,
           interval=R.unknown),
    # comparisons
    _compare(Op.EQ, operator.eq, torch.eq, "==", "__eq__", R.iv_eq, commutative=True),
    _compare(Op.NE, operator.ne, torch.ne, "!=", "__ne__", R.iv_ne, commutative=True),
    _compare(Op.LT, operator.lt, torch.lt, "<", "__lt__", R.iv_lt),
    _compare(Op.LE, operator.le, torch.le, "<=", "__le__", R.iv_le),
    _compare(Op.GT, operator.gt, torch.gt, ">", "__gt__", R.iv_gt),
    _compare(Op.GE, operator.ge, torch.ge, ">=", "__ge__", R.iv_ge),
    # bitwise / logical
    OpInfo(Op.AND, Family.LOGIC, 2, Signature.BITS, commutative=True, fold=operator.and_,
           torch_fn=torch.bitwise_and, python="({0} & {1})", dunders=("__and__",), reflected_dunders=("__rand__",),
           interval=R.iv_and),
    OpInfo(Op.OR, Family.LOGIC, 2, Signature.BITS, commutative=True, fold=operator.or_, torch_fn=torch.bitwise_or,
           python="({0} | {1})", dunders=("__or__",), reflected_dunders=("__ror__",), interval=R.iv_or),
    OpInfo(Op.XOR, Family.LOGIC, 2, Signature.BITS, commutative=True, fold=operator.xor,
           torch_fn=torch.bitwise_xor, python="({0} ^ {1})", dunders=("__xor__",), reflected_dunders=("__rxor__",),
           interval=R.unknown),
    OpInfo(Op.SHL, Family.SHIFT, 2, Signature.INT, fold=R.fold_shl, torch_fn=torch.bitwise_left_shift,
           python="({0} << {1})", dunders=("__lshift__",), reflected_dunders=("__rlshift__",), interval=R.iv_shl),
    OpInfo(Op.SHR, Family.SHIFT, 2, Signature.INT, fold=R.fold_shr, torch_fn=torch.bitwise_right_shift,
           python="({0} >> {1})", dunders=("__rshift__",), reflected_dunders=("__rrshift__",), interval=R.iv_shr),
    # min / max
    OpInfo(Op.MINIMUM, Family.MINMAX, 2, Signature.SAME, commutative=True, fold=R.fold_minimum,
           torch_fn=torch.minimum, python="torch.minimum({0}, {1})", derivative=_d_extreme(Op.LT),
           interval=R.iv_minimum),
    OpInfo(Op.MAXIMUM, Family.MINMAX, 2, Signature.SAME, commutative=True, fold=R.fold_maximum,
           torch_fn=torch.maximum, python="torch.maximum({0}, {1})", derivative=_d_extreme(Op.GT),
           interval=R.iv_maximum),
    # type-keeping unary
    OpInfo(Op.NEG, Family.UNARY, 1, Signature.SAME, fold=operator.neg, torch_fn=torch.neg, python="(-{0})",
           dunders=("__neg__",), derivative=_d_neg, interval=R.iv_neg),
    OpInfo(Op.ABS, Family.UNARY, 1, Signature.SAME, fold=abs, torch_fn=torch.abs, python="torch.abs({0})",
           dunders=("__abs__",), derivative=_d_abs, interval=R.iv_abs),
    OpInfo(Op.NOT, Family.UNARY, 1, Signature.BITS, fold=R.fold_not, torch_fn=torch.bitwise_not, python="(~{0})",
           dunders=("__invert__",), interval=R.iv_not),
    OpInfo(Op.SIGN, Family.UNARY, 1, Signature.SAME, fold=R.fold_sign, torch_fn=torch.sign, python="torch.sign({0})",
           derivative=d_zero, interval=R.increasing(torch.sign)),
    OpInfo(Op.FLOOR, Family.UNARY, 1, Signature.SAME, fold=R.fold_floor, torch_fn=torch.floor,
           python="torch.floor({0})", derivative=d_zero, interval=R.increasing(torch.floor)),
    OpInfo(Op.CEIL, Family.UNARY, 1, Signature.SAME, fold=R.fold_ceil, torch_fn=torch.ceil, python="torch.ceil({0})",
           derivative=d_zero, interval=R.increasing(torch.ceil)),
    # float math
    _float_unary(Op.EXP, math.exp, torch.exp, _d_exp, R.increasing(torch.exp)),
    _float_unary(Op.EXP2, R.fold_exp2, torch.exp2, _d_exp2, R.increasing(torch.exp2)),
    _float_unary(Op.LOG, math.log, torch.log, _d_log, R.increasing(torch.log)),
    _float_unary(Op.LOG2, math.log2, torch.log2, _d_log2, R.increasing(torch.log2)),
    _float_unary(Op.SQRT, math.sqrt, torch.sqrt, _d_sqrt, R.increasing(torch.sqrt)),
    _float_unary(Op.RSQRT, R.fold_rsqrt, torch.rsqrt, _d_rsqrt, R.iv_rsqrt),
    _float_unary(Op.TANH, math.tanh, torch.tanh, _d_tanh, R.increasing(torch.tanh)),
    _float_unary(Op.SIGMOID, R.fold_sigmoid, torch.sigmoid, _d_sigmoid, R.increasing(torch.sigmoid)),
    _float_unary(Op.SIN, math.sin, torch.sin, _d_sin, R.iv_unit_wave),
    _float_unary(Op.COS, math.cos, torch.cos, _d_cos, R.iv_unit_wave),
    _float_unary(Op.TAN, math.tan, torch.tan, _d_tan, R.unknown),
    _float_unary(Op.ATAN, math.atan, torch.atan, _d_atan, R.increasing(torch.atan)),
    _float_unary(Op.ERF, math.erf, torch.erf, _d_erf, R.increasing(torch.erf)),
    _float_unary(Op.LOG1P, math.log1p, torch.log1p, _d_log1p, R.increasing(torch.log1p)),
    _float_unary(Op.EXPM1, math.expm1, torch.expm1, _d_expm1, R.increasing(torch.expm1)),
)



def _index(rows: tuple[OpInfo, ...]) -> Mapping[Op, OpInfo]:
    """The rows by op, read-only; every op exactly once."""
    table: dict[Op, OpInfo] = {}
    for row in rows:
        if row.op in table:
            raise ValueError(f"two rows for {row.op}")
        table[row.op] = row
    missing = [op.value for op in Op if op not in table]
    if missing:
        raise ValueError(f"no row for {missing}")
    return MappingProxyType(table)


OPS: Mapping[Op, OpInfo] = _index(_ROWS)
