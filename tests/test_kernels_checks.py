"""Captured-tensor indices in the Triton kernels: a mod whose loads ``flexcomp.ranges`` cannot prove
in range runs as its checked variant, and an index outside its tensor raises IndexError (as torch
does) instead of computing with a made-up value; proven mods run unchecked."""
from __future__ import annotations

import pytest
import torch

from flexcomp import create_block_mask, flex_attention
from flexcomp.blockmask import BlockMask
import flexcomp.plan as plan_module
from flexcomp.cache import CACHE
from flexcomp.codegen import modules
from flexcomp.codegen.lower import FloatType
from flexcomp.errors import FlexcompIndexError
from flexcomp.ir import ModKind
from flexcomp.masks import causal_mask
from flexcomp.trace import trace

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}


def _qkv(L=64, S=64, dtype=torch.float32):
    return (torch.randn(1, 2, L, 16, device=DEVICE, dtype=dtype), torch.randn(1, 2, S, 16, device=DEVICE, dtype=dtype),
            torch.randn(1, 2, S, 16, device=DEVICE, dtype=dtype))


def _every_block_partial(mask_mod, L=64, S=64, bs=32, kv_blocks=None):
    """A BlockMask that lists kv blocks ``kv_blocks`` (default all) as partial for every query block,
    so the kernel evaluates ``mask_mod`` there (create_block_mask would raise already)."""
    every = list(range(-(-S // bs)))
    kv_blocks = every if kv_blocks is None else kv_blocks
    nq = -(-L // bs)
    num = torch.full((1, 1, nq), len(kv_blocks), dtype=torch.int32, device=DEVICE)
    order = kv_blocks + [j for j in every if j not in kv_blocks]  # kept ones first, as create_block_mask
    idx = torch.tensor(order, dtype=torch.int32, device=DEVICE).expand(1, 1, nq, -1).contiguous()
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(L, S))


def _generated(fn, kind, checked):
    tm = trace(fn, kind)
    return ("kernel", "mod", kind, tm.graph.structural_key(), FloatType.F32, checked) in CACHE


@pytest.mark.parametrize("past", ["end", "start"])
def test_score_mod_index_out_of_range_raises(past):
    short = torch.randn(40, device=DEVICE)

    def score_mod(score, b, h, q_idx, kv_idx):
        i = kv_idx if past == "end" else -kv_idx - 1  # 0..63, or -1..-64: both leave a 40-long tensor
        return score + short[i]

    with pytest.raises(FlexcompIndexError, match=r"score_mod 'score_mod': '.*load short\[.*' indexed the captured "
                                                 r"tensor 'short' of shape \(40,\) out of range \(dim 0: index "
                                                 + (r"(4\d|5\d|6[0-3])" if past == "end" else r"-(4[1-9]|5\d|6[0-4])")):
        flex_attention(*_qkv(), score_mod=score_mod, kernel_options=TRITON)
    assert _generated(score_mod, ModKind.SCORE, checked=True)


@pytest.mark.parametrize("past", ["end", "start"])
def test_mask_mod_index_out_of_range_raises(past):
    allowed = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)

    def mask_mod(b, h, q_idx, kv_idx):
        i = q_idx if past == "end" else -q_idx - 1
        return allowed[h, i] & (kv_idx <= q_idx)

    with pytest.raises(IndexError, match=r"mask_mod 'mask_mod': .* 'allowed' of shape \(2, 40\) out of range "
                                         r"\(dim 1: index "):
        flex_attention(*_qkv(), block_mask=_every_block_partial(mask_mod), kernel_options=TRITON)


def test_an_index_computed_from_another_capture_is_checked_too():
    doc = torch.tensor([0] * 30 + [1] * 34, device=DEVICE)
    table = torch.randn(2, 2, device=DEVICE)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[doc[q_idx], doc[kv_idx]]

    q, k, v = _qkv()
    ok = flex_attention(q, k, v, score_mod=score_mod, kernel_options=TRITON)
    ref = flex_attention(q, k, v, score_mod=score_mod, kernel_options={"BACKEND": "reference"})
    torch.testing.assert_close(ok, ref, atol=2e-5, rtol=2e-5)
    doc[50] = 2  # in place: the proof is redone for the new values, and fails
    with pytest.raises(FlexcompIndexError, match=r"'table' of shape \(2, 2\) out of range \(dim [01]: index 2"):
        flex_attention(q, k, v, score_mod=score_mod, kernel_options=TRITON)
    doc[50] = -1  # counts from the end, as torch: in range again
    flex_attention(q, k, v, score_mod=score_mod, kernel_options=TRITON)


def test_masked_pairs_of_evaluated_blocks_count_skipped_blocks_do_not():
    short = torch.ones(32, dtype=torch.bool, device=DEVICE)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < 16) & short[kv_idx]  # short[kv_idx] is evaluated (as in torch) where kv_idx >= 16 too

    q, k, v = _qkv()
    first_block = _every_block_partial(mask_mod, kv_blocks=[0])  # kv 32..63 never visited
    out = flex_attention(q, k, v, block_mask=first_block, kernel_options=TRITON)
    ref = flex_attention(q, k, v, block_mask=first_block, kernel_options={"BACKEND": "reference"})
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(FlexcompIndexError, match=r"index (3[2-9]|[4-5]\d|6[0-3])\b"):
        flex_attention(q, k, v, block_mask=_every_block_partial(mask_mod), kernel_options=TRITON)


def test_a_proven_mod_runs_unchecked_and_the_proof_is_kept():
    bias = torch.randn(2, 127, device=DEVICE)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + 63]  # 0..126: in range, and provably so

    calls = []
    prove = plan_module.mod_proven_safe
    plan_module.mod_proven_safe = lambda *a: calls.append(a) or prove(*a)
    try:
        q, k, v = _qkv()
        bm = create_block_mask(causal_mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
        for _ in range(3):
            flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm, kernel_options=TRITON)
        assert len(calls) == 1  # once for the score_mod (the causal mask reads nothing)
        bias.mul_(2.0)  # a new version of a captured tensor: proven again, compiled nothing new
        before = modules.STATS.generated
        flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm, kernel_options=TRITON)
        assert len(calls) == 2 and modules.STATS.generated == before
    finally:
        plan_module.mod_proven_safe = prove
    assert _generated(rel_bias, ModKind.SCORE, checked=False)
    assert not _generated(rel_bias, ModKind.SCORE, checked=True)
    got = flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm, kernel_options=TRITON)
    ref = flex_attention(q, k, v, score_mod=rel_bias, block_mask=bm, kernel_options={"BACKEND": "reference"})
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_longer_sequences_need_a_new_proof():
    bias = torch.randn(2, 64, device=DEVICE)

    def per_query(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx]

    flex_attention(*_qkv(64, 64), score_mod=per_query, kernel_options=TRITON)
    assert _generated(per_query, ModKind.SCORE, checked=False)
    with pytest.raises(FlexcompIndexError, match=r"'bias' of shape \(2, 64\) out of range \(dim 1: index "):
        flex_attention(*_qkv(80, 64), score_mod=per_query, kernel_options=TRITON)


