"""flexcomp.flash_attn and flexcomp.sdpa against oracles written here from flash-attn's and SDPA's
documented semantics (dense float64, autograd): outputs, LSE, probabilities and every gradient."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcomp.errors import FlexcompError
from flexcomp.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                 flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                 flash_attn_varlen_qkvpacked_func)
from flexcomp.sdpa import scaled_dot_product_attention

F64 = torch.float64


def oracle(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, slopes=None, drop=None):
    """flash-attn's documented semantics, dense: q [B, Lq, H, D], k / v [B, Lk, Hk, D] -> (out, lse [B, H, Lq])."""
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    kk = k.repeat_interleave(H // Hk, dim=2)
    vv = v.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    if slopes is not None:
        sl = slopes.to(F64).expand(B, H) if slopes.dim() == 2 else slopes.to(F64).view(1, H).expand(B, H)
        s = s - sl.view(B, H, 1, 1) * (i + Lk - Lq - j).abs()
    left, right = window[0], 0 if causal else window[1]
    d = j - i - (Lk - Lq)
    keep = torch.ones(Lq, Lk, dtype=torch.bool)
    if right >= 0:
        keep &= d <= right
    if left >= 0:
        keep &= d >= -left
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    if drop is not None:  # (keep [B, H, Lq, Lk], probability): the kept pairs weighted 1 / (1 - p)
        keep, prob = drop
        p = torch.where(keep, p / (1 - prob), 0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vv), lse


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=F64).requires_grad_(grad)


def check_grads(got, want, inputs):
    do = torch.randn_like(want)
    g1 = torch.autograd.grad(got, inputs, do, allow_unused=True)
    g2 = torch.autograd.grad(want, inputs, do, allow_unused=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


CASES = [
    dict(),
    dict(causal=True),
    dict(window=(3, 0)),
    dict(window=(2, 5)),
    dict(window=(-1, 1)),
    dict(softcap=5.0),
    dict(slopes="h"),
    dict(slopes="bh"),
    dict(causal=True, window=(4, -1), softcap=3.0, slopes="bh"),
    dict(scale=0.3, causal=True),
]


@pytest.mark.parametrize("Lq,Lk", [(9, 9), (7, 13), (13, 7)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_flash_attn_func_matches_the_documented_semantics(case, Lq, Lk):
    kw = dict(CASES[case])
    B, H, Hk, D = 2, 4, 2, 16
    if kw.get("slopes") == "h":
        kw["slopes"] = torch.rand(H)
    elif kw.get("slopes") == "bh":
        kw["slopes"] = torch.rand(B, H)
    q, k, v = rand(B, Lq, H, D), rand(B, Lk, Hk, D), rand(B, Lk, Hk, D)
    want, lse = oracle(q, k, v, **kw)
    got = flash_attn_func(q, k, v, softmax_scale=kw.get("scale"), causal=kw.get("causal", False),
                          window_size=kw.get("window", (-1, -1)), softcap=kw.get("softcap", 0.0),
                          alibi_slopes=kw.get("slopes"))
    assert got.shape == (B, Lq, H, D)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    check_grads(got, want, (q, k, v))


@pytest.mark.parametrize("D", [64, 128, 256])
def test_head_dims(D):
    q, k, v = rand(1, 6, 2, D), rand(1, 6, 2, D), rand(1, 6, 2, D)
    want, _ = oracle(q, k, v, causal=True)
    got = flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    check_grads(got, want, (q, k, v))


def test_return_attn_probs_gives_lse_and_probabilities():
    q, k, v = rand(2, 5, 2, 8, grad=False), rand(2, 7, 2, 8, grad=False), rand(2, 7, 2, 8, grad=False)
    want, lse = oracle(q, k, v, causal=True, softcap=4.0)
    out, got_lse, probs = flash_attn_func(q, k, v, causal=True, softcap=4.0, return_attn_probs=True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got_lse.to(F64), lse, atol=1e-6, rtol=1e-6)
    assert probs.shape == (2, 2, 5, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5, dtype=probs.dtype), atol=1e-5, rtol=0)
    assert probs[..., 0, 4:].abs().max() == 0  # causal, bottom-right: query 0 sees keys 0..2


def test_rows_with_no_key_give_zero_output_and_gradient():
    q, k, v = rand(1, 6, 2, 8), rand(1, 3, 2, 8), rand(1, 3, 2, 8)  # causal, Lq > Lk: the first 3 rows see nothing
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    want, _ = oracle(q, k, v, causal=True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :3], torch.zeros_like(q.grad[:, :3]))


def test_packed_variants_and_deterministic():
    qkv = rand(2, 7, 3, 2, 8, grad=False)
    want, _ = oracle(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, causal=True), want, atol=1e-10, rtol=1e-8)
    q, kv = rand(2, 5, 4, 8, grad=False), rand(2, 7, 2, 2, 8, grad=False)
    want, _ = oracle(q, kv[:, :, 0], kv[:, :, 1], window=(2, 1))
    torch.testing.assert_close(flash_attn_kvpacked_func(q, kv, window_size=(2, 1)), want, atol=1e-10, rtol=1e-8)
    a = flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], deterministic=True)
    assert torch.equal(a, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], deterministic=True))


