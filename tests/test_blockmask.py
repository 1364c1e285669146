"""flexcomp.create_block_mask / BlockMask / create_mask against torch's own, field for field.

torch's ``torch.nn.attention.flex_attention`` (CPU, eager) is the oracle: it builds the dense
Q_LEN x KV_LEN mask and cuts it into blocks, so at small sizes it is exact. flexcomp must give the
same tensors (shape, dtype, values, including the order of the unused tail of every index row),
the same BLOCK_SIZE / seq_lengths / shape / sparsity, and the same printed block drawing.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp import BlockMask, FlexcompError, and_masks, create_block_mask, create_mask, noop_mask, or_masks
from flexcomp.masks import alibi, causal_mask, document_mask, padding_mask, prefix_lm, sliding_window, softcap

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def assert_same(fb, tb, what=""):
    """Every field of flexcomp's BlockMask ``fb`` equals torch's ``tb``."""
    assert isinstance(fb, BlockMask), what
    for name in FIELDS:
        a, t = getattr(fb, name), getattr(tb, name)
        if t is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        assert a is not None, f"{what}: {name} is None, torch has {tuple(t.shape)}"
        assert a.shape == t.shape, f"{what}: {name} shape {tuple(a.shape)} != torch {tuple(t.shape)}"
        assert a.dtype == t.dtype, f"{what}: {name} dtype {a.dtype} != torch {t.dtype}"
        assert a.device == t.device, f"{what}: {name} device"
        assert torch.equal(a, t), f"{what}: {name} values differ:\n{a}\nvs torch\n{t}"
    assert tuple(fb.BLOCK_SIZE) == tuple(tb.BLOCK_SIZE), what
    assert tuple(fb.seq_lengths) == tuple(tb.seq_lengths), what
    assert tuple(fb.shape) == tuple(tb.shape), what
    assert fb.numel() == tb.numel(), what
    assert fb.sparsity() == pytest.approx(tb.sparsity(), abs=1e-9), what


def both(mask_mod, B, H, Q, KV, device_meta=False, **kw):
    device = "meta" if device_meta else "cpu"
    fb = create_block_mask(mask_mod, B, H, Q, KV, device=device, **kw)
    tb = tfa.create_block_mask(mask_mod, B, H, Q, KV, device=device, **kw)
    return fb, tb


_BOTH_CACHE: dict = {}


def both_cached(mask_mod, B, H, Q, KV, **kw):
    """``both`` for module-level masks reused by several tests (the key holds the mask: no id reuse)."""
    key = (mask_mod, B, H, Q, KV, tuple(sorted(kw.items())))
    if key not in _BOTH_CACHE:
        _BOTH_CACHE[key] = both(mask_mod, B, H, Q, KV, **kw)
    return _BOTH_CACHE[key]


# ---- masks used in the comparisons (all valid for Q, KV <= 300, B <= 2, H <= 3) -----------------
MAXS = 300
DOC_IDS_2D = torch.stack([
    torch.repeat_interleave(torch.arange(4), torch.tensor([90, 10, 150, 50])),
    torch.repeat_interleave(torch.arange(3), torch.tensor([128, 128, 44])),
]).to(torch.int64)
DOC_IDS_1D = torch.repeat_interleave(torch.tensor([3, 1, 3, 7, 2]), torch.tensor([64, 1, 63, 100, 72]))
HEAD_WIN = torch.tensor([5, 40, 130], dtype=torch.int32)
PAD_LENS = [170, 33]


def per_head_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < HEAD_WIN[h])


def head_band(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 16 * (h + 1)


def batch_and_head(b, h, q_idx, kv_idx):
    return ((kv_idx + q_idx) % (b + h + 2) == 0) | (kv_idx < 8 * b + h)


MASKS = {
    "causal": causal_mask,
    "sliding_window": sliding_window(37),
    "prefix_lm": prefix_lm(70),
    "document_lengths": document_mask([100, 57, 143]),
    "document_prefix_inner": document_mask([100, 57, 143], inner=prefix_lm(8)),
    "document_ids_2d": document_mask(doc_ids=DOC_IDS_2D),
    "document_ids_1d_bidir": document_mask(doc_ids=DOC_IDS_1D, inner=None),
    "padding": padding_mask(PAD_LENS),
    "and_causal_padding": and_masks(causal_mask, padding_mask(PAD_LENS)),
    "or_prefix_window": or_masks(prefix_lm(20), sliding_window(10)),
    "and_doc_window": and_masks(document_mask([100, 57, 143]), sliding_window(64)),
    "per_head_window": per_head_window,
    "head_band": head_band,
    "batch_and_head": batch_and_head,
}
BLOCK_SIZES = [128, 64, (64, 32), 16]
LENGTHS = [(256, 256), (200, 200), (130, 257), (1, 300), (300, 1)]


@pytest.mark.parametrize("block", BLOCK_SIZES, ids=str)
@pytest.mark.parametrize("name", list(MASKS))
def test_create_block_mask_matches_torch(name, block):
    mask = MASKS[name]
    for i, (Q, KV) in enumerate(LENGTHS):
        B, H = ((2, 3), (None, None))[i % 2]
        fb, tb = both(mask, B, H, Q, KV, BLOCK_SIZE=block)
        assert_same(fb, tb, f"{name} B={B} H={H} Q={Q} KV={KV} BLOCK_SIZE={block}")
        assert fb.mask_mod is mask


@pytest.mark.parametrize("B,H", [(None, None), (None, 3), (2, None), (2, 3), (1, 1)])
@pytest.mark.parametrize("name", ["causal", "padding", "document_ids_2d", "per_head_window", "batch_and_head"])
def test_batch_and_head_none_vs_ints(name, B, H):
    fb, tb = both(MASKS[name], B, H, 200, 200, BLOCK_SIZE=(64, 32))
    assert_same(fb, tb, f"{name} B={B} H={H}")
    assert fb.kv_num_blocks.shape == (B or 1, H or 1, 4)
    assert fb.kv_indices.shape == (B or 1, H or 1, 4, 7)


def test_padding_mask_indexes_lengths_by_batch():
    fb, tb = both(padding_mask([1, 130, 300]), 3, 2, 64, 300, BLOCK_SIZE=64)
    assert_same(fb, tb, "padding")
    # batch 0: one partial column; batch 1: two full columns then a partial one; batch 2: 4 full + edge
    assert fb.kv_num_blocks[:, 0, 0].tolist() == [1, 1, 1]
    assert fb.full_kv_num_blocks[:, 0, 0].tolist() == [0, 2, 4]
    assert fb.kv_indices[2, 0, 0, 0].item() == 4  # 300 = 4*64 + 44: the last column is never full


@pytest.mark.parametrize("Q,KV", [(200, 200), (130, 257), (1, 300), (300, 1), (1, 1), (17, 5)])
@pytest.mark.parametrize("block", [128, (64, 32), 16, (1, 7)], ids=str)
def test_ragged_lengths_causal_and_prefix(Q, KV, block):
    for mask in (causal_mask, prefix_lm(3), sliding_window(9)):
        fb, tb = both(mask, None, 2, Q, KV, BLOCK_SIZE=block)
        assert_same(fb, tb, f"{getattr(mask, '__name__', mask)} Q={Q} KV={KV} {block}")


@pytest.mark.parametrize("name", ["causal", "document_lengths", "padding", "per_head_window", "or_prefix_window"])
@pytest.mark.parametrize("block", [128, (64, 32)], ids=str)
def test_separate_full_blocks_false(name, block):
    fb, tb = both(MASKS[name], 2, 3, 300, 257, BLOCK_SIZE=block, separate_full_blocks=False)
    assert_same(fb, tb, name)
    assert fb.full_kv_num_blocks is None and fb.full_q_indices is None
    # every kept block is listed as partial: same block map as with separation
    sep = create_block_mask(MASKS[name], 2, 3, 300, 257, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(fb.to_dense(), sep.to_dense())


def test_default_block_size_and_int_block_size():
    fb, tb = both(causal_mask, None, None, 512, 512)
    assert_same(fb, tb, "default")
    assert fb.BLOCK_SIZE == (128, 128)
    fb2 = create_block_mask(causal_mask, None, None, 512, 512, device="cpu", BLOCK_SIZE=(128, 128))
    assert_same(fb2, tb, "tuple")


def test_all_false_and_all_true_masks():
    never = lambda b, h, q_idx, kv_idx: q_idx < 0  # noqa: E731
    fb, tb = both(never, 2, 1, 130, 257, BLOCK_SIZE=64)
    assert_same(fb, tb, "never")
    assert int(fb.kv_num_blocks.sum()) == 0 and int(fb.full_kv_num_blocks.sum()) == 0
    assert fb.sparsity() == pytest.approx(100.0)
    fb, tb = both(noop_mask, 2, 1, 256, 320, BLOCK_SIZE=64)
    assert_same(fb, tb, "noop")
    assert fb.full_kv_num_blocks.unique().tolist() == [5]


# A captured tensor / number that simplification makes dead (x * 0, w - w) must not shift the others.
PERIODIC = torch.tensor([5, 2, 3] * 100, dtype=torch.int32)
KV_CLASS = ((torch.arange(300) // 32) % 2).contiguous()


def dead_load_mask(b, h, q_idx, kv_idx):
    return (PERIODIC[q_idx] * 0 + q_idx >= kv_idx) & (KV_CLASS[kv_idx] > 0)


def _dead_scalar_mask(w, window):
    def dead_scalar_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx + w - w) & (q_idx - kv_idx <= window)

    return dead_scalar_mask


@pytest.mark.parametrize("which", ["dead_load", "dead_scalar"])
def test_masks_whose_simplification_drops_a_capture_match_torch(which):
    mask = dead_load_mask if which == "dead_load" else _dead_scalar_mask(3, 40)
    fb, tb = both(mask, None, None, 300, 300, BLOCK_SIZE=16)
    assert_same(fb, tb, which)
    assert torch.equal(create_mask(mask, 1, 1, 64, 64, device="cpu"), tfa.create_mask(mask, 1, 1, 64, 64, device="cpu"))


def test_create_block_mask_rejects_bad_arguments():
    with pytest.raises(RuntimeError):  # torch: RuntimeError from arange
        create_block_mask(causal_mask, None, None, -1, 64, device="cpu")
    with pytest.raises(RuntimeError):
        create_block_mask(causal_mask, -2, None, 64, 64, device="cpu")
    with pytest.raises(ZeroDivisionError):  # torch: ZeroDivisionError
        create_block_mask(causal_mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=(64, 0))
    with pytest.raises(TypeError):  # torch: TypeError
        create_block_mask("causal", None, None, 64, 64, device="cpu")


@pytest.mark.parametrize("B,H,Q,KV", [(1, 1, 0, 64), (2, 1, 64, 0), (1, 3, 0, 0), (0, 2, 64, 64), (2, 0, 40, 70)])
@pytest.mark.parametrize("kw", [{}, {"separate_full_blocks": False}], ids=str)
def test_zero_sizes_match_torch(B, H, Q, KV, kw):
    """Empty lengths, batches or heads give torch's (empty) fields, not an error."""
    fb, tb = both(causal_mask, B, H, Q, KV, BLOCK_SIZE=16, **kw)
    for name in FIELDS:
        a, t = getattr(fb, name), getattr(tb, name)
        assert (a is None) == (t is None), name
        if t is not None:
            assert a.shape == t.shape and a.dtype == t.dtype and torch.equal(a, t), name
    assert fb.shape == tb.shape and fb.seq_lengths == tb.seq_lengths


