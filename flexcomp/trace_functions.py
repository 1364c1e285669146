"""What torch functions, tensor methods and numpy ufuncs mean on traced values.

One table row per name: a row says which IR op (or small composition of ops) a function records.
:func:`dispatch` serves ``__torch_function__`` of every traced value (scalars and vectors alike),
:func:`method` serves attribute lookup (``x.exp()``, ``x.device``), :func:`array_ufunc` serves
numpy's ufunc protocol. Element by element application and broadcasting over traced vectors is
:func:`flexcomp.trace_vectors.elementwise`; a name in no table raises a trace error at the user's
line that lists what is supported.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .builder import const
from .ir import OPS, Const, DType, Family, Op
from .proxy import HOOKS, Proxy, ir_dtype_of_torch
from .trace_vectors import (
    Reduction,
    VectorLike,
    View,
    elementwise,
    is_vector,
    permute,
    reduce,
    stack,
)

F32 = DType.F32

UNARY: dict[str, Op] = {
    "exp": Op.EXP, "exp2": Op.EXP2, "log": Op.LOG, "log2": Op.LOG2, "sqrt": Op.SQRT, "rsqrt": Op.RSQRT,
    "tanh": Op.TANH, "sigmoid": Op.SIGMOID, "sin": Op.SIN, "cos": Op.COS, "tan": Op.TAN, "atan": Op.ATAN,
    "arctan": Op.ATAN, "erf": Op.ERF, "log1p": Op.LOG1P, "expm1": Op.EXPM1, "abs": Op.ABS, "absolute": Op.ABS,
    "sign": Op.SIGN, "sgn": Op.SIGN, "floor": Op.FLOOR, "ceil": Op.CEIL, "neg": Op.NEG, "negative": Op.NEG,
    "bitwise_not": Op.NOT,
    **{name: info.op for info in OPS.values() if info.arity == 1 for name in info.dunders},  # __neg__, __invert__...
}
BINARY: dict[str, Op] = {
    "add": Op.ADD, "sub": Op.SUB, "subtract": Op.SUB, "mul": Op.MUL, "multiply": Op.MUL,
    "div": Op.TRUEDIV, "divide": Op.TRUEDIV, "true_divide": Op.TRUEDIV, "floor_divide": Op.FLOORDIV,
    "remainder": Op.MOD, "pow": Op.POW, "float_power": Op.POW, "eq": Op.EQ, "ne": Op.NE, "lt": Op.LT,
    "le": Op.LE, "gt": Op.GT, "ge": Op.GE, "less": Op.LT, "greater": Op.GT, "less_equal": Op.LE,
    "greater_equal": Op.GE, "not_equal": Op.NE, "minimum": Op.MINIMUM, "maximum": Op.MAXIMUM,
    "fmin": Op.MINIMUM, "fmax": Op.MAXIMUM, "bitwise_and": Op.AND, "bitwise_or": Op.OR,
    "bitwise_xor": Op.XOR, "logical_and": Op.AND, "logical_or": Op.OR, "logical_xor": Op.XOR,
    "bitwise_left_shift": Op.SHL, "bitwise_right_shift": Op.SHR,
    **{name: info.op for info in OPS.values() if info.arity == 2 for name in info.dunders},  # __add__, __lt__...
    "__div__": Op.TRUEDIV,  # Python 2's name, which torch still dispatches
}
REFLECTED: dict[str, Op] = {
    **{name: info.op for info in OPS.values() for name in info.reflected_dunders},  # __radd__...
    "__rdiv__": Op.TRUEDIV,
}
REDUCTIONS: dict[str, Reduction] = {
    "sum": Reduction.SUM, "mean": Reduction.MEAN, "prod": Reduction.PROD, "amax": Reduction.AMAX,
    "amin": Reduction.AMIN, "any": Reduction.ANY, "all": Reduction.ALL, "nansum": Reduction.SUM,
}
CASTS: dict[str, torch.dtype] = {
    "float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
    "int": torch.int32, "long": torch.int64, "short": torch.int16, "char": torch.int8, "byte": torch.uint8,
    "bool": torch.bool,
}
# numpy ufuncs by torch's name for the same function
NUMPY_NAMES: dict[str, str] = {
    "add": "add", "subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div",
    "floor_divide": "floor_divide", "remainder": "remainder", "mod": "remainder", "power": "pow",
    "float_power": "pow", "negative": "neg", "positive": "positive", "absolute": "abs", "fabs": "abs", "exp": "exp",
    "exp2": "exp2", "log": "log", "log2": "log2", "log10": "log10", "log1p": "log1p", "expm1": "expm1",
    "sqrt": "sqrt", "square": "square", "reciprocal": "reciprocal", "tanh": "tanh", "sin": "sin", "cos": "cos",
    "tan": "tan", "arctan": "atan", "sign": "sign", "floor": "floor", "ceil": "ceil", "trunc": "trunc",
    "minimum": "minimum", "maximum": "maximum", "fmin": "minimum", "fmax": "maximum", "equal": "eq",
    "not_equal": "ne", "less": "lt", "less_equal": "le", "greater": "gt", "greater_equal": "ge",
    "logical_and": "logical_and", "logical_or": "logical_or", "logical_xor": "logical_xor",
    "logical_not": "logical_not", "bitwise_and": "bitwise_and", "bitwise_or": "bitwise_or",
    "bitwise_xor": "bitwise_xor", "invert": "bitwise_not", "bitwise_not": "bitwise_not",
    "left_shift": "bitwise_left_shift", "right_shift": "bitwise_right_shift",
}
_SUPPORTED = ("+ - * / // % ** @ << >> & | ^ ~, comparisons, abs, torch.where, clamp, minimum/maximum, "
              "exp/exp2/log/log2/log10/log1p/expm1/sqrt/rsqrt/tanh/sigmoid/sin/cos/tan/atan/erf/erfc/sign/floor/ceil/"
              "trunc, F.relu/relu6/gelu/silu/softplus/mish/elu/leaky_relu/hardtanh/logsigmoid, sum/mean/prod/amax/"
              "amin/any/all, torch.dot, .to(dtype)")


# ---- compositions: functions torch has that the IR writes with its ops ---------------------------
class _E:
    """Arithmetic on IR args through the tracer's builder, for writing compositions briefly.

    Operands are IR args (node ids are ints: integer literals must come as ``const(n)``); a Python
    float is taken as a float literal."""

    def __init__(self, gb):
        self.gb = gb

    def f(self, a):
        return self.gb.cast(a, F32)

    def bin(self, op: Op, a, b):
        return self.gb.binary(op, _lit(a), _lit(b))

    def un(self, op: Op, a):
        return self.gb.unary(op, a)

    def where(self, c, a, b):
        return self.gb.where(c, _lit(a), _lit(b))


def _lit(a):
    return const(a) if isinstance(a, float) else a


_ZERO, _SIX = const(0), const(6)


def _softplus_arg(e: _E, x, beta, threshold):
    bx = e.bin(Op.MUL, e.f(x), beta)
    soft = e.bin(Op.TRUEDIV, e.un(Op.LOG1P, e.un(Op.EXP, bx)), beta)
    return e.where(e.bin(Op.GT, bx, threshold), e.f(x), soft)


def _logsigmoid(e: _E, x):  # min(x, 0) - log1p(exp(-|x|)), as torch computes it
    x = e.f(x)
    return e.bin(Op.SUB, e.bin(Op.MINIMUM, x, 0.0), e.un(Op.LOG1P, e.un(Op.EXP, e.un(Op.NEG, e.un(Op.ABS, x)))))


def _gelu(e: _E, x, approximate: str = "none"):
    x = e.f(x)
    if approximate == "tanh":
        cube = e.bin(Op.MUL, e.bin(Op.MUL, x, x), x)
        inner = e.bin(Op.MUL, math.sqrt(2.0 / math.pi), e.bin(Op.ADD, x, e.bin(Op.MUL, 0.044715, cube)))
        return e.bin(Op.MUL, e.bin(Op.MUL, 0.5, x), e.bin(Op.ADD, 1.0, e.un(Op.TANH, inner)))
    return e.bin(Op.MUL, e.bin(Op.MUL, 0.5, x), e.bin(Op.ADD, 1.0, e.un(Op.ERF, e.bin(Op.MUL, x, math.sqrt(0.5)))))


# name -> (function of an _E and IR args, names of its parameters after the input, their defaults)
COMPOSITE: dict[str, tuple[Callable, tuple[str, ...], tuple]] = {
    "relu": (lambda e, x: e.bin(Op.MAXIMUM, x, _ZERO), (), ()),
    "relu6": (lambda e, x: e.bin(Op.MINIMUM, e.bin(Op.MAXIMUM, x, _ZERO), _SIX), (), ()),
    "gelu": (_gelu, ("approximate",), ("none",)),
    "silu": (lambda e, x: e.bin(Op.MUL, e.f(x), e.un(Op.SIGMOID, x)), (), ()),
    "softplus": (_softplus_arg, ("beta", "threshold"), (1.0, 20.0)),
    "mish": (lambda e, x: e.bin(Op.MUL, e.f(x), e.un(Op.TANH, _softplus_arg(e, x, 1.0, 20.0))), (), ()),
    "elu": (lambda e, x, alpha: e.where(e.bin(Op.GT, x, _ZERO), e.f(x), e.bin(Op.MUL, alpha, e.un(Op.EXPM1, x))),
            ("alpha",), (1.0,)),
    "leaky_relu": (lambda e, x, slope: e.where(e.bin(Op.GT, x, _ZERO), e.f(x), e.bin(Op.MUL, e.f(x), slope)),
                   ("negative_slope",), (0.01,)),
    "hardtanh": (lambda e, x, lo, hi: e.bin(Op.MINIMUM, e.bin(Op.MAXIMUM, x, lo), hi), ("min_val", "max_val"),
                 (-1.0, 1.0)),
    "logsigmoid": (_logsigmoid, (), ()),
    "log_sigmoid": (_logsigmoid, (), ()),
    "erfc": (lambda e, x: e.bin(Op.SUB, 1.0, e.un(Op.ERF, x)), (), ()),
    "square": (lambda e, x: e.bin(Op.MUL, x, x), (), ()),
    "reciprocal": (lambda e, x: e.bin(Op.TRUEDIV, 1.0, x), (), ()),
    "log10": (lambda e, x: e.bin(Op.MUL, e.un(Op.LOG, x), 1.0 / math.log(10.0)), (), ()),
    "trunc": (lambda e, x: e.where(e.bin(Op.LT, x, _ZERO), e.un(Op.CEIL, x), e.un(Op.FLOOR, x)), (), ()),
    "fix": (lambda e, x: e.where(e.bin(Op.LT, x, _ZERO), e.un(Op.CEIL, x), e.un(Op.FLOOR, x)), (), ()),
    "positive": (lambda e, x: x, (), ()),
    "logical_not": (lambda e, x: e.un(Op.NOT, _as_bool(e, x)), (), ()),
}


def _as_bool(e: _E, a):
    return a if e.gb.dtype_of(a) is DType.BOOL else e.bin(Op.NE, a, _ZERO)


def _params(t, name: str, names: tuple, defaults: tuple, args: tuple, kwargs: dict) -> list:
    values = list(defaults)
    for i, v in enumerate(args[:len(names)]):
        values[i] = v
    for k, v in kwargs.items():
        if k == "inplace":
            if v:
                raise t.error(f"{name}(..., inplace=True) on a traced value", f"use {name}(x) and the result")
            continue
        if k not in names:
            raise t.error(f"{name}() got an unexpected argument {k!r}", f"its arguments are {list(names)}")
        values[names.index(k)] = v
    return values


def composite(t, name: str, x: Any, args: tuple = (), kwargs: dict | None = None):
    """Apply the composition ``name`` to ``x`` (scalars or vectors), parameters as torch takes them."""
    fn, names, defaults = COMPOSITE[name]
    values = _params(t, name, names, defaults, args, kwargs or {})
    strs = [v for v in values if isinstance(v, str)]
    if name == "gelu" and strs and strs[0] not in ("none", "tanh"):
        raise t.error(f"F.gelu(approximate={strs[0]!r})", "approximate='none' or 'tanh'")
    traced = [v for v in values if not isinstance(v, str)]
    e = _E(t.gb)

    def apply(a, *ps):
        it = iter(ps)
        return fn(e, a, *[v if isinstance(v, str) else next(it) for v in values])

    return elementwise(t, apply, [x, *traced])


# ---- the dispatcher -----------------------------------------------------------------------------
def _tracer_of(items) -> Any:
    for a in items:
        if isinstance(a, (Proxy, VectorLike)):
            return a.tracer
        if isinstance(a, (tuple, list)):
            found = _tracer_of(a)
            if found is not None:
                return found
    return None


# ---- torch's narrow integers --------------------------------------------------------------------
# A value read from an int8 / uint8 / int16 captured tensor keeps that type in torch's arithmetic
# with Python numbers, bools and values of its own type, and wraps; with an index (int64) it
# promotes. The IR computes such values in i32, so each narrow result is wrapped back to its range
# (``t.narrow`` maps IR values to their torch dtype).
_WRAP = {torch.uint8: (False, 8), torch.int8: (True, 8), torch.int16: (True, 16)}  # signed, bits
_NARROW = tuple(_WRAP)


def _narrow_of(t, a):
    return None if isinstance(a, Const) else t.narrow.get(a)


def _narrow_result(t, a, b):
    """torch's narrow result type of ``a op b``, or None when the result is not narrow."""
    na, nb = _narrow_of(t, a), _narrow_of(t, b)
    if na is None and nb is None:
        return None
    if na is not None and nb is not None:
        return na if na == nb else torch.int16  # uint8 with int8 (or int16): int16, as torch
    n, other = (na, b) if na is not None else (nb, a)
    weak = isinstance(other, Const) and not other.dtype.is_float or t.gb.dtype_of(other) is DType.BOOL
    return n if weak else None


