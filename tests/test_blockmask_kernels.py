"""create_block_mask on the device kernels (flexcomp.codegen.blockmask) against torch and the torch evaluator.

``create_block_mask`` builds its block lists either with the torch evaluator (the default on CPU) or
with the generated kernels (a classify kernel for the blocks the interval analysis leaves undecided,
then the ordered-lists kernel). The tests run on ``DEVICE``: ``"cuda"`` where there is a GPU (the real
kernels), else ``"cpu"`` under ``TRITON_INTERPRET=1`` (conftest.py sets it then), where
``FLEXCOMP_BACKEND=triton`` asks for the kernels in Triton's interpreter. On either,
``FLEXCOMP_BACKEND=triton`` takes the kernel path and ``reference`` the torch evaluator
(``flexcomp.blockmask_build._use_kernels``). Each comparison builds on both paths (the reuse cache
cleared in between, so each really builds, and a spy on the launchers proves which path ran) and
checks every field against torch's own ``torch.nn.attention.flex_attention.create_block_mask`` on the
same device (dense, exact at these sizes). Every tensor a mask captures lives on ``DEVICE`` too: torch
cannot index a CPU tensor with CUDA indices. Sizes stay at a few hundred tokens: the interpreter is slow.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tfa

import flexcomp.codegen.blockmask as on_device
from flexcomp import and_masks, create_block_mask, create_mask, or_masks
from flexcomp.blockmask_build import _REUSE, build_block_mask
from flexcomp.ir import ModKind
from flexcomp.masks import (
    block_diffusion_mask,
    causal_mask,
    dilated_sliding_window,
    document_mask,
    global_tokens,
    natten_mask,
    padding_mask,
    prefix_lm,
    shared_prefix_mask,
    sliding_tile_mask,
    sliding_window,
)
from flexcomp.trace import trace

from blockmask_paths import DEVICE, Paths, tables_on  # tests/ is on sys.path (as for variants.py)
from test_blockmask import FIELDS, assert_same, batch_and_head, per_head_window


@pytest.fixture
def paths(monkeypatch):
    return Paths(monkeypatch)


# ---- masks: every factory of flexcomp.masks and compositions, all valid for Q, KV <= 192, B <= 2 ----
S = 192
DOC_IDS_2D = torch.stack([
    torch.repeat_interleave(torch.arange(4), torch.tensor([60, 10, 90, 32])),
    torch.repeat_interleave(torch.arange(3), torch.tensor([80, 80, 32])),
]).to(DEVICE)
DOC_IDS_1D = torch.repeat_interleave(torch.tensor([3, 1, 3, 7, 2]), torch.tensor([40, 1, 39, 70, 42])).to(DEVICE)
SHARED_1D = torch.cat([torch.full((40,), -1), torch.arange(S - 40) % 3]).to(DEVICE)  # interleaved continuations
SHARED_2D = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([45, 60, 87])),
                         torch.repeat_interleave(torch.arange(4), torch.tensor([45, 30, 100, 17]))]).to(DEVICE)
PAD_LENS = [150, 33]


# the factories given lists (document_mask's lengths, padding_mask's) make their tensors on the default
# device: DEVICE here, so that torch's create_block_mask can read them (test_every_capture_is_on_the_device)
with torch.device(DEVICE):
    FACTORY_MASKS = {
        "causal": causal_mask,
        "sliding_window": sliding_window(23),
        "prefix_lm": prefix_lm(45),
        "document_lengths": document_mask([70, 41, 81]),
        "document_lengths_prefix_inner": document_mask([70, 41, 81], inner=prefix_lm(8)),
        "document_ids_per_batch": document_mask(doc_ids=DOC_IDS_2D),
        "document_ids_1d_bidirectional": document_mask(doc_ids=DOC_IDS_1D, inner=None),
        "padding": padding_mask(PAD_LENS),
        "dilated_sliding_window": dilated_sliding_window(6, 5),
        "global_tokens": global_tokens(5),
        "global_tokens_window": global_tokens(20, inner=sliding_window(24)),
        "shared_prefix_1d": shared_prefix_mask(40, SHARED_1D),
        "shared_prefix_per_batch": shared_prefix_mask(45, SHARED_2D),
        "block_diffusion": block_diffusion_mask(20, S // 2),
        "natten": natten_mask(12, 16, 5, 7),
        "sliding_tile": sliding_tile_mask(8, 16, 4, 4, 2, 3, text_len=S - 128),
        "and_causal_padding": and_masks(causal_mask, padding_mask(PAD_LENS)),
        "or_prefix_window": or_masks(prefix_lm(20), sliding_window(10)),
        "nested_and_or": and_masks(document_mask([70, 41, 81]),
                                   or_masks(global_tokens(4), dilated_sliding_window(8, 4))),
        "per_head_window": tables_on(per_head_window, DEVICE),  # test_blockmask's, its HEAD_WIN on DEVICE
        "batch_and_head": batch_and_head,
    }
# one block size per mask, cycling, so every size meets several masks without multiplying the cases
# (blocks of 16 on square 192-token maps cost the interpreter too much; test_ragged_lengths has them)
_CYCLE = [32, (16, 64), 64, (64, 32), 128]


@pytest.mark.parametrize("name", list(FACTORY_MASKS))
def test_every_mask_factory_matches_torch(paths, name):
    block = _CYCLE[list(FACTORY_MASKS).index(name) % len(_CYCLE)]
    paths.compare(FACTORY_MASKS[name], 2, 3, S, S, name, BLOCK_SIZE=block)


# ---- ragged lengths, block sizes, B / H as ints and None, separate_full_blocks=False ------------
def _ragged_cases(qb, kvb):
    """(mask, B, H, Q, KV): lengths that are not multiples of the block, Q != KV, a few blocks each
    way whatever the block size (the interpreter's cost grows with the number of blocks)."""
    return [("causal", None, None, 2 * qb + 5, 3 * kvb - 7),
            ("batch_and_head", 2, 3, 3 * qb - 1, kvb + 9),
            ("padding", 2, None, 1, 2 * kvb + 1),
            ("per_head_window", None, 3, 2 * qb + 1, 1),
            ("document_ids_per_batch", 2, 1, min(S, 2 * qb + 3), min(S, kvb + 3))]


@pytest.mark.parametrize("block", [16, 32, 64, 128, (32, 64)], ids=str)
def test_ragged_lengths_and_block_sizes(paths, block):
    qb, kvb = (block, block) if isinstance(block, int) else block
    for name, B, H, Q, KV in _ragged_cases(qb, kvb):
        paths.compare(FACTORY_MASKS[name], B, H, Q, KV, name, BLOCK_SIZE=block)


@pytest.mark.parametrize("name,block", [("document_ids_per_batch", 32), ("sliding_tile", (32, 64)),
                                        ("per_head_window", 128)])
def test_separate_full_blocks_false(paths, name, block):
    mask = FACTORY_MASKS[name]
    if "separate_full_blocks" in inspect.signature(tfa.create_block_mask).parameters:
        bm = paths.compare(mask, 2, 3, S - 7, S, name, BLOCK_SIZE=block, separate_full_blocks=False)
    else:  # torch < 2.13 has no separate_full_blocks: kernels == evaluator, and the dense map == torch's
        bm = paths.build(True, mask, 2, 3, S - 7, S, BLOCK_SIZE=block, separate_full_blocks=False)
        launches = paths.last
        assert_same(bm, paths.build(False, mask, 2, 3, S - 7, S, BLOCK_SIZE=block, separate_full_blocks=False), name)
        want = tfa.create_block_mask(mask, 2, 3, S - 7, S, device=DEVICE, BLOCK_SIZE=block)
        assert torch.equal(bm.to_dense(), want.to_dense()), name
        paths.last = launches
    assert bm.full_kv_num_blocks is None and bm.full_q_indices is None
    assert paths.last[-1][2] is False  # the lists kernel was asked for the partial lists only


def test_non_power_of_two_blocks(paths):
    """Blocks of 48 x 24: the classify kernel pads its tile to powers of two and must not count the padding."""
    for name, B, H in (("causal", None, None), ("document_ids_per_batch", 2, None)):
        paths.compare(FACTORY_MASKS[name], B, H, S - 2, 100, name, BLOCK_SIZE=(48, 24))


@pytest.mark.parametrize("separate_full", [True, False])
def test_list_rows_longer_than_one_chunk(separate_full):
    """Rows of 2100 blocks: the lists kernel walks them in chunks of LIST_CHUNK, carrying the ranks
    across chunks (one direction per launch: the other direction of these maps would list 2100
    short rows, too slow for the interpreter). torch's lists: the listed columns first, then the
    others, each ascending (a stable descending argsort)."""
    cols = 2100
    assert cols > 2 * on_device.LIST_CHUNK
    g = torch.Generator().manual_seed(3)
    kind = torch.randint(0, 3, (1, 2, 2, cols), generator=g, dtype=torch.int8)
    kind[0, 1, 1] = 0  # a row with nothing listed
    kind = kind.to(DEVICE)
    for transposed, k in ((False, kind), (True, kind.transpose(-2, -1).contiguous())):
        views, _ = on_device._list_views(k, separate_full, 1, 2)
        on_device._list_launch(k, separate_full, views, kv=not transposed, q=transposed).run()
        num, idx, full_num, full_idx = views[4:] if transposed else views[:4]
        rows = k.transpose(-2, -1) if transposed else k
        listed = rows == 1 if separate_full else rows != 0
        want = [(listed, num, idx)] + ([(rows == 2, full_num, full_idx)] if separate_full else [])
        for dense, n, i in want:
            assert torch.equal(n, dense.sum(-1, dtype=torch.int32))
            assert torch.equal(i, torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).int())
        if not separate_full:
            assert full_num is None and full_idx is None