@pytest.mark.parametrize("kw", [{}, {"separate_full_blocks": False}, {"compute_dq_write_order": True}], ids=str)
def test_meta_device_gives_torchs_shapes(kw):
    """device="meta" gives the fields' shapes and dtypes without evaluating anything, as torch."""
    fb, tb = both(batch_and_head, 2, 3, 300, 257, BLOCK_SIZE=(64, 32), device_meta=True, **kw)
    for name in BlockMask._TENSOR_ATTRS:
        a, t = getattr(fb, name), getattr(tb, name)
        assert (a is None) == (t is None), name
        if t is not None:
            assert a.device.type == "meta" and a.shape == t.shape and a.dtype == t.dtype, name
    assert fb.shape == tb.shape and fb.dq_kv_order_spt == tb.dq_kv_order_spt


# ---- BlockMask methods vs torch's ------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_bh():
    """B=2, H=3, a mask depending on b and h, ragged lengths: (flexcomp, torch)."""
    return both_cached(batch_and_head, 2, 3, 300, 257, BLOCK_SIZE=(64, 32))


@pytest.mark.parametrize("name", ["causal", "document_ids_2d", "per_head_window", "padding"])
def test_to_dense_matches_torch(name):
    for kw in ({}, {"separate_full_blocks": False}):
        fb, tb = both(MASKS[name], 2, 3, 200, 300, BLOCK_SIZE=(32, 64), **kw)
        d, t = fb.to_dense(), tb.to_dense()
        assert d.shape == t.shape == (2, 3, 7, 5)
        assert d.dtype == t.dtype
        assert torch.equal(d, t)


