"""The trace cache: a mod is traced again only when something its trace baked in changed.

:func:`fingerprint` keys a mod by everything a trace bakes in (see its docstring); traces are kept
in :data:`flexcomp.cache.CACHE` under ``("trace", key)``, owned by the captured tensors (the entry
dies with any of them). :mod:`flexcomp.trace` looks traces up here before tracing.
"""
from __future__ import annotations

import functools
import types
import weakref
from typing import Any

import torch

from .cache import CACHE
from .ir import Graph

# A mod is traced again only when what it captures changed. The fingerprint of a function is its
# code and everything its closure cells and referenced globals hold: numbers by value, tensors by
# identity (their values are read at run time, so in-place updates need no retrace), functions
# recursively. A function that captures anything else (an object whose attributes it may read,
# a dict) is not cached and is traced on every call.
# The captured tensors own their entry (flexcomp.cache): the cache never keeps a tensor (or a bias
# that a training loop replaces every step) alive, and the entry dies with any of them, so a
# tensor id in a key always names the very tensor the key saw.
_NAMESPACE = "trace"
_MAX_DEPTH = 12  # how deep fingerprint follows closures, globals and containers before giving up


def _recipe(t: torch.Tensor, tensors: list) -> tuple | None:
    """How a buffer of a trace is found again among a closure's captured ``tensors``: ``(i, None)``
    for ``tensors[i]`` itself, ``(i, view)`` for a view the mod took of it while tracing (``offset[0]``,
    ``table[1:]``: same storage, read at run time), None for a tensor from anywhere else."""
    for i, c in enumerate(tensors):
        if c is t:
            return i, None
    storage = t.untyped_storage().data_ptr()
    for i, c in enumerate(tensors):
        if c.device == t.device and c.dtype == t.dtype and c.untyped_storage().data_ptr() == storage:
            return i, (tuple(t.shape), tuple(t.stride()), t.storage_offset() - c.storage_offset(), tuple(c.stride()))
    return None


def _rebuild(recipe: tuple, tensors: tuple) -> torch.Tensor | None:
    """The buffer a :func:`_recipe` names, over ``tensors`` (None if a view's base changed strides)."""
    i, view = recipe
    c = tensors[i]
    if view is None:
        return c
    size, stride, delta, base_stride = view
    if tuple(c.stride()) != base_stride:
        return None
    return c.as_strided(size, stride, c.storage_offset() + delta)


def recipes_of(buffers: tuple, tensors: list) -> tuple | None:
    """Each buffer's :func:`_recipe`, or None if one is neither a captured tensor nor a view of one."""
    out = tuple(_recipe(t, tensors) for t in buffers)
    return None if any(r is None for r in out) else out


def remember(key: tuple, graph: Graph, recipes: tuple, tensors: list, scalars: tuple, keep: list,
             int_ranges: dict) -> None:
    """Keep a trace under ``key`` (a :func:`fingerprint`); ``keep`` holds what the key names by id;
    ``recipes`` (:func:`recipes_of`) find the graph's buffers among the captured ``tensors``.

    The integer width was proven for ``int_ranges`` (value ranges of int32 captures, by buffer
    name): re-checked when a capture's version counter moves (an in-place update), and the entry
    dropped if they no longer hold."""
    guards = [[j, *int_ranges[b.name], tensors[recipes[j][0]]._version]
              for j, b in enumerate(graph.buffers) if b.name in int_ranges]
    entry = (graph, recipes, tuple(weakref.ref(t) for t in tensors), scalars, tuple(keep), guards)
    CACHE.put((_NAMESPACE, key), entry, owners=tuple(tensors))


def lookup(key: tuple) -> tuple | None:
    """``(graph, buffers, scalars)`` kept under ``key``, or None (never kept, a captured tensor
    gone, or an int32 capture outside the range its trace was proven for)."""
    entry = CACHE.get((_NAMESPACE, key))
    if entry is None:
        return None
    graph, recipes, refs, scalars, _, guards = entry
    tensors = tuple(r() for r in refs)
    if any(t is None for t in tensors):  # dying: its finalizer has not dropped it yet
        CACHE.discard((_NAMESPACE, key))
        return None
    buffers = tuple(_rebuild(r, tensors) for r in recipes)
    if any(b is None for b in buffers):
        return None
    for guard in guards:
        j, lo, hi, version = guard
        t = buffers[j]
        base = tensors[recipes[j][0]]
        if base._version != version:
            now = value_range(t)
            if now[0] < lo or now[1] > hi:
                CACHE.discard((_NAMESPACE, key))
                return None
            guard[3] = base._version
    return graph, buffers, scalars


