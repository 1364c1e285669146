"""The Triton backend at the edges: ``AuxRequest(max_scores=True)``, empty query or key sequences,
infinite queries and keys; each against the reference backend and torch's own semantics."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from flexcomp import AuxRequest, create_block_mask, flex_attention
from flexcomp.masks import alibi, causal_mask, document_mask, sliding_window, softcap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}
REFERENCE = {"BACKEND": "reference"}
BOTH = AuxRequest(lse=True, max_scores=True)


def _qkv(B, H, L, S, D, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, H, n, D, device=DEVICE, dtype=dtype).requires_grad_(requires_grad) for n in (L, S, S)]


def _dense_max(q, k, score_mod, mask_mod, scale):
    """torch's definition (its math path): the row max of the post-mod scores, -inf where masked
    (on the CPU, where the mods' captured tensors live)."""
    q, k = q.detach().cpu(), k.detach().cpu()
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    ar = lambda n: torch.arange(n, device=q.device)  # noqa: E731
    b, h = ar(q.shape[0]).view(-1, 1, 1, 1), ar(q.shape[1]).view(1, -1, 1, 1)
    qi, ki = ar(q.shape[2]).view(1, 1, -1, 1), ar(k.shape[2]).view(1, 1, 1, -1)
    if score_mod is not None:
        s = torch.broadcast_to(score_mod(s, b, h, qi, ki), s.shape)
    if mask_mod is not None:
        s = torch.where(torch.broadcast_to(mask_mod(b, h, qi, ki), s.shape), s, -math.inf)
    return s.amax(-1)


def _empty_rows_mask(b, h, q_idx, kv_idx):
    return (q_idx % 3 != 1) & (kv_idx <= q_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score,mask", [(None, None), (softcap(2.0), causal_mask), (alibi(2), sliding_window(9)),
                                        (softcap(5.0), _empty_rows_mask)])
def test_max_scores_match_the_reference_and_torchs_definition(dtype, score, mask):
    q, k, v = _qkv(2, 2, 70, 90, 16, dtype)
    bm = create_block_mask(mask, None, None, 70, 90, device=DEVICE, BLOCK_SIZE=32) if mask else None
    out, aux = flex_attention(q, k, v, score_mod=score, block_mask=bm, return_aux=BOTH, kernel_options=TRITON)
    rout, raux = flex_attention(q, k, v, score_mod=score, block_mask=bm, return_aux=BOTH, kernel_options=REFERENCE)
    mx = aux.max_scores
    assert mx.dtype == raux.max_scores.dtype == aux.lse.dtype == (torch.float64 if dtype == torch.float64
                                                                  else torch.float32)
    assert mx.shape == (2, 2, 70) and not mx.requires_grad
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(mx, raux.max_scores, atol=tol, rtol=tol)
    want = _dense_max(q, k, score, mask, 0.25).to(mx.dtype)
    torch.testing.assert_close(mx.cpu(), want, atol=tol, rtol=tol)
    if mask is _empty_rows_mask:
        assert torch.isneginf(mx[:, :, 1::3]).all() and torch.isneginf(aux.lse[:, :, 1::3]).all()
    torch.testing.assert_close(out, rout, atol=tol, rtol=tol)