def test_to_dense_is_the_block_map_of_create_mask():
    mask = document_mask([100, 57, 143])
    fb = create_block_mask(mask, None, None, 300, 300, device="cpu", BLOCK_SIZE=16)
    dense = create_mask(mask, 1, 1, 300, 300, device="cpu")
    padded = torch.nn.functional.pad(dense, (0, 4, 0, 4))
    kept = padded.view(1, 1, 19, 16, 19, 16).any(-1).any(-2)
    assert torch.equal(fb.to_dense().bool(), kept)


@pytest.mark.parametrize("kw", [{}, {"grid_size": -1}, {"grid_size": 3}, {"grid_size": (4, 7)},
                                {"limit": 1}, {"limit": 2}, {"limit": 100}], ids=str)
def test_to_string_matches_torch(kw, pair_bh):
    fb, tb = pair_bh
    assert fb.to_string(**kw) == tb.to_string(**kw)
    fb, tb = both_cached(causal_mask, None, None, 1024, 1000, BLOCK_SIZE=16)  # 64 x 63 blocks: cells merge
    s = fb.to_string(**kw)
    assert s == tb.to_string(**kw)


def test_to_string_draws_partial_cells():
    fb, tb = both(causal_mask, None, None, 1024, 1024, BLOCK_SIZE=16)
    s = fb.to_string()
    assert "░" in s and "█" in s
    assert s == tb.to_string()
    assert fb.to_string(limit=0).startswith("...")


