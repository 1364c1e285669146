"""The reference backend against the dense float64 oracle: outputs, LSE and every gradient."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from flexcomp import create_block_mask, flex_attention
from flexcomp.ir import ModKind
from flexcomp.masks import alibi, causal_mask, softcap, sliding_window
from flexcomp.reference import ReferencePlan, reference_attention
from flexcomp.trace import trace
from flexcomp.testing import dense_attention, grads, rand_qkv

REF = {"BACKEND": "reference"}


def _check(q, k, v, score_mod=None, mask_mod=None, B=None, H=None, bs=16, enable_gqa=False, extra=(),
           opts=REF, tol=1e-9, **kw):
    L, S = q.shape[2], k.shape[2]
    bm = create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=bs) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=enable_gqa,
                              return_lse=True, kernel_options=opts, **kw)
    ro, rl = dense_attention(q, k, v, score_mod, mask_mod, enable_gqa=enable_gqa, **kw)
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rl, atol=tol, rtol=tol)
    inputs = [t for t in (q, k, v, *extra) if t.requires_grad]
    got, want = grads((out, lse), inputs), grads((ro, rl), inputs)
    for name, g, w in zip("qkv" + "b" * len(extra), got, want):
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w.double(), atol=tol * 10, rtol=tol * 10, msg=f"d{name}")
    return out, lse


@pytest.mark.parametrize("L,S", [(200, 200), (130, 257), (1, 300), (300, 1)])
def test_ragged_lengths_causal_softcap(L, S):
    q, k, v = rand_qkv(2, 3, L, S, 16)
    _check(q, k, v, softcap(3.0), causal_mask)


@pytest.mark.parametrize("E", [16, 32, 40, 64, 128])
def test_head_dims(E):
    q, k, v = rand_qkv(1, 2, 64, 48, E)
    _check(q, k, v, alibi(2), sliding_window(20))


def test_value_head_dim_may_differ():
    q, k, v = rand_qkv(1, 2, 40, 40, 16, Ev=24)
    out, _ = _check(q, k, v, None, causal_mask)
    assert out.shape == (1, 2, 40, 24)


def test_gqa_grads_sum_over_group():
    q, k, v = rand_qkv(2, 8, 50, 70, 16, Hkv=2)
    _check(q, k, v, alibi(8), causal_mask, enable_gqa=True)


def test_chunking_does_not_change_results():
    q, k, v = rand_qkv(1, 2, 97, 61, 16)
    bm = create_block_mask(sliding_window(9), 1, 2, 97, 61, device="cpu", BLOCK_SIZE=16)
    runs = []
    for chunk in (61 * 2, 61 * 2 * 7, 1 << 23):  # 1 row, 7 rows, everything per chunk
        out, lse = flex_attention(q, k, v, score_mod=softcap(2.0), block_mask=bm, return_lse=True,
                                  kernel_options={"BACKEND": "reference", "CHUNK_ELEMENTS": chunk})
        runs.append((out, lse, *grads((out, lse), (q, k, v))))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fully_masked_rows_give_zero_and_neg_inf_without_nan():
    def none_for_odd_rows(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (kv_idx <= q_idx)

    q, k, v = rand_qkv(1, 2, 33, 33, 16)
    out, lse = _check(q, k, v, softcap(4.0), none_for_odd_rows)
    assert (out[:, :, 1::2] == 0).all()
    assert torch.isneginf(lse[:, :, 1::2]).all()
    bm = create_block_mask(none_for_odd_rows, 1, 2, 33, 33, device="cpu", BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, score_mod=softcap(4.0), block_mask=bm, return_lse=True)
    dq, dk, dv = grads((out, lse), (q, k, v))
    assert (dq[:, :, 1::2] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_score_mod_returning_neg_inf_masks_like_a_mask():
    def hard_causal(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    q, k, v = rand_qkv(1, 1, 20, 20, 16)
    _check(q, k, v, hard_causal, None)


def test_learnable_bias_table_gradient_several_reads_and_tables():
    H, L = 2, 24
    table = torch.randn(H, 2 * L - 1, dtype=torch.float64, requires_grad=True)
    head_scale = torch.rand(H, dtype=torch.float64).add(0.5).requires_grad_()

    def rel_bias(score, b, h, q_idx, kv_idx):
        rel = q_idx - kv_idx + (L - 1)
        return score * head_scale[h] + table[h, rel] + 0.5 * table[h, (L - 1) - (q_idx - kv_idx) // 2]

    q, k, v = rand_qkv(2, H, L, L, 16)
    _check(q, k, v, rel_bias, causal_mask, extra=(table, head_scale))


def test_mask_only_buffers_get_no_gradient():
    doc = torch.tensor([0] * 10 + [1] * 14, dtype=torch.int32)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    q, k, v = rand_qkv(1, 1, 24, 24, 16)
    _check(q, k, v, None, same_doc)


def test_lse_gradient_flows_into_q_and_k():
    q, k, v = rand_qkv(1, 2, 30, 30, 16)
    out, lse = flex_attention(q, k, v, block_mask=create_block_mask(causal_mask, 1, 2, 30, 30, "cpu", 16),
                              return_lse=True)
    dq, dk = torch.autograd.grad(lse.sum(), (q, k))
    ro, rl = dense_attention(q, k, v, None, causal_mask)
    wq, wk = torch.autograd.grad(rl.sum(), (q, k))
    torch.testing.assert_close(dq, wq)
    torch.testing.assert_close(dk, wk)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_inputs(dtype, tol):
    q, k, v = rand_qkv(1, 2, 64, 64, 32, dtype=dtype)
    bm = create_block_mask(causal_mask, 1, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, score_mod=softcap(5.0), block_mask=bm, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ro, rl = dense_attention(q, k, v, softcap(5.0), causal_mask)
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rl, atol=tol, rtol=tol)
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_gradcheck_tiny_float64():
    table = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)

    def bias(score, b, h, q_idx, kv_idx):
        return torch.tanh(score) * 2 + table[h, q_idx - kv_idx + 4]

    score, mask = trace(bias, ModKind.SCORE), trace(causal_mask, ModKind.MASK)
    plan = ReferencePlan(score, mask, None, (), 0.7, chunk_elements=2 * 5 * 2)
    q, k, v = rand_qkv(1, 2, 5, 5, 3)

    def f(q, k, v, table):
        return reference_attention(q, k, v, plan, (table,))

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_cpu_training_16k_tokens_stays_bounded():
    """Forward + backward at 16,384 tokens: peak RSS far below one S x S float tensor (1 GiB)."""
    code = textwrap.dedent("""
        import resource, torch
        from flexcomp import create_block_mask, flex_attention
        from flexcomp.masks import causal_mask, softcap
        torch.set_num_threads(2)
        S = 16384
        q, k, v = (torch.randn(1, 1, S, 16, requires_grad=True) for _ in range(3))
        bm = create_block_mask(causal_mask, 1, 1, S, S, device="cpu")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = flex_attention(q, k, v, score_mod=softcap(20.0), block_mask=bm)
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    grown_mib = int(r.stdout.strip().splitlines()[-1])
    assert grown_mib < 700, f"training at 16k tokens grew RSS by {grown_mib} MiB"