@pytest.mark.parametrize("B,H,Q,KV", [(0, 2, 64, 64), (2, 3, 0, 64), (1, 1, 64, 0)])
def test_empty_sizes_on_the_kernel_path(paths, B, H, Q, KV):
    """Nothing to classify: the kernel path gives torch's (empty) fields without a launch."""
    paths.use(True)
    _REUSE.clear()
    got = create_block_mask(causal_mask, B, H, Q, KV, device=DEVICE, BLOCK_SIZE=16)
    assert paths.launches == []
    want = tfa.create_block_mask(causal_mask, B, H, Q, KV, device=DEVICE, BLOCK_SIZE=16)
    for name in FIELDS:  # not assert_same: sparsity() divides by zero here, in torch too
        a, t = getattr(got, name), getattr(want, name)
        assert a.shape == t.shape and a.dtype == t.dtype and torch.equal(a, t), name
    assert got.shape == want.shape and got.seq_lengths == want.seq_lengths


# ---- masks the interval analysis cannot decide, and float math -----------------------------------
def parity(b, h, q_idx, kv_idx):
    return ((q_idx ^ kv_idx) & 1) == 0


def xor_bit4(b, h, q_idx, kv_idx):  # constant on aligned 16 x 16 blocks: the kernel finds FULL and EMPTY ones
    return ((q_idx ^ kv_idx) & 16) == 0


