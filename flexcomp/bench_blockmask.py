"""GPU benchmark of block-mask construction: flexcomp's ``create_block_mask`` beside torch's, in one run.

    python -m flexcomp.bench_blockmask                        # causal, sliding, document at 32k and 131k
    python -m flexcomp.bench_blockmask --sizes 65536 --reps 50 --json out.json
    python -m flexcomp.bench_blockmask --profile              # also: the device ops of one flexcomp build

Cases (block size 128, B = H = 1): ``causal``, ``sliding`` (causal, window 1024), ``document``
(ragged lengths in ``64 .. S // 4``, seeded, given as lengths with ``device=`` the GPU; ``document
ids``: the same packings as device doc ids) at each size; ``document batch`` (B = 4, S = 8192, a
packing per batch element, ``doc_ids [4, S]``). Times: median over ``--reps`` calls after ``WARMUP``,
``torch.cuda.synchronize()`` around each. ``flexcomp build``: a fresh build per call (a different
packing per call where the mask captures a tensor, so a result cache cannot answer; else
``blockmask_build.build_block_mask`` where it exists: ``flexcomp_fn`` says which), and of it the host's
part (``flexcomp_host_ms``: until the build returns, before the sync). ``flexcomp reuse``:
``create_block_mask`` on the same mask_mod and captures. ``torch``: its ``create_block_mask(...,
_compile=True)``, a fresh doc tensor per call. Also the peak extra device memory of one build (MiB),
and ``match``: both BlockMasks list the same kv, full kv, q and full q blocks (printed, never raised).
A step that raises is ``null`` in the JSON rows and ``err`` in the table. ``--profile``: the op table
and device ops per build of ``PROFILE_BUILDS`` fresh flexcomp builds of each case.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_SIZES = "32768,131072"
DEFAULT_REPS = 30
WARMUP = 3  # untimed calls before each measurement (torch's first ones compile)
BLOCK = 128  # BLOCK_SIZE of every mask
WINDOW = 1024  # the sliding case's window
DOC_MIN, DOC_MAX_DIVISOR = 64, 4  # document lengths in DOC_MIN .. S // DOC_MAX_DIVISOR
BATCH_B, BATCH_S = 4, 8192  # the per-batch packing case
SEED = 0  # packing i is drawn from torch.Generator().manual_seed(SEED + i)
PROFILE_BUILDS, PROFILE_ROWS = 5, 15  # --profile: builds profiled per case, rows of the op table
PROFILE_SEED_OFFSET = 1_000_000  # --profile draws its packings from here on, apart from the timed ones
MIB = 2**20
DYNAMO_LIMIT = 10_000  # Dynamo's recompile limits, raised as in flexcomp.bench
DEVICE = "cuda"
TORCH_COMPILE = True  # torch's create_block_mask(_compile=...)
FIELDS = (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
          ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices"))


@dataclass(frozen=True)
class Case:
    """One mask: ``flex_mod(i)`` / ``torch_mod(i)`` give packing ``i``'s mask_mod (one for all ``i`` if no capture)."""

    name: str
    B: int
    S: int
    flex_mod: Callable[[int], Callable]
    torch_mod: Callable[[int], Callable]
    captures: bool


def doc_lengths(S: int, gen: torch.Generator) -> list[int]:
    """Ragged document lengths, each in ``DOC_MIN .. S // DOC_MAX_DIVISOR``, summing to ``S``."""
    hi, lengths, rest = S // DOC_MAX_DIVISOR, [], S
    while rest > 0:
        n = int(torch.randint(DOC_MIN, hi + 1, (1,), generator=gen))
        if rest - n < DOC_MIN:  # the tail would be too short: end here, or leave exactly DOC_MIN
            n = rest if rest <= hi else rest - DOC_MIN
        lengths.append(n)
        rest -= n
    return lengths


def _packing(i: int, S: int, rows: int = 1) -> list[list[int]]:
    """``rows`` packings of ``S`` tokens, the ``i``-th draw of the benchmark."""
    gen = torch.Generator().manual_seed(SEED + i)
    return [doc_lengths(S, gen) for _ in range(rows)]


def _doc_ids(lengths: list[int]) -> torch.Tensor:
    """int32 document id of every token, on ``DEVICE``."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE, torch.int32)


def _torch_doc_mod(doc: torch.Tensor) -> Callable:
    """torch's mask_mod of a packing ``doc [S]`` or ``[B, S]``, written by hand as research code does."""
    if doc.dim() == 1:
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)
    return lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv)


