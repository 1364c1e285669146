"""The gallery of flexcomp.masks factories (patterns, spatial, bias) against independent references.

Every mask_mod is checked three ways: ``create_mask`` against a dense mask built here by plain
Python loops over positions (not by the factory's formula), ``create_block_mask`` against torch's
own ``create_block_mask`` block lists, and ``flex_attention`` (reference backend) against a dense
float64 softmax. ``relative_position_bias`` is also checked for its gradient into the table.
"""
from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp import create_block_mask, create_mask, flex_attention
from flexcomp.masks import (block_diffusion_mask, causal_mask, dilated_sliding_window, global_tokens, natten_mask,
                            relative_position_bias, shared_prefix_mask, sliding_tile_mask, sliding_window)

REFERENCE = {"BACKEND": "reference"}
HEAD_DIM = 8


# ---- dense references, one loop over (query, key) pairs each --------------------------------------
def _dense(L, S, keep) -> torch.Tensor:
    """``[L, S]`` bool with ``keep(q, kv)`` at every pair."""
    return torch.tensor([[bool(keep(q, kv)) for kv in range(S)] for q in range(L)], dtype=torch.bool)


def ref_dilated(window, dilation):
    def dense(L, S):
        seen = lambda q: {q - j * dilation for j in range(window)}  # noqa: E731
        return _dense(L, S, lambda q, kv: kv in seen(q))
    return dense


def ref_global(n, window=None):
    def dense(L, S):
        inner = (lambda q, kv: kv <= q) if window is None else (lambda q, kv: 0 <= q - kv <= window)
        return _dense(L, S, lambda q, kv: q < n or kv < n or inner(q, kv))
    return dense