def test_captures_left_unread_by_simplification_keep_values_aligned():
    P = torch.randint(0, 5, (40,), dtype=torch.int32)
    C = torch.randn(40, dtype=torch.float64)
    w = 3

    def mod(score, b, h, q_idx, kv_idx):
        rel = P[q_idx] * 0 + kv_idx + w - w  # simplifies to kv_idx: P and w are no longer read
        return score + 0.1 * rel.to(torch.float64) + C[kv_idx]

    q, k, v = rand_qkv(1, 2, 40, 40, 16)
    _check(q, k, v, mod, causal_mask)


def test_gradients_when_only_some_inputs_train():
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    v = torch.randn(1, 2, 32, 8, requires_grad=True)
    flex_attention(q, k, v).sum().backward()  # frozen q and k: the LSE has no gradient path
    assert v.grad is not None and torch.isfinite(v.grad).all()
    q.requires_grad_()
    ignores_score = lambda s, b, h, qi, kv: (qi - kv).float()  # noqa: E731
    flex_attention(q, k, v, score_mod=ignores_score).sum().backward()
    assert q.grad is not None and (q.grad == 0).all()


def test_score_mod_nan_at_masked_pairs_gives_finite_gradients():
    def sqrt_distance(score, b, h, q_idx, kv_idx):
        return score * torch.sqrt((q_idx - kv_idx).double() + 1)  # NaN above the diagonal, which is masked

    def guarded(score, b, h, q_idx, kv_idx):  # the same on every kept pair, finite everywhere
        return score * torch.sqrt((q_idx - kv_idx).clamp(min=0).double() + 1)

    q, k, v = rand_qkv(1, 2, 64, 64, 8)
    bm = create_block_mask(causal_mask, 1, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, score_mod=sqrt_distance, block_mask=bm, return_lse=True)
    ro, rl = dense_attention(q, k, v, guarded, causal_mask)
    torch.testing.assert_close(out, ro)
    for g, w in zip(grads((out, lse), (q, k, v)), grads((ro, rl), (q, k, v))):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)


