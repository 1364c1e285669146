"""GPU benchmark: flexcomp's kernels beside torch's compiled flex_attention, in one run.

    python -m flexcomp.bench                      # the anchors' shapes and variants, forward + backward
    python -m flexcomp.bench --no-bwd             # forward only
    python -m flexcomp.bench --shapes 4x16x4096x128 --variants causal,softcap
    python -m flexcomp.bench --sdpa --shapes 4x32:8x4096x128 --variants full,causal  # GQA, beside cuDNN
    python -m flexcomp.bench --cold-only          # cold compile, forward + backward, fresh caches
    python -m flexcomp.bench --cold --json out.json   # the benchmark, then the cold compile
    python -m flexcomp.bench --sweep              # flexcomp's forward under several tile configs
    python -m flexcomp.bench --sweep-bwd --shapes 4x16x4096x128 --variants causal,softcap

For each shape and variant it first checks both libraries against flexcomp's float32 reference
backend (``|x - ref| / |ref|``): the output on the first 2,048 queries and (unless ``--no-bwd``) dq,
dk, dv for a fixed random dO, at the full shape when ``B * H * S^2 <= 2**30``, else on the first
batch element and the first heads that fit. Then it times each library with
``triton.testing.do_bench`` (median) and prints TFLOP/s as ``../shared/anchors.md`` counts them,
density = the fraction of (q, kv) pairs the mask keeps: forward ``4 * B * H * S^2 * D * density /
t_fwd`` (no_grad); backward ``2.5 *`` that work ``/ (t_fwdbwd - t_fwd_grad)``, where ``t_fwdbwd``
times ``torch.autograd.grad(out, (q, k, v), dO)`` with its forward and ``t_fwd_grad`` that forward
alone, autograd recording. torch's ``flex_attention`` is wrapped in ``torch.compile(dynamic=False)``
with the recompile limit raised (at the default limit it silently falls back to an unfused path).
A step that raises is ``null`` in the JSON rows and ``err`` in the table, its first line printed.

Not a test: it prints numbers; docs/performance.md keeps them with date, device and command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

ANCHOR_SHAPES = ["4x16x4096x64", "4x16x4096x128", "1x16x16384x128"]
VARIANTS = ["full", "causal", "sliding", "alibi", "softcap", "document", "prefix"]
COLD_SHAPE = "2x8x2048x64"  # anchors: cold compile of causal + soft-cap, bf16
GRAD_CHECK_PAIRS = 2**30  # bound on B * H * S^2 for the float32 reference backward
BWD_FLOP_FACTOR = 2.5  # backward work relative to the forward's (anchors.md)


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


@dataclass(frozen=True)
class Setup:
    """One (shape, variant) to measure: ``q``, ``k``, ``v`` random ``[B, H, S, D]``, ``do`` a fixed
    random output gradient, flexcomp's ``block_mask`` (None: no mask), ``density`` the fraction of
    (q, kv) pairs kept."""

    shape: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    case: Case
    block_mask: Any
    density: float

    @property
    def flops(self) -> float:
        """The forward's work, ``4 * B * H * S^2 * D * density``."""
        B, H, S, D = self.q.shape
        return 4 * B * H * S * S * D * self.density


