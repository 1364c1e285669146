"""flexcomp.sparsity: block classification by interval analysis, then dense evaluation of the rest.

The oracle is brute force: call the user's mask_mod directly (no tracing, no IR) on full broadcast
index tensors, pad to whole blocks with False (as torch does) and count the kept pairs per block.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexcomp.sparsity as sp
from flexcomp import and_masks, create_block_mask, or_masks
from flexcomp.ir import ModKind
from flexcomp.masks import causal_mask, document_mask, padding_mask, prefix_lm, sliding_window
from flexcomp.sparsity import BlockGrid, BlockKind, block_intervals, classify_blocks
from flexcomp.trace import trace

EMPTY, PARTIAL, FULL = int(BlockKind.EMPTY), int(BlockKind.PARTIAL), int(BlockKind.FULL)


def cdiv(a, b):
    return -(-a // b)


def dense_mask(mask_mod, B, H, Q, KV):
    b = torch.arange(B, dtype=torch.int32).view(-1, 1, 1, 1)
    h = torch.arange(H, dtype=torch.int32).view(1, -1, 1, 1)
    q = torch.arange(Q, dtype=torch.int32).view(1, 1, -1, 1)
    kv = torch.arange(KV, dtype=torch.int32).view(1, 1, 1, -1)
    return torch.broadcast_to(torch.as_tensor(mask_mod(b, h, q, kv)), (B, H, Q, KV)).bool()


def brute(mask_mod, B, H, Q, KV, qb, kvb):
    """(kinds int8 [B,H,nq,nkv], kept-pair counts, valid-pair counts) from the dense mask."""
    m = dense_mask(mask_mod, B, H, Q, KV)
    nq, nkv = cdiv(Q, qb), cdiv(KV, kvb)
    padded = torch.zeros(B, H, nq * qb, nkv * kvb, dtype=torch.bool)
    padded[:, :, :Q, :KV] = m
    cnt = padded.view(B, H, nq, qb, nkv, kvb).sum(dim=(3, 5))
    kinds = torch.where(cnt == 0, EMPTY, torch.where(cnt == qb * kvb, FULL, PARTIAL)).to(torch.int8)
    vq = torch.clamp(Q - torch.arange(nq) * qb, max=qb)
    vk = torch.clamp(KV - torch.arange(nkv) * kvb, max=kvb)
    return kinds, cnt, vq.view(-1, 1) * vk.view(1, -1)


def classify(mask_mod, B, H, Q, KV, qb, kvb):
    return classify_blocks(trace(mask_mod, ModKind.MASK), BlockGrid(Q, KV, qb, kvb), B, H, "cpu")


def check_against_brute(mask_mod, B, H, Q, KV, qb, kvb):
    """classify_blocks == brute force, and the interval bounds alone are sound."""
    tm = trace(mask_mod, ModKind.MASK)
    grid = BlockGrid(Q, KV, qb, kvb)
    want, cnt, valid = brute(mask_mod, B, H, Q, KV, qb, kvb)
    got = classify_blocks(tm, grid, B, H, "cpu")
    assert got.dtype == torch.int8
    assert got.shape == (B, H, grid.num_q, grid.num_kv)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"classification differs from brute force at (b,h,qblk,kvblk) {bad}: "
                             f"got {[int(got[tuple(i)]) for i in bad]}, want {[int(want[tuple(i)]) for i in bad]}\n"
                             f"graph:\n{tm.graph}")
    iv = block_intervals(tm, grid, B, H, "cpu")
    shape = (B, H, grid.num_q, grid.num_kv)
    lo, hi = torch.broadcast_to(iv.lo, shape), torch.broadcast_to(iv.hi, shape)
    assert bool(((lo == 0) | (lo == 1)).all()) and bool(((hi == 0) | (hi == 1)).all()), "bool bounds not 0/1"
    assert bool((lo <= hi).all())
    valid = torch.broadcast_to(valid, shape)
    sure_full = lo == 1
    sure_empty = hi == 0
    if not bool((cnt[sure_full] == valid[sure_full]).all()):
        bad = (sure_full & (cnt != valid)).nonzero()[:5].tolist()
        raise AssertionError(f"interval analysis says 'all kept' but some pair is masked in blocks {bad}\n{tm.graph}")
    if not bool((cnt[sure_empty] == 0).all()):
        bad = (sure_empty & (cnt != 0)).nonzero()[:5].tolist()
        raise AssertionError(f"interval analysis says 'none kept' but some pair is kept in blocks {bad}\n{tm.graph}")
    return got


@pytest.fixture
def evaluated(monkeypatch):
    """Records every block handed to the dense step (``_evaluate_blocks``) as (b, h, q-block, kv-block)."""
    seen: list[tuple[int, ...]] = []
    real = sp._evaluate_blocks

    def spy(tm, grid, coords, device):
        seen.extend(tuple(int(x) for x in row) for row in coords.tolist())
        return real(tm, grid, coords, device)

    monkeypatch.setattr(sp, "_evaluate_blocks", spy)
    return seen


# ---- BlockGrid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("Q,KV,qb,kvb,nq,nkv", [(256, 256, 128, 128, 2, 2), (200, 257, 64, 32, 4, 9),
                                               (1, 300, 128, 128, 1, 3), (300, 1, 16, 16, 19, 1),
                                               (5, 5, 7, 1, 1, 5)])
def test_block_grid_counts(Q, KV, qb, kvb, nq, nkv):
    g = BlockGrid(Q, KV, qb, kvb)
    assert (g.num_q, g.num_kv) == (nq, nkv)


# ---- the interval analysis decides blocks without dense evaluation ------------------------------
def test_causal_4096_evaluates_only_the_diagonal(evaluated):
    kinds = classify(causal_mask, 1, 1, 4096, 4096, 128, 128)
    assert sorted(evaluated) == [(0, 0, i, i) for i in range(32)]
    i = torch.arange(32)
    want = torch.where(i.view(-1, 1) > i.view(1, -1), FULL, torch.where(i.view(-1, 1) == i.view(1, -1), PARTIAL, EMPTY))
    assert torch.equal(kinds[0, 0], want.to(torch.int8))


def test_causal_bounds_are_exact_per_block():
    tm = trace(causal_mask, ModKind.MASK)
    grid = BlockGrid(1000, 1000, 128, 128)
    iv = block_intervals(tm, grid, 1, 1, "cpu")
    i = torch.arange(8, dtype=torch.float64)
    q0, q1 = i * 128, torch.clamp(i * 128 + 127, max=999)
    lo = (q0.view(-1, 1) >= q1.view(1, -1)).double()
    hi = (q1.view(-1, 1) >= q0.view(1, -1)).double()
    assert torch.equal(torch.broadcast_to(iv.lo, (1, 1, 8, 8))[0, 0], lo)
    assert torch.equal(torch.broadcast_to(iv.hi, (1, 1, 8, 8))[0, 0], hi)


def test_sliding_window_4096_evaluates_two_blocks_per_row(evaluated):
    kinds = classify(sliding_window(256), 1, 1, 4096, 4096, 128, 128)
    want = sorted([(0, 0, i, i) for i in range(32)] + [(0, 0, i, i - 2) for i in range(2, 32)])
    assert sorted(evaluated) == want
    assert torch.equal(kinds, check_against_brute(sliding_window(256), 1, 1, 4096, 4096, 128, 128))


def test_document_mask_block_aligned_evaluates_only_the_diagonal(evaluated):
    m = document_mask([512, 1024, 256, 2304])
    kinds = classify(m, 1, 1, 4096, 4096, 128, 128)
    assert sorted(evaluated) == [(0, 0, i, i) for i in range(32)]
    assert torch.equal(kinds, brute(m, 1, 1, 4096, 4096, 128, 128)[0])
    assert int((kinds == FULL).sum()) == sum(n * (n - 1) // 2 for n in (4, 8, 2, 18))


def test_bidirectional_block_aligned_documents_evaluate_nothing(evaluated):
    m = document_mask([512, 1024, 256, 2304], inner=None)
    kinds = classify(m, 1, 1, 4096, 4096, 128, 128)
    assert evaluated == []
    assert int((kinds == FULL).sum()) == 16 + 64 + 4 + 324
    assert int((kinds == PARTIAL).sum()) == 0


def test_document_mask_unaligned_evaluates_only_boundary_and_diagonal_blocks(evaluated):
    lengths = [300, 1000, 77, 2719]
    m = document_mask(lengths)
    kinds = classify(m, 1, 1, 4096, 4096, 128, 128)
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
    boundary_blocks = set((starts[1:] // 128).tolist())  # blocks holding a document start (after 0)
    allowed = {(0, 0, i, j) for i in range(32) for j in range(32)
               if i == j or i in boundary_blocks or j in boundary_blocks}
    assert set(evaluated) <= allowed
    assert len(evaluated) < 0.1 * 32 * 32
    assert torch.equal(kinds, brute(m, 1, 1, 4096, 4096, 128, 128)[0])


def test_per_batch_documents_use_range_loads(evaluated):
    ids = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor([256, 512, 128, 128])),
                       torch.repeat_interleave(torch.arange(2), torch.tensor([640, 384]))])
    m = document_mask(doc_ids=ids)
    kinds = check_against_brute(m, 2, 1, 1024, 1024, 128, 128)
    # every document is block aligned: only diagonal blocks need the dense step
    assert sorted(set(evaluated)) == sorted({(b, 0, i, i) for b in range(2) for i in range(8)})
    assert int((kinds[0, 0] == FULL).sum()) == 1 + 6 + 0 + 0
    assert int((kinds[1, 0] == FULL).sum()) == 10 + 3


def test_padding_mask_evaluates_one_column_per_batch(evaluated):
    lengths = [100, 512, 1000]
    kinds = check_against_brute(padding_mask(lengths), 3, 2, 512, 1024, 128, 128)
    # lengths[b] is an exact load per batch: only the kv column holding lengths[b] (if unaligned)
    # is left to the dense step, once (not per head: the mask ignores h)
    want = {(b, 0, i, L // 128) for b, L in enumerate(lengths) if L % 128 for i in range(4)}
    assert sorted(evaluated) == sorted(want)
    # the mask ignores h: classified once, expanded over heads
    assert kinds.stride(1) == 0
    assert torch.equal(kinds[:, 0], kinds[:, 1])


def test_prefix_lm_evaluates_diagonal_and_prefix_column(evaluated):
    kinds = classify(prefix_lm(300), 1, 1, 4096, 4096, 128, 128)
    allowed = {(0, 0, i, i) for i in range(32)} | {(0, 0, i, 2) for i in range(32)}
    assert set(evaluated) <= allowed
    assert torch.equal(kinds, brute(prefix_lm(300), 1, 1, 4096, 4096, 128, 128)[0])


def test_undecidable_ops_fall_back_to_dense_evaluation(evaluated):
    def checker(b, h, q_idx, kv_idx):  # bitwise ops on ints: no interval rule, so nothing is decided
        return ((q_idx ^ kv_idx) & 1) == 0

    kinds = check_against_brute(checker, 1, 1, 100, 70, 16, 8)
    assert sorted(set(evaluated)) == [(0, 0, i, j) for i in range(7) for j in range(9)]
    assert bool((kinds == PARTIAL).all())  # every block mixes even and odd pairs


def test_float_ops_are_classified_correctly():
    def float_band(b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).float()
        return (torch.sqrt(torch.abs(d)) <= 4.5) & (torch.exp2(-d / 64) <= 1.0)

    check_against_brute(float_band, 1, 1, 300, 260, 32, 16)


def test_eval_budget_batches_give_the_same_result(monkeypatch):
    m = and_masks(document_mask([37, 100, 63]), sliding_window(20))
    want = check_against_brute(m, 1, 1, 200, 200, 16, 16)
    monkeypatch.setattr(sp, "EVAL_BUDGET", 1)  # one block per batch of the dense step
    assert torch.equal(classify(m, 1, 1, 200, 200, 16, 16), want)
    monkeypatch.setattr(sp, "EVAL_BUDGET", 16 * 16 * 3 + 5)
    assert torch.equal(classify(m, 1, 1, 200, 200, 16, 16), want)


def test_edge_blocks_are_never_full():
    kinds = classify(lambda b, h, q_idx, kv_idx: q_idx >= 0, 1, 1, 130, 257, 64, 32)
    assert kinds.shape == (1, 1, 3, 9)
    assert bool((kinds[0, 0, :2, :8] == FULL).all())
    assert bool((kinds[0, 0, 2, :] == PARTIAL).all()) and bool((kinds[0, 0, :, 8] == PARTIAL).all())


def test_classify_expands_over_unused_batch_and_heads():
    kinds = classify(causal_mask, 4, 5, 256, 256, 64, 64)
    assert kinds.shape == (4, 5, 4, 4) and kinds.dtype == torch.int8
    assert kinds.stride(0) == 0 and kinds.stride(1) == 0

    def per_head(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= 40 * h

    kinds = check_against_brute(per_head, 2, 3, 256, 256, 64, 64)
    assert kinds.stride(0) == 0
    assert not torch.equal(kinds[0, 0], kinds[0, 2])


def test_dead_load_after_simplification_keeps_buffers_aligned():
    periodic = torch.tensor([5, 2, 3] * 100, dtype=torch.int32)
    kv_class = (torch.arange(300) // 32) % 2  # constant over each 16-block: decides blocks EMPTY / FULL

    def dead_load(b, h, q_idx, kv_idx):  # periodic[...] * 0 simplifies away; kv_class must still be read
        return (periodic[q_idx] * 0 + q_idx >= kv_idx) & (kv_class[kv_idx] > 0)

    check_against_brute(dead_load, 1, 1, 300, 300, 16, 16)


def test_dead_scalar_after_simplification_keeps_scalars_aligned():
    def make(w, window):
        def dead_scalar(b, h, q_idx, kv_idx):  # w - w simplifies away; window must keep its value
            return (q_idx >= kv_idx + w - w) & (q_idx - kv_idx <= window)

        return dead_scalar

    check_against_brute(make(3, 40), 1, 1, 300, 300, 16, 16)


@pytest.mark.parametrize("name,mod", [
    ("causal", causal_mask), ("window", sliding_window(13)), ("prefix", prefix_lm(21)),
    ("doc", document_mask([50, 1, 30, 80])), ("doc_prefix", document_mask([50, 1, 30, 80], inner=prefix_lm(5))),
    ("or", or_masks(prefix_lm(9), sliding_window(3))), ("and", and_masks(causal_mask, padding_mask([40, 161]))),
])
@pytest.mark.parametrize("Q,KV,qb,kvb", [(161, 161, 16, 16), (161, 100, 32, 8), (1, 161, 7, 5), (161, 3, 1, 128)])
def test_library_masks_against_brute_force(name, mod, Q, KV, qb, kvb):
    check_against_brute(mod, 2, 1, Q, KV, qb, kvb)


# ---- soundness fuzz -----------------------------------------------------------------------------
# Random mask_mods, written as Python source: comparisons on q_idx, kv_idx, q_idx - kv_idx, b, h
# with random constants, //, %, abs, minimum/maximum, where, loads from captured int and bool
# tensors, & | ^ ~. Every subexpression depends on an index, so it is a tensor (or a traced value).
L0 = 96  # T0 is long enough to be indexed by q_idx / kv_idx directly (lengths <= 80)

_CMP = ["<", "<=", ">", ">=", "==", "!="]
_SCALARS = ["S0", "S1", "S2"]  # captured Python ints: scalar inputs of the IR


@st.composite
def int_expr(draw, depth, lens):
    leaves = ["q_idx", "kv_idx", "(q_idx - kv_idx)", "(kv_idx - q_idx)", "b", "h"]
    if depth <= 0:
        return draw(st.sampled_from(leaves))
    kind = draw(st.sampled_from(["leaf", "add", "sub", "mulc", "addc", "div", "mod", "abs", "min", "max",
                                 "load0", "load1", "load2", "where"]))
    sub = lambda: draw(int_expr(depth - 1, lens))  # noqa: E731
    const = lambda lo=-40, hi=40: draw(st.one_of(st.integers(lo, hi), st.sampled_from(_SCALARS)))  # noqa: E731
    nonzero = lambda: draw(st.sampled_from([-9, -7, -3, -2, -1, 1, 2, 3, 4, 5, 8, 16, 33]))  # noqa: E731
    if kind == "leaf":
        return draw(st.sampled_from(leaves))
    if kind == "add":
        return f"({sub()} + {sub()})"
    if kind == "sub":
        return f"({sub()} - {sub()})"
    if kind == "mulc":
        return f"({sub()} * {draw(st.integers(-3, 3))})"
    if kind == "addc":
        return f"({sub()} + {const()})"
    if kind == "div":
        return f"({sub()} // {nonzero()})"
    if kind == "mod":
        return f"({sub()} % {nonzero()})"
    if kind == "abs":
        return f"abs({sub()})"
    if kind in ("min", "max"):
        if draw(st.booleans()):
            return f"torch.{'minimum' if kind == 'min' else 'maximum'}({sub()}, {sub()})"
        return f"torch.clamp({sub()}, {'max' if kind == 'min' else 'min'}={const()})"
    if kind == "load0":
        form = draw(st.sampled_from(["q", "kv", "mod", "clamp"]))
        if form == "q":
            return "T0[q_idx]"
        if form == "kv":
            return "T0[kv_idx]"
        if form == "mod":
            return f"T0[{sub()} % {L0}]"
        return f"T0[torch.clamp({sub()}, 0, {L0 - 1})]"
    if kind == "load1":
        n = lens["T1"]
        if draw(st.booleans()):
            return f"T1[{sub()} % {n}]"
        return f"T1[torch.clamp({sub()}, 0, {n - 1})]"
    if kind == "load2":
        first = draw(st.sampled_from(["b", "h", "1"]))
        return f"T2[{first}, {sub()} % {L0}]"
    # where
    return f"torch.where({draw(bool_expr(depth - 1, lens))}, {sub()}, {sub() if draw(st.booleans()) else const()})"


@st.composite
def bool_expr(draw, depth, lens):
    kind = draw(st.sampled_from(["cmp", "cmp", "cmp", "cmpc", "loadb"] + (["and", "or", "not", "xor"] if depth > 0 else [])))
    if kind == "cmp":
        return f"({draw(int_expr(max(depth - 1, 0), lens))} {draw(st.sampled_from(_CMP))} {draw(int_expr(max(depth - 1, 0), lens))})"
    if kind == "cmpc":
        c = draw(st.one_of(st.integers(-50, 90), st.sampled_from(_SCALARS)))
        return f"({draw(int_expr(max(depth - 1, 0), lens))} {draw(st.sampled_from(_CMP))} {c})"
    if kind == "loadb":
        return f"TB[{draw(int_expr(max(depth - 1, 0), lens))} % {lens['TB']}]"
    a = draw(bool_expr(depth - 1, lens))
    if kind == "not":
        return f"(~{a})"
    b = draw(bool_expr(depth - 1, lens))
    return f"({a} {dict(zip(['and', 'or', 'xor'], '&|^'))[kind]} {b})"


def _captured(seed, n1, nb, style):
    g = torch.Generator().manual_seed(seed)
    if style == "sorted":  # document-id like: non-decreasing runs
        t0 = torch.cumsum(torch.randint(0, 2, (L0,), generator=g) * torch.randint(1, 4, (L0,), generator=g), 0)
    elif style == "runs":
        t0 = torch.repeat_interleave(torch.randint(-5, 6, (L0,), generator=g), torch.randint(1, 30, (L0,), generator=g))[:L0]
    else:
        t0 = torch.randint(-20, 21, (L0,), generator=g)
    t0 = t0.to(torch.int32).contiguous()
    t1 = torch.randint(-100, 101, (n1,), generator=g, dtype=torch.int64)
    t2 = torch.randint(-30, 31, (3, L0), generator=g, dtype=torch.int32)
    tb = torch.randint(0, 2, (nb,), generator=g).bool()
    return t0, t1, t2, tb


def build_mask(src, tensors, scalars=(0, 0, 0)):
    ns = {"torch": torch}
    exec(f"def make(T0, T1, T2, TB, S0, S1, S2):\n    def fuzz_mask(b, h, q_idx, kv_idx):\n        return {src}\n"
         f"    return fuzz_mask\n", ns)
    return ns["make"](*tensors, *scalars)


@st.composite
def fuzz_case(draw):
    lens = {"T1": draw(st.integers(1, 40)), "TB": draw(st.integers(1, 40))}
    src = draw(bool_expr(draw(st.integers(1, 3)), lens))
    seed = draw(st.integers(0, 2**16))
    style = draw(st.sampled_from(["sorted", "runs", "random"]))
    Q, KV = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    qb = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 32, 64]))
    kvb = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 32, 64]))
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    scalars = tuple(draw(st.integers(-40, 90)) for _ in _SCALARS)
    return src, _captured(seed, lens["T1"], lens["TB"], style), scalars, Q, KV, qb, kvb, B, H


_FUZZ_EXAMPLES = int(os.environ.get("FLEXCOMP_FUZZ_EXAMPLES", "60"))


@settings(max_examples=_FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_case())
def test_fuzz_classification_matches_brute_force(case):
    src, tensors, scalars, Q, KV, qb, kvb, B, H = case
    mask = build_mask(src, tensors, scalars)
    try:
        check_against_brute(mask, B, H, Q, KV, qb, kvb)
    except AssertionError as e:
        raise AssertionError(f"mask: {src}\nS0, S1, S2 = {scalars}\nQ={Q} KV={KV} BLOCK=({qb},{kvb}) B={B} H={H}\n"
                             f"{e}") from None


def test_fuzz_generator_builds_valid_masks():
    # the generated source is plain torch: the brute-force oracle evaluates it without flexcomp
    src = "(((q_idx // -3) % 5 == T0[kv_idx]) | (~TB[(q_idx - kv_idx) % 4])) ^ (torch.minimum(abs(kv_idx - q_idx), T2[h, b % 96]) > T1[torch.clamp(q_idx + 2, 0, 6)])"
    mask = build_mask(src + " | (kv_idx == S1)", _captured(3, 7, 4, "runs"), (1, 5, 2))
    d = dense_mask(mask, 2, 3, 17, 19)
    assert d.shape == (2, 3, 17, 19) and d.any() and not d.all()
    check_against_brute(mask, 2, 3, 17, 19, 4, 3)


def test_float_bounds_are_widened_to_stay_sound():
    """(q - kv) * 0.1 <= 25.7 is True in float32 at q - kv = 257 but False in exact arithmetic."""
    from torch.nn.attention import flex_attention as tf

    def mm(b, h, q, kv):
        return ((q - kv) * 0.1 <= 25.7) & (q >= kv)

    ours = create_block_mask(mm, 1, 1, 512, 512, device="cpu")
    theirs = tf.create_block_mask(mm, 1, 1, 512, 512, device="cpu")
    for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(ours, f), getattr(theirs, f)), f
