"""Proxies: the traced values a user's mod computes with.

Python operators, ``torch.*`` functions (through ``__torch_function__``) and tensor methods on a
:class:`Proxy` add nodes to the tracer's :class:`~flexcomp.builder.GraphBuilder`. Anything that
needs a concrete value (``if``, ``and``, ``int()``, ``.item()``) raises a trace error at the
user's line, or, for a captured Python number, asks the tracer to bake it in and trace again.
"""
from __future__ import annotations

import dis
import os
import sys
from typing import Any

import torch

from .builder import const
from .evaluate import ir_dtype_of
from .ir import Arg, DType, Op

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_FIX = "use torch.where(cond, a, b) for if/else, & for and, | for or, ~ for not"
_TRACER_FILES = ("trace.py", "proxy.py", "builder.py")


class _Concretize(Exception):
    """Raised when Python needs the value of a captured number; the trace is redone with it baked."""

    def __init__(self, names: set[str]):
        self.names = names


def _user_frame():
    """The innermost frame outside flexcomp's tracer and torch: the user's line."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not (fn.startswith(_HERE) and os.path.basename(fn) in _TRACER_FILES) and not fn.startswith(_TORCH_DIR):
            return f
        f = f.f_back
    return None


# ---- operator tables ---------------------------------------------------------------------------
def _bytecode_hint(frame) -> str:
    """Which Python construct asked for a truth value, from the instruction at the frame."""
    if frame is None:
        return "Python control flow (if / and / or / not)"
    try:
        instrs = {i.offset: i for i in dis.get_instructions(frame.f_code)}
        op = instrs.get(frame.f_lasti)
        name = op.opname if op else ""
    except Exception:  # pragma: no cover - best effort only
        name = ""
    if "OR_POP" in name and "TRUE" in name:
        return "'or' on a traced value"
    if "OR_POP" in name:
        return "'and' on a traced value"
    if name == "UNARY_NOT" or name == "TO_BOOL":
        return "'not' (or bool()) on a traced value"
    if "JUMP" in name:
        return "'if' / 'while' / 'and' / 'or' on a traced value (Python control flow)"
    return "a Python truth value (if / and / or / not / bool()) of a traced value"


_UNARY_TORCH = {
    "exp": Op.EXP, "exp2": Op.EXP2, "log": Op.LOG, "log2": Op.LOG2, "sqrt": Op.SQRT, "rsqrt": Op.RSQRT,
    "tanh": Op.TANH, "sigmoid": Op.SIGMOID, "sin": Op.SIN, "cos": Op.COS, "abs": Op.ABS, "absolute": Op.ABS,
    "sign": Op.SIGN, "floor": Op.FLOOR, "ceil": Op.CEIL, "neg": Op.NEG, "negative": Op.NEG,
    "bitwise_not": Op.NOT, "__invert__": Op.NOT, "__neg__": Op.NEG, "__abs__": Op.ABS,
}
_BINARY_TORCH = {
    "add": Op.ADD, "sub": Op.SUB, "subtract": Op.SUB, "mul": Op.MUL, "multiply": Op.MUL,
    "div": Op.TRUEDIV, "divide": Op.TRUEDIV, "true_divide": Op.TRUEDIV, "floor_divide": Op.FLOORDIV,
    "remainder": Op.MOD, "pow": Op.POW, "eq": Op.EQ, "ne": Op.NE, "lt": Op.LT, "le": Op.LE, "gt": Op.GT,
    "ge": Op.GE, "less": Op.LT, "greater": Op.GT, "less_equal": Op.LE, "greater_equal": Op.GE,
    "not_equal": Op.NE, "minimum": Op.MINIMUM, "maximum": Op.MAXIMUM, "fmin": Op.MINIMUM, "fmax": Op.MAXIMUM,
    "bitwise_and": Op.AND, "bitwise_or": Op.OR, "bitwise_xor": Op.XOR,
    "logical_and": Op.AND, "logical_or": Op.OR, "logical_xor": Op.XOR,
    "__add__": Op.ADD, "__sub__": Op.SUB, "__mul__": Op.MUL, "__truediv__": Op.TRUEDIV, "__div__": Op.TRUEDIV,
    "__floordiv__": Op.FLOORDIV, "__mod__": Op.MOD, "__pow__": Op.POW, "__and__": Op.AND, "__or__": Op.OR,
    "__xor__": Op.XOR, "__eq__": Op.EQ, "__ne__": Op.NE, "__lt__": Op.LT, "__le__": Op.LE, "__gt__": Op.GT,
    "__ge__": Op.GE,
}
_REFLECTED = {"__radd__": Op.ADD, "__rsub__": Op.SUB, "__rmul__": Op.MUL, "__rtruediv__": Op.TRUEDIV,
              "__rdiv__": Op.TRUEDIV, "__rfloordiv__": Op.FLOORDIV, "__rmod__": Op.MOD, "__rpow__": Op.POW,
              "__rand__": Op.AND, "__ror__": Op.OR, "__rxor__": Op.XOR}


def _ir_dtype_of_torch(dtype) -> DType:
    if dtype is bool:
        return DType.BOOL
    if dtype is int:
        return DType.I64
    if dtype is float:
        return DType.F32
    return ir_dtype_of(dtype)


class Proxy:
    """A traced value. Python operators, ``torch.*`` functions and tensor methods record nodes."""

    __slots__ = ("tracer", "arg")
    __array_ufunc__ = None  # numpy defers to our reflected operators

    def __init__(self, tracer, arg: Arg):
        self.tracer = tracer
        self.arg = arg

    def __repr__(self) -> str:
        return f"Proxy({self.tracer.gb.dtype_of(self.arg).value})"

    __hash__ = object.__hash__

    # ---- the one place that records ----------------------------------------------------------
    def _new(self, arg: Arg) -> "Proxy":
        return Proxy(self.tracer, arg)

    def _bin(self, op: Op, a: Any, b: Any) -> "Proxy":
        t = self.tracer
        try:
            return self._new(t.gb.binary(op, t.to_arg(a), t.to_arg(b)))
        except TypeError as e:
            raise t.error(str(e), "use integer or bool operands for & | ^ ~") from None

    def _un(self, op: Op, a: Any) -> "Proxy":
        t = self.tracer
        try:
            return self._new(t.gb.unary(op, t.to_arg(a)))
        except TypeError as e:
            raise t.error(str(e), "use ~ on bools and ints, and - on numbers") from None

    @property
    def dtype(self) -> torch.dtype:
        return {DType.BOOL: torch.bool, DType.I32: torch.int32, DType.I64: torch.int64,
                DType.F32: torch.float32}[self.tracer.gb.dtype_of(self.arg)]

    # ---- Python operators ----------------------------------------------------------------
    def __add__(self, o): return self._bin(Op.ADD, self, o)
    def __radd__(self, o): return self._bin(Op.ADD, o, self)
    def __sub__(self, o): return self._bin(Op.SUB, self, o)
    def __rsub__(self, o): return self._bin(Op.SUB, o, self)
    def __mul__(self, o): return self._bin(Op.MUL, self, o)
    def __rmul__(self, o): return self._bin(Op.MUL, o, self)
    def __truediv__(self, o): return self._bin(Op.TRUEDIV, self, o)
    def __rtruediv__(self, o): return self._bin(Op.TRUEDIV, o, self)
    def __floordiv__(self, o): return self._bin(Op.FLOORDIV, self, o)
    def __rfloordiv__(self, o): return self._bin(Op.FLOORDIV, o, self)
    def __mod__(self, o): return self._bin(Op.MOD, self, o)
    def __rmod__(self, o): return self._bin(Op.MOD, o, self)
    def __pow__(self, o): return self._bin(Op.POW, self, o)
    def __rpow__(self, o): return self._bin(Op.POW, o, self)
    def __and__(self, o): return self._bin(Op.AND, self, o)
    def __rand__(self, o): return self._bin(Op.AND, o, self)
    def __or__(self, o): return self._bin(Op.OR, self, o)
    def __ror__(self, o): return self._bin(Op.OR, o, self)
    def __xor__(self, o): return self._bin(Op.XOR, self, o)
    def __rxor__(self, o): return self._bin(Op.XOR, o, self)
    def __eq__(self, o): return self._bin(Op.EQ, self, o)  # type: ignore[override]
    def __ne__(self, o): return self._bin(Op.NE, self, o)  # type: ignore[override]
    def __lt__(self, o): return self._bin(Op.LT, self, o)
    def __le__(self, o): return self._bin(Op.LE, self, o)
    def __gt__(self, o): return self._bin(Op.GT, self, o)
    def __ge__(self, o): return self._bin(Op.GE, self, o)
    def __neg__(self): return self._un(Op.NEG, self)
    def __pos__(self): return self
    def __abs__(self): return self._un(Op.ABS, self)
    def __invert__(self): return self._un(Op.NOT, self)

    # ---- things that need a concrete value -------------------------------------------------
    def _concrete(self, what: str, fix: str = _FIX):
        names = self.tracer.deps_are_scalars(self.arg)
        if names is not None and names:
            raise _Concretize(names)
        raise self.tracer.error(what, fix)

    def __bool__(self):
        self._concrete(_bytecode_hint(_user_frame()) + " needs a concrete value, and traced values have none")

    def __index__(self):
        self._concrete("a traced value was used as a Python index (list/tuple indexing, range, slicing)",
                       "keep lookup tables in tensors: torch.tensor(table)[idx]")

    def __int__(self):
        self._concrete("int() of a traced value", "use .to(torch.int32) or // for integer results")

    def __float__(self):
        self._concrete("float() or a math.* function on a traced value",
                       "use torch functions (torch.exp, torch.tanh, ...) instead of math.*")

    def __len__(self):
        self._concrete("len() of a traced value", "traced values are scalars")

    def __iter__(self):
        self._concrete("iterating over a traced value", "traced values are scalars")

    def item(self):
        self._concrete(".item() on a traced value", "use the tensor value directly")

    def tolist(self):
        self._concrete(".tolist() on a traced value", "use the tensor value directly")

    def __getitem__(self, idx):
        raise self.tracer.error("indexing a traced value", "index captured tensors, not score/b/h/q_idx/kv_idx")

    def __getattr__(self, name):
        raise self.tracer.error(f"attribute or method '.{name}' of a traced value is not supported",
                                "see the supported methods in flexcomp.trace.Proxy")

    # ---- tensor methods ------------------------------------------------------------------
    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype) or a in (bool, int, float):
                dtype = a
        if dtype is None:
            return self  # a device move
        dt = _ir_dtype_of_torch(dtype)
        if dt is None:
            raise self.tracer.error(f".to({dtype}) is not supported", "cast to a float, int or bool dtype")
        return self._new(self.tracer.gb.cast(self.arg, dt))

    def type(self, dtype):
        return self.to(dtype)

    def float(self): return self.to(torch.float32)
    def double(self): return self.to(torch.float32)
    def half(self): return self.to(torch.float32)
    def bfloat16(self): return self.to(torch.float32)
    def int(self): return self.to(torch.int32)
    def long(self): return self.to(torch.int64)
    def bool(self): return self.to(torch.bool)
    def abs(self): return self._un(Op.ABS, self)
    def neg(self): return self._un(Op.NEG, self)
    def exp(self): return self._un(Op.EXP, self)
    def exp2(self): return self._un(Op.EXP2, self)
    def log(self): return self._un(Op.LOG, self)
    def log2(self): return self._un(Op.LOG2, self)
    def sqrt(self): return self._un(Op.SQRT, self)
    def rsqrt(self): return self._un(Op.RSQRT, self)
    def tanh(self): return self._un(Op.TANH, self)
    def sigmoid(self): return self._un(Op.SIGMOID, self)
    def sin(self): return self._un(Op.SIN, self)
    def cos(self): return self._un(Op.COS, self)
    def sign(self): return self._un(Op.SIGN, self)
    def floor(self): return self._un(Op.FLOOR, self)
    def ceil(self): return self._un(Op.CEIL, self)
    def logical_not(self): return self._un(Op.NOT, self.to(torch.bool))
    def bitwise_not(self): return self._un(Op.NOT, self)
    def logical_and(self, o): return self._bin(Op.AND, self.to(torch.bool), o)
    def logical_or(self, o): return self._bin(Op.OR, self.to(torch.bool), o)
    def minimum(self, o): return self._bin(Op.MINIMUM, self, o)
    def maximum(self, o): return self._bin(Op.MAXIMUM, self, o)
    def pow(self, o): return self._bin(Op.POW, self, o)

    def clamp(self, min=None, max=None):
        out = self
        if min is not None:
            out = self._bin(Op.MAXIMUM, out, min)
        if max is not None:
            out = self._bin(Op.MINIMUM, out, max)
        return out

    clip = clamp

    def clamp_min(self, min): return self.clamp(min=min)
    def clamp_max(self, max): return self.clamp(max=max)

    def where(self, cond, other):
        return self._new(self.tracer.gb.where(self.tracer.to_arg(cond), self.arg, self.tracer.to_arg(other)))

    def _full(self, value, dtype=None):
        dt = _ir_dtype_of_torch(dtype) if dtype is not None else self.tracer.gb.dtype_of(self.arg)
        return self._new(self.tracer.gb.cast(self.tracer.to_arg(value), dt))

    def new_ones(self, size=(), dtype=None, **_): return self._full(1, dtype)
    def new_zeros(self, size=(), dtype=None, **_): return self._full(0, dtype)
    def new_full(self, size, fill_value, dtype=None, **_): return self._full(fill_value, dtype)
    def new_tensor(self, data, dtype=None, **_): return self._full(data, dtype)

    # ---- torch functions -----------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        proxy = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, Proxy)), None)
        if proxy is None:
            for a in args:
                if isinstance(a, (tuple, list)):
                    proxy = next((x for x in a if isinstance(x, Proxy)), None)
                    if proxy is not None:
                        break
        t = proxy.tracer
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__":
            return t_getitem(t, args[0], args[1])
        if name in _UNARY_TORCH:
            return proxy._un(_UNARY_TORCH[name], args[0])
        if name in ("div", "divide") and kwargs.get("rounding_mode") == "floor":
            return proxy._bin(Op.FLOORDIV, args[0], args[1])
        if name in ("div", "divide") and kwargs.get("rounding_mode") == "trunc":
            raise t.error("division with rounding_mode='trunc' is not supported",
                          "use // (floor division) or torch.div(a, b, rounding_mode='floor')")
        if name in _BINARY_TORCH:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            if name.startswith("logical_"):
                a, b = _as_bool(t, a), _as_bool(t, b)
            return proxy._bin(_BINARY_TORCH[name], a, b)
        if name in _REFLECTED:
            return proxy._bin(_REFLECTED[name], args[1], args[0])
        if name == "logical_not":
            return proxy._un(Op.NOT, _as_bool(t, args[0]))
        if name == "where":
            if len(args) + len(kwargs) < 3:
                raise t.error("torch.where(cond) with one argument is not supported", "torch.where(cond, a, b)")
            c, a, b = (list(args) + [kwargs.get("input"), kwargs.get("other")])[:3]
            return proxy._new(t.gb.where(t.to_arg(c), t.to_arg(a), t.to_arg(b)))
        if name in ("clamp", "clip", "clamp_min", "clamp_max"):
            x = args[0] if isinstance(args[0], Proxy) else Proxy(t, t.to_arg(args[0]))
            lo = kwargs.get("min", args[1] if len(args) > 1 else None)
            hi = kwargs.get("max", args[2] if len(args) > 2 else None)
            if name == "clamp_max":
                lo, hi = None, lo
            return x.clamp(lo, hi)
        if name in ("ones_like", "zeros_like", "full_like"):
            value = {"ones_like": 1, "zeros_like": 0}.get(name, args[1] if len(args) > 1 else kwargs.get("fill_value"))
            return proxy._full(value, kwargs.get("dtype"))
        if name in ("as_tensor", "asarray"):
            return args[0]
        if name in ("to", "float", "int", "long", "bool", "abs", "exp", "tanh", "sigmoid"):
            return getattr(Proxy(t, t.to_arg(args[0])), name)(*args[1:], **kwargs)
        raise t.error(f"torch function {name!r} is not supported on traced values",
                      "use the supported ops: + - * / // % ** abs, comparisons, & | ^ ~, torch.where, "
                      "exp/exp2/log/log2/sqrt/rsqrt/tanh/sigmoid/sin/cos/sign/floor/ceil, "
                      "clamp/minimum/maximum, .to(dtype)")


def _as_bool(t, x):
    a = t.to_arg(x)
    return Proxy(t, a if t.gb.dtype_of(a) is DType.BOOL else t.gb.binary(Op.NE, a, const(0)))


def t_getitem(t, tensor: Any, index: Any) -> Proxy:
    """``captured[idx...]``: one traced or constant integer index per dimension."""
    if not isinstance(tensor, torch.Tensor):
        raise t.error("indexing a traced value", "index captured tensors, not score/b/h/q_idx/kv_idx")
    idx = index if isinstance(index, tuple) else (index,)
    for i in idx:
        if i is None or i is Ellipsis or isinstance(i, slice):
            raise t.error(f"indexing a captured tensor with {i!r}",
                          "give one integer index per dimension, e.g. table[h, q_idx - kv_idx]")
        if isinstance(i, torch.Tensor) and not isinstance(i, Proxy):
            raise t.error("indexing a captured tensor with another tensor",
                          "index with traced values or Python ints")
    if len(idx) != tensor.dim():
        raise t.error(f"a captured tensor of shape {tuple(tensor.shape)} was indexed with {len(idx)} "
                      f"indices; the result would not be a scalar",
                      f"give all {tensor.dim()} indices, e.g. bias[h, q_idx]")
    spec = t.capture_tensor(tensor)
    try:
        return Proxy(t, t.gb.load(spec, [t.to_arg(i, "index") for i in idx]))
    except TypeError as e:
        raise t.error(str(e), "index with integers: .to(torch.int32) or // turn floats into ints") from None
