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

from .evaluate import ir_dtype_of
from .ir import Arg, DType, Op
from .trace_functions import array_ufunc, binary, dispatch, method, unary
from .trace_vectors import VectorLike, View

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_FIX = "use torch.where(cond, a, b) for if/else, & for and, | for or, ~ for not"
_TRACER_FILES = ("trace.py", "proxy.py", "builder.py", "trace_functions.py", "trace_vectors.py")


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


def ir_dtype_of_torch(dtype) -> DType | None:
    """The IR type of a torch dtype or a Python type (``int`` is int64, as torch reads it)."""
    if dtype is bool:
        return DType.BOOL
    if dtype is int:
        return DType.I64
    if dtype is float:
        return DType.F32
    if not isinstance(dtype, torch.dtype):
        return None
    return ir_dtype_of(dtype)


def torch_dtype_of(dtype: DType) -> torch.dtype:
    """What ``.dtype`` of a traced value says (``f32``, the working float, reads as float32)."""
    return {DType.BOOL: torch.bool, DType.I32: torch.int32, DType.I64: torch.int64, DType.F32: torch.float32}[dtype]


class Proxy:
    """A traced scalar. Python operators, ``torch.*`` functions (``__torch_function__``), tensor
    methods and numpy ufuncs record nodes (:mod:`flexcomp.trace_functions` says what each means)."""

    __slots__ = ("tracer", "arg")

    def __init__(self, tracer, arg: Arg):
        self.tracer = tracer
        self.arg = arg

    def __repr__(self) -> str:
        return f"Proxy({self.tracer.gb.dtype_of(self.arg).value})"

    __hash__ = object.__hash__

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype_of(self.tracer.gb.dtype_of(self.arg))

    # ---- Python operators ----------------------------------------------------------------
    def __add__(self, o): return binary(self.tracer, Op.ADD, self, o)
    def __radd__(self, o): return binary(self.tracer, Op.ADD, o, self)
    def __sub__(self, o): return binary(self.tracer, Op.SUB, self, o)
    def __rsub__(self, o): return binary(self.tracer, Op.SUB, o, self)
    def __mul__(self, o): return binary(self.tracer, Op.MUL, self, o)
    def __rmul__(self, o): return binary(self.tracer, Op.MUL, o, self)
    def __truediv__(self, o): return binary(self.tracer, Op.TRUEDIV, self, o)
    def __rtruediv__(self, o): return binary(self.tracer, Op.TRUEDIV, o, self)
    def __floordiv__(self, o): return binary(self.tracer, Op.FLOORDIV, self, o)
    def __rfloordiv__(self, o): return binary(self.tracer, Op.FLOORDIV, o, self)
    def __mod__(self, o): return binary(self.tracer, Op.MOD, self, o)
    def __rmod__(self, o): return binary(self.tracer, Op.MOD, o, self)
    def __pow__(self, o): return binary(self.tracer, Op.POW, self, o)
    def __rpow__(self, o): return binary(self.tracer, Op.POW, o, self)
    def __and__(self, o): return binary(self.tracer, Op.AND, self, o)
    def __rand__(self, o): return binary(self.tracer, Op.AND, o, self)
    def __or__(self, o): return binary(self.tracer, Op.OR, self, o)
    def __ror__(self, o): return binary(self.tracer, Op.OR, o, self)
    def __xor__(self, o): return binary(self.tracer, Op.XOR, self, o)
    def __rxor__(self, o): return binary(self.tracer, Op.XOR, o, self)
    def __lshift__(self, o): return binary(self.tracer, Op.SHL, self, o)
    def __rlshift__(self, o): return binary(self.tracer, Op.SHL, o, self)
    def __rshift__(self, o): return binary(self.tracer, Op.SHR, self, o)
    def __rrshift__(self, o): return binary(self.tracer, Op.SHR, o, self)
    def __eq__(self, o): return binary(self.tracer, Op.EQ, self, o)  # type: ignore[override]
    def __ne__(self, o): return binary(self.tracer, Op.NE, self, o)  # type: ignore[override]
    def __lt__(self, o): return binary(self.tracer, Op.LT, self, o)
    def __le__(self, o): return binary(self.tracer, Op.LE, self, o)
    def __gt__(self, o): return binary(self.tracer, Op.GT, self, o)
    def __ge__(self, o): return binary(self.tracer, Op.GE, self, o)
    def __matmul__(self, o): return dispatch(torch.matmul, (self, o), {})
    def __rmatmul__(self, o): return dispatch(torch.matmul, (o, self), {})
    def __neg__(self): return unary(self.tracer, Op.NEG, self)
    def __pos__(self): return self
    def __abs__(self): return unary(self.tracer, Op.ABS, self)
    def __invert__(self): return unary(self.tracer, Op.NOT, self)

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

    def __complex__(self):
        self._concrete("complex() of a traced value", "traced values are real numbers")

    def __len__(self):
        self._concrete("len() of a traced value", "traced values are scalars")

    def __iter__(self):
        self._concrete("iterating over a traced value", "traced values are scalars")

    def __getitem__(self, idx):
        raise self.tracer.error("indexing a traced value (a scalar per pair)",
                                "index captured tensors, not score/b/h/q_idx/kv_idx")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return method(self, name)

    # ---- protocols -------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    def __array_ufunc__(self, ufunc, how, *inputs, **kwargs):
        return array_ufunc(self, ufunc, how, inputs, kwargs)

    def __array__(self, *args, **kwargs):
        raise self.tracer.error("a numpy function (np.asarray, np.where, ...) on a traced value",
                                "use the torch function (torch.where, torch.clamp, ...)")

    def __array_function__(self, func, types_, args, kwargs):
        raise self.tracer.error(f"numpy function {func.__name__!r} on a traced value",
                                f"use the torch function (torch.{func.__name__})")


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
