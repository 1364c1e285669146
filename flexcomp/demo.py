"""The main job: every variant of flexcomp.masks through the whole pipeline, checked and printed.

    python -m flexcomp.demo            # about 30 s on 2 CPU cores

For each variant it prints the traced IR and the block map, runs forward and backward on the
reference backend and compares output, LSE and dq/dk/dv with the dense float64 oracle
(:mod:`flexcomp.testing`) and the forward with torch's eager ``flex_attention``; then it runs the
generated Triton kernels, forward and backward (on a GPU, or in Triton's interpreter on a CPU),
and compares them too. Each variant's result line is printed as soon as it is done. It ends with
a 65,536-token block mask, a 16,384-token CPU training step, a summary table (one row per variant
and per long-sequence check: checks passed, largest errors, pass/fail) and the closing
``N passed, N failed`` line. Exit status 1 if any check fails (an exception fails its row only).

Run from the root of a checkout with a non-editable install, ``python -m`` finds the source folder
``flexcomp/`` in the current directory before the installed package (and that folder lacks
``flexcomp.masks`` and ``flexcomp.codegen``): use ``PYTHONSAFEPATH=1 python -m flexcomp.demo``
there, as the README does.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Triton's interpreter trips numpy deprecations and overflows in exp on -inf tiles: not ours to show
from . import and_masks, create_block_mask, flex_attention, or_masks
from .ir import ModKind

try:
    from .masks import alibi, causal_mask, document_mask, padding_mask, prefix_lm, sliding_window, softcap
except ModuleNotFoundError as e:  # pragma: no cover - only in a shadowed checkout
    if not (e.name or "").startswith("flexcomp."):
        raise
    here = os.path.dirname(os.path.abspath(__file__))
    raise SystemExit(
        f"flexcomp.demo: cannot import {e.name}: Python took flexcomp from the source folder {here},\n"
        "which holds only part of the package (codegen/ and masks/ are mapped into it at install). With a\n"
        "non-editable install, run `PYTHONSAFEPATH=1 python -m flexcomp.demo` (the current folder then\n"
        "stays off sys.path) or run it from another folder; or install with `pip install -e .`.") from e
from .testing import dense_attention, grads, rand_qkv
from .trace import trace

REF_TOL = 1e-9     # reference backend (float64) against the float64 oracle and torch's eager forward
TRITON_TOL = 1e-4  # Triton kernels (float32) against the float64 oracle


def say(*args, **kwargs) -> None:
    """print, flushed: the demo's output is its progress report, also through a pipe or into a log."""
    print(*args, **kwargs, flush=True)


@dataclass
class Result:
    """One row of the summary: what ran, how many checks passed, the largest error of each group."""

    name: str
    checks: int = 0
    passed: int = 0
    groups: dict = field(default_factory=dict)  # group -> max |error| (or a short text)
    seconds: float = 0.0
    error: Optional[str] = None  # an exception that stopped the row

    @property
    def ok(self) -> bool:
        return self.error is None and self.checks > 0 and self.passed == self.checks

    def add(self, group: str, errors: dict, tol: float) -> None:
        """Record ``errors`` (name -> max |error|) as checks against ``tol`` under ``group``."""
        self.checks += len(errors)
        self.passed += sum(e < tol for e in errors.values())
        self.groups[group] = max(errors.values())


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