def sqrt_distance(b, h, q_idx, kv_idx):
    return torch.sqrt(torch.abs((q_idx - kv_idx).float())) <= 4.5


def float_ramp(b, h, q_idx, kv_idx):  # kept where a float of both indices crosses a threshold
    return (q_idx.float() * 0.37 - kv_idx.float() * 0.61 + (h + 1).float() * 3.0) > 0.25


UNDECIDED = {"parity": parity, "xor_bit4": xor_bit4, "sqrt_distance": sqrt_distance, "float_ramp": float_ramp}


@pytest.mark.parametrize("name", list(UNDECIDED))
@pytest.mark.parametrize("block", [16, (32, 64)], ids=str)
def test_undecided_and_float_masks_match_torch(paths, name, block):
    bm = paths.compare(UNDECIDED[name], None, 2, 100, 75, name, BLOCK_SIZE=block)
    classify = paths.last[0]
    assert classify[2] > 0, "the classify kernel had no undecided block to decide"
    if name in ("parity", "xor_bit4"):  # the interval analysis decides nothing: every block is the kernel's
        assert classify[2] == classify[1][2] * classify[1][3]
    if name == "xor_bit4" and block == 16:
        assert bm.full_kv_num_blocks.sum() > 0 and (bm.kv_num_blocks + bm.full_kv_num_blocks).min() < 5