@dataclass(frozen=True)
class FwdTiles:
    """A forward tile config for ``--sweep``, named as torch's ``kernel_options`` keys."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def kernel_options(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BwdTiles:
    """A backward tile config for ``--sweep-bwd``, passed as torch's ``bwd_*`` ``kernel_options``.

    dK/dV kernel: ``BLOCK_N1`` kv rows per program, ``BLOCK_M1`` query rows per inner tile.
    dQ kernel: ``BLOCK_M2`` query rows per program, ``BLOCK_N2`` kv columns per tile.
    ``BWD_SPLIT``: the dQ and dK/dV programs as two launches instead of one grid.
    """

    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    num_warps: int
    num_stages: int
    BWD_SPLIT: bool = False

    def kernel_options(self) -> dict:
        opts = {"bwd_" + key: value for key, value in dataclasses.asdict(self).items() if key != "BWD_SPLIT"}
        return {**opts, "BWD_SPLIT": self.BWD_SPLIT}


SWEEP = [FwdTiles(128, 64, 4, 3), FwdTiles(128, 64, 8, 3), FwdTiles(128, 128, 8, 3), FwdTiles(128, 128, 8, 2),
         FwdTiles(64, 64, 4, 3), FwdTiles(128, 32, 4, 3), FwdTiles(64, 128, 4, 3), FwdTiles(128, 64, 8, 4)]
SWEEP_BWD = [BwdTiles(m1, n1, m2, n2, warps, stages, split)
             for m1, n1, m2, n2 in ((64, 128, 128, 64), (64, 64, 64, 64), (32, 64, 64, 32), (32, 128, 128, 32))
             for warps in (4, 8) for stages in (2, 3) for split in (False, True)]


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _setup_torch_compile():
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 10_000)


def parse_shape(shape: str) -> tuple[int, int, int, int, int]:
    """``BxHxSxD``, or ``BxH:HKVxSxD`` for grouped-query attention (``H`` query heads sharing
    ``HKV`` key/value heads): ``(B, H, HKV, S, D)``.

    >>> parse_shape("4x16x4096x64"), parse_shape("4x32:8x4096x128")
    ((4, 16, 16, 4096, 64), (4, 32, 8, 4096, 128))
    """
    parts = shape.split("x")
    if len(parts) != 4:
        raise SystemExit(f"--shapes: expected BxHxSxD or BxH:HKVxSxD, got {shape!r}")
    heads = parts[1].split(":")
    B, S, D = int(parts[0]), int(parts[2]), int(parts[3])
    H, HKV = int(heads[0]), int(heads[-1])
    if len(heads) > 2 or H % HKV:
        raise SystemExit(f"--shapes: the query heads must be a multiple of the key/value heads, got {shape!r}")
    return B, H, HKV, S, D


def _cases(shapes: list[str], variants: list[str], dtype: torch.dtype, requires_grad: bool):
    """Every (shape, variant) as a :class:`Setup`; inputs are drawn once per shape."""
    import flexcomp

    device = torch.device("cuda")
    for shape in shapes:
        B, H, HKV, S, D = parse_shape(shape)
        q = torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=requires_grad)
        k, v = (torch.randn(B, HKV, S, D, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
        do = torch.randn(B, H, S, D, device=device, dtype=dtype)
        for name in variants:
            case = make_case(name, B, H, S, device)
            bm = flexcomp.create_block_mask(case.mask_mod, 1, 1, S, S, device=device) if case.mask_mod else None
            yield Setup(shape=shape, q=q, k=k, v=v, do=do, case=case, block_mask=bm,
                        density=_density(case.mask_mod, S, device))


def _bench(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _fwdbwd(call: Callable, q, k, v, do) -> tuple:
    """Forward then backward: (dq, dk, dv) by ``torch.autograd.grad`` (no ``.grad`` accumulates)."""
    return torch.autograd.grad(call(q, k, v), (q, k, v), do)


def _sweep_table(s: Setup, ranked: list[dict], work: float) -> str:
    """Markdown table of one sweep: a row per config (fields and ``ms``), fastest first."""
    lines = [f"{s.shape.replace('x', '×')} {s.case.name}:", "| " + " | ".join(ranked[0]) + " | TFLOP/s |",
             "|" + "---|" * (len(ranked[0]) + 1)]
    lines += ["| " + " | ".join(map(str, r.values())) + f" | {work / r['ms'] / 1e9:.0f} |" for r in ranked]
    return "\n".join(lines)


def _run_sweep(shapes, variants, dtype, backward: bool) -> None:
    """Time flexcomp's forward (``SWEEP``) or backward (``SWEEP_BWD``) under each tile config.

    The backward's time is ``t_fwdbwd - t_fwd_grad``, the forward run with default tiles (the
    ``bwd_*`` keys do not reach the forward kernel). Configs that raise are reported and skipped.
    """
    import flexcomp

    for s in _cases(shapes, variants, dtype, requires_grad=backward):
        def call(q, k, v, opts=None):
            return flexcomp.flex_attention(q, k, v, score_mod=s.case.score_mod, block_mask=s.block_mask,
                                           kernel_options=opts)

        try:
            t_fwd = _bench(lambda: call(s.q, s.k, s.v), warmup=10, rep=40) if backward else 0.0
        except Exception as e:  # the forward with autograd recording
            print(f"{s.shape} {s.case.name} forward: {_first_line(e)}", flush=True)
            continue
        times = {}
        for tiles in SWEEP_BWD if backward else SWEEP:
            opts = tiles.kernel_options()
            try:
                if backward:
                    t = _bench(lambda: _fwdbwd(lambda q, k, v: call(q, k, v, opts), s.q, s.k, s.v, s.do),
                               warmup=10, rep=40)
                    times[tiles] = t - t_fwd
                else:
                    with torch.no_grad():
                        times[tiles] = _bench(lambda: call(s.q, s.k, s.v, opts), warmup=10, rep=40)
            except Exception as e:  # out of shared memory, a tile the kernel refuses: report and go on
                print(f"  {s.shape} {s.case.name} {opts}: {_first_line(e)}", flush=True)
        if not times:
            print(f"{s.shape} {s.case.name}: every config raised", flush=True)
            continue
        ranked = [dict(dataclasses.asdict(c), ms=round(t, 4)) for c, t in sorted(times.items(), key=lambda i: i[1])]
        print(json.dumps({"shape": s.shape, "variant": s.case.name, "pass": "backward" if backward else "forward",
                          "fwd_grad_ms": t_fwd if backward else None, "ranked": ranked}), flush=True)
        print(_sweep_table(s, ranked, s.flops * (BWD_FLOP_FACTOR if backward else 1.0)), flush=True)


def _grad_check(impls: dict[str, Callable], reference: Callable, s: Setup) -> dict:
    """dq, dk, dv of each library against the float32 reference, ``|g - ref| / |ref|``.

    At the full shape when ``B * H * S^2 <= GRAD_CHECK_PAIRS``, else on the first batch element
    and the first heads that fit (at least one): the libraries run on the same slice.
    """
    B, H, S, D = s.q.shape
    group = H // s.k.shape[1]  # query heads per key/value head: whole groups are sliced
    nb = B if B * H * S * S <= GRAD_CHECK_PAIRS else 1
    nh = H if nb * H * S * S <= GRAD_CHECK_PAIRS else min(H, max(1, GRAD_CHECK_PAIRS // (S * S)))
    nh = max(group, nh - nh % group)
    q, do = (t[:nb, :nh].detach().contiguous() for t in (s.q, s.do))
    k, v = (t[:nb, :nh // group].detach().contiguous() for t in (s.k, s.v))
    fp32 = [t.float().requires_grad_() for t in (q, k, v)]
    ref = _fwdbwd(reference, *fp32, do.float())
    result: dict = {"grad_check_shape": f"{nb}x{nh}x{S}x{D}"}
    for name, call in impls.items():
        try:
            grads = _fwdbwd(call, *(t.clone().requires_grad_() for t in (q, k, v)), do)
        except Exception as e:
            result[f"{name}_grad_error"], result[f"{name}_grad_rel_err_max"] = _first_line(e), None
            print(f"  {s.shape} {s.case.name} {name} gradients: {_first_line(e)}", flush=True)
            continue
        errors = {g_name: _rel(g, r) for g_name, g, r in zip(("dq", "dk", "dv"), grads, ref)}
        result[f"{name}_grad_rel_err"], result[f"{name}_grad_rel_err_max"] = errors, max(errors.values())
    return result


def _time_backward(n: str, call: Callable, s: Setup) -> dict:
    """t_fwd_grad, t_fwdbwd and the backward's share; on an error, ``None`` times and the message.
    (Compile times: :func:`cold_compile`; the gradient check may already have compiled here.)"""
    try:
        t_fwd = _bench(lambda: call(s.q, s.k, s.v))  # autograd recording, as in training
        t_all = _bench(lambda: _fwdbwd(call, s.q, s.k, s.v, s.do))
    except Exception as e:
        print(f"  {s.shape} {s.case.name} {n} backward: {_first_line(e)}", flush=True)
        return {f"{n}_bwd_error": _first_line(e), f"{n}_bwd_ms": None, f"{n}_bwd_tflops": None}
    return {f"{n}_fwd_grad_ms": t_fwd, f"{n}_fwdbwd_ms": t_all, f"{n}_bwd_ms": t_all - t_fwd,
            f"{n}_bwd_tflops": BWD_FLOP_FACTOR * s.flops / (t_all - t_fwd) / 1e9}


def _cudnn(case: Case, gqa: bool) -> Optional[Callable]:
    """cuDNN's SDPA for the cases it computes (no mask, causal), else None."""
    if case.score_mod is not None or case.name not in ("full", "causal"):
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.name == "causal",
                                                                    enable_gqa=gqa)
    return cudnn


