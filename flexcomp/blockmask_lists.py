"""The ordered (BCSR-like) block lists of a BlockMask: conversions, crops, dQ write order, checks.

A BlockMask stores, per q-block row, a count ``num [..., rows]`` and a column list
``indices [..., rows, cols]`` (int32) whose first ``num`` entries are the kept kv-blocks in ascending
order, followed by the other blocks in ascending order (what torch's stable descending argsort
gives). Everything here works on those pairs, as torch's helpers of the same names do.

>>> dense = torch.tensor([[1, 0, 1], [0, 1, 0]])
>>> num, idx = dense_to_ordered(dense)
>>> num.tolist(), idx.tolist()
([2, 1], [[0, 2, 1], [1, 0, 2]])
>>> ordered_to_dense(num, idx, 3).tolist()
[[1, 0, 1], [0, 1, 0]]
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import FlexcompAttributeError, FlexcompError, FlexcompIndexError, FlexcompRuntimeError
from .tiles import cdiv


def ordered_to_dense(num_blocks: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """``[..., rows]`` counts and ``[..., rows, max]`` column lists -> ``[..., rows, num_cols]`` int32 0/1."""
    cols = torch.arange(indices.shape[-1], device=indices.device)
    valid = cols < num_blocks.unsqueeze(-1)
    idx = torch.where(valid, indices.long(), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.int32, device=indices.device)
    dense.scatter_(-1, idx, 1)
    return dense[..., :num_cols].contiguous()


def dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense 0/1 ``[..., rows, cols]`` -> (counts int32 ``[..., rows]``, column lists int32).

    Each row lists its kept columns in ascending order, then the other columns in ascending
    order: what torch's stable descending argsort gives, computed by a linear-time scatter.
    """
    d = dense.to(torch.int32)
    ones = torch.cumsum(d, dim=-1, dtype=torch.int32)
    num = d.sum(dim=-1, dtype=torch.int32)
    zeros = torch.arange(1, d.shape[-1] + 1, dtype=torch.int32, device=d.device) - ones
    rank = torch.where(d.bool(), ones - 1, num.unsqueeze(-1) + zeros - 1).long()
    cols = torch.arange(d.shape[-1], dtype=torch.int32, device=d.device).expand_as(d)
    indices = torch.empty_like(d).scatter_(-1, rank, cols)
    return num.contiguous(), indices