# ---- captured tensors of any layout and dtype, integer arithmetic with torch's semantics -----------
# drawn on the CPU (the same values on any machine), then moved; the views taken on DEVICE (a copy would
# not keep a gap or a stride 0)
_G = torch.Generator().manual_seed(0)
TABLE_T = torch.randint(0, 3, (100, 2), generator=_G).to(DEVICE).t()  # strides (1, 2)
IDS_STEP2 = (torch.arange(200) // 7).to(DEVICE)[::2]  # stride 2
WRAP = torch.randint(0, 2, (100,), generator=_G).to(DEVICE)
U8 = torch.randint(0, 255, (100,), generator=_G, dtype=torch.uint8).to(DEVICE)
F16 = torch.randn(100, generator=_G).half().to(DEVICE)
EXPANDED = torch.arange(10).to(DEVICE).expand(3, 10)  # stride (0, 1)

CAPTURES = {
    "strided_views": lambda b, h, q_idx, kv_idx: TABLE_T[b, kv_idx] == IDS_STEP2[q_idx] % 3,
    "negative_indices_wrap": lambda b, h, q_idx, kv_idx: WRAP[kv_idx - 100] == WRAP[q_idx - 100],
    "uint8_sum_wraps": lambda b, h, q_idx, kv_idx: (U8[q_idx] + U8[kv_idx]) > 200,
    "float16": lambda b, h, q_idx, kv_idx: F16[q_idx] * F16[kv_idx] > 0.1,
    "expanded_zero_stride": lambda b, h, q_idx, kv_idx: EXPANDED[b, kv_idx % 10] > q_idx % 9,
    "floor_div_mod_of_negatives": lambda b, h, q_idx, kv_idx: (((q_idx - 50) // 7) == ((kv_idx - 50) // 7))
    | (((q_idx - kv_idx) % 5) == ((kv_idx - 60) % 3)),
    "int64_products": lambda b, h, q_idx, kv_idx: (q_idx.to(torch.int64) * 3000000000) % 7 == kv_idx % 7,
}


@pytest.mark.parametrize("name", list(CAPTURES))
def test_captured_tensors_and_integer_semantics_match_torch(paths, name):
    paths.compare(CAPTURES[name], 2, None, 100, 100, name, BLOCK_SIZE=16)


def test_every_capture_is_on_the_device():
    """The masks compared with torch capture DEVICE tensors only (torch cannot index a CPU tensor with
    CUDA indices), in the layouts the cases name."""
    assert TABLE_T.stride() == (1, 2) and IDS_STEP2.stride() == (2,) and EXPANDED.stride() == (0, 1)
    for name, mask in {**FACTORY_MASKS, **UNDECIDED, **CAPTURES}.items():
        devices = {t.device for t in trace(mask, ModKind.MASK).buffers}
        assert devices <= {torch.empty(0, device=DEVICE).device}, (name, devices)


# ---- errors: out-of-range indexing and integer division by zero, as torch ---------------------
# torch raises these on the CPU only: on CUDA its index kernel stops the process with a device-side assert,
# and an integer division by zero gives no error. So torch's create_block_mask, flexcomp's create_mask and
# flexcomp's torch evaluator (the same torch ops) run on the CPU on any machine, with these tables on the CPU;
# the kernels run on DEVICE, reading DEVICE copies of the tables (tables_on), and raise as torch does on the
# CPU (they run checked and read their error slots back).
LENS = torch.arange(10)
ZERO = torch.tensor([0])
AT = torch.tensor([37])


def _error_device(kernels: bool) -> str:
    """Where flexcomp builds in the error tests: the kernels on DEVICE, the torch evaluator on the CPU."""
    return DEVICE if kernels else "cpu"


def reads_past_lens(b, h, q_idx, kv_idx):
    return LENS[kv_idx] > 3


def reads_before_lens(b, h, q_idx, kv_idx):
    return (q_idx < 8) & (LENS[kv_idx - 20] > 3)  # kv_idx - 20 < -10 for kv_idx < 10


def divides_by_zero(b, h, q_idx, kv_idx):
    return (q_idx // ZERO[0]) >= 0


def divides_by_zero_at_one_column(b, h, q_idx, kv_idx):
    return (q_idx % (kv_idx - AT[0])) >= 0


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "evaluator"])
@pytest.mark.parametrize("mask", [reads_past_lens, reads_before_lens], ids=lambda m: m.__name__)
def test_out_of_range_index_raises_index_error(paths, mask, kernels):
    with pytest.raises(IndexError):  # torch: IndexError ("index 10 is out of bounds ...")
        tfa.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    device = _error_device(kernels)
    paths.use(kernels)
    _REUSE.clear()
    with pytest.raises(IndexError, match="out of range"):
        create_block_mask(tables_on(mask, device), None, None, 64, 64, device=device, BLOCK_SIZE=16)
    assert [launch[0] for launch in paths.launches] == (["classify"] if kernels else [])


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "evaluator"])
@pytest.mark.parametrize("mask", [divides_by_zero, divides_by_zero_at_one_column], ids=lambda m: m.__name__)
def test_integer_division_by_zero_raises_as_torch(paths, mask, kernels):
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):  # torch: RuntimeError('ZeroDivisionError')
        tfa.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    device = _error_device(kernels)
    paths.use(kernels)
    _REUSE.clear()
    with pytest.raises(RuntimeError, match="divides an integer by zero") as info:
        create_block_mask(tables_on(mask, device), None, None, 64, 64, device=device, BLOCK_SIZE=16)
    assert isinstance(info.value, ZeroDivisionError)
    assert [launch[0] for launch in paths.launches] == (["classify"] if kernels else [])


