"""Whole-domain ranges (flexcomp.ranges) and out-of-range captured-tensor indices in block masks.

torch raises IndexError when a mod indexes a captured tensor out of range; flexcomp must too, never
deciding blocks from made-up bounds.
"""
import pytest
import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp import create_block_mask, create_mask
from flexcomp.errors import FlexcompError, FlexcompIndexError
from flexcomp.ir import ModKind
from flexcomp.ranges import INDEX_LIMIT, Domain, check_index_limit, loads_in_range, overflowing_nodes
from flexcomp.trace import trace


def test_out_of_range_index_in_a_mask_raises_index_error_like_torch():
    doc = torch.zeros(100, dtype=torch.int64)

    def short_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    with pytest.raises(IndexError):
        tfa.create_block_mask(short_doc, 1, 1, 128, 128, device="cpu")
    with pytest.raises(FlexcompIndexError, match=r"short_doc.*doc.*\(100,\)"):
        create_block_mask(short_doc, 1, 1, 128, 128, device="cpu")
    with pytest.raises(IndexError):
        create_mask(short_doc, 1, 1, 128, 128, device="cpu")
    create_block_mask(short_doc, 1, 1, 100, 100, device="cpu")  # in range: fine


def test_out_of_range_even_where_bounds_would_decide_the_block():
    table = torch.ones(40, dtype=torch.bool)

    def guarded(b, h, q_idx, kv_idx):  # torch evaluates table[q_idx] for every pair, masked or not
        return (q_idx < 16) & table[q_idx]

    with pytest.raises(IndexError):
        tfa.create_block_mask(guarded, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(IndexError):
        create_block_mask(guarded, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)


def test_negative_indices_count_from_the_end_as_torch():
    doc = torch.arange(64) // 16

    def prev_doc(b, h, q_idx, kv_idx):
        return doc[q_idx - 1] == doc[kv_idx]

    ours = create_block_mask(prev_doc, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    theirs = tfa.create_block_mask(prev_doc, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(create_mask(prev_doc, 1, 1, 64, 64, device="cpu"), tfa.create_mask(prev_doc, 1, 1, 64, 64, device="cpu"))


def test_loads_in_range_proof():
    bias = torch.randn(4, 127)
    doc = torch.tensor([0] * 30 + [1] * 34)
    table = torch.randn(2, 2)
    rel = trace(lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx - kv_idx + 63], ModKind.SCORE)
    assert loads_in_range(rel, 1, 4, 64, 64)
    assert not loads_in_range(rel, 1, 4, 65, 64)  # q - kv + 63 reaches 127
    assert not loads_in_range(rel, 1, 5, 64, 64)  # h reaches 4
    pairs = trace(lambda s, b, h, q_idx, kv_idx: s + table[doc[q_idx], doc[kv_idx]], ModKind.SCORE)
    assert loads_in_range(pairs, 1, 1, 64, 64)
    doc[3] = 2  # a document id past the table
    assert not loads_in_range(pairs, 1, 1, 64, 64)
    neg = trace(lambda s, b, h, q_idx, kv_idx: s + bias[h, -1 - q_idx], ModKind.SCORE)
    assert loads_in_range(neg, 1, 4, 127, 8) and not loads_in_range(neg, 1, 4, 128, 8)
    by_score = trace(lambda s, b, h, q_idx, kv_idx: s + bias[h, (s * 10).long()], ModKind.SCORE)
    assert not loads_in_range(by_score, 1, 4, 8, 8)  # an index computed from the score: not provable


def test_overflow_analysis_and_the_index_limit():
    tm = trace(lambda b, h, q_idx, kv_idx: q_idx * 64 >= kv_idx, ModKind.MASK)
    assert "i64" not in str(tm.graph)  # 2**24 * 64 fits int32
    small = Domain(1, 1, INDEX_LIMIT, INDEX_LIMIT)
    assert not overflowing_nodes(tm.graph, {}, small)
    huge = Domain(1, 1, 2**26, 2**26)
    assert overflowing_nodes(tm.graph, {}, huge)
    with pytest.raises(FlexcompError, match="int32 range"):
        check_index_limit(tm, huge)
    check_index_limit(tm, small)
