"""The tracer: call a user's score_mod / mask_mod once with proxies and record the IR.

``trace(fn, ModKind.SCORE)`` calls ``fn(score, b, h, q_idx, kv_idx)`` with :class:`Proxy` values.
Each operator, ``torch.*`` function and tensor method the function applies adds a node through
:class:`~flexcomp.builder.GraphBuilder`. What the function captures becomes an *input* of the
graph, never a baked-in value:

- tensors (closure cells, globals, attributes of captured objects, or any tensor indexed by a
  traced value) become named buffers; ``doc[q_idx]`` is ``load doc[q_idx]``;
- Python numbers in closure cells (window size, soft-cap) become scalar inputs, so changing them
  does not change :meth:`Graph.structural_key`. A number that the function uses in Python control
  flow (``range(n)``, ``if n > 0``) is baked in as a constant instead, and the trace is redone.

Untraceable code raises :class:`FlexcompTraceError` naming the user's function, file and line.
"""
from __future__ import annotations

import dis
import functools
import inspect
import keyword
import linecache
import numbers
import os
import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from .builder import GraphBuilder, const
from .errors import FlexcompTraceError
from .evaluate import ir_dtype_of
from .ir import Arg, BufferSpec, Const, DType, Graph, ModKind, Op

Number = Union[bool, int, float]

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_FIX = "use torch.where(cond, a, b) for if/else, & for and, | for or, ~ for not"


@dataclass(frozen=True)
class TracedMod:
    """A traced mod and the current values of what it captured.

    Fields:
        graph: the IR (simplified and verified).
        buffers: captured tensors, one per ``graph.buffers`` entry, in order.
        scalars: captured Python numbers, one per ``graph.scalars`` entry, in order.
        fn: the user's function.
    """

    graph: Graph
    buffers: tuple[torch.Tensor, ...]
    scalars: tuple[Number, ...]
    fn: Callable

    @property
    def key(self) -> str:
        return self.graph.structural_key()


class _Concretize(Exception):
    """Raised when Python needs the value of a captured number; the trace is redone with it baked."""

    def __init__(self, names: set[str]):
        self.names = names


