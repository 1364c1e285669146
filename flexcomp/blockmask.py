"""BlockMask and the mask combinators, field for field as in ``torch.nn.attention.flex_attention``.

``create_block_mask`` traces the mask_mod, classifies blocks with :mod:`flexcomp.sparsity`
(interval analysis, then dense evaluation of only the undecided blocks) and never builds the
Q_LEN x KV_LEN mask: a causal mask over 131,072 tokens takes well under a second and a few MB.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .errors import FlexcompError
from .evaluate import evaluate
from .ir import ModKind
from .sparsity import BlockGrid, BlockKind, classify_blocks
from .trace import trace

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


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that keeps a pair only where every one of ``mask_mods`` keeps it.

    >>> from flexcomp.masks import causal_mask, sliding_window
    >>> m = and_masks(causal_mask, sliding_window(2))
    >>> create_mask(m, 1, 1, 4, 4, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    """
    if not all(callable(m) for m in mask_mods):
        raise FlexcompError(f"and_masks: every argument must be a callable mask_mod, got {mask_mods}")

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
        raise FlexcompError(f"or_masks: every argument must be a callable mask_mod, got {mask_mods}")

    def or_mask(b, h, q_idx, kv_idx):
        result = b.new_zeros(size=(), dtype=torch.bool)
        for mask in mask_mods:
            result = result | mask(b, h, q_idx, kv_idx)
        return result

    return or_mask


