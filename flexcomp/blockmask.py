"""BlockMask, field for field, method for method as in ``torch.nn.attention.flex_attention``.

The class and its checks live here; the list arithmetic in :mod:`flexcomp.blockmask_lists`, the
pytree helpers in :mod:`flexcomp.blockmask_pytree`, and the makers (``create_block_mask``,
``create_mask``, ``and_masks``, ``or_masks``) in :mod:`flexcomp.blockmask_build` (exported by ``flexcomp``).
``create_block_mask`` never builds the Q_LEN x KV_LEN mask: a causal mask over 131,072 tokens takes
well under a second and a few MB.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.utils._pytree import GetAttrKey

from .blockmask_lists import check_kv_lists, check_list_types, compute_dq_write_order, crop_lists
from .blockmask_lists import dense_to_ordered as _dense_to_ordered  # noqa: F401 - torch's private names, kept
from .blockmask_lists import ordered_to_dense as _ordered_to_dense
from .blockmask_lists import transpose_ordered as _transpose_ordered
from .blockmask_pytree import MaskModWrapper, extract_callable_pytree, reconstruct_closure_fn
from .errors import (FlexcompAssertionError, FlexcompAttributeError, FlexcompError, FlexcompIndexError,
                     FlexcompNotCallableError, FlexcompNotImplementedError, FlexcompRuntimeError, FlexcompTypeError,
                     FlexcompZeroDivisionError)
from .tiles import cdiv

_DEFAULT_SPARSE_BLOCK_SIZE = 128
_LARGE_SPARSE_BLOCK_SIZE = 1 << 30

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def noop_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """A mask_mod that keeps every pair.

    >>> bool(noop_mask(torch.tensor(0), torch.tensor(0), torch.tensor(3), torch.tensor(5)))
    True
    """
    return b.new_ones(size=(), dtype=torch.bool)


def _sliced_mask_mod_error(b, h, q_idx, kv_idx):
    raise RuntimeError(
        "Cannot use mask_mod from a sliced BlockMask: slicing (block_mask[...]) drops the mask_mod. "
        "Create the block mask for the batch/heads you need with create_block_mask instead.")


def is_noop_block_mask(block_mask) -> bool:
    """Whether this is torch's internal "no mask" BlockMask (one huge block, noop mask_mod)."""
    return tuple(block_mask.BLOCK_SIZE) == (_LARGE_SPARSE_BLOCK_SIZE, _LARGE_SPARSE_BLOCK_SIZE)


