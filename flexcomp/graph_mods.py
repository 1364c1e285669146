"""Mods inside a ``torch.compile`` graph: a template (the mod's structure, read once) and its leaves
(the tensors and numbers it captures, fetched in the graph on every call).

flexcomp's tracer cannot run under Dynamo, and a custom op cannot take a Python function. So, when
Dynamo meets a flexcomp call, :func:`template_id` (run by Dynamo at trace time, on the real
function: ``torch._dynamo.assume_constant_result``) walks the mod once and keeps a
:class:`ModTemplate`: its functions (code, globals), ``functools.partial`` objects and tuples, down
to the leaves, each named by a path of :class:`Step`. The compiled code then fetches the leaves of
the mod it is given (:func:`fetch`, which Dynamo inlines): tensors become the op's tensor inputs,
ints and floats its number inputs, and every other leaf (a nested function, None, a string) is
compared with the template's, so Dynamo guards on it and recompiles when it changes. The op's
runtime rebuilds the mod from the template and the leaves (:meth:`ModTemplate.rebuild`) and runs
flexcomp as in eager mode (the trace cache makes that cheap).

What can be a template: functions defined outside the compiled region (closures too: a new closure
of the same code each step reuses the graph), ``functools.partial`` of such functions (also made
inside the compiled region), and what their cells, defaults and arguments hold: tensors, numbers,
None, strings, dtypes, other such functions, tuples of them. Globals are read live through the
function's module, as in eager mode. A closure made inside the compiled region hides its cells from
Dynamo: such calls run eagerly (one graph break), as does any mod holding another kind of object.

>>> import torch
>>> def bias_mod(score, b, h, q_idx, kv_idx, bias=torch.zeros(4)):
...     return score + bias[kv_idx]
>>> t = ModTemplate.of(bias_mod)
>>> [(leaf.kind.name, leaf.path) for leaf in t.leaves]
[('CODE', ()), ('TENSOR', ((<Step.DEFAULT: 'default'>, 0),))]
>>> t.rebuild([torch.ones(4)], [], []).__defaults__[0].tolist()
[1.0, 1.0, 1.0, 1.0]
"""
from __future__ import annotations

import enum
import functools
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import FlexcompError


class Step(enum.Enum):
    """One step from a mod down to a leaf."""

    CELL = "cell"  # fn.__closure__[i].cell_contents
    DEFAULT = "default"  # fn.__defaults__[i]
    FUNC = "func"  # partial.func
    ARG = "arg"  # partial.args[i]
    KEYWORD = "keyword"  # partial.keywords[name]
    ITEM = "item"  # a_tuple[i]


class LeafKind(enum.Enum):
    """What a leaf is, and so how the compiled code passes it on."""

    TENSOR = "tensor"  # an input of the op
    INT = "int"  # an int input of the op (bools too)
    BOOL = "bool"
    FLOAT = "float"
    SAME = "same"  # a constant compared with the template's (Dynamo guards on it)
    CODE = "code"  # a function: its code compared with the template's; its cells are leaves of their own


@dataclass(frozen=True)
class Leaf:
    """A leaf of a template: where it is (``path``), what it is, and for SAME / CODE leaves the
    template's value (``value``: the constant, or the function's code)."""

    path: tuple
    kind: LeafKind
    value: Any = field(default=None, compare=False)


class NotGraphable(Exception):
    """A mod holds something a template cannot name (an object, a dict, an empty cell); the call runs
    eagerly."""


_MAX_DEPTH = 12
_CONSTANTS = (str, bytes, torch.dtype, torch.device, type(None))