def _wrap(t, x, dtype):
    """``x`` (an int IR value) wrapped to torch's ``dtype`` range, recorded as of that dtype."""
    signed, bits = _WRAP[dtype]
    gb = t.gb
    if signed:
        half = const(1 << (bits - 1))
        x = gb.binary(Op.SUB, gb.binary(Op.AND, gb.binary(Op.ADD, x, half), const((1 << bits) - 1)), half)
    else:
        x = gb.binary(Op.AND, x, const((1 << bits) - 1))
    if not isinstance(x, Const):
        t.narrow[x] = dtype
    return x


def _unary_arg(t, op: Op, a):
    out = t.gb.unary(op, a)
    n = _narrow_of(t, a)
    if n is not None and op in (Op.NEG, Op.NOT, Op.ABS) and t.gb.dtype_of(out).is_int:
        return _wrap(t, out, n)
    return out


def _binary_arg(t, op: Op, a, b):
    out = t.gb.binary(op, a, b)
    if OPS[op].family is Family.COMPARE or not t.gb.dtype_of(out).is_int:
        return out
    n = _narrow_result(t, a, b)
    return out if n is None else _wrap(t, out, n)


def unary(t, op: Op, x):
    try:
        return elementwise(t, lambda a: _unary_arg(t, op, a), [x])
    except TypeError as err:
        raise t.error(str(err), "use ~ on bools and ints, and - on numbers") from None


