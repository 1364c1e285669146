"""flexcomp.masks: every mask and score mod, alone and composed, against the dense oracle."""
from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexcomp import and_masks, create_block_mask, create_mask, flex_attention, or_masks
from flexcomp.masks import (alibi, alibi_slopes, causal_mask, document_mask, padding_mask, prefix_lm,
                            sliding_window, softcap)
from flexcomp.testing import dense_attention, grads, rand_qkv


def _compare(score_mod, mask_mod, B=2, H=4, L=96, S=96, E=16, bs=32, tol=1e-9):
    q, k, v = rand_qkv(B, H, L, S, E)
    bm = create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=bs) if mask_mod else None
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True)
    ro, rl = dense_attention(q, k, v, score_mod, mask_mod)
    torch.testing.assert_close(out, ro, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, rl, atol=tol, rtol=tol)
    for g, w in zip(grads((out, lse), (q, k, v)), grads((ro, rl), (q, k, v))):
        torch.testing.assert_close(g, w, atol=tol * 10, rtol=tol * 10)


MASKS = {
    "causal": causal_mask,
    "sliding": sliding_window(20),
    "prefix": prefix_lm(30),
    "document": document_mask([30, 50, 16]),
    "document_prefix_inner": document_mask([30, 50, 16], inner=prefix_lm(5)),
    "document_bidirectional": document_mask([40, 56], inner=None),
    "document_ids_per_batch": document_mask(doc_ids=torch.tensor([[0] * 50 + [1] * 46, [3] * 10 + [4] * 86])),
    "padding": padding_mask([70, 33]),
}
SCORES = {"none": None, "alibi": alibi(4), "softcap": softcap(3.0)}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("score", SCORES)
def test_every_mask_with_every_score_mod(mask, score):
    _compare(SCORES[score], MASKS[mask])


def test_composed_masks():
    _compare(alibi(4), and_masks(causal_mask, sliding_window(10), document_mask([40, 56])))
    _compare(softcap(2.0), or_masks(prefix_lm(8), and_masks(causal_mask, sliding_window(4))))


def test_sliding_window_convention_is_inclusive():
    m = create_mask(sliding_window(2), 1, 1, 6, 6, device="cpu")[0, 0]
    for qi in range(6):
        assert m[qi].nonzero().flatten().tolist() == list(range(max(0, qi - 2), qi + 1))


def test_document_inner_sees_local_indices():
    m = create_mask(document_mask([3, 4], inner=prefix_lm(1)), 1, 1, 7, 7, device="cpu")[0, 0].int()
    # second document (tokens 3..6): its own first token is the prefix
    assert m[3].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert m[6].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert m[1].tolist() == [1, 1, 0, 0, 0, 0, 0]


def test_alibi_and_softcap_values():
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    s = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    torch.testing.assert_close(softcap(10.0)(s, 0, 0, 0, 0), 10 * torch.tanh(s / 10))


def test_learnable_alibi_slopes_get_gradients():
    slopes = alibi_slopes(2).double().requires_grad_()
    q, k, v = rand_qkv(1, 2, 24, 24, 8)
    bm = create_block_mask(causal_mask, 1, 2, 24, 24, device="cpu", BLOCK_SIZE=8)
    out = flex_attention(q, k, v, score_mod=alibi(2, slopes), block_mask=bm)
    ro, _ = dense_attention(q, k, v, alibi(2, slopes), causal_mask)
    g, = torch.autograd.grad(out.sum(), slopes)
    w, = torch.autograd.grad(ro.sum(), slopes)
    torch.testing.assert_close(g, w)