# ---- varlen --------------------------------------------------------------------------------------
def varlen_oracle(q, k, v, lq, lk, slopes=None, **kw):
    """Each sequence through :func:`oracle` on its own (its own lengths, alignment and ALiBi row)."""
    outs, lses, cq, ck = [], [], 0, 0
    for i, (a, b) in enumerate(zip(lq, lk)):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[i:i + 1])
        o, lse = oracle(q[None, cq:cq + a], k[None, ck:ck + b], v[None, ck:ck + b], slopes=sl, **kw)
        outs.append(o[0])
        lses.append(lse[0])
        cq, ck = cq + a, ck + b
    return torch.cat(outs), torch.cat(lses, dim=-1)


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


VARLEN = [
    dict(causal=True),
    dict(),
    dict(window=(3, 2)),
    dict(causal=True, softcap=4.0),
    dict(slopes="h", causal=True),
    dict(slopes="bh", window=(5, 0)),
]


@pytest.mark.parametrize("case", range(len(VARLEN)))
def test_varlen_with_ragged_q_and_kv_packings(case):
    kw = dict(VARLEN[case])
    lq, lk = [5, 1, 12, 7], [9, 4, 12, 3]  # different packings for q and kv; Lq > Lk in the last one
    H, Hk, D = 4, 2, 16
    if kw.get("slopes") == "h":
        kw["slopes"] = torch.rand(H)
    elif kw.get("slopes") == "bh":
        kw["slopes"] = torch.rand(len(lq), H)
    q, k, v = rand(sum(lq), H, D), rand(sum(lk), Hk, D), rand(sum(lk), Hk, D)
    want, lse = varlen_oracle(q, k, v, lq, lk, **kw)
    got = flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), max(lq), max(lk), causal=kw.get("causal", False),
                                 window_size=kw.get("window", (-1, -1)), softcap=kw.get("softcap", 0.0),
                                 alibi_slopes=kw.get("slopes"))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    check_grads(got, want, (q, k, v))
    _, got_lse, _ = flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), max(lq), max(lk), causal=kw.get("causal", False),
                                           window_size=kw.get("window", (-1, -1)), softcap=kw.get("softcap", 0.0),
                                           alibi_slopes=kw.get("slopes"), return_attn_probs=True)
    finite = torch.isfinite(lse)
    torch.testing.assert_close(got_lse.to(F64)[finite], lse[finite], atol=1e-6, rtol=1e-6)


def test_varlen_packed_variants():
    lens = [3, 8, 5]
    qkv = rand(sum(lens), 3, 2, 8, grad=False)
    want, _ = varlen_oracle(qkv[:, 0], qkv[:, 1], qkv[:, 2], lens, lens, causal=True)
    got = flash_attn_varlen_qkvpacked_func(qkv, cu(lens), max(lens), causal=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    lk = [4, 2, 6]
    q, kv = rand(sum(lens), 2, 8, grad=False), rand(sum(lk), 2, 2, 8, grad=False)
    want, _ = varlen_oracle(q, kv[:, 0], kv[:, 1], lens, lk, causal=True)
    got = flash_attn_varlen_kvpacked_func(q, kv, cu(lens), cu(lk), max(lens), max(lk), causal=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 9)), min_size=1, max_size=4),
       causal=st.booleans(), left=st.integers(-1, 4), right=st.integers(-1, 4), softcap=st.sampled_from([0.0, 3.0]),
       alibi=st.booleans())
