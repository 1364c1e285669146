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

import functools
import inspect
import keyword
import linecache
import numbers
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import trace_functions  # noqa: F401  (binds Proxy's operators and fills proxy.HOOKS)
from .builder import GraphBuilder, const
from .errors import (
    FlexcompIndexError,
    FlexcompModOutputError,
    FlexcompModSignatureError,
    FlexcompTraceError,
    FlexcompTraceIndexError,
)
from .evaluate import ir_dtype_of
from .ir import Arg, BufferSpec, Const, DType, Graph, ModKind, Op, verify
from .proxy import _FIX, Proxy, _Concretize, _user_frame
from .ranges import INDEX_LIMIT, needs_int64
from .symbolic import simplify
from .trace_cache import (NoCache, captured_tensors, fingerprint, lookup, lookup_structure, recipes_of, remember,
                          remember_structure, structural_key, value_ranges)
from .trace_vectors import VectorLike

Number = bool | int | float



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


class Tracer:
    """One trace of one function. Use :func:`trace`."""

    def __init__(self, fn: Callable, kind: ModKind, baked: set[str], wide: bool = False):
        self.fn = fn
        self.kind = kind
        self.baked = baked
        self.wide = wide  # the indices as int64 from the start, as torch's (flexcomp.ranges.needs_int64)
        self.name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self.gb = GraphBuilder(kind, _identifier(getattr(fn, "__name__", "mod")), DType.I64 if wide else DType.I32)
        self.tensor_names: dict[int, str] = {}
        self.tensors: dict[int, tuple[BufferSpec, torch.Tensor]] = {}
        self.scalar_values: dict[str, Number] = {}
        self.scalar_origin: dict[int, str] = {}  # scalar node id -> user-visible name
        self.walked: set[int] = set()  # ids of tensors reached through closures and globals
        self.walked_storages: set[tuple] = set()  # their (device, storage address)
        self.cacheable = True  # False once a tensor came from anywhere else (attributes, the mod's body)
        self.narrow: dict[int, torch.dtype] = {}  # IR values of torch's int8 / uint8 / int16 types

    # ---- errors --------------------------------------------------------------------------
    def error(self, what: str, fix: str = _FIX, where: tuple | None = None,
              cls: type = FlexcompTraceError) -> FlexcompTraceError:
        """A trace error at the user's current line (or at ``where = (file, line, function)``);
        ``cls``: a subclass that is also the exception type torch raises for the same mistake."""
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
        return cls(msg, function=self.name, filename=filename, lineno=lineno)

    def where(self) -> tuple[str, int, str]:
        """(file, line, function) of the user's current line."""
        f = _user_frame()
        if f is None:
            return "?", 0, self.name
        return f.f_code.co_filename, f.f_lineno, f.f_code.co_name

    def index_error(self, what: str) -> FlexcompIndexError:
        """An out-of-range constant index, raised as torch raises it (``IndexError``), at the user's line."""
        filename, lineno, _ = self.where()
        line = linecache.getline(filename, lineno).strip()
        return FlexcompIndexError(f"{self.kind.value} {self.name!r} at {filename}:{lineno}:\n    {line}\n{what}")

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
            self.walk(value, name)
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
                self.walk(v, g)
        for i, d in enumerate(list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())):
            if isinstance(d, torch.Tensor):  # ``lambda ..., offset=offset:``: keyed like a closure's tensor
                self.walk(d, f"default{i}")
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

    def walk(self, t: torch.Tensor, name: str) -> None:
        """Note a tensor reached through the mod's closure or globals (its values are read at run time)."""
        self.tensor_names.setdefault(id(t), name)
        self.walked.add(id(t))
        self.walked_storages.add((t.device, t.untyped_storage().data_ptr()))

    def is_view_of_walked(self, t: torch.Tensor) -> bool:
        """A view the mod took of a captured tensor (``offset[0]``): read at run time like it."""
        return t._base is not None and (t.device, t.untyped_storage().data_ptr()) in self.walked_storages

    def capture_tensor(self, t: torch.Tensor) -> BufferSpec:
        if id(t) in self.tensors:
            return self.tensors[id(t)][0]
        if id(t) not in self.walked and not self.is_view_of_walked(t):
            self.cacheable = False
        dt = ir_dtype_of(t.dtype)
        if dt is None:
            raise self.error(f"captured tensor of dtype {t.dtype} is not supported",
                             "capture float, integer or bool tensors")
        name = self.tensor_names.get(id(t), f"buf{len(self.tensors)}")
        filename, lineno, _ = self.where()
        spec = self.gb.add_buffer(name, dt, t.dim(), str(t.dtype).replace("torch.", ""), f"{filename}:{lineno}")
        self.tensors[id(t)] = (spec, t)
        return spec

    def index_arg(self, i: Any) -> Arg:
        """One index of a captured tensor: a traced integer or a Python int."""
        a = self.to_arg(i, "index")
        if self.gb.dtype_of(a).is_float:
            raise self.error("a captured tensor was indexed by a float",
                             "index with integers: .to(torch.int32) or // turn floats into ints",
                             cls=FlexcompTraceIndexError)
        return a

    def load(self, tensor: torch.Tensor, indices: list[Arg]) -> Proxy:
        """``tensor[indices]``, one IR index (from :meth:`index_arg`) per dim: the captured tensor
        becomes a buffer."""
        spec = self.capture_tensor(tensor)
        value = self.gb.load(spec, indices)
        if tensor.dtype in (torch.int8, torch.uint8, torch.int16) and not isinstance(value, Const):
            self.narrow[value] = tensor.dtype  # torch's arithmetic on it wraps at 8 or 16 bits
        return Proxy(self, value)

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
        if isinstance(x, VectorLike):
            raise self.error(f"a traced vector of shape {tuple(x.shape)} was used where one value is needed",
                             "reduce it (.sum(), .amax(), .any(), torch.dot) or index every dim of the tensor")
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
        wide = ("b", "h", "q_idx", "kv_idx") if self.wide else ()
        args = [Proxy(self, self.gb.cast(self.gb.inputs[n], DType.I64) if n in wide else self.gb.inputs[n])
                for n in self.kind.input_names]
        with _ValueReads() as reads:
            out, where = _call_noting_return(fn, args)
        if reads.seen:  # a tensor's value became a Python number in the trace (.item(), int(t)): not cacheable
            self.cacheable = False
        if out is None:
            raise self.error(f"the {self.kind.value} returned None", "return the score or the mask", where)
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            out = Proxy(self, self.to_arg(out))
        if isinstance(out, (VectorLike, torch.Tensor)):
            raise self.error(f"the {self.kind.value} returned a tensor of shape {tuple(out.shape)}, not one value "
                             f"per (b, h, q_idx, kv_idx)",
                             "index every dim of captured tensors by traced values (bias[h, q_idx]), or reduce "
                             "rows (.sum(), .any(), torch.dot)", where)
        if not isinstance(out, (Proxy, bool, int, float)):
            raise self.error(f"the {self.kind.value} returned a {type(out).__name__}",
                             "return a traced value", where)
        o = self.to_arg(out)
        t = self.gb.dtype_of(o)
        if self.kind is ModKind.MASK and t is not DType.BOOL:
            raise self.error(f"a mask_mod must return a bool, this one returns {t.value}",
                             "return a comparison such as q_idx >= kv_idx, combined with & | ~", where,
                             cls=FlexcompModOutputError)
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


