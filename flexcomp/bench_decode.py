"""GPU benchmark of a decoding step: flexcomp's split-KV decode kernels beside torch's compiled
``flex_attention`` (its own decode kernel) in one run, contiguous and through a paged cache.

    python -m flexcomp.bench_decode                   # the cases below, bf16
    python -m flexcomp.bench_decode --json out.json

Cases (``CASES``): batch, query / key-value heads and cached tokens; one query token at the end of
the cache, head dim 128, causal (the step's BlockMask, built once outside the timing as a decode
loop slices it). ``paged``: the same cache in pages of ``PAGE`` tokens, shuffled, each library's
``PagedAttention`` converting the logical mask. Reported: K+V bytes read per second (TB/s) from the
median time of ``triton.testing.do_bench`` (launches queued from Python: host cost included) and of
``do_bench_cudagraph`` (the call captured in a CUDA graph, as servers run decode steps: kernels
only); the relative difference of the outputs; and the per-step host cost of the mask update (a
64k-token BlockMask sliced at the step's row, its mask_mod and lengths set; beside it a new
``create_block_mask`` of the step's one row with the offset, as transformers builds one), in
microseconds.
Not a test: it prints numbers; docs/performance.md keeps them with date, device and command.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings

import torch

CASES = ((8, 32, 8, 8192), (8, 32, 8, 65536), (8, 28, 4, 32768))  # batch, Hq, Hkv, cached tokens
DIM, PAGE, BLOCK = 128, 64, 128
SLICE_STEPS = 2000  # steps timed for the mask update's host cost
WARMUP_BUILDS = 20  # untimed create_block_mask calls before timing them


def _bench(fn, graph: bool) -> float | None:
    import triton

    try:
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
    except Exception as e:  # a call that cannot be captured: reported, not raised
        how = "graph" if graph else "queued"
        print(f"  ({how} timing failed: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return None


def _tbps(nbytes: int, ms: float | None) -> float | None:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _paged(lib_paged, B: int, S: int, Hkv: int, k: torch.Tensor, v: torch.Tensor):
    """A paged cache of ``lib_paged`` holding ``k`` / ``v`` ``[B, Hkv, S, D]`` on shuffled pages."""
    n_pages = B * S // PAGE
    paged = lib_paged(n_pages, PAGE, B, device="cuda")
    random.Random(0).shuffle(paged.empty_pages)
    k_cache = torch.empty(1, Hkv, n_pages * PAGE, DIM, device="cuda", dtype=k.dtype)
    v_cache = torch.empty_like(k_cache)
    pos = torch.arange(S, device="cuda").view(1, -1)
    for b in range(B):
        idx = torch.tensor([b], device="cuda")
        paged.reserve(idx, torch.tensor(S, device="cuda"))
        paged.assign(idx, pos, k[b:b + 1], v[b:b + 1], k_cache, v_cache)
    return paged, k_cache, v_cache


def case(B: int, Hq: int, Hkv: int, S: int, dtype: torch.dtype) -> list[dict]:
    from torch.nn.attention import flex_attention as tfa
    from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPaged

    import flexcomp
    from flexcomp.paged import PagedAttention

    q = torch.randn(B, Hq, 1, DIM, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, S, DIM, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, S, DIM, device="cuda", dtype=dtype)
    offset = torch.tensor(S - 1, device="cuda")

    def step_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    nbytes = 2 * B * Hkv * S * DIM * k.element_size()
    compiled = torch.compile(tfa.flex_attention, dynamic=False)
    ours_bm = flexcomp.create_block_mask(step_mask, 1, 1, 1, S, device="cuda", BLOCK_SIZE=(BLOCK, BLOCK))
    theirs_bm = tfa.create_block_mask(step_mask, 1, 1, 1, S, device="cuda", BLOCK_SIZE=(BLOCK, BLOCK))
    rows = []
    calls = {
        "contiguous": (lambda: flexcomp.flex_attention(q, k, v, block_mask=ours_bm, enable_gqa=True),
                       lambda: compiled(q, k, v, block_mask=theirs_bm, enable_gqa=True)),
    }
    ours_p, ours_kc, ours_vc = _paged(PagedAttention, B, S, Hkv, k, v)
    theirs_p, theirs_kc, theirs_vc = _paged(TorchPaged, B, S, Hkv, k, v)
    logical = flexcomp.create_block_mask(step_mask, B, 1, 1, S, device="cuda", BLOCK_SIZE=(BLOCK, PAGE))
    t_logical = tfa.create_block_mask(step_mask, B, 1, 1, S, device="cuda", BLOCK_SIZE=(BLOCK, PAGE))
    ours_pbm = ours_p.convert_logical_block_mask(logical)
    theirs_pbm = theirs_p.convert_logical_block_mask(t_logical)
    calls[f"paged {PAGE}"] = (
        lambda: flexcomp.flex_attention(q, ours_kc, ours_vc, block_mask=ours_pbm, enable_gqa=True),
        lambda: compiled(q, theirs_kc, theirs_vc, block_mask=theirs_pbm, enable_gqa=True))
    want = None
    for name, (ours, theirs) in calls.items():
        out, tout = ours(), theirs()
        want = tout if want is None else want
        row = {"case": f"{B}x{Hq}/{Hkv}x{S} {name}", "rel_err_vs_torch": _rel(out, tout),
               "rel_err_vs_contiguous_torch": _rel(out, want)}
        for who, fn in (("flexcomp", ours), ("torch", theirs)):
            for graph in (False, True):
                ms = _bench(fn, graph)
                row[f"{who}_{'graph' if graph else 'queued'}_ms"] = ms
                row[f"{who}_{'graph' if graph else 'queued'}_tbps"] = _tbps(nbytes, ms)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def slice_cost() -> dict:
    """Host microseconds per decode step's mask update on a 64k-token causal BlockMask."""
    import flexcomp

    S = 65536
    full = flexcomp.create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, S, S, device="cuda")

    def causal(b, h, q, kv):
        return q >= kv

    positions = torch.arange(S - SLICE_STEPS, S, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(SLICE_STEPS):
        pos = S - SLICE_STEPS + i
        m = full[:, :, pos // BLOCK]
        offset = positions[i]
        m.mask_mod = lambda b, h, q, kv, offset=offset: causal(b, h, q + offset, kv)
        m.seq_lengths = (1, S)
    torch.cuda.synchronize()
    sliced = (time.perf_counter() - t) / SLICE_STEPS * 1e6
    builds = SLICE_STEPS // 20  # transformers' way: a new create_block_mask of (1, S) with the offset each step

    def build(i: int) -> None:
        offset = positions[i]
        flexcomp.create_block_mask(lambda b, h, q, kv, offset=offset: causal(b, h, q + offset, kv), 1, None, 1, S,
                                   device="cuda")

    for i in range(WARMUP_BUILDS):  # the classify kernel's compiles (offsets of every alignment) stay out
        build(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(WARMUP_BUILDS, WARMUP_BUILDS + builds):
        build(i)
    torch.cuda.synchronize()
    row = {"case": "mask update per step, 64k", "sliced_us": sliced,
           "create_block_mask_us": (time.perf_counter() - t) / builds * 1e6}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA device", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 1000
    rows = [slice_cost()]
    for B, Hq, Hkv, S in CASES:
        rows += case(B, Hq, Hkv, S, getattr(torch, args.dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
