"""The generated Triton backward kernels (Triton's interpreter on CPU, the real thing on a GPU):
dq, dk, dv, the LSE's gradient and captured-tensor gradients against the dense float64 oracle
(autograd through the user's own mods) and the reference backend."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexcomp import and_masks, create_block_mask, flex_attention, or_masks
from flexcomp.masks import alibi, causal_mask, document_mask, prefix_lm, sliding_window, softcap
from flexcomp.testing import dense_attention
from variants import MASKS, scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


def _loss_weights(out, lse, seed=0):
    g = torch.Generator(device=out.device).manual_seed(seed)
    return (torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float64),
            torch.randn(lse.shape, generator=g, device=out.device, dtype=torch.float64))


def _grads(out, lse, inputs, w):
    """Gradients of a random projection of out and (finite) lse: both feed the backward."""
    total = (out.double() * w[0]).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * w[1]).sum()
    return torch.autograd.grad(total, inputs, allow_unused=True)


def _check(q, k, v, score_mod=None, mask_mod=None, bs=64, B=None, H=None, extra=(), tol=5e-5, enable_gqa=False,
           options=None):
    """Output, LSE and gradients into q, k, v and ``extra`` (captured tensors) vs the oracle.

    Captured tensors live on the CPU (flexcomp moves them to the kernels' device, and sends
    their gradients back), so the oracle runs on the CPU, on copies of q, k, v."""
    L, S = q.shape[2], k.shape[2]
    bm = create_block_mask(mask_mod, B, H, L, S, device=DEVICE, BLOCK_SIZE=bs) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True,
                              kernel_options=options or TRITON, enable_gqa=enable_gqa)
    w = _loss_weights(out.cpu(), lse.cpu())
    got = _grads(out, lse, (q, k, v, *extra), [x.to(out.device) for x in w])
    cq, ck, cv = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    ro, rl = dense_attention(cq, ck, cv, score_mod, mask_mod, enable_gqa=enable_gqa)
    want = _grads(ro, rl, (cq, ck, cv, *extra), w)
    got = [g.cpu() if g is not None else None for g in got]
    torch.testing.assert_close(out.cpu().double(), ro, atol=tol, rtol=tol)
    for name, g, r in zip(["dq", "dk", "dv"] + [f"d extra[{i}]" for i in range(len(extra))], got, want):
        assert g is not None and r is not None, name
        assert not torch.isnan(g).any(), name
        g, r = g.double(), r.double()
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, r / scale, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return got


SCORES = scores(2)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("score", SCORES)
def test_every_variant_against_the_oracle(mask, score):
    q, k, v = _leaves((2, 2, 200, 32), (2, 2, 200, 32), (2, 2, 200, 32))
    _check(q, k, v, SCORES[score], MASKS[mask], B=2, H=2)


@pytest.mark.parametrize("L,S", [(1, 150), (130, 97), (150, 1), (77, 77)])
def test_ragged_lengths(L, S):
    q, k, v = _leaves((1, 2, L, 16), (1, 2, S, 16), (1, 2, S, 16))
    _check(q, k, v, softcap(5.0), causal_mask, bs=32)


@pytest.mark.parametrize("D,Dv", [(24, 40), (80, 16)])
def test_odd_head_dims(D, Dv):
    q, k, v = _leaves((1, 2, 96, D), (1, 2, 80, D), (1, 2, 80, Dv))
    _check(q, k, v, alibi(2), sliding_window(40), bs=32)


def test_gqa_sums_dk_dv_over_the_group():
    q, k, v = _leaves((2, 4, 96, 16), (2, 2, 96, 16), (2, 2, 96, 16))
    _check(q, k, v, softcap(3.0), causal_mask, bs=32, enable_gqa=True)


def test_kv_batch_broadcast_sums_over_the_batch():
    q, k, v = _leaves((3, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    _check(q, k, v, alibi(2), causal_mask, bs=32)


def test_fully_masked_rows_give_zero_gradients_not_nan():
    """Queries past 40 see nothing (LSE -inf); the score_mod's derivative is inf there."""
    q, k, v = _leaves((1, 2, 96, 16), (1, 2, 96, 16), (1, 2, 96, 16))

    def mask(b, h, q_idx, kv_idx):
        return (q_idx < 40) & (kv_idx <= q_idx)

    def score(s, b, h, q_idx, kv_idx):
        return torch.sqrt(s * s + 1.0) + torch.where(q_idx >= 40, 1.0 / (kv_idx - kv_idx), 0.0)

    dq, dk, dv = _check(q, k, v, score, mask, bs=32)
    assert torch.all(dq[:, :, 40:] == 0)


