"""The generated Triton forward kernel (Triton's interpreter on CPU, the real thing on a GPU),
against the reference backend, the dense float64 oracle and torch's eager flex_attention."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from flexcomp import FlexcompError, and_masks, create_block_mask, flex_attention
from flexcomp.masks import alibi, causal_mask, document_mask, sliding_window, softcap
from flexcomp.testing import dense_attention
from variants import MASKS, scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}


def _qkv(B, H, L, S, D, Hkv=None, Dv=None, dtype=torch.float32):
    Hkv, Dv = Hkv or H, Dv or D
    return (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype), torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype),
            torch.randn(B, Hkv, S, Dv, device=DEVICE, dtype=dtype))


def _check(q, k, v, score_mod=None, mask_mod=None, bs=64, B=None, H=None, tol=2e-5, enable_gqa=False, torch_too=False,
           oracle_on="cpu"):
    """The oracle runs where the mods' captured tensors live (``oracle_on``); torch's eager
    flex_attention is compared on CPU runs (on a GPU its mods would need device-side captures)."""
    L, S = q.shape[2], k.shape[2]
    bm = create_block_mask(mask_mod, B, H, L, S, device=DEVICE, BLOCK_SIZE=bs) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True, kernel_options=TRITON,
                              enable_gqa=enable_gqa)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ro, rl = dense_attention(q.to(oracle_on), k.to(oracle_on), v.to(oracle_on), score_mod, mask_mod,
                             enable_gqa=enable_gqa)
    ro, rl = ro.cpu(), rl.cpu()
    torch.testing.assert_close(out.cpu().double(), ro, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(rl))
    torch.testing.assert_close(lse.cpu().double(), rl, atol=tol, rtol=tol)
    if torch_too and DEVICE == "cpu":
        tbm = torch_flex.create_block_mask(mask_mod, B, H, L, S, device=DEVICE, BLOCK_SIZE=bs) if mask_mod else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to, tl = torch_flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=tbm, return_lse=True,
                                               enable_gqa=enable_gqa)
        torch.testing.assert_close(out, to, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, tl, atol=tol, rtol=tol)
    return out, lse


SCORES = scores(3)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("score", SCORES)
def test_every_variant_against_oracle_and_torch(mask, score):
    q, k, v = _qkv(2, 3, 200, 200, 32)
    _check(q, k, v, SCORES[score], MASKS[mask], B=2, H=3, torch_too=True)


@pytest.mark.parametrize("L,S", [(1, 300), (130, 257), (300, 1), (77, 77)])
def test_ragged_lengths(L, S):
    q, k, v = _qkv(1, 2, L, S, 16)
    _check(q, k, v, softcap(5.0), causal_mask, bs=32)


@pytest.mark.parametrize("D,Dv", [(16, 16), (40, 40), (80, 24), (128, 128), (256, 64)])
def test_head_dims_including_non_powers_of_two(D, Dv):
    q, k, v = _qkv(1, 1, 64, 96, D, Dv=Dv)
    _check(q, k, v, alibi(1), sliding_window(40), bs=32)


@pytest.mark.parametrize("bs", [128, 64, (64, 32), (32, 64), 16])
def test_block_sizes(bs):
    q, k, v = _qkv(1, 2, 150, 170, 16)
    _check(q, k, v, None, and_masks(causal_mask, document_mask([100, 70])), bs=bs)


def test_block_size_not_a_multiple_of_16_is_refused():
    q, k, v = _qkv(1, 1, 48, 48, 16)
    bm = create_block_mask(causal_mask, 1, 1, 48, 48, device=DEVICE, BLOCK_SIZE=24)
    with pytest.raises(FlexcompError, match=r"tiles of at least 16x16, but block_mask has BLOCK_SIZE=\(24, 24\)"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)


def test_gqa_and_kv_batch_broadcast():
    q, k, v = _qkv(2, 6, 90, 90, 16, Hkv=2)
    _check(q, k, v, alibi(6), causal_mask, enable_gqa=True, bs=32, torch_too=True)
    k1, v1 = k[:1], v[:1]
    out = flex_attention(q, k1, v1, enable_gqa=True, kernel_options=TRITON)  # no captured tensors here
    ref = flex_attention(q, k1, v1, enable_gqa=True, kernel_options={"BACKEND": "reference"})
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_strided_inputs_are_not_copied_and_give_the_same_result():
    B, S, H, D = 2, 70, 3, 32
    qkv = torch.randn(B, S, 3, H, D, device=DEVICE)  # one packed projection, as models produce it
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check(q, k, v, softcap(6.0), causal_mask, bs=32)


def test_block_mask_broadcast_over_batch_and_heads():
    q, k, v = _qkv(3, 2, 64, 64, 16)
    _check(q, k, v, None, causal_mask, B=None, H=None, bs=32)
    lengths = torch.tensor([64, 10, 33], dtype=torch.int32)

    def pad(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    _check(q, k, v, None, pad, B=3, H=None, bs=32)


def test_fully_masked_rows_give_zero_and_neg_inf():
    def odd_rows_empty(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (kv_idx <= q_idx)

    q, k, v = _qkv(1, 2, 64, 64, 16)
    out, lse = _check(q, k, v, softcap(3.0), odd_rows_empty, bs=32)
    assert (out[:, :, 1::2] == 0).all() and torch.isneginf(lse[:, :, 1::2]).all()


def test_captured_tensors_indexed_by_b_h_q_and_kv():
    B, H, L = 2, 3, 96
    table = torch.randn(H, 2 * L - 1, device=DEVICE)
    per_batch = torch.randn(B, H, device=DEVICE)
    doc = (torch.arange(L, device=DEVICE) // 40).to(torch.int64)
    allowed = torch.rand(L, device=DEVICE) > 0.2
    temperature = torch.tensor(0.7, device=DEVICE)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * temperature + table[h, q_idx - kv_idx + (L - 1)] + per_batch[b, h] * (doc[q_idx] == doc[kv_idx])

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[kv_idx] | (q_idx == kv_idx)

    q, k, v = _qkv(B, H, L, L, 16)
    _check(q, k, v, score_mod, mask_mod, B=B, H=H, bs=32, oracle_on=DEVICE)


def test_out_of_range_buffer_reads_raise_index_error():
    """tests/test_kernels_checks.py covers the checked variants in detail."""
    from flexcomp.errors import FlexcompIndexError

    short = torch.randn(10, device=DEVICE)

    def reads_past_the_end(score, b, h, q_idx, kv_idx):
        return score + short[kv_idx]  # kv_idx runs to 63: torch raises IndexError

    q, k, v = _qkv(1, 1, 64, 64, 16)
    with pytest.raises(IndexError, match=r"'reads_past_the_end': .* the captured tensor 'short' of shape \(10,\) out of "):
        flex_attention(q, k, v, score_mod=reads_past_the_end, kernel_options=TRITON)
    with pytest.raises(FlexcompIndexError):
        flex_attention(q, k, v, score_mod=reads_past_the_end, kernel_options=TRITON)


# Triton's interpreter computes bf16 dots wrongly (numpy has no bf16), so bf16 runs on GPUs only.
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.gpu)])
def test_half_precision(dtype, tol):
    q, k, v = _qkv(1, 2, 64, 64, 32, dtype=dtype)
    _check(q, k, v, softcap(5.0), causal_mask, bs=32, tol=tol)


def test_unlowerable_op_raises_naming_it():
    def frac_power(score, b, h, q_idx, kv_idx):
        return score * (kv_idx + 1) ** 0.3

    q, k, v = _qkv(1, 1, 16, 16, 16)
    with pytest.raises(FlexcompError, match=r"frac_power.*pow .* non-constant or fractional power"):
        flex_attention(q, k, v, score_mod=frac_power, kernel_options=TRITON)


def test_integer_semantics_match_torch_for_negative_operands():
    def floor_ops(score, b, h, q_idx, kv_idx):
        d = kv_idx - q_idx  # negative below the diagonal
        return score + (d // 3).float() * 0.1 + (d % 5).float() * 0.01 + (d % -4).float() * 0.001

    q, k, v = _qkv(1, 1, 40, 40, 16)
    _check(q, k, v, floor_ops, None)


def test_new_captured_values_generate_nothing_new():
    from flexcomp.codegen.modules import STATS

    q, k, v = _qkv(1, 2, 64, 64, 16)
    slopes = torch.rand(2, device=DEVICE)

    def make(w, cap):
        def score(s, b, h, q_idx, kv_idx):
            return cap * torch.tanh(s / cap) + slopes[h] * (kv_idx - q_idx)

        return score, sliding_window(w)

    score, mask = make(8, 5.0)
    _check(q, k, v, score, mask, bs=32, oracle_on=DEVICE)
    before = STATS.generated
    slopes.copy_(torch.rand(2, device=DEVICE))
    for w, cap in ((17, 30.0), (3, 2.5)):
        score, mask = make(w, cap)
        _check(q, k, v, score, mask, bs=32, oracle_on=DEVICE)
    assert STATS.generated == before


def test_dump_dir_names_say_which_variant(tmp_path, monkeypatch):
    from flexcomp.cache import CACHE

    monkeypatch.setenv("FLEXCOMP_DUMP_DIR", str(tmp_path))
    CACHE.clear()  # generated functions are kept per structure: generate them again, into tmp_path
    q, k, v = _qkv(1, 1, 32, 32, 16)
    bm = create_block_mask(causal_mask, 1, 1, 32, 32, device=DEVICE, BLOCK_SIZE=32)
    flex_attention(q, k, v, score_mod=softcap(3.0), block_mask=bm, kernel_options=TRITON)
    names = {p.name.rsplit("_", 1)[0]: p for p in tmp_path.iterdir()}
    # on a GPU create_block_mask's kernels bound the blocks with a generated function too
    want = {"mask_mod_causal_mask", "score_mod_softcap_score", *(["bounds_mask_mod"] if DEVICE == "cuda" else [])}
    assert set(names) == want
    assert "@triton.jit" in names["score_mod_softcap_score"].read_text()


@pytest.mark.gpu
def test_new_captured_values_compile_nothing_new_on_the_gpu():
    """Triton's own kernel cache does not grow when only captured values change."""
    from flexcomp.codegen.kernels.forward import flex_fwd

    def compiled():
        return sum(len(c[0]) for c in flex_fwd.device_caches.values())

    q, k, v = _qkv(1, 2, 256, 256, 64, dtype=torch.bfloat16)
    bias = torch.randn(2, device=DEVICE)

    def run(w, cap):
        def score(s, b, h, q_idx, kv_idx):
            return cap * torch.tanh(s / cap) + bias[h]

        bm = create_block_mask(sliding_window(w), 1, 2, 256, 256, device=DEVICE)
        return flex_attention(q, k, v, score_mod=score, block_mask=bm)

    run(64, 30.0)
    before = compiled()
    bias.copy_(torch.randn(2, device=DEVICE))
    for w, cap in ((100, 7.0), (3, 50.0), (255, 1.5)):
        run(w, cap)
    assert compiled() == before


