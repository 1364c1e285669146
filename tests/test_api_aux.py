"""Auxiliary outputs and non-finite inputs, on both backends, against torch and the dense oracle.

``return_aux=AuxRequest(max_scores=True)``: each row's largest score after score_mod and masking,
natural units, ``-inf`` for rows with nothing kept, the LSE's dtype, no gradient. torch refuses it on
CPU (NotImplementedError), so torch's side is its eager math implementation
(``torch._higher_order_ops.flex_attention.math_attention``, which the GPU kernels match), called
directly, plus flexcomp's dense float64 oracle.

The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py), or on the GPU.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch._higher_order_ops.flex_attention import math_attention
from torch.nn.attention import flex_attention as tfa

import flexcomp.api as api_module
from flexcomp import AuxOutput, AuxRequest, FlexcompError, create_block_mask
from flexcomp import flex_attention as _flex_attention
from flexcomp.masks import alibi, causal_mask, document_mask, sliding_window, softcap
from flexcomp.testing import dense_attention

BACKENDS = ["reference", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend: a GPU, or the interpreter


def flex_attention(q, k, v, *args, **kw):
    """flexcomp's flex_attention; calls on the triton backend run on the GPU where there is one (inputs
    moved there, results back to the CPU, gradients flowing through both moves)."""
    if DEVICE == "cpu" or (kw.get("kernel_options") or {}).get("BACKEND") != "triton":
        return _flex_attention(q, k, v, *args, **kw)
    if kw.get("block_mask") is not None:
        kw["block_mask"] = kw["block_mask"].to(DEVICE)
    res = _flex_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), *args, **kw)

    def back(x):
        if isinstance(x, torch.Tensor):
            return x.cpu()
        if isinstance(x, AuxOutput):
            return AuxOutput(*(back(y) for y in x))
        if isinstance(x, tuple):
            return tuple(back(y) for y in x)
        return x

    return back(res)
L = S = 96


def _qkv(B=2, H=2, Lq=L, Sk=S, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (Lq, Sk, Sk)]


def _rows_40_on(b, h, q_idx, kv_idx):
    """Queries before 40 see nothing: fully masked rows."""
    return (q_idx >= 40) & (kv_idx <= q_idx)


MODS = {
    "plain": (None, None),
    "causal_softcap": (softcap(8.0), causal_mask),
    "window_alibi": (alibi(2), sliding_window(20)),
    "documents": (None, document_mask([30, 50, 16])),
    "empty_rows": (softcap(5.0), _rows_40_on),
}


def _dense_scores(q, k, score_mod, mask_mod, scale):
    """Post-mod, masked scores in float64, calling the user's mods directly."""
    B, H, Lq, E = q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    ar = lambda n: torch.arange(n, dtype=torch.int32)  # noqa: E731
    b, h, qi, ki = ar(B).view(-1, 1, 1, 1), ar(H).view(1, -1, 1, 1), ar(Lq).view(1, 1, -1, 1), ar(k.shape[2]).view(1, 1, 1, -1)
    if score_mod is not None:
        s = torch.broadcast_to(score_mod(s, b, h, qi, ki), s.shape).double()
    if mask_mod is not None:
        s = torch.where(torch.broadcast_to(mask_mod(b, h, qi, ki), s.shape), s, -math.inf)
    return s


def _torch_math(q, k, v, score_mod, mask_mod, scale):
    """torch's eager flex_attention math (what its GPU kernels compute), stats back in natural log."""
    tbm = (tfa.create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device="cpu") if mask_mod
           else tfa._create_empty_block_mask(q, k))
    out, lse, mx = math_attention(q, k, v, score_mod or tfa._identity, tbm.as_tuple(), scale, {})
    return out, lse * math.log(2), mx * math.log(2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODS))