def binary(t, op: Op, a, b):
    try:
        return elementwise(t, lambda x, y: _binary_arg(t, op, x, y), [a, b])
    except TypeError as err:
        raise t.error(str(err), "use integer or bool operands for & | ^ ~ << >>") from None


def where(t, c, a, b):
    def pick(x, y, z):
        out = t.gb.where(x, y, z)
        n = _narrow_result(t, y, z)
        if n is not None and not isinstance(out, Const) and t.gb.dtype_of(out).is_int:
            t.narrow[out] = n
        return out

    return elementwise(t, pick, [c, a, b])


def cast(t, x, dtype):
    if dtype in _NARROW:  # an int32 (or int64) value wrapped to the narrow range, and known as narrow
        def to_narrow(a):
            if not (t.gb.dtype_of(a).is_int or t.gb.dtype_of(a) is DType.BOOL):
                raise t.error(f".to({dtype}) of a float (torch leaves out-of-range values undefined)",
                              f"convert to torch.int32 first, then to {dtype}")
            return _wrap(t, t.gb.cast(a, DType.I32) if t.gb.dtype_of(a) is DType.BOOL else a, dtype)

        return elementwise(t, to_narrow, [x])
    dt = ir_dtype_of_torch(dtype)
    if dt is None:
        raise t.error(f".to({dtype}) is not supported", "cast to a float, int or bool dtype")

    def to(a):
        if _narrow_of(t, a) is not None and dt is t.gb.dtype_of(a):
            return t.gb.binary(Op.OR, a, const(0))  # a narrow value as a plain int32: a new value, not narrow
        return t.gb.cast(a, dt)

    return elementwise(t, to, [x])