def run(shapes: list[str], variants: list[str], dtype: torch.dtype, check: bool, bwd: bool = True,
        sdpa: bool = False) -> list[dict]:
    """Check and time both libraries on every (shape, variant), and with ``sdpa`` cuDNN's SDPA on the
    full and causal cases; returns (and prints) one dict per row."""
    from torch.nn.attention import flex_attention as tf

    import flexcomp

    _setup_torch_compile()
    torch_flex = torch.compile(tf.flex_attention, dynamic=False)
    device = torch.device("cuda")
    rows = []
    for s in _cases(shapes, variants, dtype, requires_grad=bwd):
        S, gqa = s.q.shape[2], s.q.shape[1] != s.k.shape[1]
        theirs_bm = tf.create_block_mask(s.case.mask_mod, 1, 1, S, S, device=device) if s.case.mask_mod else None

        def ours(q, k, v):
            return flexcomp.flex_attention(q, k, v, score_mod=s.case.score_mod, block_mask=s.block_mask,
                                           enable_gqa=gqa)

        def theirs(q, k, v):
            return torch_flex(q, k, v, score_mod=s.case.score_mod, block_mask=theirs_bm, enable_gqa=gqa)

        def reference(q, k, v):
            return flexcomp.flex_attention(q, k, v, score_mod=s.case.score_mod, block_mask=s.block_mask,
                                           enable_gqa=gqa, kernel_options={"BACKEND": "reference"})

        impls = {"flexcomp": ours, "torch": theirs}  # the name prefixes the row's keys
        cudnn = _cudnn(s.case, gqa) if sdpa else None
        if cudnn is not None:
            impls["cudnn"] = cudnn
        row = {"shape": s.shape, "variant": s.case.name, "dtype": str(dtype).replace("torch.", ""),
               "density": s.density}
        outs = {}
        with torch.no_grad():
            for name, call in impls.items():
                t0 = time.perf_counter()
                outs[name] = call(s.q, s.k, s.v)
                torch.cuda.synchronize()
                row[f"{name}_first_call_s"] = time.perf_counter() - t0
            if check:
                n = min(S, 2048)  # the float32 reference on the first queries keeps it quick
                ref = _reference_rows(flexcomp, s.q, s.k, s.v, s.case, n)
                for name, out in outs.items():
                    row[f"{name}_rel_err"] = _rel(out[:, :, :n], ref)
                row["nan"] = bool(torch.isnan(outs["flexcomp"]).any())
        del outs
        if check and bwd:
            row.update(_grad_check(impls, reference, s))
        for name, call in impls.items():
            with torch.no_grad():
                t = _bench(lambda: call(s.q, s.k, s.v))
                row[f"{name}_ms"], row[f"{name}_tflops"] = t, s.flops / t / 1e9
                row[f"{name}_host_us"] = _host_us(lambda: call(s.q, s.k, s.v))
            if bwd:
                row.update(_time_backward(name, call, s))
        row["ratio"] = row["torch_ms"] / row["flexcomp_ms"]  # forward; > 1: flexcomp is faster
        if bwd:
            both = row["flexcomp_bwd_ms"] is not None and row["torch_bwd_ms"] is not None
            row["bwd_ratio"] = row["torch_bwd_ms"] / row["flexcomp_bwd_ms"] if both else None
        if cudnn is not None:  # flexcomp against cuDNN, > 1: flexcomp is faster
            row["cudnn_ratio"] = row["cudnn_ms"] / row["flexcomp_ms"]
            if bwd and row["flexcomp_bwd_ms"] is not None and row["cudnn_bwd_ms"] is not None:
                row["cudnn_bwd_ratio"] = row["cudnn_bwd_ms"] / row["flexcomp_bwd_ms"]
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
                                   block_mask=ref_bm, enable_gqa=q.shape[1] != k.shape[1],
                                   kernel_options={"BACKEND": "reference"})