def make_cases(sizes: list[int]) -> list[Case]:
    """causal, sliding and document at each size, then the per-batch document case."""
    from torch.nn.attention import flex_attention as tf

    import flexcomp
    from flexcomp.masks import causal_mask, document_mask, sliding_window

    flex_sliding = flexcomp.and_masks(causal_mask, sliding_window(WINDOW))
    torch_sliding = tf.and_masks(causal_mask, sliding_window(WINDOW))
    cases = []
    for S in sizes:
        cases += [Case("causal", 1, S, lambda i: causal_mask, lambda i: causal_mask, False),
                  Case("sliding", 1, S, lambda i, m=flex_sliding: m, lambda i, m=torch_sliding: m, False),
                  Case("document", 1, S, lambda i, S=S: document_mask(_packing(i, S)[0], device=DEVICE),
                       lambda i, S=S: _torch_doc_mod(_doc_ids(_packing(i, S)[0])), True),
                  # the same packings given as device doc ids (no host-to-device copy per build)
                  Case("document ids", 1, S, lambda i, S=S: document_mask(doc_ids=_doc_ids(_packing(i, S)[0])),
                       lambda i, S=S: _torch_doc_mod(_doc_ids(_packing(i, S)[0])), True)]

    def batch_ids(i: int) -> torch.Tensor:
        return torch.stack([_doc_ids(lengths) for lengths in _packing(i, BATCH_S, BATCH_B)])

    cases.append(Case(f"document batch {BATCH_B}x{BATCH_S // 2**10}k", BATCH_B, BATCH_S,
                      lambda i: document_mask(doc_ids=batch_ids(i)), lambda i: _torch_doc_mod(batch_ids(i)), True))
    return cases


