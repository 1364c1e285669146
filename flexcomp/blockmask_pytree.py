"""BlockMask as pytree leaves and context, as torch's ``BlockMask._flatten`` / ``_unflatten`` make them.

The tensors a mask_mod's closure (or ``functools.partial``) holds are lifted out into the leaves, and
the function's skeleton (code, globals, defaults, where each leaf goes) stays in the context inside
a :class:`MaskModWrapper` that compares by value, so the same closure recreated each step gives an
equal context. Ported from torch 2.13's ``torch.nn.attention.flex_attention`` (private helpers that
older torch versions lack).

>>> import torch
>>> t = torch.arange(4)
>>> def outer(table):
...     def mask(b, h, q_idx, kv_idx):
...         return table[q_idx] >= kv_idx
...     return mask
>>> leaves, spec, stripped = extract_callable_pytree(outer(t))
>>> leaves[0] is t, reconstruct_closure_fn(stripped, leaves, spec)(0, 0, 2, 1).item()
(True, True)
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any, Callable, Union

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

EMPTY_CLOSURE_SPEC = tree_flatten(())[1]


class _ExtractedLeaf:
    """Marks a closure position filled from the extracted leaves when the function is rebuilt."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "_EXTRACTED_LEAF"


EXTRACTED_LEAF = _ExtractedLeaf()


class CallableLeaf(typing.NamedTuple):
    """A nested callable among the closure's leaves, and how many extracted leaves it took."""

    stripped: Any
    callable_spec: TreeSpec
    n_extracted: int

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CallableLeaf) and _entry_eq(self.stripped, other.stripped)
                and self.callable_spec == other.callable_spec and self.n_extracted == other.n_extracted)

    def __hash__(self) -> int:
        return hash((_entry_hash(self.stripped), self.callable_spec, self.n_extracted))


class StrippedClosure(typing.NamedTuple):
    """A closure without its cell contents: enough to rebuild it from the extracted leaves."""

    code: types.CodeType
    globals_dict: dict
    name: str
    qualname: str
    defaults: Any
    kwdefaults: Any
    extra_dict: dict
    leaf_entries: tuple

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrippedClosure) and self.code == other.code and self.leaf_entries == other.leaf_entries

    def __hash__(self) -> int:
        return hash((self.code, self.leaf_entries))


class StrippedPartial(typing.NamedTuple):
    """A ``functools.partial`` without its arguments' leaves."""

    leaf_entries: tuple

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrippedPartial) and self.leaf_entries == other.leaf_entries

    def __hash__(self) -> int:
        return hash(self.leaf_entries)


class PlainFunction(typing.NamedTuple):
    """A function without closure, compared by its code."""

    fn: Callable

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlainFunction) and self.fn.__code__ == other.fn.__code__

    def __hash__(self) -> int:
        return hash(self.fn.__code__)


_STRIPPED = (StrippedClosure, StrippedPartial, PlainFunction)


def _entry_eq(lhs, rhs) -> bool:
    if inspect.isfunction(lhs) and inspect.isfunction(rhs):
        return lhs.__code__ == rhs.__code__
    return lhs == rhs


def _entry_hash(value) -> int:
    return hash(value.__code__) if inspect.isfunction(value) else hash(value)


def _extract_leaves(leaves: list, seen: set) -> tuple[tuple, tuple]:
    extracted: list = []
    entries: list = []
    for leaf in leaves:
        if inspect.isfunction(leaf) or isinstance(leaf, functools.partial):
            child, child_spec, child_stripped = extract_callable_pytree(leaf, seen)
            extracted.extend(child)
            entries.append(CallableLeaf(child_stripped, child_spec, len(child)))
        else:
            extracted.append(leaf)
            entries.append(EXTRACTED_LEAF)
    return tuple(extracted), tuple(entries)


