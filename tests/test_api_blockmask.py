"""BlockMask's torch 2.13 surface beyond the block lists: dQ write-order metadata, as_tuple, the pytree
flatten / unflatten, pickling and copying, and the checks of user-built lists (from_kv_blocks).

Every comparison is with torch's own BlockMask built from the same arguments, field by field.
"""
from __future__ import annotations

import copy
import functools
import pickle
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch.nn.attention import flex_attention as tfa

from flexcomp import BlockMask, FlexcompError, create_block_mask, flex_attention
from flexcomp.masks import causal_mask, document_mask, sliding_window

ALL = BlockMask._TENSOR_ATTRS


def batch_and_head(b, h, q_idx, kv_idx):
    return ((kv_idx + q_idx) % (b + h + 2) == 0) | (kv_idx < 8 * b + h) | (q_idx >= kv_idx)


def assert_same_all(fb, tb, what=""):
    """Every tensor field (the dQ metadata too), the dq_kv_order flag, sizes and shape equal torch's."""
    assert fb._TENSOR_ATTRS == tb._TENSOR_ATTRS and fb._CONTEXT_ATTRS == tb._CONTEXT_ATTRS
    for name in ALL:
        a, t = getattr(fb, name), getattr(tb, name)
        assert (a is None) == (t is None), f"{what}: {name} is {a is None and 'None' or 'set'}, torch's is not"
        if t is not None:
            assert a.shape == t.shape and a.dtype == t.dtype and a.device == t.device, f"{what}: {name}"
            if a.device.type != "meta":
                assert torch.equal(a, t), f"{what}: {name} values\n{a}\nvs torch\n{t}"
    assert fb.dq_kv_order_spt == tb.dq_kv_order_spt, what
    assert tuple(fb.BLOCK_SIZE) == tuple(tb.BLOCK_SIZE) and tuple(fb.seq_lengths) == tuple(tb.seq_lengths), what
    assert fb.shape == tb.shape and fb._dq_kv_order() is tb._dq_kv_order() or (
        isinstance(fb._dq_kv_order(), torch.Tensor) and torch.equal(fb._dq_kv_order(), tb._dq_kv_order())), what


@functools.lru_cache(maxsize=None)
def pair(order: bool, separate: bool, compute: bool = True):
    kw = dict(device="cpu", BLOCK_SIZE=(64, 32), separate_full_blocks=separate, compute_dq_write_order=compute,
              dq_kv_order=order)
    return (create_block_mask(batch_and_head, 2, 3, 300, 257, **kw),
            tfa.create_block_mask(batch_and_head, 2, 3, 300, 257, **kw))


VARIANTS = [(o, s) for o in (True, False) for s in (True, False)]


# ---- dQ write order ---------------------------------------------------------------------------
@pytest.mark.parametrize("order,separate", VARIANTS)
def test_create_block_mask_dq_write_order_matches_torch(order, separate):
    fb, tb = pair(order, separate)
    assert fb.dq_write_order is not None and fb.dq_write_order.shape == (2, 3, 9, 5)
    assert_same_all(fb, tb, f"order={order} separate={separate}")


def test_dq_write_order_is_off_by_default_and_dq_kv_order_must_be_bool():
    fb, tb = pair(True, True, compute=False)
    assert fb.dq_write_order is None and fb.dq_kv_order_spt is None
    assert_same_all(fb, tb)
    with pytest.raises(ValueError, match="dq_kv_order must be a bool when using create_block_mask, got 1"):
        create_block_mask(causal_mask, 1, 1, 64, 64, device="cpu", dq_kv_order=1)


@pytest.mark.parametrize("index", [0, (1, 2), (slice(None), slice(1, 3)), (slice(None), slice(None), "t")], ids=str)
@pytest.mark.parametrize("order,separate", VARIANTS)
def test_getitem_recomputes_dq_write_order_as_torch(index, order, separate):
    fb, tb = pair(order, separate)
    idx = index if index != (slice(None), slice(None), "t") else (slice(None), slice(None), torch.tensor([1, 3]))
    assert_same_all(fb[idx], tb[idx], f"[{index}]")