@dataclass(frozen=True)
class ModTemplate:
    """A mod's structure, kept once per compiled call site: the function Dynamo saw (``proto``, its
    captured tensors replaced by None) and its ``leaves`` in a fixed order."""

    proto: Callable
    leaves: tuple[Leaf, ...]

    @staticmethod
    def of(fn: Callable) -> "ModTemplate":
        """The template of ``fn`` (raises :class:`NotGraphable`)."""
        leaves: list[Leaf] = []
        _walk(fn, (), leaves, 0)
        # the template keeps the structure, not the tensors (it lives as long as the process)
        holes = {leaf.path: None for leaf in leaves if leaf.kind is LeafKind.TENSOR}
        return ModTemplate(_rebuilt(fn, (), holes) if holes else fn, tuple(leaves))

    def counts(self) -> tuple[int, int, int]:
        """How many tensor, int (and bool) and float leaves the op receives."""
        kinds = [leaf.kind for leaf in self.leaves]
        return (kinds.count(LeafKind.TENSOR), kinds.count(LeafKind.INT) + kinds.count(LeafKind.BOOL),
                kinds.count(LeafKind.FLOAT))

    def paths(self) -> tuple:
        """``(kind name, path, value)`` per leaf: plain constants that Dynamo can hold in the graph's code."""
        return tuple((leaf.kind.value, tuple((s.value, a) for s, a in leaf.path), leaf.value) for leaf in self.leaves)

    def rebuild(self, tensors, ints, floats) -> Callable:
        """The mod with this template's structure and these leaf values (in :meth:`counts`' order)."""
        values: dict[tuple, Any] = {}
        its = {LeafKind.TENSOR: iter(tensors), LeafKind.INT: iter(ints), LeafKind.FLOAT: iter(floats)}
        for leaf in self.leaves:
            if leaf.kind is LeafKind.BOOL:
                values[leaf.path] = bool(next(its[LeafKind.INT]))
            elif leaf.kind in its:
                values[leaf.path] = next(its[leaf.kind])
        return _rebuilt(self.proto, (), values)


# what a partial made inside the compiled region holds, as Dynamo can pass it to a trace-time
# function (:func:`shadow`): its tensors and numbers replaced by these markers
_MARKERS = {f"\x00flexcomp-leaf:{kind.value}": kind for kind in (LeafKind.TENSOR, LeafKind.INT, LeafKind.BOOL,
                                                                  LeafKind.FLOAT)}