def test_varlen_fuzz(lengths, causal, left, right, softcap, alibi):
    lq, lk = [a for a, _ in lengths], [b for _, b in lengths]
    q, k, v = rand(sum(lq), 2, 8, grad=False), rand(max(sum(lk), 1), 2, 8, grad=False), rand(max(sum(lk), 1), 2, 8,
                                                                                         grad=False)
    k, v = k[:sum(lk)], v[:sum(lk)]
    slopes = torch.rand(2) if alibi else None
    want, _ = varlen_oracle(q, k, v, lq, lk, causal=causal, window=(left, right), softcap=softcap, slopes=slopes)
    got = flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), max(lq), max(lk), causal=causal, window_size=(left, right),
                                 softcap=softcap, alibi_slopes=slopes)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_new_packings_reuse_the_traced_mask(monkeypatch):
    from flexcomp import trace as trace_module

    runs = []
    real = trace_module.Tracer.run
    monkeypatch.setattr(trace_module.Tracer, "run", lambda self: runs.append(1) or real(self))
    q = rand(20, 2, 8, grad=False)
    flash_attn_varlen_func(q, q, q, cu([5, 15]), cu([5, 15]), 15, 15, causal=True)
    first = len(runs)
    for lens in ([10, 10], [1, 2, 17], [20]):  # other packings, other numbers of sequences: no new trace
        flash_attn_varlen_func(q, q, q, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    assert first >= 1 and len(runs) == first

def test_one_cu_seqlens_tensor_builds_its_packing_once_and_an_in_place_change_rebuilds():
    """A model's layers pass one cu_seqlens tensor: its BlockMask is built once; writing into the tensor
    (its version counter moves) or passing another tensor builds anew, never a stale mask."""
    from flexcomp import flash_attn as fa

    built = []
    real = fa._build_packing
    q, k, v = (rand(12, 2, 8) for _ in range(3))
    c = cu([5, 7])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa, "_build_packing", lambda *a: built.append(1) or real(*a))
        first = fa._packed(c, c, 12, 12, -1, 0, c.device)
        assert fa._packed(c, c, 12, 12, -1, 0, c.device) is first and len(built) == 1
        assert fa._packed(c, c, 12, 12, 4, 0, c.device) is not first  # another window
        c[1] = 9  # in place: lengths 9 and 3
        got = flash_attn_varlen_func(q, k, v, c, c, 9, 9, causal=True)
        assert len(built) == 3
        assert fa._packed(c.clone(), c.clone(), 12, 12, -1, 0, c.device) is not first
    want, _ = varlen_oracle(q, k, v, [9, 3], [9, 3], causal=True)
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-10, rtol=1e-8)



DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the list kernels: a GPU, or Triton's interpreter


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.tuples(st.sampled_from([0, 1, 5, 100, 130, 300]), st.sampled_from([0, 3, 100, 257])),
                        min_size=1, max_size=5),
       same=st.booleans(), window=st.sampled_from([(-1, 0), (-1, -1), (64, 0), (1, 1), (0, 300), (200, 7)]))
def test_packing_lists_from_the_kernels_equal_the_torch_ops(lengths, same, window):
    """A packing's BlockMask by the varlen kernels (block-kind map, then ordered lists; the q lists when
    first read) holds the torch-op path's lists: kv, full kv, q and full q, counts and orders."""
    from flexcomp import flash_attn as fa
    from flexcomp.codegen import blockmask as on_device

    lq = [a for a, _ in lengths]
    lk = lq if same else [b for _, b in lengths]
    if sum(lq) == 0 or sum(lk) == 0:
        return
    cq = cu(lq).to(DEVICE)
    ck = cq if same else cu(lk).to(DEVICE)
    made = {}
    for backend in ("reference", "triton"):
        launched = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLEXCOMP_BACKEND", backend)
            real = on_device.varlen_lists
            mp.setattr(on_device, "varlen_lists", lambda *a, real=real: launched.append(1) or real(*a))
            bm = fa._build_packing(cq, ck, sum(lq), sum(lk), *window, torch.device(DEVICE)).block_mask
            fields = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                      bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]
        assert bool(launched) == (backend == "triton")
        made[backend] = fields
    for name, ref, got in zip(("kv_num", "kv_idx", "full_num", "full_idx", "q_num", "q_idx", "full_q_num",
                               "full_q_idx"), made["reference"], made["triton"]):
        if name.endswith("idx"):  # the listed prefix of every row (the tails are unread; the kernels' follow torch)
            n = made["reference"][("kv_idx", "full_idx", "q_idx", "full_q_idx").index(name) * 2]
            keep = torch.arange(ref.shape[-1], device=ref.device) < n.unsqueeze(-1)
            assert torch.equal(torch.where(keep, ref, -1), torch.where(keep, got, -1)), name
        else:
            assert torch.equal(ref, got), name