def clamp(t, x, lo=None, hi=None):
    out = x
    if lo is not None:
        out = binary(t, Op.MAXIMUM, out, lo)
    if hi is not None:
        out = binary(t, Op.MINIMUM, out, hi)
    return out


def dot(t, a, b):
    """``torch.dot`` / ``@`` of two traced 1-D vectors: the sum of their products."""
    for x in (a, b):
        if not is_vector(x) or len(x.shape) != 1:
            raise t.error(f"dot / @ of values of shapes {tuple(getattr(a, 'shape', ()))} and "
                          f"{tuple(getattr(b, 'shape', ()))}", "use two 1-D rows, e.g. torch.dot(u[q_idx], v[kv_idx])")
    return reduce(t, binary(t, Op.MUL, a, b), Reduction.SUM)


def _full_like(t, x, value, dtype=None):
    dt = ir_dtype_of_torch(dtype) if dtype is not None else None

    def fill(a, v):
        return t.gb.cast(v, dt if dt is not None else t.gb.dtype_of(a))

    return elementwise(t, fill, [x, value])


def _reduce_call(t, name: str, args: tuple, kwargs: dict):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if kwargs.get("dtype") is not None:
        x = cast(t, x, kwargs["dtype"])
    return reduce(t, x, REDUCTIONS[name], dim, keepdim)