@pytest.mark.parametrize("name", ["causal", "document_ids_2d", "batch_and_head", "head_band"])
def test_str_matches_torch(name):
    fb, tb = both(MASKS[name], 2, 3, 300, 257, BLOCK_SIZE=(64, 32))
    assert str(fb) == str(tb)
    assert str(fb).startswith("BlockMask(shape=(2, 3, 300, 257), sparsity=")
    assert "To print out more" in str(fb)  # 6 (b, h) pairs > limit 4


def test_str_small_matches_torch():
    fb, tb = both(causal_mask, None, None, 512, 512)
    assert str(fb) == str(tb)
    rows = "\n".join(("██" * (i + 1)).ljust(8) for i in range(4)).rstrip()
    assert str(fb) == "BlockMask(shape=(1, 1, 512, 512), sparsity=37.50%, \n(0, 0)\n" + rows + "\n)"


@pytest.mark.parametrize("kw", [{}, {"separate_full_blocks": False}], ids=str)
def test_repr_matches_torch(kw):
    fb, tb = both(causal_mask, 2, None, 300, 257, BLOCK_SIZE=(64, 32), **kw)
    assert repr(fb) == repr(tb)
    assert "mask_mod=causal_mask" in repr(fb)
    assert repr(fb[0]) == repr(tb[0])
    assert "mask_mod=_sliced_mask_mod_error" in repr(fb[0])


