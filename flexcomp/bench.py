"""GPU benchmark: flexcomp's kernels beside torch's compiled flex_attention, in one run.

    python -m flexcomp.bench                      # the anchors' shapes and variants, forward
    python -m flexcomp.bench --shapes 4x16x4096x128 --variants causal,softcap
    python -m flexcomp.bench --cold               # cold compile time of one variant, fresh caches

For each shape and variant it first checks both libraries against flexcomp's float32 reference
backend (relative error ``|out - ref| / |ref|``), then times each forward with
``triton.testing.do_bench`` (median) and prints TFLOP/s counted as ``../shared/anchors.md`` does:
``4 * B * H * S^2 * D * density / time``, density = the fraction of (q, kv) pairs the mask keeps.
torch's ``flex_attention`` is wrapped in ``torch.compile(dynamic=False)`` with the recompile limit
raised (at the default limit it silently falls back to an unfused path).

Not a test: it prints numbers; docs/performance.md keeps them with date, device and command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ANCHOR_SHAPES = ["4x16x4096x64", "4x16x4096x128", "1x16x16384x128"]
VARIANTS = ["full", "causal", "sliding", "alibi", "softcap", "document", "prefix"]


@dataclass(frozen=True)
class Case:
    """One benchmark case: mods written as research code writes them (as in anchors.md)."""

    name: str
    score_mod: Optional[Callable]
    mask_mod: Optional[Callable]


def make_case(name: str, B: int, H: int, S: int, device) -> Case:
    if name == "full":
        return Case(name, None, None)
    if name == "causal":
        return Case(name, None, lambda b, h, q, kv: q >= kv)
    if name == "sliding":
        return Case("sliding 1024", None, lambda b, h, q, kv: (q >= kv) & (q - kv < 1024))
    if name == "prefix":
        return Case("prefix LM 1024", None, lambda b, h, q, kv: (kv < 1024) | (q >= kv))
    if name == "alibi":
        slopes = torch.exp2(-8.0 * (torch.arange(H, device=device, dtype=torch.float32) + 1) / H)
        return Case("ALiBi + causal", lambda s, b, h, q, kv: s + slopes[h] * (kv - q), lambda b, h, q, kv: q >= kv)
    if name == "softcap":
        return Case("soft-cap + causal", lambda s, b, h, q, kv: 50 * torch.tanh(s / 50), lambda b, h, q, kv: q >= kv)
    if name == "document":
        g = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < S:
            n = int(torch.randint(64, max(65, S // 4), (1,), generator=g))
            lengths.append(min(n, S - total))
            total += lengths[-1]
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device=device, dtype=torch.int32)
        return Case("document", None, lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv))
    raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")


def _density(mask_mod, S: int, device) -> float:
    if mask_mod is None:
        return 1.0
    from flexcomp import create_mask

    rows, kept = 2048, 0
    for r in range(0, S, rows):  # bounded memory even at 16k x 16k
        m = create_mask(lambda b, h, q, kv: mask_mod(b, h, q + r, kv), 1, 1, min(rows, S - r), S, device=device)
        kept += int(m.sum())
    return kept / (S * S)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def _setup_torch_compile():
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 10_000)


SWEEP = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
         (128, 32, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4)]


def _cases(shapes: list[str], variants: list[str], dtype: torch.dtype):
    """Every (shape, variant): yields shape, its dims, fresh random q/k/v, the case and flexcomp's block mask."""
    import flexcomp

    device = torch.device("cuda")
    for shape in shapes:
        B, H, S, D = (int(x) for x in shape.split("x"))
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
        for name in variants:
            case = make_case(name, B, H, S, device)
            bm = flexcomp.create_block_mask(case.mask_mod, 1, 1, S, S, device=device) if case.mask_mod else None
            yield shape, (B, H, S, D), (q, k, v), case, bm


def sweep(shapes: list[str], variants: list[str], dtype: torch.dtype) -> None:
    """Time flexcomp's forward under each tile config of SWEEP (BLOCK_M, BLOCK_N, warps, stages)."""
    import triton

    import flexcomp

    for shape, _, (q, k, v), case, bm in _cases(shapes, variants, dtype):
        times = {}
        for bm_, bn, w, st in SWEEP:
            opts = {"BLOCK_M": bm_, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            try:
                with torch.no_grad():
                    times[(bm_, bn, w, st)] = triton.testing.do_bench(
                        lambda: flexcomp.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm,
                                                        kernel_options=opts), warmup=10, rep=40, return_mode="median")
            except Exception as e:  # out of shared memory and the like: report and go on
                times[(bm_, bn, w, st)] = float("nan")
                print(f"  {shape} {case.name} {opts}: {type(e).__name__}", flush=True)
        best = min((t, c) for c, t in times.items() if t == t)
        print(json.dumps({"shape": shape, "variant": case.name, "best": best[1], "best_ms": best[0],
                          "all_ms": {str(c): round(t, 4) for c, t in times.items()}}), flush=True)