def test_varlen_on_the_list_kernels_matches_the_oracle(monkeypatch):
    """Attention and gradients over a packing whose lists the kernels built (CPU: the interpreter runs
    the attention kernels too), separate q and kv packings and a window."""
    monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")
    lq, lk = [70, 1, 130], [90, 40, 130]
    q, k, v = rand(sum(lq), 2, 16).to(DEVICE), rand(sum(lk), 2, 16).to(DEVICE), rand(sum(lk), 2, 16).to(DEVICE)
    got = flash_attn_varlen_func(q, k, v, cu(lq).to(DEVICE), cu(lk).to(DEVICE), max(lq), max(lk), causal=True,
                                 window_size=(50, 0))
    do = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), do)
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    want, _ = varlen_oracle(qd, kd, vd, lq, lk, causal=True, window=(50, 0))
    wants = torch.autograd.grad(want, (qd, kd, vd), do.double().cpu())
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-8, rtol=1e-8)
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g.double().cpu(), w, atol=1e-8, rtol=1e-8)


def test_errors_name_the_argument():
    q = rand(1, 4, 2, 8, grad=False)
    with pytest.raises(FlexcompError, match=r"dropout_p must be a float in \[0, 1\), got 1.0"):
        flash_attn_func(q, q, q, dropout_p=1.0)
    with pytest.raises(FlexcompError, match=r"q must be \[batch, seqlen, nheads, headdim\]"):
        flash_attn_func(q[0], q, q)
    with pytest.raises(FlexcompError, match="window_size"):
        flash_attn_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(FlexcompError, match="alibi_slopes"):
        flash_attn_func(q, q, q, alibi_slopes=torch.rand(3))
    with pytest.raises(FlexcompError, match="multiple of nheads"):
        flash_attn_func(rand(1, 4, 3, 8), q, q)
    with pytest.raises(FlexcompError, match="cu_seqlens_q"):
        flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([[0, 4]]), torch.tensor([[0, 4]]), 4, 4)


# ---- SDPA ----------------------------------------------------------------------------------------
def sdpa_oracle(q, k, v, mask=None, causal=False, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


MASKS = {
    "none": None,
    "bool [L, S]": lambda B, H, L, S: torch.rand(L, S) > 0.3,
    "bool [B, 1, 1, S] (padding)": lambda B, H, L, S: torch.arange(S).view(1, 1, 1, S) < torch.tensor([S, S - 3]).view(
        B, 1, 1, 1),
    "bool [B, H, L, S]": lambda B, H, L, S: torch.rand(B, H, L, S) > 0.2,
    "float [L, S]": lambda B, H, L, S: torch.randn(L, S, dtype=F64),
    "float [1, H, L, S]": lambda B, H, L, S: torch.randn(1, H, L, S, dtype=F64),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(MASKS))
def test_sdpa_matches_torch(name, causal):
    B, H, L, S = 2, 4, 9, 9 if causal else 11
    mask = MASKS[name](B, H, L, S) if MASKS[name] else None
    q, k, v = rand(B, H, L, 16), rand(B, 2, S, 16), rand(B, 2, S, 16)
    tril = torch.ones(L, S, dtype=torch.bool).tril()
    if causal and mask is not None and mask.dtype == torch.bool:  # torch refuses both at once: the intersection
        want = sdpa_oracle(q, k, v, mask & tril)
    elif causal and mask is not None:  # a float mask added, and the causal pairs only
        want = sdpa_oracle(q, k, v, mask + torch.zeros(L, S, dtype=F64).masked_fill(~tril, float("-inf")))
    else:
        want = sdpa_oracle(q, k, v, mask, causal)
    got = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    rows = ~torch.isnan(want).any(-1, keepdim=True)  # torch gives NaN where a row keeps nothing; flexcomp 0
    torch.testing.assert_close(torch.where(rows, got, 0.0), torch.where(rows, want, 0.0), atol=1e-10, rtol=1e-8)
    assert torch.equal(got[~rows.expand_as(got)], torch.zeros_like(got[~rows.expand_as(got)]))
    if bool(rows.all()):
        check_grads(got, want, (q, k, v))


def test_sdpa_scale_and_errors():
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, scale=0.2), sdpa_oracle(q, k, v, scale=0.2),
                               atol=1e-10, rtol=1e-8)
    with pytest.raises(FlexcompError, match="enable_gqa"):
        scaled_dot_product_attention(rand(1, 4, 5, 8), k, v)
    with pytest.raises(FlexcompError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(FlexcompError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=-0.5)


INTERPRETER_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors on the Triton backend need "
                                      "Triton's interpreter; test_the_gpu_kernels_* runs the kernels on CUDA")