def transpose_ordered(num_blocks: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The per-column lists (which q-blocks use each kv-block) of per-row lists, as torch derives them."""
    dense = ordered_to_dense(num_blocks, indices, indices.shape[-1])
    return dense_to_ordered(dense.transpose(-2, -1))


def crop_lists(num_blocks: Tensor, indices: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """The lists of the upper-left ``rows x cols`` blocks (torch's ``_adjust_num_blocks_and_indices``)."""
    indices = indices[..., :rows, :cols]
    num = torch.clamp(num_blocks[..., :rows], max=cols)
    num = (indices < num.unsqueeze(-1)).sum(-1).to(torch.int32)
    return num, indices


def compute_dq_write_order(block_mask, dq_kv_order: Optional[bool] = False) -> tuple[Tensor, Optional[Tensor]]:
    """dQ write-order metadata of ``block_mask`` (torch's ``_compute_dq_write_order_from_block_mask``).

    For every kv-block column ``n`` and each q-block ``m`` it lists (``q_indices[..., n, i]``), the
    rank of ``n`` among the kept kv-blocks of row ``m`` (partial and full together), ascending, or
    descending when ``dq_kv_order`` is True. Returns ``(dq_write_order [B, H, num_kv, num_q],
    dq_write_order_full or None)``, int32. flexcomp's kernels do not read them; they are carried
    for torch's deterministic FLASH backward.
    """
    bm = block_mask
    if bm.q_num_blocks is None or bm.q_indices is None:
        raise FlexcompError("BlockMask must have q_num_blocks and q_indices to compute dq_write_order "
                            "(it was built with compute_q_blocks=False)")
    shapes = [bm.kv_indices.shape[:2], bm.q_indices.shape[:2]]
    if bm.full_kv_indices is not None:
        shapes.append(bm.full_kv_indices.shape[:2])
    if bm.full_q_indices is not None:
        shapes.append(bm.full_q_indices.shape[:2])
    B, H = torch.broadcast_shapes(*shapes)

    def expand(t: Tensor) -> Tensor:
        return t.expand(B, H, *t.shape[2:])

    device = bm.kv_indices.device
    num_m, num_n = bm.kv_indices.shape[2], bm.q_indices.shape[2]
    dense = ordered_to_dense(expand(bm.kv_num_blocks), expand(bm.kv_indices), num_n)
    has_full = bm.full_kv_num_blocks is not None and bm.full_kv_indices is not None
    if has_full:
        full = ordered_to_dense(expand(bm.full_kv_num_blocks), expand(bm.full_kv_indices), num_n)
        dense = (dense + full).clamp(max=1)
    cumsum = dense.cumsum(dim=-1)
    rank = (cumsum - dense).to(torch.int32)
    if dq_kv_order:
        rank = (cumsum[:, :, :, -1:] - 1 - rank).to(torch.int32)

    def gather(bwd_idx: Tensor) -> Tensor:
        b_i = torch.arange(B, device=device)[:, None, None, None]
        h_i = torch.arange(H, device=device)[None, :, None, None]
        n_i = torch.arange(bwd_idx.shape[2], device=device)[None, None, :, None]
        m_vals = bwd_idx.long().clamp(0, max(num_m - 1, 0))
        return rank[b_i, h_i, m_vals, n_i].to(torch.int32)

    order = gather(bm.q_indices)
    order_full = None
    if has_full and bm.full_q_num_blocks is not None and bm.full_q_indices is not None:
        order_full = gather(bm.full_q_indices)
    return order, order_full


# ---- checks of lists that users build (BlockMask.from_kv_blocks) ---------------------------------
def check_list_types(where: str, pairs) -> None:
    """Each ``(name, tensor)`` is an integer torch.Tensor (torch fails with AttributeError / IndexError)."""
    for name, t in pairs:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise FlexcompAttributeError(f"{where}: {name} must be a torch.Tensor (int32), got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise FlexcompIndexError(f"{where}: {name} must be an integer tensor (int32, as create_block_mask "
                                     f"makes), got {t.dtype}")


def _first(mask: Tensor) -> str:
    pos = mask.nonzero()[0].tolist()
    return "[" + ", ".join(map(str, pos)) + "]"


def check_kv_lists(where: str, num: Tensor, idx: Tensor, full_num: Optional[Tensor], full_idx: Optional[Tensor],
                   block_size: tuple[int, int], seq_lengths: tuple[int, int]) -> None:
    """The lists cover ``seq_lengths`` and are consistent; raise naming the field, expected and actual.

    Shapes: ``num`` is ``idx.shape[:-1]``; ``idx`` has at least ``ceil(Q_LEN / Q_BLOCK)`` rows and
    ``ceil(KV_LEN / KV_BLOCK)`` columns. Values (not checked on the meta device): counts in
    ``0 .. idx.shape[-1]``, listed blocks in ``0 .. ceil(KV_LEN / KV_BLOCK) - 1``, no block listed
    twice in a row, and none both partial and full.
    """
    q_len, kv_len = seq_lengths
    rows_needed, cols_needed = cdiv(q_len, block_size[0]), cdiv(kv_len, block_size[1])
    lists = [("kv_num_blocks", "kv_indices", num, idx)]
    if full_num is not None:
        lists.append(("full_kv_num_blocks", "full_kv_indices", full_num, full_idx))
        if tuple(full_idx.shape) != tuple(idx.shape):
            raise FlexcompRuntimeError(f"{where}: full_kv_indices must have kv_indices' shape {tuple(idx.shape)}, "
                                       f"got {tuple(full_idx.shape)}")
    for nname, iname, n, i in lists:
        if tuple(n.shape) != tuple(i.shape[:-1]):
            raise FlexcompRuntimeError(f"{where}: {nname} must have shape {iname}.shape[:-1] = {tuple(i.shape[:-1])} "
                                       f"(one count per q-block row), got {tuple(n.shape)}")
        if n.device != i.device:
            raise FlexcompRuntimeError(f"{where}: {nname} is on {n.device} but {iname} on {i.device}")
    if idx.shape[-2] < rows_needed:
        raise FlexcompError(
            f"{where}: kv_indices has {idx.shape[-2]} q-block rows, but seq_lengths[0]=Q_LEN={q_len} with "
            f"BLOCK_SIZE[0]={block_size[0]} needs {rows_needed}: the lists must cover every query")
    if idx.shape[-1] < cols_needed:
        raise FlexcompError(
            f"{where}: kv_indices has {idx.shape[-1]} columns, but seq_lengths[1]=KV_LEN={kv_len} with "
            f"BLOCK_SIZE[1]={block_size[1]} has {cols_needed} kv-blocks: each row lists every kv-block "
            f"(kept ones first), as create_block_mask makes")
    if idx.device.type == "meta":
        return
    dense = {}
    for nname, iname, n, i in lists:
        width = i.shape[-1]
        bad = (n < 0) | (n > width)
        if bool(bad.any()):
            raise FlexcompError(f"{where}: {nname} must be in 0..{width} (the columns of {iname}), got "
                                f"{int(n[bad][0])} at {_first(bad)}")
        valid = torch.arange(width, device=i.device) < n.unsqueeze(-1)
        bad = valid & ((i < 0) | (i >= cols_needed))
        if bool(bad.any()):
            raise FlexcompError(
                f"{where}: {iname} lists kv-block {int(i[bad][0])} at {_first(bad)}, expected 0..{cols_needed - 1} "
                f"(KV_LEN={kv_len} with BLOCK_SIZE[1]={block_size[1]})")
        slot = torch.where(valid, i.long(), cols_needed)
        count = torch.zeros(*i.shape[:-1], cols_needed + 1, dtype=torch.int32, device=i.device)
        count.scatter_add_(-1, slot, torch.ones_like(slot, dtype=torch.int32))
        twice = count[..., :cols_needed] > 1
        if bool(twice.any()):
            at = twice.nonzero()[0].tolist()
            raise FlexcompError(f"{where}: {iname} lists kv-block {at[-1]} twice in q-block row {at[:-1]}; "
                                f"each kept block appears once among the first {nname} entries")
        dense[nname] = count[..., :cols_needed] > 0
    if len(dense) == 2:
        both = dense["kv_num_blocks"] & dense["full_kv_num_blocks"]
        if bool(both.any()):
            at = both.nonzero()[0].tolist()
            raise FlexcompError(f"{where}: kv-block {at[-1]} of q-block row {at[:-1]} is listed both as partial "
                                f"(kv_indices) and as full (full_kv_indices); a block is one or the other")