def dispatch(func, args: tuple, kwargs: dict):
    """``__torch_function__`` of every traced value: record ``func(*args, **kwargs)``."""
    t = _tracer_of(list(args) + list(kwargs.values()))
    name = getattr(func, "__name__", str(func))
    if name == "__getitem__":
        return getitem(t, args[0], args[1])
    if name == "__setitem__" or (name.endswith("_") and not name.endswith("__")):
        raise t.error(f"in-place '{name}' on a traced value or captured tensor", "write x = op(x, y) instead")
    if name in ("__get__", "__set__"):
        raise t.error(f"attribute access {func!r} on a traced value", "see flexcomp.trace_functions")
    if name in UNARY:
        return unary(t, UNARY[name], args[0])
    if name in ("div", "divide", "true_divide") and kwargs.get("rounding_mode") is not None:
        mode = kwargs["rounding_mode"]
        if mode == "floor":
            return binary(t, Op.FLOORDIV, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
        raise t.error(f"division with rounding_mode={mode!r} is not supported",
                      "use // (floor division) or torch.div(a, b, rounding_mode='floor')")
    if name in BINARY:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("exponent"))
        if name.startswith("logical_"):
            e = _E(t.gb)
            return elementwise(t, lambda x, y: t.gb.binary(BINARY[name], _as_bool(e, x), _as_bool(e, y)), [a, b])
        return binary(t, BINARY[name], a, b)
    if name in REFLECTED:
        return binary(t, REFLECTED[name], args[1], args[0])
    if name in COMPOSITE:
        return composite(t, name, args[0], tuple(args[1:]), kwargs)
    if name in REDUCTIONS:
        return _reduce_call(t, name, args, kwargs)
    if name in ("max", "min"):
        other = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("dim"))
        if other is None:
            return reduce(t, args[0], Reduction.AMAX if name == "max" else Reduction.AMIN)
        if isinstance(other, int) and not isinstance(other, bool) and is_vector(args[0]):
            raise t.error(f"torch.{name}(x, dim) (values and indices) on a traced vector",
                          f"use torch.a{name}(x, dim) for the values")
        return binary(t, Op.MAXIMUM if name == "max" else Op.MINIMUM, args[0], other)
    if name in ("dot", "inner", "vdot", "matmul", "__matmul__"):
        return dot(t, args[0], args[1])
    if name == "__rmatmul__":
        return dot(t, args[1], args[0])
    if name == "where":
        if len(args) + len(kwargs) < 3:
            raise t.error("torch.where(cond) with one argument is not supported", "torch.where(cond, a, b)")
        c, a, b = (list(args) + [kwargs.get("input"), kwargs.get("other")])[:3]
        return where(t, c, a, b)
    if name in ("clamp", "clip", "clamp_min", "clamp_max"):
        lo = kwargs.get("min", args[1] if len(args) > 1 else None)
        hi = kwargs.get("max", args[2] if len(args) > 2 else None)
        if name == "clamp_max":
            lo, hi = None, lo
        return clamp(t, args[0], lo, hi)
    if name in ("ones_like", "zeros_like", "full_like"):
        value = {"ones_like": 1, "zeros_like": 0}.get(name, args[1] if len(args) > 1 else kwargs.get("fill_value"))
        return _full_like(t, args[0], value, kwargs.get("dtype"))
    if name in ("as_tensor", "asarray", "tensor", "scalar_tensor"):
        data = args[0] if args else kwargs.get("data")
        out = stack(t, data) if isinstance(data, (list, tuple)) else data
        return cast(t, out, kwargs["dtype"]) if kwargs.get("dtype") is not None else out
    if name == "stack":
        return stack(t, args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0))
    if name in ("to", "type") or name in CASTS:
        return method(args[0], name)(*args[1:], **kwargs)
    raise t.error(f"torch function {name!r} is not supported on traced values", f"use the supported ops: {_SUPPORTED}")