def divides_by_zero_in_a_decided_block(b, h, q_idx, kv_idx):
    return (kv_idx < 1000) | ((q_idx // (kv_idx - AT[0])) > 0)  # every block FULL by interval analysis


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "evaluator"])
def test_division_by_zero_in_a_decided_block_raises_as_torch(paths, kernels):
    mask = divides_by_zero_in_a_decided_block
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        tfa.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ZeroDivisionError):  # flexcomp's own create_mask raises here
        create_mask(mask, 1, 1, 64, 64, device="cpu")
    device = _error_device(kernels)
    paths.use(kernels)
    _REUSE.clear()
    with pytest.raises(ZeroDivisionError):
        create_block_mask(tables_on(mask, device), None, None, 64, 64, device=device, BLOCK_SIZE=16)


# ---- broadcasting: a mask that ignores b / h is built once, returned as stride-0 views ------------
def head_only(b, h, q_idx, kv_idx):
    return q_idx - kv_idx <= 8 * h


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "evaluator"])
def test_broadcast_never_multiplies_work(paths, kernels):
    bm = paths.build(kernels, causal_mask, 4, 8, 96, 96, BLOCK_SIZE=32)
    want = tfa.create_block_mask(causal_mask, 4, 8, 96, 96, device=DEVICE, BLOCK_SIZE=32)
    assert_same(bm, want, "causal B=4 H=8")
    for name in FIELDS:
        t = getattr(bm, name)
        assert t.shape[:2] == (4, 8) and t.stride()[:2] == (0, 0), (name, t.stride())
    if kernels:  # one (b, h) map classified and listed, not 32
        assert [launch[1][:2] for launch in paths.last] == [(1, 1), (1, 1)]

    bm = paths.build(kernels, head_only, 4, 8, 96, 96, BLOCK_SIZE=32)
    assert_same(bm, tfa.create_block_mask(head_only, 4, 8, 96, 96, device=DEVICE, BLOCK_SIZE=32), "head_only")
    assert bm.kv_indices.stride()[0] == 0 and bm.kv_indices.stride()[1] != 0
    if kernels:
        assert [launch[1][:2] for launch in paths.last] == [(1, 8), (1, 8)]


# ---- reuse: the same mask structure and the same captured tensors give the same lists ---------
def _lists_equal(a, b):
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in FIELDS)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "evaluator"])
def test_reuse_shares_lists_and_keeps_each_calls_mask_mod(paths, kernels):
    paths.use(kernels)
    _REUSE.clear()
    m1, m2 = sliding_window(37), sliding_window(37)  # two closures, one structure, the same scalar
    a = create_block_mask(m1, 2, None, 200, 200, device=DEVICE, BLOCK_SIZE=32)
    built = len(paths.launches)
    b = create_block_mask(m1, 2, None, 200, 200, device=DEVICE, BLOCK_SIZE=32)
    c = create_block_mask(m2, 2, None, 200, 200, device=DEVICE, BLOCK_SIZE=32)
    assert len(paths.launches) == built == (2 if kernels else 0)  # b and c launched nothing
    assert a.kv_indices.data_ptr() == b.kv_indices.data_ptr() == c.kv_indices.data_ptr()
    assert a.mask_mod is m1 and b.mask_mod is m1 and c.mask_mod is m2
    assert_same(c, tfa.create_block_mask(m2, 2, None, 200, 200, device=DEVICE, BLOCK_SIZE=32), "reused")
    # another window is another mask, though the structure is the same
    d = create_block_mask(sliding_window(5), 2, None, 200, 200, device=DEVICE, BLOCK_SIZE=32)
    assert d.kv_indices.data_ptr() != a.kv_indices.data_ptr()
    assert_same(d, tfa.create_block_mask(sliding_window(5), 2, None, 200, 200, device=DEVICE, BLOCK_SIZE=32),
                "window 5")
    # other sizes are other masks
    e = create_block_mask(m1, 2, None, 200, 160, device=DEVICE, BLOCK_SIZE=32)
    assert_same(e, tfa.create_block_mask(m1, 2, None, 200, 160, device=DEVICE, BLOCK_SIZE=32), "KV 160")


