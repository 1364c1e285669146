"""Proxies: the traced values a user's mod computes with.

Python operators, ``torch.*`` functions (through ``__torch_function__``) and tensor methods on a
:class:`Proxy` add nodes to the tracer's :class:`~flexcomp.builder.GraphBuilder`. This module is
the bottom of the tracer: what each operator and function records lives in
:mod:`flexcomp.trace_functions`, which binds the op rows' operators on :class:`Proxy` and fills
:data:`HOOKS` (the protocol methods of traced values call through it) when it is imported (by
:mod:`flexcomp.trace`). Anything that needs a concrete value (``if``, ``and``, ``int()``, ``.item()``) raises a trace error at the
user's line, or, for a captured Python number, asks the tracer to bake it in and trace again.
"""
from __future__ import annotations

import dis
import os
import sys

import torch

from .evaluate import ir_dtype_of
from .ir import Arg, DType

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
    except Exception:  # noqa: BLE001  # pragma: no cover - best effort only
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


class Hooks:
    """What the traced values' protocol methods call: filled by :mod:`flexcomp.trace_functions` (so
    that the values need not import the functions that make more of them)."""

    dispatch = None  # (func, args, kwargs): __torch_function__
    method = None  # (value, name): a tensor method
    array_ufunc = None  # (value, ufunc, how, inputs, kwargs): a numpy ufunc
    getitem = None  # (tracer, base, index): indexing


HOOKS = Hooks()


class Proxy:
    """A traced scalar. Python operators, ``torch.*`` functions (``__torch_function__``), tensor
    methods and numpy ufuncs record nodes (:mod:`flexcomp.trace_functions` says what each means)."""

    __slots__ = ("arg", "tracer")

    def __init__(self, tracer, arg: Arg):
        self.tracer = tracer
        self.arg = arg

    def __repr__(self) -> str:
        return f"Proxy({self.tracer.gb.dtype_of(self.arg).value})"

    __hash__ = object.__hash__

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype_of(self.tracer.gb.dtype_of(self.arg))

    # Python operators: those of the ops' rows, and @, bound by flexcomp.trace_functions

    # ---- things that need a concrete value -------------------------------------------------
    def _concrete(self, what: str, fix: str = _FIX) -> Exception:
        """What to raise where Python needs a value: a retrace with the captured numbers baked in, or a trace error."""
        names = self.tracer.deps_are_scalars(self.arg)
        if names is not None and names:
            return _Concretize(names)
        return self.tracer.error(what, fix)

    def __bool__(self):
        raise self._concrete(_bytecode_hint(_user_frame()) + " needs a concrete value, and traced values have none")

    def __index__(self):
        raise self._concrete("a traced value was used as a Python index (list/tuple indexing, range, slicing)",
                             "keep lookup tables in tensors: torch.tensor(table)[idx]")

    def __int__(self):
        raise self._concrete("int() of a traced value", "use .to(torch.int32) or // for integer results")

    def __float__(self):
        raise self._concrete("float() or a math.* function on a traced value",
                             "use torch functions (torch.exp, torch.tanh, ...) instead of math.*")

    def __complex__(self):
        raise self._concrete("complex() of a traced value", "traced values are real numbers")

    def __len__(self):
        raise self._concrete("len() of a traced value", "traced values are scalars")

    def __iter__(self):
        raise self._concrete("iterating over a traced value", "traced values are scalars")

    def __getitem__(self, idx):
        raise self.tracer.error("indexing a traced value (a scalar per pair)",
                                "index captured tensors, not score/b/h/q_idx/kv_idx")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return HOOKS.method(self, name)

    # ---- protocols -------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return HOOKS.dispatch(func, args, kwargs or {})

    def __array_ufunc__(self, ufunc, how, *inputs, **kwargs):
        return HOOKS.array_ufunc(self, ufunc, how, inputs, kwargs)

    def __array__(self, *args, **kwargs):
        raise self.tracer.error("a numpy function (np.asarray, np.where, ...) on a traced value",
                                "use the torch function (torch.where, torch.clamp, ...)")

    def __array_function__(self, func, types_, args, kwargs):
        raise self.tracer.error(f"numpy function {func.__name__!r} on a traced value",
                                f"use the torch function (torch.{func.__name__})")