def _window_start(pos, kernel, size):
    """First index of a ``kernel``-long window around ``pos``, shifted to stay inside ``[0, size)``."""
    return min(max(pos - kernel // 2, 0), size - kernel)


def ref_natten(height, width, kh, kw):
    def dense(L, S):
        def keep(q, kv):
            (qr, qc), (kr, kc) = divmod(q, width), divmod(kv, width)
            r0, c0 = _window_start(qr, kh, height), _window_start(qc, kw, width)
            return r0 <= kr < r0 + kh and c0 <= kc < c0 + kw
        return _dense(L, S, keep)
    return dense


def ref_sta(height, width, th, tw, kth, ktw, text_len=0):
    tiles_h, tiles_w, n_image = height // th, width // tw, height * width

    def dense(L, S):
        def keep(q, kv):
            if q >= n_image:                       # text query: every image and text key
                return kv < n_image + text_len
            if kv >= n_image:                      # image query, text key
                return kv < n_image + text_len
            (qr, qc), (kr, kc) = divmod(q // (th * tw), tiles_w), divmod(kv // (th * tw), tiles_w)
            r0, c0 = _window_start(qr, kth, tiles_h), _window_start(qc, ktw, tiles_w)
            return r0 <= kr < r0 + kth and c0 <= kc < c0 + ktw
        return _dense(L, S, keep)
    return dense


def ref_block_diffusion(bs, n):
    def dense(L, S):
        def keep(q, kv):
            q_clean, kv_clean = q >= n, kv >= n
            bq, bkv = (q - n * q_clean) // bs, (kv - n * kv_clean) // bs
            if not q_clean and not kv_clean:       # noisy -> noisy: own block only
                return bq == bkv
            if not q_clean:                        # noisy -> clean: strictly earlier blocks
                return bkv < bq
            if not kv_clean:                       # clean -> noisy: never
                return False
            return bkv <= bq                       # clean -> clean: block causal
        return _dense(L, S, keep)
    return dense


def ref_shared_prefix(prefix_len, doc_ids):
    ids = doc_ids.tolist()

    def dense_row(row, L, S):
        return _dense(L, S, lambda q, kv: kv <= q and (kv < prefix_len or row[q] == row[kv]))

    def dense(L, S):
        if isinstance(ids[0], list):
            return torch.stack([dense_row(row, L, S) for row in ids]).unsqueeze(1)  # [B, 1, L, S]
        return dense_row(ids, L, S)
    return dense


# ---- the cases: (mask_mod, dense reference, [(B, H, L, S), ...]) ----------------------------------
SHARED_IDS = torch.tensor([-1] * 20 + [0] * 15 + [1] * 25 + [2] * 10)
SHARED_IDS_2D = torch.stack([SHARED_IDS, torch.tensor([-1] * 20 + [5] * 30 + [4] * 20)])
SHARED_IDS_INTERLEAVED = torch.tensor([-1] * 12 + [0, 1, 2] * 12)

CASES = {
    "dilated_4x3": (dilated_sliding_window(4, 3), ref_dilated(4, 3), [(None, None, 70, 70), (1, 1, 50, 83)]),
    "dilated_7x1": (dilated_sliding_window(7, 1), ref_dilated(7, 1), [(None, None, 64, 64)]),
    "dilated_5x8": (dilated_sliding_window(5, 8), ref_dilated(5, 8), [(None, None, 96, 96), (1, 1, 83, 40)]),
    "global_causal": (global_tokens(5), ref_global(5), [(None, None, 70, 70), (1, 1, 40, 90)]),
    "global_window": (global_tokens(3, inner=sliding_window(6)), ref_global(3, 6), [(None, None, 80, 80)]),
    "natten_6x10_k3x5": (natten_mask(6, 10, 3, 5), ref_natten(6, 10, 3, 5), [(None, None, 60, 60)]),
    "natten_8x8_k5x3": (natten_mask(8, 8, 5, 3), ref_natten(8, 8, 5, 3), [(None, None, 64, 64)]),
    "natten_5x7_full": (natten_mask(5, 7, 5, 7), ref_natten(5, 7, 5, 7), [(None, None, 35, 35)]),
    "sta_8x12_t2x3_k3x2": (sliding_tile_mask(8, 12, 2, 3, 3, 2), ref_sta(8, 12, 2, 3, 3, 2), [(None, None, 96, 96)]),
    "sta_8x8_t2x2_k2x3": (sliding_tile_mask(8, 8, 2, 2, 2, 3), ref_sta(8, 8, 2, 2, 2, 3), [(None, None, 64, 64)]),
    "sta_text": (sliding_tile_mask(8, 8, 4, 2, 1, 3, text_len=10), ref_sta(8, 8, 4, 2, 1, 3, text_len=10),
                 [(None, None, 74, 74)]),
    "sta_16x16_t4x4_k3x3_aligned": (sliding_tile_mask(16, 16, 4, 4, 3, 3), ref_sta(16, 16, 4, 4, 3, 3),
                                    [(None, None, 256, 256)]),
    "block_diffusion_16_aligned": (block_diffusion_mask(16, 64), ref_block_diffusion(16, 64), [(None, None, 128, 128)]),
    "block_diffusion_4": (block_diffusion_mask(4, 24), ref_block_diffusion(4, 24), [(None, None, 48, 48)]),
    "block_diffusion_ragged": (block_diffusion_mask(7, 40), ref_block_diffusion(7, 40), [(None, None, 80, 80)]),
    "shared_prefix": (shared_prefix_mask(20, SHARED_IDS), ref_shared_prefix(20, SHARED_IDS), [(None, None, 70, 70)]),
    "shared_prefix_2d": (shared_prefix_mask(20, SHARED_IDS_2D), ref_shared_prefix(20, SHARED_IDS_2D),
                         [(2, 2, 70, 70)]),
    "shared_prefix_interleaved": (shared_prefix_mask(12, SHARED_IDS_INTERLEAVED),
                                  ref_shared_prefix(12, SHARED_IDS_INTERLEAVED), [(None, None, 48, 48)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_create_mask_matches_the_dense_reference(name):
    mask_mod, dense, sizes = CASES[name]
    for B, H, L, S in sizes:
        got = create_mask(mask_mod, B, H, L, S, device="cpu")
        want = torch.broadcast_to(dense(L, S), got.shape)
        bad = (got != want).nonzero()[:5].tolist()
        assert torch.equal(got, want), f"{name} B={B} H={H} L={L} S={S}: first differences (b, h, q, kv) {bad}"


def _assert_same_block_lists(fb, tb, what):
    """kv/q block counts equal, index rows equal up to the counts, for partial and full blocks."""
    for prefix in ("kv", "q"):
        for kind in ("", "full_"):
            counts, indices = f"{kind}{prefix}_num_blocks", f"{kind}{prefix}_indices"
            fc, tc = getattr(fb, counts), getattr(tb, counts)
            if tc is None:
                assert fc is None, f"{what}: {counts} should be None"
                continue
            assert fc.shape == tc.shape and torch.equal(fc, tc), f"{what}: {counts}\n{fc}\nvs torch\n{tc}"
            fi, ti = getattr(fb, indices), getattr(tb, indices)
            assert fi.shape == ti.shape, f"{what}: {indices} shape {tuple(fi.shape)} != {tuple(ti.shape)}"
            used = torch.arange(ti.shape[-1]) < tc.unsqueeze(-1)
            assert torch.equal(fi[used], ti[used]), f"{what}: {indices} differ within the counts"


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("name", list(CASES))
def test_create_block_mask_matches_torch(name, block):
    mask_mod, _, sizes = CASES[name]
    for B, H, L, S in sizes:
        fb = create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=block)
        tb = tfa.create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=block)
        _assert_same_block_lists(fb, tb, f"{name} B={B} H={H} L={L} S={S} BLOCK_SIZE={block}")


def _dense_attention(q, k, v, keep, bias=None):
    """float64 softmax attention with ``keep`` ``[.., L, S]`` and an optional additive ``bias``; empty rows give 0."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def _qkv(B, H, L, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, HEAD_DIM, dtype=torch.float64, generator=g) for n in (L, S, S)]


@pytest.mark.parametrize("name", list(CASES))
def test_flex_attention_forward_matches_dense(name):
    mask_mod, dense, sizes = CASES[name]
    B, H, L, S = sizes[0]
    B, H = B or 1, H or 2
    q, k, v = _qkv(B, H, L, S)
    bm = create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=16)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=REFERENCE)
    torch.testing.assert_close(out, _dense_attention(q, k, v, dense(L, S)), atol=1e-10, rtol=1e-10)


# ---- relative_position_bias ------------------------------------------------------------------------
def _dense_bias(table, max_distance, L, S):
    """``[H, L, S]`` bias: ``table[h, clamp(kv - q) + M]`` gathered pair by pair."""
    cols = [[min(max(kv - q, -max_distance), max_distance) + max_distance for kv in range(S)] for q in range(L)]
    return table[:, torch.tensor(cols)]


@pytest.mark.parametrize("L,S,M,causal", [(40, 40, 6, True), (33, 57, 4, False), (24, 24, 0, True)])
def test_relative_position_bias_forward_and_table_gradient(L, S, M, causal):
    B, H = 2, 3
    g = torch.Generator().manual_seed(1)
    table = torch.randn(H, 2 * M + 1, dtype=torch.float64, generator=g).requires_grad_()
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, L, S, seed=2))
    w = torch.randn(B, H, L, HEAD_DIM, dtype=torch.float64, generator=g)
    bm = create_block_mask(causal_mask, B, H, L, S, device="cpu", BLOCK_SIZE=16) if causal else None
    out = flex_attention(q, k, v, score_mod=relative_position_bias(table, M), block_mask=bm, kernel_options=REFERENCE)
    got = torch.autograd.grad((out * w).sum(), (table, q, k, v))

    keep = _dense(L, S, lambda qi, kv: kv <= qi) if causal else torch.ones(L, S, dtype=torch.bool)
    ref = _dense_attention(q, k, v, keep, bias=_dense_bias(table, M, L, S))
    want = torch.autograd.grad((ref * w).sum(), (table, q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(("table", "q", "k", "v"), got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, n=name: f"grad {n}: {m}")


def test_relative_position_bias_clips_distances():
    table = torch.arange(2 * 7, dtype=torch.float32).view(2, 7)
    mod = relative_position_bias(table, 3)
    q_idx, kv_idx = torch.tensor(10), torch.arange(20)
    got = mod(torch.zeros(()), 0, 1, q_idx, kv_idx)
    want = table[1, (kv_idx - q_idx).clamp(-3, 3) + 3]
    assert torch.equal(got, want) and got[0] == 7 and got[-1] == 13


# ---- names and arguments ---------------------------------------------------------------------------
def test_factories_have_descriptive_names():
    names = [dilated_sliding_window(4, 2), global_tokens(3), natten_mask(4, 6, 3, 3),
             sliding_tile_mask(4, 4, 2, 2, 1, 1),
             block_diffusion_mask(4, 16), shared_prefix_mask(2, torch.zeros(8, dtype=torch.int64)),
             relative_position_bias(torch.zeros(1, 5), 2)]
    assert [f.__name__ for f in names] == [
        "dilated_sliding_window_4_dilation_2", "global_tokens_3_causal_mask", "natten_4x6_k3x3",
        "sliding_tile_4x4_t2x2_k1x1", "block_diffusion_b4_n16", "shared_prefix_2", "relative_position_bias_2"]


@pytest.mark.parametrize("call,match", [
    (lambda: dilated_sliding_window(0, 2), "window must be a positive int, got 0"),
    (lambda: dilated_sliding_window(3, 0), "dilation must be a positive int, got 0"),
    (lambda: global_tokens(-1), "n_global must be a non-negative int, got -1"),
    (lambda: global_tokens(2, inner=3), "inner must be a mask_mod"),
    (lambda: natten_mask(4, 4, 2, 3), "kernel_h must be odd and at most 4, got 2"),
    (lambda: natten_mask(4, 4, 3, 5), "kernel_w must be odd and at most 4, got 5"),
    (lambda: natten_mask(0, 4, 1, 1), "height must be a positive int, got 0"),
    (lambda: sliding_tile_mask(6, 8, 4, 2, 1, 1), "tiles 4x2 must divide the image 6x8"),
    (lambda: sliding_tile_mask(8, 8, 2, 2, 5, 1), "larger than the 4x4 grid of tiles"),
    (lambda: sliding_tile_mask(8, 8, 2, 2, 1, 1, text_len=-1), "text_len must be a non-negative int"),
    (lambda: block_diffusion_mask(0, 8), "block_size must be a positive int, got 0"),
    (lambda: block_diffusion_mask(4, 2.0), "n_tokens must be a positive int, got 2.0"),
    (lambda: shared_prefix_mask(3, torch.zeros(2, 2, 2, dtype=torch.int64)), r"integer tensor \[S\] or \[B, S\]"),
    (lambda: shared_prefix_mask(3, torch.zeros(4)), r"integer tensor \[S\] or \[B, S\]"),
    (lambda: shared_prefix_mask(9, torch.zeros(4, dtype=torch.int64)), "prefix_len 9 is longer than the sequence"),
    (lambda: relative_position_bias(torch.zeros(2, 4), 2), r"table must be a tensor \[H, 5\]"),
    (lambda: relative_position_bias(torch.zeros(2, 5, dtype=torch.int64), 2), "table must be a float tensor"),
    (lambda: relative_position_bias(torch.zeros(2, 5), -1), "max_distance must be a non-negative int"),
])
def test_factory_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# tests/test_masks.py walks flexcomp.__path__ only, which (editable install) misses flexcomp.masks
@pytest.mark.parametrize("module", ["flexcomp.masks.patterns", "flexcomp.masks.spatial", "flexcomp.masks.bias"])
def test_gallery_docstring_examples_run(module):
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(importlib.import_module(module), optionflags=flags)
    assert result.failed == 0 and result.attempted > 0