_COLD_CODE = r"""
import json
import sys
import time

import torch

which, backward = sys.argv[1], sys.argv[2] == "bwd"
B, H, S, D = (int(x) for x in sys.argv[3].split("x"))
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
causal = lambda b, h, q_, kv: q_ >= kv
softcap = lambda s, b, h, q_, kv: 50 * torch.tanh(s / 50)
if which == "flexcomp":
    import flexcomp as lib
    attend = lib.flex_attention
else:
    from torch.nn.attention import flex_attention as lib
    attend = torch.compile(lib.flex_attention, dynamic=False)
bm = lib.create_block_mask(causal, 1, 1, S, S, device="cuda")
torch.cuda.synchronize()
with torch.set_grad_enabled(backward):
    t0 = time.perf_counter()
    out = attend(q, k, v, score_mod=softcap, block_mask=bm)
    torch.cuda.synchronize()
print(json.dumps({"forward_s": time.perf_counter() - t0}), flush=True)
if backward:
    t0 = time.perf_counter()
    torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    print(json.dumps({"backward_s": time.perf_counter() - t0}), flush=True)
"""


def cold_compile(bwd: bool = True) -> dict:
    """First-call times of flexcomp and of torch.compile(flex_attention), each in a fresh process
    with empty Triton / Inductor caches: causal + soft-cap, ``COLD_SHAPE`` bf16. ``forward_s`` is
    the first forward (autograd recording when ``bwd``), ``backward_s`` the first backward after it."""
    out = {}
    for which in ("flexcomp", "torch"):
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(d, "triton"), TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "ind"),
                       TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
            r = subprocess.run([sys.executable, "-c", _COLD_CODE, which, "bwd" if bwd else "fwd", COLD_SHAPE],
                               capture_output=True, text=True, env=env, timeout=600)
            out[which] = {k: v for line in r.stdout.splitlines() if line.startswith("{")
                          for k, v in json.loads(line).items()}
            if r.returncode != 0:  # e.g. no backward yet: keep the forward time, say why
                out[which]["error"] = "\n".join(r.stderr.strip().splitlines()[-5:])
    print(json.dumps({"cold_compile_s": out, "case": f"causal + soft-cap {COLD_SHAPE} bfloat16"}), flush=True)
    return out