def test_lse_alone_is_differentiable_into_q_and_k():
    q, k, v = _leaves((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    bm = create_block_mask(causal_mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    _, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, kernel_options=TRITON)
    w = torch.randn_like(lse)
    dq, dk, dv = torch.autograd.grad((lse * w).sum(), (q, k, v), allow_unused=True)
    _, rl = dense_attention(q, k, v, mask_mod=causal_mask)
    rq, rk = torch.autograd.grad((rl * w.double()).sum(), (q, k))
    torch.testing.assert_close(dq.double(), rq.double(), atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(dk.double(), rk.double(), atol=5e-5, rtol=5e-5)
    assert dv is None or torch.all(dv == 0)


def _learnable(H, L, S, ndoc=3):
    bias = torch.randn(H, L + S, requires_grad=True)  # relative position bias
    table = torch.randn(2, ndoc, ndoc, requires_grad=True)  # per batch, per document pair
    scale = torch.rand(H, requires_grad=True)  # per head
    doc = torch.randint(0, ndoc, (max(L, S),))
    return bias, table, scale, doc


def test_gradients_into_captured_tensors_with_several_reads_of_one_table():
    q, k, v = _leaves((2, 2, 100, 16), (2, 2, 90, 16), (2, 2, 90, 16))
    bias, table, scale, doc = _learnable(2, 100, 90)
    qrow = torch.randn(100, requires_grad=True)  # per query
    kcol = torch.randn(90, requires_grad=True)  # per key

    def score(s, b, h, q_idx, kv_idx):
        rel = bias[h, q_idx - kv_idx + 89] + 0.5 * bias[h, kv_idx]  # two reads of one tensor
        return s * scale[h] + rel + table[b, doc[q_idx], doc[kv_idx]] + qrow[q_idx] * kcol[kv_idx] + scale[h]

    _check(q, k, v, score, causal_mask, bs=32, extra=(bias, table, scale, qrow, kcol))


def test_deterministic_mode_is_bit_identical_and_agrees_with_atomics():
    q, k, v = _leaves((2, 2, 100, 16), (2, 2, 90, 16), (2, 2, 90, 16))
    bias, table, scale, doc = _learnable(2, 100, 90)

    def score(s, b, h, q_idx, kv_idx):
        return s * scale[h] + bias[h, q_idx - kv_idx + 89] + table[b, doc[q_idx], doc[kv_idx]]

    extra = (bias, table, scale)
    runs = [_check(q, k, v, score, causal_mask, bs=32, extra=extra, options={**TRITON, "DETERMINISTIC": True})
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    atomics = _check(q, k, v, score, causal_mask, bs=32, extra=extra)
    for a, b in zip(runs[0], atomics):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(g.device.type == "cpu" for g in runs[0][3:])  # captured on the CPU, gradients there too


def test_tensor_captured_only_by_the_mask_gets_no_gradient():
    q, k, v = _leaves((1, 1, 64, 16), (1, 1, 64, 16), (1, 1, 64, 16))
    lengths = torch.tensor([40.0, 64.0], requires_grad=True)  # float, requires grad, read by the mask only

    def mask(b, h, q_idx, kv_idx):
        return kv_idx < lengths[0]

    bm = create_block_mask(mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
    out.sum().backward()
    assert lengths.grad is None and q.grad is not None


def test_new_captured_values_generate_nothing_new_in_the_backward():
    from flexcomp.codegen.modules import STATS

    q, k, v = _leaves((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    bm = create_block_mask(causal_mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)

    def run(cap, bias):
        out = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: cap * torch.tanh(s / cap) + bias[h],
                             block_mask=bm, kernel_options=TRITON)
        return torch.autograd.grad(out.sum(), (q, bias))

    run(3.0, torch.randn(2, device=DEVICE, requires_grad=True))
    before = STATS.generated
    run(7.0, torch.randn(2, device=DEVICE, requires_grad=True))
    assert STATS.generated == before


def test_strided_inputs_and_upstream_gradient():
    base = torch.randn(1, 64, 2, 3, 16, device=DEVICE)  # [B, L, H, (q, k, v), D], as from one projection
    qkv = base.requires_grad_()
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    bm = create_block_mask(causal_mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    out = flex_attention(q, k, v, score_mod=softcap(2.0), block_mask=bm, kernel_options=TRITON)
    d_out = torch.randn(1, 64, 2, 16, device=DEVICE).transpose(1, 2)  # non-contiguous dO
    (got,) = torch.autograd.grad(out, qkv, d_out)
    ro, _ = dense_attention(q, k, v, softcap(2.0), causal_mask)
    (want,) = torch.autograd.grad(ro, qkv, d_out.double())
    torch.testing.assert_close(got.double(), want.double(), atol=5e-5, rtol=5e-5)


def test_triton_backend_agrees_with_the_reference_backend():
    q, k, v = _leaves((1, 2, 96, 16), (1, 2, 96, 16), (1, 2, 96, 16))
    bias = torch.randn(2, 96, device=DEVICE, requires_grad=True)
    mask = and_masks(causal_mask, document_mask([30, 66]))
    bm = create_block_mask(mask, None, None, 96, 96, device=DEVICE, BLOCK_SIZE=32)

    def score(s, b, h, q_idx, kv_idx):
        return softcap(6.0)(s, b, h, q_idx, kv_idx) + bias[h, kv_idx]

    results = []
    for backend in ("triton", "reference"):
        out, lse = flex_attention(q, k, v, score_mod=score, block_mask=bm, return_lse=True,
                                  kernel_options={"BACKEND": backend})
        results.append(_grads(out, lse, (q, k, v, bias), _loss_weights(out, lse)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


MOD_PARTS = {
    "alibi": alibi(2),
    "softcap": softcap(3.0),
    "square": lambda s, b, h, q_idx, kv_idx: s * s * 0.1,
    "shift": lambda s, b, h, q_idx, kv_idx: s - (q_idx % 3).to(torch.float32),
}
MASK_PARTS = {"causal": causal_mask, "sliding": sliding_window(20), "prefix": prefix_lm(12),
              "document": document_mask([20, 30, 14])}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scores=st.lists(st.sampled_from(sorted(MOD_PARTS)), max_size=2),
       masks=st.lists(st.sampled_from(sorted(MASK_PARTS)), min_size=1, max_size=2),
       combine=st.sampled_from(["and", "or"]), L=st.integers(1, 64), S=st.integers(1, 64))
def test_fuzzed_compositions(scores, masks, combine, L, S):
    def score(s, b, h, q_idx, kv_idx):
        for name in scores:
            s = MOD_PARTS[name](s, b, h, q_idx, kv_idx)
        return s

    mask = (and_masks if combine == "and" else or_masks)(*(MASK_PARTS[m] for m in masks))
    q, k, v = _leaves((1, 2, L, 16), (1, 2, S, 16), (1, 2, S, 16))
    _check(q, k, v, score if scores else None, mask, bs=16)


@pytest.mark.gpu
@pytest.mark.parametrize("score,mask", [(None, causal_mask), (softcap(30.0), causal_mask),
                                        (alibi(8), sliding_window(256)), (None, document_mask([300, 700, 1048]))])
def test_bf16_at_realistic_sizes_against_float32_reference(score, mask):
    B, H, L, D = 2, 8, 2048, 128
    q, k, v = _leaves((B, H, L, D), (B, H, L, D), (B, H, L, D), dtype=torch.bfloat16)
    bm = create_block_mask(mask, None, None, L, L, device=DEVICE)
    out = flex_attention(q, k, v, score_mod=score, block_mask=bm)
    d_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = flex_attention(*f32, score_mod=score, block_mask=bm, kernel_options={"BACKEND": "reference"})
    want = torch.autograd.grad(ref, f32, d_out.float())
    for name, g, r in zip("qkv", got, want):
        rel = ((g.float() - r).norm() / r.norm()).item()
        assert rel < 1e-2, f"d{name}: relative error {rel:.2e}"


def test_a_config_out_of_shared_memory_is_retried_smaller_and_remembered(monkeypatch):
    """Triton refuses a config at compile time (OutOfResources): the backward retries with fewer
    stages, then halved tiles, and keeps what fitted."""
    from triton.runtime.errors import OutOfResources

    import flexcomp.codegen.launch_backward as lb

    real, tried = lb.flex_bwd, []

    class Picky:  # a device with little shared memory: only 32-row dK/dV tiles fit
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tried.append((kwargs["BLOCK_N1"], kwargs["num_stages"]))
                if kwargs["BLOCK_N1"] > 32:
                    raise OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(lb, "flex_bwd", Picky())
    q, k, v = _leaves((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    _check(q, k, v, alibi(2), causal_mask, bs=64)
    assert tried[0][0] == 64 and tried[-1][0] == 32
    tried.clear()
    _check(q, k, v, alibi(2), causal_mask, bs=64)
    assert [n1 for n1, _ in tried] == [32]  # remembered


def test_smaller_configs_step_down_to_the_smallest_tiles():
    from flexcomp.tiles import BackwardConfig
    from flexcomp.tiles import smaller_backward as _smaller

    cfg = BackwardConfig(64, 128, 128, 64, 8, 2)
    steps = []
    while cfg is not None:
        steps.append(cfg)
        cfg = _smaller(cfg)
    assert [(c.block_n1, c.num_stages, c.num_warps) for c in steps] == [
        (128, 2, 8), (128, 1, 8), (64, 1, 4), (32, 1, 4), (16, 1, 4)]


def test_captured_tensor_indexed_by_the_score_gets_per_pair_gradients():
    """An index computed from the score is different at every pair: nothing may be summed first."""
    q, k, v = _leaves((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    table = torch.randn(3, requires_grad=True)

    def score(s, b, h, q_idx, kv_idx):
        return s + table[(s > 0).to(torch.int64) + (s > 1).to(torch.int64)]

    _check(q, k, v, score, causal_mask, bs=32, extra=(table,))


def test_deterministic_sums_cannot_overflow_when_several_loads_hit_one_element():
    q = torch.zeros(1, 2, 64, 16, device=DEVICE, requires_grad=True)  # p = 1/64 everywhere: largest sums
    k, v = torch.randn(1, 2, 64, 16, device=DEVICE), torch.randn(1, 2, 64, 16, device=DEVICE)
    w = torch.zeros(1, requires_grad=True)

    def score(s, b, h, q_idx, kv_idx):
        return s + w[b] + w[h // 4] + w[h // 8]  # three loads, all of w[0]

    got = []
    for options in ({**TRITON, "DETERMINISTIC": True}, {"BACKEND": "reference"}):
        _, lse = flex_attention(q, k, v, score_mod=score, return_lse=True, kernel_options=options)
        got.append(torch.autograd.grad(63.99 * lse.sum(), (w,))[0])
    torch.testing.assert_close(got[0], got[1], atol=1e-3, rtol=1e-5)


def test_square_root_score_mod_trains():
    q, k, v = _leaves((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    _check(q, k, v, lambda s, b, h, q_idx, kv_idx: (s * s + 1.0) ** 0.5, causal_mask, bs=32)


def test_backward_options_are_checked_at_the_forward_call():
    from flexcomp import FlexcompError

    q, k, v = _leaves((1, 1, 32, 16), (1, 1, 32, 16), (1, 1, 32, 16))
    with pytest.raises(FlexcompError, match=r"kernel_options\['BWD_SPLIT'\] must be True or False, got 1"):
        flex_attention(q, k, v, kernel_options={**TRITON, "BWD_SPLIT": 1})
    with pytest.raises(FlexcompError, match=r"kernel_options\['BLOCK_M1'\] must be a power of two >= 16, got 24"):
        flex_attention(q, k, v, kernel_options={**TRITON, "BLOCK_M1": 24})


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_gradient_of_the_gradient_raises_instead_of_vanishing(backend):
    q, k, v = _leaves((1, 1, 32, 16), (1, 1, 32, 16), (1, 1, 32, 16))
    out = flex_attention(q, k, v, kernel_options={"BACKEND": backend})
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        dq.sum().backward()


def test_masked_pairs_send_nothing_into_captured_tensors_on_either_backend():
    """log(q - kv + 1) is NaN above the diagonal, where the causal mask drops every pair: neither
    backend may let it into alpha's gradient (the dense oracle, which evaluates everywhere, would)."""
    q, k, v = _leaves((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16))
    alpha = torch.rand(2, requires_grad=True)

    def score(s, b, h, q_idx, kv_idx):
        return s - alpha[h] * torch.log((q_idx - kv_idx + 1).to(torch.float32))

    bm = create_block_mask(causal_mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    got = []
    for backend in ("triton", "reference"):
        out = flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options={"BACKEND": backend})
        got.append(torch.autograd.grad(out.sum() + (out * out).sum(), (q, alpha)))
    for a, b in zip(*got):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_changing_a_mask_capture_in_place_before_backward_raises(backend):
    q, k, v = _leaves((1, 1, 32, 16), (1, 1, 32, 16), (1, 1, 32, 16))
    limit = torch.tensor([20], device=DEVICE)  # on q's device: the reference backend would save a copy

    def mask(b, h, q_idx, kv_idx):
        return kv_idx < limit[0]

    out = flex_attention(q, k, v, block_mask=create_block_mask(mask, None, None, 32, 32, device=DEVICE, BLOCK_SIZE=16),
                         kernel_options={"BACKEND": backend})
    limit += 5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