# ---- methods and attributes ---------------------------------------------------------------------
def _to(t, x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype) or any(a is p for p in (bool, int, float)):  # not `in`: == records
            dtype = a
        elif hasattr(a, "dtype") and not isinstance(a, (str, torch.device)):
            dtype = a.dtype  # x.to(other): other's dtype
    return x if dtype is None else cast(t, x, dtype)  # a device move is nothing to a traced value


def method(x: Any, name: str):
    """``x.name`` for a traced value ``x``: a bound method, or an attribute's value."""
    t = x.tracer
    if name == "device":
        return torch.device("cpu")  # traced values have no device; moving them is a no-op (.to(device))
    if name == "shape":
        return x.shape if isinstance(x, VectorLike) else torch.Size([])
    if name in ("ndim",):
        return x.dim() if isinstance(x, VectorLike) else 0
    if name in ("is_cuda", "requires_grad", "is_sparse", "is_nested"):
        return False
    if name in ("T", "mT", "mH", "H"):
        nd = x.dim() if isinstance(x, VectorLike) else 0
        if name in ("mT", "mH") and nd < 2:
            raise t.error(f".{name} of a value of {nd} dims", "use it on 2-D (or more) rows of captured tensors")
        order = list(range(nd))[::-1] if name in ("T", "H") else list(range(nd - 2)) + [nd - 1, nd - 2]
        return permute(t, x, order)
    if name in ("permute", "transpose", "t"):
        def reorder(*dims, **k):
            nd = x.dim() if isinstance(x, VectorLike) else 0
            if name == "t":
                order = list(range(nd))[::-1]
            elif name == "transpose":
                a, b = (d % max(nd, 1) for d in (dims or (k["dim0"], k["dim1"])))
                order = list(range(nd))
                order[a], order[b] = order[b], order[a]
            else:
                order = [d % max(nd, 1) for d in (dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list))
                                                  else dims)]
            return permute(t, x, order)
        return reorder
    if name in UNARY:
        return lambda: unary(t, UNARY[name], x)
    if name in CASTS:
        return lambda: cast(t, x, CASTS[name])
    if name in ("to", "type"):
        return lambda *a, **k: _to(t, x, *a, **k)
    if name in BINARY and not name.startswith("__"):
        return lambda *a, **k: dispatch(getattr(torch, name, None) or _named(name), (x, *a), k)
    if name in COMPOSITE:
        return lambda *a, **k: composite(t, name, x, a, k)
    if name in REDUCTIONS:
        return lambda *a, **k: _reduce_call(t, name, (x, *a), k)
    if name in ("max", "min", "clamp", "clip", "clamp_min", "clamp_max", "dot", "inner", "matmul"):
        return lambda *a, **k: dispatch(_named(name), (x, *a), k)
    if name == "where":
        return lambda cond, other: where(t, cond, x, other)
    if name in ("new_ones", "new_zeros", "new_full", "new_tensor", "new_empty"):
        def new(*a, dtype=None, **k):
            if name == "new_full":
                value = a[1] if len(a) > 1 else k.get("fill_value")
            elif name == "new_tensor":
                value = a[0] if a else k.get("data")
            else:
                value = 1 if name == "new_ones" else 0
            size = a[0] if a and name != "new_tensor" else k.get("size", ())
            if size not in ((), [], torch.Size([])) and name != "new_tensor":
                raise t.error(f"{name}({size!r}) of a traced value makes a tensor of that size",
                              f"use {name}(()) for a scalar, or a captured tensor")
            return _full_like(t, value if isinstance(value, (bool, int, float)) else x, value,
                              dtype if dtype is not None else x.dtype)
        return new
    if name in ("dim", "numel", "nelement", "size"):
        if isinstance(x, VectorLike):
            return getattr(type(x), name).__get__(x)
        return {"dim": lambda: 0, "numel": lambda: 1, "nelement": lambda: 1,
                "size": lambda dim=None: torch.Size([]) if dim is None else ()[dim]}[name]
    if name == "is_floating_point":
        return lambda: x.dtype.is_floating_point
    if name in ("item", "tolist", "numpy", "cpu", "cuda", "detach", "contiguous", "clone"):
        if name in ("cpu", "cuda", "detach", "contiguous", "clone"):
            return lambda *a, **k: x
        return lambda: x._concrete(f".{name}() on a traced value", "use the traced value directly")
    raise t.error(f"attribute or method '.{name}' of a traced value is not supported",
                  f"use the supported ops: {_SUPPORTED}")