def _fmt(value, spec: str) -> str:
    """A table cell: ``err`` for None (the step raised)."""
    return "err" if value is None else format(value, spec)


def _pair(r: dict, key: str, spec: str, other: str = "torch") -> str:
    """``flexcomp / other`` cell for a row key suffix; empty when not measured."""
    if f"flexcomp_{key}" not in r and f"{other}_{key}" not in r:
        return ""
    return f"{_fmt(r.get(f'flexcomp_{key}'), spec)} / {_fmt(r.get(f'{other}_{key}'), spec)}"


def table(rows: list[dict]) -> str:
    """Markdown table: forward and backward TFLOP/s with ratios (torch time / flexcomp time), errors."""
    head = ["B×H×S×D", "variant", "fwd TFLOP/s flexcomp / torch", "fwd ratio", "bwd TFLOP/s flexcomp / torch",
            "bwd ratio", "rel err out flexcomp / torch", "rel err grad (max dq, dk, dv) flexcomp / torch",
            "host µs flexcomp / torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"].replace("x", "×"), r["variant"], _pair(r, "tflops", ".0f"), f"{r['ratio']:.2f}",
                 _pair(r, "bwd_tflops", ".0f"), _fmt(r["bwd_ratio"], ".2f") if "bwd_ratio" in r else "",
                 _pair(r, "rel_err", ".1e"), _pair(r, "grad_rel_err_max", ".1e"), _pair(r, "host_us", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    cudnn = [r for r in rows if "cudnn_ratio" in r]
    if cudnn:
        lines += ["", "Against cuDNN SDPA (ratio: cuDNN time / flexcomp time):", "",
                  "| B×H×S×D | variant | fwd TFLOP/s flexcomp / cuDNN | fwd ratio | bwd TFLOP/s flexcomp / cuDNN "
                  "| bwd ratio |", "|---|---|---|---|---|---|"]
        for r in cudnn:
            bwd_ratio = _fmt(r.get("cudnn_bwd_ratio"), ".2f") if "cudnn_bwd_tflops" in r else ""
            cells = [r["shape"].replace("x", "×"), r["variant"], _pair(r, "tflops", ".0f", "cudnn"),
                     f"{r['cudnn_ratio']:.2f}", _pair(r, "bwd_tflops", ".0f", "cudnn"), bwd_ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cold_table(cold: dict) -> str:
    """Markdown table of :func:`cold_compile`'s result (seconds; ``err`` where the step raised)."""
    lines = [f"Cold compile, causal + soft-cap {COLD_SHAPE} bf16, fresh caches:",
             "| library | forward s | backward s | error |", "|---|---|---|---|"]
    for which, r in cold.items():
        err = r["error"].splitlines()[-1] if "error" in r else ""
        cells = [_fmt(r.get(key), ".2f") if key in r or err else "" for key in ("forward_s", "backward_s")]
        lines.append(f"| {which} | {' | '.join(cells)} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(ANCHOR_SHAPES), help="comma-separated BxHxSxD")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-check", action="store_true", help="skip the checks against the float32 reference")
    p.add_argument("--no-bwd", action="store_true", help="forward only (benchmark and cold compile)")
    p.add_argument("--sdpa", action="store_true", help="also time cuDNN's SDPA on the full and causal cases")
    p.add_argument("--cold", action="store_true", help="also measure cold compile times")
    p.add_argument("--cold-only", action="store_true", help="only measure cold compile times")
    p.add_argument("--json", help="write the rows (and cold compile times) to this file")
    p.add_argument("--sweep", action="store_true", help="time flexcomp's forward under several tile configs instead")
    p.add_argument("--sweep-bwd", action="store_true",
                   help="time flexcomp's backward under several bwd_* tile configs instead")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("flexcomp.bench needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "it times GPU kernels and has no CPU mode")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    shapes, variants, dtype = a.shapes.split(","), a.variants.split(","), getattr(torch, a.dtype)
    if a.sweep or a.sweep_bwd:
        if a.sweep:
            _run_sweep(shapes, variants, dtype, backward=False)
        if a.sweep_bwd:
            _run_sweep(shapes, variants, dtype, backward=True)
        return 0
    rows = [] if a.cold_only else run(shapes, variants, dtype, not a.no_check, not a.no_bwd, a.sdpa)
    cold = cold_compile(not a.no_bwd) if a.cold or a.cold_only else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "cold": cold, "device": torch.cuda.get_device_name()}, f, indent=1)
    if rows:
        print(table(rows))
    if cold:
        print(cold_table(cold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
