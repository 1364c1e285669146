"""flexcomp.flash_attn.flash_attn_with_kvcache against an oracle written from flash-attn's documented
semantics (dense float64, one sequence at a time): appending in place, cache rows, paged caches,
left padding, rotary embeddings, windows, soft-cap, ALiBi, GQA, the LSE; the decode kernels too."""
from __future__ import annotations

import random

import pytest
import torch

from flexcomp.errors import FlexcompError
from flexcomp.flash_attn import flash_attn_with_kvcache
from test_flash_attn import oracle  # tests/ is on sys.path

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rope(x, cos, sin, pos, interleaved):
    """flash-attn's rotary embedding, written out: x [L, H, D] at positions pos [L]."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    r = x[..., :rd]
    if interleaved:
        x1, x2 = r[..., 0::2], r[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = r[..., : rd // 2], r[..., rd // 2:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([out, x[..., rd:]], -1)


def _case(B=3, Lq=1, new=1, H=4, Hk=2, D=16, S=96, dtype=F64):
    old = torch.tensor([5, 40, 77][:B])
    q = torch.randn(B, Lq, H, D, dtype=dtype)
    k = torch.randn(B, new, Hk, D, dtype=dtype) if new else None
    v = torch.randn(B, new, Hk, D, dtype=dtype) if new else None
    kc, vc = torch.randn(B + 1, S, Hk, D, dtype=dtype), torch.randn(B + 1, S, Hk, D, dtype=dtype)
    return q, k, v, kc, vc, old


def _want(q, kc, vc, rows, seqlen, leftpad=None, slopes=None, **kw):
    outs, lses = [], []
    for b in range(q.shape[0]):
        lo = 0 if leftpad is None else int(leftpad[b])
        o, lse = oracle(q[b:b + 1].double(), kc[rows[b], lo:int(seqlen[b])][None].double(),
                        vc[rows[b], lo:int(seqlen[b])][None].double(),
                        slopes=None if slopes is None else slopes[b:b + 1], **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(7, 2)), dict(causal=True, softcap=3.0),
                                dict(causal=True, slopes=True), dict()], ids=["causal", "window", "softcap",
                                                                              "alibi", "none"])
@pytest.mark.parametrize("Lq,new", [(1, 1), (3, 3), (2, 0)])
def test_append_and_attend_against_the_oracle(kw, Lq, new):
    q, k, v, kc, vc, old = _case(Lq=Lq, new=new)
    rows = torch.tensor([2, 0, 3])
    kc0, vc0 = kc.clone(), vc.clone()
    slopes = torch.rand(3, 4) if kw.get("slopes") else None
    window = kw.get("window", (-1, -1))
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=old.to(torch.int32), cache_batch_idx=rows,
                                       causal=kw.get("causal", False), window_size=window,
                                       softcap=kw.get("softcap", 0.0), alibi_slopes=slopes, return_softmax_lse=True)
    for b in range(3):  # appended in place at old[b], nothing else touched
        if new:
            kc0[rows[b], old[b]:old[b] + new], vc0[rows[b], old[b]:old[b] + new] = k[b], v[b]
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
    want, want_lse = _want(q, kc, vc, rows, old + new, causal=kw.get("causal", False), window=window,
                           softcap=kw.get("softcap", 0.0), slopes=None if slopes is None else slopes.double())
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("page", [16, 32])
def test_paged_cache_through_the_block_table(page):
    B, Hk, D, pages = 3, 2, 16, 24
    q, k, v, _, _, old = _case(B=B, Lq=2, new=2)
    kc, vc = torch.randn(pages, page, Hk, D, dtype=F64), torch.randn(pages, page, Hk, D, dtype=F64)
    order = list(range(pages))
    random.Random(page).shuffle(order)
    table = torch.tensor(order[:B * 6], dtype=torch.int32).view(B, 6)  # 6 pages per sequence, shuffled
    out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=old, block_table=table, causal=True)
    flat_k = kc[table.long()].reshape(B, 6 * page, Hk, D)  # each sequence's logical keys
    flat_v = vc[table.long()].reshape(B, 6 * page, Hk, D)
    assert torch.equal(flat_k[torch.arange(B).view(-1, 1), old.view(-1, 1) + torch.arange(2)], k)
    want, _ = _want(q, flat_k, flat_v, torch.arange(B), old + 2, causal=True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)


def test_left_padding_and_rotary_embeddings():
    q, k, v, kc, vc, old = _case(Lq=1, new=1)
    leftpad = torch.tensor([2, 30, 0])
    out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=old, cache_leftpad=leftpad, causal=True)
    want, _ = _want(q, kc, vc, torch.arange(3), old + 1, leftpad=leftpad, causal=True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    for interleaved in (True, False):
        q, k, v, kc, vc, old = _case(Lq=2, new=2)
        cos, sin = torch.randn(128, 6, dtype=F64), torch.randn(128, 6, dtype=F64)  # rotary_dim 12 of 16
        kc0 = kc.clone()
        out = flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=old,
                                      causal=True, rotary_interleaved=interleaved)
        qr = torch.stack([rope(q[b], cos, sin, old[b] + torch.arange(2), interleaved) for b in range(3)])
        for b in range(3):
            kc0[b, old[b]:old[b] + 2] = rope(k[b], cos, sin, old[b] + torch.arange(2), interleaved)
        torch.testing.assert_close(kc, kc0, atol=1e-12, rtol=1e-12)
        want, _ = _want(qr, kc, vc, torch.arange(3), old + 2, causal=True)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)


def test_the_decode_kernels_serve_it(monkeypatch):
    """float32 on the Triton backend (the interpreter here): one query per sequence, GQA, paged."""
    if DEVICE == "cpu":
        monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")
    B, Hk, D, page, pages = 2, 2, 16, 32, 20
    q = torch.randn(B, 1, 4, D, device=DEVICE)
    k, v = torch.randn(B, 1, Hk, D, device=DEVICE), torch.randn(B, 1, Hk, D, device=DEVICE)
    kc, vc = torch.randn(pages, page, Hk, D, device=DEVICE), torch.randn(pages, page, Hk, D, device=DEVICE)
    table = torch.randperm(pages, device=DEVICE)[:B * 8].view(B, 8).to(torch.int32)
    old = torch.tensor([100, 250], device=DEVICE)
    out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=old, block_table=table, causal=True, softcap=4.0)
    flat_k = kc[table.long()].reshape(B, 8 * page, Hk, D).cpu()
    flat_v = vc[table.long()].reshape(B, 8 * page, Hk, D).cpu()
    want, _ = _want(q.cpu(), flat_k, flat_v, torch.arange(B), (old + 1).cpu(), causal=True, softcap=4.0)
    torch.testing.assert_close(out.cpu().double(), want, atol=2e-5, rtol=2e-5)


def test_bad_arguments_name_what_is_wrong():
    q, k, v, kc, vc, old = _case()
    with pytest.raises(FlexcompError, match="k and v must be given together"):
        flash_attn_with_kvcache(q, kc, vc, k, None, cache_seqlens=old)
    with pytest.raises(FlexcompError, match="rotary_cos and rotary_sin"):
        flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=torch.ones(8, 2), cache_seqlens=old)
    with pytest.raises(FlexcompError, match="first two dims contiguous"):
        flash_attn_with_kvcache(q, kc.transpose(0, 1), vc.transpose(0, 1), cache_seqlens=torch.tensor([1, 2, 3]))
    with pytest.raises(FlexcompError, match="must fit the cache"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([5, 96, 7]))