class _ValueReads(torch.overrides.TorchFunctionMode):
    """While tracing: notices a real tensor's values read into Python (``t.item()``, ``int(t)``,
    ``t.tolist()``), which bakes them into the trace; such a trace is not cached, so an in-place
    update of the tensor is seen at the next call."""

    _READS = frozenset({"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "__array__",
                        "__complex__", "__format__", "__repr__", "__iter__", "equal", "allclose", "is_nonzero"})

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self._READS and any(type(a) is torch.Tensor for a in args[:2]):
            self.seen = True
        return func(*args, **(kwargs or {}))


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
        raise FlexcompModSignatureError(
            f"{kind.value} {name!r} at {filename}:{lineno} takes {len(positional)} positional arguments "
            f"({', '.join(p.name for p in positional)}); a {kind.value} takes {want}: "
            f"({', '.join(kind.input_names)}). Is it a {other} passed in the wrong place?",
            function=name, filename=filename, lineno=lineno)


def _int_ranges(g: Graph, buffers: tuple) -> dict[str, tuple[int, int]]:
    """Value ranges assumed for int32 captures when choosing integer widths (:func:`~flexcomp.ranges.needs_int64`):
    their current values, widened to at least +-INDEX_LIMIT so that index-like tables (document ids,
    offsets) can change in place without a new trace."""
    # a meta tensor holds no values: int32's range
    ints = [(b, t) for b, t in zip(g.buffers, buffers) if b.storage == "int32" and t.device.type != "meta"]
    return {b.name: (min(lo, -INDEX_LIMIT), max(hi, INDEX_LIMIT))
            for (b, _), (lo, hi) in zip(ints, value_ranges([t for _, t in ints]))}