@pytest.mark.parametrize("new", [(100, 60), (300, 257), (64, 32), (512, 512)], ids=str)
@pytest.mark.parametrize("order,separate", VARIANTS)
def test_adjust_recomputes_dq_write_order_as_torch(new, order, separate):
    fb, tb = pair(order, separate)
    assert_same_all(fb._adjust(*new), tb._adjust(*new), f"_adjust{new}")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_to_carries_dq_metadata(device):
    fb, tb = pair(False, True)
    assert_same_all(fb.to(device), tb.to(device), f"to({device})")


def test_from_kv_blocks_with_dq_arguments_matches_torch():
    fb, tb = pair(True, True)
    lists = (fb.kv_num_blocks, fb.kv_indices, fb.full_kv_num_blocks, fb.full_kv_indices)
    order = torch.arange(5, dtype=torch.int32).flip(0).expand(2, 3, 5).contiguous()
    for kw in ({"dq_write_order": fb.dq_write_order, "dq_write_order_full": fb.dq_write_order_full},
               {"dq_write_order": fb.dq_write_order, "dq_kv_order": True},
               {"dq_write_order": fb.dq_write_order, "dq_kv_order": order},
               {"dq_kv_order": False}):
        ours = BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(64, 32), seq_lengths=(300, 257), **kw)
        theirs = tfa.BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(64, 32), seq_lengths=(300, 257), **kw)
        assert_same_all(ours, theirs, str(list(kw)))
    tensor_ordered = BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(64, 32), seq_lengths=(300, 257),
                                              dq_write_order=fb.dq_write_order, dq_kv_order=order)
    with pytest.raises(NotImplementedError, match="Slicing BlockMask with tensor dq_kv_order"):
        tensor_ordered[0]
    with pytest.raises(NotImplementedError, match="Adjusting BlockMask with tensor dq_kv_order"):
        tensor_ordered._adjust(64, 64)
    with pytest.raises(ValueError, match="dq_write_order_full requires dq_write_order"):
        BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(64, 32), seq_lengths=(300, 257),
                                 dq_write_order_full=fb.dq_write_order_full)
    with pytest.raises(ValueError, match="dq_kv_order must be a bool, Tensor, or None, got str"):
        BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(64, 32), seq_lengths=(300, 257), dq_kv_order="asc")


def test_flex_attention_ignores_dq_metadata():
    q, k, v = (torch.randn(2, 3, 300, 16, dtype=torch.float64) for _ in range(3))
    fb, _ = pair(True, True)
    plain = create_block_mask(batch_and_head, 2, 3, 300, 257, device="cpu", BLOCK_SIZE=(64, 32))
    k, v = k[:, :, :257], v[:, :, :257]
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=fb), flex_attention(q, k, v, block_mask=plain))


# ---- as_tuple ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("order,separate", VARIANTS[:2] + [(True, True)])
def test_as_tuple_entries_and_order_match_torch(flatten, order, separate):
    fb, tb = pair(order, separate)
    ours, theirs = fb.as_tuple(flatten), tb.as_tuple(flatten)
    assert len(ours) == len(theirs) == (17 if flatten else 15)
    for i, (a, t) in enumerate(zip(ours, theirs)):
        if isinstance(t, torch.Tensor):
            assert torch.equal(a, t), i
        else:
            assert a == t or (a is None and t is None), (i, a, t)
    assert ours[-1] is batch_and_head
    plain, tplain = pair(True, True, compute=False)
    assert [x is None for x in plain.as_tuple(flatten)] == [x is None for x in tplain.as_tuple(flatten)]


# ---- pytree: _flatten / _unflatten / _flatten_with_keys -------------------------------------------------
def _window_of(table):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= table[h]
    return window


def _mods():
    table = torch.tensor([3, 9, 40], dtype=torch.int32)
    return {"named": causal_mask, "closure_tensor": _window_of(table), "documents": document_mask([100, 200]),
            "partial": functools.partial(lambda w, b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= w, 17),
            "lambda": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx}


