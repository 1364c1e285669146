"""flex_attention's public contract: torch's names, defaults and semantics; validation errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import flexcomp
from flexcomp import AuxRequest, FlexcompError, create_block_mask, flex_attention
from flexcomp.masks import alibi, causal_mask, document_mask, prefix_lm, sliding_window, softcap
from flexcomp.testing import dense_attention, rand_qkv


def _qkv(*shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


# ---- the drop-in promise -------------------------------------------------------------------
def test_public_names_match_torch():
    for name in ("flex_attention", "create_block_mask", "create_mask", "BlockMask", "and_masks", "or_masks",
                 "noop_mask", "AuxRequest", "AuxOutput"):
        assert hasattr(flexcomp, name) and hasattr(torch_flex, name), name
    import inspect

    ours = inspect.signature(flexcomp.flex_attention).parameters
    theirs = inspect.signature(torch_flex.flex_attention).parameters
    assert list(ours)[:9] == list(theirs)[:9]
    for p in list(ours)[:9]:
        assert ours[p].default == theirs[p].default, p


MODS = [
    (None, None),
    (softcap(10.0), causal_mask),
    (alibi(4), sliding_window(37)),
    (None, prefix_lm(50)),
    (None, document_mask([60, 90, 50])),
]


@pytest.mark.parametrize("score_mod,mask_mod", MODS)
def test_forward_matches_torch_eager_flex_attention(score_mod, mask_mod):
    q, k, v = _qkv(2, 4, 200, 32, dtype=torch.float64)
    ours_bm = create_block_mask(mask_mod, 2, 4, 200, 200, device="cpu", BLOCK_SIZE=64) if mask_mod else None
    theirs_bm = torch_flex.create_block_mask(mask_mod, 2, 4, 200, 200, device="cpu", BLOCK_SIZE=64) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=ours_bm, return_lse=True)
    with warnings.catch_warnings():  # torch warns (once) about running unfused
        warnings.simplefilter("ignore")
        t_out, t_lse = torch_flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=theirs_bm, return_lse=True)
    torch.testing.assert_close(out, t_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, t_lse, atol=1e-12, rtol=1e-12)


def test_torch_block_mask_object_is_accepted():
    q, k, v = _qkv(1, 2, 128, 16, dtype=torch.float64)
    tbm = torch_flex.create_block_mask(causal_mask, 1, 2, 128, 128, device="cpu", BLOCK_SIZE=32)
    out = flex_attention(q, k, v, block_mask=tbm)
    ref, _ = dense_attention(q, k, v, None, causal_mask)
    torch.testing.assert_close(out, ref)


def test_defaults_scale_and_custom_scale():
    q, k, v = _qkv(1, 2, 16, 8, dtype=torch.float64)
    torch.testing.assert_close(flex_attention(q, k, v), dense_attention(q, k, v)[0])
    torch.testing.assert_close(flex_attention(q, k, v, scale=0.3), dense_attention(q, k, v, scale=0.3)[0])
    assert not isinstance(flex_attention(q, k, v), tuple)


def test_return_aux_and_return_lse():
    q, k, v = _qkv(1, 2, 16, 8)
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True))
    out2, lse = flex_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(aux.lse, lse)
    assert lse.shape == (1, 2, 16) and lse.dtype == torch.float32
    ref = torch.logsumexp((q @ k.transpose(-1, -2)) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(lse, ref)


def test_gqa_matches_repeated_heads():
    q, k, v = rand_qkv(2, 6, 40, 40, 16, Hkv=2, requires_grad=False)
    out = flex_attention(q, k, v, score_mod=alibi(6), enable_gqa=True)
    ref = flex_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), score_mod=alibi(6))
    torch.testing.assert_close(out, ref)


def test_kv_batch_of_one_broadcasts():
    q = torch.randn(3, 2, 20, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 20, 8, dtype=torch.float64), torch.randn(1, 2, 20, 8, dtype=torch.float64)
    out = flex_attention(q, k, v)
    ref = flex_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1))
    torch.testing.assert_close(out, ref)


def test_padding_mask_per_batch_lengths_and_broadcast_block_mask():
    lengths = torch.tensor([20, 7, 33], dtype=torch.int32)

    def pad(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    q, k, v = rand_qkv(3, 2, 33, 33, 16)
    bm = create_block_mask(pad, 3, None, 33, 33, device="cpu", BLOCK_SIZE=16)  # H broadcast
    assert bm.kv_num_blocks.shape == (3, 1, 3)
    out = flex_attention(q, k, v, block_mask=bm)
    ref, _ = dense_attention(q, k, v, None, pad)
    torch.testing.assert_close(out, ref)


def test_backend_environment_variable(monkeypatch):
    q, k, v = _qkv(1, 1, 8, 8)
    monkeypatch.setenv("FLEXCOMP_BACKEND", "reference")
    flex_attention(q, k, v)
    monkeypatch.setenv("FLEXCOMP_BACKEND", "cuda-magic")
    with pytest.raises(FlexcompError, match="FLEXCOMP_BACKEND must be 'reference', 'triton' or 'auto', got 'cuda-magic'"):
        flex_attention(q, k, v)
    monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")
    q = q[..., :4]  # the triton backend needs head dims the kernels tile: its refusal shows it was chosen
    with pytest.raises(FlexcompError, match="multiples of 16|at least 16"):
        flex_attention(q, k[..., :4], v, block_mask=create_block_mask(causal_mask, 1, 1, 8, 8, device="cpu", BLOCK_SIZE=8))
    # the explicit option wins over the environment
    flex_attention(q, k[..., :4], v, kernel_options={"BACKEND": "reference"})


def test_torch_kernel_options_are_accepted():
    q, k, v = _qkv(1, 1, 8, 8)
    flex_attention(q, k, v, kernel_options={"BACKEND": "AUTO", "BLOCK_M": 64, "fwd_num_warps": 4, "PRESCALE_QK": False})


# ---- validation errors: each names the argument, what was expected and what came ---------------
@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(2, 16, 8), *_qkv(1, 2, 16, 8)[1:]), r"query must be 4-D \[B, H, S, D\], got 3-D with shape \(2, 16, 8\)"),
    (lambda: (*_qkv(1, 2, 16, 8)[:2], torch.randn(1, 2, 16)), r"value must be 4-D"),
    (lambda: (torch.randint(0, 3, (1, 2, 16, 8)), *_qkv(1, 2, 16, 8)[1:]), r"query must be a floating-point tensor .* got torch.int64"),
    (lambda: (*_qkv(1, 2, 16, 8)[:2], torch.randn(1, 2, 16, 8, dtype=torch.float64)), r"one dtype, got query=torch.float32, key=torch.float32, value=torch.float64"),
    (lambda: (*_qkv(1, 2, 16, 8)[:2], torch.randn(1, 2, 16, 8, device="meta")), r"one device, got query=cpu, key=cpu, value=meta"),
    (lambda: (torch.randn(3, 2, 16, 8), *_qkv(2, 2, 16, 8)[1:]), r"batch size must equal the query's \(3\) or be 1"),
    (lambda: (torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)), r"same head dim .* got query 8 .* and key 4"),
    (lambda: (torch.randn(1, 4, 16, 8), *_qkv(1, 2, 16, 8)[1:]), r"same number of heads, got Hq=4 and Hkv=2; for grouped-query attention pass enable_gqa=True"),
    (lambda: (*_qkv(1, 2, 16, 8)[:2], torch.randn(1, 2, 15, 8)), r"key and value must agree"),
])
def test_input_validation_errors(make, match):
    q, k, v = make()
    with pytest.raises(FlexcompError, match=match):
        flex_attention(q, k, v)


def test_gqa_ratio_error():
    q, k, v = torch.randn(1, 5, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of the key/value heads, got Hq=5 and Hkv=2"):
        flex_attention(q, k, v, enable_gqa=True)


def test_block_mask_length_mismatch_error():
    q, k, v = _qkv(1, 1, 200, 8)
    bm = create_block_mask(causal_mask, 1, 1, 256, 256, device="cpu")
    with pytest.raises(FlexcompError, match=r"created for \(Q_LEN, KV_LEN\)=\(256, 256\) but query has 200 and key 200 tokens"):
        flex_attention(q, k, v, block_mask=bm)


def test_block_mask_batch_mismatch_and_sliced_errors():
    q, k, v = _qkv(2, 3, 64, 8)
    bm = create_block_mask(causal_mask, 4, 3, 64, 64, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(FlexcompError, match=r"batch/heads \(4, 3\), expected \(2, 3\)"):
        flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(FlexcompError, match="was sliced"):
        flex_attention(q, k, v, block_mask=bm[0:2])


def test_bad_options_scale_and_mods():
    q, k, v = _qkv(1, 1, 8, 8)
    with pytest.raises(FlexcompError, match=r"unknown keys \['BLOK_M'\]"):
        flex_attention(q, k, v, kernel_options={"BLOK_M": 64})
    with pytest.raises(FlexcompError, match="kernel_options\\['BACKEND'\\] must be 'reference', 'triton' or 'auto', got 'fast'"):
        flex_attention(q, k, v, kernel_options={"BACKEND": "fast"})
    with pytest.raises(FlexcompError, match=r"kernel_options\['DETERMINISTIC'\] must be True or False, got 'yes'"):
        flex_attention(q, k, v, kernel_options={"DETERMINISTIC": "yes"})
    with pytest.raises(FlexcompError, match="scale must be a finite float or None, got nan"):
        flex_attention(q, k, v, scale=float("nan"))
    with pytest.raises(FlexcompError, match="score_mod must be callable or None, got int"):
        flex_attention(q, k, v, score_mod=3)
    with pytest.raises(FlexcompError, match="takes 4 positional arguments"):
        flex_attention(q, k, v, score_mod=causal_mask)
    with pytest.raises(FlexcompError, match="not both"):
        flex_attention(q, k, v, return_lse=True, return_aux=AuxRequest(lse=True))


def test_create_block_mask_argument_errors():
    with pytest.raises(FlexcompError, match="Q_LEN must be an int >= 0, got -1"):
        create_block_mask(causal_mask, 1, 1, -1, 16, device="cpu")
    with pytest.raises(FlexcompError, match=r"B \(or None to broadcast\) must be an int >= 0, got -1"):
        create_block_mask(causal_mask, -1, 1, 16, 16, device="cpu")
    with pytest.raises(FlexcompError, match=r"BLOCK_SIZE\[1\] must be a positive int, got 0"):
        create_block_mask(causal_mask, 1, 1, 16, 16, device="cpu", BLOCK_SIZE=(16, 0))


def test_cpu_backward_works_where_torch_refuses():
    q, k, v = rand_qkv(1, 2, 32, 32, 16, dtype=torch.float32)
    with pytest.raises(Exception):
        torch_flex.flex_attention(q, k, v)
    flex_attention(q, k, v, score_mod=softcap(5.0)).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_edge_shapes_and_torch_compat_inputs():
    q, k, v = _qkv(1, 2, 16, 8)
    out, lse = flex_attention(q[:, :, :0], k, v, return_lse=True)  # no queries: empty output, as torch
    assert out.shape == (1, 2, 0, 8) and lse is None  # torch returns an empty LSE as None
    with pytest.raises(ZeroDivisionError, match=r"query must have a positive head dim .* got shape \(1, 2, 16, 0\)"):
        flex_attention(q[..., :0], k[..., :0], v)
    with pytest.raises(FlexcompError, match=r"BLOCK_SIZE must be an int or a \(Q_BLOCK, KV_BLOCK\) pair, got \(1, 2, 3\)"):
        create_block_mask(causal_mask, 1, 1, 16, 16, device="cpu", BLOCK_SIZE=(1, 2, 3))
    noop = torch_flex._create_empty_block_mask(q, k)  # torch's internal "no mask"
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=noop), flex_attention(q, k, v))
    flex_attention(q, k, v, kernel_options={"BACKEND": "AUTO"})


def test_out_of_range_capture_index_error_names_the_buffer():
    with pytest.raises(FlexcompError, match=r"load doc\[q_idx\] : i32' indexes the captured tensor 'doc' of shape \(60,\) out of range"):
        create_block_mask(document_mask([30, 30]), 1, 1, 100, 100, device="cpu")
