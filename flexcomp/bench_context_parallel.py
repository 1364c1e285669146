"""Benchmark and example of context parallel attention (:mod:`flexcomp.context_parallel`): one
sequence sharded over ``--world`` processes, forward + backward per step, against one process
holding the whole sequence, in one run.

    python -m flexcomp.bench_context_parallel --world 8                     # GPUs, NCCL, 128k tokens
    python -m flexcomp.bench_context_parallel --world 2 --backend gloo --seq 1024 --heads 2 --dim 32 \\
        --dtype float32                                                     # CPU smoke run

Each case (``--masks``: causal, document) first checks the sharded output and gradients against the
one-process result at ``--check-seq`` tokens, then times ``--reps`` steps at ``--seq`` tokens:
tokens per second of the group, and the scaling efficiency ``t_one / (world * t_group)``
(``t_one``: one process on the whole sequence; measured when it fits, else reported as missing).
``--max-seq`` also doubles the sequence until a step no longer fits. Zig-zag sharding, the
BlockMasks built once per case (a training step with a fixed mask). Prints one JSON line per case
and a table; it is not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = ("causal", "document")


def _mask(name: str, seq: int, device):
    """The case's mask_mod over global positions (documents: seeded ragged lengths)."""
    if name == "causal":
        return lambda b, h, q, kv: q >= kv
    g = torch.Generator().manual_seed(0)
    cuts = torch.randperm(seq - 1, generator=g)[:max(1, seq // 4096) - 1].sort().values + 1
    bounds = torch.tensor([0, *cuts.tolist(), seq])
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds[1:] - bounds[:-1]).to(device)
    return lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)


def _tensors(seq: int, a, device, dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(1, a.heads, seq, a.dim, generator=g).to(device, dtype) for _ in range(4)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_time(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _worker(rank: int, a, init: str, out_queue):
    from flexcomp import flex_attention
    from flexcomp.blockmask_build import create_block_mask
    from flexcomp.context_parallel import ContextParallel, context_parallel_attention, shard

    device = torch.device("cuda", rank) if a.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.world))
    dtype = getattr(torch, a.dtype)
    dist.init_process_group(a.backend, init_method=init, rank=rank, world_size=a.world)
    try:
        for case in a.masks.split(","):
            row = {"case": case, "world": a.world, "seq": a.seq, "heads": a.heads, "dim": a.dim, "dtype": a.dtype}
            # correctness at check_seq: sharded against one process, output and gradients
            cp = ContextParallel(a.check_seq)
            mask = _mask(case, a.check_seq, device)
            q, k, v, do = _tensors(a.check_seq, a, device, dtype, 1)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            bm = create_block_mask(mask, None, None, a.check_seq, a.check_seq, device=device)
            whole = flex_attention(*leaves, block_mask=bm)
            want = torch.autograd.grad(whole, leaves, do)
            local = [shard(t, cp).requires_grad_() for t in (q, k, v)]
            out = context_parallel_attention(*local, cp, mask_mod=mask)
            got = torch.autograd.grad(out, local, shard(do, cp))
            errs = []
            for x, y in zip((out, *got), (whole, *want)):
                x, y = x.detach().float(), shard(y.detach(), cp).float()
                errs.append(float((x - y).norm() / y.norm().clamp_min(1e-30)))
            row["max_rel_err_vs_one_process"] = max(errs)
            # timing at seq
            cp = ContextParallel(a.seq)
            mask = _mask(case, a.seq, device)
            q, k, v, do = (shard(t, cp) for t in _tensors(a.seq, a, device, dtype, 2))
            local = [t.requires_grad_() for t in (q, k, v)]

            def step():
                o = context_parallel_attention(*local, cp, mask_mod=mask)
                torch.autograd.grad(o, local, do)

            t_group = _step_time(step, device, a.reps)
            dist.barrier()
            row["group_step_s"] = t_group
            row["tokens_per_s"] = a.seq / t_group
            if rank == 0:
                try:  # one process, the whole sequence
                    q1, k1, v1, do1 = _tensors(a.seq, a, device, dtype, 2)
                    leaves = [t.requires_grad_() for t in (q1, k1, v1)]
                    bm1 = create_block_mask(mask, None, None, a.seq, a.seq, device=device)
                    t_one = _step_time(lambda: torch.autograd.grad(flex_attention(*leaves, block_mask=bm1), leaves,
                                                                   do1), device, a.reps)
                    row["one_process_step_s"] = t_one
                    row["scaling_efficiency"] = t_one / (a.world * t_group)
                except torch.cuda.OutOfMemoryError:
                    row["one_process_step_s"] = None
            dist.barrier()
            if a.max_seq and device.type == "cuda":
                row["largest_seq_that_fits"] = _largest(a, device, dtype, case)
            if rank == 0:
                out_queue.put(row)
    finally:
        dist.destroy_process_group()


def _largest(a, device, dtype, case) -> int:
    """Double the sequence from ``--seq`` until a step runs out of memory on some rank."""
    from flexcomp.context_parallel import ContextParallel, context_parallel_attention

    seq, fits = a.seq, 0
    while True:
        cp = ContextParallel(seq)
        ok = torch.ones(1, device=device)
        try:
            mask = _mask(case, seq, device)
            local = [torch.randn(1, a.heads, seq // a.world, a.dim, device=device, dtype=dtype, requires_grad=True)
                     for _ in range(3)]
            o = context_parallel_attention(*local, cp, mask_mod=mask)
            torch.autograd.grad(o, local, torch.ones_like(o))
            del o, local
        except torch.cuda.OutOfMemoryError:
            ok.zero_()
        torch.cuda.empty_cache()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok):
            return fits
        fits, seq = seq, seq * 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl" if torch.cuda.is_available() else "gloo")
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--check-seq", type=int, default=None, help="tokens of the correctness check (default: 4096)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "float64"])
    p.add_argument("--masks", default=",".join(CASES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-seq", action="store_true", help="also find the largest sequence that fits (GPUs)")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    a.check_seq = a.check_seq or min(a.seq, 4096)
    unit = 2 * a.world
    for name in ("seq", "check_seq"):
        if getattr(a, name) % unit:
            raise SystemExit(f"--{name.replace('_', '-')} must be a multiple of 2 * world = {unit}")
    if a.backend == "nccl" and torch.cuda.device_count() < a.world:
        raise SystemExit(f"--world {a.world} with nccl needs as many GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    rows = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, a, init, rows)) for r in range(a.world)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join()
    if any(pr.exitcode for pr in procs):
        raise SystemExit(f"a rank failed: exit codes {[pr.exitcode for pr in procs]}")
    results = []
    while not rows.empty():
        results.append(rows.get())
    for r in results:
        print(json.dumps(r), flush=True)
    print("| case | world | tokens | tokens/s | step s (group / one process) | scaling efficiency | rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        one = r.get("one_process_step_s")
        eff = r.get("scaling_efficiency")
        print(f"| {r['case']} | {r['world']} | {r['seq']} | {r['tokens_per_s']:.0f} | {r['group_step_s']:.4f} / "
              f"{'—' if one is None else f'{one:.4f}'} | {'—' if eff is None else f'{eff:.2f}'} | "
              f"{r['max_rel_err_vs_one_process']:.1e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results and all(math.isfinite(r["max_rel_err_vs_one_process"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