@pytest.mark.parametrize("name", list(_mods()))
@pytest.mark.parametrize("compute", [False, True])
def test_flatten_unflatten_match_torch(name, compute):
    mod = _mods()[name]
    kw = dict(device="cpu", BLOCK_SIZE=(64, 32), compute_dq_write_order=compute)
    fb = create_block_mask(mod, 1, 3, 300, 257, **kw)
    tb = tfa.create_block_mask(mod, 1, 3, 300, 257, **kw)
    (fl, fc), (tl, tc) = fb._flatten(), tb._flatten()
    assert len(fl) == len(tl)
    for a, t in zip(fl, tl):
        assert type(a) is type(t) and (torch.equal(a, t) if isinstance(t, torch.Tensor) else a == t)
    assert fc[:2] == tc[:2] and fc[3:] == tc[3:]  # seq_lengths, BLOCK_SIZE, dq_kv_order_spt, None fields
    assert type(fc[2].fn).__name__.lstrip("_") == type(tc[2].fn).__name__.lstrip("_")
    assert fc[2] == fb._flatten()[1][2] and hash(fc[2]) == hash(fb._flatten()[1][2])  # equal by value
    back = BlockMask._unflatten(fl, fc)
    assert_same_all(back, tb, "unflatten")
    x = torch.arange(4)
    assert torch.equal(back.mask_mod(x.view(-1, 1, 1, 1) * 0, x.view(1, -1, 1, 1) % 3, x.view(1, 1, -1, 1) * 50,
                                     x.view(1, 1, 1, -1) * 40),
                       mod(x.view(-1, 1, 1, 1) * 0, x.view(1, -1, 1, 1) % 3, x.view(1, 1, -1, 1) * 50,
                           x.view(1, 1, 1, -1) * 40))
    (kl, _), (tkl, _) = fb._flatten_with_keys(), tb._flatten_with_keys()
    assert [str(key) for key, _ in kl] == [str(key) for key, _ in tkl]
    assert all(a is b for (_, a), b in zip(kl, fl))


def test_unflatten_rebuilds_the_closure_around_new_leaves():
    table = torch.tensor([3, 9, 40], dtype=torch.int32)
    fb = create_block_mask(_window_of(table), 1, 3, 128, 128, device="cpu", BLOCK_SIZE=32)
    leaves, context = fb._flatten()
    assert leaves[-1] is table  # the closure's tensor is a leaf, as in torch
    new_table = torch.tensor([0, 1, 2], dtype=torch.int32)
    rebuilt = BlockMask._unflatten((*leaves[:-1], new_table), context)
    q = torch.arange(4).view(1, 1, -1, 1)
    assert torch.equal(rebuilt.mask_mod(0, torch.tensor(1), q, torch.zeros(())), q <= 1)


def test_pytree_registration_is_torchs():
    """torch 2.13 does not register BlockMask as a pytree node: tree_flatten sees one leaf, for both."""
    fb, tb = pair(True, True)
    for bm in (fb, tb):
        leaves, spec = pytree.tree_flatten(bm)
        assert leaves == [bm] and spec.is_leaf()
        assert pytree.tree_unflatten(leaves, spec) is bm
    assert (type(fb) in pytree.SUPPORTED_NODES) == (type(tb) in pytree.SUPPORTED_NODES)
    # registered by hand with the methods (as torch.export users do), the leaves round-trip
    pytree.register_pytree_node(BlockMask, BlockMask._flatten, BlockMask._unflatten,
                                flatten_with_keys_fn=BlockMask._flatten_with_keys)
    try:
        leaves, spec = pytree.tree_flatten({"mask": fb, "x": 1})
        assert sum(isinstance(x, torch.Tensor) for x in leaves) == 10
        back = pytree.tree_unflatten(leaves, spec)["mask"]
        assert_same_all(back, tb, "pytree round trip")
        moved = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), fb)
        assert moved.kv_indices.device.type == "meta" and moved.mask_mod is fb.mask_mod
    finally:
        pytree._deregister_pytree_node(BlockMask)


