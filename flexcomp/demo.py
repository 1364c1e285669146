"""The main job: every variant of flexcomp.masks through the whole pipeline, checked and printed.

    python -m flexcomp.demo            # about a minute on 2 CPU cores

For each variant it prints the traced IR and the block map, runs forward and backward on the
reference backend and compares output, LSE and dq/dk/dv with the dense float64 oracle
(:mod:`flexcomp.testing`) and the forward with torch's eager ``flex_attention``; then it runs the
generated Triton kernels, forward and backward (on a GPU, or in Triton's interpreter on a CPU),
and compares them too. It ends with a 65,536-token block mask and a 16,384-token CPU training step. Exit status 1
if any check fails.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

# Triton's interpreter trips numpy deprecations and overflows in exp on -inf tiles: not ours to show
warnings.filterwarnings("ignore", category=DeprecationWarning, module="triton")
warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)

from . import and_masks, create_block_mask, flex_attention, or_masks
from .ir import ModKind
from .masks import alibi, causal_mask, document_mask, padding_mask, prefix_lm, sliding_window, softcap
from .testing import dense_attention, grads, rand_qkv
from .trace import trace


@dataclass(frozen=True)
class Variant:
    """One demo case: a name, a score_mod and a mask_mod (either may be None)."""

    name: str
    score_mod: Optional[Callable]
    mask_mod: Optional[Callable]


def variants(S: int, H: int) -> list[Variant]:
    docs = [S // 4, S // 2, S - S // 4 - S // 2]
    return [
        Variant("full", None, None),
        Variant("causal", None, causal_mask),
        Variant("sliding window 64", None, sliding_window(64)),
        Variant("prefix LM 48", None, prefix_lm(48)),
        Variant("document (causal inside)", None, document_mask(docs)),
        Variant("padding lengths[b]", None, padding_mask([S - 37, S // 3])),
        Variant("ALiBi + causal", alibi(H), causal_mask),
        Variant("soft-cap 20 + causal", softcap(20.0), causal_mask),
        Variant("ALiBi + sliding & document", alibi(H), and_masks(sliding_window(32), document_mask(docs))),
        Variant("soft-cap + (prefix | window)", softcap(5.0), or_masks(prefix_lm(16), sliding_window(8))),
    ]


def _torch_eager(q, k, v, score_mod, mask_mod, B, H, S):
    from torch.nn.attention import flex_attention as tf

    bm = tf.create_block_mask(mask_mod, B, H, S, S, device="cpu", BLOCK_SIZE=64) if mask_mod else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return tf.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod, block_mask=bm,
                                     return_lse=True)


def check(v: Variant, B: int, H: int, S: int, D: int, show: bool) -> bool:
    """Run one variant; print what it is and how far it is from the oracles."""
    print(f"\n=== {v.name} ===")
    if show:
        for kind, fn in ((ModKind.SCORE, v.score_mod), (ModKind.MASK, v.mask_mod)):
            if fn is not None:
                print(trace(fn, kind).graph)
    q, k, val = rand_qkv(B, H, S, S, D)
    bm = create_block_mask(v.mask_mod, B, H, S, S, device="cpu", BLOCK_SIZE=64) if v.mask_mod else None
    if bm is not None and show:
        print(f"block map of (b, h) = (0, 0), {bm.BLOCK_SIZE} blocks:")
        print(bm[0, 0].to_string().strip())
    t0 = time.perf_counter()
    out, lse = flex_attention(q, k, val, score_mod=v.score_mod, block_mask=bm, return_lse=True)
    got = grads((out, lse), (q, k, val))
    elapsed = time.perf_counter() - t0
    ro, rl = dense_attention(q, k, val, v.score_mod, v.mask_mod)
    want = grads((ro, rl), (q, k, val))
    to, tl = _torch_eager(q, k, val, v.score_mod, v.mask_mod, B, H, S)

    def err(a, b):
        fin = torch.isfinite(b)
        if not torch.equal(fin, torch.isfinite(a)):
            return math.inf
        return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0

    errs = {"out": err(out, ro), "lse": err(lse, rl), "dq": err(got[0], want[0]), "dk": err(got[1], want[1]),
            "dv": err(got[2], want[2]), "torch out": err(out, to), "torch lse": err(lse, tl)}
    ok = all(e < 1e-9 for e in errs.values())
    # the generated Triton kernels, forward and backward, in float32 (no float64 dot on GPUs either)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q32, k32, v32 = (t.detach().float().to(dev).requires_grad_() for t in (q, k, val))
    bm32 = create_block_mask(v.mask_mod, B, H, S, S, device=dev, BLOCK_SIZE=64) if v.mask_mod else None
    t0 = time.perf_counter()
    tout, tlse = flex_attention(q32, k32, v32, score_mod=v.score_mod, block_mask=bm32, return_lse=True,
                                kernel_options={"BACKEND": "triton"})
    tgot = [g.double().cpu() for g in grads((tout, tlse), (q32, k32, v32))]
    t_triton = time.perf_counter() - t0
    kerr = {"triton out": err(tout.detach().double().cpu(), ro), "triton lse": err(tlse.detach().double().cpu(), rl),
            "triton dq": err(tgot[0], want[0]), "triton dk": err(tgot[1], want[1]), "triton dv": err(tgot[2], want[2])}
    ok = ok and all(e < 1e-4 for e in kerr.values())
    errs.update(kerr)
    sparsity = f"{bm.sparsity():5.1f}%" if bm is not None else "  0.0%"
    print(f"sparsity {sparsity}  reference fwd+bwd {elapsed * 1e3:6.1f} ms  triton fwd+bwd {t_triton * 1e3:6.0f} ms"
          f"{' (interpreter)' if dev == 'cpu' else ''}\n  max |error| " +
          "  ".join(f"{k} {e:.1e}" for k, e in errs.items()) + ("  OK" if ok else "  FAIL"))
    return ok


def long_sequences() -> bool:
    """A 65,536-token causal block mask and a 16,384-token CPU training step, with timings and RSS."""
    print("\n=== long sequences (no S x S tensor anywhere) ===")
    t0 = time.perf_counter()
    bm = create_block_mask(causal_mask, 1, 1, 65536, 65536, device="cpu")
    t1 = time.perf_counter()
    n_partial, n_full = int(bm.kv_num_blocks.sum()), int(bm.full_kv_num_blocks.sum())
    print(f"create_block_mask(causal, 65536 x 65536): {(t1 - t0) * 1e3:.0f} ms, "
          f"{n_partial} partial + {n_full} full blocks of 128x128")
    S = 16384
    q, k, v = (torch.randn(1, 2, S, 32, requires_grad=True) for _ in range(3))
    bm = create_block_mask(and_masks(causal_mask, sliding_window(2048)), 1, 2, S, S, device="cpu")
    t0 = time.perf_counter()
    out = flex_attention(q, k, v, score_mod=softcap(30.0), block_mask=bm)
    out.square().mean().backward()
    t1 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ok = n_partial == 512 and n_full == 130816 and bool(torch.isfinite(q.grad).all())
    print(f"CPU training step, 1x2x{S}x32 fp32, soft-cap + causal sliding window 2048: "
          f"{t1 - t0:.1f} s, peak RSS of this process {rss:.0f} MiB "
          f"(one {S}x{S} fp32 score matrix alone would be {S * S * 4 / 2**20:.0f} MiB)  {'OK' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="do not print IRs and block maps")
    p.add_argument("--skip-long", action="store_true", help="skip the long-sequence checks")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"flexcomp demo: B={a.batch} H={a.heads} S={a.seq} D={a.head_dim}, float64, reference backend; "
          f"oracles: dense float64 attention calling the mods directly, and torch {torch.__version__} eager "
          f"flex_attention (forward)")
    results = [check(v, a.batch, a.heads, a.seq, a.head_dim, not a.quiet) for v in variants(a.seq, a.heads)]
    if not a.skip_long:
        results.append(long_sequences())
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
