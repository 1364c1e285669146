"""Launching the backward kernels: configs, gradient buffers, the deterministic scatter.

As for the forward, q, k, v, dO and the BlockMask go to the kernels as strides, without copies.
dK and dV come out per query batch when keys and values broadcast over the batch (batch 1), and
are summed here. Gradients into captured tensors (the score_mod's float buffers that require
grad) accumulate in float32 (atomics), or, with ``kernel_options={"DETERMINISTIC": True}``, in
int64 fixed point, scaled per tensor by a power of two chosen from the largest contribution
(recorded by the dQ pass), so that no sum can overflow and every run gives the same bits.

float64 inputs: the kernels' ``FP64`` switch, float64 delta and (atomic) captured-tensor gradients,
the float64 variants of the generated functions. ``L`` or ``S`` of 0 launches nothing: zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from flexcomp.derivative import float_loads
from flexcomp.errors import FlexcompError
from flexcomp.ir import Op
from flexcomp.trace import TracedMod

from .kernels.backward import flex_bwd, flex_bwd_delta
from .launch import (full_block_mask, largest_pow2_dividing, pad_dim, smem_limit_of, block_lists, check_inputs, memo,
                     memo_set, mod_args, stats_dtype, kernel_scale, dot_precision)
from .lower import FloatType
from .modules import jit_grad_function, jit_scatter


TRANSCENDENTAL = frozenset({Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.TANH, Op.SIGMOID, Op.SIN, Op.COS, Op.POW,
                            Op.SQRT, Op.RSQRT, Op.TAN, Op.ATAN, Op.ERF, Op.LOG1P, Op.EXPM1})


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two backward kernels.

    dK/dV: each program owns ``block_n1`` keys and walks queries ``block_m1`` rows at a time;
    dQ: each program owns ``block_m2`` queries and walks keys ``block_n2`` at a time. All four
    are powers of two dividing the BlockMask's block sizes; ``num_warps`` and ``num_stages`` as
    in Triton (both kernels); ``split``: launch the dQ and the dK/dV programs separately (each
    compiled on its own, so neither pays for the other's registers) instead of in one grid.
    """

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    split: bool = False


