"""flexcomp.graph_mods: a mod's template (leaves and paths, pinned) and its rebuild from new leaves."""
import functools

import pytest
import torch

from flexcomp.graph_mods import LeafKind, ModTemplate, NotGraphable, Step, shadow, template_or_none


def _windowed(doc, w, cap, name=None):
    def mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx - kv_idx <= w) & (cap > 0.5) & (name is None)
    return mod


def _biased(score, b, h, q_idx, kv_idx, bias=None, scale=1.0):
    return score + scale * bias[h]


def test_a_closure_s_leaves_in_cell_order():
    doc = torch.zeros(8, dtype=torch.long)
    t = ModTemplate.of(_windowed(doc, 3, 0.75))
    assert [(leaf.kind, leaf.path) for leaf in t.leaves] == [
        (LeafKind.CODE, ()),
        (LeafKind.FLOAT, ((Step.CELL, 0),)),  # cells in the code's free-variable order: cap, doc, name, w
        (LeafKind.TENSOR, ((Step.CELL, 1),)),
        (LeafKind.SAME, ((Step.CELL, 2),)),
        (LeafKind.INT, ((Step.CELL, 3),)),
    ]
    assert t.counts() == (1, 1, 1)
    assert t.proto.__closure__[1].cell_contents is None  # the template does not keep the tensor alive


def test_rebuild_puts_new_leaves_in_and_keeps_the_rest():
    doc = torch.tensor([0, 0, 1, 1])
    proto = _windowed(doc, 3, 0.75)
    t = ModTemplate.of(proto)
    fresh = t.rebuild([torch.tensor([0, 1, 1, 1])], [1], [0.25])
    i = torch.tensor
    assert bool(proto(i(0), i(0), i(1), i(0))) is True
    assert bool(fresh(i(0), i(0), i(1), i(0))) is False  # the new doc and cap; w=1 would keep it
    assert fresh.__code__ is proto.__code__ and fresh.__qualname__ == proto.__qualname__


def test_partials_nested_functions_and_tuples():
    inner = _windowed(torch.arange(4), 2, 1.0)
    p = functools.partial(_biased, bias=torch.ones(2), scale=0.5)
    t = ModTemplate.of(functools.partial(p, extra=(inner, 3)))
    kinds = [leaf.kind for leaf in t.leaves]
    assert kinds.count(LeafKind.TENSOR) == 2 and kinds.count(LeafKind.CODE) == 2  # bias, doc; _biased, mod
    paths = [leaf.path for leaf in t.leaves]
    assert ((Step.KEYWORD, "bias"),) in paths  # (a partial of a partial is one partial)
    assert ((Step.KEYWORD, "extra"), (Step.ITEM, 1)) in paths


def _plain(score, b, h, q_idx, kv_idx):
    return score


def test_functions_without_cells_or_defaults_are_kept_as_they_are():
    assert ModTemplate.of(_plain).rebuild([], [], []) is _plain
    assert [leaf.kind for leaf in ModTemplate.of(_biased).leaves] == [LeafKind.CODE, LeafKind.SAME, LeafKind.FLOAT]


def test_what_cannot_be_a_template():
    class Obj:
        pass

    obj = Obj()
    with pytest.raises(NotGraphable):
        ModTemplate.of(lambda b, h, q_idx, kv_idx: obj is None)
    assert template_or_none(lambda b, h, q_idx, kv_idx, d={}: True) is None  # a dict default
    assert template_or_none(None) is None


def test_shadow_replaces_a_partial_s_tensors_and_numbers_by_markers():
    p = functools.partial(_biased, bias=torch.ones(2), scale=0.5)
    s = shadow(p)
    assert s.func is _biased and isinstance(s.keywords["bias"], str) and isinstance(s.keywords["scale"], str)
    # _biased's code and defaults (None, 1.0), then the keywords in name order
    assert [leaf.kind for leaf in ModTemplate.of(s).leaves] == [LeafKind.CODE, LeafKind.SAME, LeafKind.FLOAT,
                                                                LeafKind.TENSOR, LeafKind.FLOAT]