def captured_tensors(keep: list) -> list:
    """Take the tensors out of a :func:`fingerprint`'s ``keep`` (in place) and return them, in the
    order the key names them."""
    tensors = [k for k in keep if isinstance(k, torch.Tensor)]
    keep[:] = [k for k in keep if not isinstance(k, torch.Tensor)]
    return tensors


def structural_key(key: tuple, tensors: list) -> tuple:
    """``key`` with each tensor's id replaced by its first place among ``tensors``: equal for two
    closures of the same code that capture different tensors of the same shapes and dtypes, in the
    same pattern of sharing (a tensor captured twice stays one)."""
    first: dict[int, int] = {}
    for i, t in enumerate(tensors):
        first.setdefault(id(t), i)

    def walk(k):
        if type(k) is tuple:
            if len(k) == 4 and k[0] == "tensor" and type(k[1]) is int:
                return ("tensor", first[k[1]], k[2], k[3])
            return tuple(walk(x) for x in k)
        return k

    return walk(key)


def remember_structure(skey: tuple, graph: Graph, recipes: tuple, scalars: tuple, keep: list,
                       int_ranges: dict) -> None:
    """Keep a trace for closures of the same structure (:func:`structural_key`); its buffers are
    found again by ``recipes`` (captured tensors or views of them, never a tensor the mod computed
    while tracing: its values would be stale), and the trace read no value into Python (the caller
    checks). What is kept names places among the captured tensors, never the tensors."""
    ranges = tuple(int_ranges.get(b.name) for b in graph.buffers)
    CACHE.put((_NAMESPACE, "structure", skey), (graph, recipes, scalars, tuple(keep), ranges))


def lookup_structure(skey: tuple, tensors: list) -> tuple | None:
    """``(graph, buffers, scalars, recipes, int_ranges)`` of a trace kept by :func:`remember_structure`,
    its buffers now found among this closure's ``tensors``; None if none is kept, or if an int32
    capture's values leave the range its trace's integer widths were proven for (one read of its min
    and max)."""
    entry = CACHE.get((_NAMESPACE, "structure", skey))
    if entry is None:
        return None
    graph, recipes, scalars, _, ranges = entry
    buffers = tuple(_rebuild(r, tensors) for r in recipes)
    if any(b is None for b in buffers):
        return None
    checked = [(b, t, r) for b, t, r in zip(graph.buffers, buffers, ranges) if r is not None]
    for (_, _, r), now in zip(checked, value_ranges([t for _, t, _ in checked])):
        if now[0] < r[0] or now[1] > r[1]:
            return None
    return graph, buffers, scalars, recipes, {b.name: r for b, _, r in checked}