@pytest.mark.parametrize("call,match", [
    (lambda: sliding_window(-1), "window must be a non-negative int, got -1"),
    (lambda: prefix_lm(2.5), "prefix_length must be a non-negative int, got 2.5"),
    (lambda: softcap(0), "cap must be a positive finite number, got 0"),
    (lambda: alibi(0), "num_heads must be a positive int, got 0"),
    (lambda: document_mask(), "exactly one of lengths"),
    (lambda: document_mask([3, 0]), "positive ints"),
    (lambda: padding_mask([[1, 2]]), r"lengths must be 1-D \[B\]"),
])
def test_mask_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- fuzzing compositions ---------------------------------------------------------------------
def _leaf_masks(draw, S):
    kind = draw(st.sampled_from(["causal", "sliding", "prefix", "document", "padding", "band"]))
    if kind == "causal":
        return causal_mask
    if kind == "sliding":
        return sliding_window(draw(st.integers(0, S)))
    if kind == "prefix":
        return prefix_lm(draw(st.integers(0, S)))
    if kind == "document":
        cuts = sorted(set(draw(st.lists(st.integers(1, S - 1), max_size=4))))
        lengths = [b - a for a, b in zip([0] + cuts, cuts + [S])]
        return document_mask(lengths, inner=draw(st.sampled_from([causal_mask, None])))
    if kind == "padding":
        return padding_mask(draw(st.lists(st.integers(0, S), min_size=2, max_size=2)))
    lo = draw(st.integers(-S, S))

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= lo) & ~(kv_idx % 3 == h)

    return band


@st.composite
def compositions(draw):
    S = draw(st.integers(2, 70))
    L = draw(st.sampled_from([S, draw(st.integers(1, 70))]))
    n = draw(st.integers(1, 3))
    leaves = [_leaf_masks(draw, max(S, L)) for _ in range(n)]
    mask = leaves[0] if n == 1 else draw(st.sampled_from([and_masks, or_masks]))(*leaves)
    score = draw(st.sampled_from([None, softcap(draw(st.floats(0.5, 20))), alibi(2)]))
    bs = draw(st.sampled_from([8, 16, (16, 8), 32]))
    return score, mask, L, S, bs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compositions())
def test_fuzz_compositions_against_the_oracle(case):
    score, mask, L, S, bs = case
    _compare(score, mask, B=2, H=2, L=L, S=S, E=8, bs=bs)


def _all_modules() -> list[str]:
    import pkgutil

    import flexcomp
    import flexcomp.codegen
    import flexcomp.masks

    # each mapped folder on its own: an editable install keeps codegen/ and masks/ outside flexcomp/
    names = set()
    for pkg in (flexcomp, flexcomp.codegen, flexcomp.masks):
        names.add(pkg.__name__)
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
    return sorted(n for n in names if n not in ("flexcomp.demo", "flexcomp.bench") and ".kernels" not in n)


# every public stage shows a runnable example
WITH_EXAMPLES = {"flexcomp.masks.causal", "flexcomp.masks.windows", "flexcomp.masks.documents", "flexcomp.masks.alibi",
                 "flexcomp.masks.softcap", "flexcomp.masks.patterns", "flexcomp.masks.spatial", "flexcomp.masks.bias",
                 "flexcomp.visualize", "flexcomp.options", "flexcomp.problem", "flexcomp.plan", "flexcomp.cache",
                 "flexcomp.blockmask", "flexcomp.blockmask_build", "flexcomp.api",
                 "flexcomp.builder", "flexcomp.trace", "flexcomp.runtime", "flexcomp.reference", "flexcomp.explain",
                 "flexcomp.codegen.lower", "flexcomp.derivative", "flexcomp.ranges"}


@pytest.mark.parametrize("module", _all_modules())
def test_docstring_examples_run(module):
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(importlib.import_module(module), optionflags=flags)
    assert result.failed == 0
    assert result.attempted > 0 or module not in WITH_EXAMPLES


def test_document_mask_keeps_its_tensors_on_the_given_device():
    """``device=``: the ids and positions are made there (no copy at each build); the same mask."""
    from flexcomp.ir import ModKind
    from flexcomp.trace import trace

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [3, 5, 1, 7]
    for mod in (document_mask(lengths, device=dev), document_mask(doc_ids=torch.tensor([0] * 3 + [1] * 13),
                                                                  device=dev)):
        assert {t.device.type for t in trace(mod, ModKind.MASK).buffers} == {dev}
    got = create_mask(document_mask(lengths, device=dev), 1, 1, 16, 16, device=dev).cpu()
    want = create_mask(document_mask(lengths), 1, 1, 16, 16, device="cpu")
    assert torch.equal(got, want) and want.any() and not want.all()