def _user_frame():
    """The innermost frame outside flexcomp's tracer and torch: the user's line."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not (fn.startswith(_HERE) and os.path.basename(fn) in ("trace.py", "builder.py")) and not fn.startswith(_TORCH_DIR):
            return f
        f = f.f_back
    return None


class Tracer:
    """One trace of one function. Use :func:`trace`."""

    def __init__(self, fn: Callable, kind: ModKind, baked: set[str]):
        self.fn = fn
        self.kind = kind
        self.baked = baked
        self.name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self.gb = GraphBuilder(kind, _identifier(getattr(fn, "__name__", "mod")))
        self.tensor_names: dict[int, str] = {}
        self.tensors: dict[int, tuple[BufferSpec, torch.Tensor]] = {}
        self.scalar_values: dict[str, Number] = {}
        self.scalar_origin: dict[int, str] = {}  # scalar node id -> user-visible name

    # ---- errors --------------------------------------------------------------------------
    def error(self, what: str, fix: str = _FIX, where: tuple | None = None) -> FlexcompTraceError:
        """A trace error at the user's current line (or at ``where = (file, line, function)``)."""
        f = _user_frame() if where is None else None
        if where is not None:
            filename, lineno, func = where
        elif f is not None:
            filename, lineno, func = f.f_code.co_filename, f.f_lineno, f.f_code.co_name
        else:
            filename, lineno, func = "?", 0, self.name
        line = linecache.getline(filename, lineno).strip()
        where = f"{filename}:{lineno}" + (f" in {func}" if func != self.name else "")
        msg = (f"cannot trace {self.kind.value} {self.name!r} at {where}:\n    {line}\n"
               f"{what}.\nFix: {fix}.")
        return FlexcompTraceError(msg, function=self.name, filename=filename, lineno=lineno)

    # ---- captured values -----------------------------------------------------------------
    def lift(self, value: Any, name: str, depth: int = 0) -> Any:
        """Replace a captured value by what the trace should see."""
        if isinstance(value, bool) or depth > 8:
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, (int, float, torch.Tensor)):
            value = value.item() if hasattr(value, "item") else float(value)  # numpy scalars
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if name in self.baked:
                return value
            dtype = const(value).dtype  # i32, or i64 for ints outside the i32 range, or f32
            node = self.gb.add_scalar(name, dtype)
            spec_name = self.gb.scalars[-1].name
            self.scalar_values[spec_name] = value
            self.scalar_origin[node] = name
            return Proxy(self, node)
        if isinstance(value, torch.Tensor):
            self.tensor_names.setdefault(id(value), name)
            return value
        if isinstance(value, types.FunctionType):
            return self.lift_function(value, depth + 1)
        if isinstance(value, functools.partial):
            return functools.partial(self.lift(value.func, name, depth + 1),
                                     *(self.lift(a, name, depth + 1) for a in value.args),
                                     **{k: self.lift(v, k, depth + 1) for k, v in value.keywords.items()})
        if isinstance(value, (tuple, list)):
            lifted = [self.lift(v, f"{name}_{i}", depth + 1) for i, v in enumerate(value)]
            return type(value)(lifted) if isinstance(value, list) or type(value) is tuple else value
        if isinstance(value, torch.nn.Module):
            for k, t in list(value.named_parameters()) + list(value.named_buffers()):
                self.tensor_names.setdefault(id(t), f"{name}.{k}".replace(".", "_"))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for k, t in vars(value).items():
                if isinstance(t, torch.Tensor):
                    self.tensor_names.setdefault(id(t), f"{name}_{k}")
        return value

    def lift_function(self, fn: types.FunctionType, depth: int = 0) -> types.FunctionType:
        code = fn.__code__
        for g in code.co_names:
            v = fn.__globals__.get(g)
            if isinstance(v, torch.Tensor):
                self.tensor_names.setdefault(id(v), g)
        if not fn.__closure__:
            return fn
        cells = []
        for name, cell in zip(code.co_freevars, fn.__closure__):
            try:
                cells.append(types.CellType(self.lift(cell.cell_contents, name, depth)))
            except ValueError:  # an empty cell
                cells.append(cell)
        new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
        new.__kwdefaults__ = fn.__kwdefaults__
        return new

    def capture_tensor(self, t: torch.Tensor) -> BufferSpec:
        if id(t) in self.tensors:
            return self.tensors[id(t)][0]
        dt = ir_dtype_of(t.dtype)
        if dt is None:
            raise self.error(f"captured tensor of dtype {t.dtype} is not supported",
                             "capture float, integer or bool tensors")
        name = self.tensor_names.get(id(t), f"buf{len(self.tensors)}")
        spec = self.gb.add_buffer(name, dt, t.dim(), str(t.dtype).replace("torch.", ""))
        self.tensors[id(t)] = (spec, t)
        return spec

    def to_arg(self, x: Any, what: str = "operand") -> Arg:
        """A proxy, Python number or 0-d captured tensor as an IR operand."""
        if isinstance(x, Proxy):
            if x.tracer is not self:
                raise self.error("a traced value from another trace was used", "do not keep traced values")
            return x.arg
        if isinstance(x, (bool, int, float)):
            return const(x)
        if isinstance(x, numbers.Number) and hasattr(x, "item") and not isinstance(x, torch.Tensor):
            return const(x.item())  # numpy scalars
        if isinstance(x, torch.Tensor):
            if x.dim() != 0:
                raise self.error(
                    f"a captured tensor of shape {tuple(x.shape)} was used as a whole in arithmetic",
                    "index it by traced values (bias[h, q_idx]) so each (q, kv) pair reads one element")
            return self.gb.load(self.capture_tensor(x), [])
        raise self.error(f"{what} of type {type(x).__name__} is not supported",
                         "use traced values, Python numbers and captured tensors")

    def deps_are_scalars(self, a: Arg) -> set[str] | None:
        """Names of the captured numbers ``a`` depends on, or None if it depends on inputs/loads."""
        if isinstance(a, Const):
            return set()
        names, stack, seen = set(), [a], set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            n = self.gb.nodes[i]
            if n.op in (Op.INPUT, Op.LOAD):
                return None
            if n.op is Op.SCALAR:
                names.add(self.scalar_origin[i])
            stack += [x for x in n.args if not isinstance(x, Const)]
        return names

    # ---- running ---------------------------------------------------------------------------
    def run(self) -> tuple[Graph, tuple, tuple]:
        fn = self.fn
        if isinstance(fn, types.FunctionType):
            fn = self.lift_function(fn)
        elif isinstance(fn, functools.partial):
            fn = self.lift(fn, "partial")
        args = [Proxy(self, self.gb.inputs[n]) for n in self.kind.input_names]
        out, where = _call_noting_return(fn, args)
        if out is None:
            raise self.error(f"the {self.kind.value} returned None", "return the score or the mask", where)
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            out = Proxy(self, self.to_arg(out))
        if not isinstance(out, (Proxy, bool, int, float)):
            raise self.error(f"the {self.kind.value} returned a {type(out).__name__}",
                             "return a traced value", where)
        o = self.to_arg(out)
        t = self.gb.dtype_of(o)
        if self.kind is ModKind.MASK and t is not DType.BOOL:
            raise self.error(f"a mask_mod must return a bool, this one returns {t.value}",
                             "return a comparison such as q_idx >= kv_idx, combined with & | ~", where)
        if self.kind is ModKind.SCORE and t is DType.BOOL:
            raise self.error("a score_mod must return a float score, this one returns bool",
                             "pass a mask as mask_mod (create_block_mask), or return "
                             "torch.where(cond, score, -float('inf'))", where)
        if self.kind is ModKind.SCORE:
            o = self.gb.cast(o, DType.F32)
        g = self.gb.finish(o)
        by_spec = {spec: t for spec, t in self.tensors.values()}
        buffers = tuple(by_spec[b] for b in g.buffers)
        scalars = tuple(self.scalar_values[c.name] for c in g.scalars)
        return g, buffers, scalars