def _ranges_relied_on(g: Graph, value_of: dict, int_ranges: dict) -> dict[str, tuple[int, int]]:
    """The int32 captures' ranges the int32 trace of ``g`` relies on: a capture with which no int32
    value can make the arithmetic wrap (it is only compared, say) is dropped, so a cached trace never
    re-reads its values (one device sync per new closure). A wide (int64) trace relies on none."""
    relied = dict(int_ranges)
    for name in list(relied):
        without = {k: v for k, v in relied.items() if k != name}
        if not needs_int64(g, value_of, without):
            relied = without
    return relied


def trace(fn: Callable, kind: ModKind) -> TracedMod:
    """Trace ``fn`` into a simplified, verified :class:`TracedMod`.

    >>> def causal(b, h, q_idx, kv_idx):
    ...     return q_idx >= kv_idx
    >>> print(trace(causal, ModKind.MASK).graph)
    graph mask_mod(b: i32, h: i32, q_idx: i32, kv_idx: i32):
      %0 = ge q_idx, kv_idx : bool
      return %0
    """
    if not callable(fn):
        raise FlexcompTraceError(f"{kind.value} must be callable, got {type(fn).__name__}")
    keep: list = []
    try:
        key = (kind, fingerprint(fn, keep=keep))
    except NoCache:
        key = None
    tensors = captured_tensors(keep)
    hit = lookup(key) if key is not None else None
    if hit is not None:
        graph, bufs, scalar_values = hit
        return TracedMod(graph, bufs, scalar_values, fn)
    skey = structural_key(key, tensors) if key is not None else None
    same = lookup_structure(skey, tensors) if skey is not None else None
    if same is not None:  # a closure of the same code over other tensors (a new packing): rebind, no trace
        graph, bufs, scalar_values, recipes, int_ranges = same
        remember(key, graph, recipes, tensors, scalar_values, keep, int_ranges)
        return TracedMod(graph, bufs, scalar_values, fn)
    _check_signature(fn, kind)
    baked: set[str] = set()
    wide = False
    for _ in range(32):
        tracer = Tracer(fn, kind, baked, wide)
        try:
            g, buffers, scalars = tracer.run()
        except _Concretize as c:
            baked |= c.names
            continue
        # simplification may leave captures unread; keep the values of those still read, by name
        tensor_of = {b.name: t for b, t in zip(g.buffers, buffers)}
        value_of = {c.name: v for c, v in zip(g.scalars, scalars)}
        # torch's int64 results where int32 could wrap: decided on the graph as written, before the
        # int32 ring rewrites of simplify (which are exact only while everything wraps alike); the mod
        # is then traced again with int64 indices, so its explicit casts and bool arithmetic get
        # torch's types exactly
        int_ranges = _int_ranges(g, buffers)
        if not wide and needs_int64(g, value_of, int_ranges):
            wide = True
            continue
        int_ranges = {} if wide else _ranges_relied_on(g, value_of, int_ranges)
        simple = verify(simplify(g))
        tm = TracedMod(simple, tuple(tensor_of[b.name] for b in simple.buffers),
                       tuple(value_of[c.name] for c in simple.scalars), fn)
        recipes = recipes_of(tm.buffers, tensors) if key is not None and tracer.cacheable else None
        if recipes is not None:
            remember(key, tm.graph, recipes, tensors, tm.scalars, keep, int_ranges)
            remember_structure(skey, tm.graph, recipes, tm.scalars, keep, int_ranges)
        return tm
    raise FlexcompTraceError(f"{kind.value} {tracer.name!r}: tracing did not settle")

