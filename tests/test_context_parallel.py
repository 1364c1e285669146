"""Context parallel attention over gloo process groups on the CPU (2 and 4 processes): every rank's
output and LSE, and the gradients of q, k, v and of a captured learnable bias, against single-process
flexcomp on the whole sequence and a dense float64 oracle."""
import math
import os
import tempfile
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexcomp import flex_attention
from flexcomp.api import AuxRequest
from flexcomp.blockmask_build import create_block_mask
from flexcomp.context_parallel import (ContextParallel, Sharding, context_parallel_attention, reduce_gradients,
                                       shard, unshard)
from flexcomp.errors import FlexcompError

F64 = torch.float64
S, B, H, HKV, D = 128, 2, 4, 2, 16
BLOCK = 16


def _cases():
    """(name, mask_mod, score_mod or None, learnable bias?) over global positions."""
    doc = torch.tensor([0] * 20 + [1] * 50 + [2] * 9 + [3] * 49)  # ragged documents, not on shard edges
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64)

    def causal(b, h, q, kv):
        return q >= kv

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv <= 24)

    def document(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    def alibi(score, b, h, q, kv):
        return score - slopes[h] * (q - kv)

    def softcap(score, b, h, q, kv):
        return 5.0 * torch.tanh(score / 5.0)

    def first_keys(b, h, q, kv):  # every query sees the first 8 keys only: most ranks skip their own shard
        return kv < 8

    def anti_causal(b, h, q, kv):  # the last query sees nothing: output 0, LSE -inf, zero gradients
        return q < kv

    return [("causal", causal, None), ("sliding window 24", sliding, None), ("document", document, None),
            ("ALiBi causal", causal, alibi), ("soft-cap", None, softcap), ("learnable bias", document, "bias"),
            ("first 8 keys", first_keys, None), ("anti-causal", anti_causal, softcap)]


def _oracle(q, k, v, mask_mod, score_mod):
    """Dense float64 attention, fully masked rows 0."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    b = torch.arange(q.shape[0]).view(-1, 1, 1, 1)
    h = torch.arange(q.shape[1]).view(1, -1, 1, 1)
    i = torch.arange(S).view(1, 1, -1, 1)
    j = torch.arange(S).view(1, 1, 1, -1)
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    if mask_mod is not None:
        s = s.masked_fill(~torch.broadcast_to(mask_mod(b, h, i, j), s.shape), -torch.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return p @ vv, lse


def _check_case(cp, name, mask_mod, score_mod, gqa):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # one seed on every rank (hash() is per process)
    hk = HKV if gqa else H
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=F64) for h in (H, hk, hk))
    do = torch.randn(B, H, S, D, generator=g, dtype=F64)
    bias = torch.randn(H, S, generator=g, dtype=F64) * 0.5 if score_mod == "bias" else None
    if bias is not None:
        def score_mod(score, b, h, qi, kv, bias=bias):
            return score + bias[h, kv]
    # single process flexcomp on the whole sequence, and the oracle
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves += [bias.clone().requires_grad_()] if bias is not None else []
    sm = score_mod
    if bias is not None:
        def sm(score, b, h, qi, kv, bias=leaves[3]):
            return score + bias[h, kv]
    bm = None if mask_mod is None else create_block_mask(mask_mod, B, H, S, S, device="cpu", BLOCK_SIZE=BLOCK)
    whole, aux = flex_attention(*leaves[:3], score_mod=sm, block_mask=bm, enable_gqa=gqa,
                                return_aux=AuxRequest(lse=True))
    want_grads = torch.autograd.grad(whole, leaves, do)
    oq, ok, ov = (t.clone().requires_grad_() for t in (q, k, v))
    obias = bias.clone().requires_grad_() if bias is not None else None
    oracle_score = sm if bias is None else (lambda s_, b_, h_, i_, j_: s_ + obias[h_, j_])
    ref, ref_lse = _oracle(oq, ok, ov, mask_mod, oracle_score)
    torch.testing.assert_close(whole, ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(aux.lse, ref_lse, atol=1e-10, rtol=1e-8)
    oracle_grads = torch.autograd.grad(ref, [oq, ok, ov] + ([obias] if bias is not None else []), do)
    for a, b in zip(want_grads, oracle_grads):  # single-process flexcomp's gradients against the oracle's
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    # context parallel: this rank's shards as leaves
    cq, ck, cv = (shard(t, cp).requires_grad_() for t in (q, k, v))
    cbias = bias.clone().requires_grad_() if bias is not None else None
    csm = score_mod
    if bias is not None:
        def csm(score, b, h, qi, kv, bias=cbias):
            return score + bias[h, kv]
    out, lse = context_parallel_attention(cq, ck, cv, cp, score_mod=csm, mask_mod=mask_mod, enable_gqa=gqa,
                                          block_size=BLOCK, return_lse=True)
    tol = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out, shard(whole.detach(), cp), **tol, msg=lambda m: f"{name}: output: {m}")
    torch.testing.assert_close(lse, shard(aux.lse.detach(), cp), **tol, msg=lambda m: f"{name}: lse: {m}")
    torch.testing.assert_close(unshard(out, cp), whole.detach(), **tol)
    out.backward(shard(do, cp))
    if cbias is not None:
        reduce_gradients([cbias], cp)
    for what, got, want in (("dq", cq.grad, want_grads[0]), ("dk", ck.grad, want_grads[1]),
                            ("dv", cv.grad, want_grads[2])):
        torch.testing.assert_close(got, shard(want, cp), **tol, msg=lambda m, w=what: f"{name}: {w}: {m}")
    if cbias is not None:
        torch.testing.assert_close(cbias.grad, want_grads[3], **tol, msg=lambda m: f"{name}: d bias: {m}")


def _traffic(cp, mask_mod):
    """How many shards this rank received for ``mask_mod`` (the exchange's sparsity)."""
    import flexcomp.context_parallel as cpm

    seen = []
    real = cpm._exchange

    def counting(cp_, send, recv, mine):
        seen.append(len(recv))
        return real(cp_, send, recv, mine)

    cpm._exchange = counting
    try:
        x = torch.randn(1, 1, S // cp.world, D, dtype=F64)
        context_parallel_attention(x, x, x, cp, mask_mod=mask_mod, block_size=BLOCK)
    finally:
        cpm._exchange = real
    return seen[0]


def _worker(rank, world, init, errors):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        for sharding in (Sharding.ZIGZAG, Sharding.CONTIGUOUS):
            cp = ContextParallel(S, sharding)
            for i, (name, mask_mod, score_mod) in enumerate(_cases()):
                _check_case(cp, f"{name} ({sharding.value})", mask_mod, score_mod, gqa=i % 2 == 0)
        # a narrow window under contiguous sharding: each rank receives only its left neighbour's keys
        cp = ContextParallel(S, Sharding.CONTIGUOUS)
        got = _traffic(cp, lambda b, h, q, kv: (q >= kv) & (q - kv < 8))
        assert got == (0 if rank == 0 else 1), f"rank {rank} received {got} shards for a window of 8"
        with pytest.raises(FlexcompError, match="seq_len must be a positive multiple"):
            ContextParallel(S + 1).check()
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}/{world}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process_and_the_oracle(world):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init, errors)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_sharding_pieces_and_errors():
    cp = ContextParallel(seq_len=32, sharding=Sharding.CONTIGUOUS)
    assert [cp.pieces(r, 4) for r in range(4)] == [((0, 8),), ((8, 8),), ((16, 8),), ((24, 8),)]
    z = ContextParallel(seq_len=32)
    assert [z.pieces(r, 2) for r in range(2)] == [((0, 8), (24, 8)), ((8, 8), (16, 8))]
    assert not dist.is_initialized()  # the test process itself joins no group
    with pytest.raises(FlexcompError, match="initialised torch.distributed process group"):
        cp.check()


def test_the_benchmark_runs_on_cpu_with_gloo(capsys):
    """``python -m flexcomp.bench_context_parallel``'s CPU smoke run: its own check of the sharded
    output and gradients against one process, and a timing row per mask."""
    from flexcomp.bench_context_parallel import main

    assert main(["--world", "2", "--backend", "gloo", "--seq", "256", "--heads", "2", "--dim", "16",
                 "--dtype", "float64", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for line in rows:
        import json

        row = json.loads(line)
        assert row["max_rel_err_vs_one_process"] < 1e-10 and row["tokens_per_s"] > 0
