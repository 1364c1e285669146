"""Paged KV cache: torch's ``PagedAttention`` (``torch.nn.attention.experimental._paged_attention``), same
methods and semantics, over flexcomp's kernels.

The cache holds ``n_pages`` pages of ``page_size`` tokens, ``k_cache`` / ``v_cache`` ``[1, H, n_pages *
page_size, D]``, shared by up to ``max_batch_size`` sequences; ``page_table[b, logical_page]`` names the
physical page of each sequence's pages. Attention reads K and V where they lie, through the page
table: :meth:`PagedAttention.convert_logical_block_mask` turns a BlockMask over logical positions
(kv block = page) into one over physical pages, and the converted mask_mod / score_mod map a physical
key index back to its logical position before calling the user's mods, so mods are written for
logical positions, exactly as with torch. Nothing is gathered or copied; the kernels (prefill or
split-KV decode, chosen by the query length) walk the converted block lists.

Unlike torch's converted mods (which read ``self.physical_to_logical`` through the object, so flexcomp
would trace them every call), these capture the tables themselves: one trace serves every step, and
in-place updates of the tables (``reserve``, ``erase``) are read at run time.

>>> import torch
>>> from flexcomp import create_block_mask, flex_attention
>>> paged = PagedAttention(n_pages=8, page_size=16, max_batch_size=2, device="cpu")
>>> paged.reserve(torch.tensor([0]), torch.tensor(40))            # 3 pages for sequence 0
>>> paged.page_table[0, :4].tolist(), paged.capacity.tolist()
([2, 1, 0, -1], [48, 0])
>>> k_cache, v_cache = torch.zeros(1, 2, 8 * 16, 8), torch.zeros(1, 2, 8 * 16, 8)
>>> k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
>>> paged.assign(torch.tensor([0]), torch.arange(40).view(1, -1), k, v, k_cache, v_cache)
>>> logical = create_block_mask(lambda b, h, q, kv: kv < 40, 1, 1, 1, 48, device="cpu", BLOCK_SIZE=16)
>>> out = flex_attention(torch.randn(1, 2, 1, 8), k_cache, v_cache,
...                      block_mask=paged.convert_logical_block_mask(logical))
>>> out.shape
torch.Size([1, 2, 1, 8])
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .blockmask import BlockMask, noop_mask
from .errors import FlexcompError

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _cdiv(x, multiple):
    return (x + multiple - 1) // multiple


def _identity(score, b, h, q_idx, kv_idx):
    return score


class PagedAttention:
    """A paged KV cache's bookkeeping (torch's ``PagedAttention``: ``reserve``, ``erase``, ``assign``,
    ``convert_logical_block_mask``, ``get_mask_mod``, ``get_score_mod``).

    Args:
        n_pages: physical pages in the cache; page_size: tokens per page (16 to 256: the kv block
            size of the BlockMasks it converts); max_batch_size: sequences it can hold; device.

    Fields: ``page_table`` int64 ``[max_batch_size, n_pages]`` (logical page -> physical page, -1 none),
    ``physical_to_logical`` int64 ``[max_batch_size, n_pages]`` (the inverse, -1 none), ``capacity``
    int64 ``[max_batch_size]`` (tokens reserved), ``empty_pages`` (free physical pages, a list).
    """

    def __init__(self, n_pages: int, page_size: int, max_batch_size: int, device: str = "cuda") -> None:
        for name, value in (("n_pages", n_pages), ("page_size", page_size), ("max_batch_size", max_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FlexcompError(f"PagedAttention: {name} must be a positive int, got {value!r}")
        self.n_pages = n_pages
        self.page_size = page_size
        self.page_table = -torch.ones((max_batch_size, n_pages), dtype=torch.int64, device=device)
        self.capacity = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.empty_pages = list(range(n_pages - 1, -1, -1))
        self.physical_to_logical = -torch.ones((max_batch_size, n_pages), dtype=torch.int64, device=device)

    def reserve(self, batch_idx: Tensor, seq_len: Tensor) -> None:
        """Grow sequence ``batch_idx`` (shape ``(1)`` or 0-d) to hold ``seq_len`` tokens, taking free pages."""
        if seq_len <= self.capacity[batch_idx]:
            return
        num_pages = _cdiv(seq_len - self.capacity[batch_idx], self.page_size)
        if len(self.empty_pages) < num_pages:
            raise AssertionError(f"requested {int(num_pages)} pages but there are only {len(self.empty_pages)} "
                                 f"empty pages")
        start = self.capacity[batch_idx] // self.page_size
        end = start + num_pages
        n = int(num_pages)
        pages = torch.tensor(self.empty_pages[-n:], device=self.page_table.device)
        self.empty_pages = self.empty_pages[:-n]
        self.page_table[batch_idx, int(start):int(end)] = pages
        self.physical_to_logical[batch_idx, pages] = torch.arange(int(start), int(end), device=self.page_table.device)
        self.capacity[batch_idx] += num_pages * self.page_size

    def erase(self, batch_idx: Tensor) -> None:
        """Free every page of sequence ``batch_idx`` (shape ``(1)``). (torch's version clears
        ``physical_to_logical`` in a copy, leaving the freed pages mapped; here they are cleared.)"""
        allocated = self.page_table[batch_idx] != -1
        pages = self.page_table[batch_idx][allocated]
        self.capacity[batch_idx] = 0
        self.empty_pages += pages.tolist()
        self.physical_to_logical[batch_idx.view(-1, 1), pages.view(1, -1)] = -1
        self.page_table[batch_idx] = -1

    def assign(self, batch_idx: Tensor, input_pos: Tensor, k_val: Tensor, v_val: Tensor, k_cache: Tensor,
               v_cache: Tensor) -> None:
        """Write ``k_val`` / ``v_val`` ``[B, H, S, D]`` of sequences ``batch_idx`` ``[B]`` at logical
        positions ``input_pos`` ``[B, S]`` into ``k_cache`` / ``v_cache`` ``[1, H, n_pages * page_size, D]``."""
        if k_val.requires_grad:
            raise RuntimeError("val must not require gradient")
        B, H, S, K_D = k_val.shape
        V_D = v_val.shape[3]
        checks = (("batch_idx's batch size", batch_idx.shape[0], B), ("k_cache's heads", k_cache.shape[1], H),
                  ("input_pos's length", input_pos.shape[1], S), ("k_cache's head dim", k_cache.shape[3], K_D),
                  ("v_cache's head dim", v_cache.shape[3], V_D))
        for what, got, want in checks:
            if got != want:
                raise RuntimeError(f"PagedAttention.assign: {what} must match the values' ({want}), got {got}")
        logical_page = input_pos // self.page_size
        in_page = input_pos % self.page_size
        physical = torch.gather(self.page_table[batch_idx], 1, logical_page.to(torch.int64)).to(torch.int32)
        addr = (physical * self.page_size + in_page).view(-1)
        k_cache[:, :, addr, :] = k_val.permute(1, 0, 2, 3).contiguous().view(1, H, B * S, K_D)
        v_cache[:, :, addr, :] = v_val.permute(1, 0, 2, 3).contiguous().view(1, H, B * S, V_D)

    def convert_logical_block_mask(self, block_mask: BlockMask, batch_idx: Optional[Tensor] = None,
                                   kv_len: Optional[Tensor] = None) -> BlockMask:
        """The BlockMask over physical pages of ``block_mask`` (over logical positions, kv block size =
        ``page_size``): each listed kv block becomes its physical page; the mask_mod becomes
        :meth:`get_mask_mod` of it (``kv_len`` ``[B]``: keys past it are masked). ``batch_idx`` ``[B]``:
        the sequences the mask's batch rows are (default ``0..B-1``). Shape ``[B, H, Q_LEN, n_pages *
        page_size]``; the q-side lists are derived only if a backward asks."""
        B, H, rows, width = block_mask.kv_indices.shape
        if block_mask.BLOCK_SIZE[1] != self.page_size:
            raise RuntimeError(f"Expect block_mask has the same column block size as page_size but got "
                               f"size={block_mask.BLOCK_SIZE[1]} and size={self.page_size}")
        device = block_mask.kv_num_blocks.device
        if batch_idx is None:
            batch_idx = torch.arange(B, device=device)
        table = self.page_table[batch_idx]

        def physical(indices: Tensor) -> Tensor:
            out = torch.zeros((B, H, rows, self.n_pages), dtype=torch.int32, device=device)
            pages = torch.gather(table, 1, indices.reshape(B, -1).to(torch.int64))
            out[:, :, :, :width] = pages.view(indices.shape).to(torch.int32)
            return out

        full_num = full_idx = None
        if block_mask.full_kv_num_blocks is not None:
            full_num, full_idx = block_mask.full_kv_num_blocks.clone(), physical(block_mask.full_kv_indices)
        return BlockMask._build(block_mask.kv_num_blocks.clone(), physical(block_mask.kv_indices), full_num, full_idx,
                                block_mask.BLOCK_SIZE, self.get_mask_mod(block_mask.mask_mod, kv_len),
                                (block_mask.seq_lengths[0], self.n_pages * self.page_size), True)

    def get_mask_mod(self, mask_mod: Optional[MaskMod], kv_len: Optional[Tensor] = None) -> MaskMod:
        """``mask_mod`` (over logical key positions; None: keep all) over physical ones: keys of pages
        no sequence owns, or past ``kv_len[b]``, are masked."""
        mask_mod = noop_mask if mask_mod is None else mask_mod
        logical_of = _logical_index(self.physical_to_logical, self.page_size, kv_len)

        def paged_mask_mod(b, h, q_idx, physical_kv_idx):
            logical, valid = logical_of(b, physical_kv_idx)
            return torch.where(valid, mask_mod(b, h, q_idx, logical), False)

        return paged_mask_mod

    def get_score_mod(self, score_mod: Optional[ScoreMod], kv_len: Optional[Tensor] = None) -> ScoreMod:
        """``score_mod`` (over logical key positions; None: identity) over physical ones; scores of keys
        no sequence owns, or past ``kv_len[b]``, are -inf."""
        score_mod = _identity if score_mod is None else score_mod
        logical_of = _logical_index(self.physical_to_logical, self.page_size, kv_len)

        def paged_score_mod(score, b, h, q_idx, physical_kv_idx):
            logical, valid = logical_of(b, physical_kv_idx)
            return torch.where(valid, score_mod(score, b, h, q_idx, logical), float("-inf"))

        return paged_score_mod


def _logical_index(physical_to_logical: Tensor, page_size: int, kv_len: Optional[Tensor]):
    """``(b, physical_kv_idx) -> (logical_kv_idx, valid)`` over the captured table (not the object:
    mods closing over tensors are traced once)."""
    def logical_of(b, physical_kv_idx):
        page = physical_to_logical[b, physical_kv_idx // page_size]
        logical = page * page_size + physical_kv_idx % page_size
        valid = (page >= 0) & (logical >= 0)
        if kv_len is not None:
            valid = valid & (logical < kv_len[b])
        return logical, valid

    return logical_of