def extract_callable_pytree(fn, _seen: Union[set, None] = None) -> tuple[tuple, TreeSpec, Any]:
    """``(leaves, callable_spec, stripped)``: what ``fn``'s closure or partial holds, flattened, and its skeleton.

    Anything but a plain function or a partial (and everything while torch.compile traces) is
    returned unchanged with no leaves; a function without closure comes back as :class:`PlainFunction`.
    """
    if torch.compiler.is_compiling() or not (inspect.isfunction(fn) or isinstance(fn, functools.partial)):
        return (), EMPTY_CLOSURE_SPEC, fn
    seen = set() if _seen is None else _seen
    if id(fn) in seen:
        return (), EMPTY_CLOSURE_SPEC, fn
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        leaves, spec = tree_flatten((fn.func, fn.args, fn.keywords))
        extracted, entries = _extract_leaves(leaves, seen)
        return extracted, spec, StrippedPartial(entries)
    if not fn.__closure__:
        return (), EMPTY_CLOSURE_SPEC, PlainFunction(fn)
    try:
        contents = tuple(cell.cell_contents for cell in fn.__closure__)
    except ValueError:  # an empty cell
        return (), EMPTY_CLOSURE_SPEC, PlainFunction(fn)
    leaves, spec = tree_flatten(contents)
    extracted, entries = _extract_leaves(leaves, seen)
    stripped = StrippedClosure(fn.__code__, fn.__globals__, fn.__name__, fn.__qualname__, fn.__defaults__,
                               fn.__kwdefaults__, dict(fn.__dict__) if fn.__dict__ else {}, entries)
    return extracted, spec, stripped


def reconstruct_closure_fn(stripped, leaves, callable_spec):
    """Rebuild the callable that :func:`extract_callable_pytree` stripped, from (possibly new) leaves."""
    if isinstance(stripped, PlainFunction):
        return stripped.fn
    if not isinstance(stripped, (StrippedClosure, StrippedPartial)):
        return stripped
    values: list = []
    i = 0
    for entry in stripped.leaf_entries:
        if isinstance(entry, CallableLeaf):
            values.append(reconstruct_closure_fn(entry.stripped, leaves[i:i + entry.n_extracted], entry.callable_spec))
            i += entry.n_extracted
        else:
            values.append(leaves[i])
            i += 1
    if isinstance(stripped, StrippedPartial):
        fn, args, keywords = tree_unflatten(values, callable_spec)
        return functools.partial(fn, *args, **keywords)
    cells = tuple(types.CellType(v) for v in tree_unflatten(values, callable_spec))
    restored = types.FunctionType(stripped.code, stripped.globals_dict, stripped.name, stripped.defaults, cells)
    restored.__qualname__ = stripped.qualname
    if stripped.kwdefaults:
        restored.__kwdefaults__ = stripped.kwdefaults
    if stripped.extra_dict:
        restored.__dict__.update(stripped.extra_dict)
    return restored


class MaskModWrapper:
    """A mask_mod (or its stripped skeleton) in a pytree context, with equality by value."""

    __slots__ = ("fn", "callable_spec")

    def __init__(self, fn, callable_spec=None) -> None:
        self.fn = fn
        self.callable_spec = callable_spec

    def __call__(self, b, h, q_idx, kv_idx):
        if isinstance(self.fn, _STRIPPED):
            raise RuntimeError("_MaskModWrapper with stripped callable is not callable — "
                               "use _reconstruct_closure_fn to rebuild the function first")
        return self.fn(b, h, q_idx, kv_idx)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskModWrapper):
            return False
        if self.fn is other.fn and self.callable_spec is other.callable_spec:
            return True
        mine, theirs = isinstance(self.fn, _STRIPPED), isinstance(other.fn, _STRIPPED)
        if mine and theirs:
            return self.fn == other.fn and self.callable_spec == other.callable_spec
        if inspect.isfunction(self.fn) and inspect.isfunction(other.fn):
            return self.fn.__code__ == other.fn.__code__
        if not mine and not theirs:
            return self.fn == other.fn
        return False

    def __hash__(self) -> int:
        if isinstance(self.fn, _STRIPPED):
            return hash((self.fn, self.callable_spec))
        if inspect.isfunction(self.fn):
            return hash(self.fn.__code__)
        return hash(self.fn)

    def __repr__(self) -> str:
        return f"_MaskModWrapper({self.fn})"