def _update_lengths(lengths):
    lengths.add_(40)


def _update_doc_ids(doc_ids):
    doc_ids[0, :100] = 5


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "evaluator"])
@pytest.mark.parametrize("which", ["padding_lengths", "document_ids"])
def test_reuse_sees_in_place_updates_of_captured_tensors(paths, kernels, which):
    paths.use(kernels)
    _REUSE.clear()
    if which == "padding_lengths":
        captured = torch.tensor([120, 33], dtype=torch.int32, device=DEVICE)  # padding_mask keeps it as is
        make, update = padding_mask, _update_lengths
    else:
        captured = DOC_IDS_2D.to(torch.int32)  # document_mask keeps int32 ids as is
        make, update = (lambda ids: document_mask(doc_ids=ids, inner=None)), _update_doc_ids
    mask = make(captured)
    B, H, Q, KV, kw = 2, None, S, S, {"BLOCK_SIZE": 32}
    before = tfa.create_block_mask(mask, B, H, Q, KV, device=DEVICE, **kw)
    a = create_block_mask(mask, B, H, Q, KV, device=DEVICE, **kw)  # noted (no copy)
    kept = create_block_mask(mask, B, H, Q, KV, device=DEVICE, **kw)  # built again, kept with a copy
    b = create_block_mask(mask, B, H, Q, KV, device=DEVICE, **kw)
    assert a.kv_indices.data_ptr() != kept.kv_indices.data_ptr() == b.kv_indices.data_ptr()
    assert_same(b, before, "before the update")

    update(captured)
    c = create_block_mask(mask, B, H, Q, KV, device=DEVICE, **kw)
    after = tfa.create_block_mask(mask, B, H, Q, KV, device=DEVICE, **kw)
    assert not _lists_equal(before, after)  # the update changed the mask
    assert_same(c, after, "after the update")
    assert_same(c, build_block_mask(mask, B, H, Q, KV, device=DEVICE, BLOCK_SIZE=32), "fresh build")
    assert_same(a, before, "the first mask is left as it was")

    # a new tensor object with equal values: the same (correct) lists
    d = create_block_mask(make(captured.clone()), B, H, Q, KV, device=DEVICE, **kw)
    assert_same(d, after, "a copy of the captured tensor")


def test_reuse_is_not_fooled_by_reused_ids(paths):
    """Captured tensors made and freed in a loop often get the id of a dead one: each build is right."""
    paths.use(False)
    _REUSE.clear()
    for n in range(1, 25):
        mask = padding_mask(torch.tensor([7 * n, 200 - 5 * n], dtype=torch.int32, device=DEVICE))
        got = create_block_mask(mask, 2, None, 64, 200, device=DEVICE, BLOCK_SIZE=16)
        assert_same(got, tfa.create_block_mask(mask, 2, None, 64, 200, device=DEVICE, BLOCK_SIZE=16), f"n={n}")
        del mask, got


@pytest.mark.parametrize("how", ["numpy", "data"])
def test_reuse_sees_writes_that_skip_the_version_counter(paths, how):
    paths.use(False)
    _REUSE.clear()
    buf = np.array([120, 33], dtype=np.int32)
    lengths = torch.from_numpy(buf)  # a loader refilling its (host) buffer each step: a CPU capture on any device
    if how == "data":
        lengths = lengths.to(DEVICE)  # written through .data where it lives (on the CPU: the numpy buffer itself)
    mask = padding_mask(lengths)
    for _ in range(3):  # kept from the second build on: the third is the kept one
        kept = create_block_mask(mask, 2, None, 128, 128, device=DEVICE, BLOCK_SIZE=16)
    (entry,) = _REUSE.entries.values()
    assert kept.kv_indices.data_ptr() == entry[3][1].data_ptr()  # the lists kept
    if how == "numpy":
        buf[1] = 90
    else:
        lengths.data[1] = 90
    got = create_block_mask(mask, 2, None, 128, 128, device=DEVICE, BLOCK_SIZE=16)
    # torch's reads the lengths on the mask's device (on the CPU: the same tensor)
    want = tfa.create_block_mask(padding_mask(lengths.to(DEVICE)), 2, None, 128, 128, device=DEVICE, BLOCK_SIZE=16)
    assert_same(got, want, how)


