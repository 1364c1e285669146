"""Block masks straight from per-row key ranges: packed sequences (varlen) and KV caches, in a few
device ops, without tracing or evaluating a mask_mod.

flash-attn's masks keep, for a query at position ``p`` of its sequence (which has ``shift`` more keys
than queries: bottom-right alignment), the keys of the same sequence at positions ``p + shift - left
.. p + shift + right`` (``-1``: unbounded). Queries are sorted by sequence and position, so for each
q-block row only its first and last queries matter:

- every key any query of the row sees lies in ``[lo, hi)``: from the first query's lowest visible key
  to the last query's highest (keys between sequences included: conservative, the mask_mod decides);
- every query of the row sees every key of ``[flo, fhi)`` when the row holds one sequence: from the
  last query's lowest visible key to the first query's highest.

Blocks inside ``[flo, fhi)`` are full, the others overlapping ``[lo, hi)`` partial (at most two runs),
the rest empty; the lists follow by arithmetic (:func:`lists_from_ranges`), ``O(rows x blocks)``
int32 and no host read. The q-side lists are derived only if a backward asks
(:meth:`flexcomp.blockmask.BlockMask._build`).

>>> import torch
>>> lo, hi = torch.tensor([[[0, 64]]]), torch.tensor([[[64, 200]]])
>>> flo, fhi = torch.tensor([[[0, 128]]]), torch.tensor([[[64, 128]]])
>>> n, idx, fn, fidx = lists_from_ranges(lo, hi, flo, fhi, 64, 4)
>>> n.tolist(), idx[0, 0, 1, :n[0, 0, 1]].tolist(), fn.tolist()
([[[0, 3]]], [1, 2, 3], [[[1, 0]]])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowEnds:
    """Per q-block row (tensors of one shape ``[..., rows]``, int64): its first and last query's
    sequence start among the keys (``key_start_*``), key count (``keys_*``), position in the sequence
    (``pos_*``) and shift (``shift_*``: keys minus queries of its sequence), and whether both are of one
    sequence (``same``)."""

    key_start_a: Tensor
    keys_a: Tensor
    pos_a: Tensor
    shift_a: Tensor
    key_start_b: Tensor
    keys_b: Tensor
    pos_b: Tensor
    shift_b: Tensor
    same: Tensor


def in_window(keep, d, left: int, right: int):
    """The same window pair by pair, for the mods: ``keep`` where the key's offset ``d`` from the query's
    aligned position lies in ``[-left, right]`` (``-1``: unbounded on that side)."""
    if right >= 0:
        keep = keep & (d <= right)
    if left >= 0:
        keep = keep & (d >= -left)
    return keep


def in_index_window(keep, q_idx, kv_idx, left: int, right: int):
    """:func:`in_window` with ``d = kv_idx - q_idx``, written as comparisons of the indices themselves:
    ``kv_idx <= q_idx`` compiles to one predicate per pair, where the difference's compare, and-ed
    with a 64-bit one (a document mask's), became bit-packed predicates costing the H200 ~10% of a
    forward (docs/performance.md, 2026-12-02). ``left`` / ``right`` must keep ``q_idx +- them`` in int32."""
    if right >= 0:
        keep = keep & (kv_idx <= q_idx + right if right else kv_idx <= q_idx)
    if left >= 0:
        keep = keep & (kv_idx >= q_idx - left if left else kv_idx >= q_idx)
    return keep


def window_ranges(ends: RowEnds, left: int, right: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lo, hi, flo, fhi)``: key index ranges (global, half-open) every row's queries may see and all
    of them see, under the window ``(left, right)`` (``-1``: unbounded) with bottom-right alignment."""
    e = ends
    zero = torch.zeros_like(e.pos_a)

    def lowest(start, pos, shift):  # first visible key of the query at pos
        return start + (torch.clamp(pos + shift - left, min=0) if left >= 0 else zero)

    def highest(start, keys, pos, shift):  # one past its last visible key
        if right < 0:
            return start + keys
        return start + torch.minimum(torch.clamp(pos + shift + right + 1, min=0), keys)

    lo = lowest(e.key_start_a, e.pos_a, e.shift_a)
    hi = torch.maximum(highest(e.key_start_b, e.keys_b, e.pos_b, e.shift_b), lo)
    flo = lowest(e.key_start_a, e.pos_b, e.shift_a)
    fhi = highest(e.key_start_a, e.keys_a, e.pos_a, e.shift_a)
    fhi = torch.where(e.same, torch.maximum(fhi, flo), flo)  # rows spanning two sequences: no full block
    return lo, hi, flo, fhi


def lists_from_ranges(lo: Tensor, hi: Tensor, flo: Tensor, fhi: Tensor, kv_block: int,
                      num_kv_blocks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)`` (int32, BlockMask layout,
    ascending) of rows whose kept keys lie in ``[lo, hi)`` and include all of ``[flo, fhi)``."""
    blo = torch.div(lo, kv_block, rounding_mode="floor")
    bhi = torch.maximum(torch.div(hi + kv_block - 1, kv_block, rounding_mode="floor"), blo)
    fblo = torch.clamp(torch.div(flo + kv_block - 1, kv_block, rounding_mode="floor"), min=blo)
    fblo = torch.minimum(fblo, bhi)
    fbhi = torch.clamp(torch.div(fhi, kv_block, rounding_mode="floor"), max=bhi)
    fbhi = torch.maximum(fbhi, fblo)
    left_run = fblo - blo
    j = torch.arange(num_kv_blocks, device=lo.device)
    partial = torch.where(j < left_run[..., None], blo[..., None] + j, fbhi[..., None] + j - left_run[..., None])
    last = num_kv_blocks - 1
    kv_idx = torch.clamp(partial, max=last).to(torch.int32)
    full_idx = torch.clamp(fblo[..., None] + j, max=last).to(torch.int32)
    kv_num = (left_run + bhi - fbhi).to(torch.int32)
    return kv_num, kv_idx, (fbhi - fblo).to(torch.int32), full_idx