@INTERPRETER_ONLY
def test_the_generated_kernels_run_these_mods(monkeypatch):
    """The Triton backend (the interpreter here) on the varlen and batched mods, float32."""
    monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")
    lq, lk = [5, 11, 7], [9, 3, 7]
    q, k, v = (torch.randn(sum(n), 2, 16) for n in (lq, lk, lk))
    slopes = torch.rand(2)
    want, _ = varlen_oracle(q.double(), k.double(), v.double(), lq, lk, causal=True, softcap=4.0, slopes=slopes)
    got = flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), 11, 9, causal=True, softcap=4.0, alibi_slopes=slopes)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    q, k, v = torch.randn(1, 9, 4, 16), torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16)
    want, _ = oracle(q.double(), k.double(), v.double(), window=(3, 2))
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(3, 2)).double(), want, atol=2e-5, rtol=1e-4)


# ---- dropout -------------------------------------------------------------------------------------
def _keep(seed, p, B, H, L, S):
    from flexcomp.dropout import Dropout, keep_mask

    ar = torch.arange
    return keep_mask(Dropout(p, seed), ar(B).view(-1, 1, 1, 1), ar(H).view(1, -1, 1, 1), ar(L).view(1, 1, -1, 1),
                     ar(S).view(1, 1, 1, -1))


def _used(p):
    """The probability the kernels drop with: ``p`` rounded to 1/256 (flexcomp.dropout)."""
    from flexcomp.dropout import Dropout

    return Dropout(p, 0).p_used


def _seed_of_next_call():
    """The seed flexcomp draws for the next call (torch's generator state restored)."""
    state = torch.random.get_rng_state()
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    torch.random.set_rng_state(state)
    return seed


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["no score_mod", "softcap"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETER_ONLY)])
def test_dropout_output_and_gradients_follow_the_keep_pattern(backend, softcap, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_BACKEND", backend)
    B, L, S, H, D, p = 2, 37, 45, 2, 16, 0.3  # q and kv past 16: every byte of the hash
    dt = F64 if backend == "reference" else torch.float32
    q, k, v = (torch.randn(B, n, H, D, dtype=dt, requires_grad=True) for n in (L, S, S))
    keep = _keep(_seed_of_next_call(), p, B, H, L, S)
    got = flash_attn_func(q, k, v, dropout_p=p, causal=True, softcap=softcap)
    want, _ = oracle(q.double(), k.double(), v.double(), causal=True, softcap=softcap, drop=(keep, _used(p)))
    tol = dict(atol=1e-10, rtol=1e-8) if dt == F64 else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), want, **tol)
    do = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got.double(), (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a.double(), b.double(), **tol)


def test_dropout_probability_is_rounded_to_256ths_and_weighted_exactly():
    from flexcomp.dropout import Dropout

    assert [Dropout(p, 0).threshold for p in (0.0, 0.001, 0.1, 0.25, 0.5, 0.999)] == [0, 1, 26, 64, 128, 255]
    d = Dropout(0.1, 0)
    assert d.p_used == 26 / 256 and d.scale == 1 / (1 - 26 / 256)