# ---- 256k tokens: never an S x S tensor ------------------------------------------------------------
_CHILD = textwrap.dedent(r"""
    import json, resource, sys
    import torch
    import flexcomp
    from flexcomp.masks import causal_mask, document_mask

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    S, BLK, DEVICE = 262144, 128, sys.argv[1]
    lengths = [13907, 15558, 8527, 15074, 18412, 12631, 12446, 459, 14481, 19599, 12813, 9416, 16732, 5298,
               7395, 12556, 7012, 8424, 11142, 18616, 21646]
    assert sum(lengths) == S
    doc = document_mask(lengths)  # CPU captures: the brute force below reads them; flexcomp moves them
    if DEVICE == "cuda":
        torch.zeros(1, device=DEVICE)  # the CUDA context first: the peak counts the build only
        torch.cuda.reset_peak_memory_stats()
    out = {"rss_before": rss()}
    causal = flexcomp.create_block_mask(causal_mask, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=BLK)
    documents = flexcomp.create_block_mask(doc, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=BLK)
    out["rss_after"] = rss()
    out["device_peak"] = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0

    def kinds_of_rows(mask_mod, rows):
        # brute force, one q-block row at a time: the dense [BLK, S] row of the mask, cut into kv blocks
        kinds = []
        for r in rows:
            q = (r * BLK + torch.arange(BLK)).view(-1, 1)
            keep = mask_mod(torch.zeros(()), torch.zeros(()), q, torch.arange(S).view(1, -1))
            cnt = keep.view(BLK, S // BLK, BLK).sum(dim=(0, 2))
            kinds.append(torch.where(cnt == 0, 0, torch.where(cnt == BLK * BLK, 2, 1)))
        return torch.stack(kinds)

    def kinds_from_lists(bm, rows):
        n = S // BLK
        kind = torch.zeros(len(rows), n, dtype=torch.int64)
        num, idx, full_num, full_idx = (getattr(bm, f).cpu() for f in ("kv_num_blocks", "kv_indices",
                                                                       "full_kv_num_blocks", "full_kv_indices"))
        for i, r in enumerate(rows):
            kind[i, idx[0, 0, r, :num[0, 0, r]].long()] = 1
            kind[i, full_idx[0, 0, r, :full_num[0, 0, r]].long()] = 2
        return kind

    rows = [0, 1, 108, 777, 1024, 2047]
    for name, bm, mod in (("causal", causal, causal_mask), ("document", documents, doc)):
        out[name] = {"shapes": [list(getattr(bm, f).shape) for f in ("kv_indices", "full_kv_indices", "q_indices",
                                                                        "full_q_indices")],
                     "rows_right": bool(torch.equal(kinds_from_lists(bm, rows), kinds_of_rows(mod, rows)))}
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
def test_256k_tokens_without_a_dense_mask(device):
    """On the CPU (any machine): the torch evaluator, the host's peak memory. On CUDA: the kernels, the
    device's peak memory (the host's RSS there also holds the CUDA context and Triton's compiler)."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("FLEXCOMP_BACKEND", None)  # the default: the torch evaluator on the CPU, the kernels on CUDA
    proc = subprocess.run([sys.executable, "-c", _CHILD, device], check=False, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    S = 262144
    # S x S bools are 64 GiB; even one S x S / 64-byte tensor (1 GiB) would break the first bound
    if device == "cpu":
        grown = out["rss_after"] - out["rss_before"]
        assert grown < S * S // 64, f"building grew the peak RSS by {grown / 2**20:.0f} MiB"
        assert out["rss_after"] < 3 * 2**30, f"peak RSS {out['rss_after'] / 2**20:.0f} MiB"
    else:
        peak = out["device_peak"]
        assert 0 < peak < S * S // 64, f"building took {peak / 2**20:.0f} MiB of device memory at its peak"
    for name in ("causal", "document"):
        assert out[name]["shapes"] == [[1, 1, 2048, 2048]] * 4, (name, out[name]["shapes"])
        assert out[name]["rows_right"], name