def _identifier(name: str) -> str:
    """A valid Python function name for printouts and to_python (``<lambda>`` -> ``lambda_``)."""
    name = re.sub(r"\W", "_", name).strip("_") or "mod"
    if name[0].isdigit() or keyword.iskeyword(name):
        name += "_"
    return name


def _call_noting_return(fn: Callable, args: list) -> tuple[Any, tuple | None]:
    """Call ``fn``; also return (file, line, function) of its ``return`` statement, for errors
    about the returned value."""
    code = getattr(getattr(fn, "func", fn), "__code__", None)
    where: list = [None]

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            where[0] = (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        out = fn(*args)
    finally:
        sys.setprofile(previous)
    return out, where[0]


def _check_signature(fn: Callable, kind: ModKind) -> None:
    want = len(kind.input_names)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > want or len(positional) < want:
        name = getattr(fn, "__qualname__", repr(fn))
        code = getattr(fn, "__code__", None)
        filename = code.co_filename if code else "?"
        lineno = code.co_firstlineno if code else 0
        other = "mask_mod(b, h, q_idx, kv_idx)" if kind is ModKind.SCORE else "score_mod(score, b, h, q_idx, kv_idx)"
        raise FlexcompTraceError(
            f"{kind.value} {name!r} at {filename}:{lineno} takes {len(positional)} positional arguments "
            f"({', '.join(p.name for p in positional)}); a {kind.value} takes {want}: "
            f"({', '.join(kind.input_names)}). Is it a {other} passed in the wrong place?",
            function=name, filename=filename, lineno=lineno)


def trace(fn: Callable, kind: ModKind) -> TracedMod:
    """Trace ``fn`` into a simplified, verified :class:`TracedMod`.

    >>> def causal(b, h, q_idx, kv_idx):
    ...     return q_idx >= kv_idx
    >>> print(trace(causal, ModKind.MASK).graph)
    graph mask_mod(b: i32, h: i32, q_idx: i32, kv_idx: i32):
      %0 = ge q_idx, kv_idx : bool
      return %0
    """
    from .symbolic import simplify
    from .ir import verify

    if not callable(fn):
        raise FlexcompTraceError(f"{kind.value} must be callable, got {type(fn).__name__}")
    _check_signature(fn, kind)
    baked: set[str] = set()
    for _ in range(32):
        tracer = Tracer(fn, kind, baked)
        try:
            g, buffers, scalars = tracer.run()
        except _Concretize as c:
            baked |= c.names
            continue
        return TracedMod(verify(simplify(g)), buffers, scalars, fn)
    raise FlexcompTraceError(f"{kind.value} {tracer.name!r}: tracing did not settle")


# ---- the proxy ---------------------------------------------------------------------------
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

    def __init__(self, tracer: Tracer, arg: Arg):
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


def _as_bool(t: Tracer, x):
    a = t.to_arg(x)
    return Proxy(t, a if t.gb.dtype_of(a) is DType.BOOL else t.gb.binary(Op.NE, a, const(0)))


def t_getitem(t: Tracer, tensor: Any, index: Any) -> Proxy:
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