_INDICES = [0, 1, -1, (0, 1), (1, -1), (slice(0, 2), slice(1, 2)), (slice(None), slice(None), "t1"),
            (slice(None), slice(None), "t02"), (slice(0, 1), 2, "t1"), (1, 2, slice(2, 4)), slice(1, None),
            (slice(None), slice(None, None, 2))]


def _materialise(index):
    out = []
    for i in index if isinstance(index, tuple) else (index,):
        if i == "t1":
            i = torch.tensor([1])
        elif i == "t02":
            i = torch.tensor([0, 2], dtype=torch.int32)
        out.append(i)
    return tuple(out) if isinstance(index, tuple) else out[0]


@pytest.mark.parametrize("index", _INDICES, ids=[str(i) for i in _INDICES])
def test_getitem_matches_torch(index, pair_bh):
    fb, tb = pair_bh
    idx = _materialise(index)
    fs, ts = fb[idx], tb[idx]
    assert_same(fs, ts, f"bm[{index}]")
    assert str(fs) == str(ts)
    assert repr(fs) == repr(ts)
    with pytest.raises(RuntimeError):
        fs.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(0), torch.tensor(0))


def test_getitem_documented_shapes():
    fb = create_block_mask(causal_mask, 4, 2, 512, 512, device="cpu")
    assert fb[0].kv_num_blocks.shape == (1, 2, 4)
    assert fb[0, 1].kv_indices.shape == (1, 1, 4, 4)
    assert fb[0:2, 1:2].kv_num_blocks.shape == (2, 1, 4)
    s = fb[0:2, 1:2, torch.tensor([1], dtype=torch.int32)]
    assert s.kv_num_blocks.shape == (2, 1, 1) and s.kv_indices.shape == (2, 1, 1, 4)
    # the q-side of a q-sliced mask is the transpose of the kept rows only
    assert s.q_num_blocks.shape == (2, 1, 4)
    assert s.full_q_num_blocks[0, 0].tolist() == [1, 0, 0, 0]
    assert s.q_num_blocks[0, 0].tolist() == [0, 1, 0, 0]


def test_getitem_without_full_blocks():
    fb, tb = both(batch_and_head, 2, 3, 300, 257, BLOCK_SIZE=(64, 32), separate_full_blocks=False)
    for idx in (1, (0, 2), (slice(None), slice(None), torch.tensor([3, 0]))):
        assert_same(fb[idx], tb[idx], f"bm[{idx}]")


def _random_ordered(shape_rows_cols, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randint(0, 3, shape_rows_cols, generator=g)
    partial, full = (dense == 1), (dense == 2)
    return tfa._dense_to_ordered(partial), tfa._dense_to_ordered(full)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 4, 4), (3, 6, 2), (4, 9)], ids=str)
def test_from_kv_blocks_matches_torch(shape):
    (kv_num, kv_idx), (f_num, f_idx) = _random_ordered(shape, seed=len(shape) * 7 + shape[-1])
    rows, cols = shape[-2:]
    cases = [
        dict(),
        dict(BLOCK_SIZE=64),
        dict(BLOCK_SIZE=(16, 32), seq_lengths=(rows * 16 - 5, cols * 32 - 31)),  # ragged last blocks, covered
        dict(full=True),
        dict(full=True, BLOCK_SIZE=(32, 16), seq_lengths=(rows * 32 - 1, cols * 16)),
        dict(full=True, compute_q_blocks=False),
        dict(compute_q_blocks=False, BLOCK_SIZE=8),
    ]
    for kw in cases:
        kw = dict(kw)
        full = kw.pop("full", False)
        args = (kv_num, kv_idx, f_num, f_idx) if full else (kv_num, kv_idx)
        fb = BlockMask.from_kv_blocks(*args, **kw)
        tb = tfa.BlockMask.from_kv_blocks(*args, **kw)
        assert_same(fb, tb, f"from_kv_blocks {shape} {kw} full={full}")
        assert fb.mask_mod is noop_mask
        assert repr(fb) == repr(tb)
        assert fb.to_string() == tb.to_string()
        assert torch.equal(fb.to_dense(), tb.to_dense())