# ---- the ordered (BCSR-like) format --------------------------------------------------------
def _ordered_to_dense(num_blocks: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """``[..., rows]`` counts and ``[..., rows, max]`` column lists -> ``[..., rows, num_cols]`` int32."""
    cols = torch.arange(indices.shape[-1], device=indices.device)
    valid = cols < num_blocks.unsqueeze(-1)
    idx = torch.where(valid, indices.long(), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.int32, device=indices.device)
    dense.scatter_(-1, idx, 1)
    return dense[..., :num_cols].contiguous()


def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense 0/1 ``[..., rows, cols]`` -> (counts int32, column indices int32).

    Each row lists its kept columns in ascending order, then the other columns in ascending
    order: what torch's stable descending argsort gives, computed by a linear-time scatter.
    """
    d = dense.to(torch.int32)
    ones = torch.cumsum(d, dim=-1, dtype=torch.int32)
    num = ones[..., -1:]
    zeros = torch.arange(1, d.shape[-1] + 1, dtype=torch.int32, device=d.device) - ones
    rank = torch.where(d.bool(), ones - 1, num + zeros - 1).long()
    cols = torch.arange(d.shape[-1], dtype=torch.int32, device=d.device).expand_as(d)
    indices = torch.empty_like(d).scatter_(-1, rank, cols)
    return num.squeeze(-1).contiguous(), indices


def _transpose_ordered(num_blocks: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    dense = _ordered_to_dense(num_blocks, indices, indices.shape[-1])
    return _dense_to_ordered(dense.transpose(-2, -1))


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

    The dense block map is rebuilt by::

        dense = torch.zeros(num_q_blocks, num_kv_blocks)
        for q in range(num_q_blocks):
            for i in range(kv_num_blocks[b, h, q]):
                dense[q, kv_indices[b, h, q, i]] = 1         # partial
            for i in range(full_kv_num_blocks[b, h, q]):
                dense[q, full_kv_indices[b, h, q, i]] = 1    # full

    >>> from flexcomp.masks import causal_mask
    >>> bm = create_block_mask(causal_mask, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=128)
    >>> bm.kv_num_blocks.tolist(), bm.full_kv_num_blocks.tolist()
    ([[[1, 1]]], [[[0, 1]]])
    """

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
    ):
        if kv_indices.dim() < 2:
            raise FlexcompError(f"BlockMask: kv_indices must have at least 2 dims, got shape {tuple(kv_indices.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise FlexcompError("BlockMask: full_kv_num_blocks and full_kv_indices must both be given or both be None")
        if (full_q_num_blocks is None) != (full_q_indices is None):
            raise FlexcompError("BlockMask: full_q_num_blocks and full_q_indices must both be given or both be None")
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = tuple(BLOCK_SIZE)
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
    ) -> "BlockMask":
        """Build a BlockMask from the kv-side fields; the q-side fields are derived.

        >>> kv_num = torch.tensor([[[1, 2]]], dtype=torch.int32)
        >>> kv_idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32)
        >>> BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=64).shape
        (1, 1, 128, 128)
        """
        if kv_indices.dim() < 2:
            raise FlexcompError(f"BlockMask.from_kv_blocks: kv_indices must have at least 2 dims, got shape {tuple(kv_indices.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise FlexcompError("BlockMask.from_kv_blocks: full_kv_num_blocks and full_kv_indices must both be given or both be None")
        q_num = q_idx = fq_num = fq_idx = None
        if compute_q_blocks:
            q_num, q_idx = _transpose_ordered(kv_num_blocks, kv_indices)
            if full_kv_num_blocks is not None:
                fq_num, fq_idx = _transpose_ordered(full_kv_num_blocks, full_kv_indices)
        if isinstance(BLOCK_SIZE, int):
            BLOCK_SIZE = (BLOCK_SIZE, BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * BLOCK_SIZE[0], kv_indices.shape[-1] * BLOCK_SIZE[1])
        return cls(seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                   q_num, q_idx, fq_num, fq_idx, BLOCK_SIZE, mask_mod if mask_mod is not None else noop_mask)

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields as torch's ``BlockMask.as_tuple`` orders them."""
        block = (self.BLOCK_SIZE[0], self.BLOCK_SIZE[1]) if flatten else (self.BLOCK_SIZE,)
        return (*self.seq_lengths, self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices, self.q_num_blocks, self.q_indices, self.full_q_num_blocks,
                self.full_q_indices, *block, self.mask_mod)

    # ---- shape and statistics ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """``(*batch_dims, Q_LEN, KV_LEN)``."""
        return tuple(self.kv_indices.shape[:-2]) + tuple(self.seq_lengths)

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
        rs, cs = max(1, -(-rows // max_r)), max(1, -(-cols // max_c))
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
        slice no longer matches the mod's index space.
        """
        index = index if isinstance(index, tuple) else (index,)
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape[:3]
        index = tuple((slice(i + n, i + n + 1) if -n <= i < 0 else slice(i, i + 1)) if isinstance(i, int) else i
                      for i, n in zip(padded, sizes))
        full_num = self.full_kv_num_blocks[index] if self.full_kv_num_blocks is not None else None
        full_idx = self.full_kv_indices[index] if self.full_kv_indices is not None else None
        return BlockMask.from_kv_blocks(self.kv_num_blocks[index], self.kv_indices[index], full_num, full_idx,
                                        BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=_sliced_mask_mod_error,
                                        seq_lengths=self.seq_lengths, compute_q_blocks=self.q_indices is not None)

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """Crop to the upper-left ``new_q_len x new_kv_len`` corner (as torch's ``_adjust``)."""
        rows = -(-new_q_len // self.BLOCK_SIZE[0])
        cols = -(-new_kv_len // self.BLOCK_SIZE[1])

        def crop(num, idx):
            if num is None:
                return None, None
            idx = idx[..., :rows, :cols]
            num = torch.clamp(num[..., :rows], max=cols)
            num = (idx < num.unsqueeze(-1)).sum(-1).to(torch.int32)
            return num, idx

        kv_num, kv_idx = crop(self.kv_num_blocks, self.kv_indices)
        f_num, f_idx = crop(self.full_kv_num_blocks, self.full_kv_indices)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, f_idx, BLOCK_SIZE=self.BLOCK_SIZE,
                                        mask_mod=self.mask_mod, seq_lengths=(new_q_len, new_kv_len),
                                        compute_q_blocks=self.q_indices is not None)

    def to(self, device: Union[torch.device, str]) -> "BlockMask":
        """A copy with every tensor field on ``device``."""
        def mv(x):
            return None if x is None else x.to(device)

        return BlockMask(self.seq_lengths, mv(self.kv_num_blocks), mv(self.kv_indices), mv(self.full_kv_num_blocks),
                         mv(self.full_kv_indices), mv(self.q_num_blocks), mv(self.q_indices),
                         mv(self.full_q_num_blocks), mv(self.full_q_indices), self.BLOCK_SIZE, self.mask_mod)


# ---- construction ------------------------------------------------------------------------------
def _default_device():
    acc = getattr(torch, "accelerator", None)
    dev = acc.current_accelerator() if acc is not None else None
    return dev if dev is not None else "cpu"


def _check_len(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FlexcompError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_bh(name: str, value) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FlexcompError(f"{name} must be a positive int or None (broadcast), got {value!r}")
    return value


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
) -> BlockMask:
    """Build the :class:`BlockMask` of ``mask_mod`` without materialising Q_LEN x KV_LEN.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool``; traced once.
        B, H: batch size and number of query heads; None means 1 (broadcast over all).
        Q_LEN, KV_LEN: sequence lengths (any positive ints, not only multiples of the block size).
        device: where the mask's tensors live (default: the current accelerator, else CPU).
        BLOCK_SIZE: an int, or ``(Q_BLOCK, KV_BLOCK)``.
        _compile: accepted for compatibility; flexcomp needs no compilation for this.
        separate_full_blocks: if False, every kept block is listed as partial.

    >>> from flexcomp.masks import causal_mask
    >>> bm = create_block_mask(causal_mask, None, None, 512, 512, device="cpu")
    >>> print(bm.to_string().strip())
    (0, 0)
    ██
    ████
    ██████
    ████████
    """
    if not callable(mask_mod):
        raise FlexcompError(f"create_block_mask: mask_mod must be callable, got {type(mask_mod).__name__}")
    B, H = _check_bh("B", B), _check_bh("H", H)
    Q_LEN, KV_LEN = _check_len("Q_LEN", Q_LEN), _check_len("KV_LEN", KV_LEN)
    if not isinstance(BLOCK_SIZE, int) and (not isinstance(BLOCK_SIZE, (tuple, list)) or len(BLOCK_SIZE) != 2):
        raise FlexcompError(f"BLOCK_SIZE must be an int or a (Q_BLOCK, KV_BLOCK) pair, got {BLOCK_SIZE!r}")
    qb, kvb = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    for nm, v in (("BLOCK_SIZE[0]", qb), ("BLOCK_SIZE[1]", kvb)):
        _check_len(nm, v)
    device = torch.device(device if device is not None else _default_device())
    tm = trace(mask_mod, ModKind.MASK)
    grid = BlockGrid(Q_LEN, KV_LEN, qb, kvb)
    kind = classify_blocks(tm, grid, B, H, device)
    if separate_full_blocks:
        partial = kind == int(BlockKind.PARTIAL)
        full = kind == int(BlockKind.FULL)
        f_num, f_idx = _dense_to_ordered(full)
    else:
        partial = kind != int(BlockKind.EMPTY)
        f_num = f_idx = None
    kv_num, kv_idx = _dense_to_ordered(partial)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, f_idx, BLOCK_SIZE=(qb, kvb), mask_mod=mask_mod,
                                    seq_lengths=(Q_LEN, KV_LEN))


def create_mask(mod_fn: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, device=None) -> Tensor:
    """The dense bool mask ``[B, H, Q_LEN, KV_LEN]`` of a mask_mod (or of a score_mod: where it is not -inf).

    This one does materialise the full mask; use it for small sizes and tests.

    >>> from flexcomp.masks import causal_mask
    >>> create_mask(causal_mask, 1, 1, 3, 3, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    B, H = _check_bh("B", B), _check_bh("H", H)
    device = torch.device(device if device is not None else _default_device())
    kind = ModKind.SCORE if _num_params(mod_fn) == 5 else ModKind.MASK
    tm = trace(mod_fn, kind)
    ar = functools.partial(torch.arange, device=device, dtype=torch.int32)
    inputs = {"b": ar(B).view(-1, 1, 1, 1), "h": ar(H).view(1, -1, 1, 1),
              "q_idx": ar(Q_LEN).view(1, 1, -1, 1), "kv_idx": ar(KV_LEN).view(1, 1, 1, -1)}
    if kind is ModKind.SCORE:
        inputs["score"] = torch.zeros((), device=device)
    out = evaluate(tm.graph, inputs, tm.buffers, tm.scalars)
    if kind is ModKind.SCORE:
        out = ~torch.isneginf(out)
    return torch.broadcast_to(out, (B, H, Q_LEN, KV_LEN)).clone()


def _num_params(fn: Callable) -> int:
    import inspect

    try:
        return len([p for p in inspect.signature(fn).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        return 4