def test_float64_inputs_mask_like_torch():
    def float_band(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx) * 0.1 <= 12.9) & (q_idx >= kv_idx)  # a float32 tie at q - kv = 129

    from torch.nn.attention import flex_attention as tf
    import warnings

    q, k, v = rand_qkv(1, 1, 256, 256, 8, requires_grad=False)
    out = flex_attention(q, k, v, block_mask=create_block_mask(float_band, 1, 1, 256, 256, "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tf.flex_attention(q, k, v, block_mask=tf.create_block_mask(float_band, 1, 1, 256, 256, "cpu"))
    torch.testing.assert_close(out, ref)


def _tiles_or_chunks(monkeypatch, tiled, fn):
    """``fn()`` with the reference's block-row tiles on (as chosen) or off (query chunks)."""
    import flexcomp.reference as ref

    if tiled:
        return fn()
    with monkeypatch.context() as m:
        m.setattr(ref, "_tiles", lambda *a: None)
        m.setattr(ref, "_per_batch_plans", lambda *a: None)  # the chunks take every batch element at once
        return fn()


@pytest.mark.parametrize("case", ["causal ragged", "documents with gaps", "dilated", "softcap causal",
                                  "gqa window", "dropout", "padding per batch element", "padding, bias, dropout"])
def test_block_row_tiles_match_query_chunks_and_the_oracle(case, monkeypatch):
    """The CPU training path (block-row tiles, mask_mod only inside partial blocks, empty blocks inside
    a row's span filled) gives the query-chunk path's results and the oracle's, outputs and grads."""
    import flexcomp.reference as ref
    from flexcomp.api import attention
    from flexcomp.dropout import Dropout

    doc = torch.tensor([0] * 40 + [1] * 90 + [2] * 30 + [3] * 140)  # 300 tokens, ragged

    def documents_with_gaps(b, h, q, kv):  # every other document sees only itself: empty blocks inside spans
        return (doc[q] == doc[kv]) & ((doc[q] % 2 == 0) | (q >= kv))

    def dilated(b, h, q, kv):
        return ((q - kv) % 3 == 0) & (q >= kv)

    def window(b, h, q, kv):
        return (q - kv <= 50) & (kv - q <= 10)

    pad = torch.ones(2, 300, dtype=torch.bool)
    pad[1, :70] = False  # the second sequence left-padded: its block map differs from the first's

    def padded_causal(b, h, q, kv):
        return pad[b, kv] & (q >= kv)

    bias = torch.randn(2, 300)

    def batch_bias(score, b, h, q, kv):  # reads b: the per-element tiles must see the true batch index
        return score + bias[b, kv]

    L, S, H, Hkv, mask_mod, score_mod, drop = {
        "causal ragged": (300, 290, 2, 2, causal_mask, None, None),
        "documents with gaps": (300, 300, 2, 2, documents_with_gaps, None, None),
        "dilated": (260, 260, 2, 2, dilated, None, None),
        "softcap causal": (300, 300, 2, 2, causal_mask, softcap(3.0), None),
        "gqa window": (280, 280, 4, 2, window, alibi(4), None),
        "dropout": (300, 300, 2, 2, causal_mask, None, Dropout(0.3, 11)),
        "padding per batch element": (300, 300, 2, 2, padded_causal, None, None),
        "padding, bias, dropout": (300, 300, 2, 2, padded_causal, batch_bias, Dropout(0.3, 11)),
    }[case]
    q, k, v = rand_qkv(2, H, L, S, 16, Hkv=Hkv)
    per_batch = mask_mod is padded_causal
    bm = create_block_mask(mask_mod, 2 if per_batch else None, None, L, S, device="cpu", BLOCK_SIZE=32)
    if per_batch:  # one block map per batch element: each element runs on tiles of its own
        plans = ref._per_batch_plans(ref.ReferencePlan(None, None, ref.block_map_of(bm, "cpu"), (), 1.0), q, k)
        assert [p.batch_offset for p in plans] == [0, 1]
    used = []
    real = ref.row_plans
    monkeypatch.setattr(ref, "row_plans", lambda *a: used.append(1) or real(*a))
    results = []
    for tiled in (True, False):
        def run():
            out, aux = attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=Hkv != H, kernel_options=REF,
                                 return_aux=flexcomp_aux(), dropout=drop)
            return (out, aux.lse, *grads((out, aux.lse), (q, k, v)))
        results.append(_tiles_or_chunks(monkeypatch, tiled, run))
    assert used, "the block-row tiles were not used"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    if drop is None:
        ro, rl = dense_attention(q, k, v, score_mod, mask_mod, enable_gqa=Hkv != H)
        torch.testing.assert_close(results[0][0].double(), ro, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(results[0][1].double(), rl, atol=1e-9, rtol=1e-9)
        for g, w in zip(results[0][2:], grads((ro, rl), (q, k, v))):
            torch.testing.assert_close(g.double(), w.double(), atol=1e-8, rtol=1e-8)


def flexcomp_aux():
    from flexcomp.api import AuxRequest

    return AuxRequest(lse=True)


@pytest.mark.parametrize("case", ["causal ragged", "documents with gaps", "rows with nothing kept", "gqa",
                                  "mask reads h", "built per batch element", "padding per batch element"])
def test_fused_cpu_tiles_match_the_oracle(case, monkeypatch):
    """Tiles without a score_mod or dropout run on torch's fused CPU flash kernels (forward, and the
    backward when no gradient reaches the LSE): output, LSE and every gradient against the oracle."""
    import flexcomp.reference as ref

    doc = torch.tensor([0] * 40 + [1] * 90 + [2] * 30 + [3] * 140)

    def documents_with_gaps(b, h, q, kv):
        return (doc[q] == doc[kv]) & ((doc[q] % 2 == 0) | (q >= kv))

    def nothing_for_some_rows(b, h, q, kv):  # rows 64 .. 95 keep nothing: output 0, LSE -inf, no NaN
        return ((q < 64) | (q >= 96)) & (q >= kv)

    def by_head(b, h, q, kv):  # head 1 drops more pairs, inside the diagonal (partial) blocks only
        return (q >= kv) & ((h == 0) | (q // 32 != kv // 32) | ((q + kv) % 3 != 0))

    pad = torch.ones(2, 200, dtype=torch.bool)
    pad[0, :45] = False

    def padded(b, h, q, kv):  # one block map per batch element: tiles per element
        return pad[b, kv] & (q >= kv)

    L, S, H, Hkv, mask_mod = {
        "causal ragged": (300, 290, 2, 2, causal_mask),
        "documents with gaps": (300, 300, 2, 2, documents_with_gaps),
        "rows with nothing kept": (200, 200, 2, 2, nothing_for_some_rows),
        "gqa": (260, 260, 4, 2, causal_mask),
        "mask reads h": (256, 256, 2, 2, by_head),
        "built per batch element": (200, 200, 2, 2, causal_mask),  # B given, as transformers builds its masks
        "padding per batch element": (200, 200, 2, 2, padded),
    }[case]
    q, k, v = rand_qkv(2, H, L, S, 16, Hkv=Hkv)
    bm = create_block_mask(mask_mod, 2 if case.endswith("per batch element") else None, None, L, S, device="cpu",
                           BLOCK_SIZE=32)
    if case == "built per batch element":  # lists expanded over the batch: one block map, the tiles apply
        assert bm.kv_num_blocks.shape[0] == 2 and ref.block_map_of(bm, "cpu").kind.shape[:2] == (1, 1)
    calls = []
    for name in ("fused_forward", "fused_grads"):
        real = getattr(ref, name)
        monkeypatch.setattr(ref, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=Hkv != H, kernel_options=REF)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    assert {"fused_forward", "fused_grads"} <= set(calls)
    _, aux = flex_attention(q, k, v, block_mask=bm, enable_gqa=Hkv != H, kernel_options=REF,
                            return_aux=flexcomp_aux())
    lse = aux.lse
    ro, rl = dense_attention(q, k, v, None, mask_mod, enable_gqa=Hkv != H)
    torch.testing.assert_close(out, ro, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse.double(), rl, atol=1e-10, rtol=1e-9)
    for g, w in zip(got, torch.autograd.grad(ro, (q, k, v), do)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)
    if case == "rows with nothing kept":
        assert (out[:, :, 64:96] == 0).all() and torch.isneginf(lse[:, :, 64:96]).all()


def test_mask_scratch_views_one_zero_buffer_and_clears_what_a_tile_wrote():
    """The fused tiles' masks are views of one zero buffer: a tile's runs are zero again after
    ``clear``, so the next tile (another span, the backward) starts from zeros; masks that differ by
    batch element or head get their own tensor."""
    from flexcomp.reference_tiles import MaskScratch, Run, RowPlan
    from flexcomp.sparsity import BlockKind

    tiles = [RowPlan(0, 32, 0, 32, (Run(BlockKind.PARTIAL, 0, 32),)),
             RowPlan(32, 64, 0, 64, (Run(BlockKind.EMPTY, 0, 16), Run(BlockKind.PARTIAL, 32, 64)))]
    scratch = MaskScratch(tiles, torch.float32, "cpu")
    m = scratch.take((1, 1), 32, 64, torch.float32, "cpu")
    assert m.shape == (1, 1, 32, 64) and float(m.abs().sum()) == 0
    m[..., 0:16] = -torch.inf
    m[..., 40:50] = -torch.inf
    scratch.clear(m, tiles[1])
    assert float(scratch.take((1, 1), 32, 64, torch.float32, "cpu").abs().sum()) == 0
    own = scratch.take((1, 2), 32, 64, torch.float32, "cpu")
    assert own.shape == (1, 2, 32, 64) and own.data_ptr() != m.data_ptr()


def test_gqa_tiles_pass_keys_unrepeated_where_torch_takes_gqa(monkeypatch):
    """Where torch's CPU flash kernels take fewer key/value heads themselves (checked once), the fused
    tiles hand them the keys as they are (no copy per tile); the values stay the oracle's either way."""
    import flexcomp.reference_tiles as rt

    native = rt._native_gqa()  # the one-time check runs the kernel itself: before recording its calls
    heads = []
    real = rt._FLASH
    monkeypatch.setattr(rt, "_FLASH", lambda q, k, *a, **kw: heads.append(k.shape[1]) or real(q, k, *a, **kw))
    q, k, v = rand_qkv(1, 4, 160, 160, 16, Hkv=2)
    bm = create_block_mask(causal_mask, None, None, 160, 160, device="cpu", BLOCK_SIZE=32)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=REF)
    assert heads and set(heads) == {2 if native else 4}
    ro, _ = dense_attention(q, k, v, None, causal_mask, enable_gqa=True)
    torch.testing.assert_close(out, ro, atol=1e-10, rtol=1e-9)
    monkeypatch.setattr(rt, "_native_gqa", lambda: False)  # the repeated-keys path: same values
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=REF), ro,
                               atol=1e-10, rtol=1e-9)


def test_block_map_is_unpacked_once_per_mask_and_anew_after_an_in_place_write(monkeypatch):
    """A forward and its backward (and repeated calls) unpack a BlockMask once; writing into its lists
    in place (their version counters move) unpacks anew: never a stale map."""
    import flexcomp.reference as ref

    made = []
    real = ref._block_map
    monkeypatch.setattr(ref, "_block_map", lambda *a: made.append(1) or real(*a))
    q, k, v = rand_qkv(1, 2, 64, 64, 8)
    bm = create_block_mask(causal_mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    for _ in range(2):
        out = flex_attention(q, k, v, block_mask=bm, kernel_options=REF)
        grads(out, (q, k, v))
    assert len(made) == 1
    bm.full_kv_num_blocks.zero_()  # every full block dropped from the lists: those keys are gone
    bm.kv_num_blocks.zero_()
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=REF)
    assert len(made) == 2 and bool((out == 0).all())


@pytest.mark.parametrize("L", [3, 300])
def test_a_key_value_batch_of_one_broadcasts_on_every_cpu_path(L):
    """Keys and values with batch 1 serve every query batch element (torch's broadcast), on the
    block-row tiles (L=300) and a decode-sized chunk (L=3): torch's fused CPU kernels would read past
    that batch (the tiles gave NaN), so those problems take the torch-op paths. Output and gradients
    against the oracle."""
    q = torch.randn(3, 2, L, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 300, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mod = lambda b, h, qi, kv: kv <= qi + 300 - L  # noqa: E731
    bm = create_block_mask(mod, None, None, L, 300, device="cpu")
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=REF)
    ref, _ = dense_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), None, mod)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    do = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)
