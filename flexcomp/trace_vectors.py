"""Tracing vector-valued intermediates: partly indexed captured tensors and the small vectors they make.

torch runs mods under ``vmap``, so ``bias[b][q_idx]`` (chained indexing), ``emb[q_idx]`` (a row of a
captured tensor) and ``(emb[q_idx] * emb[kv_idx]).sum()`` (a rotary-style dot product) are all
legal. The IR's values are scalars per ``(b, h, q_idx, kv_idx)``; vectors live only while tracing:

- a :class:`View` is a captured tensor with some dims indexed by traced values and the others
  sliced (``bias[b]``, ``table[b, h]``, ``emb[q_idx, :8]``); indexing it further composes the
  indices, so ``bias[b][q_idx]`` is the single load ``load bias[b, q_idx]``;
- used in arithmetic, a view becomes a :class:`Vector`: one load per element (constant indices in
  the sliced dims), and elementwise ops and reductions act element by element, so the IR holds the
  unrolled scalar computation (a dot product of two 64-wide rows is 128 loads, 64 products and a sum).

Every later stage (interval analysis, reference, Triton code, derivatives) sees ordinary scalar
nodes. Vectors are capped at :data:`MAX_ELEMENTS` elements; a mod must return a scalar.
"""
from __future__ import annotations

import enum
import itertools
import math
from typing import Any, Callable, Sequence

import torch

from .builder import const
from .ir import Arg, Const, DType, Op
from .proxy import HOOKS, Proxy, torch_dtype_of

MAX_ELEMENTS = 1024  # elements of one traced vector (each becomes IR nodes)

Fix = "index every dim of the captured tensor, or reduce the row to one value (.sum(), .amax(), torch.dot)"