def _attempt(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None after printing the error's type and first line (a benchmark reports and goes on)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (out of memory, a compile failure, ...: the row says err)
        print(f"  {what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", flush=True)
        return None


def _medians_ms(build: Callable[[Callable], Any], mods: list[Callable]) -> tuple[float, float]:
    """Median wall time (ms) of ``build(mod)`` over ``mods[WARMUP:]``, after ``mods[:WARMUP]`` untimed,
    and the median host time: up to ``build``'s return, before the sync (the rest is the device's
    work and the wait for it)."""
    walls, hosts = [], []
    for n, mod in enumerate(mods):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        build(mod)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if n >= WARMUP:
            walls.append(time.perf_counter() - t0)
            hosts.append(t1 - t0)
    return statistics.median(walls) * 1e3, statistics.median(hosts) * 1e3


def _median_ms(build: Callable[[Callable], Any], mods: list[Callable]) -> float:
    """Median wall time (ms) of ``build(mod)``, as :func:`_medians_ms`."""
    return _medians_ms(build, mods)[0]


def _peak_mib(build: Callable[[Callable], Any], mod: Callable) -> float:
    """Peak device memory of one ``build(mod)`` above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    build(mod)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def compare(ours, theirs) -> list[str]:
    """Names of the BlockMask fields whose listed blocks differ (empty: the masks match).

    Only the first ``num`` entries of each index row count: both go through ``ordered_to_dense``.
    """
    from flexcomp.blockmask_lists import ordered_to_dense

    bad = []
    for num_name, idx_name in FIELDS:
        a_num, a_idx, b_num, b_idx = (getattr(bm, f) for bm in (ours, theirs) for f in (num_name, idx_name))
        if a_idx is None or b_idx is None:
            bad += [idx_name] if (a_idx is None) != (b_idx is None) else []
            continue
        a = ordered_to_dense(a_num, a_idx, a_idx.shape[-1])
        b = ordered_to_dense(b_num.to(a.device), b_idx.to(a.device), b_idx.shape[-1])
        if a.shape != b.shape or not torch.equal(a, b) or not torch.equal(a_num, b_num.to(a.device)):
            bad.append(idx_name)
    return bad


def _builders(case: Case) -> tuple[Callable, Callable, Callable, str]:
    """(flexcomp fresh build, flexcomp create_block_mask, torch's, name of the fresh-build function)."""
    from torch.nn.attention import flex_attention as tf

    import flexcomp
    from flexcomp import blockmask_build

    args = (case.B, 1, case.S, case.S)

    def ours(mod):
        return flexcomp.create_block_mask(mod, *args, device=DEVICE, BLOCK_SIZE=BLOCK)

    def theirs(mod):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return tf.create_block_mask(mod, *args, device=DEVICE, BLOCK_SIZE=BLOCK, _compile=TORCH_COMPILE)

    fresh = getattr(blockmask_build, "build_block_mask", None)
    if case.captures or fresh is None:
        why = "a fresh capture each call" if case.captures else "no build_block_mask: may reuse"
        return ours, ours, theirs, f"create_block_mask ({why})"

    def build(mod):
        return fresh(mod, *args, device=DEVICE, BLOCK_SIZE=BLOCK)

    return build, ours, theirs, "blockmask_build.build_block_mask"


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled so far in this process (0 where the counter is missing)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def run_case(case: Case, reps: int) -> dict:
    """Time, measure and check one case; returns (and prints) its JSON row."""
    build, reuse, theirs, fn_name = _builders(case)
    n = WARMUP + reps
    row: dict = {"case": case.name, "S": case.S, "B": case.B, "flexcomp_fn": fn_name}
    label = f"{case.name} S={case.S} B={case.B}"
    # packing 0: reuse, check; 1..n: flexcomp builds; n+1..2n: torch; 2n+1: memory. Mods made before timing.
    both = _attempt(f"{label} flexcomp build", lambda: _medians_ms(build, [case.flex_mod(i) for i in range(1, n + 1)]))
    row["flexcomp_build_ms"], row["flexcomp_host_ms"] = (None, None) if both is None else both
    same = case.flex_mod(0)
    row["flexcomp_reuse_ms"] = _attempt(f"{label} flexcomp reuse", lambda: _median_ms(reuse, [same] * n))
    graphs = _compiled_graphs()
    row["torch_ms"] = _attempt(f"{label} torch",
                               lambda: _median_ms(theirs, [case.torch_mod(i) for i in range(n + 1, 2 * n + 1)]))
    row["torch_graphs_compiled"] = _compiled_graphs() - graphs  # recompiles show here (warm-up ones too)
    row["build_ratio"] = (row["torch_ms"] / row["flexcomp_build_ms"]
                          if row["torch_ms"] and row["flexcomp_build_ms"] else None)
    row["flexcomp_peak_mib"] = _attempt(f"{label} flexcomp memory", lambda: _peak_mib(build, case.flex_mod(2 * n + 1)))
    row["torch_peak_mib"] = _attempt(f"{label} torch memory", lambda: _peak_mib(theirs, case.torch_mod(2 * n + 1)))
    ours_bm = _attempt(f"{label} flexcomp check", lambda: reuse(same))
    theirs_bm = _attempt(f"{label} torch check", lambda: theirs(case.torch_mod(0)))
    both = ours_bm is not None and theirs_bm is not None
    bad = _attempt(f"{label} compare", lambda: compare(ours_bm, theirs_bm)) if both else None
    row["match"], row["mismatched"] = (None, None) if bad is None else (not bad, bad)
    if bad:
        print(f"  {label}: MISMATCH in {', '.join(bad)}", flush=True)
    print(json.dumps(row), flush=True)
    return row


def profile_case(case: Case) -> dict:
    """``PROFILE_BUILDS`` fresh flexcomp builds under torch.profiler (after :func:`run_case` warmed the
    caches): print the op table, count the device ops, launches and stream syncs per build."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    build = _builders(case)[0]
    mods = [case.flex_mod(PROFILE_SEED_OFFSET + i) for i in range(PROFILE_BUILDS)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for mod in mods:
            build(mod)
        torch.cuda.synchronize()
    print(f"--- profile: {case.name} S={case.S} B={case.B}, {PROFILE_BUILDS} fresh flexcomp builds ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=PROFILE_ROWS))
    events = prof.events()
    device_ops = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = [e for e in device_ops if e.name.startswith(("Memcpy", "Memset"))]
    launches = [e for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name]
    syncs = [e for e in events if e.name == "cudaStreamSynchronize"]
    counts = {"kernels": len(device_ops) - len(copies), "memcpy_memset": len(copies),
              "launch_calls": len(launches), "stream_syncs": len(syncs)}
    row = {"case": case.name, "S": case.S, "B": case.B, "builds": PROFILE_BUILDS,
           **{f"{k}_per_build": v / PROFILE_BUILDS for k, v in counts.items()}}
    print(json.dumps(row), flush=True)
    return row


def _fmt(value, spec: str) -> str:
    """A table cell: ``err`` for None (the step raised)."""
    return "err" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """Markdown table of the rows: times in ms, ratio = torch time / flexcomp build time."""
    head = ["case", "S", "B", "flexcomp build ms", "of which host ms", "flexcomp reuse ms", "torch ms",
            "build ratio (torch/flexcomp)", "peak MiB flexcomp / torch", "match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], str(r["S"]), str(r["B"]), _fmt(r["flexcomp_build_ms"], ".2f"),
                 _fmt(r.get("flexcomp_host_ms"), ".2f"), _fmt(r["flexcomp_reuse_ms"], ".3f"),
                 _fmt(r["torch_ms"], ".2f"), _fmt(r["build_ratio"], ".2f"),
                 f"{_fmt(r['flexcomp_peak_mib'], '.1f')} / {_fmt(r['torch_peak_mib'], '.1f')}",
                 "err" if r["match"] is None else str(r["match"]).lower()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setup_torch_compile() -> None:
    """Raise Dynamo's recompile limits (a new closure per call may recompile; past them torch runs eagerly)."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, DYNAMO_LIMIT)


def main(argv=None) -> int:
    """Parse the arguments, run every case (and ``--profile``), print the table, write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated sequence lengths (B = H = 1 cases)")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed calls per measurement (median)")
    p.add_argument("--json", help="write the rows (and profile counts) to this file")
    p.add_argument("--profile", action="store_true",
                   help=f"also profile {PROFILE_BUILDS} fresh flexcomp builds of each case")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.reps < 1 or any(S // DOC_MAX_DIVISOR < 2 * DOC_MIN for S in sizes):
        raise SystemExit(f"--reps must be >= 1 and every size >= {2 * DOC_MIN * DOC_MAX_DIVISOR}")
    if not torch.cuda.is_available():
        raise SystemExit("flexcomp.bench_blockmask needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "it times device-side mask construction and has no CPU mode")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    _setup_torch_compile()
    cases = make_cases(sizes)
    rows = [run_case(case, a.reps) for case in cases]
    profiles = [_attempt(f"{c.name} S={c.S} profile", lambda c=c: profile_case(c)) for c in cases] if a.profile else []
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "profile": profiles, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
