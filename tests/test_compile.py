"""flexcomp inside torch.compile (flexcomp.compile, flexcomp.custom_ops, flexcomp.graph_mods).

Where the mods can be templates, flex_attention and create_block_mask are custom ops in the graph
(``fullgraph=True`` works, gradients through the registered backward); otherwise one graph break
runs the call eagerly. Every case is compared with the same code run eagerly (itself tested against
the dense float64 oracle elsewhere), outputs and every gradient."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

import flexcomp
from flexcomp.api import AuxRequest
from flexcomp.flash_attn import flash_attn_func
from flexcomp.masks import causal_mask, softcap

SLOPES = torch.rand(4) + 0.1


def alibi(score, b, h, q_idx, kv_idx):  # a module-level score_mod reading a global tensor
    return score + SLOPES[h] * (kv_idx - q_idx)


def _doc_mask(doc):  # a closure made outside the compiled region, over a tensor
    def doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    return doc_causal


def _window(w):  # a closure over an int
    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
    return window


def _bias_mod(score, b, h, q_idx, kv_idx, bias=None, scale=1.0):  # for functools.partial
    return score + scale * bias[h, q_idx, kv_idx]


def _qkv(B=2, H=4, L=96, D=16, Hkv=None, dtype=torch.float32):
    Hkv = H if Hkv is None else Hkv
    return [torch.randn(B, h, L, D, dtype=dtype, requires_grad=True) for h in (H, Hkv, Hkv)]


def _same(fn, args, backend="aot_eager", fullgraph=True, grads=True):
    """``fn`` compiled and eager: equal outputs and gradients (w.r.t. the args that require grad)."""
    want = fn(*args)
    got = torch.compile(fn, backend=backend, fullgraph=fullgraph)(*args)
    tol = dict(atol=1e-4, rtol=1e-4) if want.dtype == torch.float32 else {}  # Inductor fuses the ops around
    torch.testing.assert_close(got, want, **tol)
    if grads:
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
            torch.testing.assert_close(a, b, **tol)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_fullgraph_plain_mask_and_module_level_score_mod():
    q, k, v = _qkv()
    bm = flexcomp.create_block_mask(causal_mask, 1, 1, 96, 96, device="cpu", BLOCK_SIZE=32)
    _same(lambda q, k, v: flexcomp.flex_attention(q, k, v, score_mod=alibi, block_mask=bm).sin(), (q, k, v))
    _same(lambda q, k, v: flexcomp.flex_attention(q, k, v).cos(), (q, k, v))
    explained = torch._dynamo.explain(lambda q, k, v: flexcomp.flex_attention(q, k, v, block_mask=bm))(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_fullgraph_with_inductor_gqa_and_lse():
    q, k, v = _qkv(H=4, Hkv=2)
    bm = flexcomp.create_block_mask(_window(20), 1, 1, 96, 96, device="cpu", BLOCK_SIZE=32)

    def f(q, k, v):
        out, aux = flexcomp.flex_attention(q, k, v, score_mod=alibi, block_mask=bm, enable_gqa=True, scale=0.3,
                                           return_aux=AuxRequest(lse=True))
        return out * aux.lse.unsqueeze(-1).exp()
    _same(f, (q, k, v), backend="inductor")


def test_a_new_closure_each_step_reuses_the_graph():
    torch._dynamo.reset()
    q, k, v = _qkv(B=1, L=128)

    def step(q, k, v, bm):
        return flexcomp.flex_attention(q, k, v, block_mask=bm)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    before = None
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        doc = torch.sort(torch.randint(0, 4, (128,), generator=g)).values
        bm = flexcomp.create_block_mask(_doc_mask(doc), 1, 1, 128, 128, device="cpu", BLOCK_SIZE=32)
        torch.testing.assert_close(compiled(q, k, v, bm), step(q, k, v, bm))
        before = _graphs() if before is None else before
    assert _graphs() == before  # the new doc tensor each step went in as an input: no recompile


def test_closure_numbers_changing_give_the_right_mask():
    q, k, v = _qkv(B=1, L=64)

    def f(q, k, v, bm):
        return flexcomp.flex_attention(q, k, v, block_mask=bm)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for w in (3, 9, 17, 30):
        bm = flexcomp.create_block_mask(_window(w), 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
        torch.testing.assert_close(compiled(q, k, v, bm), f(q, k, v, bm))


def test_create_block_mask_and_partial_score_mod_inside_the_graph():
    q, k, v = _qkv(B=2, L=64)
    bias = torch.randn(4, 64, 64)
    doc = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)

    doc_causal = _doc_mask(doc)  # made outside; create_block_mask inside the graph

    def f(q, k, v, bias):
        bm = flexcomp.create_block_mask(doc_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
        mod = functools.partial(_bias_mod, bias=bias * 2, scale=0.5)  # made in the graph, over a graph tensor
        return flexcomp.flex_attention(q, k, v, score_mod=mod, block_mask=bm)
    _same(f, (q, k, v, bias))
    explained = torch._dynamo.explain(f)(q, k, v, bias)
    assert explained.graph_break_count == 0


def test_float64_and_the_reference_backend_under_inductor():
    q, k, v = _qkv(B=1, H=2, L=80, dtype=torch.float64)
    bm = flexcomp.create_block_mask(causal_mask, 1, 2, 80, 80, device="cpu", BLOCK_SIZE=16)

    def f(q, k, v):
        return flexcomp.flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "reference"}) * 2
    _same(f, (q, k, v), backend="inductor")


def test_what_runs_eagerly_behind_one_graph_break():
    """A closure made inside the compiled region (its cells are hidden from Dynamo) and a score_mod
    whose captured tensor requires grad run eagerly: same values and gradients, the bias's too."""
    q, k, v = _qkv(B=1, H=2, L=96)
    w = torch.tensor(1.5, requires_grad=True)
    bm = flexcomp.create_block_mask(causal_mask, 1, 1, 96, 96, device="cpu", BLOCK_SIZE=32)

    def f(q, k, v, w):
        out = flexcomp.flex_attention(q * w, k, v, score_mod=softcap(5.0), block_mask=bm)
        return (out.sin() * w).sum(-1)
    _same(f, (q, k, v, w), fullgraph=False)
    # the eager call, nothing inside flexcomp; torch 2.11's Dynamo breaks one step earlier, on the in-graph
    # closure's cell ("SourcelessBuilder ... <class 'cell'>"), with the same eager result
    reasons = torch._dynamo.explain(f)(q, k, v, w).break_reasons
    assert reasons and all(any(word in r.reason.lower() for word in ("disable", "skip", "'cell'")) for r in reasons)
    with pytest.raises(Exception, match="(?i)skip|disable|'cell'"):
        torch.compile(f, backend="eager", fullgraph=True)(q, k, v, w)

    bias = torch.randn(2, 96, 96, requires_grad=True)
    learned = functools.partial(_bias_mod, bias=bias)
    _same(lambda q, k, v, bias: flexcomp.flex_attention(q, k, v, score_mod=learned, block_mask=bm),
          (q, k, v, bias), fullgraph=False)


def test_flash_attn_inside_compiled_code_runs_eagerly():
    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True)

    q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
    torch.testing.assert_close(torch.compile(f, backend="eager")(q, k, v), f(q, k, v))


def test_bad_input_under_compile_names_the_argument():
    q = torch.randn(1, 2, 32, 8)
    k = torch.randn(1, 3, 32, 8)
    with pytest.raises(Exception, match="same number of heads"):
        torch.compile(lambda q, k: flexcomp.flex_attention(q, k, k), backend="aot_eager", fullgraph=True)(q, k)


def test_importing_flexcomp_does_not_import_dynamo():
    """Importing torch._dynamo fixes Triton's interpreter switch: a script that imports flexcomp and
    then sets TRITON_INTERPRET=1 (the demo does) would get compiled, not interpreted, kernels."""
    code = ("import sys, flexcomp, flexcomp.flash_attn, flexcomp.sdpa, flexcomp.context_parallel, flexcomp.paged; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(autouse=True, scope="module")
def _reset_dynamo():
    """Dynamo's caches cleared after these tests (its weakref callbacks otherwise complain at exit)."""
    yield
    torch._dynamo.reset()