def run(shapes: list[str], variants: list[str], dtype: torch.dtype, check: bool) -> list[dict]:
    import triton
    from torch.nn.attention import flex_attention as tf

    import flexcomp

    _setup_torch_compile()
    torch_flex = torch.compile(tf.flex_attention, dynamic=False)
    device = torch.device("cuda")
    rows = []
    for shape, (B, H, S, D), (q, k, v), case, ours_bm in _cases(shapes, variants, dtype):
        theirs_bm = tf.create_block_mask(case.mask_mod, 1, 1, S, S, device=device) if case.mask_mod else None

        def ours():
            return flexcomp.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=ours_bm)

        def theirs():
            return torch_flex(q, k, v, score_mod=case.score_mod, block_mask=theirs_bm)

        row = {"shape": shape, "variant": case.name, "dtype": str(dtype).replace("torch.", "")}
        with torch.no_grad():
            t0 = time.perf_counter()
            out = ours()
            torch.cuda.synchronize()
            row["flexcomp_first_call_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tout = theirs()
            torch.cuda.synchronize()
            row["torch_first_call_s"] = time.perf_counter() - t0
            if check:
                n = min(S, 2048)  # the float32 reference on the first queries keeps it quick
                ref = _reference_rows(flexcomp, q, k, v, case, n)
                row["flexcomp_rel_err"] = _rel(out[:, :, :n], ref)
                row["torch_rel_err"] = _rel(tout[:, :, :n], ref)
                row["nan"] = bool(torch.isnan(out).any())
            density = _density(case.mask_mod, S, device)
            flops = 4 * B * H * S * S * D * density
            t_ours = triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median")
            t_theirs = triton.testing.do_bench(theirs, warmup=25, rep=100, return_mode="median")
            row["flexcomp_host_us"], row["torch_host_us"] = _host_us(ours), _host_us(theirs)
        row.update(density=density, flexcomp_ms=t_ours, torch_ms=t_theirs,
                   flexcomp_tflops=flops / t_ours / 1e9, torch_tflops=flops / t_theirs / 1e9,
                   ratio=t_theirs / t_ours)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _host_us(fn, n: int = 20) -> float:
    """CPU time of one call (launch overhead): n calls queued without waiting for the GPU."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _reference_rows(flexcomp, q, k, v, case: Case, rows: int) -> torch.Tensor:
    """flexcomp's float32 reference backend for the first ``rows`` queries."""
    ref_bm = flexcomp.create_block_mask(case.mask_mod, 1, 1, rows, k.shape[2], device=q.device) if case.mask_mod else None
    return flexcomp.flex_attention(q[:, :, :rows].float(), k.float(), v.float(), score_mod=case.score_mod,
                                   block_mask=ref_bm, kernel_options={"BACKEND": "reference"})


def cold_compile() -> dict:
    """First-call time of flexcomp and of torch.compile(flex_attention), each in a fresh process
    with empty Triton / Inductor caches: causal + soft-cap, 2x8x2048x64 bf16, forward."""
    code = r"""
import os, sys, time, torch
which = sys.argv[1]
q, k, v = (torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
causal = lambda b, h, q_, kv: q_ >= kv
soft = lambda s, b, h, q_, kv: 30 * torch.tanh(s / 30)
torch.cuda.synchronize()
if which == "flexcomp":
    import flexcomp
    bm = flexcomp.create_block_mask(causal, 1, 1, 2048, 2048, device="cuda")
    t0 = time.perf_counter(); flexcomp.flex_attention(q, k, v, score_mod=soft, block_mask=bm)
else:
    from torch.nn.attention import flex_attention as tf
    bm = tf.create_block_mask(causal, 1, 1, 2048, 2048, device="cuda")
    f = torch.compile(tf.flex_attention, dynamic=False)
    t0 = time.perf_counter(); f(q, k, v, score_mod=soft, block_mask=bm)
torch.cuda.synchronize(); print(time.perf_counter() - t0)
"""
    out = {}
    for which in ("flexcomp", "torch"):
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(d, "triton"), TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "ind"),
                       TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
            r = subprocess.run([sys.executable, "-c", code, which], capture_output=True, text=True, env=env, timeout=600)
            out[which] = float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r.stderr[-2000:]
    print(json.dumps({"cold_compile_forward_s": out}), flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| B×H×S×D | variant | flexcomp TFLOP/s | torch flex TFLOP/s | ratio | rel err flexcomp / torch | host µs flexcomp / torch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['flexcomp_rel_err']:.1e} / {r['torch_rel_err']:.1e}" if "flexcomp_rel_err" in r else ""
        lines.append(f"| {r['shape'].replace('x', '×')} | {r['variant']} | {r['flexcomp_tflops']:.0f} | "
                     f"{r['torch_tflops']:.0f} | {r['ratio']:.2f} | {err} | "
                     f"{r['flexcomp_host_us']:.0f} / {r['torch_host_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(ANCHOR_SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--cold", action="store_true", help="also measure cold compile times")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--sweep", action="store_true", help="time flexcomp under several tile configs instead")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("flexcomp.bench needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if a.sweep:
        sweep(a.shapes.split(","), a.variants.split(","), getattr(torch, a.dtype))
        return 0
    rows = run(a.shapes.split(","), a.variants.split(","), getattr(torch, a.dtype), not a.no_check)
    cold = cold_compile() if a.cold else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "cold": cold, "device": torch.cuda.get_device_name()}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
