"""The split-KV decode kernels (codegen/kernels/decode.py; Triton's interpreter on CPU, the real thing on a
GPU) against the dense float64 oracle and torch's eager flex_attention: short queries at the end of a
long cache, GQA groups packed into tiles, every mod kind, block masks built once and sliced per step."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import flexcomp.codegen.launch_decode as launch_decode
from flexcomp import AuxRequest, FlexcompError, create_block_mask, flex_attention
from flexcomp.masks import document_mask
from flexcomp.plan import plan_for
from flexcomp.problem import make_problem
from flexcomp.options import Backend, Options
from flexcomp.testing import dense_attention
from flexcomp.tiles import KernelFamily, decode_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}


@pytest.fixture
def launches(monkeypatch):
    """The decode launches of a test, as (splits, heads packed per tile, rows per tile)."""
    seen = []
    real = launch_decode._decode_launch

    def spy(problem, plan, layout, *args, **kw):
        seen.append((layout.splits, layout.heads, layout.block_m))
        return real(problem, plan, layout, *args, **kw)

    monkeypatch.setattr(launch_decode, "_decode_launch", spy)
    return seen


def _qkv(B, H, Hkv, L, S, D=16, dtype=torch.float32):
    return (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype), torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype),
            torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype))


def _mods(name: str, L: int, S: int, H: int):
    """(score_mod, mask_mod) of a variant with the queries at the end of the cache (offset S - L)."""
    off = torch.tensor(S - L, device=DEVICE)
    if name == "causal":
        return None, lambda b, h, q, kv: q + off >= kv
    if name == "sliding":
        return None, lambda b, h, q, kv: (q + off >= kv) & (q + off - kv < 70)
    if name == "document":
        lens = torch.tensor([S // 3, 5, S // 2, S], device=DEVICE)
        doc = torch.repeat_interleave(torch.arange(4, device=DEVICE), lens)[:S]
        return None, lambda b, h, q, kv: (doc[q + off] == doc[kv]) & (q + off >= kv)
    if name == "alibi":
        slopes = torch.rand(H, device=DEVICE)
        return (lambda s, b, h, q, kv: s - slopes[h] * (q + off - kv)), lambda b, h, q, kv: q + off >= kv
    if name == "softcap":
        return (lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0)), None
    raise ValueError(name)


def _check(q, k, v, score_mod, mask_mod, bs=(64, 32), B=1, H=1, gqa=False, tol=2e-5):
    L, S = q.shape[2], k.shape[2]
    bm = create_block_mask(mask_mod, B, H, L, S, device=DEVICE, BLOCK_SIZE=bs) if mask_mod else None
    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_aux=AuxRequest(lse=True),
                              kernel_options=TRITON, enable_gqa=gqa)
    lse = aux.lse
    ro, rl = dense_attention(q, k, v, score_mod, mask_mod, enable_gqa=gqa)
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    torch.testing.assert_close(lse.double(), rl, atol=tol, rtol=tol)
    return out, lse


@pytest.mark.parametrize("L", [1, 3, 16, 64])
@pytest.mark.parametrize("S", [256, 301], ids=["S=256", "S=301"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 1), (7, 1)], ids=["mha", "gqa4", "gqa7"])
def test_query_lengths_kv_lengths_and_groups(L, S, H, Hkv, launches):
    q, k, v = _qkv(2, H, Hkv, L, S)
    _check(q, k, v, *_mods("causal", L, S, H), gqa=H != Hkv)
    assert launches, "the decode kernels did not run"
    splits, heads, rows = launches[-1]
    assert heads == H // Hkv and rows >= heads * min(L, 64 // triton_pow2(heads))


def triton_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@pytest.mark.parametrize("variant", ["causal", "sliding", "document", "alibi", "softcap"])
def test_every_variant_against_the_oracle_and_torch(variant, launches):
    L, S, H = 5, 333, 4
    q, k, v = _qkv(1, H, 2, L, S)
    score_mod, mask_mod = _mods(variant, L, S, H)
    out, lse = _check(q, k, v, score_mod, mask_mod, gqa=True)
    assert launches and launches[-1][0] > 1  # several splits: the merge ran
    if DEVICE == "cpu":  # torch's eager flex_attention (its compiled kernels need a GPU)
        tbm = (torch_flex.create_block_mask(mask_mod, 1, 1, L, S, device=DEVICE, BLOCK_SIZE=(64, 32))
               if mask_mod else None)
        with warnings.catch_warnings():  # torch: "called without torch.compile()", once
            warnings.simplefilter("ignore")
            want, want_aux = torch_flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=tbm, enable_gqa=True,
                                                       return_aux=torch_flex.AuxRequest(lse=True))
        want_lse = want_aux.lse
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_and_empty_splits_give_zero_and_minus_inf(launches):
    """Query rows that keep nothing (output 0, LSE -inf, no NaN) beside rows whose keys all sit in one
    split (the other splits are empty and must not disturb the merge)."""
    L, S = 4, 512
    q, k, v = _qkv(1, 2, 2, L, S)
    mask = lambda b, h, qi, kv: (qi % 2 == 1) & (kv < 40)  # noqa: E731  even rows: nothing
    out, lse = _check(q, k, v, None, mask, bs=(64, 32))
    assert torch.isneginf(lse[:, :, 0::2]).all() and (out[:, :, 0::2] == 0).all()
    assert not torch.isnan(out).any() and launches[-1][0] > 1


def test_per_head_block_masks_do_not_pack_heads(launches):
    L, S, H = 2, 300, 4
    q, k, v = _qkv(2, H, 1, L, S)
    widths = torch.tensor([10, 50, 120, 300], device=DEVICE)
    mask = lambda b, h, qi, kv: (S - L + qi >= kv) & (S - L + qi - kv < widths[h])  # noqa: E731
    _check(q, k, v, None, mask, B=1, H=H, gqa=True)
    assert launches[-1][1] == 1  # each head its own lists: one head per tile


def test_document_mask_factory_and_batches_of_different_masks():
    L, S = 3, 256
    q, k, v = _qkv(2, 2, 2, L, S)
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([100, 100, 56])),
                           torch.repeat_interleave(torch.arange(2), torch.tensor([250, 6]))]).to(DEVICE)
    base = document_mask(doc_ids=doc_ids)
    off = torch.tensor(S - L, device=DEVICE)
    _check(q, k, v, None, lambda b, h, qi, kv: base(b, h, qi + off, kv), B=2)


def test_gradients_through_a_decode_forward():
    """A short query's forward runs the decode kernels; its backward (the prefill one) gets the same
    gradients as the oracle."""
    L, S, H = 4, 200, 4
    q, k, v = (t.requires_grad_() for t in _qkv(1, H, 2, L, S))
    slopes = torch.rand(H, device=DEVICE, requires_grad=True)
    score_mod = lambda s, b, h, qi, kv: s - slopes[h] * (S - L + qi - kv).abs()  # noqa: E731
    mask = lambda b, h, qi, kv: S - L + qi >= kv  # noqa: E731
    bm = create_block_mask(mask, 1, 1, L, S, device=DEVICE, BLOCK_SIZE=(64, 32))
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=TRITON, enable_gqa=True)
    want, _ = dense_attention(q, k, v, score_mod, mask, enable_gqa=True)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, slopes), do)
    ref = torch.autograd.grad(want, (q, k, v, slopes), do.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_a_block_mask_built_once_and_sliced_per_step_as_torch_users_do(launches):
    """gpt-fast's decode loop: one BlockMask for the whole cache, ``bm[:, :, pos // Q_BLOCK]`` per step
    with the mask_mod shifted by the position (a tensor); each step equals the oracle, and a step
    neither traces again nor derives the q-side lists."""
    import flexcomp.trace as trace_module

    S, H = 320, 4
    causal = lambda b, h, qi, kv: qi >= kv  # noqa: E731
    full = create_block_mask(causal, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=(64, 32))
    k, v = torch.randn(1, 2, S, 16, device=DEVICE), torch.randn(1, 2, S, 16, device=DEVICE)
    runs = []
    real_run = trace_module.Tracer.run
    for step, pos in enumerate((130, 131, 200, 319)):
        q = torch.randn(1, H, 1, 16, device=DEVICE)
        offset = torch.tensor(pos, device=DEVICE)
        step_mask = full[:, :, pos // 64]
        step_mask.mask_mod = lambda b, h, qi, kv, offset=offset: causal(b, h, qi + offset, kv)
        step_mask.seq_lengths = (1, S)
        if step == 1:
            trace_module.Tracer.run = lambda self: runs.append(1) or real_run(self)
        try:
            out = flex_attention(q, k, v, block_mask=step_mask, kernel_options=TRITON, enable_gqa=True)
        finally:
            trace_module.Tracer.run = real_run
        want, _ = dense_attention(q, k, v, None, lambda b, h, qi, kv: qi + pos >= kv, enable_gqa=True)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
        assert step_mask._q_pending is not None  # the q-side lists were never needed
    assert runs == []  # steps after the first rebind the trace


def test_family_choice_and_kernel_options():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 4, 512, 16)

    def family(L=8, S=512, opts=None, **kw):
        qq, kk = torch.randn(1, 4, L, 16), torch.randn(1, 4, S, 16)
        p = make_problem(qq, kk, kk, None, None, None, 0.25, Options.parse(opts), **kw)
        return plan_for(p, Backend.TRITON).family

    assert family() is KernelFamily.DECODE
    assert family(L=65) is KernelFamily.PREFILL
    assert family(S=100) is KernelFamily.PREFILL  # one kv block: nothing to split
    assert family(opts={"FORCE_USE_FLEX_ATTENTION": True}) is KernelFamily.PREFILL
    assert family(L=200, opts={"BACKEND": "TRITON_DECODE"}) is KernelFamily.DECODE
    assert family(want_max=True) is KernelFamily.PREFILL
    with pytest.raises(FlexcompError, match="max_scores"):
        family(want_max=True, opts={"BACKEND": "TRITON_DECODE"})
    del q, k


def test_layout_packs_groups_and_splits_to_fill_the_device():
    # batch 8, 32 query / 8 kv heads, one query, 64k keys in blocks of 128, 132 SMs, 4 programs each
    lay = decode_layout(8, 32, 4, 1, 65536, 128, 128, False, 132, 4)
    assert (lay.heads, lay.rows_q, lay.block_m, lay.tiles) == (4, 1, 16, 1)
    assert lay.splits == math.ceil(4 * 132 / 64)
    lay = decode_layout(8, 28, 7, 16, 32768, 128, 128, False, 132, 4)  # Qwen-style 28 / 4
    assert lay.heads == 7 and lay.rows_q == 8 and lay.block_m == 64 and lay.tiles == 2
    lay = decode_layout(1, 4, 4, 1, 256, 128, 128, True, 132, 4)  # per-head lists; only 2 kv blocks
    assert lay.heads == 1 and lay.splits == 2


class TinyLM(torch.nn.Module):
    """Two attention-only layers (GQA 4 / 2, no RoPE: positions from a learned table) and an output head."""

    def __init__(self, vocab=50, dim=32, layers=2, max_len=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(max_len, dim, generator=g) * 0.5)
        self.qkv = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(dim, 2 * dim, generator=g) / dim ** 0.5)
                                          for _ in range(layers))
        self.o = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim ** 0.5)
                                        for _ in range(layers))
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def forward(self, tokens, start, cache=None, block_mask=None, options=TRITON):
        """Logits of ``tokens`` ``[1, L]`` at positions ``start ..``; with ``cache`` (per layer K / V of
        the whole length) the new keys are written there and attention reads the cache."""
        L = tokens.shape[1]
        x = self.emb[tokens] + self.pos[start:start + L]
        for i, (w, o) in enumerate(zip(self.qkv, self.o)):
            q, kv = (x @ w).split([32, 32], -1)
            q = q.view(1, L, 4, 8).transpose(1, 2)
            k, v = kv.view(1, L, 2, 2, 8).permute(2, 0, 3, 1, 4)
            if cache is not None:
                cache[i][0][:, :, start:start + L] = k
                cache[i][1][:, :, start:start + L] = v
                k, v = cache[i][0], cache[i][1]
            a = flex_attention(q, k, v, block_mask=block_mask, kernel_options=options, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(1, L, 32) @ o
        return x @ self.head


@torch.no_grad()
def test_greedy_generation_with_a_kv_cache_matches_full_recompute():
    """20 greedy tokens: each step one query against the cache (decode kernels, the full-length causal
    BlockMask built once and sliced per step) give the tokens of recomputing the whole sequence."""
    model = TinyLM().to(DEVICE)
    prompt = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    T, steps = 64, 20
    causal = lambda b, h, qi, kv: qi >= kv  # noqa: E731
    full = create_block_mask(causal, 1, 1, T, T, device=DEVICE, BLOCK_SIZE=16)
    cache = [(torch.zeros(1, 2, T, 8, device=DEVICE), torch.zeros(1, 2, T, 8, device=DEVICE)) for _ in range(2)]
    n = prompt.shape[1]
    prefill = create_block_mask(lambda b, h, qi, kv: qi >= kv, 1, 1, n, T, device=DEVICE, BLOCK_SIZE=16)
    logits = model(prompt, 0, cache, prefill)
    tokens = prompt
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        pos = tokens.shape[1] - 1
        step = full[:, :, pos // 16]
        offset = torch.tensor(pos, device=DEVICE)
        step.mask_mod = lambda b, h, qi, kv, offset=offset: causal(b, h, qi + offset, kv)
        step.seq_lengths = (1, T)
        logits = model(nxt, pos, cache, step)
    cached = tokens
    tokens = prompt
    for _ in range(steps):  # the whole sequence each step, on the reference backend
        n = tokens.shape[1]
        bm = create_block_mask(causal, 1, 1, n, n, device=DEVICE, BLOCK_SIZE=16)
        logits = model(tokens, 0, block_mask=bm, options={"BACKEND": "reference"})
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, tokens)
    assert len(set(cached[0, 12:].tolist())) > 3  # not a degenerate repetition