class VectorLike:
    """Shared by :class:`View` and :class:`Vector`: shape queries and Python operators."""

    tracer: Any

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape())

    def _shape(self) -> tuple[int, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self._shape())

    @property
    def ndim(self) -> int:
        return self.dim()

    def numel(self) -> int:
        return math.prod(self._shape())

    def __len__(self) -> int:
        return self._shape()[0]

    def __iter__(self):
        v = as_vector(self.tracer, self)
        for i in range(v.shape[0]):
            yield v.index((i,))

    def __bool__(self):
        raise self.tracer.error("a traced vector was used where Python needs True or False",
                                "use torch.where(cond, a, b), and reduce vectors with .any() / .all()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self._shape())})"

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return HOOKS.dispatch(func, args, kwargs or {})

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return HOOKS.method(self, name)

    def __getitem__(self, index):
        return HOOKS.getitem(self.tracer, self, index)

    def __array_ufunc__(self, ufunc, how, *inputs, **kwargs):
        return HOOKS.array_ufunc(self, ufunc, how, inputs, kwargs)


class View(VectorLike):
    """``tensor`` indexed in some dims. ``dims[d]`` is the IR index of dim ``d`` (an :data:`Arg`)
    or, for a sliced dim, the ``range`` of indices it keeps; ``order`` lists the sliced dims in the
    view's own order (a transposed view reorders them)."""

    def __init__(self, tracer, tensor: torch.Tensor, dims: tuple, order: tuple | None = None):
        self.tracer = tracer
        self.tensor = tensor
        self.dims = dims
        self.order = tuple(i for i, d in enumerate(dims) if isinstance(d, range)) if order is None else order

    def _shape(self) -> tuple[int, ...]:
        return tuple(len(self.dims[i]) for i in self.order)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def permuted(self, order: Sequence[int]) -> "View":
        """The same view with its dims reordered (``.T``, ``.transpose``): still indexable by traced values."""
        return View(self.tracer, self.tensor, self.dims, tuple(self.order[d] for d in order))

    def index(self, idx: tuple):
        """Fill the view's dims in order with ``idx`` (traced values, ints, slices, ``...``)."""
        t = self.tracer
        idx = expand_ellipsis(t, idx, len(self.order))
        if len(idx) > len(self.order):
            from .errors import FlexcompTraceIndexError

            given = len(self.dims) - len(self.order) + len(idx)
            raise t.error(f"a captured tensor of shape {tuple(self.tensor.shape)} was indexed with {given} indices",
                          f"give at most {self.tensor.dim()} indices, one per dim", cls=FlexcompTraceIndexError)
        dims = list(self.dims)
        order = list(self.order)
        for pos, i in zip(self.order, idx):
            r = dims[pos]
            if isinstance(i, slice):
                check_slice(t, i)
                dims[pos] = r[i]
                continue
            order.remove(pos)
            if isinstance(i, int) and not isinstance(i, bool):
                if not -len(r) <= i < len(r):
                    raise t.index_error(f"index {i} is out of range for a dim of size {len(r)}")
                dims[pos] = const(r[i])
            else:
                if r != range(self.tensor.shape[pos]):
                    raise t.error("a traced index into a sliced part of a captured tensor",
                                  "index the captured tensor itself: t[..., start + i]")
                dims[pos] = t.index_arg(i)
        view = View(t, self.tensor, tuple(dims), tuple(order))
        return view.load() if not order else view

    def load(self):
        """The scalar this fully indexed view reads."""
        return self.tracer.load(self.tensor, list(self.dims))

    def elements(self) -> "Vector":
        """One load per element, in the view's row-major order."""
        t = self.tracer
        shape = self._shape()
        check_size(t, shape)
        elems = []
        for combo in itertools.product(*[self.dims[i] for i in self.order]):
            dims = list(self.dims)
            for pos, c in zip(self.order, combo):
                dims[pos] = const(c)
            elems.append(t.load(self.tensor, dims).arg)
        return Vector(t, shape, elems)


class Vector(VectorLike):
    """A traced vector: ``elems`` are IR values, row-major, of one IR type."""

    def __init__(self, tracer, shape: tuple[int, ...], elems: list[Arg]):
        self.tracer = tracer
        self.shape_ = tuple(shape)
        self.elems = list(elems)

    def _shape(self) -> tuple[int, ...]:
        return self.shape_

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype_of(self.tracer.gb.dtype_of(self.elems[0]) if self.elems else DType.F32)

    def index(self, idx: tuple):
        """Constant indexing (ints and slices) of a computed vector."""
        t = self.tracer
        idx = expand_ellipsis(t, idx, len(self.shape_))
        if len(idx) > len(self.shape_):
            raise t.error(f"too many indices: {len(idx)} for a vector of shape {self.shape_}", "one index per dim")
        idx = tuple(idx) + (slice(None),) * (len(self.shape_) - len(idx))
        keep: list[range] = []
        out_shape = []
        for i, n in zip(idx, self.shape_):
            if isinstance(i, slice):
                check_slice(t, i)
                keep.append(range(n)[i])
                out_shape.append(len(keep[-1]))
            elif isinstance(i, int) and not isinstance(i, bool):
                if not -n <= i < n:
                    raise t.index_error(f"index {i} is out of range for a dim of size {n}")
                keep.append(range(n)[i:i + 1] if i >= 0 else range(n)[i + n:i + n + 1])
            else:
                raise t.error("a traced index into a computed vector",
                              "index the captured tensor itself (emb[q_idx, d]), or compute with torch.where")
        strides = [math.prod(self.shape_[k + 1:]) for k in range(len(self.shape_))]
        elems = [self.elems[sum(c * s for c, s in zip(combo, strides))] for combo in itertools.product(*keep)]
        if not out_shape:
            return Proxy(t, elems[0])
        return Vector(t, tuple(out_shape), elems)


def expand_ellipsis(t, idx: tuple, ndim: int) -> tuple:
    if any(i is None for i in idx):
        raise t.error("indexing with None (a new axis) on a traced value", "index captured tensors by value only")
    n_ell = sum(i is Ellipsis for i in idx)
    if n_ell > 1:
        raise t.error("an index with more than one '...'", "use one '...'")
    if n_ell:
        k = next(i for i, x in enumerate(idx) if x is Ellipsis)  # not idx.index: == on traced values records
        rest = ndim - (len(idx) - 1)
        idx = idx[:k] + (slice(None),) * max(rest, 0) + idx[k + 1:]
    return idx


def check_slice(t, i: slice) -> None:
    """torch slices with a positive step only."""
    if i.step is not None and (not isinstance(i.step, int) or i.step <= 0):
        raise t.error(f"a slice with step {i.step!r}", "torch slices with a positive step only (flip() is not "
                      "traced: index in reverse with an expression such as t[..., n - 1 - i])")


def check_size(t, shape: Sequence[int]) -> None:
    if math.prod(shape) > MAX_ELEMENTS:
        raise t.error(f"a traced vector of shape {tuple(shape)} ({math.prod(shape)} elements) is too large to unroll "
                      f"(at most {MAX_ELEMENTS})",
                      "precompute the reduction into a captured table indexed by q_idx/kv_idx")


def is_vector(x: Any) -> bool:
    return isinstance(x, VectorLike) or (isinstance(x, torch.Tensor) and x.dim() > 0)


def as_vector(t, x: Any) -> Vector:
    """A view, vector or whole captured tensor as a :class:`Vector`."""
    if isinstance(x, Vector):
        return x
    if isinstance(x, View):
        return x.elements()
    if isinstance(x, torch.Tensor):
        return View(t, x, tuple(range(n) for n in x.shape)).elements()
    raise TypeError(type(x))  # pragma: no cover - callers check is_vector


def _broadcast_shape(t, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise t.error(f"shapes {[tuple(s) for s in shapes]} do not broadcast", "use vectors of matching shapes") from None


def elementwise(t, fn: Callable[..., Arg], operands: Sequence[Any]):
    """Apply ``fn`` (IR args -> IR arg) to scalars, or element by element with broadcasting when an
    operand is a vector; returns a Proxy or a :class:`Vector`."""
    if not any(is_vector(x) for x in operands) or all(
            not isinstance(x, VectorLike) and not isinstance(x, Proxy) for x in operands):
        return Proxy(t, fn(*(t.to_arg(x) for x in operands)))
    vecs = [as_vector(t, x) if is_vector(x) else None for x in operands]
    shape = _broadcast_shape(t, [v.shape_ for v in vecs if v is not None])
    check_size(t, shape)
    scal = [None if v is not None else t.to_arg(x) for v, x in zip(vecs, operands)]
    elems = []
    for combo in itertools.product(*[range(n) for n in shape]):
        args = []
        for v, s in zip(vecs, scal):
            if v is None:
                args.append(s)
                continue
            off = len(shape) - len(v.shape_)
            flat = 0
            for k, n in enumerate(v.shape_):
                flat = flat * n + (combo[off + k] if n != 1 else 0)
            args.append(v.elems[flat])
        elems.append(fn(*args))
    return Vector(t, shape, elems)


class Reduction(enum.Enum):
    """The reductions of traced vectors (torch's names)."""

    SUM = "sum"
    PROD = "prod"
    AMAX = "amax"
    AMIN = "amin"
    ANY = "any"
    ALL = "all"
    MEAN = "mean"


_REDUCE_OP = {Reduction.SUM: Op.ADD, Reduction.MEAN: Op.ADD, Reduction.PROD: Op.MUL, Reduction.AMAX: Op.MAXIMUM,
              Reduction.AMIN: Op.MINIMUM, Reduction.ANY: Op.OR, Reduction.ALL: Op.AND}


def reduce(t, x: Any, kind: Reduction, dim=None, keepdim: bool = False):
    """``x.sum() / .mean() / .prod() / .amax() / .amin() / .any() / .all()`` over ``dim`` (all dims
    when None), with torch's result types: integer and bool sums and products give int64,
    ``any`` / ``all`` give bool, ``mean`` needs floats."""
    if not is_vector(x):  # a scalar: reducing it changes only its type
        x = Vector(t, (), [t.to_arg(x)])
    v = as_vector(t, x)
    nd = len(v.shape_)
    dims = tuple(range(nd)) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    rank = max(nd, 1)  # torch lets a 0-d value be reduced over dim 0 or -1
    for d in dims:
        if not isinstance(d, int) or not -rank <= d < rank:
            from .errors import FlexcompTraceIndexError

            raise t.error(f"dimension {d!r} is out of range for a value of {nd} dims", "use a dim in "
                          f"[-{rank}, {rank - 1}]", cls=FlexcompTraceIndexError)
    normal = [d % rank for d in dims]
    if len(set(normal)) != len(normal):
        raise t.error(f"dim {tuple(dims)} names a dimension twice", "name each dim once")
    dims = tuple(sorted(d for d in normal if d < nd))
    gb = t.gb
    src = gb.dtype_of(v.elems[0])
    if kind is Reduction.MEAN and not src.is_float:
        raise t.error(f"mean() of a {src.value} vector (torch cannot infer its result type)",
                      "convert first: x.float().mean()")
    if kind in (Reduction.ANY, Reduction.ALL):
        target = DType.BOOL
    elif kind in (Reduction.SUM, Reduction.PROD) and not src.is_float:
        target = DType.I64
    else:
        target = src
    op = _REDUCE_OP[kind]
    out_shape = [n for k, n in enumerate(v.shape_) if k not in dims]
    keep_shape = [1 if k in dims else n for k, n in enumerate(v.shape_)]
    strides = [math.prod(v.shape_[k + 1:]) for k in range(nd)]
    elems = []
    for outer in itertools.product(*[range(n) if k not in dims else range(1) for k, n in enumerate(v.shape_)]):
        acc = None
        for inner in itertools.product(*[range(n) if k in dims else range(1) for k, n in enumerate(v.shape_)]):
            flat = sum((o + i) * s for o, i, s in zip(outer, inner, strides))
            e = gb.cast(v.elems[flat], target)
            acc = e if acc is None else gb.binary(op, acc, e)
        if acc is None:  # an empty dim: the identity
            acc = {Op.ADD: const(0), Op.MUL: const(1), Op.OR: const(False), Op.AND: const(True)}.get(op)
            if acc is None:
                raise t.error(f"{kind.value}() of an empty vector", "reduce a non-empty vector")
            acc = gb.cast(acc, target)
        if kind is Reduction.MEAN:
            count = math.prod(v.shape_[k] for k in dims)
            acc = gb.binary(Op.TRUEDIV, acc, Const(float(count), DType.F32))
        narrow = t.narrow.get(v.elems[0]) if not isinstance(v.elems[0], Const) else None
        if narrow is not None and kind in (Reduction.AMAX, Reduction.AMIN) and not isinstance(acc, Const):
            t.narrow[acc] = narrow  # torch's max of uint8 values is uint8 (sums and products are int64)
        elems.append(acc)
    shape = tuple(keep_shape) if keepdim else tuple(out_shape)
    if not shape:
        return Proxy(t, elems[0])
    return Vector(t, shape, elems)


def permute(t, x: Any, order: Sequence[int]):
    """A traced vector with its dims reordered (``.T``, ``.mT``, ``.permute``)."""
    if not is_vector(x):
        return x  # a scalar: nothing to reorder
    nd = len(x.shape)
    if sorted(order) != list(range(nd)):
        raise t.error(f"permute({tuple(order)}) of a value of shape {tuple(x.shape)}", "give every dim once")
    if isinstance(x, View):
        return x.permuted(order)
    v = as_vector(t, x)
    shape = v.shape_
    new_shape = tuple(shape[d] for d in order)
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    elems = [v.elems[sum(c * strides[d] for c, d in zip(combo, order))]
             for combo in itertools.product(*[range(n) for n in new_shape])]
    return Vector(t, new_shape, elems)


def stack(t, items: Sequence[Any], dim: int = 0) -> Vector:
    """``torch.stack`` / ``torch.tensor([...])`` of traced scalars or equal-shaped vectors."""
    parts = [as_vector(t, x) if is_vector(x) else Vector(t, (), [t.to_arg(x)]) for x in items]
    shapes = {p.shape_ for p in parts}
    if len(shapes) != 1:
        raise t.error(f"stacking values of shapes {sorted(shapes)}", "stack values of one shape")
    inner = parts[0].shape_
    if dim not in (0, -len(inner) - 1):
        raise t.error(f"torch.stack(..., dim={dim}) of traced values", "stack along dim 0")
    shape = (len(parts),) + inner
    check_size(t, shape)
    return Vector(t, shape, [e for p in parts for e in p.elems])