def _named(name: str):
    class _F:
        __name__ = name
    return _F()


# ---- numpy ----------------------------------------------------------------------------------------
def array_ufunc(x: Any, ufunc, how: str, inputs: tuple, kwargs: dict):
    """numpy's ufunc protocol: ``np.exp(q_idx)`` records like ``torch.exp``; others raise."""
    t = x.tracer
    name = NUMPY_NAMES.get(ufunc.__name__)
    if how != "__call__" or name is None or kwargs.get("out") is not None:
        raise t.error(f"numpy {'ufunc' if how == '__call__' else how} {ufunc.__name__!r} on a traced value",
                      f"use the torch function instead (torch.{name or ufunc.__name__})")
    return dispatch(_named(name), inputs, {})




# ---- indexing, the operators and the hooks of traced values -------------------------------
def getitem(t, base: Any, index: Any):
    """``captured[...]`` with traced or constant indices: a load once every dim is indexed, else a
    :class:`~flexcomp.trace_vectors.View` (``bias[b]``) that further indexing completes."""
    idx = index if isinstance(index, tuple) else (index,)
    for i in idx:
        if isinstance(i, torch.Tensor) and not isinstance(i, Proxy):
            raise t.error("indexing a captured tensor with another tensor",
                          "index with traced values or Python ints")
        if isinstance(i, VectorLike):
            raise t.error("indexing with a traced vector (advanced indexing)",
                          "index with one traced scalar per dim")
    if isinstance(base, VectorLike):
        return base.index(idx)
    if isinstance(base, Proxy) or not isinstance(base, torch.Tensor):
        raise t.error("indexing a traced value (a scalar per pair)", "index captured tensors, not score/b/h/q_idx/kv_idx")
    return View(t, base, tuple(range(n) for n in base.shape)).index(idx)


def _operator(name: str, op: Op, reflected: bool):
    """The Proxy method ``name`` that records ``op``; a reflected one (``__radd__``) takes the other
    operand first."""
    if OPS[op].arity == 1:
        def method(self):
            return unary(self.tracer, op, self)
    elif reflected:
        def method(self, o):
            return binary(self.tracer, op, o, self)
    else:
        def method(self, o):
            return binary(self.tracer, op, self, o)
    method.__name__ = name
    method.__qualname__ = name
    return method


def _bind_operators(cls) -> None:
    """Bind every op row's ``dunders`` and ``reflected_dunders`` on ``cls`` (traced scalars and
    traced vectors alike), and ``@`` (a dot product of vectors)."""
    for info in OPS.values():
        for name in info.dunders:
            setattr(cls, name, _operator(name, info.op, reflected=False))
        for name in info.reflected_dunders:
            setattr(cls, name, _operator(name, info.op, reflected=True))
    cls.__matmul__ = lambda self, o: dispatch(torch.matmul, (self, o), {})
    cls.__rmatmul__ = lambda self, o: dispatch(torch.matmul, (o, self), {})
    cls.__pos__ = lambda self: self


_bind_operators(Proxy)
_bind_operators(VectorLike)
HOOKS.dispatch, HOOKS.method, HOOKS.array_ufunc, HOOKS.getitem = dispatch, method, array_ufunc, getitem