# ---- pickle and deepcopy: where torch's work, ours work; where torch's fail, ours fail alike ---------
@pytest.mark.parametrize("name", list(_mods()))
def test_pickle_and_deepcopy_behave_as_torch(name):
    mod = _mods()[name]
    fb = create_block_mask(mod, 1, 3, 128, 128, device="cpu", BLOCK_SIZE=32, compute_dq_write_order=True)
    tb = tfa.create_block_mask(mod, 1, 3, 128, 128, device="cpu", BLOCK_SIZE=32, compute_dq_write_order=True)
    for bm_f, bm_t in ((fb, tb), (fb[0], tb[0])):
        for op in (lambda x: pickle.loads(pickle.dumps(x)), copy.deepcopy, copy.copy):
            try:
                t_res, t_err = op(bm_t), None
            except Exception as e:  # noqa: BLE001 - compared with ours below
                t_res, t_err = None, e
            if t_err is not None:
                with pytest.raises(type(t_err)):
                    op(bm_f)
                continue
            res = op(bm_f)
            assert_same_all(res, t_res, name)
            assert (res.mask_mod is bm_f.mask_mod) == (t_res.mask_mod is bm_t.mask_mod)


def test_lambda_mask_block_mask_pickles_nowhere_and_deepcopies_everywhere():
    fb = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # as torch: a lambda has no importable name
        pickle.dumps(fb)
    dup = copy.deepcopy(fb)
    assert dup.mask_mod is fb.mask_mod and dup.kv_indices is not fb.kv_indices
    q = torch.randn(1, 1, 64, 16, dtype=torch.float64)
    torch.testing.assert_close(flex_attention(q, q, q, block_mask=dup), flex_attention(q, q, q, block_mask=fb))
    named = pickle.loads(pickle.dumps(create_block_mask(causal_mask, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)))
    torch.testing.assert_close(flex_attention(q, q, q, block_mask=named), flex_attention(q, q, q, block_mask=fb))


# ---- from_kv_blocks: user lists checked against seq_lengths -----------------------------------------
def _lists():
    g = torch.Generator().manual_seed(1)
    dense = torch.randint(0, 3, (2, 1, 4, 5), generator=g)
    return tfa._dense_to_ordered(dense == 1), tfa._dense_to_ordered(dense == 2)


def test_from_kv_blocks_accepts_what_torch_accepts_when_lists_cover_the_lengths():
    (num, idx), (fnum, fidx) = _lists()
    for kw in ({}, {"seq_lengths": (100, 150)}, {"seq_lengths": (4 * 32, 5 * 32)}, {"BLOCK_SIZE": (32, 30)}):
        kw = {"BLOCK_SIZE": 32, **kw}
        ours = BlockMask.from_kv_blocks(num, idx, fnum, fidx, **kw)
        theirs = tfa.BlockMask.from_kv_blocks(num, idx, fnum, fidx, **kw)
        assert_same_all(ours, theirs, str(kw))


