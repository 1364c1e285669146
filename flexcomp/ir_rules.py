"""Numeric rules of the IR's ops: constant folding on Python numbers and interval bounds on tensors.

:mod:`flexcomp.ir_ops` names these functions in its one row per op; this module knows nothing of
the op enum, so it sits below the registry (no import circle). Two kinds of rule:

- **fold** rules compute an op on Python numbers for :meth:`flexcomp.builder.GraphBuilder.emit`.
  They raise ``ArithmeticError`` or ``ValueError`` for what is left to run time (``x // 0``, a
  negative shift count), where torch gives its own answer; the builder wraps integer results.
- **interval** rules bound an op's value from bounds of its operands for
  :func:`flexcomp.sparsity.propagate`: ``rule(v: IntervalArgs) -> Interval``. Bounds are float64
  tensors of any broadcastable shape; a bool is ``[0, 1]`` with ``lo = 1`` "true everywhere" and
  ``hi = 0`` "false everywhere". A rule that cannot bound its node returns :func:`unknown`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the registry imports this module
    from .ir_ops import DType

Number = bool | int | float

_INT_MODULUS = 1 << 64  # integer results matter modulo this: the builder wraps them to 32 or 64 bits
# Shift counts (and constant shifts in bounds) below this are exact in float64 arithmetic.
_SHIFT_EXACT = 62


# ---- constant folding --------------------------------------------------------------------------
def fold_floordiv(a, b):
    """``a // b``, rounding towards -inf; division by zero is left to run time.

    Python's float ``//`` is torch's ``floor_divide`` (both take ``fmod``'s exact remainder), so
    ``-5.0 // inf`` is ``-1.0`` and ``inf // 2.0`` is nan; ``floor(a / b)`` would differ there.
    """
    if b == 0:
        raise ZeroDivisionError
    return a // b


def fold_mod(a, b):
    """``a % b`` as torch (sign of the divisor); modulo zero is left to run time."""
    if b == 0:
        raise ZeroDivisionError
    return a % b


def fold_truediv(a, b):
    """``a / b`` with IEEE division by zero, as torch: ``x / 0`` is +-inf, ``0 / 0`` is nan."""
    if b == 0:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def fold_pow(a, b):
    """``a ** b``; integers to negative powers and negative numbers to fractional ones are left to run time."""
    if isinstance(a, int) and isinstance(b, int) and b < 0:
        raise ValueError("integer to a negative power")
    if a < 0 and isinstance(b, float) and not b.is_integer():
        raise ValueError("a negative number to a fractional power")  # complex in Python, nan in torch
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return pow(a, b, _INT_MODULUS)  # what the builder's wrap keeps, also for huge exponents
    return a**b


def fold_sign(a):
    """-1, 0 or 1 in the type of ``a`` (0 for nan, as torch.sign)."""
    return type(a)((a > 0) - (a < 0))


def fold_shl(a, b):
    """``a << b``, wrapped to the type's width by the builder: 0 once ``b`` reaches the width."""
    if b < 0:
        raise ValueError("negative shift count")  # left for run time (torch gives 0)
    return a << min(b, 64)


def fold_shr(a, b):
    """Arithmetic ``a >> b``; a negative count is left to run time."""
    if b < 0:
        raise ValueError("negative shift count")
    return a >> min(b, 64)


def fold_not(a):
    """Logical not of a bool, bitwise not of an int."""
    return (not a) if isinstance(a, bool) else ~a


def fold_minimum(a, b):
    """The smaller of two numbers; nan if either is nan (torch.minimum propagates nan)."""
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return math.nan
    return min(a, b)


def fold_maximum(a, b):
    """The larger of two numbers; nan if either is nan (torch.maximum propagates nan)."""
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return math.nan
    return max(a, b)


def fold_floor(a):
    """Floor of a float (an int is its own floor)."""
    return float(math.floor(a)) if isinstance(a, float) else a


def fold_ceil(a):
    """Ceiling of a float (an int is its own ceiling)."""
    return float(math.ceil(a)) if isinstance(a, float) else a


def fold_exp2(a):
    """``2 ** a``."""
    return 2.0**a


def fold_rsqrt(a):
    """``1 / sqrt(a)``."""
    return 1.0 / math.sqrt(a)


def fold_sigmoid(a):
    """``1 / (1 + exp(-a))``."""
    return 1.0 / (1.0 + math.exp(-a))


# ---- intervals -----------------------------------------------------------------------------------
class Interval:
    """Lower and upper bounds (float64 tensors, broadcastable); a nan bound becomes infinite.

    ``exact=True`` skips the nan test for bounds that cannot be nan (comparisons' 0 / 1). The test
    never reads a value back: on a GPU, the analysis runs without waiting for the device."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, exact: bool = False):
        if not exact:
            lo = torch.nan_to_num(lo, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            hi = torch.nan_to_num(hi, nan=math.inf, posinf=math.inf, neginf=-math.inf)
        self.lo, self.hi = lo, hi


@dataclass(frozen=True)
class IntervalArgs:
    """What an interval rule sees of one node: its operands' bounds and literals, and the types.

    Fields: ``xs`` bounds per operand; ``consts`` each operand's literal value, None where the
    operand is a node; ``dtype`` the node's type; ``arg_dtypes`` its operands' types; ``like`` a
    float64 zero on the device the bounds live on.
    """

    xs: tuple[Interval, ...]
    consts: tuple[Number | None, ...]
    dtype: DType
    arg_dtypes: tuple[DType, ...]
    like: torch.Tensor


IntervalRule = Callable[[IntervalArgs], Interval]


def _f64(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float64 (bools as 0 / 1)."""
    return x.to(torch.float64)


def unknown(v: IntervalArgs) -> Interval:
    """No bound: ``[0, 1]`` for a bool, ``[-inf, inf]`` otherwise."""
    if v.dtype.is_bool:
        return Interval(torch.zeros_like(v.like), torch.ones_like(v.like))
    return Interval(torch.full_like(v.like, -math.inf), torch.full_like(v.like, math.inf))


def iv_add(v: IntervalArgs) -> Interval:
    """``a + b``."""
    a, b = v.xs
    return Interval(a.lo + b.lo, a.hi + b.hi)


def iv_sub(v: IntervalArgs) -> Interval:
    """``a - b``."""
    a, b = v.xs
    return Interval(a.lo - b.hi, a.hi - b.lo)


def iv_neg(v: IntervalArgs) -> Interval:
    """``-a``."""
    (a,) = v.xs
    return Interval(-a.hi, -a.lo)


def _product(a: Interval, b: Interval) -> Interval:
    """Bounds of ``a * b``: the extremes of the four corner products."""
    ps = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
    return Interval(torch.stack(torch.broadcast_tensors(*ps)).amin(0), torch.stack(torch.broadcast_tensors(*ps)).amax(0))


def iv_mul(v: IntervalArgs) -> Interval:
    """``a * b``: the extremes of the four corner products."""
    return _product(*v.xs)


def _exact_shift(v: IntervalArgs) -> int | None:
    """The shift count when it is a literal small enough for exact float64 bounds, else None."""
    c = v.consts[1]
    return c if c is not None and 0 <= c < _SHIFT_EXACT else None


def iv_shl(v: IntervalArgs) -> Interval:
    """``a << c`` for a literal count: ``a * 2**c``; unknown otherwise."""
    c = _exact_shift(v)
    if c is None:
        return unknown(v)
    return _product(v.xs[0], Interval(v.like + 2.0 ** c, v.like + 2.0 ** c))


def _floor_quotient(a: Interval, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``floor(a.lo / c)`` and ``floor(a.hi / c)``."""
    return torch.floor(a.lo / c), torch.floor(a.hi / c)


def _int_divisor(v: IntervalArgs) -> float | None:
    """The divisor of an integer ``//`` or ``%`` when it is a nonzero literal, else None."""
    c = v.consts[1]
    return float(c) if c is not None and c != 0 and v.dtype.is_int else None


def _monotone_quotient(a: Interval, c: float) -> Interval:
    """Bounds of ``floor(a / c)`` for a constant ``c`` (either sign)."""
    flo, fhi = _floor_quotient(a, c)
    return Interval(torch.minimum(flo, fhi), torch.maximum(flo, fhi))


def iv_floordiv(v: IntervalArgs) -> Interval:
    """Integer ``a // c`` for a literal ``c``; unknown otherwise."""
    c = _int_divisor(v)
    return unknown(v) if c is None else _monotone_quotient(v.xs[0], c)


def iv_shr(v: IntervalArgs) -> Interval:
    """``a >> c`` for a literal count: ``floor(a / 2**c)``; unknown otherwise."""
    c = _exact_shift(v)
    return unknown(v) if c is None else _monotone_quotient(v.xs[0], 2.0 ** c)


def iv_mod(v: IntervalArgs) -> Interval:
    """Integer ``a % c`` for a literal ``c``: exact when the block stays in one period; unknown otherwise."""
    c = _int_divisor(v)
    if c is None:
        return unknown(v)
    a = v.xs[0]
    flo, fhi = _floor_quotient(a, c)
    same = flo == fhi
    rlo, rhi = a.lo - flo * c, a.hi - fhi * c
    full_lo, full_hi = (0.0, c - 1) if c > 0 else (c + 1, 0.0)
    return Interval(torch.where(same, torch.minimum(rlo, rhi), full_lo),
                    torch.where(same, torch.maximum(rlo, rhi), full_hi))


def iv_minimum(v: IntervalArgs) -> Interval:
    """``minimum(a, b)`` (also a bool ``and``)."""
    a, b = v.xs
    return Interval(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))


def iv_maximum(v: IntervalArgs) -> Interval:
    """``maximum(a, b)`` (also a bool ``or``)."""
    a, b = v.xs
    return Interval(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))