def test_negative_capture_indices_count_from_the_end_as_in_torch():
    table = torch.randn(79, device=DEVICE)

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx]  # negative above the diagonal

    q, k, v = _qkv(1, 1, 40, 40, 16)
    _check(q, k, v, rel, None, oracle_on=DEVICE)


def test_full_blocks_hanging_over_the_end_are_bounded():
    """A cropped mask (BlockMask._adjust) keeps full blocks that reach past KV_LEN."""
    bm = create_block_mask(lambda b, h, q, kv: kv >= 0, 1, 1, 256, 256, device=DEVICE, BLOCK_SIZE=64)._adjust(100, 70)
    q, k = torch.randn(1, 1, 100, 16, device=DEVICE), torch.randn(1, 1, 70, 16, device=DEVICE)
    v = torch.randn(1, 1, 70, 16, device=DEVICE)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
    ref = flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "reference"})
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_unsupported_dtypes_are_refused_with_a_pointer_to_the_reference_backend():
    """float64 runs (tests/test_kernels_float64.py); other float types do not."""
    from flexcomp.plan import check_inputs

    q = torch.zeros(1, 1, 16, 16, dtype=torch.float8_e4m3fn)
    with pytest.raises(FlexcompError, match="float32 and float64 inputs, got torch.float8_e4m3fn; use kernel_options"):
        check_inputs(q, 16, 16)


def test_captured_minus_zero_is_not_confused_with_zero():
    def make(c):
        return lambda s, b, h, q_idx, kv_idx: s * torch.sigmoid(1.0 / c + s * 0)  # s * 1 or s * 0

    q, k, v = _qkv(1, 1, 32, 32, 16)
    a = flex_attention(q, k, v, score_mod=make(0.0), kernel_options=TRITON)
    b = flex_attention(q, k, v, score_mod=make(-0.0), kernel_options=TRITON)
    ref = flex_attention(q, k, v, score_mod=make(-0.0), kernel_options={"BACKEND": "reference"})
    torch.testing.assert_close(b, ref, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 192, 256])
def test_every_head_dim_and_dtype_fits_the_device(dtype, D):
    """Tile configs shrink to the device's shared memory (wide heads, float32, heavy mods)."""
    q, k, v = _qkv(1, 2, 300, 300, D, dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    _check(q, k, v, softcap(20.0), document_mask([100, 200]), tol=tol)