def backward_config(head_dim: int, value_dim: int, elt: int, sparse_q: int, sparse_kv: int, options: dict,
                    interpret: bool, smem_limit: int = 232448, score_mod: bool = False,
                    transcendental: bool = False, scatter: bool = False) -> BackwardConfig:
    """Tiles for the backward kernels; torch's ``BLOCK_M1 / BLOCK_N1 / BLOCK_M2 / BLOCK_N2``,
    ``num_warps``, ``num_stages`` (or their ``bwd_`` forms) in ``kernel_options`` override them.

    Defaults come from the H200 sweeps in docs/performance.md (4x16x4096, bf16), by what the
    score_mod does (``score_mod``: there is one; ``transcendental``: it calls tanh, exp and the like):

    - no score_mod: 64x64 tiles everywhere with 4 warps, 2 stages, one grid (at head dim 128 15%
      faster than torch's Hopper choice, 64/128/128/64 with 8 warps);
    - arithmetic score_mods (ALiBi) at head dim 128: torch's choice, 64/128/128/64, 8 warps, 3 stages;
    - transcendental score_mods (soft-cap): 32/64/64/32, 4 warps, 2 stages, and the dQ and dK/dV
      programs as two launches (``split``), 6% faster than one grid;
    - gradients into captured tensors (``scatter``): the scatter's layout conversions need shared
      memory, so the 64x64 tiles (torch's 64/128/128/64 ran out of it on a relative-position bias).

    If a config still runs out of shared memory when compiled, :func:`flex_backward` retries with
    fewer stages, then smaller tiles (``_smaller``), and remembers what fitted.

    ``kernel_options={"BWD_SPLIT": ...}`` overrides the launch choice. Stages drop until the
    pipelined tiles fit shared memory.
    """
    split = transcendental and not interpret
    if interpret:  # large tiles: the interpreter's cost is per tile
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 1
    elif elt >= 8:  # float64: resident dK/dV accumulators and K/V tiles of 8-byte elements
        widest = max(head_dim, value_dim)
        m1, n1, m2, n2 = (16, 32, 32, 16) if widest <= 128 else (16, 16, 16, 16)
        warps, stages = 4 if widest <= 64 else 8, 1
    elif elt >= 4:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
    elif max(head_dim, value_dim) <= 128 and transcendental:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 2
    elif max(head_dim, value_dim) <= 64:
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 2
    elif max(head_dim, value_dim) <= 128 and score_mod and not scatter:
        m1, n1, m2, n2, warps, stages = 64, 128, 128, 64, 8, 3
    elif max(head_dim, value_dim) <= 128:
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 2
    else:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
    check_backward_options(options)
    get = lambda key, default: options.get("bwd_" + key, options.get(key, default))  # noqa: E731
    tiles = {}
    for key, default, sparse in (("BLOCK_M1", m1, sparse_q), ("BLOCK_N1", n1, sparse_kv),
                                 ("BLOCK_M2", m2, sparse_q), ("BLOCK_N2", n2, sparse_kv)):
        tiles[key] = largest_pow2_dividing(sparse, get(key, default))
        if tiles[key] < 16:
            raise FlexcompError(
                f"the triton backend tiles the BlockMask's blocks with tiles of at least 16x16, but block_mask "
                f"has BLOCK_SIZE=({sparse_q}, {sparse_kv}); create it with block sizes that are multiples of 16")
    warps, stages = get("num_warps", warps), get("num_stages", stages)
    split = options.get("BWD_SPLIT", split)
    if not interpret:
        d_pad, dv_pad = pad_dim(head_dim), pad_dim(value_dim)
        # per stage, the dK/dV loop streams a q and a dO tile; k, v stay resident
        resident = tiles["BLOCK_N1"] * (d_pad + dv_pad) * elt
        per_stage = tiles["BLOCK_M1"] * (d_pad + dv_pad) * elt
        while stages > 1 and resident + stages * per_stage > smem_limit:
            stages -= 1
    return BackwardConfig(tiles["BLOCK_M1"], tiles["BLOCK_N1"], tiles["BLOCK_M2"], tiles["BLOCK_N2"], warps, stages,
                          split)


def check_backward_options(options: dict) -> None:
    """The backward's ``kernel_options``, checked when the forward is called (not at ``.backward()``)."""
    for key in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        for name in (key, "bwd_" + key):
            v = options.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1)):
                raise FlexcompError(f"kernel_options[{name!r}] must be a power of two >= 16, got {v!r}")
    split = options.get("BWD_SPLIT", False)
    if not isinstance(split, bool):
        raise FlexcompError(f"kernel_options['BWD_SPLIT'] must be True or False, got {split!r}")


