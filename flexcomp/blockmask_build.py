"""Making masks: ``create_block_mask``, ``create_mask`` and the combinators ``and_masks`` / ``or_masks``.

``create_block_mask`` traces the mask_mod, classifies blocks with :mod:`flexcomp.sparsity`
(interval analysis, then dense evaluation of only the undecided blocks) and never builds the
Q_LEN x KV_LEN mask. All of these are re-exported by :mod:`flexcomp.blockmask`, as torch keeps them
next to ``BlockMask``.
"""
from __future__ import annotations

import collections
import functools
import inspect
import threading
import warnings
import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .compile import eagerly, is_compiling
from .blockmask import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask, MaskMod, _block_size, _check_bh, _check_len
from .blockmask_lists import compute_dq_write_order as _dq_write_order
from .blockmask_lists import dense_to_ordered as _dense_to_ordered
from .errors import FlexcompError, FlexcompNotCallableError, zero_division_names
from .evaluate import evaluate
from .ir import ModKind
from .options import Backend, Options, choose_backend
from .ranges import Domain, check_runnable
from .sparsity import BlockGrid, BlockKind, classify_blocks
from .trace import trace


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that keeps a pair only where every one of ``mask_mods`` keeps it.

    >>> from flexcomp.masks import causal_mask, sliding_window
    >>> m = and_masks(causal_mask, sliding_window(2))
    >>> create_mask(m, 1, 1, 4, 4, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    """
    if not all(callable(m) for m in mask_mods):
        raise FlexcompNotCallableError(f"and_masks: every argument must be a callable mask_mod, got {mask_mods}")

    def and_mask(b, h, q_idx, kv_idx):
        result = b.new_ones(size=(), dtype=torch.bool)
        for mask in mask_mods:
            result = result & mask(b, h, q_idx, kv_idx)
        return result

    return and_mask


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that keeps a pair where any one of ``mask_mods`` keeps it.

    >>> from flexcomp.masks import causal_mask, prefix_lm
    >>> create_mask(or_masks(causal_mask, prefix_lm(2)), 1, 1, 3, 3, device="cpu")[0, 0].int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    if not all(callable(m) for m in mask_mods):
        raise FlexcompNotCallableError(f"or_masks: every argument must be a callable mask_mod, got {mask_mods}")

    def or_mask(b, h, q_idx, kv_idx):
        result = b.new_zeros(size=(), dtype=torch.bool)
        for mask in mask_mods:
            result = result | mask(b, h, q_idx, kv_idx)
        return result

    return or_mask


def _default_device():
    acc = getattr(torch, "accelerator", None)
    dev = acc.current_accelerator() if acc is not None else None
    return dev if dev is not None else "cpu"


_COMPILE_WARNING = (
    "_compile flag on create_block_mask was originally added to work around a torch.compile limitation. That "
    "limitation has since been addressed. So, to compile create_block_mask, we suggest doing "
    "torch.compile(create_block_mask). This still works for now, but will be removed in the future.")


def create_block_mask(
    mask_mod: MaskMod,
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    device=None,
    BLOCK_SIZE: Union[int, tuple[int, int]] = _DEFAULT_SPARSE_BLOCK_SIZE,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    compute_dq_write_order: bool = False,
    dq_kv_order: bool = True,
) -> BlockMask:
    """Build the :class:`BlockMask` of ``mask_mod`` without materialising Q_LEN x KV_LEN.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool``; traced once.
        B, H: batch size and number of query heads; None means 1 (broadcast over all).
        Q_LEN, KV_LEN: sequence lengths (any ints >= 0, not only multiples of the block size).
        device: where the mask's tensors live (default: the current accelerator, else CPU);
            ``"meta"`` gives the fields' shapes and dtypes only, as torch does.
        BLOCK_SIZE: an int, or ``(Q_BLOCK, KV_BLOCK)``.
        _compile: accepted for compatibility (torch's DeprecationWarning); nothing to compile.
        separate_full_blocks: if False, every kept block is listed as partial.
        compute_dq_write_order: also compute torch's dQ write-order metadata (``dq_write_order``,
            ``dq_write_order_full`` ``[B, H, num_kv_blocks, num_q_blocks]``), carried, not used by flexcomp.
        dq_kv_order: its kv order: False ascending, True descending (a bool, as torch).

    Returns a BlockMask whose fields are ``[B, H, num_q_blocks]`` / ``[B, H, num_q_blocks,
    num_kv_blocks]`` int32, equal to torch's. Where the mask ignores ``b`` (or ``h``) they are
    broadcast views (stride 0) of one computed batch (head); a repeated call with the same mask
    structure, captured numbers and captured tensors (same objects, versions and values) returns
    the lists it built before (shared, not copied: do not write into them in place; with captured
    tensors, from the third call on: the first call only notes them, the second keeps a copy).
    On CUDA the blocks the interval analysis leaves undecided and the lists are computed by
    generated kernels (:mod:`flexcomp.codegen.blockmask`); elsewhere by torch ops.

    >>> from flexcomp.masks import causal_mask
    >>> bm = create_block_mask(causal_mask, None, None, 512, 512, device="cpu")
    >>> print(bm.to_string().strip())
    (0, 0)
    ██
    ████
    ██████
    ████████
    """
    if is_compiling():  # under torch.compile: the custom op, else one graph break (flexcomp.compile)
        args = dict(mask_mod=mask_mod, B=B, H=H, Q_LEN=Q_LEN, KV_LEN=KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE,
                    _compile=_compile, separate_full_blocks=separate_full_blocks,
                    compute_dq_write_order=compute_dq_write_order, dq_kv_order=dq_kv_order)
        if separate_full_blocks and not compute_dq_write_order and not _compile and callable(mask_mod):
            from .custom_ops import graph_create_block_mask  # here: it imports torch._dynamo

            graphed = graph_create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device if device is not None else
                                              _default_device(), BLOCK_SIZE)
            if graphed is not None:
                return graphed
        return eagerly(create_block_mask, **args)
    if not callable(mask_mod):
        raise FlexcompNotCallableError(f"create_block_mask: mask_mod must be callable, got {type(mask_mod).__name__}")
    B, H = _check_bh("create_block_mask: B", B), _check_bh("create_block_mask: H", H)
    Q_LEN, KV_LEN = _check_len("create_block_mask: Q_LEN", Q_LEN), _check_len("create_block_mask: KV_LEN", KV_LEN)
    qb, kvb = _block_size("create_block_mask", BLOCK_SIZE)
    if _compile:
        warnings.warn(_COMPILE_WARNING, DeprecationWarning, stacklevel=2)
    if not isinstance(dq_kv_order, bool):
        raise FlexcompError(f"create_block_mask: dq_kv_order must be a bool when using create_block_mask, got "
                            f"{dq_kv_order!r}")
    device = torch.device(device if device is not None else _default_device())
    tm = trace(mask_mod, ModKind.MASK)
    check_runnable(tm, device, Domain(B, H, Q_LEN, KV_LEN))
    grid = BlockGrid(Q_LEN, KV_LEN, qb, kvb)
    kernels = _use_kernels(device)
    key = ("block_mask", tm.graph.structural_key(), tuple(map(repr, tm.scalars)), B, H, grid, device,
           separate_full_blocks, kernels)
    lists = _REUSE.get(key, tm.buffers)
    if lists is None:
        with zero_division_names(tm.graph, tm.fn):
            lists = _block_lists(tm, grid, B, H, device, separate_full_blocks, kernels)
        _REUSE.put(key, tm.buffers, lists)
    kv_num, kv_idx, f_num, f_idx, q_num, q_idx, fq_num, fq_idx = (
        t if t is None or t.shape[:2] == (B, H) else t.expand(B, H, *t.shape[2:]) for t in lists)
    bm = BlockMask((Q_LEN, KV_LEN), kv_num, kv_idx, f_num, f_idx, q_num, q_idx, fq_num, fq_idx, (qb, kvb),
                   mask_mod)
    if compute_dq_write_order:
        bm.dq_write_order, bm.dq_write_order_full = _dq_write_order(bm, dq_kv_order)
        bm.dq_kv_order = None
        bm.dq_kv_order_spt = dq_kv_order
    return bm


def build_block_mask(mask_mod: MaskMod, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, device=None,
                     BLOCK_SIZE: Union[int, tuple[int, int]] = _DEFAULT_SPARSE_BLOCK_SIZE) -> BlockMask:
    """:func:`create_block_mask` that always builds (never reuses a kept BlockMask): for benchmarks
    of the build itself.

    >>> from flexcomp.masks import causal_mask
    >>> build_block_mask(causal_mask, 1, 1, 256, 256, device="cpu").kv_num_blocks.tolist()
    [[[1, 1]]]
    """
    _REUSE.clear()
    return create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE)


def _use_kernels(device: torch.device) -> bool:
    """Whether the block lists are built by the generated kernels (:mod:`flexcomp.codegen.blockmask`):
    on CUDA, or on any device under the Triton interpreter when ``FLEXCOMP_BACKEND=triton`` asks for
    them; the torch evaluator otherwise (and when ``FLEXCOMP_BACKEND=reference`` asks for it)."""
    if device.type == "meta":
        return False
    options = Options.parse(None)
    if device.type != "cuda" and not (options.interpret and options.backend is Backend.TRITON):
        return False
    return choose_backend(options, device) is Backend.TRITON


def _block_lists(tm, grid: BlockGrid, B: int, H: int, device: torch.device, separate_full: bool,
                 kernels: bool) -> tuple:
    """The eight ordered lists of the mask, ``[Bx, Hx, ...]`` (Bx = 1 where the mask ignores ``b``,
    Hx likewise; from the kernels ``[B, H, ...]`` with those dims broadcast): kv lists, full kv
    lists, q lists, full q lists (the full ones None unless ``separate_full``)."""
    if device.type == "meta" or 0 in (B, H, grid.num_q, grid.num_kv):
        # meta: shapes and dtypes only, as torch gives; an empty map: nothing to evaluate
        kind = torch.zeros((B, H, grid.num_q, grid.num_kv), dtype=torch.int8, device=device)
    elif kernels:
        from flexcomp.codegen import blockmask as on_device  # imports Triton: only when the kernels run

        kind = on_device.classify(tm, grid, B, H, device, separate_full)  # bounds and evaluation in one kernel
        if kind is None:  # a load the generated bounds do not cover (bias[q_idx - kv_idx]): the torch analysis
            evaluate = functools.partial(on_device.evaluate_unknown, separate_full=separate_full)
            kind = _unexpanded(classify_blocks(tm, grid, B, H, device, evaluate))
        return on_device.ordered_lists(kind, separate_full, B, H)
    else:
        kind = _unexpanded(classify_blocks(tm, grid, B, H, device))
    if separate_full:
        partial = kind == int(BlockKind.PARTIAL)
        full = kind == int(BlockKind.FULL)
        f_num, f_idx = _dense_to_ordered(full)
        fq_num, fq_idx = _dense_to_ordered(full.transpose(-2, -1))
    else:
        partial = kind != int(BlockKind.EMPTY)
        f_num = f_idx = fq_num = fq_idx = None
    kv_num, kv_idx = _dense_to_ordered(partial)
    q_num, q_idx = _dense_to_ordered(partial.transpose(-2, -1))
    return kv_num, kv_idx, f_num, f_idx, q_num, q_idx, fq_num, fq_idx


def _unexpanded(kind: Tensor) -> Tensor:
    """The map without its broadcast dims: ``[Bx, Hx, ...]`` where ``b`` / ``h`` are unused."""
    return kind[:1 if kind.stride(0) == 0 else None, :1 if kind.stride(1) == 0 else None]


class _Reuse:
    """The last few block lists built, per mask structure, captured numbers, sizes and device, valid
    while each captured tensor is the same object with the same ``_version``, storage, shape and
    strides, and the same values: the entry keeps a copy of each captured tensor and compares it on
    a hit, so a write the version counter does not see (through ``.data`` or a numpy view, a loader
    refilling its buffer) builds anew (one device compare, a wait on a GPU). Small: an entry holds
    O(blocks) memory and a copy of the captures.

    Lists of a mask with captured tensors are kept from their second build on: the first only
    notes the tensors (no copy), so a loop building a mask of fresh tensors every step (a new
    packing per batch) pays no copies."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.seen: collections.OrderedDict = collections.OrderedDict()  # built once: (weakrefs, state)
        self.lock = threading.Lock()

    @staticmethod
    def _state(buffers) -> tuple:
        return tuple((t._version, t.data_ptr(), t.shape, t.stride()) for t in buffers)

    @staticmethod
    def _same(refs, state, buffers) -> bool:
        return all(r() is t for r, t in zip(refs, buffers)) and state == _Reuse._state(buffers)

    def get(self, key: tuple, buffers) -> Optional[tuple]:
        full_key = (key, tuple(map(id, buffers)))
        with self.lock:
            hit = self.entries.get(full_key)
        if hit is None:
            return None
        refs, state, copies, lists = hit
        if not self._same(refs, state, buffers):
            return None
        with torch.no_grad():
            if not all(torch.equal(c, t) for c, t in zip(copies, buffers)):
                return None
        with self.lock:
            if full_key in self.entries:
                self.entries.move_to_end(full_key)
        return lists

    def put(self, key: tuple, buffers, lists: tuple) -> None:
        full_key = (key, tuple(map(id, buffers)))
        refs, state = tuple(weakref.ref(t) for t in buffers), self._state(buffers)
        if buffers:
            with self.lock:
                before = self.seen.pop(full_key, None)
                if before is None or not self._same(*before, buffers):  # a first build: note it only
                    self.seen[full_key] = (refs, state)
                    while len(self.seen) > self.size:
                        self.seen.popitem(last=False)
                    return
        with torch.no_grad():
            copies = tuple(t.clone() for t in buffers)
        with self.lock:
            self.entries[full_key] = (refs, state, copies, lists)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.seen.clear()


# block lists kept for reuse (a training loop that rebuilds the same mask each step gets it back)
_REUSE = _Reuse(size=8)


def create_mask(mod_fn: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, device=None) -> Tensor:
    """The dense bool mask ``[B, H, Q_LEN, KV_LEN]`` of a mask_mod (or of a score_mod: where it is not -inf).

    This one does materialise the full mask; use it for small sizes and tests.

    >>> from flexcomp.masks import causal_mask
    >>> create_mask(causal_mask, 1, 1, 3, 3, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    if not callable(mod_fn):
        raise FlexcompNotCallableError(f"create_mask: mod_fn must be callable, got {type(mod_fn).__name__}")
    B, H = _check_bh("create_mask: B", B), _check_bh("create_mask: H", H)
    Q_LEN, KV_LEN = _check_len("create_mask: Q_LEN", Q_LEN), _check_len("create_mask: KV_LEN", KV_LEN)
    device = torch.device(device if device is not None else _default_device())
    kind = ModKind.SCORE if _num_params(mod_fn) == 5 else ModKind.MASK
    tm = trace(mod_fn, kind)
    check_runnable(tm, device, Domain(B, H, Q_LEN, KV_LEN))
    ar = functools.partial(torch.arange, device=device, dtype=torch.int32)
    inputs = {"b": ar(B).view(-1, 1, 1, 1), "h": ar(H).view(1, -1, 1, 1),
              "q_idx": ar(Q_LEN).view(1, 1, -1, 1), "kv_idx": ar(KV_LEN).view(1, 1, 1, -1)}
    if kind is ModKind.SCORE:
        inputs["score"] = torch.zeros((), device=device)
    with zero_division_names(tm.graph, tm.fn):
        out = evaluate(tm.graph, inputs, tm.buffers, tm.scalars)
    if kind is ModKind.SCORE:
        out = ~torch.isneginf(out)
    return torch.broadcast_to(out, (B, H, Q_LEN, KV_LEN)).clone()


def _num_params(fn: Callable) -> int:
    try:
        return len([p for p in inspect.signature(fn).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        return 4