def value_range(t: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of an integer tensor's values (``(0, 0)`` when empty)."""
    return value_ranges([t])[0]


def value_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(min, max)`` of each integer tensor's values (``(0, 0)`` when empty): one read per device."""
    out = [(0, 0)] * len(tensors)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():
            by_device.setdefault(t.device, []).append(i)
    with torch.no_grad():
        for places in by_device.values():
            ext = torch.stack([m for i in places for m in torch.aminmax(tensors[i])]).tolist()
            for k, i in enumerate(places):
                out[i] = int(ext[2 * k]), int(ext[2 * k + 1])
    return out


class NoCache(Exception):
    """What a mod reads cannot be fingerprinted: it is traced on every call."""


def _code_names(code: types.CodeType) -> list[str]:
    """Names a function's code may look up: its global and attribute names, and identifier-like
    string constants (``getattr(cfg, "window")``, ``globals()["W"]``), nested functions' too."""
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names += _code_names(c)
        elif isinstance(c, str) and c.isidentifier():
            names.append(c)
    return names


# Modules whose attributes a mod reads are library code that does not change between calls.
_LIBRARY_MODULES = ("torch", "numpy", "math", "operator", "functools", "builtins", "typing", "flexcomp",
                    "triton", "sympy", "cmath", "numbers", "transformers")


def _is_library(module_name: str | None) -> bool:
    return bool(module_name) and module_name.split(".")[0] in _LIBRARY_MODULES


def fingerprint(value: Any, depth: int = 0, keep: list | None = None, names: frozenset = frozenset()) -> tuple:
    """What a trace of ``value`` depends on, as a hashable key (raises NoCache if unknowable).

    Everything a trace bakes in is here: a function's code, closure cells, referenced globals,
    positional and keyword-only defaults; for a user module or class the mod reads (``cfg.WINDOW``,
    ``Config.scale``), the attributes it may read (every name its code uses that the module or class
    has); numbers, strings and containers by value; tensors by identity (values are read at run time).
    ``names`` are the attribute names the reading code uses.

    Objects named by id (code, modules, types) are appended to ``keep``: a cache entry holds them
    so that their ids cannot be reused while the entry exists. Tensors are named by id too and
    appended to ``keep`` in the order the key names them; :func:`captured_tensors` takes them out
    (entries hold them weakly: they own their entry).
    """
    keep = [] if keep is None else keep
    if depth > _MAX_DEPTH:
        raise NoCache
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return (type(value), value)
    if isinstance(value, float):
        return (float, repr(value))  # repr keeps -0.0 and nan apart
    if isinstance(value, torch.Tensor):
        keep.append(value)  # the caller takes tensors out of keep (captured_tensors): entries never hold them
        return ("tensor", id(value), tuple(value.shape), value.dtype)  # a resize or a new dtype: a new trace
    if isinstance(value, (torch.dtype, torch.device)):
        return ("torch", str(value))
    if isinstance(value, types.FunctionType):
        if _is_library(getattr(value, "__module__", None)) and not value.__closure__ and not value.__kwdefaults__:
            keep.append(value)  # library code reads only library globals: its identity says it all
            return ("const", id(value))
        code = value.__code__  # user code, or a library closure (a mask factory's, HF's and_masks'): its cells
        keep.append(code)
        used = frozenset(_code_names(code))
        cells = tuple(fingerprint(c.cell_contents, depth + 1, keep, used) if _filled(c) else ("empty",)
                      for c in (value.__closure__ or ()))
        glob = tuple((n, fingerprint(value.__globals__[n], depth + 1, keep, used))
                     for n in sorted(used) if n in value.__globals__)
        kwdefaults = tuple(sorted((k, fingerprint(v, depth + 1, keep, used))
                                  for k, v in (value.__kwdefaults__ or {}).items()))
        return ("fn", id(code), cells, glob, fingerprint(value.__defaults__, depth + 1, keep, used), kwdefaults)
    if isinstance(value, types.MethodType):
        if not isinstance(value.__self__, type):
            raise NoCache  # an object's method reads its attributes: traced on every call
        # a classmethod bound to its class: the function, and the class attributes it may read
        used = frozenset(_code_names(value.__func__.__code__)) if hasattr(value.__func__, "__code__") else names
        return ("classmethod", fingerprint(value.__func__, depth + 1, keep), fingerprint(value.__self__, depth + 1,
                                                                                          keep, used))
    if isinstance(value, functools.partial):
        return ("partial", fingerprint(value.func, depth + 1, keep), fingerprint(value.args, depth + 1, keep),
                fingerprint(tuple(sorted(value.keywords.items())), depth + 1, keep))
    if isinstance(value, (staticmethod, classmethod)):
        return ("method", fingerprint(value.__func__, depth + 1, keep, names))
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(fingerprint(v, depth + 1, keep, names) for v in items))
    if isinstance(value, dict):
        return ("dict", tuple((fingerprint(k, depth + 1, keep), fingerprint(v, depth + 1, keep, names))
                              for k, v in value.items()))
    if isinstance(value, types.ModuleType):
        keep.append(value)
        if _is_library(value.__name__):
            return ("module", id(value))
        attrs = vars(value)
        return ("module", id(value), tuple((n, fingerprint(attrs[n], depth + 1, keep, names))
                                           for n in sorted(names) if n in attrs))
    if isinstance(value, type):
        keep.append(value)
        if _is_library(value.__module__):
            return ("type", id(value))
        read = []
        for n in sorted(names):
            for klass in value.__mro__:
                if n in vars(klass) and klass is not object:
                    read.append((n, fingerprint(vars(klass)[n], depth + 1, keep, names)))
                    break
        return ("type", id(value), tuple(read))
    if isinstance(value, (types.BuiltinFunctionType, types.MethodWrapperType)) or (
            callable(value) and _is_library(type(value).__module__) and not isinstance(value, torch.nn.Module)):
        keep.append(value)
        return ("const", id(value))
    raise NoCache


def _filled(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True