class BlockMask:
    r"""A block-sparse attention mask, in torch's layout.

    The mask is cut into ``BLOCK_SIZE = (Q_BLOCK, KV_BLOCK)`` tiles. A tile is *full* (every
    pair kept: kernels skip mask_mod), *partial* (some kept: mask_mod decides) or empty (skipped).
    Lengths that are not multiples of the block sizes give a last, partial row/column of tiles.

    Fields (``*`` stands for the batch dims ``[B, H]``, either may be 1 to broadcast):

    - ``kv_num_blocks`` int32 ``[*, num_q_blocks]``: partial kv tiles of each q-block row.
    - ``kv_indices`` int32 ``[*, num_q_blocks, num_kv_blocks]``: their kv-block numbers, in
      ascending order, first ``kv_num_blocks`` entries valid (the rest are the other blocks).
    - ``full_kv_num_blocks``, ``full_kv_indices``: the same for full tiles (or None: all partial).
    - ``q_num_blocks``, ``q_indices``, ``full_q_num_blocks``, ``full_q_indices``: the transposes
      (per kv-block column, which q-blocks), for the backward pass.
    - ``BLOCK_SIZE``: ``(Q_BLOCK, KV_BLOCK)``; ``seq_lengths``: ``(Q_LEN, KV_LEN)``;
      ``mask_mod``: the function applied inside partial tiles.
    - ``dq_write_order``, ``dq_write_order_full`` int32 ``[*, num_kv_blocks, num_q_blocks]`` (or None):
      torch's dQ write-order metadata for its deterministic FLASH backward
      (``create_block_mask(..., compute_dq_write_order=True)``); ``dq_kv_order`` (a tensor, or None)
      and ``dq_kv_order_spt`` (a bool, or None): the kv order they follow. flexcomp's kernels do not
      read them; slicing, ``_adjust``, ``to``, ``as_tuple`` and ``_flatten`` carry them as torch does.

    The dense block map is rebuilt by::

        dense = torch.zeros(num_q_blocks, num_kv_blocks)
        for q in range(num_q_blocks):
            for i in range(kv_num_blocks[b, h, q]):
                dense[q, kv_indices[b, h, q, i]] = 1         # partial
            for i in range(full_kv_num_blocks[b, h, q]):
                dense[q, full_kv_indices[b, h, q, i]] = 1    # full

    >>> from flexcomp import create_block_mask
    >>> from flexcomp.masks import causal_mask
    >>> bm = create_block_mask(causal_mask, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=128)
    >>> bm.kv_num_blocks.tolist(), bm.full_kv_num_blocks.tolist()
    ([[[1, 1]]], [[[0, 1]]])
    """

    # what _flatten / _unflatten / to() carry, in torch's order
    _TENSOR_ATTRS = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices", "dq_write_order", "dq_write_order_full",
                     "dq_kv_order"]
    _CONTEXT_ATTRS = ["seq_lengths", "BLOCK_SIZE", "mask_mod", "dq_kv_order_spt"]

    def __init__(
        self,
        seq_lengths: tuple[int, int],
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Optional[Tensor],
        full_kv_indices: Optional[Tensor],
        q_num_blocks: Optional[Tensor],
        q_indices: Optional[Tensor],
        full_q_num_blocks: Optional[Tensor],
        full_q_indices: Optional[Tensor],
        BLOCK_SIZE: tuple[int, int] = (_DEFAULT_SPARSE_BLOCK_SIZE, _DEFAULT_SPARSE_BLOCK_SIZE),
        mask_mod: MaskMod = noop_mask,
        *,
        dq_write_order: Optional[Tensor] = None,
        dq_write_order_full: Optional[Tensor] = None,
        dq_kv_order: Optional[Tensor] = None,
        dq_kv_order_spt: Optional[bool] = None,
    ):
        if not isinstance(kv_indices, Tensor):
            raise FlexcompAttributeError(f"BlockMask: kv_indices must be a torch.Tensor, got {type(kv_indices).__name__}")
        if kv_indices.dim() < 2:
            raise FlexcompRuntimeError(f"BlockMask must have at least 2 dimensions: kv_indices must be "
                                       f"[..., num_q_blocks, num_kv_blocks], got shape {tuple(kv_indices.shape)}")
        if kv_num_blocks is None:
            raise FlexcompAssertionError("BlockMask: kv_num_blocks must be provided, got None")
        _check_pairs("BlockMask", full_kv_num_blocks, full_kv_indices, full_q_num_blocks, full_q_indices)
        if dq_write_order_full is not None and dq_write_order is None:
            raise FlexcompError("BlockMask: dq_write_order_full requires dq_write_order, got dq_write_order=None")
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self._q_pending: Optional[Callable[[], tuple]] = None
        self._q = (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
        self.dq_write_order = dq_write_order
        self.dq_write_order_full = dq_write_order_full
        self.dq_kv_order = dq_kv_order
        self.dq_kv_order_spt = dq_kv_order_spt
        self.BLOCK_SIZE = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
        self.mask_mod = mask_mod

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Optional[Tensor] = None,
        full_kv_indices: Optional[Tensor] = None,
        BLOCK_SIZE: Union[int, tuple[int, int]] = _DEFAULT_SPARSE_BLOCK_SIZE,
        mask_mod: Optional[MaskMod] = None,
        seq_lengths: Optional[tuple[int, int]] = None,
        compute_q_blocks: bool = True,
        *,
        dq_write_order: Optional[Tensor] = None,
        dq_write_order_full: Optional[Tensor] = None,
        dq_kv_order: Union[Tensor, bool, None] = None,
    ) -> "BlockMask":
        """Build a BlockMask from the kv-side lists; the q-side lists are derived (as torch's).

        Args:
            kv_num_blocks: int32 ``[*, num_q_blocks]``; kv_indices: int32 ``[*, num_q_blocks, num_kv_blocks]``.
            full_kv_num_blocks, full_kv_indices: the same for full blocks, or both None.
            BLOCK_SIZE: int or ``(Q_BLOCK, KV_BLOCK)``; seq_lengths: ``(Q_LEN, KV_LEN)`` (default: the
                lists' extent); compute_q_blocks: derive ``q_*`` (needed for the backward).
            dq_write_order, dq_write_order_full: precomputed dQ write-order metadata (carried only).
            dq_kv_order: the kv order it was computed for: a bool (built-in order) or a tensor.

        The lists are checked against ``seq_lengths`` (every query row and kv-block covered, counts
        and listed blocks in range, no block listed twice or both partial and full): an error names
        the field, the position, what was expected and what came.

        >>> kv_num = torch.tensor([[[1, 2]]], dtype=torch.int32)
        >>> kv_idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32)
        >>> BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=64).shape
        (1, 1, 128, 128)
        """
        where = "BlockMask.from_kv_blocks"
        if not isinstance(kv_indices, Tensor):
            raise FlexcompAttributeError(f"{where}: kv_indices must be a torch.Tensor (int32), got {type(kv_indices).__name__}")
        if kv_indices.dim() < 2:
            raise FlexcompRuntimeError(f"BlockMask must have at least 2 dimensions: {where}: kv_indices must be "
                                       f"[..., num_q_blocks, num_kv_blocks], got shape {tuple(kv_indices.shape)}")
        _check_pairs(where, full_kv_num_blocks, full_kv_indices)
        check_list_types(where, (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices),
                                 ("full_kv_num_blocks", full_kv_num_blocks), ("full_kv_indices", full_kv_indices)))
        block = _block_size(where, BLOCK_SIZE, short_is_index_error=True)
        if mask_mod is not None and not callable(mask_mod):
            raise FlexcompNotCallableError(f"{where}: mask_mod must be callable or None, got {type(mask_mod).__name__}")
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * block[0], kv_indices.shape[-1] * block[1])
        elif not isinstance(seq_lengths, (tuple, list)) or len(seq_lengths) != 2:
            raise FlexcompTypeError(f"{where}: seq_lengths must be a (Q_LEN, KV_LEN) pair or None, got {seq_lengths!r}")
        else:
            seq_lengths = (_check_len(f"{where}: seq_lengths[0]", seq_lengths[0]),
                           _check_len(f"{where}: seq_lengths[1]", seq_lengths[1]))
        if dq_kv_order is not None and not isinstance(dq_kv_order, (bool, Tensor)):
            raise FlexcompError(f"{where}: dq_kv_order must be a bool, Tensor, or None, got {type(dq_kv_order).__name__}")
        if dq_write_order_full is not None and dq_write_order is None:
            raise FlexcompError(f"{where}: dq_write_order_full requires dq_write_order, got dq_write_order=None")
        for name, t in (("dq_write_order", dq_write_order), ("dq_write_order_full", dq_write_order_full)):
            if t is not None and not isinstance(t, Tensor):
                raise FlexcompTypeError(f"{where}: {name} must be a Tensor or None, got {type(t).__name__}")
        check_kv_lists(where, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block, seq_lengths)
        return cls._build(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block, mask_mod,
                          seq_lengths, compute_q_blocks, dq_write_order=dq_write_order,
                          dq_write_order_full=dq_write_order_full, dq_kv_order=dq_kv_order)

    @classmethod
    def _build(cls, kv_num, kv_idx, full_num, full_idx, block, mask_mod, seq_lengths, compute_q_blocks,
               dq_write_order=None, dq_write_order_full=None, dq_kv_order=None) -> "BlockMask":
        """``from_kv_blocks`` without the checks, for lists flexcomp made itself. The q-side lists
        (``compute_q_blocks``) are derived when first read: a decode step's sliced or converted mask
        that never runs a backward never pays for the transpose. ``compute_q_blocks`` may also be a
        function returning ``(q_num, q_idx, full_q_num, full_q_idx)``, called then."""
        if isinstance(block, int):
            block = (block, block)
        if seq_lengths is None:
            seq_lengths = (kv_idx.shape[-2] * block[0], kv_idx.shape[-1] * block[1])
        bm = cls(seq_lengths, kv_num, kv_idx, full_num, full_idx, None, None, None, None, block,
                 mask_mod if mask_mod is not None else noop_mask, dq_write_order=dq_write_order,
                 dq_write_order_full=dq_write_order_full,
                 dq_kv_order=dq_kv_order if isinstance(dq_kv_order, Tensor) else None,
                 dq_kv_order_spt=dq_kv_order if isinstance(dq_kv_order, bool) else None)
        if callable(compute_q_blocks):  # a maker of the four q lists (a kernel's, flexcomp.codegen.blockmask)
            bm._q_pending = compute_q_blocks
        elif compute_q_blocks:
            def transposes() -> tuple:
                full = _transpose_ordered(full_num, full_idx) if full_num is not None else (None, None)
                return (*_transpose_ordered(kv_num, kv_idx), *full)

            bm._q_pending = transposes
        return bm

    # ---- the q-side lists: given, or derived from the kv lists when first read ---------------
    def _q_lists(self) -> tuple:
        if self._q_pending is not None:
            make, self._q_pending = self._q_pending, None
            self._q = make()
        return self._q

    def _set_q(self, i: int, value: Optional[Tensor]) -> None:
        lists = list(self._q_lists())
        lists[i] = value
        self._q = tuple(lists)

    def _has_q_lists(self) -> bool:
        """Whether the q-side lists exist (given, derived, or to be derived), without deriving them."""
        return self._q_pending is not None or self._q[1] is not None

    def _has_full_q_lists(self) -> bool:
        """Whether ``full_q_num_blocks`` is (or will be, once derived) a tensor, without deriving it."""
        if self._q_pending is not None:
            return self.full_kv_num_blocks is not None
        return self._q[2] is not None

    q_num_blocks = property(lambda self: self._q_lists()[0], lambda self, v: self._set_q(0, v),
                            doc="int32 ``[*, num_kv_blocks]``: partial q tiles of each kv-block column")
    q_indices = property(lambda self: self._q_lists()[1], lambda self, v: self._set_q(1, v),
                         doc="int32 ``[*, num_kv_blocks, num_q_blocks]``: their q-block numbers")
    full_q_num_blocks = property(lambda self: self._q_lists()[2], lambda self, v: self._set_q(2, v),
                                 doc="the same as ``q_num_blocks`` for full tiles (or None)")
    full_q_indices = property(lambda self: self._q_lists()[3], lambda self, v: self._set_q(3, v),
                              doc="the same as ``q_indices`` for full tiles (or None)")

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in torch's ``BlockMask.as_tuple`` order (what torch's kernels take).

        ``(Q_LEN, KV_LEN, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks,
        q_indices, full_q_num_blocks, full_q_indices, dq_write_order, dq_write_order_full, dq_kv_order,
        dq_kv_order_spt, Q_BLOCK, KV_BLOCK, mask_mod)``; with ``flatten=False`` the two pairs stay tuples.
        """
        block = (self.BLOCK_SIZE[0], self.BLOCK_SIZE[1]) if flatten else (self.BLOCK_SIZE,)
        seq = (self.seq_lengths[0], self.seq_lengths[1]) if flatten else (self.seq_lengths,)
        return (*seq, self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
                self.q_num_blocks, self.q_indices, self.full_q_num_blocks, self.full_q_indices, self.dq_write_order,
                self.dq_write_order_full, self.dq_kv_order, self.dq_kv_order_spt, *block, self.mask_mod)

    def _dq_kv_order(self) -> Union[Tensor, bool, None]:
        """The kv order the dQ write order follows: the tensor if one was given, else the bool."""
        return self.dq_kv_order if self.dq_kv_order is not None else self.dq_kv_order_spt

    @staticmethod
    def _slice_dq_kv_order(dq_kv_order: Optional[Tensor], index: tuple) -> Optional[Tensor]:
        return None if dq_kv_order is None else dq_kv_order[index[:2] + (slice(None),)]

    # ---- shape and statistics ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """``(*batch_dims, Q_LEN, KV_LEN)``."""
        return tuple(self.kv_indices.shape[:-2]) + tuple(self.seq_lengths)

    @property
    def ndim(self) -> int:
        """``len(shape)``, as a tensor's: code that checks a mask's rank (transformers' ``attention_mask.ndim``)
        sees a prepared 4-D mask."""
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def sparsity(self) -> float:
        """Percentage of the mask area in skipped (empty) blocks."""
        computed = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            computed += int(self.full_kv_num_blocks.sum())
        return 100 * (1 - computed * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1] / self.numel())

    def to_dense(self) -> Tensor:
        """The block map, int32 ``[*, num_q_blocks, num_kv_blocks]``: 1 where a block is kept."""
        n = self.kv_indices.shape[-1]
        dense = _ordered_to_dense(self.kv_num_blocks, self.kv_indices, n)
        if self.full_kv_num_blocks is not None:
            dense = dense | _ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, n)
        return dense

    def to_string(self, grid_size: Union[int, tuple[int, int]] = (20, 20), limit: int = 4) -> str:
        """Draw the block map: ``█`` kept everywhere in a cell, ``░`` partly, blank nothing.

        A cell covers several blocks when the map is larger than ``grid_size`` (``-1``: one cell
        per block). Each cell is two characters wide.
        """
        dense = self.to_dense()
        *batch, rows, cols = dense.shape
        if grid_size == -1:
            max_r, max_c = rows, cols
        elif isinstance(grid_size, int):
            max_r = max_c = grid_size
        else:
            max_r, max_c = grid_size
        rs, cs = max(1, cdiv(rows, max_r)), max(1, cdiv(cols, max_c))
        out = []
        for i, bidx in enumerate(itertools.product(*[range(d) for d in batch])):
            if i == limit:
                out += ["...", "To print out more, set BlockMask.to_string(limit=N)",
                        "You can also index (BlockMask[batch, head]) to choose a specific batch or head"]
                break
            m = dense[bidx].float()
            lines = [f"{bidx}"]
            for r in range(0, rows, rs):
                line = ""
                for c in range(0, cols, cs):
                    p = m[r:r + rs, c:c + cs].mean().item()
                    line += ("█" if p == 1 else " " if p == 0 else "░") * 2
                lines.append(line)
            out.append("\n".join(lines) + "\n")
        return "\n".join(out)

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n{self.to_string().strip()}\n)"

    def __repr__(self) -> str:
        def shp(x):
            return None if x is None else x.shape

        name = getattr(self.mask_mod, "__name__", self.mask_mod)
        return (f"BlockMask(\n    kv_num_blocks={shp(self.kv_num_blocks)},\n    kv_indices={shp(self.kv_indices)},\n"
                f"    full_kv_num_blocks={shp(self.full_kv_num_blocks)},\n    full_kv_indices={shp(self.full_kv_indices)},\n"
                f"    q_num_blocks={shp(self.q_num_blocks)},\n    q_indices={shp(self.q_indices)},\n"
                f"    full_q_num_blocks={shp(self.full_q_num_blocks)},\n    full_q_indices={shp(self.full_q_indices)},\n"
                f"    BLOCK_SIZE={self.BLOCK_SIZE},\n    shape={self.shape},\n    sparsity={self.sparsity():.2f}%,\n"
                f"    mask_mod={name}\n)")

    # ---- derived masks -----------------------------------------------------------------------
    def __getitem__(self, index) -> "BlockMask":
        """Slice by batch, head and q-block: ``bm[0]``, ``bm[0, 1]``, ``bm[0:2, 1:2, idx]``.

        Integers keep their dim (as torch does). The result's mask_mod raises if used: the
        slice no longer matches the mod's index space. dQ write-order metadata is recomputed for
        the slice (a tensor ``dq_kv_order`` cannot be sliced: NotImplementedError, as torch).
        """
        if self.dq_kv_order is not None:
            raise FlexcompNotImplementedError(
                "Slicing BlockMask with tensor dq_kv_order is not supported yet. Construct a new BlockMask with "
                "matching precomputed dq_write_order metadata.")
        index = index if isinstance(index, tuple) else (index,)
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape[:3]
        index = tuple((slice(i + n, i + n + 1) if -n <= i < 0 else slice(i, i + 1)) if isinstance(i, int) else i
                      for i, n in zip(padded, sizes))
        full_num = self.full_kv_num_blocks[index] if self.full_kv_num_blocks is not None else None
        full_idx = self.full_kv_indices[index] if self.full_kv_indices is not None else None
        new = BlockMask._build(self.kv_num_blocks[index], self.kv_indices[index], full_num, full_idx, self.BLOCK_SIZE,
                               _sliced_mask_mod_error, self.seq_lengths, self._has_q_lists())
        return self._carry_dq(new, self._slice_dq_kv_order(self.dq_kv_order, index))

    def _carry_dq(self, new: "BlockMask", dq_kv_order: Optional[Tensor]) -> "BlockMask":
        """``new`` with this mask's dQ order settings, its write order recomputed (as torch)."""
        new.dq_kv_order = dq_kv_order
        new.dq_kv_order_spt = self.dq_kv_order_spt
        if self.dq_write_order is not None and new.dq_kv_order is None:
            new.dq_write_order, new.dq_write_order_full = compute_dq_write_order(new, new.dq_kv_order_spt)
        return new

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """Crop to the upper-left ``new_q_len x new_kv_len`` corner (as torch's ``_adjust``)."""
        if self.dq_kv_order is not None:
            raise FlexcompNotImplementedError(
                "Adjusting BlockMask with tensor dq_kv_order is not supported yet. Construct a new BlockMask with "
                "matching precomputed dq_write_order metadata.")
        rows = cdiv(new_q_len, self.BLOCK_SIZE[0])
        cols = cdiv(new_kv_len, self.BLOCK_SIZE[1])
        kv_num, kv_idx = crop_lists(self.kv_num_blocks, self.kv_indices, rows, cols)
        f_num = f_idx = None
        if self.full_kv_num_blocks is not None:
            f_num, f_idx = crop_lists(self.full_kv_num_blocks, self.full_kv_indices, rows, cols)
        new = type(self)._build(kv_num, kv_idx, f_num, f_idx, self.BLOCK_SIZE, self.mask_mod,
                                (new_q_len, new_kv_len), self._has_q_lists())
        return self._carry_dq(new, self.dq_kv_order)

    def to(self, device: Union[torch.device, str]) -> "BlockMask":
        """A copy with every tensor field (the dQ metadata too) on ``device``."""
        moved = {a: None if getattr(self, a) is None else getattr(self, a).to(device) for a in self._TENSOR_ATTRS}
        return BlockMask(seq_lengths=self.seq_lengths, **moved, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                         dq_kv_order_spt=self.dq_kv_order_spt)

    # ---- pytree: leaves and context as torch's ------------------------------------------------
    @staticmethod
    def _wrap_context_value(attr: str, value: Any) -> Any:
        return MaskModWrapper(value) if attr == "mask_mod" else value

    @staticmethod
    def _unwrap_context_value(attr: str, value: Any) -> Any:
        if attr == "mask_mod":
            if not isinstance(value, MaskModWrapper):
                raise FlexcompAssertionError(f"Expected _MaskModWrapper, got {type(value)}")
            return value.fn
        return value

    def _leaves_and_context(self, keyed: bool) -> tuple[tuple, tuple]:
        optional = tuple(a for a in self._TENSOR_ATTRS if getattr(self, a) is None)
        tensors = tuple((GetAttrKey(a), getattr(self, a)) if keyed else getattr(self, a)
                        for a in self._TENSOR_ATTRS if a not in optional)
        closure, spec, stripped = extract_callable_pytree(self.mask_mod)
        if keyed:
            closure = tuple((GetAttrKey(f"_closure_{i}"), leaf) for i, leaf in enumerate(closure))
        context = (*(MaskModWrapper(stripped, spec) if a == "mask_mod" else self._wrap_context_value(a, getattr(self, a))
                     for a in self._CONTEXT_ATTRS), optional)
        return tensors + tuple(closure), context

    def _flatten(self) -> tuple[tuple, tuple]:
        """``(leaves, context)`` as torch's: the non-None tensor fields in ``_TENSOR_ATTRS`` order, then
        the tensors (and numbers) of the mask_mod's closure; the context holds seq_lengths, BLOCK_SIZE,
        the mask_mod's skeleton, dq_kv_order_spt and the names of the None fields.

        >>> from flexcomp import create_block_mask
        >>> from flexcomp.masks import causal_mask
        >>> bm = create_block_mask(causal_mask, 1, 1, 256, 256, device="cpu")
        >>> leaves, context = bm._flatten()
        >>> len(leaves), BlockMask._unflatten(leaves, context).kv_indices is bm.kv_indices
        (8, True)
        """
        return self._leaves_and_context(keyed=False)

    def _flatten_with_keys(self) -> tuple[tuple, tuple]:
        """:meth:`_flatten` with a ``GetAttrKey`` per leaf (the field name, or ``_closure_{i}``)."""
        return self._leaves_and_context(keyed=True)

    @classmethod
    def _unflatten(cls, leaves, context) -> "BlockMask":
        """The BlockMask of :meth:`_flatten`'s ``(leaves, context)`` (the mask_mod rebuilt around new leaves)."""
        optional = context[-1]
        attrs = tuple(a for a in cls._TENSOR_ATTRS if a not in optional)
        values = dict.fromkeys(optional)
        values.update(zip(attrs, leaves[:len(attrs)]))
        closure = leaves[len(attrs):]
        ctx = {}
        for attr, val in zip(cls._CONTEXT_ATTRS, context[:-1]):
            if attr == "mask_mod" and isinstance(val, MaskModWrapper):
                ctx[attr] = reconstruct_closure_fn(val.fn, closure, val.callable_spec)
            else:
                ctx[attr] = cls._unwrap_context_value(attr, val)
        return cls(seq_lengths=ctx["seq_lengths"], **values, BLOCK_SIZE=ctx["BLOCK_SIZE"], mask_mod=ctx["mask_mod"],
                   dq_kv_order_spt=ctx["dq_kv_order_spt"])


def _check_pairs(where: str, full_kv_num, full_kv_idx, full_q_num=None, full_q_idx=None) -> None:
    """Optional fields that come in pairs are both given or both None (torch: AssertionError)."""
    if (full_kv_num is None) != (full_kv_idx is None):
        raise FlexcompAssertionError(
            f"{where}: full_kv_num_blocks and full_kv_indices must be both provided or omitted, got "
            f"full_kv_num_blocks={'None' if full_kv_num is None else 'a tensor'} and "
            f"full_kv_indices={'None' if full_kv_idx is None else 'a tensor'}")
    if (full_q_num is None) != (full_q_idx is None):
        raise FlexcompAssertionError(
            f"{where}: full_q_num_blocks and full_q_indices must be both provided or omitted, got "
            f"full_q_num_blocks={'None' if full_q_num is None else 'a tensor'} and "
            f"full_q_indices={'None' if full_q_idx is None else 'a tensor'}")


# ---- argument checks shared with blockmask_build -------------------------------------------------
def _check_len(name: str, value) -> int:
    """A length or count: an int >= 0 (torch: TypeError for other types, RuntimeError below 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FlexcompTypeError(f"{name} must be an int >= 0, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise FlexcompRuntimeError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def _check_bh(name: str, value) -> int:
    """A batch or head count: an int >= 0, or None meaning 1 (broadcast)."""
    return 1 if value is None else _check_len(f"{name} (or None to broadcast)", value)


def _block_size(where: str, value, short_is_index_error: bool = False) -> tuple[int, int]:
    """``BLOCK_SIZE`` as ``(Q_BLOCK, KV_BLOCK)`` positive ints, raising what torch raises for the same value."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list, str)) and len(value) == 2 and not isinstance(value, str):
        pair = tuple(value)
    else:
        short = isinstance(value, (tuple, list, str)) and len(value) < 2
        cls = (FlexcompIndexError if short and short_is_index_error else
               FlexcompTypeError if not isinstance(value, (tuple, list)) else FlexcompError)
        raise cls(f"{where}: BLOCK_SIZE must be an int or a (Q_BLOCK, KV_BLOCK) pair, got {value!r}")
    for i, v in enumerate(pair):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise FlexcompTypeError(f"{where}: BLOCK_SIZE[{i}] must be a positive int, got {v!r} ({type(v).__name__})")
        if v == 0:
            raise FlexcompZeroDivisionError(f"{where}: BLOCK_SIZE[{i}] must be a positive int, got 0")
        if v < 0:
            raise FlexcompRuntimeError(f"{where}: BLOCK_SIZE[{i}] must be a positive int, got {v}")
    return int(pair[0]), int(pair[1])