def test_from_kv_blocks_keeps_mask_mod_and_rejects_bad_input():
    (kv_num, kv_idx), (f_num, f_idx) = _random_ordered((1, 1, 3, 3), seed=3)
    fb = BlockMask.from_kv_blocks(kv_num, kv_idx, mask_mod=causal_mask)
    assert fb.mask_mod is causal_mask
    assert fb.shape == (1, 1, 384, 384)
    with pytest.raises(FlexcompError):
        BlockMask.from_kv_blocks(kv_num.flatten(), kv_idx.flatten())
    with pytest.raises(FlexcompError):
        BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, None)


def test_from_kv_blocks_roundtrips_create_block_mask(pair_bh):
    fb, tb = pair_bh
    rebuilt = BlockMask.from_kv_blocks(fb.kv_num_blocks, fb.kv_indices, fb.full_kv_num_blocks, fb.full_kv_indices,
                                       BLOCK_SIZE=fb.BLOCK_SIZE, mask_mod=fb.mask_mod, seq_lengths=fb.seq_lengths)
    assert_same(rebuilt, tb, "rebuilt")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"], ids=str)
def test_to_device(device, pair_bh):
    fb, tb = pair_bh
    moved, tmoved = fb.to(device), tb.to(device)
    assert moved is not fb
    assert moved.mask_mod is fb.mask_mod
    assert moved.BLOCK_SIZE == fb.BLOCK_SIZE and moved.seq_lengths == fb.seq_lengths
    for name in FIELDS:
        a, t = getattr(moved, name), getattr(tmoved, name)
        assert a.device == t.device == torch.device(device)
        assert a.shape == t.shape and a.dtype == t.dtype
        if a.device.type == "cpu":
            assert torch.equal(a, getattr(fb, name))
    if torch.device(device).type == "cpu":
        assert_same(moved, tmoved, f"to({device})")


def test_to_keeps_none_fields():
    fb, tb = both(causal_mask, None, None, 256, 256, separate_full_blocks=False)
    m = fb.to("cpu")
    assert m.full_kv_num_blocks is None and m.full_q_indices is None
    assert_same(m, tb.to("cpu"))


@pytest.mark.parametrize("new", [(100, 60), (1, 1), (300, 257), (64, 256), (257, 31), (512, 512)], ids=str)
@pytest.mark.parametrize("kw", [{}, {"separate_full_blocks": False}], ids=str)
def test_adjust_matches_torch(new, kw):
    for mask, B, H in ((causal_mask, None, None), (batch_and_head, 2, 3), (MASKS["document_lengths"], 1, 2)):
        fb, tb = both_cached(mask, B, H, 300, 257, BLOCK_SIZE=(64, 32), **kw)
        fa, ta = fb._adjust(*new), tb._adjust(*new)
        assert_same(fa, ta, f"_adjust{new} {kw}")
        assert fa.mask_mod is mask
        assert fa.seq_lengths == new


def test_adjust_of_causal_is_the_smaller_causal():
    big = create_block_mask(causal_mask, None, None, 1024, 1024, device="cpu")
    small = create_block_mask(causal_mask, None, None, 512, 512, device="cpu")
    adj = big._adjust(512, 512)
    for name in FIELDS:
        assert torch.equal(getattr(adj, name), getattr(small, name)), name


# ---- create_mask, and_masks, or_masks -------------------------------------------------------------
def _score_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


BIAS = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))


def _score_bias_mask(score, b, h, q_idx, kv_idx):
    return torch.where(BIAS[h, kv_idx] > 0, score + BIAS[h, kv_idx], -float("inf"))


