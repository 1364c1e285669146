"""flexcomp inside torch.compile (flexcomp.compile): each public entry point is one graph break and
runs eagerly, with the same outputs and gradients as without compile; fullgraph refuses it."""
from __future__ import annotations

import pytest
import torch

import flexcomp
from flexcomp.flash_attn import flash_attn_func
from flexcomp.masks import causal_mask, softcap


def _model(bm):
    def f(q, k, v, w):
        out = flexcomp.flex_attention(q * w, k, v, score_mod=softcap(5.0), block_mask=bm)
        return (out.sin() * w).sum(-1)
    return f


def test_compiled_region_matches_eager_with_one_graph_break():
    q, k, v = (torch.randn(1, 2, 96, 16, requires_grad=True) for _ in range(3))
    w = torch.tensor(1.5, requires_grad=True)
    bm = flexcomp.create_block_mask(causal_mask, 1, 1, 96, 96, device="cpu", BLOCK_SIZE=32)
    f = _model(bm)
    want = f(q, k, v, w)
    got = torch.compile(f, backend="aot_eager")(q, k, v, w)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, w), g), torch.autograd.grad(want, (q, k, v, w), g)):
        torch.testing.assert_close(a, b)
    explained = torch._dynamo.explain(f)(q, k, v, w)
    assert explained.graph_break_count == 1  # the flex_attention call, nothing inside flexcomp


def test_create_block_mask_and_flash_attn_inside_compiled_code():
    def f(q, k, v):
        bm = flexcomp.create_block_mask(causal_mask, 1, 1, q.shape[2], k.shape[2], device="cpu", BLOCK_SIZE=32)
        a = flexcomp.flex_attention(q, k, v, block_mask=bm)
        b = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        return a + b

    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    torch.testing.assert_close(torch.compile(f, backend="eager")(q, k, v), f(q, k, v))


def test_fullgraph_refuses_a_region_that_calls_flexcomp():
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(Exception, match="(?i)skip|disable"):
        torch.compile(lambda x: flexcomp.flex_attention(x, x, x), backend="eager", fullgraph=True)(q)


@pytest.fixture(autouse=True, scope="module")
def _reset_dynamo():
    """Dynamo's caches cleared after these tests (its weakref callbacks otherwise complain at exit)."""
    yield
    torch._dynamo.reset()