@pytest.mark.parametrize("make,exc,match", [
    (lambda n, i, fn, fi: (n[..., :3], i[..., :3, :], {"seq_lengths": (128, 160)}), FlexcompError, r"kv_indices has 3 q-block rows, but seq_lengths\[0\]=Q_LEN=128"),
    (lambda n, i, fn, fi: (n, i, {"seq_lengths": (129, 160)}), FlexcompError, r"has 4 q-block rows, but .*Q_LEN=129 .* needs 5"),
    (lambda n, i, fn, fi: (n, i, {"seq_lengths": (128, 161)}), FlexcompError, r"has 5 columns, but seq_lengths\[1\]=KV_LEN=161 .* has 6 kv-blocks"),
    (lambda n, i, fn, fi: (n.clone().fill_(6), i, {}), FlexcompError, r"kv_num_blocks must be in 0..5 .* got 6 at \[0, 0, 0\]"),
    (lambda n, i, fn, fi: (n.clone().fill_(-1), i, {}), FlexcompError, r"kv_num_blocks must be in 0..5 .* got -1"),
    (lambda n, i, fn, fi: (n.clone().fill_(5), i.clone().fill_(7), {}), FlexcompError, r"lists kv-block 7 at \[0, 0, 0, 0\], expected 0..4"),
    (lambda n, i, fn, fi: (n.clone().fill_(5), i.clone().fill_(-1), {}), FlexcompError, r"lists kv-block -1 .* expected 0..4"),
    (lambda n, i, fn, fi: (n.clone().fill_(2), i.clone().fill_(1), {}), FlexcompError, r"lists kv-block 1 twice in q-block row \[0, 0, 0\]"),
    (lambda n, i, fn, fi: (n, i, {"full": (n, i)}), FlexcompError, r"listed both as partial \(kv_indices\) and as full"),
    (lambda n, i, fn, fi: (n[..., :3], i, {}), RuntimeError, r"kv_num_blocks must have shape kv_indices.shape\[:-1\] = \(2, 1, 4\)"),
    (lambda n, i, fn, fi: (n, i, {"full": (fn[..., :3, ], fi[..., :3, :])}), RuntimeError, r"full_kv_indices must have kv_indices' shape"),
    (lambda n, i, fn, fi: (n, i.float(), {}), IndexError, r"kv_indices must be an integer tensor .* got torch.float32"),
    (lambda n, i, fn, fi: (n, i.tolist(), {}), AttributeError, r"kv_indices must be a torch.Tensor \(int32\), got list"),
    (lambda n, i, fn, fi: (n.tolist(), i, {}), AttributeError, r"kv_num_blocks must be a torch.Tensor \(int32\), got list"),
    (lambda n, i, fn, fi: (n.flatten(), i.flatten(), {}), RuntimeError, r"BlockMask must have at least 2 dimensions"),
    (lambda n, i, fn, fi: (n, i, {"full": (fn, None)}), AssertionError, r"full_kv_num_blocks and full_kv_indices must be both provided or omitted"),
    (lambda n, i, fn, fi: (n, i, {"BLOCK_SIZE": "8"}), IndexError, r"BLOCK_SIZE must be an int or a \(Q_BLOCK, KV_BLOCK\) pair, got '8'"),
    (lambda n, i, fn, fi: (n, i, {"BLOCK_SIZE": 8.0}), TypeError, r"BLOCK_SIZE must be an int or a .* got 8.0"),
    (lambda n, i, fn, fi: (n, i, {"seq_lengths": 128}), TypeError, r"seq_lengths must be a \(Q_LEN, KV_LEN\) pair or None, got 128"),
    (lambda n, i, fn, fi: (n, i, {"mask_mod": 3}), TypeError, r"mask_mod must be callable or None, got int"),
], ids=lambda x: "" if callable(x) else None)
def test_from_kv_blocks_rejects_inconsistent_lists(make, exc, match):
    (num, idx), (fnum, fidx) = _lists()
    n, i, kw = make(num, idx, fnum, fidx)
    full = kw.pop("full", (None, None))
    kw.setdefault("BLOCK_SIZE", 32)
    with pytest.raises(exc, match=match) as info:
        BlockMask.from_kv_blocks(n, i, *full, **kw)
    assert isinstance(info.value, FlexcompError)
    assert "BlockMask" in str(info.value)


def test_lists_that_do_not_cover_the_call_are_refused_by_flex_attention():
    q = torch.randn(1, 1, 256, 16)
    bm = create_block_mask(causal_mask, 1, 1, 128, 128, device="cpu", BLOCK_SIZE=32)._adjust(256, 256)
    with pytest.raises(FlexcompError, match=r"lists have 4 q-block rows and 4 kv-block columns, but \(Q_LEN, KV_LEN\)=\(256, 256\)"):
        flex_attention(q, q, q, block_mask=bm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = create_block_mask(sliding_window(8), 1, 1, 256, 256, device="cpu", BLOCK_SIZE=32)._adjust(256, 256)
    flex_attention(q, q, q, block_mask=ok)


@pytest.mark.parametrize("name", ["create_block_mask", "create_mask", "BlockMask.__init__", "BlockMask.from_kv_blocks",
                                  "BlockMask.as_tuple", "BlockMask._adjust", "BlockMask.to", "BlockMask.to_string",
                                  "BlockMask._flatten", "BlockMask._unflatten", "BlockMask._flatten_with_keys",
                                  "BlockMask._dq_kv_order", "BlockMask._slice_dq_kv_order"])
def test_signatures_match_torch(name):
    import inspect

    import flexcomp

    def get(mod):
        obj = mod
        for part in name.split("."):
            obj = getattr(obj, part)
        return inspect.signature(obj).parameters

    ours, theirs = get(flexcomp), get(tfa)
    assert list(ours) == list(theirs)
    for p in ours:
        a, t = ours[p].default, theirs[p].default
        same = a == t or (getattr(a, "__name__", 0) == getattr(t, "__name__", 1) == "noop_mask")  # each its own
        assert ours[p].kind == theirs[p].kind and same, p