def _smaller(cfg: BackwardConfig) -> Optional[BackwardConfig]:
    """The next config down when ``cfg`` does not fit the device: fewer stages, then halved tiles."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    tiles = [max(16, t // 2) for t in (cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2)]
    if tiles == [cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2]:
        return None
    return replace(cfg, block_m1=tiles[0], block_n1=tiles[1], block_m2=tiles[2], block_n2=tiles[3], num_warps=4)


@dataclass(frozen=True)
class _Scatter:
    """Gradient buffers for captured tensors: the generated scatter and what it writes."""

    fn: object
    grads: tuple  # one per score_mod buffer: float32 (atomics) or int64 (deterministic); dummies
    gstrides: tuple
    aux: torch.Tensor  # float32 per buffer: largest contribution, then the fixed-point scale
    wanted: tuple  # per buffer: whether its gradient is asked for
    loads_per_buffer: tuple  # per buffer: how many differentiated loads read it


def _scatter(score: TracedMod, wanted: tuple, deterministic: bool, device,
             ft: FloatType = FloatType.F32) -> Optional[_Scatter]:
    g = score.graph
    names = tuple(b.name for b, w in zip(g.buffers, wanted) if w)
    loaded = {n.attr for n in float_loads(g)}
    names = tuple(n for n in names if n in loaded)
    if not names:
        return None
    _, fn = jit_scatter(g, names, ft)
    atomic = torch.float64 if ft is FloatType.F64 else torch.float32
    grads, gstrides = [], []
    for spec, t in zip(g.buffers, score.buffers):
        if spec.name in names:
            gt = torch.zeros(t.shape, dtype=torch.int64 if deterministic else atomic, device=device)
        else:
            gt = torch.zeros((), dtype=torch.float32, device=device)
        grads.append(gt)
        gstrides += list(gt.stride()) if spec.name in names and gt.dim() else [0] * max(1, t.dim())
    loads = [n.attr for n in float_loads(g)]
    return _Scatter(fn, tuple(grads), tuple(gstrides), torch.zeros(len(g.buffers), dtype=torch.float32, device=device),
                    tuple(spec.name in names for spec in g.buffers), tuple(loads.count(spec.name) for spec in g.buffers))


def flex_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  d_out: torch.Tensor, d_lse: Optional[torch.Tensor], score: Optional[TracedMod],
                  mask: Optional[TracedMod], block_mask, scale: float, torch_options: dict, interpret: bool,
                  buffer_grads: tuple = (), deterministic: bool = False):
    """Gradients ``(dq, dk, dv, [d buffer for each score_mod buffer, None where not asked])``.

    ``buffer_grads`` says, per captured tensor of the score_mod, whether its gradient is wanted.
    """
    B, H, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    check_inputs(q, D, DV)
    device = q.device
    if L == 0 or S == 0:  # no pair of a query and a key: every gradient is 0, and no launch
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                [torch.zeros_like(t) if w else None for t, w in zip(score.buffers if score is not None else (),
                                                                     buffer_grads)])
    if block_mask is None:
        block_mask = full_block_mask(L, S, device)
    sq, skv = block_mask.BLOCK_SIZE
    heavy = score is not None and memo(("transcendental", score.graph.structural_key()),
                                       lambda: any(n.op in TRANSCENDENTAL for n in score.graph.nodes))
    scatter = score is not None and any(buffer_grads)
    cfg_key = ("bwd", D, DV, q.element_size(), sq, skv, tuple(sorted(torch_options.items())), interpret,
               score is not None, heavy, scatter, device)
    cfg = memo(cfg_key, lambda: backward_config(D, DV, q.element_size(), sq, skv, torch_options, interpret,
                                                smem_limit_of(device), score is not None, heavy, scatter))
    precision = dot_precision(q)
    fp64 = q.dtype == torch.float64
    ft = FloatType.F64 if fp64 else FloatType.F32
    sm_scale = kernel_scale(scale, q)

    delta = torch.empty(B, H, L, dtype=stats_dtype(q), device=device)
    dl = d_lse if d_lse is not None else lse
    flex_bwd_delta[(triton.cdiv(L, 64), B * H)](
        out, d_out, dl, delta, *out.stride(), *d_out.stride(), *dl.stride(), H, L,
        HAS_DLSE=d_lse is not None, BLOCK_M=64, DV=DV, DV_PAD=pad_dim(DV), FP64=fp64)

    # captured indices were checked by the forward (and in-place changes since then raise)
    if score is not None:
        _, score_fn = jit_grad_function(score.graph, ft)
        _, sa = mod_args(score, device, ft)
    else:
        score_fn, sa = None, mod_args(None, device, ft)[1]
    mask_fn, ma = mod_args(mask, device)
    sc = (_scatter(score, tuple(buffer_grads), deterministic, device, ft) if score is not None and any(buffer_grads)
          else None)
    scatter_args = (None, sa.bufs, (0,), delta) if sc is None else (sc.fn, sc.grads, sc.gstrides, sc.aux)

    kb = 0 if k.shape[0] == 1 and B > 1 else 1
    kv_lists = block_lists(block_mask, B, H, transposed=False)
    q_lists = block_lists(block_mask, B, H, transposed=True)
    Bk = B if kb == 0 else k.shape[0]
    dq = torch.empty_like(q)
    dk = torch.empty(Bk, Hkv, S, D, dtype=k.dtype if kb else stats_dtype(q), device=device)
    dv = torch.empty(Bk, Hkv, S, DV, dtype=v.dtype if kb else stats_dtype(q), device=device)
    G = H // Hkv

    def launch(run_dq: bool, run_dkdv: bool, dq_scatter: int, dkdv_scatter: int):
        nonlocal cfg
        while True:
            try:
                return launch_with(cfg, run_dq, run_dkdv, dq_scatter, dkdv_scatter)
            except OutOfResources:  # e.g. a wide scatter's layout conversions: smaller tiles, remembered
                smaller = _smaller(cfg)
                if smaller is None:
                    raise
                cfg = memo_set(cfg_key, smaller)

    def launch_with(cfg: BackwardConfig, run_dq: bool, run_dkdv: bool, dq_scatter: int, dkdv_scatter: int):
        n_kv, n_q = triton.cdiv(S, cfg.block_n1), triton.cdiv(L, cfg.block_m2)
        grid = ((n_kv if run_dkdv else 0) + (G * n_q if run_dq else 0), B * Hkv)
        flex_bwd[grid](
            q, k, v, d_out, dq, dk, dv, lse, delta,
            *q.stride(), k.stride(0) * kb, *k.stride()[1:], v.stride(0) * kb, *v.stride()[1:], *d_out.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
            *kv_lists.tensors, *kv_lists.num.stride(), *kv_lists.idx.stride(),
            *q_lists.tensors, *q_lists.num.stride(), *q_lists.idx.stride(),
            Hkv, L, S, G, sm_scale, n_kv, n_q,
            score_fn, sa.bufs, sa.strides, sa.sizes, sa.scalars_i, sa.scalars_f,
            mask_fn, ma.bufs, ma.strides, ma.sizes, ma.scalars_i, ma.scalars_f, *scatter_args,
            HAS_SCORE_MOD=score_fn is not None, HAS_MASK_MOD=mask_fn is not None,
            HAS_KV_FULL=kv_lists.has_full, HAS_Q_FULL=q_lists.has_full,
            DQ_SCATTER=dq_scatter, DKDV_SCATTER=dkdv_scatter, RUN_DQ=run_dq, RUN_DKDV=run_dkdv,
            SPARSE_Q=sq, SPARSE_KV=skv,
            BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
            D=D, D_PAD=pad_dim(D), DV=DV, DV_PAD=pad_dim(DV), PRECISION=precision, EVEN_Q=L % sq == 0,
            EVEN_KV=S % skv == 0, FP64=fp64, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if sc is not None and deterministic:
        launch(True, False, 1, -1)  # dQ, recording the largest captured-tensor contribution
        # every (b, h, q, kv) pair adds at most |max| once per load of a tensor into each element
        terms = torch.tensor([math.ceil(math.log2(max(2, B * H * L * S * n))) for n in sc.loads_per_buffer],
                             dtype=torch.float32, device=device)
        e = 62 - terms - torch.ceil(torch.log2(sc.aux))
        sc.aux.copy_(torch.exp2(torch.clamp(e, -100.0, 100.0)))
        launch(False, True, -1, 2)  # dK, dV and the fixed-point scatter
    elif cfg.split:
        launch(True, False, -1, -1)
        launch(False, True, -1, 0 if sc is not None else -1)
    else:
        launch(True, True, -1, 0 if sc is not None else -1)
    if kb == 0:  # keys and values broadcast over the batch: sum their gradients
        dk = dk.sum(0, keepdim=True).to(k.dtype)
        dv = dv.sum(0, keepdim=True).to(v.dtype)

    buf_grads = []
    for i, t in enumerate(score.buffers if score is not None else ()):
        if sc is None or not sc.wanted[i]:
            buf_grads.append(None)
            continue
        gt = sc.grads[i]
        if deterministic:
            gt = gt.to(torch.float64) / sc.aux[i].to(torch.float64)
        buf_grads.append(gt.to(t.dtype))
    return dq, dk, dv, buf_grads
