"""The Triton backend's backward: gradient buffers, the deterministic scale, the launches.

As for the forward, q, k, v, dO and the BlockMask go to the kernels as strides, without copies.
dK and dV come out per query batch when keys and values broadcast over the batch (batch 1), and
are summed here. Gradients into captured tensors (the score_mod's float buffers that require
grad) accumulate in float32 (atomics), or, with ``kernel_options={"DETERMINISTIC": True}``, in
int64 fixed point, scaled per tensor by a power of two chosen from the largest contribution
(recorded by the dQ pass), so that no sum can overflow and every run gives the same bits.

Which launches run, with which tiles and scatter modes, is the plan's
(``Plan.backward_launches``, ``Plan.backward``); a config the device refuses is retried smaller
and remembered in the plan (:func:`flexcomp.plan.refit`).

float64 inputs: the kernels' ``FP64`` switch, float64 delta and (atomic) captured-tensor gradients,
the float64 variants of the generated functions. ``L`` or ``S`` of 0 launches nothing: zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from triton.runtime.errors import OutOfResources

from flexcomp.plan import BackwardLaunch, Plan, ScatterMode, refit
from flexcomp.problem import Grads, Problem, Saved
from flexcomp.tiles import BackwardConfig, cdiv, pad_dim, smaller_backward

from . import ahead
from .ahead import KernelLaunch
from .kernels.backward import flex_bwd, flex_bwd_delta
from .launch import (block_lists, block_mask_of, dot_precision, dropout_args, float_type, kernel_scale, kv_strides,
                     mod_args, output_like, stand_ins, stats_dtype)
from .lower import FloatType
from .modules import jit_scatter

DELTA_ROWS = 64  # query rows per program of flex_bwd_delta
FIXED_POINT_BITS = 62  # int64 fixed point: the largest sum stays below 2**62
SCALE_EXPONENT_LIMIT = 100.0  # fixed-point scales stay within 2**+-100 (float32 range)


@dataclass(frozen=True)
class _Scatter:
    """Gradient buffers for captured tensors: the generated scatter and ``grads``, the flat tuple it
    reads (one gradient per score_mod buffer, a dummy where none is wanted, their strides, ``aux``)."""

    fn: object
    grads: tuple
    buffers: tuple  # per score_mod buffer: its gradient tensor (float32/64 atomics or int64), None if not wanted
    aux: torch.Tensor  # float32 per buffer: largest contribution, then the fixed-point scale


def _scatter(problem: Problem, plan: Plan, device: torch.device) -> Optional[_Scatter]:
    """The scatter and its gradient buffers on ``device`` (``meta`` for stand-ins)."""
    if plan.scatter is None:
        return None
    score = problem.score
    ft = float_type(plan, problem)
    # by position: the plan and its scatter graph may come from a mod whose captures had other names
    names = tuple(plan.scatter.buffers[i].name for i in plan.scatter_buffers)
    _, fn = jit_scatter(plan.scatter, names, ft, problem.options.sources)
    deterministic = problem.options.deterministic
    accumulate = torch.int64 if deterministic else torch.float64 if ft is FloatType.F64 else torch.float32
    grads, gstrides, buffers = [], [], []
    for i, t in enumerate(score.buffers):
        if i in plan.scatter_buffers:
            gt = torch.zeros(t.shape, dtype=accumulate, device=device)
            buffers.append(gt)
            gstrides += list(gt.stride()) if gt.dim() else [0]
        else:  # a placeholder: the scatter never writes it
            gt = torch.zeros((), dtype=torch.float32, device=device)
            buffers.append(None)
            gstrides += [0] * max(1, t.dim())
        grads.append(gt)
    aux = torch.zeros(len(score.buffers), dtype=torch.float32, device=device)
    return _Scatter(fn, (*grads, *gstrides, aux), tuple(buffers), aux)


def backward(problem: Problem, plan: Plan, saved: Saved, d_out: Optional[torch.Tensor],
             d_lse: Optional[torch.Tensor]) -> Grads:
    """Gradients of q, k, v and of each score_mod buffer (None where the plan computes none)."""
    q, k, v, out, lse = saved.q, saved.k, saved.v, saved.out, saved.lse
    B, H, L, S = problem.batch, problem.heads, problem.q_len, problem.kv_len
    device = problem.device
    if d_out is None:
        d_out = torch.zeros_like(out)
    score = problem.score
    if L == 0 or S == 0:  # no pair of a query and a key: every gradient is 0, and no launch
        return Grads(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                     tuple(torch.zeros_like(t) if w else None for t, w in
                           zip(score.buffers if score is not None else (), problem.score_grads)))
    ahead.wait(backward_key(plan))  # the backward's kernels, compiling since the forward
    block_mask = block_mask_of(problem)
    delta = torch.empty(B, H, L, dtype=stats_dtype(problem.dtype), device=device)
    delta_launch(problem, out, d_out, d_lse, lse, delta).run()

    # captured indices were checked by the forward (and in-place changes since then raise)
    sa, ma = _backward_mods(problem, plan)
    sc = _scatter(problem, plan, device)
    kb = problem.kv_batch == 1 and B > 1  # keys and values broadcast over the batch: dK, dV per batch, summed
    dq, dk, dv = _grad_buffers(problem, q, device)
    args = _Args(problem, plan, block_mask, q, k, v, d_out, dq, dk, dv, lse, delta, sa, ma, sc)
    for launch in plan.backward_launches:
        if launch.dq_scatter is ScatterMode.NONE and launch.dkdv_scatter is ScatterMode.FIXED_POINT:
            _fixed_point_scale(problem, plan, sc)  # after the dQ pass recorded the largest contributions
        plan = _launch_fitting(args, plan, launch)
    if kb:
        dk = dk.sum(0, keepdim=True).to(k.dtype)
        dv = dv.sum(0, keepdim=True).to(v.dtype)
    d_buffers = []
    for i, t in enumerate(score.buffers if score is not None else ()):
        gt = sc.buffers[i] if sc is not None else None
        if gt is not None and problem.options.deterministic:
            gt = gt.to(torch.float64) / sc.aux[i].to(torch.float64)
        d_buffers.append(None if gt is None else gt.to(t.dtype))
    return Grads(dq, dk, dv, tuple(d_buffers))


def backward_key(plan: Plan) -> tuple:
    """Under which key the forward defers the backward's compiles (:func:`.ahead.defer`)."""
    return ("backward", plan.key)


