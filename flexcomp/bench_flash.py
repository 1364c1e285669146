"""GPU benchmark of the migration APIs: ``flash_attn_varlen_func`` beside torch's compiled
``flex_attention`` on the same document mask, and the cost of attention dropout, in one run.

    python -m flexcomp.bench_flash                    # the cases below, bf16
    python -m flexcomp.bench_flash --json out.json

Cases:

- ``varlen``: ``DOCS`` documents of ragged length (seeded) packed in ``TOKENS`` tokens, ``HEADS``
  heads of dim ``DIM``, causal. flexcomp: ``flexcomp.flash_attn.flash_attn_varlen_func`` as a
  training step calls it. torch:
  ``torch.compile(flex_attention)`` with a document-causal BlockMask built once, outside the timing
  (its kernel alone). Forward (no grad) and forward + backward, milliseconds, medians of
  ``triton.testing.do_bench``. flexcomp twice: with one ``cu_seqlens`` tensor throughout (a model's
  layers share it: the packing is built once) and with a fresh tensor every call (``fresh_packing``:
  the BlockMask built from ``cu_seqlens`` inside every call).
- ``dropout``: ``flash_attn_func`` at ``DROP_SHAPE``, causal, ``dropout_p`` 0 and ``DROP_P``: the
  ratio of the two times, forward and forward + backward.

Checks: the varlen output against torch's (relative error), the dropout output against flexcomp's
float32 reference backend with the same seed (the reference reproduces the kernels' keep pattern).
Not a test: it prints numbers; docs/performance.md keeps them with date, device and command.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

DOCS, TOKENS, HEADS, DIM = 64, 32768, 16, 128
DROP_SHAPE = (4, 4096, 16, 128)  # batch, seqlen, heads, headdim (flash-attn's layout)
DROP_P = 0.1
SEED = 0


def _lengths(total: int, docs: int) -> list[int]:
    """``docs`` ragged lengths (each at least 1) summing to ``total``."""
    g = torch.Generator().manual_seed(SEED)
    cuts = torch.randperm(total - 1, generator=g)[:docs - 1].sort().values + 1
    bounds = [0, *cuts.tolist(), total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def varlen(dtype: torch.dtype) -> dict:
    """flexcomp's varlen function against torch's compiled flex_attention on the same mask."""
    from torch.nn.attention import flex_attention as tfa

    from flexcomp.flash_attn import flash_attn_varlen_func

    lens = _lengths(TOKENS, DOCS)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(TOKENS, HEADS, DIM, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))

    def doc_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    bm = tfa.create_block_mask(doc_causal, 1, 1, TOKENS, TOKENS, device="cuda")
    compiled = torch.compile(tfa.flex_attention, dynamic=False)

    def ours():
        return flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)

    def theirs():
        return compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm)

    out = ours()
    tout = theirs()[0].transpose(0, 1)
    row = {"case": f"varlen {DOCS} docs in {TOKENS}", "rel_err_vs_torch": _rel(out, tout)}
    with torch.no_grad():
        row["flexcomp_fwd_ms"] = _bench(ours)
        row["torch_fwd_ms"] = _bench(theirs)
    row["flexcomp_fwdbwd_ms"] = _bench(lambda: torch.autograd.grad(ours(), (q, k, v), do))
    row["torch_fwdbwd_ms"] = _bench(lambda: torch.autograd.grad(theirs(), (q, k, v), do.transpose(0, 1)[None]))

    def fresh():  # a new cu_seqlens tensor every call: the packing's BlockMask built inside the call
        c = cu.clone()
        return flash_attn_varlen_func(q, k, v, c, c, max(lens), max(lens), causal=True)

    with torch.no_grad():
        row["flexcomp_fresh_packing_fwd_ms"] = _bench(fresh)
    row["flexcomp_fresh_packing_fwdbwd_ms"] = _bench(lambda: torch.autograd.grad(fresh(), (q, k, v), do))
    return row


def dropout(dtype: torch.dtype) -> dict:
    """The cost of dropout_p = DROP_P over none, and its check against the reference backend."""
    import os

    from flexcomp.flash_attn import flash_attn_func

    B, L, H, D = DROP_SHAPE
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    row = {"case": f"dropout {DROP_P} at {'x'.join(map(str, DROP_SHAPE))}"}
    torch.manual_seed(SEED)
    out = flash_attn_func(q, k, v, dropout_p=DROP_P, causal=True)
    os.environ["FLEXCOMP_BACKEND"] = "reference"
    try:
        torch.manual_seed(SEED)
        ref = flash_attn_func(q[:1].float(), k[:1].float(), v[:1].float(), dropout_p=DROP_P, causal=True)
    finally:
        del os.environ["FLEXCOMP_BACKEND"]
    row["rel_err_vs_reference"] = _rel(out[:1], ref)
    for p in (0.0, DROP_P):
        def call(p=p):
            return flash_attn_func(q, k, v, dropout_p=p, causal=True)
        with torch.no_grad():
            row[f"fwd_ms_p{p}"] = _bench(call)
        row[f"fwdbwd_ms_p{p}"] = _bench(lambda call=call: torch.autograd.grad(call(), (q, k, v), do))
    row["fwd_cost"] = row[f"fwd_ms_p{DROP_P}"] / row["fwd_ms_p0.0"] - 1
    row["fwdbwd_cost"] = row[f"fwdbwd_ms_p{DROP_P}"] / row["fwdbwd_ms_p0.0"] - 1
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("flexcomp.bench_flash needs a CUDA GPU (torch.cuda.is_available() is False)")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch._dynamo.config.recompile_limit = 64
    dtype = getattr(torch, a.dtype)
    rows = []
    for case in (varlen, dropout):
        try:
            rows.append(case(dtype))
        except Exception as e:  # a case that raises is reported, the others still run
            rows.append({"case": case.__name__, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