def test_max_scores_need_no_gradient_and_leave_the_backward_alone():
    # 80 queries: the prefill kernels for both (row maxima run on them; 64 or fewer would run the decode ones)
    q, k, v = _qkv(1, 2, 80, 80, 16, requires_grad=True)
    bm = create_block_mask(causal_mask, None, None, 80, 80, device=DEVICE, BLOCK_SIZE=32)
    grads = []
    for aux in (BOTH, AuxRequest(lse=True)):
        out, a = flex_attention(q, k, v, score_mod=softcap(3.0), block_mask=bm, return_aux=aux, kernel_options=TRITON)
        grads.append(torch.autograd.grad(out.sum() + a.lse.sum(), (q, k, v)))
        assert (a.max_scores is None) == (not aux.max_scores)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_max_scores_through_document_masks_with_full_blocks():
    """Full blocks skip the mask_mod: their scores count in the max just the same."""
    q, k, v = _qkv(1, 1, 256, 256, 16)
    mask = document_mask([150, 106])
    bm = create_block_mask(mask, None, None, 256, 256, device=DEVICE, BLOCK_SIZE=32)
    _, aux = flex_attention(q, k, v, block_mask=bm, return_aux=BOTH, kernel_options=TRITON)
    torch.testing.assert_close(aux.max_scores.cpu(), _dense_max(q, k, None, mask, 0.25).float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("L,S", [(0, 40), (40, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_sequences_behave_as_the_reference(L, S, dtype):
    got = []
    for options in (TRITON, REFERENCE):
        torch.manual_seed(1)
        q, k, v = _qkv(2, 2, L, S, 16, dtype, requires_grad=True)
        bias = torch.randn(2, device=DEVICE, dtype=dtype, requires_grad=True)
        out, aux = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[h], return_aux=BOTH,
                                  kernel_options=options)
        assert (aux.lse is None) == (aux.max_scores is None) == (L == 0)  # torch: None when empty
        loss = out.sum() + (torch.where(torch.isinf(aux.lse), 0.0, aux.lse).sum() if L else 0)
        got.append((out, aux.lse, aux.max_scores, *torch.autograd.grad(loss, (q, k, v, bias))))
    for name, a, b in zip(["out", "lse", "max", "dq", "dk", "dv", "dbias"], *got):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    if S == 0 and L > 0:
        assert (got[0][0] == 0).all() and torch.isneginf(got[0][1]).all() and torch.isneginf(got[0][2]).all()


def test_empty_sequences_launch_nothing(monkeypatch):
    import flexcomp.codegen.launch as launch

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(launch, "forward_launch", no_launch)
    q, k, v = _qkv(1, 1, 0, 16, 16, requires_grad=True)
    out = flex_attention(q, k, v, kernel_options=TRITON)
    out.sum().backward()
    assert out.shape == (1, 1, 0, 16) and (k.grad == 0).all()


def _torch_eager(q, k, v):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_flex.flex_attention(q, k, v, return_lse=True)


def test_infinite_keys_give_torchs_lse():
    """A +inf score makes its row's LSE +inf and its output NaN (torch's logsumexp); a -inf score
    drops out of its row; a row with every score -inf is empty (output 0, LSE -inf)."""
    q, k, v = _qkv(1, 1, 48, 40, 16)
    q[:, :, :, 0] = torch.where(torch.arange(48, device=DEVICE) % 2 == 0, 1.0, -1.0)
    k[:, :, 5, :] = 0.0
    k[:, :, 5, 0] = math.inf  # +inf for even queries, -inf for odd ones
    got = flex_attention(q, k, v, return_aux=BOTH, kernel_options=TRITON)
    ref = flex_attention(q, k, v, return_aux=BOTH, kernel_options=REFERENCE)
    for a, b in ((got[0], ref[0]), (got[1].lse, ref[1].lse), (got[1].max_scores, ref[1].max_scores)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, equal_nan=True)
    lse = got[1].lse[0, 0]
    assert torch.isposinf(lse[0::2]).all() and torch.isfinite(lse[1::2]).all()
    assert torch.isposinf(got[1].max_scores[0, 0, 0::2]).all()
    assert torch.isnan(got[0][0, 0, 0::2]).all() and torch.isfinite(got[0][0, 0, 1::2]).all()
    if DEVICE == "cpu":
        t_out, t_lse = _torch_eager(q, k, v)
        torch.testing.assert_close(got[1].lse, t_lse, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got[0], t_out, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_a_row_of_minus_infinite_scores_is_empty():
    q, k, v = _qkv(1, 1, 32, 32, 16)
    q[:, :, 3] = 0.0
    q[:, :, 3, 0] = 1.0
    k[:, :, :, 0] = -math.inf  # every score of query 3 is -inf, the others see NaN or inf: only row 3 is checked
    out, aux = flex_attention(q, k, v, return_aux=BOTH, kernel_options=TRITON)
    assert (out[0, 0, 3] == 0).all() and torch.isneginf(aux.lse[0, 0, 3]) and torch.isneginf(aux.max_scores[0, 0, 3])
    if DEVICE == "cpu":
        t_out, t_lse = _torch_eager(q, k, v)
        assert torch.isneginf(t_lse[0, 0, 3]) and (t_out[0, 0, 3] == 0).all()