def _err(a, b) -> float:
    """max |a - b| over the finite entries of ``b``; inf where a and b are not finite at the same places."""
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return math.inf
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def check(v: Variant, B: int, H: int, S: int, D: int, show: bool, triton_seq: int) -> Result:
    """Run one variant; print what it is and how far it is from the oracles."""
    r = Result(v.name)
    if show:
        for kind, fn in ((ModKind.SCORE, v.score_mod), (ModKind.MASK, v.mask_mod)):
            if fn is not None:
                say(trace(fn, kind).graph)
    t_start = time.perf_counter()
    q, k, val = rand_qkv(B, H, S, S, D)
    bm = create_block_mask(v.mask_mod, B, H, S, S, device="cpu", BLOCK_SIZE=64) if v.mask_mod else None
    if bm is not None and show:
        say(f"block map of (b, h) = (0, 0), {bm.BLOCK_SIZE} blocks:")
        say(bm[0, 0].to_string().strip())
    t0 = time.perf_counter()
    out, lse = flex_attention(q, k, val, score_mod=v.score_mod, block_mask=bm, return_lse=True)
    got = grads((out, lse), (q, k, val))
    elapsed = time.perf_counter() - t0
    ro, rl = dense_attention(q, k, val, v.score_mod, v.mask_mod)
    want = grads((ro, rl), (q, k, val))
    to, tl = _torch_eager(q, k, val, v.score_mod, v.mask_mod, B, H, S)
    ref = {"out": _err(out, ro), "lse": _err(lse, rl), "dq": _err(got[0], want[0]), "dk": _err(got[1], want[1]),
           "dv": _err(got[2], want[2])}
    vs_torch = {"torch out": _err(out, to), "torch lse": _err(lse, tl)}
    r.add("ref", ref, REF_TOL)
    r.add("torch", vs_torch, REF_TOL)
    # the generated Triton kernels, forward and backward, in float32 (no float64 dot on GPUs either);
    # on a CPU they run in Triton's interpreter, whose time grows with S^2: the first triton_seq
    # queries and keys of the same inputs, against the oracle on those
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    St = S if dev == "cuda" else min(S, triton_seq)
    qt, kt, vt = (t.detach()[:, :, :St] for t in (q, k, val))
    if St == S:
        tro, trl, twant = ro, rl, want
    else:
        qt, kt, vt = (t.requires_grad_() for t in (qt.clone(), kt.clone(), vt.clone()))
        tro, trl = dense_attention(qt, kt, vt, v.score_mod, v.mask_mod)
        twant = grads((tro, trl), (qt, kt, vt))
    q32, k32, v32 = (t.detach().float().to(dev).requires_grad_() for t in (qt, kt, vt))
    bm32 = create_block_mask(v.mask_mod, B, H, St, St, device=dev, BLOCK_SIZE=64) if v.mask_mod else None
    t0 = time.perf_counter()
    tout, tlse = flex_attention(q32, k32, v32, score_mod=v.score_mod, block_mask=bm32, return_lse=True,
                                kernel_options={"BACKEND": "triton"})
    tgot = [g.double().cpu() for g in grads((tout, tlse), (q32, k32, v32))]
    t_triton = time.perf_counter() - t0
    kerr = {"triton out": _err(tout.detach().double().cpu(), tro),
            "triton lse": _err(tlse.detach().double().cpu(), trl),
            "triton dq": _err(tgot[0], twant[0]), "triton dk": _err(tgot[1], twant[1]),
            "triton dv": _err(tgot[2], twant[2])}
    r.add("triton", kerr, TRITON_TOL)
    r.seconds = time.perf_counter() - t_start
    sparsity = f"{bm.sparsity():5.1f}%" if bm is not None else "  0.0%"
    say(f"sparsity {sparsity}  reference fwd+bwd {elapsed * 1e3:6.1f} ms  triton fwd+bwd {t_triton * 1e3:6.0f} ms"
        f"{f' (interpreter, S={St})' if dev == 'cpu' else ''}\n  max |error| " +
        "  ".join(f"{k} {e:.1e}" for k, e in {**ref, **vs_torch, **kerr}.items()) + ("  OK" if r.ok else "  FAIL"))
    return r


def long_block_mask() -> Result:
    """A 65,536-token causal block mask: exact block counts, no S x S tensor."""
    r = Result("block mask, causal 65536^2")
    t0 = time.perf_counter()
    bm = create_block_mask(causal_mask, 1, 1, 65536, 65536, device="cpu")
    r.seconds = time.perf_counter() - t0
    n_partial, n_full = int(bm.kv_num_blocks.sum()), int(bm.full_kv_num_blocks.sum())
    r.checks, r.passed = 2, (n_partial == 512) + (n_full == 130816)
    r.groups["blocks"] = f"{n_partial} partial + {n_full} full"
    say(f"create_block_mask(causal, 65536 x 65536): {r.seconds * 1e3:.0f} ms, "
        f"{n_partial} partial + {n_full} full blocks of 128x128 (want 512 + 130816)  {'OK' if r.ok else 'FAIL'}")
    return r