def _walk(value: Any, path: tuple, out: list, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise NotGraphable("a mod nested too deep")
    if isinstance(value, str) and value in _MARKERS:
        out.append(Leaf(path, _MARKERS[value]))
    elif isinstance(value, torch.Tensor):
        out.append(Leaf(path, LeafKind.TENSOR))
    elif isinstance(value, bool):
        out.append(Leaf(path, LeafKind.BOOL))
    elif isinstance(value, int):
        out.append(Leaf(path, LeafKind.INT))
    elif isinstance(value, float):
        out.append(Leaf(path, LeafKind.FLOAT))
    elif isinstance(value, _CONSTANTS):
        out.append(Leaf(path, LeafKind.SAME, value))
    elif isinstance(value, types.FunctionType):
        if value.__kwdefaults__:
            raise NotGraphable(f"{value.__qualname__} has keyword-only defaults")
        out.append(Leaf(path, LeafKind.CODE, value.__code__))
        for i, cell in enumerate(value.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:
                raise NotGraphable(f"{value.__qualname__} has an empty closure cell") from None
            _walk(contents, path + ((Step.CELL, i),), out, depth + 1)
        for i, d in enumerate(value.__defaults__ or ()):
            _walk(d, path + ((Step.DEFAULT, i),), out, depth + 1)
    elif isinstance(value, functools.partial):
        _walk(value.func, path + ((Step.FUNC, None),), out, depth + 1)
        for i, a in enumerate(value.args):
            _walk(a, path + ((Step.ARG, i),), out, depth + 1)
        for name in sorted(value.keywords):
            _walk(value.keywords[name], path + ((Step.KEYWORD, name),), out, depth + 1)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            _walk(item, path + ((Step.ITEM, i),), out, depth + 1)
    elif isinstance(value, (types.BuiltinFunctionType, type)):
        out.append(Leaf(path, LeafKind.SAME, value))
    else:
        raise NotGraphable(f"a mod holds a {type(value).__name__}")


def _rebuilt(value: Any, path: tuple, values: dict) -> Any:
    if path in values:
        return values[path]
    if isinstance(value, types.FunctionType):
        if not value.__closure__ and not value.__defaults__:
            return value  # nothing to put in: the very function (``noop_mask`` stays ``noop_mask``)
        cells = tuple(types.CellType(_rebuilt(c.cell_contents, path + ((Step.CELL, i),), values))
                      for i, c in enumerate(value.__closure__ or ()))
        defaults = tuple(_rebuilt(d, path + ((Step.DEFAULT, i),), values)
                         for i, d in enumerate(value.__defaults__ or ()))
        fn = types.FunctionType(value.__code__, value.__globals__, value.__name__, defaults or None, cells or None)
        fn.__qualname__, fn.__module__ = value.__qualname__, value.__module__
        return fn
    if isinstance(value, functools.partial):
        return functools.partial(_rebuilt(value.func, path + ((Step.FUNC, None),), values),
                                 *(_rebuilt(a, path + ((Step.ARG, i),), values) for i, a in enumerate(value.args)),
                                 **{k: _rebuilt(v, path + ((Step.KEYWORD, k),), values)
                                    for k, v in value.keywords.items()})
    if isinstance(value, tuple):
        return tuple(_rebuilt(x, path + ((Step.ITEM, i),), values) for i, x in enumerate(value))
    return value


# ---- the registry: templates by number (the number is a constant in the compiled graph) ----------
_TEMPLATES: list = []
_LOCK = threading.Lock()


def register(entry: Any) -> int:
    """Keep ``entry`` for the life of the process; its number goes into compiled graphs."""
    with _LOCK:
        _TEMPLATES.append(entry)
        return len(_TEMPLATES) - 1


def registered(number: int) -> Any:
    return _TEMPLATES[number]


# ---- in the compiled graph (Dynamo inlines these) ------------------------------------------------
def reaches_cells(fn: Any) -> bool:
    """Whether Dynamo lets the compiled code read ``fn``'s cells: False for a closure made inside
    the compiled region (Dynamo raises AttributeError for its ``__closure__``)."""
    if fn is None:
        return True
    if isinstance(fn, functools.partial):
        return reaches_cells(fn.func)
    try:
        fn.__closure__
    except AttributeError:
        return False
    return True


def _marker(value: Any) -> Any:
    kind = (LeafKind.TENSOR if isinstance(value, torch.Tensor) else LeafKind.BOOL if isinstance(value, bool)
            else LeafKind.INT if isinstance(value, int) else LeafKind.FLOAT if isinstance(value, float) else None)
    if kind is None:
        return value
    return f"\x00flexcomp-leaf:{kind.value}"


def shadow(fn: Any) -> Any:
    """What Dynamo can hand to a trace-time function for ``fn``: ``fn`` itself, or for a
    ``functools.partial`` (which may hold tensors made in the graph) the same partial with its tensor
    and number arguments replaced by markers (its leaves are fetched from ``fn`` itself)."""
    if isinstance(fn, functools.partial):
        return functools.partial(shadow(fn.func), *[_marker(a) for a in fn.args],
                                 **{k: _marker(v) for k, v in fn.keywords.items()})
    return fn


def fetch(fn: Any, paths: tuple, where: str) -> tuple[list, list, list]:
    """The leaves of ``fn`` along a template's ``paths`` (:meth:`ModTemplate.paths`): its tensors,
    ints and floats; constants and codes are compared with the template's, so that Dynamo guards
    on them (a mismatch here means Dynamo did not, and is an error rather than a stale graph)."""
    tensors, ints, floats = [], [], []
    for kind, path, expected in paths:
        v = fn
        for step, arg in path:
            if step == "cell":
                v = v.__closure__[arg].cell_contents
            elif step == "default":
                v = v.__defaults__[arg]
            elif step == "func":
                v = v.func
            elif step == "arg":
                v = v.args[arg]
            elif step == "keyword":
                v = v.keywords[arg]
            else:
                v = v[arg]
        if kind == "tensor":
            tensors.append(v)
        elif kind == "int" or kind == "bool":
            ints.append(int(v))
        elif kind == "float":
            floats.append(float(v))
        elif kind == "code":
            if v.__code__ is not expected:
                raise FlexcompError(f"{where}: the mod's structure changed under torch.compile ({path}); "
                                    f"this is a flexcomp bug")
        elif v is not expected and v != expected:
            raise FlexcompError(f"{where}: a constant of the mod changed under torch.compile ({path}); "
                                f"this is a flexcomp bug")
    return tensors, ints, floats


def template_or_none(fn: Optional[Callable]) -> Optional[ModTemplate]:
    """:meth:`ModTemplate.of`, or None where ``fn`` is None or cannot be a template."""
    if fn is None:
        return None
    try:
        return ModTemplate.of(fn)
    except NotGraphable:
        return None