def delta_launch(problem: Problem, out, d_out, d_lse, lse, delta) -> KernelLaunch:
    """``flex_bwd_delta``'s launch: ``delta = rowsum(dO * O) - dLSE``."""
    dl = d_lse if d_lse is not None else lse
    grid = (cdiv(problem.q_len, DELTA_ROWS), problem.batch * problem.heads)
    return KernelLaunch(flex_bwd_delta, grid, (
        out, d_out, dl, delta, out.stride(), d_out.stride(), dl.stride(), problem.heads, problem.q_len), dict(
        HAS_DLSE=d_lse is not None, BLOCK_M=DELTA_ROWS, DV=problem.value_dim, DV_PAD=pad_dim(problem.value_dim),
        FP64=problem.dtype == torch.float64))


def _backward_mods(problem: Problem, plan: Plan) -> tuple:
    """The score_mod's value-and-derivative function and the mask_mod, with their arguments."""
    ft, sources = float_type(plan, problem), problem.options.sources
    return (mod_args(problem.score, plan.score_grad, problem.device, ft, sources=sources),
            mod_args(problem.mask, plan.mask, problem.device, sources=sources))


def _grad_buffers(problem: Problem, q: torch.Tensor, device: torch.device) -> tuple:
    """Empty dQ (q's layout), dK and dV; per query batch, in float32, when keys and values broadcast
    over the batch (summed afterwards)."""
    kb = problem.kv_batch == 1 and problem.batch > 1
    dt = stats_dtype(problem.dtype) if kb else problem.dtype
    shape = (problem.batch if kb else problem.kv_batch, problem.kv_heads, problem.kv_len)
    return (torch.empty_like(q, device=device), torch.empty(*shape, problem.head_dim, dtype=dt, device=device),
            torch.empty(*shape, problem.value_dim, dtype=dt, device=device))


def backward_ahead(problem: Problem, plan: Plan) -> list[KernelLaunch]:
    """:func:`backward`'s launches with ``meta`` stand-ins for every tensor but the block lists and
    the mods' captures, for a dO in the output's layout and no dLSE: to compile at the forward."""
    q, k, v = stand_ins(problem)
    meta = q.device
    out = output_like(q, problem.value_dim, problem.dtype)
    lse = torch.empty(problem.batch, problem.heads, problem.q_len, dtype=stats_dtype(problem.dtype), device=meta)
    delta = torch.empty_like(lse)
    block_mask = block_mask_of(problem)
    sa, ma = _backward_mods(problem, plan)
    dq, dk, dv = _grad_buffers(problem, q, meta)
    args = _Args(problem, plan, block_mask, q, k, v, torch.empty_like(out), dq, dk, dv, lse, delta, sa, ma,
                 _scatter(problem, plan, meta))
    return [delta_launch(problem, out, args.d_out, None, lse, delta),
            *(_bwd_launch(args, plan.backward, launch) for launch in plan.backward_launches)]