def test_dropout_keep_rate_and_determinism():
    p = 0.1
    keep = _keep(1234, p, 4, 8, 256, 256)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - _used(p))) < 0.002  # 2M pairs: the standard error is 0.0002
    per_row = keep.double().mean(-1)
    assert per_row.min() > 0.75 and per_row.max() < 1.0  # no row or column structure
    assert abs(keep[..., :128].double().mean().item() - keep[..., 128:].double().mean().item()) < 0.01
    # pairs sharing a hash ({q, q + 8} x {kv, kv + 8}) and neighbours are independent: at p = 0.5
    # every joint keep rate is 1/4 (2M pairs: standard errors ~0.0003)
    k = _keep(99, 0.5, 4, 8, 256, 256).double()
    assert abs(k.mean().item() - 0.5) < 0.002
    for dq, dk in ((0, 1), (0, 8), (1, 0), (8, 0), (8, 8), (1, 1), (0, 16), (16, 0)):
        both = (k[..., :256 - dq, :256 - dk] * k[..., dq:, dk:]).mean().item()
        assert abs(both - 0.25) < 0.003, (dq, dk, both)
    for sq in (0, 8):  # each byte of the hash keeps at the same rate
        for sk in (0, 8):
            sel = k.view(4, 8, 16, 16, 16, 16)[:, :, :, sq // 8 * 8:sq // 8 * 8 + 8, :, sk:sk + 8]
            assert abs(sel.mean().item() - 0.5) < 0.004
    q = rand(1, 16, 2, 8, grad=False)
    torch.manual_seed(5)
    a = flash_attn_func(q, q, q, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(a, flash_attn_func(q, q, q, dropout_p=0.5))
    assert not torch.equal(a, flash_attn_func(q, q, q, dropout_p=0.5))  # the next call: a new seed


def test_dropout_in_varlen_sdpa_and_attn_probs():
    lens = [4, 9]
    q, k, v = rand(13, 2, 8), rand(13, 2, 8), rand(13, 2, 8)
    seed = _seed_of_next_call()
    got, lse, probs = flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), 9, 9, dropout_p=0.4, causal=True,
                                             return_attn_probs=True)
    keep = _keep(seed, 0.4, 1, 2, 13, 13)[0]
    same = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))
    causal = torch.arange(13).view(-1, 1) >= torch.arange(13).view(1, -1)
    mask = (same.view(-1, 1) == same.view(1, -1)) & causal
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(8)
    pr = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    want = torch.einsum("hij,jhd->ihd", torch.where(keep, pr / (1 - _used(0.4)), 0.0), v)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    assert bool((probs[0][~keep & mask] < 0).all()) and bool((probs[0][keep & mask] > 0).all())  # S_dmask's sign
    qb, kb, vb = rand(1, 2, 6, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    seed = _seed_of_next_call()
    got = scaled_dot_product_attention(qb, kb, vb, dropout_p=0.25, is_causal=True)
    keep = _keep(seed, 0.25, 1, 2, 6, 6)
    pr = torch.softmax((qb @ kb.transpose(-1, -2) / math.sqrt(8)).masked_fill(~torch.ones(6, 6).tril().bool(),
                                                                            float("-inf")), -1)
    torch.testing.assert_close(got, torch.where(keep, pr / (1 - _used(0.25)), 0.0) @ vb, atol=1e-10, rtol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_kernels_drop_the_same_pairs_forward_and_backward(dtype):
    """On CUDA: varlen with ragged q / kv packings, GQA, causal and dropout, against the float64 oracle
    with the keep pattern the reference regenerates (grads through the backward kernels)."""
    lq, lk, H, Hk, D, p = [70, 200, 33], [90, 150, 33], 4, 2, 64, 0.2
    q, k, v = (torch.randn(sum(n), h, D, device="cuda", dtype=dtype, requires_grad=True)
               for n, h in ((lq, H), (lk, Hk), (lk, Hk)))
    seed = _seed_of_next_call()
    got = flash_attn_varlen_func(q, k, v, cu(lq).cuda(), cu(lk).cuda(), 200, 150, dropout_p=p, causal=True)
    keep = _keep(seed, p, 1, H, sum(lq), sum(lk))[0]
    outs, c_q, c_k = [], 0, 0
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    for a, b in zip(lq, lk):
        kp = keep[:, c_q:c_q + a, c_k:c_k + b].unsqueeze(0)
        o, _ = oracle(qd[c_q:c_q + a][None], kd[c_k:c_k + b][None], vd[c_k:c_k + b][None], causal=True,
                      drop=(kp, _used(p)))
        outs.append(o[0])
        c_q, c_k = c_q + a, c_k + b
    want = torch.cat(outs)
    tol = dict(atol=3e-3, rtol=3e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.double().cpu(), want, **tol)
    do = torch.randn_like(want)
    ours = torch.autograd.grad(got, (q, k, v), do.to("cuda", dtype))
    for a, b in zip(ours, torch.autograd.grad(want, (qd, kd, vd), do)):
        torch.testing.assert_close(a.double().cpu(), b, **tol)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=6),
       st.sampled_from([(-1, 0), (-1, -1), (50, 0), (0, 40), (130, 7), (-1, 3), (5, -1)]))
