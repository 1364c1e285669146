"""float64 through the generated Triton kernels (Triton's interpreter on CPU, the real thing on a
GPU): output, LSE and every gradient (q, k, v, captured tensors) against the dense float64 oracle
at float64 tolerances, and ``torch.autograd.gradcheck`` through the Triton backend."""
from __future__ import annotations

import pytest
import torch

from flexcomp import and_masks, create_block_mask, flex_attention
from flexcomp.masks import alibi, causal_mask, document_mask, sliding_window, softcap
from flexcomp.testing import dense_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}
TOL = 1e-10


def _leaves(*shapes):
    return [torch.randn(*s, device=DEVICE, dtype=torch.float64).requires_grad_() for s in shapes]


def _project(out, lse, seed=0):
    """A random projection of out and the finite LSE entries: both feed the backward."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.device)
    return (out * w_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * w_lse).sum()


def _check(q, k, v, score_mod=None, mask_mod=None, bs=32, extra=(), options=None, enable_gqa=False, tol=TOL):
    """Everything the kernels produce for float64 inputs against the dense float64 oracle.

    Captured tensors (``extra``, the masks') live on the CPU: flexcomp moves them to the kernels'
    device and sends their gradients back, so the oracle runs on the CPU, on copies of q, k, v."""
    L, S = q.shape[2], k.shape[2]
    bm = create_block_mask(mask_mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=bs) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True,
                              kernel_options=options or TRITON, enable_gqa=enable_gqa)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    got = [g.cpu() for g in torch.autograd.grad(_project(out, lse), (q, k, v, *extra))]
    cq, ck, cv = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    ro, rl = dense_attention(cq, ck, cv, score_mod, mask_mod, enable_gqa=enable_gqa)
    want = torch.autograd.grad(_project(ro, rl), (cq, ck, cv, *extra))
    out, lse = out.detach().cpu(), lse.detach().cpu()
    torch.testing.assert_close(out, ro, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    torch.testing.assert_close(lse, rl, atol=tol, rtol=tol)
    for name, g, r in zip(["dq", "dk", "dv"] + [f"d extra[{i}]" for i in range(len(extra))], got, want):
        assert g.dtype == torch.float64, name
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, r / scale, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return got


MASKS = {
    "none": None,
    "causal": causal_mask,
    "sliding": sliding_window(20),
    "docs": and_masks(causal_mask, document_mask([30, 45, 25])),
}
SCORES = {"none": None, "alibi": alibi(2), "softcap": softcap(3.0)}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("score", SCORES)
def test_forward_and_gradients_match_the_float64_oracle(score, mask):
    q, k, v = _leaves((1, 2, 100, 16), (1, 2, 100, 16), (1, 2, 100, 16))
    _check(q, k, v, SCORES[score], MASKS[mask])


def test_ragged_lengths_gqa_and_odd_head_dims():
    q, k, v = _leaves((2, 4, 70, 24), (2, 2, 45, 24), (2, 2, 45, 40))
    _check(q, k, v, softcap(5.0), sliding_window(30), enable_gqa=True)


def test_fully_masked_rows_give_zero_and_neg_inf_in_float64():
    q, k, v = _leaves((1, 1, 64, 16), (1, 1, 64, 16), (1, 1, 64, 16))

    def odd_rows_empty(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (kv_idx <= q_idx)

    dq, _, _ = _check(q, k, v, softcap(2.0), odd_rows_empty)
    out = flex_attention(q, k, v, block_mask=create_block_mask(odd_rows_empty, None, None, 64, 64, device=DEVICE,
                                                               BLOCK_SIZE=32), kernel_options=TRITON)
    assert (out[:, :, 1::2] == 0).all() and (dq[:, :, 1::2] == 0).all()


def _learnable():
    bias = torch.randn(2, 160, dtype=torch.float64, requires_grad=True)  # relative position, per head
    table = torch.randn(3, 3, dtype=torch.float32, requires_grad=True)  # a float32 table: read as float64
    scale = torch.rand(2, dtype=torch.float64, requires_grad=True)
    doc = torch.arange(80) // 30

    def score(s, b, h, q_idx, kv_idx):
        return s * scale[h] + bias[h, q_idx - kv_idx + 79] + table[doc[q_idx], doc[kv_idx]]

    return score, (bias, table, scale)


def test_captured_tensor_gradients_in_float64():
    """Float64 contributions and atomics (the float32 table's gradient is cast back to float32)."""
    q, k, v = _leaves((1, 2, 80, 16), (1, 2, 80, 16), (1, 2, 80, 16))
    score, extra = _learnable()
    got = _check(q, k, v, score, causal_mask, extra=extra[::2])
    assert got[3].dtype == torch.float64
    out = flex_attention(q, k, v, score_mod=score, kernel_options=TRITON)
    (dt,) = torch.autograd.grad(out.sum(), (extra[1],))
    # the oracle's own float32 table would sum its gradient in float32: differentiate a float64 copy
    bias, table, scale = extra
    table64, doc = table.detach().double().requires_grad_(), torch.arange(80) // 30

    def score64(s, b, h, q_idx, kv_idx):
        return s * scale[h] + bias[h, q_idx - kv_idx + 79] + table64[doc[q_idx], doc[kv_idx]]

    ro, _ = dense_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), score64)
    (want,) = torch.autograd.grad(ro.sum(), (table64,))
    assert dt.dtype == torch.float32
    torch.testing.assert_close(dt, want.float(), atol=1e-6, rtol=1e-6)  # float64 sums, rounded once