def test_checked_float64_mods_raise_too():
    short = torch.randn(10, dtype=torch.float64, device=DEVICE)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + short[kv_idx]

    with pytest.raises(FlexcompIndexError, match="out of range"):
        flex_attention(*_qkv(dtype=torch.float64), score_mod=score_mod, kernel_options=TRITON)


def test_checked_source_reports_each_load_and_dim():
    from flexcomp.codegen.lower import lower

    table, doc = torch.randn(3, 3), torch.arange(8)
    g = trace(lambda s, b, h, q_idx, kv_idx: s + table[doc[q_idx], doc[kv_idx]], ModKind.SCORE).graph
    checked, plain = lower(g, checked=True), lower(g)
    assert plain.checks == () and "check_index" not in plain.source
    assert [(c.buffer, c.dim) for c in checked.checks] == [("doc", 0), ("doc", 0), ("table", 0), ("table", 1)]
    assert checked.source.count("ops.check_index(") == 4 and "BUFS[2], 3)" in checked.source
    assert checked.name == plain.name + "_checked"


@pytest.mark.parametrize("where", ["score", "mask"])
def test_integer_division_by_zero_raises_on_the_kernels_as_torch(where):
    """An integer // or % whose divisor can be 0 runs checked: a zero divisor met in an evaluated
    block raises (torch raises RuntimeError('ZeroDivisionError')); a divisor proven nonzero runs
    unchecked."""
    zero_at = torch.tensor([3], device=DEVICE)

    def score_div(score, b, h, q_idx, kv_idx):
        return score + (q_idx // (kv_idx - zero_at[0])).float() * 0.01

    def mask_div(b, h, q_idx, kv_idx):
        return (q_idx % (kv_idx - zero_at[0])) >= 0

    q, k, v = _qkv()
    causal = create_block_mask(causal_mask, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    lists = (causal.kv_num_blocks, causal.kv_indices, causal.full_kv_num_blocks, causal.full_kv_indices)
    kw = {"score_mod": score_div} if where == "score" else {  # the diagonal blocks are partial: mask_div runs there
        "block_mask": BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=32, mask_mod=mask_div, seq_lengths=(64, 64))}
    with pytest.raises(RuntimeError, match="divides an integer by zero") as info:
        flex_attention(q, k, v, kernel_options=TRITON, **kw)
    assert isinstance(info.value, ZeroDivisionError)

    def safe(score, b, h, q_idx, kv_idx):
        return score + (q_idx // (kv_idx + 1)).float() * 0.01

    out = flex_attention(q, k, v, score_mod=safe, kernel_options=TRITON)
    assert _generated(safe, ModKind.SCORE, checked=False) and not _generated(safe, ModKind.SCORE, checked=True)
    torch.testing.assert_close(out, flex_attention(q, k, v, score_mod=safe, kernel_options={"BACKEND": "reference"}),
                               atol=2e-5, rtol=2e-5)


def _named(name: str, t: torch.Tensor, by_q: bool = False):
    """Two score_mods of one structure whose captured tensors have different names."""
    namespace = {name: t}
    src = (f"def score_mod(score, b, h, q_idx, kv_idx):\n"
           f"    return score + {name}[q_idx]\n" if by_q else
           f"def score_mod(score, b, h, q_idx, kv_idx):\n"
           f"    return score + {name}[h, q_idx, kv_idx]\n")
    exec(compile(src, f"<{name}>", "exec"), namespace)
    return namespace["score_mod"]


def test_mods_of_one_structure_with_other_capture_names_get_their_gradients():
    """Plans, derived graphs and generated functions are shared by structure: captures are matched
    by position, never by name (a second mod naming its bias otherwise got no gradient)."""
    q = torch.randn(1, 2, 32, 16, device=DEVICE, requires_grad=True)
    for name in ("rel_bias", "alibi_bias"):
        bias = torch.randn(2, 32, 32, device=DEVICE, requires_grad=True)
        flex_attention(q, q, q, score_mod=_named(name, bias), kernel_options=TRITON).sum().backward()
        got, bias.grad = bias.grad, None
        flex_attention(q, q, q, score_mod=_named(name, bias), kernel_options={"BACKEND": "reference"}).sum().backward()
        assert got is not None, name
        torch.testing.assert_close(got, bias.grad, atol=1e-4, rtol=1e-4)


def test_an_out_of_range_index_names_the_capture_of_the_mod_that_ran():
    q = torch.randn(1, 1, 32, 16, device=DEVICE)
    for name in ("rel", "other"):
        with pytest.raises(FlexcompIndexError, match=rf"'{name}' of shape \(8,\) out of range"):
            flex_attention(q, q, q, score_mod=_named(name, torch.randn(8, device=DEVICE), by_q=True),
                           kernel_options=TRITON)


def test_a_capture_shortened_through_data_is_proven_again():
    table = torch.randn(64, device=DEVICE)
    q = torch.randn(1, 1, 64, 16, device=DEVICE)

    def per_query(score, b, h, q_idx, kv_idx):
        return score + table[q_idx]

    flex_attention(q, q, q, score_mod=per_query, kernel_options=TRITON)  # proven in range, kept
    table.data = table.data[:10]  # same storage and version, shorter
    with pytest.raises(FlexcompIndexError, match="out of range"):
        flex_attention(q, q, q, score_mod=per_query, kernel_options=TRITON)