def _fixed_point_scale(problem: Problem, plan: Plan, sc: _Scatter) -> None:
    """Every (b, h, q, kv) pair adds at most the recorded maximum once per load of a tensor into
    each element: ``2**e`` with ``e`` chosen so that no sum can reach 2**62."""
    pairs = problem.batch * problem.heads * problem.q_len * problem.kv_len
    terms = torch.tensor([math.ceil(math.log2(max(2, pairs * n))) for n in plan.loads_per_buffer],
                         dtype=torch.float32, device=problem.device)
    e = FIXED_POINT_BITS - terms - torch.ceil(torch.log2(sc.aux))
    sc.aux.copy_(torch.exp2(torch.clamp(e, -SCALE_EXPONENT_LIMIT, SCALE_EXPONENT_LIMIT)))


@dataclass(frozen=True)
class _Args:
    """One backward's tensors and generated functions, for its launches."""

    problem: Problem
    plan: Plan
    block_mask: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    d_out: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    sa: object
    ma: object
    sc: Optional[_Scatter]


def _launch_fitting(a: _Args, plan: Plan, launch: BackwardLaunch) -> Plan:
    """Launch; a config out of shared memory (a wide scatter's layout conversions) is retried with
    the next smaller one, which the plan keeps for later calls."""
    while True:
        try:
            _launch(a, plan.backward, launch)
            return plan
        except OutOfResources:
            smaller = smaller_backward(plan.backward)
            if smaller is None:
                raise
            plan = refit(plan, backward=smaller)


def _launch(a: _Args, cfg: BackwardConfig, launch: BackwardLaunch) -> None:
    _bwd_launch(a, cfg, launch).run()


def _bwd_launch(a: _Args, cfg: BackwardConfig, launch: BackwardLaunch) -> KernelLaunch:
    p = a.problem
    sq, skv = a.block_mask.BLOCK_SIZE
    kv_lists = block_lists(a.block_mask, p.batch, p.heads, transposed=False)
    q_lists = block_lists(a.block_mask, p.batch, p.heads, transposed=True)
    n_kv, n_q = cdiv(p.kv_len, cfg.block_n1), cdiv(p.q_len, cfg.block_m2)
    grid = ((n_kv if launch.run_dkdv else 0) + (p.group * n_q if launch.run_dq else 0), p.batch * p.kv_heads)
    scatter_fn, grads = (None, (a.delta,)) if a.sc is None else (a.sc.fn, a.sc.grads)
    return KernelLaunch(flex_bwd, grid, (
        a.q, a.k, a.v, a.d_out, a.dq, a.dk, a.dv, a.lse, a.delta,
        a.q.stride(), kv_strides(p, a.k), kv_strides(p, a.v), a.d_out.stride(), a.dq.stride(), a.dk.stride(),
        a.dv.stride(), a.lse.stride(),
        *kv_lists.tensors, kv_lists.num.stride(), kv_lists.idx.stride(),
        *q_lists.tensors, q_lists.num.stride(), q_lists.idx.stride(),
        p.kv_heads, p.q_len, p.kv_len, p.group, kernel_scale(p), n_kv, n_q,
        a.sa.fn, a.sa.bufs, a.ma.fn, a.ma.bufs, scatter_fn, grads), dict(
        HAS_SCORE_MOD=a.sa.fn is not None, HAS_MASK_MOD=a.ma.fn is not None,
        HAS_KV_FULL=kv_lists.has_full, HAS_Q_FULL=q_lists.has_full,
        DQ_SCATTER=int(launch.dq_scatter), DKDV_SCATTER=int(launch.dkdv_scatter), RUN_DQ=launch.run_dq,
        RUN_DKDV=launch.run_dkdv, SPARSE_Q=sq, SPARSE_KV=skv,
        BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
        D=p.head_dim, D_PAD=pad_dim(p.head_dim), DV=p.value_dim, DV_PAD=pad_dim(p.value_dim),
        PRECISION=dot_precision(p.dtype), EVEN_Q=p.q_len % sq == 0, EVEN_KV=p.kv_len % skv == 0,
        FP64=p.dtype == torch.float64, DROPOUT=p.dropout is not None, DROP=dropout_args(p),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages))