def test_deterministic_mode_in_float64():
    q, k, v = _leaves((1, 2, 80, 16), (1, 2, 80, 16), (1, 2, 80, 16))
    score, extra = _learnable()
    options = {**TRITON, "DETERMINISTIC": True}
    runs = [_check(q, k, v, score, causal_mask, extra=extra[::2], options=options) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_captured_float_numbers_keep_float64_precision():
    """A captured number goes to the kernel as float64, and constants are formed in float64."""
    q, k, v = _leaves((1, 1, 32, 16), (1, 1, 32, 16), (1, 1, 32, 16))
    c = 0.1234567890123456789

    def score(s, b, h, q_idx, kv_idx):
        return torch.maximum(s * c, s * 0 + 0.3) - c * torch.minimum(s, s * 0 + 0.7)

    _check(q, k, v, score, None, tol=1e-12)


def test_the_scale_keeps_float64_precision():
    """Triton passes Python floats as float32: the float64 kernels read the scale from a tensor."""
    q, k, v = _leaves((1, 1, 32, 16), (1, 1, 32, 16), (1, 1, 32, 16))
    scale = 1 / 3.0
    out, lse = flex_attention(q, k, v, scale=scale, return_lse=True, kernel_options=TRITON)
    ro, rl = dense_attention(q, k, v, scale=scale)  # no captures: the oracle runs where q is
    torch.testing.assert_close(lse, rl, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(out, ro, atol=1e-13, rtol=1e-13)


def test_gradcheck_through_the_triton_backend():
    """Finite differences of the kernels' forward against their backward (fast mode: a random
    projection of the Jacobian), with a captured tensor, a mask and the LSE as outputs."""
    q, k, v = _leaves((1, 2, 24, 8), (1, 2, 20, 8), (1, 2, 20, 8))
    bias = torch.randn(2, 44, dtype=torch.float64, requires_grad=True)
    bm = create_block_mask(causal_mask, None, None, 24, 20, device=DEVICE, BLOCK_SIZE=16)

    def score(s, b, h, q_idx, kv_idx):
        return 3.0 * torch.tanh(s / 3.0) + bias[h, q_idx - kv_idx + 19]

    def fn(q, k, v, bias):
        out, lse = flex_attention(q, k, v, score_mod=score, block_mask=bm, return_lse=True, kernel_options=TRITON)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    # float64 atomics sum bias's gradient in any order: equal to the last bits only
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), fast_mode=True, atol=1e-8, rtol=1e-6, nondet_tol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_float64_on_the_gpu_at_every_head_dim(D):
    """Tiles for 8-byte elements fit the device's shared memory; precision holds on real hardware
    (fp64 dots and libdevice transcendentals)."""
    q, k, v = _leaves((2, 2, 300, D), (2, 2, 300, D), (2, 2, 300, D))
    bias = torch.randn(2, 600, dtype=torch.float64, requires_grad=True)  # on the CPU: see _check

    def score(s, b, h, q_idx, kv_idx):
        return softcap(20.0)(s, b, h, q_idx, kv_idx) + bias[h, q_idx - kv_idx + 299]

    _check(q, k, v, score, document_mask([100, 200]), bs=128, extra=(bias,), tol=1e-9)
    _check(q, k, v, score, document_mask([100, 200]), bs=128, extra=(bias,), tol=1e-9,
           options={**TRITON, "DETERMINISTIC": True})


@pytest.mark.gpu
@pytest.mark.parametrize("fast_mode", [True, False])
def test_gradcheck_on_the_gpu(fast_mode):
    """Fast mode at a few blocks, the full Jacobian (every input element) on a tiny problem."""
    L, D = (40, 16) if fast_mode else (17, 4)
    q, k, v = _leaves((1, 2, L, D), (1, 2, L, D), (1, 2, L, D))
    bias = torch.randn(2, 2 * L, dtype=torch.float64, requires_grad=True)
    bm = create_block_mask(causal_mask, None, None, L, L, device=DEVICE, BLOCK_SIZE=16)

    def fn(q, k, v, bias):
        out, lse = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: softcap(4.0)(s, b, h, qi, kv)
                                  + bias[h, qi - kv + L], block_mask=bm, return_lse=True, kernel_options=TRITON)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), fast_mode=fast_mode, atol=1e-8, rtol=1e-6, nondet_tol=1e-12)