def long_training_step() -> Result:
    """A 16,384-token CPU training step (forward + backward on the reference backend), with RSS."""
    S = 16384
    r = Result(f"training step, S={S}")
    q, k, v = (torch.randn(1, 2, S, 32, requires_grad=True) for _ in range(3))
    bm = create_block_mask(and_masks(causal_mask, sliding_window(2048)), 1, 2, S, S, device="cpu")
    t0 = time.perf_counter()
    out = flex_attention(q, k, v, score_mod=softcap(30.0), block_mask=bm)
    out.square().mean().backward()
    r.seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finite = [bool(torch.isfinite(t).all()) for t in (out, q.grad, k.grad, v.grad)]
    r.checks, r.passed = len(finite), sum(finite)
    r.groups["peak RSS"] = f"{rss:.0f} MiB"
    say(f"CPU training step, 1x2x{S}x32 fp32, soft-cap + causal sliding window 2048: "
        f"{r.seconds:.1f} s, peak RSS of this process {rss:.0f} MiB "
        f"(one {S}x{S} fp32 score matrix alone would be {S * S * 4 / 2**20:.0f} MiB), out and grads finite"
        f"  {'OK' if r.ok else 'FAIL'}")
    return r


def _guarded(name: str, fn: Callable[[], Result]) -> Result:
    """``fn()``, or a failed row that carries the exception (printed in full) so the demo goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure is a failed check, reported and counted
        traceback.print_exc()
        sys.stderr.flush()
        say(f"  FAIL: {type(e).__name__}: {e}")
        return Result(name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:60])


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.1e}" if isinstance(x, float) else str(x))


def summary(results: list[Result]) -> None:
    """The table: one row per variant (reference vs the float64 oracle, vs torch's eager forward,
    Triton vs the oracle) and one per long-sequence check."""
    w = max(len("variant"), *(len(r.name) for r in results))
    say(f"\n=== summary (tolerances: reference {REF_TOL:.0e}, triton {TRITON_TOL:.0e}) ===")
    say(f"{'variant':<{w}}  checks  {'ref vs f64':>10}  {'vs torch':>8}  {'triton':>8}  {'time':>6}  result")
    for r in results:
        if r.error is not None:
            cols = f"{r.error:<30}"
        elif {"ref", "torch", "triton"} <= r.groups.keys():
            cols = "  ".join((f"{_fmt(r.groups['ref']):>10}", f"{_fmt(r.groups['torch']):>8}",
                              f"{_fmt(r.groups['triton']):>8}"))
        else:
            cols = f"{'; '.join(f'{k} {v}' for k, v in r.groups.items()):<30}"
        say(f"{r.name:<{w}}  {f'{r.passed}/{r.checks}':>6}  {cols}  {r.seconds:5.1f}s  {'pass' if r.ok else 'FAIL'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--triton-seq", type=int, default=256,
                   help="sequence length of the Triton kernels' checks in the interpreter (CPU only)")
    p.add_argument("--quiet", action="store_true", help="do not print IRs and block maps")
    p.add_argument("--skip-long", action="store_true", help="skip the long-sequence checks")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on a CPU: set before
        os.environ.setdefault("TRITON_INTERPRET", "1")  # flexcomp first imports its kernels (Triton wants it so)
    # Triton's interpreter trips numpy deprecations and overflows in exp on -inf tiles: not ours to show
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="triton")
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    say(f"flexcomp demo: B={a.batch} H={a.heads} S={a.seq} D={a.head_dim}, float64, reference backend; "
        f"oracles: dense float64 attention calling the mods directly, and torch {torch.__version__} eager "
        f"flex_attention (forward); then the Triton kernels in float32"
        f"{'' if torch.cuda.is_available() else ' (Triton interpreter)'}")
    vs = variants(a.seq, a.heads)
    results = []
    for i, v in enumerate(vs, 1):
        say(f"\n=== [{i}/{len(vs)}] {v.name} ===")
        results.append(_guarded(v.name, lambda v=v: check(v, a.batch, a.heads, a.seq, a.head_dim, not a.quiet,
                                                          a.triton_seq)))
    if not a.skip_long:
        say("\n=== long sequences (no S x S tensor anywhere) ===")
        results.append(_guarded("block mask, causal 65536^2", long_block_mask))
        results.append(_guarded("training step, S=16384", long_training_step))
    summary(results)
    n_ok = sum(r.ok for r in results)
    say(f"total {time.perf_counter() - t_start:.0f} s")
    say(f"\n{n_ok} passed, {len(results) - n_ok} failed")
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
