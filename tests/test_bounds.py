"""The block analysis lowered to Triton (``flexcomp.codegen.bounds``), in Triton's interpreter on the
CPU and for real on a GPU. The generated bounds equal the torch analysis' block by block, loads
(points, ``q_idx`` / ``kv_idx`` runs through the ``runs`` kernel's tables) included, and every block
they decide agrees with the dense mask. Also: unsafe marks, captured numbers at run time unless a
rule reads them as literals, other loads keeping the torch analysis, the rendered source of causal."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.nn.attention import flex_attention as tfa

import flexcomp
from flexcomp.codegen import bounds as B
from flexcomp.codegen.launch import mod_args, scalar_tensor
from flexcomp.ir import ModKind
from flexcomp.masks import causal_mask, dilated_sliding_window, prefix_lm, sliding_window
from flexcomp.sparsity import BlockGrid, block_intervals
from flexcomp.trace import trace

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _bounds_grid(LO, HI, UNSAFE, SCALARS, ARGS, RUNS, B, H, NUM_Q, NUM_KV, Q_LEN, KV_LEN, BOUNDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_M: tl.constexpr, PAD_N: tl.constexpr,
                 CHUNK: tl.constexpr):
    row = tl.program_id(0)  # (b, h, q-block)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    i = row % NUM_Q
    h = (row // NUM_Q) % H
    b = row // NUM_Q // H
    zero = tl.zeros([CHUNK], dtype=tl.float64)
    q_last = tl.minimum(i * BLOCK_M + BLOCK_M - 1, Q_LEN - 1)
    kv_last = tl.minimum(cols * BLOCK_N + BLOCK_N - 1, KV_LEN - 1)
    lo, hi, unsafe = BOUNDS(b + zero, h + zero, i * BLOCK_M + zero, q_last + zero, (cols * BLOCK_N).to(tl.float64),
                            kv_last.to(tl.float64), zero, SCALARS, ARGS, RUNS, BLOCK_M, BLOCK_N, PAD_M, PAD_N)
    ok = cols < NUM_KV
    tl.store(LO + row * NUM_KV + cols, lo, mask=ok)
    tl.store(HI + row * NUM_KV + cols, hi, mask=ok)
    tl.store(UNSAFE + row * NUM_KV + cols, unsafe.to(tl.int8), mask=ok)


def _kernel_bounds(mask_mod, Bn, Hn, grid: BlockGrid):
    tm = trace(mask_mod, ModKind.MASK)
    bf = B.bounds_function(tm)
    assert bf is not None
    shape = (Bn, Hn, grid.num_q, grid.num_kv)
    lo = torch.empty(shape, dtype=torch.float64, device=DEVICE)
    hi, unsafe = torch.empty_like(lo), torch.empty(shape, dtype=torch.int8, device=DEVICE)
    scalars = scalar_tensor(tuple(float(tm.scalars[i]) for i in bf.runtime_scalars), torch.float64, DEVICE)
    args = mod_args(tm, tm.graph, torch.device(DEVICE))
    pads = (triton.next_power_of_2(grid.q_block), triton.next_power_of_2(grid.kv_block))
    size, programs = bf.table([tuple(t.shape) for t in tm.buffers], grid)
    runs = torch.full((max(size, 1),), float("nan"), dtype=torch.float64, device=DEVICE)
    if bf.runs:
        bf.runs_fn[(programs,)](args.bufs, runs, grid.q_block, grid.kv_block, *pads)
        assert not runs.isnan().any()  # every table entry written
    _bounds_grid[(Bn * Hn * grid.num_q, triton.cdiv(grid.num_kv, 16))](
        lo, hi, unsafe, scalars, args.bufs, runs, Bn, Hn, grid.num_q, grid.num_kv, grid.q_len, grid.kv_len, bf.fn,
        grid.q_block, grid.kv_block, *pads, 16)
    return tm, lo, hi, unsafe


def chunked_mask(size: int):
    """Attention within chunks of ``size`` tokens (``size`` captured: a literal to the ``//`` rule)."""
    def chunked(b, h, q_idx, kv_idx):
        return (q_idx // size) == (kv_idx // size)
    return chunked


_DOC = torch.repeat_interleave(torch.arange(7), torch.tensor([40, 3, 90, 61, 17, 50, 39])).to(DEVICE)  # 300
_BATCH_DOC = torch.stack([_DOC, _DOC.flip(0)])
_FLAGS = torch.rand(260, generator=torch.Generator().manual_seed(1)).lt(0.3).to(DEVICE)
_SCALE = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
_TABLE = torch.randn(300, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)  # [q, h]: runs along dim 0
_NANS = torch.where(torch.arange(300) % 97 == 5, float("nan"), torch.arange(300.0)).to(DEVICE)


MASKS = {
    "causal": causal_mask,
    "sliding window": flexcomp.and_masks(causal_mask, sliding_window(100)),
    "prefix LM": prefix_lm(50),
    "chunked (captured chunk)": chunked_mask(64),
    "dilated (%)": dilated_sliding_window(40, 3),
    "batch and head": lambda b, h, q, kv: (q + b * 7 - h * 3) >= kv,
    "float ramp": lambda b, h, q, kv: (q.float() * 0.37 - kv.float() * 0.61 + (h + 1).float() * 3.0) > 0.25,
    "abs and min": lambda b, h, q, kv: torch.minimum(torch.abs(q - kv), q // 3) < 17,
    "document": lambda b, h, q, kv: (_DOC[q] == _DOC[kv]) & (q >= kv),
    "document per batch": lambda b, h, q, kv: _BATCH_DOC[b, q] == _BATCH_DOC[b, kv],
    "bool flags (kv)": lambda b, h, q, kv: _FLAGS[kv] | (q == kv),
    "per-head scale (point load)": lambda b, h, q, kv: (q - kv) * _SCALE[h] < 20,
    "nan in a float capture": lambda b, h, q, kv: _NANS[q] > kv.float(),
    "runs along dim 0 of a 2-D capture": lambda b, h, q, kv: _TABLE[q, h] * 40 > (kv % 7).float(),
}


def _block_truth(mask_mod, Bn, Hn, grid: BlockGrid):
    """Per block, whether every / some in-sequence pair is kept (the dense mask, reduced)."""
    dense = flexcomp.create_mask(mask_mod, Bn, Hn, grid.q_len, grid.kv_len, device=DEVICE)
    pad = torch.zeros(Bn, Hn, grid.num_q * grid.q_block, grid.num_kv * grid.kv_block, dtype=torch.int8, device=DEVICE)
    inside = torch.zeros_like(pad)
    pad[..., :grid.q_len, :grid.kv_len] = dense.to(torch.int8)
    inside[..., :grid.q_len, :grid.kv_len] = 1
    blocks = lambda t: t.view(Bn, Hn, grid.num_q, grid.q_block, grid.num_kv, grid.kv_block).sum((3, 5))  # noqa: E731
    kept, total = blocks(pad), blocks(inside)
    return kept == total, kept > 0


@pytest.mark.parametrize("name", list(MASKS))
def test_generated_bounds_equal_the_torch_analysis_and_are_sound(name):
    """The two are the same rules: block by block the generated bounds equal the torch analysis'
    (loads too: points clamped into their dim, an aligned index's run reduced over the whole run of
    the tensor, read from the ``runs`` kernel's tables), and every block they decide is what the
    dense mask says."""
    grid = BlockGrid(300, 260, 32, 16)
    tm, lo, hi, unsafe = _kernel_bounds(MASKS[name], 2, 3, grid)
    ref = block_intervals(tm, grid, 2, 3, DEVICE)
    torch.testing.assert_close(lo, torch.broadcast_to(ref.lo, lo.shape), rtol=0, atol=0)
    torch.testing.assert_close(hi, torch.broadcast_to(ref.hi, hi.shape), rtol=0, atol=0)
    every, some = _block_truth(MASKS[name], 2, 3, grid)
    decided_true, decided_false = (lo == 1) & (unsafe == 0), (hi == 0) & (unsafe == 0)
    assert every[decided_true].all() and not some[decided_false].any()
    assert not unsafe.any()


def test_run_tables_hold_each_runs_min_and_max():
    """The ``runs`` kernel's tables, literally: a capture of 10 values cut into runs of 4 (the last
    one short) along q, and of 8 along kv; a nan makes its run unknown (-inf, inf)."""
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, float("nan"), 5.0], device=DEVICE)
    tm = trace(lambda b, h, q, kv: values[q] > values[kv], ModKind.MASK)
    bf = B.bounds_function(tm)
    assert bf.runs == (B.Run(0, 0, True), B.Run(0, 0, False))
    grid = BlockGrid(10, 10, 4, 8)
    size, programs = bf.table([(10,)], grid)
    assert (size, programs) == (2 * (3 + 2), 3)
    runs = torch.full((size,), -7.0, dtype=torch.float64, device=DEVICE)
    bf.runs_fn[(programs,)](mod_args(tm, tm.graph, torch.device(DEVICE)).bufs, runs, 4, 8, 4, 8)
    inf = float("inf")
    assert runs.tolist() == [1.0, 4.0, 2.0, 9.0, -inf, inf,  # along q: [3 1 4 1] [5 9 2 6] [nan 5]
                             1.0, 9.0, -inf, inf]  # along kv: [3 1 4 1 5 9 2 6] [nan 5]


def test_a_divisor_that_may_be_zero_marks_its_blocks():
    """``q // n`` with ``n`` captured and ranging over 0: blocks where it may be 0 are evaluated (torch raises)."""
    grid = BlockGrid(128, 128, 32, 32)
    _, _, _, unsafe = _kernel_bounds(lambda b, h, q, kv: (q // (kv - 40)) > 0, 1, 1, grid)
    want = torch.zeros(4, 4, dtype=torch.int8, device=DEVICE)
    want[:, 1] = 1  # kv 32..63 holds 40
    assert torch.equal(unsafe[0, 0], want)


def test_captured_numbers_are_run_time_values_unless_a_rule_reads_them():
    """A new window size reuses the generated function (read from ``SCALARS``); a new chunk size,
    which ``//`` must see as a literal, generates a new one."""
    w1, w2 = sliding_window(10), sliding_window(300)
    f1, f2 = B.bounds_function(trace(w1, ModKind.MASK)), B.bounds_function(trace(w2, ModKind.MASK))
    assert f1 is f2 and len(f1.runtime_scalars) == 1
    c1, c2 = B.bounds_function(trace(chunked_mask(64), ModKind.MASK)), B.bounds_function(trace(chunked_mask(32),
                                                                                                ModKind.MASK))
    assert c1 is not c2 and c1.runtime_scalars == ()
    grid = BlockGrid(256, 256, 16, 16)
    for mask in (w1, w2):
        tm, lo, hi, _ = _kernel_bounds(mask, 1, 1, grid)
        ref = block_intervals(tm, grid, 1, 1, DEVICE)
        assert torch.equal(lo, torch.broadcast_to(ref.lo, lo.shape)) and torch.equal(hi, torch.broadcast_to(ref.hi,
                                                                                                             hi.shape))


def test_loads_other_than_aligned_runs_and_points_keep_the_torch_analysis():
    bias = torch.randn(127, device=DEVICE)
    table = torch.randn(64, 64, device=DEVICE)
    assert B.bounds_function(trace(lambda b, h, q, kv: bias[q - kv + 63] > 0, ModKind.MASK)) is None
    assert B.bounds_function(trace(lambda b, h, q, kv: table[q, kv] > 0, ModKind.MASK)) is None


def test_the_rendered_source_of_causal():
    source, runtime, runs = B.render(trace(causal_mask, ModKind.MASK).graph, ())
    assert runtime == () and runs == ()
    assert source.splitlines()[4:] == [
        "@triton.jit",
        "def bounds(B, H, Q_LO, Q_HI, KV_LO, KV_HI, ZERO, SCALARS, ARGS, RUNS, BLOCK_M: tl.constexpr,",
        "           BLOCK_N: tl.constexpr, PAD_M: tl.constexpr, PAD_N: tl.constexpr):",
        "    t0 = (Q_LO >= KV_HI)",  # q >= kv everywhere in the block
        "    t1 = (Q_HI >= KV_LO)",  # somewhere in the block
        "    t2 = (t0).to(tl.float64)",
        "    t3 = (t1).to(tl.float64)",
        "    t4 = ZERO != ZERO",  # no divisor that may be 0
        "    return t2, t3, t4",
    ]


def test_create_block_mask_runs_one_classify_launch_for_such_masks(monkeypatch):
    """On the kernel path a load-free mask builds its map with the fused kernel (no torch analysis)."""
    import flexcomp.sparsity as sparsity

    monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")
    monkeypatch.setattr(sparsity, "block_intervals", lambda *a, **k: pytest.fail("the torch analysis ran"))
    bm = flexcomp.create_block_mask(MASKS["sliding window"], 2, 1, 200, 180, device=DEVICE, BLOCK_SIZE=32)
    want = tfa.create_block_mask(MASKS["sliding window"], 2, 1, 200, 180, device=DEVICE, BLOCK_SIZE=32)
    assert torch.equal(bm.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, want.full_kv_num_blocks)
