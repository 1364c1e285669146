"""flexcomp.paged.PagedAttention (torch's API) over the kernels: K and V read in place through the page
table, in prefill and decode, against the dense float64 oracle on each sequence's contiguous keys and
against torch's own PagedAttention flow (eager flex_attention, CPU)."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex
from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPaged

from flexcomp import create_block_mask, flex_attention
from flexcomp.paged import PagedAttention
from flexcomp.testing import dense_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}
H, HKV, D = 4, 2, 16


def _fill(paged, lengths, page_size, seed=0):
    """A cache holding ``lengths`` tokens per sequence, its pages shuffled; returns the caches and each
    sequence's contiguous keys and values."""
    random.Random(seed).shuffle(paged.empty_pages)
    n_pages = paged.n_pages
    k_cache = torch.randn(1, HKV, n_pages * page_size, D, device=DEVICE)
    v_cache = torch.randn(1, HKV, n_pages * page_size, D, device=DEVICE)
    ks, vs = [], []
    for b, n in enumerate(lengths):
        paged.reserve(torch.tensor([b], device=DEVICE), torch.tensor(n, device=DEVICE))
        k, v = torch.randn(1, HKV, n, D, device=DEVICE), torch.randn(1, HKV, n, D, device=DEVICE)
        paged.assign(torch.tensor([b], device=DEVICE), torch.arange(n, device=DEVICE).view(1, -1), k, v, k_cache,
                     v_cache)
        ks.append(k)
        vs.append(v)
    return k_cache, v_cache, ks, vs


@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("L", [1, 5, 80], ids=["decode1", "decode5", "prefill80"])
def test_paged_attention_matches_each_sequence_alone(page_size, L):
    lengths = [300, 90, 213]
    B, n_pages = len(lengths), 40 if page_size <= 32 else 12
    while n_pages * page_size < sum(-(-n // page_size) * page_size for n in lengths) + page_size:
        n_pages += 4
    paged = PagedAttention(n_pages, page_size, B, device=DEVICE)
    k_cache, v_cache, ks, vs = _fill(paged, lengths, page_size)
    ends = torch.tensor(lengths, device=DEVICE)
    slopes = torch.rand(H, device=DEVICE)

    def mask(b, h, q_idx, kv_idx):  # the queries are each sequence's last L tokens
        return (q_idx + ends[b] - L >= kv_idx) & (kv_idx < ends[b])

    def score(s, b, h, q_idx, kv_idx):
        return s - slopes[h] * (q_idx + ends[b] - L - kv_idx)

    max_len = max(lengths)
    logical = create_block_mask(mask, B, None, L, max_len, device=DEVICE, BLOCK_SIZE=(64, page_size))
    physical = paged.convert_logical_block_mask(logical)
    q = torch.randn(B, H, L, D, device=DEVICE)
    out = flex_attention(q, k_cache, v_cache, score_mod=paged.get_score_mod(score), block_mask=physical,
                         kernel_options=TRITON, enable_gqa=True)
    for b, n in enumerate(lengths):
        want, _ = dense_attention(q[b:b + 1], ks[b], vs[b], lambda s, bb, h, qi, kv: score(s, bb + b, h, qi, kv),
                                  lambda bb, h, qi, kv: mask(bb + b, h, qi, kv), enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=3e-5, rtol=3e-5)


def test_same_results_as_torchs_paged_attention_flow():
    """The same calls through torch's PagedAttention and eager flex_attention give the same output."""
    page_size, lengths = 32, [100, 64]
    B, n_pages = 2, 12
    ours = PagedAttention(n_pages, page_size, B, device=DEVICE)
    theirs = TorchPaged(n_pages, page_size, B, device=DEVICE)
    k_cache, v_cache, _, _ = _fill(ours, lengths, page_size)
    theirs.empty_pages = list(range(n_pages - 1, -1, -1))
    random.Random(0).shuffle(theirs.empty_pages)
    for b, n in enumerate(lengths):
        theirs.reserve(torch.tensor([b], device=DEVICE), torch.tensor(n, device=DEVICE))
    assert torch.equal(ours.page_table, theirs.page_table)
    ends = torch.tensor(lengths, device=DEVICE)

    def mask(b, h, q_idx, kv_idx):
        return (q_idx + ends[b] - 1 >= kv_idx) & (kv_idx < ends[b])

    q = torch.randn(B, H, 1, D, device=DEVICE)
    bm = create_block_mask(mask, B, None, 1, 128, device=DEVICE, BLOCK_SIZE=(32, page_size))
    got = flex_attention(q, k_cache, v_cache, block_mask=ours.convert_logical_block_mask(bm), kernel_options=TRITON,
                         enable_gqa=True)
    tbm = torch_flex.create_block_mask(mask, B, None, 1, 128, device=DEVICE, BLOCK_SIZE=(32, page_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torch_flex.flex_attention(q, k_cache, v_cache, block_mask=theirs.convert_logical_block_mask(tbm),
                                         enable_gqa=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_erase_frees_pages_and_unmaps_them():
    paged = PagedAttention(8, 16, 2, device=DEVICE)
    paged.reserve(torch.tensor([0], device=DEVICE), torch.tensor(40, device=DEVICE))
    paged.reserve(torch.tensor([1], device=DEVICE), torch.tensor(20, device=DEVICE))
    assert paged.capacity.tolist() == [48, 32] and len(paged.empty_pages) == 3
    pages = paged.page_table[0, :3].tolist()
    paged.erase(torch.tensor([0], device=DEVICE))
    assert (paged.page_table[0] == -1).all() and (paged.physical_to_logical[0] == -1).all()
    assert sorted(paged.empty_pages) == sorted([*pages, 5, 6, 7]) and paged.capacity.tolist() == [0, 32]
    with pytest.raises(AssertionError, match="only 6 empty pages"):
        paged.reserve(torch.tensor([0], device=DEVICE), torch.tensor(16 * 7, device=DEVICE))
    with pytest.raises(RuntimeError, match="page_size"):
        paged.convert_logical_block_mask(create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 64, 64, device=DEVICE,
                                                           BLOCK_SIZE=32))