def iv_abs(v: IntervalArgs) -> Interval:
    """``|a|``."""
    (a,) = v.xs
    return Interval(torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, 0.0)),
                    torch.maximum(a.hi.abs(), a.lo.abs()))


def _bool(lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    """A bool interval from "true everywhere" and "maybe true" masks."""
    return Interval(_f64(lo), _f64(hi), exact=True)


def iv_ge(v: IntervalArgs) -> Interval:
    """``a >= b``: true where ``a.lo >= b.hi``, false where ``a.hi < b.lo``."""
    a, b = v.xs
    return _bool(a.lo >= b.hi, a.hi >= b.lo)


def iv_gt(v: IntervalArgs) -> Interval:
    """``a > b``."""
    a, b = v.xs
    return _bool(a.lo > b.hi, a.hi > b.lo)


def iv_le(v: IntervalArgs) -> Interval:
    """``a <= b``."""
    a, b = v.xs
    return _bool(a.hi <= b.lo, a.lo <= b.hi)


def iv_lt(v: IntervalArgs) -> Interval:
    """``a < b``."""
    a, b = v.xs
    return _bool(a.hi < b.lo, a.lo < b.hi)


def _same_and_overlap(a: Interval, b: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``a`` and ``b`` are one and the same value, and where they may meet."""
    same = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
    overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
    return same, overlap


def iv_eq(v: IntervalArgs) -> Interval:
    """``a == b``: true where both are one and the same value, false where they cannot meet."""
    same, overlap = _same_and_overlap(*v.xs)
    return _bool(same, overlap)


def _ne(a: Interval, b: Interval) -> Interval:
    """Bounds of ``a != b``."""
    same, overlap = _same_and_overlap(a, b)
    return _bool(~overlap, ~same)


def iv_ne(v: IntervalArgs) -> Interval:
    """``a != b``."""
    return _ne(*v.xs)


def iv_and(v: IntervalArgs) -> Interval:
    """Bool ``and`` (the minimum); integer ``x & mask`` with a literal ``mask >= 0`` is in ``[0, mask]``."""
    c = v.consts[1]
    if v.dtype.is_int and c is not None and c >= 0:
        return Interval(v.like + 0.0, v.like + float(c))  # two's complement
    return iv_minimum(v) if v.dtype.is_bool else unknown(v)


def iv_or(v: IntervalArgs) -> Interval:
    """Bool ``or`` (the maximum); unknown on integers."""
    return iv_maximum(v) if v.dtype.is_bool else unknown(v)


def iv_not(v: IntervalArgs) -> Interval:
    """Bool ``not``; unknown on integers (bitwise)."""
    if not v.dtype.is_bool:
        return unknown(v)
    (a,) = v.xs
    return Interval(1 - a.hi, 1 - a.lo)


def iv_where(v: IntervalArgs) -> Interval:
    """``where(c, a, b)``: one branch where the condition is decided, the hull of both elsewhere."""
    c, a, b = v.xs
    lo = torch.where(c.lo == 1, a.lo, torch.where(c.hi == 0, b.lo, torch.minimum(a.lo, b.lo)))
    hi = torch.where(c.lo == 1, a.hi, torch.where(c.hi == 0, b.hi, torch.maximum(a.hi, b.hi)))
    return Interval(lo, hi)


def iv_cast(v: IntervalArgs) -> Interval:
    """A cast: to bool is ``!= 0``, float to int truncates, anything else keeps the bounds."""
    (a,) = v.xs
    (src,) = v.arg_dtypes
    if v.dtype.is_bool and not src.is_bool:
        return _ne(a, Interval(v.like, v.like))
    if v.dtype.is_int and src.is_float:
        return Interval(torch.trunc(a.lo), torch.trunc(a.hi))
    return a


def increasing(f: Callable[[torch.Tensor], torch.Tensor]) -> IntervalRule:
    """The rule of a non-decreasing function ``f``: ``[f(lo), f(hi)]``."""
    def rule(v: IntervalArgs) -> Interval:
        """``[f(lo), f(hi)]``."""
        (a,) = v.xs
        return Interval(f(a.lo), f(a.hi))

    rule.__doc__ = f"Non-decreasing {getattr(f, '__name__', 'function')}: [f(lo), f(hi)]."
    return rule


def iv_rsqrt(v: IntervalArgs) -> Interval:
    """``1 / sqrt(a)``, decreasing."""
    (a,) = v.xs
    return Interval(torch.rsqrt(a.hi), torch.rsqrt(a.lo))


def iv_unit_wave(v: IntervalArgs) -> Interval:
    """``sin`` and ``cos``: ``[-1, 1]``."""
    return Interval(v.like - 1, v.like + 1)