def test_varlen_block_lists_bound_the_mask(lens, window):
    """The packing's lists (built from row ranges) never miss a kept pair and never call a block full
    that holds a dropped pair, for ragged q / kv packings and windows; outputs match the oracle."""
    from flexcomp.blockmask_lists import ordered_to_dense
    from flexcomp.flash_attn import _packing, _varlen_block_mask

    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    tq, tk = sum(lq), sum(lk)
    if tq == 0 or tk == 0:
        return
    cq, ck = cu(lq), cu(lk)
    doc_q, pos_q, len_q = _packing(cq, tq)
    doc_k, pos_k, len_k = _packing(ck, tk)
    shift = (len_k - len_q)[doc_q]
    d = pos_k.view(1, -1) - pos_q.view(-1, 1) - shift.view(-1, 1)
    keep = doc_q.view(-1, 1) == doc_k.view(1, -1)
    left, right = window
    if right >= 0:
        keep &= d <= right
    if left >= 0:
        keep &= d >= -left
    bm = _varlen_block_mask(None, doc_q, pos_q, shift, ck.long(), len_k, tq, tk, left, right)
    nq, nk = -(-tq // 128), -(-tk // 128)
    listed = ordered_to_dense(bm.kv_num_blocks, bm.kv_indices, nk)[0, 0].bool()
    full = ordered_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, nk)[0, 0].bool()
    padded = torch.zeros(nq * 128, nk * 128, dtype=torch.bool)
    padded[:tq, :tk] = keep
    blocks = padded.view(nq, 128, nk, 128)
    assert not (listed & full).any()
    assert ((listed | full) | ~blocks.any(3).any(1)).all()  # every block with a kept pair is listed
    real = torch.zeros(nq * 128, nk * 128, dtype=torch.bool)
    real[:tq, :tk] = True
    truly_full = (blocks | ~real.view(nq, 128, nk, 128)).all(3).all(1)  # padding counts as kept
    assert (~full | truly_full).all()


@pytest.mark.parametrize("window,causal", [((-1, -1), True), ((90, 10), False), ((200, -1), False)])
def test_varlen_across_many_blocks_against_the_oracle(window, causal):
    lq, lk = [300, 1, 170, 240], [260, 40, 170, 400]
    q, k, v = rand(sum(lq), 2, 8), rand(sum(lk), 1, 8), rand(sum(lk), 1, 8)
    slopes = torch.rand(2)  # float32: flash-attn's slopes are float32
    got = flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), 300, 400, causal=causal, window_size=window,
                                 alibi_slopes=slopes)
    want, _ = varlen_oracle(q, k, v, lq, lk, causal=causal, window=window, slopes=slopes)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_one_packing_for_queries_and_keys_with_window_and_alibi():
    """The same cu_seqlens tensor for both: the mods compare global indices directly (no shift table)."""
    lens = [300, 1, 170, 240]
    c = cu(lens)
    q, k, v = rand(sum(lens), 2, 8), rand(sum(lens), 2, 8), rand(sum(lens), 2, 8)
    slopes = torch.rand(2)
    got = flash_attn_varlen_func(q, k, v, c, c, 300, 300, window_size=(90, 10), alibi_slopes=slopes)
    want, _ = varlen_oracle(q, k, v, lens, lens, window=(90, 10), slopes=slopes)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