CREATE_MASK_MODS = {**{k: MASKS[k] for k in ("causal", "sliding_window", "document_ids_2d", "padding",
                                                 "per_head_window", "batch_and_head", "and_doc_window")},
                    "score_causal": _score_causal, "score_bias_mask": _score_bias_mask,
                    "alibi": alibi(3), "softcap": softcap(20.0)}


@pytest.mark.parametrize("B,H,Q,KV", [(2, 3, 37, 53), (1, 1, 1, 64), (None, None, 64, 1), (2, None, 64, 64)])
@pytest.mark.parametrize("name", list(CREATE_MASK_MODS))
def test_create_mask_matches_torch(name, B, H, Q, KV):
    mod = CREATE_MASK_MODS[name]
    m = create_mask(mod, B, H, Q, KV, device="cpu")
    t = tfa.create_mask(mod, B, H, Q, KV, device="cpu")
    assert m.shape == t.shape == (B or 1, H or 1, Q, KV)
    assert m.dtype == t.dtype == torch.bool
    assert torch.equal(m, t)


def test_create_mask_score_mods_without_inf_keep_everything():
    for mod in (alibi(2), softcap(3.0)):
        assert bool(create_mask(mod, 1, 2, 9, 11, device="cpu").all())


A = sliding_window(5)
Bm = prefix_lm(7)
C = padding_mask([20, 9])


@pytest.mark.parametrize("mods", [(causal_mask,), (causal_mask, A), (A, Bm, C), (Bm, C, per_head_window)],
                         ids=lambda ms: "+".join(getattr(m, "__name__", "m") for m in ms))
def test_and_or_masks_match_manual(mods):
    dense = [create_mask(m, 2, 3, 23, 29, device="cpu") for m in mods]
    want_and, want_or = dense[0].clone(), dense[0].clone()
    for d in dense[1:]:
        want_and &= d
        want_or |= d
    got_and = create_mask(and_masks(*mods), 2, 3, 23, 29, device="cpu")
    got_or = create_mask(or_masks(*mods), 2, 3, 23, 29, device="cpu")
    assert torch.equal(got_and, want_and)
    assert torch.equal(got_or, want_or)
    # torch agrees on flexcomp's combinators, and flexcomp on torch's
    assert torch.equal(tfa.create_mask(and_masks(*mods), 2, 3, 23, 29, device="cpu"), want_and)
    assert torch.equal(create_mask(tfa.or_masks(*mods), 2, 3, 23, 29, device="cpu"), want_or)
    # and the combinators called directly on index tensors (no tracing) give the same
    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.arange(3).view(1, -1, 1, 1)
    q = torch.arange(23).view(1, 1, -1, 1)
    kv = torch.arange(29).view(1, 1, 1, -1)
    assert torch.equal(torch.broadcast_to(and_masks(*mods)(b, h, q, kv), want_and.shape), want_and)
    assert torch.equal(torch.broadcast_to(or_masks(*mods)(b, h, q, kv), want_or.shape), want_or)


def test_and_or_masks_empty_and_errors():
    assert bool(create_mask(and_masks(), 1, 1, 5, 6, device="cpu").all())
    assert not bool(create_mask(or_masks(), 1, 1, 5, 6, device="cpu").any())
    fb, tb = both(and_masks(), None, None, 256, 200, BLOCK_SIZE=64)
    assert_same(fb, tb, "and_masks()")
    fb, tb = both(or_masks(), None, None, 256, 200, BLOCK_SIZE=64)
    assert_same(fb, tb, "or_masks()")
    with pytest.raises(FlexcompError):
        and_masks(causal_mask, 3)
    with pytest.raises(FlexcompError):
        or_masks("causal")


def test_nested_combinators_match_torch():
    m = or_masks(and_masks(document_mask([100, 57, 143]), sliding_window(40)), and_masks(prefix_lm(16), padding_mask(PAD_LENS)))
    fb, tb = both(m, 2, None, 300, 300, BLOCK_SIZE=(32, 16))
    assert_same(fb, tb, "nested")
