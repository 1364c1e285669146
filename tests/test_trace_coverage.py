"""Tracer coverage: what torch accepts (it traces mods with vmap) flexcomp traces too.

Vector-valued intermediates (chained and partial indexing, rows reduced, dotted or compared),
bit shifts, elementwise functions, attributes and methods of traced values (HF transformers' mask
combinators), numpy ufuncs. Each mod runs through both backends and is checked against torch's
eager flex_attention / create_mask (forward) and the dense float64 oracle (gradients).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as tfa

from flexcomp import create_block_mask, create_mask, flex_attention
from flexcomp.errors import FlexcompTraceError
from flexcomp.ir import ModKind
from flexcomp.testing import dense_attention, grads, rand_qkv
from flexcomp.trace import trace

B, H, S, D = 2, 4, 80, 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend: a GPU, or the interpreter


def dev(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"
g = torch.Generator().manual_seed(7)
BIAS = torch.randn(B, H, S, generator=g, dtype=torch.float64)
TABLE = torch.randn(B, H, S, S, generator=g, dtype=torch.float64)
EMB = torch.randn(S, 6, generator=g, dtype=torch.float64)
TAGS = torch.randint(0, 5, (S, 3), generator=g)
BITS = torch.randint(0, 256, (S, 2), generator=g, dtype=torch.int32)

SCORE_MODS = {
    "chained bias[b][h][q]": lambda s, b, h, q, kv: s + BIAS[b][h][q],
    "table[b, h][q][kv]": lambda s, b, h, q, kv: s + TABLE[b, h][q][kv] * 0.5,
    "rotary (row*row).sum()": lambda s, b, h, q, kv: s + (EMB[q] * EMB[kv]).sum() * 0.3,
    "torch.dot": lambda s, b, h, q, kv: s + torch.dot(EMB[q], EMB[kv]) * 0.3,
    "row @ row, sliced": lambda s, b, h, q, kv: s + EMB[q, :3] @ EMB[kv, 1:4],
    "row mean / amax": lambda s, b, h, q, kv: s + EMB[q].mean() - EMB[kv].amax(),
    "gelu": lambda s, b, h, q, kv: F.gelu(s),
    "gelu tanh": lambda s, b, h, q, kv: F.gelu(s, approximate="tanh"),
    "silu + relu": lambda s, b, h, q, kv: F.silu(s) + F.relu(s - 0.5),
    "softplus": lambda s, b, h, q, kv: F.softplus(s, beta=2.0, threshold=1.5),
    "tan, atan, erf": lambda s, b, h, q, kv: torch.tan(s * 0.3) + torch.atan(s) + torch.erf(s),
    "log1p, expm1": lambda s, b, h, q, kv: torch.log1p(s.abs()) + torch.expm1(s * 0.1),
    "numpy ufuncs": lambda s, b, h, q, kv: np.tanh(s) * np.float32(2.0) + np.maximum(s, 0.0),
    "shifts": lambda s, b, h, q, kv: s + ((q >> 3) == (kv >> 3)).float(),
}
# the same functions written for broadcast index tensors (what the dense oracle calls them with)
ORACLE = {
    "chained bias[b][h][q]": lambda s, b, h, q, kv: s + BIAS[b, h, q],
    "table[b, h][q][kv]": lambda s, b, h, q, kv: s + TABLE[b, h, q, kv] * 0.5,
    "rotary (row*row).sum()": lambda s, b, h, q, kv: s + (EMB[q] * EMB[kv]).sum(-1) * 0.3,
    "torch.dot": lambda s, b, h, q, kv: s + (EMB[q] * EMB[kv]).sum(-1) * 0.3,
    "row @ row, sliced": lambda s, b, h, q, kv: s + (EMB[q][..., :3] * EMB[kv][..., 1:4]).sum(-1),
    "row mean / amax": lambda s, b, h, q, kv: s + EMB[q].mean(-1) - EMB[kv].amax(-1),
    "numpy ufuncs": lambda s, b, h, q, kv: torch.tanh(s) * 2.0 + torch.clamp(s, min=0.0),
}
TORCH_CANNOT = {"row @ row, sliced"}  # torch's eager vmap fails on slices of a gathered row
MASK_MODS = {
    "rows compared: any()": lambda b, h, q, kv: (TAGS[q] == TAGS[kv]).any() | (q == kv),
    "row bits & : any()": lambda b, h, q, kv: ((BITS[q] & BITS[kv]) != 0).all() | (q == kv),
    "z-order shifts": lambda b, h, q, kv: ((q >> 4) << 4) <= kv,
    "hf and_masks": None,  # filled below
}


def _hf_and_masks(*mask_functions):  # transformers.masking_utils.and_masks, verbatim
    def and_mask(batch_idx, head_idx, q_idx, kv_idx):
        result = q_idx.new_ones((), dtype=torch.bool)
        for mask in mask_functions:
            result = result & mask(batch_idx, head_idx, q_idx, kv_idx).to(result.device)
        return result
    return and_mask


def _hf_or_masks(*mask_functions):
    def or_mask(batch_idx, head_idx, q_idx, kv_idx):
        result = q_idx.new_zeros((), dtype=torch.bool)
        for mask in mask_functions:
            result = result | mask(batch_idx, head_idx, q_idx, kv_idx).to(result.device)
        return result
    return or_mask


PAD = torch.ones(B, S, dtype=torch.bool)
PAD[1, 60:] = False
MASK_MODS["hf and_masks"] = _hf_and_masks(lambda b, h, q, kv: kv <= q, lambda b, h, q, kv: PAD[b, kv],
                                          lambda b, h, q, kv: kv > q - 32)
MASK_MODS["hf or_masks"] = _hf_or_masks(lambda b, h, q, kv: kv <= q, lambda b, h, q, kv: kv < 4)


def _torch_eager(q, k, v, score_mod=None, mask_mod=None):
    bm = tfa.create_block_mask(mask_mod, B, H, S, S, device="cpu", BLOCK_SIZE=16) if mask_mod else None
    with torch.no_grad():
        return tfa.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod, block_mask=bm,
                                  return_lse=True)


@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_score_mods_match_torch_and_the_oracle(name):
    mod = SCORE_MODS[name]
    q, k, v = rand_qkv(B, H, S, S, D)
    out, lse = flex_attention(q, k, v, score_mod=mod, return_lse=True, kernel_options={"BACKEND": "reference"})
    if name not in TORCH_CANNOT:
        to, tl = _torch_eager(q, k, v, score_mod=mod)
        torch.testing.assert_close(out, to.to(out.dtype), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(lse, tl.to(lse.dtype), rtol=1e-9, atol=1e-9)
    ro, rl = dense_attention(q, k, v, ORACLE.get(name, mod))
    torch.testing.assert_close(out, ro, rtol=1e-9, atol=1e-9)
    for got, want in zip(grads((out, lse), (q, k, v)), grads((ro, rl), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", list(MASK_MODS))
def test_mask_mods_match_torch(name):
    mod = MASK_MODS[name]
    ours = create_mask(mod, B, H, S, S, device="cpu")
    theirs = tfa.create_mask(mod, B, H, S, S, device="cpu")
    assert torch.equal(ours, theirs)
    bm = create_block_mask(mod, B, H, S, S, device="cpu", BLOCK_SIZE=16)
    tbm = tfa.create_block_mask(mod, B, H, S, S, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(bm.to_dense(), tbm.to_dense())
    q, k, v = rand_qkv(B, H, S, S, D)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "reference"})
    to, _ = _torch_eager(q, k, v, mask_mod=mod)
    torch.testing.assert_close(out, to.to(out.dtype), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["rotary (row*row).sum()", "chained bias[b][h][q]", "softplus", "tan, atan, erf",
                                  "shifts"])
def test_triton_kernels_run_vector_and_new_ops(name):
    """The generated kernels (interpreter here) compute the same as the reference, forward and
    backward, gradients into a captured row table included."""
    mod = SCORE_MODS[name]
    q, k, v = (t.float() for t in rand_qkv(1, H, 64, 64, D, dtype=torch.float32))
    outs = {}
    for backend in ("reference", "triton"):
        qq, kk, vv = (t.detach().clone().to(dev(backend)).requires_grad_() for t in (q, k, v))
        o, l = flex_attention(qq, kk, vv, score_mod=mod, return_lse=True, kernel_options={"BACKEND": backend})
        outs[backend] = tuple(x.cpu() for x in (o, l, *grads((o, l), (qq, kk, vv))))
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


def test_gradients_flow_into_a_rotary_row_table():
    emb = torch.randn(48, 4, dtype=torch.float64, requires_grad=True)

    def rot(s, b, h, q, kv):
        return s + torch.dot(emb[q], emb[kv])

    q, k, v = rand_qkv(1, 2, 48, 48, 8)
    out = flex_attention(q, k, v, score_mod=rot, kernel_options={"BACKEND": "reference"})
    (ge,) = torch.autograd.grad((out * out).sum(), emb)
    ro, _ = dense_attention(q, k, v, lambda s, b, h, q, kv: s + (emb[q] * emb[kv]).sum(-1))
    (want,) = torch.autograd.grad((ro * ro).sum(), emb)
    torch.testing.assert_close(ge, want, rtol=1e-8, atol=1e-10)


def test_ir_of_a_dot_product_is_unrolled_loads():
    emb = torch.randn(10, 2)
    tm = trace(lambda s, b, h, q_idx, kv_idx: s + torch.dot(emb[q_idx], emb[kv_idx]), ModKind.SCORE)
    assert str(tm.graph).splitlines()[1:8] == [
        "  %0 = load emb[q_idx, 0] : f32", "  %1 = load emb[q_idx, 1] : f32", "  %2 = load emb[kv_idx, 0] : f32",
        "  %3 = load emb[kv_idx, 1] : f32", "  %4 = mul %0, %2 : f32", "  %5 = mul %1, %3 : f32",
        "  %6 = add %4, %5 : f32"]


def test_chained_indexing_is_one_load():
    tm = trace(lambda s, b, h, q_idx, kv_idx: s + TABLE[b][h][q_idx][kv_idx], ModKind.SCORE)
    assert "load TABLE[b, h, q_idx, kv_idx]" in str(tm.graph)


def test_attributes_of_traced_values():
    seen = {}

    def mod(b, h, q_idx, kv_idx):
        seen["shape"], seen["dtype"], seen["device"] = q_idx.shape, q_idx.dtype, q_idx.device
        seen["ndim"] = q_idx.ndim
        zero = q_idx.new_zeros(())
        return (q_idx.to(kv_idx.device) >= kv_idx) & (zero == 0) & q_idx.new_full((), True, dtype=torch.bool)

    assert torch.equal(create_mask(mod, 1, 1, 9, 9, device="cpu")[0, 0],
                       torch.ones(9, 9, dtype=torch.bool).tril())
    assert seen["shape"] == torch.Size([]) and seen["dtype"] == torch.int32 and seen["ndim"] == 0
    assert isinstance(seen["device"], torch.device)


def test_vectors_errors_point_at_the_line():
    def returns_row(s, b, h, q_idx, kv_idx):
        return s + EMB[q_idx]  # a vector per pair

    with pytest.raises(FlexcompTraceError, match=r"shape \(6,\)") as info:
        trace(returns_row, ModKind.SCORE)
    assert info.value.lineno == returns_row.__code__.co_firstlineno + 1

    def traced_index_into_computed(s, b, h, q_idx, kv_idx):
        return s + (EMB[q_idx] * 2)[kv_idx % 6]

    with pytest.raises(FlexcompTraceError, match="computed vector"):
        trace(traced_index_into_computed, ModKind.SCORE)

    big = torch.randn(10, 5000)
    with pytest.raises(FlexcompTraceError, match="too large to unroll"):
        trace(lambda s, b, h, q_idx, kv_idx: s + big[q_idx].sum(), ModKind.SCORE)

    def np_unsupported(s, b, h, q_idx, kv_idx):
        return np.arcsinh(s)

    with pytest.raises(FlexcompTraceError, match="arcsinh") as info:
        trace(np_unsupported, ModKind.SCORE)
    assert info.value.lineno == np_unsupported.__code__.co_firstlineno + 1


def test_shift_counts_past_the_width_as_torch():
    def mask(b, h, q_idx, kv_idx):
        return ((q_idx << (kv_idx % 40)) >> 3) > (kv_idx >> (q_idx % 70))

    ours = create_mask(mask, 1, 1, 64, 64, device="cpu")
    theirs = tfa.create_mask(mask, 1, 1, 64, 64, device="cpu")
    assert torch.equal(ours, theirs)


def test_int64_where_int32_would_wrap_as_torch():
    def wraps(b, h, q_idx, kv_idx):
        return ((q_idx * 2**20) % 7) == (kv_idx % 7)

    ours = create_block_mask(wraps, 1, 1, 4096, 4096, device="cpu")
    theirs = tfa.create_block_mask(wraps, 1, 1, 4096, 4096, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert "i64" in str(trace(wraps, ModKind.MASK).graph)
    q, k, v = (t.float() for t in rand_qkv(1, 1, 64, 64, 16, dtype=torch.float32))
    ro, _ = dense_attention(q, k, v, mask_mod=lambda b, h, q_, k_: wraps(b, h, q_.long(), k_.long()))
    for backend in ("reference", "triton"):
        qq, kk, vv = (t.detach().to(dev(backend)) for t in (q, k, v))
        out = flex_attention(qq, kk, vv, block_mask=create_block_mask(wraps, 1, 1, 64, 64, device=dev(backend)),
                             kernel_options={"BACKEND": backend})
        torch.testing.assert_close(out.double().cpu(), ro.detach(), rtol=1e-4, atol=1e-4)


def test_index_arithmetic_that_stays_in_range_keeps_32_bits():
    from flexcomp.masks import document_mask

    g = trace(document_mask([30, 50]), ModKind.MASK).graph
    assert "i64" not in str(g)
    rel = trace(lambda s, b, h, q_idx, kv_idx: s + (q_idx - kv_idx) * 3, ModKind.SCORE).graph
    assert "i64" not in str(rel)
    assert math.isfinite(1.0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rotary_table_gradients_on_both_backends(backend):
    """Two gathered rows per pair, dotted: the Triton backward scatters into the table per query
    row and per key (two loads of one tensor); both backends match the float64 oracle."""
    emb = torch.randn(64, 4, dtype=torch.float32, requires_grad=True)

    def rot(s, b, h, q, kv):
        return s + torch.dot(emb[q], emb[kv]) * 0.5

    q, k, v = (t.float().detach().to(dev(backend)).requires_grad_()
               for t in rand_qkv(1, 2, 64, 64, 16, dtype=torch.float32))
    out = flex_attention(q, k, v, score_mod=rot, kernel_options={"BACKEND": backend})
    got = [x.cpu() for x in torch.autograd.grad((out * out).sum(), (q, emb))]  # emb stays where it is: the CPU
    e64 = emb.detach().double().requires_grad_()
    q64 = q.detach().double().requires_grad_()
    q64 = q64.cpu().detach().requires_grad_()
    ro, _ = dense_attention(q64, k.detach().double().cpu(), v.detach().double().cpu(),
                            lambda s, b, h, q_, kv: s + (e64[q_] * e64[kv]).sum(-1) * 0.5)
    want = torch.autograd.grad((ro * ro).sum(), (q64, e64))
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=2e-4, atol=2e-4)


def test_captured_tensor_on_the_meta_device_is_refused_where_it_must_run():
    meta = torch.empty(8, device="meta")

    def uses_meta(b, h, q_idx, kv_idx):
        return meta[q_idx] > 0

    bm = create_block_mask(uses_meta, 1, 1, 8, 8, device="meta")  # shapes only, as torch allows
    assert bm.kv_num_blocks.device.type == "meta"
    line = uses_meta.__code__.co_firstlineno + 1
    with pytest.raises(RuntimeError, match=rf"uses_meta' at .*:{line}: the captured tensor 'meta'.*meta device"):
        create_block_mask(uses_meta, 1, 1, 8, 8, device="cpu")


def test_explicit_int32_casts_and_bool_arithmetic_keep_torchs_types_when_widened():
    mods = [lambda b, h, q_idx, kv_idx: (q_idx.to(torch.int32) * 2**27) % 7 == (kv_idx * 2**27) % 7,
            lambda b, h, q_idx, kv_idx: ((q_idx >= kv_idx) * 2**30 + (kv_idx >= q_idx) * 2**30) % 7 == 2,
            lambda b, h, q_idx, kv_idx: (kv_idx.int() * 2**27) % 7 == (q_idx % 7)]
    for mod in mods:
        assert torch.equal(create_mask(mod, 1, 1, 64, 64, device="cpu"), tfa.create_mask(mod, 1, 1, 64, 64, device="cpu"))


def test_transposes_of_rows():
    tab = torch.randn(2, 3, 5, dtype=torch.float64)
    mods = {"T": lambda s, b, h, q, kv: s + tab[b].T[kv % 5, h % 3] * kv,
            "mT": lambda s, b, h, q, kv: s + tab[b].mT[kv % 5][h % 3] * kv,
            "transpose": lambda s, b, h, q, kv: s + (tab[b].transpose(0, 1)[kv % 5] * 2).sum() * kv}
    oracle = {"T": lambda s, b, h, q, kv: s + tab[b, h % 3, kv % 5] * kv,
              "mT": lambda s, b, h, q, kv: s + tab[b, h % 3, kv % 5] * kv,
              "transpose": lambda s, b, h, q, kv: s + (tab[b, :, kv % 5] * 2).sum(0) * kv}
    q, k, v = rand_qkv(2, 3, 16, 16, 8)
    for name, mod in mods.items():
        out = flex_attention(q, k, v, score_mod=mod, kernel_options={"BACKEND": "reference"})
        want, _ = dense_attention(q, k, v, lambda s, b, h, q_, kv: _oracle_loop(oracle[name], s, b, h, q_, kv))
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


def _oracle_loop(fn, s, b, h, q, kv):
    """Calls ``fn`` pair by pair with Python ints (for oracles written per pair)."""
    out = torch.empty(torch.broadcast_shapes(s.shape, b.shape, h.shape, q.shape, kv.shape), dtype=s.dtype)
    sb = torch.broadcast_to(s, out.shape)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            for m in range(out.shape[2]):
                for n in range(out.shape[3]):
                    out[i, j, m, n] = fn(sb[i, j, m, n], i, j, m, n)
    return out


def test_torchs_refusals_are_ours_too():
    emb = torch.randn(8, 4)
    cases = [
        (lambda s, b, h, q, kv: s + emb[q].sum(dim=1), IndexError, "out of range"),
        (lambda s, b, h, q, kv: s + emb[q].sum(dim=(0, 0)), RuntimeError, "twice"),
        (lambda s, b, h, q, kv: s + emb[kv, 3:0:-1].sum(), RuntimeError, "positive step"),
        (lambda s, b, h, q, kv: s + ((q + 1) ** -1), RuntimeError, "negative integer powers"),
        (lambda s, b, h, q, kv: s + (s * 100).to(torch.int8), RuntimeError, "int8"),
    ]
    for mod, exc, fragment in cases:
        with pytest.raises(exc, match=fragment):
            trace(mod, ModKind.SCORE)


def test_ellipsis_after_traced_indices_and_to_another_traced_value():
    flags = torch.rand(2, 4, 16) > 0.3
    tab3 = torch.randn(2, 3, 4)
    mods = [lambda b, h, q, kv: flags[b, h, ...][kv] | (q == kv),
            lambda b, h, q, kv: (tab3[b, ..., -1].sum() > 0) | (q >= kv),
            lambda b, h, q, kv: ((q - kv).to(kv) >= 0) & (q.to(kv) >= 0)]
    for mod in mods:
        assert torch.equal(create_mask(mod, 2, 4, 16, 16, device="cpu"), tfa.create_mask(mod, 2, 4, 16, 16, device="cpu"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_constants_shifted_by_traced_counts(backend):
    def mod(s, b, h, q, kv):
        return s + ((1 << (kv % 8)) % 7).float() * 0.1 + ((1000 >> (q % 70)) % 5).float() * 0.1

    q, k, v = (t.to(dev(backend)) for t in rand_qkv(1, 2, 64, 64, 16, dtype=torch.float32))
    out = flex_attention(q, k, v, score_mod=mod, kernel_options={"BACKEND": backend})
    want, _ = dense_attention(q.cpu(), k.cpu(), v.cpu(), lambda s, b, h, q_, kv: mod(s, b, h, q_.long(), kv.long()))
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)


def test_narrow_integers_wrap_as_torchs():
    """Values of int8 / uint8 / int16 captures (and casts to those types) wrap in torch's arithmetic
    with Python numbers and with one another, and promote with indices."""
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (64,), generator=g, dtype=torch.uint8)
    i8 = torch.randint(-128, 128, (64,), generator=g, dtype=torch.int8)
    i16 = torch.randint(-30000, 30000, (64,), generator=g, dtype=torch.int16)
    mods = [lambda b, h, q, kv: (u8[q] - u8[kv]) > 100,
            lambda b, h, q, kv: (i16[q] * 3) > 0,
            lambda b, h, q, kv: (i8[q] + i8[kv]) < 0,
            lambda b, h, q, kv: (u8[q] + i8[kv]) < 0,
            lambda b, h, q, kv: (u8[q] + q) > 200,
            lambda b, h, q, kv: (u8[q].int() + 300) > 400,
            lambda b, h, q, kv: (-i8[q]) < (~u8[kv]).to(torch.int32) - 100,
            lambda b, h, q, kv: ((q >= kv) + u8[q]) == 0,
            lambda b, h, q, kv: torch.where(q > kv, u8[q], u8[kv]) * 2 > 100,
            lambda b, h, q, kv: (q + 100).to(torch.int8) < 0,
            lambda b, h, q, kv: ((q * 7).to(torch.uint8) + kv.to(torch.int16) * 900) > 0]
    for mod in mods:
        assert torch.equal(create_mask(mod, 1, 1, 64, 64, device="cpu"), tfa.create_mask(mod, 1, 1, 64, 64, device="cpu"))
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 1, 64, 64, 16, dtype=torch.float32))
    bm = create_block_mask(mods[0], 1, 1, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    want, _ = dense_attention(q.cpu(), k.cpu(), v.cpu(), mask_mod=lambda b, h, q_, k_: mods[0](b, h, q_, k_))
    out = flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "triton"})
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)


def test_reductions_of_narrow_rows_keep_torchs_types():
    rows = torch.randint(0, 256, (32, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mods = [lambda b, h, q, kv: (rows[q].amax() + 100) > (rows[kv].sum() % 256),
            lambda b, h, q, kv: (rows[q].amin() - rows[kv].amax()) > 120]
    for mod in mods:
        assert torch.equal(create_mask(mod, 1, 1, 32, 32, device="cpu"), tfa.create_mask(mod, 1, 1, 32, 32, device="cpu"))