def test_max_scores_match_torch_math_and_the_oracle(backend, name):
    score_mod, mask_mod = MODS[name]
    q, k, v = _qkv()
    bm = create_block_mask(mask_mod, None, None, L, S, device="cpu", BLOCK_SIZE=32) if mask_mod else None
    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options={"BACKEND": backend},
                              return_aux=AuxRequest(lse=True, max_scores=True))
    assert isinstance(aux, AuxOutput)
    mx = aux.max_scores
    assert mx.shape == (2, 2, L) and mx.dtype == torch.float32 and not mx.requires_grad
    expected = _dense_scores(q, k, score_mod, mask_mod, 0.25).amax(-1)
    assert torch.equal(torch.isneginf(mx), torch.isneginf(expected))
    torch.testing.assert_close(mx.double(), expected, atol=2e-5, rtol=2e-5)
    t_out, t_lse, t_max = _torch_math(q, k, v, score_mod, mask_mod, 0.25)
    torch.testing.assert_close(mx, t_max.float(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(aux.lse, t_lse.float(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, t_out, atol=2e-5, rtol=2e-5)
    if name == "empty_rows":
        assert torch.isneginf(mx[:, :, :40]).all() and torch.isfinite(mx[:, :, 40:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_scores_against_the_other_backend_with_gqa_and_ragged_lengths(backend):
    q, k, v = _qkv(B=1, H=4, Lq=80, Sk=112)
    k, v = k[:, :2], v[:, :2]
    bm = create_block_mask(sliding_window(30), 1, 4, 80, 112, device="cpu", BLOCK_SIZE=16)
    _, aux = flex_attention(q, k, v, score_mod=alibi(4), block_mask=bm, enable_gqa=True, scale=0.4,
                            kernel_options={"BACKEND": backend}, return_aux=AuxRequest(max_scores=True))
    assert aux.lse is None
    ref = _dense_scores(q, k.repeat_interleave(2, 1), alibi(4), sliding_window(30), 0.4).amax(-1)
    torch.testing.assert_close(aux.max_scores.double(), ref, atol=2e-5, rtol=2e-5)


def test_max_scores_float64_is_float64_and_exact():
    q, k, v = _qkv(dtype=torch.float64)
    _, aux = flex_attention(q, k, v, score_mod=softcap(8.0), return_aux=AuxRequest(max_scores=True))
    assert aux.max_scores.dtype == torch.float64
    torch.testing.assert_close(aux.max_scores, _dense_scores(q, k, softcap(8.0), None, 0.25).amax(-1),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_scores_carry_no_gradient_and_training_still_works(backend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    bm = create_block_mask(causal_mask, None, None, L, S, device="cpu", BLOCK_SIZE=32)
    out, aux = flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": backend},
                              return_aux=AuxRequest(lse=True, max_scores=True))
    assert not aux.max_scores.requires_grad and aux.lse.requires_grad
    (out.sum() + aux.lse.sum()).backward()
    ro, rl = dense_attention(q, k, v, None, causal_mask)
    gq = torch.autograd.grad(ro.sum() + rl.sum(), q)[0]
    torch.testing.assert_close(q.grad.double(), gq.double(), atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_without_gradients_runs_outside_autograd_with_the_same_values(backend):
    """Inference (no_grad, or no input needing a gradient) takes the backend's forward directly; a
    captured tensor that needs a gradient still makes the call differentiable."""
    q, k, v = _qkv()
    bias = torch.randn(L, dtype=torch.float32)
    bm = create_block_mask(causal_mask, None, None, L, S, device="cpu", BLOCK_SIZE=32)
    call = lambda *t, **kw: flex_attention(*t, block_mask=bm, kernel_options={"BACKEND": backend},  # noqa: E731
                                           return_aux=AuxRequest(lse=True), **kw)
    plain_out, plain_aux = call(q, k, v)
    with torch.no_grad():
        ng_out, ng_aux = call(*(t.clone().requires_grad_() for t in (q, k, v)))
    grad_out, grad_aux = call(*(t.clone().requires_grad_() for t in (q, k, v)))
    assert plain_out.grad_fn is None and ng_out.grad_fn is None and plain_aux.lse.grad_fn is None
    assert grad_out.grad_fn is not None
    for a, b in ((plain_out, grad_out), (ng_out, grad_out), (plain_aux.lse, grad_aux.lse)):
        assert torch.equal(a, b.detach())
    bias.requires_grad_()
    out = call(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[kv])[0]
    assert out.grad_fn is not None
    (db,) = torch.autograd.grad(out.sum(), bias)
    ro, _ = dense_attention(q, k, v, lambda s, b, h, qi, kv: s + bias[kv], causal_mask)
    torch.testing.assert_close(db, torch.autograd.grad(ro.sum(), bias)[0].float(), atol=1e-4, rtol=1e-4)

# ---- return_lse / return_aux as torch ----------------------------------------------------------
def test_return_forms_match_torch():
    q, k, v = _qkv(B=1, H=2, Lq=16, Sk=16, D=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in ({}, {"return_lse": True}, {"return_aux": AuxRequest()}, {"return_aux": AuxRequest(lse=True)},
                   {"return_aux": tfa.AuxRequest(lse=True)}):
            ours, theirs = flex_attention(q, k, v, **kw), tfa.flex_attention(q, k, v, **kw)
            assert type(ours) is type(theirs) or (isinstance(ours, tuple) and isinstance(theirs, tuple))
            if isinstance(theirs, tuple):
                assert len(ours) == len(theirs)
                if "return_aux" in kw:
                    assert tuple(ours[1]._fields) == tuple(theirs[1]._fields)
                    assert (ours[1].lse is None) == (theirs[1].lse is None) and ours[1].max_scores is None
                    if theirs[1].lse is not None:
                        torch.testing.assert_close(ours[1].lse, theirs[1].lse)
                else:
                    torch.testing.assert_close(ours[1], theirs[1])
        # no queries: torch returns the empty LSE as None
        for kw in ({"return_lse": True}, {"return_aux": AuxRequest(lse=True, max_scores=True)}):
            ours = flex_attention(q[:, :, :0], k, v, **kw)
            lse = ours[1] if "return_lse" in kw else ours[1].lse
            assert ours[0].shape == (1, 2, 0, 8) and lse is None
        assert tfa.flex_attention(q[:, :, :0], k, v, return_lse=True)[1] is None


def test_return_lse_with_return_aux_is_torchs_value_error():
    q, k, v = _qkv(B=1, H=1, Lq=8, Sk=8, D=8)
    for aux in (AuxRequest(lse=True), AuxRequest()):
        with pytest.raises(ValueError, match="Cannot specify both return_lse and return_aux") as ours:
            flex_attention(q, k, v, return_lse=True, return_aux=aux)
        with pytest.raises(ValueError, match="Cannot specify both return_lse and return_aux"):
            tfa.flex_attention(q, k, v, return_lse=True, return_aux=aux)
        assert isinstance(ours.value, FlexcompError)


def test_return_lse_warns_futurewarning_once_as_torch(monkeypatch):
    monkeypatch.setattr(api_module, "_WARNINGS_SHOWN", set())
    q, k, v = _qkv(B=1, H=1, Lq=8, Sk=8, D=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flex_attention(q, k, v, return_lse=True)
        flex_attention(q, k, v, return_lse=True)
        flex_attention(q, k, v, return_aux=AuxRequest(lse=True))
    future = [w for w in caught if w.category is FutureWarning]
    assert len(future) == 1
    assert str(future[0].message) == ("return_lse is deprecated and will be removed in v2.10. "
                                      "Please use return_aux=AuxRequest(lse=True) instead.")
    assert future[0].filename == __file__  # points at the caller


# ---- inf and nan in the inputs: torch eager's values ---------------------------------------------
def _inf_cases():
    """(name, q, k, v) with +-inf / nan placed in a key row, a key entry, a query entry, a value entry."""
    q, k, v = _qkv(B=1, H=2, Lq=32, Sk=32, D=16, seed=3)
    cases = []
    for val, tag in ((math.inf, "+inf"), (-math.inf, "-inf"), (math.nan, "nan")):
        kk = k.clone(); kk[0, 0, 3, 0] = val  # noqa: E702
        cases.append((f"k_entry{tag}", q, kk, v))
        kk = k.clone(); kk[0, 1, 5, :] = val  # noqa: E702
        cases.append((f"k_row{tag}", q, kk, v))
        qq = q.clone(); qq[0, 0, 1, 0] = val  # noqa: E702
        cases.append((f"q_entry{tag}", qq, k, v))
        vv = v.clone(); vv[0, 0, 3, 2] = val  # noqa: E702
        cases.append((f"v_entry{tag}", q, k, vv))
    return cases


INF_CASES = _inf_cases()


def _same_nonfinite(a, b):
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isposinf(a), torch.isposinf(b))
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(a) & torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(INF_CASES)), ids=[c[0] for c in INF_CASES])
def test_inf_and_nan_inputs_give_torch_eagers_out_and_lse(backend, case):
    """A row with a +inf score has LSE +inf (torch's logsumexp) and output NaN; NaN stays NaN."""
    _, q, k, v = INF_CASES[case]
    bm = create_block_mask(causal_mask, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    tbm = tfa.create_block_mask(causal_mask, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    for ours_bm, theirs_bm in ((None, None), (bm, tbm)):
        out, aux = flex_attention(q, k, v, block_mask=ours_bm, kernel_options={"BACKEND": backend},
                                  return_aux=AuxRequest(lse=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_out, t_lse = tfa.flex_attention(q, k, v, block_mask=theirs_bm, return_lse=True)
        _same_nonfinite(aux.lse, t_lse)
        _same_nonfinite(out, t_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_mod_returning_inf_gives_torchs_lse(backend):
    q, k, v = _qkv(B=1, H=2, Lq=32, Sk=32, D=16)

    def spike(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx == kv_idx) & (h == 0), math.inf, score)

    out, aux = flex_attention(q, k, v, score_mod=spike, kernel_options={"BACKEND": backend},
                              return_aux=AuxRequest(lse=True, max_scores=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_out, t_lse = tfa.flex_attention(q, k, v, score_mod=spike, return_lse=True)
    _same_nonfinite(aux.lse, t_lse)
    _same_nonfinite(out, t_out)
    assert torch.isposinf(aux.max_scores[:, 0]).all() and torch.isfinite(aux.max_scores[:, 1]).all()


# ---- zero lengths: the reference's answers on both backends ------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Sk", [(0, 32), (32, 0), (0, 0)])
@pytest.mark.parametrize("masked", [False, True])
def test_zero_lengths(backend, Lq, Sk, masked):
    """No queries: empty output; no keys: output 0 and LSE -inf (torch eager fails on KV_LEN=0)."""
    q, k, v = _qkv(B=1, H=2, Lq=Lq, Sk=Sk, D=16)
    bm = create_block_mask(causal_mask, 1, 2, Lq, Sk, device="cpu", BLOCK_SIZE=16) if masked else None
    out, aux = flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": backend},
                              return_aux=AuxRequest(lse=True, max_scores=True))
    assert out.shape == (1, 2, Lq, 16)
    if Lq == 0:
        assert aux.lse is None and aux.max_scores is None
    else:
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(aux.lse).all() and torch.isneginf(aux.max_scores).all()
