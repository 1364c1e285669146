"""The Triton backend's decode forward: the split-KV kernel and the merge of its splits.

The plan chose the decode family (:func:`flexcomp.plan.family_for`: few queries, many keys) and its
tiles; here the call's layout (:func:`flexcomp.tiles.decode_layout`: how many query heads share a
tile, how many splits) is decided from the BlockMask's lists and the device, and the kernels run.
Inputs, mods and block lists reach the kernel exactly as in the prefill forward
(:mod:`flexcomp.codegen.launch`); nothing is copied.
"""
from __future__ import annotations

import torch

from flexcomp.cache import CACHE
from flexcomp.plan import Plan
from flexcomp.problem import Outputs, Problem
from flexcomp.tiles import DecodeLayout, decode_layout, next_power_of_2, pad_dim

from .ahead import KernelLaunch
from .kernels.decode import decode_merge, flex_decode
from .launch import (BlockLists, ForwardArgs, ModArgs, dot_precision, forward_args, kv_strides, raise_if_out_of_range,
                     stand_ins)

INTERPRETER_MULTIPROCESSORS = 4  # under Triton's interpreter: a few splits, so that tests cover the merge


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (kept: a device query costs)."""
    def query() -> int:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return INTERPRETER_MULTIPROCESSORS

    return CACHE.get_or_make(("multiprocessors", device), query)


def layout_of(problem: Problem, plan: Plan, lists: BlockLists) -> DecodeLayout:
    """The call's :class:`DecodeLayout`; heads share tiles only where the lists do not differ by head
    (the BlockMask's head dim is 1 or broadcast)."""
    per_head = lists.num.shape[1] > 1 and lists.num.stride(1) != 0
    if lists.has_full:
        per_head = per_head or (lists.full_num.shape[1] > 1 and lists.full_num.stride(1) != 0)
    sq, skv = problem.block_size
    return decode_layout(problem.batch, problem.heads, problem.group, problem.q_len, problem.kv_len, sq, skv,
                         per_head, multiprocessors(problem.device), plan.decode.waves)


def forward(problem: Problem, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Outputs:
    """The decode forward: output ``[B, Hq, L, Ev]`` (input dtype) and LSE ``[B, Hq, L]`` (natural log,
    float32), as :func:`flexcomp.codegen.launch.forward` returns them. Raises ``FlexcompIndexError``
    when a mod indexed a captured tensor out of range."""
    a = forward_args(problem, plan, q)
    for launch in _launches(problem, plan, q, k, v, a):
        launch.run()
    if a.sa.err is not None or a.ma.err is not None:
        raise_if_out_of_range(((problem.score, a.sa), (problem.mask, a.ma)))
    return Outputs(a.out, a.lse, None)


def forward_ahead(problem: Problem, plan: Plan) -> list[KernelLaunch]:
    """:func:`forward`'s launches for ``meta`` stand-ins of q, k, v and the outputs, to compile before
    the first call (:mod:`.ahead`)."""
    q, k, v = stand_ins(problem)
    return _launches(problem, plan, q, k, v, forward_args(problem, plan, q))


def _launches(problem: Problem, plan: Plan, q, k, v, a: ForwardArgs) -> list[KernelLaunch]:
    """The decode kernel writing ``a.out`` and ``a.lse`` directly (one split), or writing per-split
    partial results (float32 buffers allocated here, on ``out``'s device) and the merge."""
    B, H, L, DV = problem.batch, problem.heads, problem.q_len, problem.value_dim
    out, lse, lists, sa, ma = a.out, a.lse, a.lists, a.sa, a.ma
    layout = layout_of(problem, plan, lists)
    if layout.splits == 1:
        return [_decode_launch(problem, plan, layout, q, k, v, out, lse, lists, sa, ma, split=False)]
    dv_pad = pad_dim(DV)
    o_part = torch.empty(B, H, layout.splits, L, dv_pad, dtype=torch.float32, device=out.device)
    lse_part = torch.empty(B, H, layout.splits, L, dtype=torch.float32, device=out.device)
    merge = KernelLaunch(decode_merge, (B * H, L), (
        o_part, lse_part, out, lse, out.stride(), lse.stride(), H, L, layout.splits), dict(
        SPLITS_PAD=max(2, next_power_of_2(layout.splits)), DV=DV, DV_PAD=dv_pad, num_warps=4))
    return [_decode_launch(problem, plan, layout, q, k, v, o_part, lse_part, lists, sa, ma, split=True), merge]


def _decode_launch(problem: Problem, plan: Plan, layout: DecodeLayout, q, k, v, out, lse, lists: BlockLists,
                   sa: ModArgs, ma: ModArgs, split: bool) -> KernelLaunch:
    cfg = plan.decode
    sq, skv = problem.block_size
    D, DV = problem.head_dim, problem.value_dim
    grid = (layout.splits, problem.batch * (problem.heads // layout.heads), layout.tiles)
    return KernelLaunch(flex_decode, grid, (
        q, k, v, out, lse, q.stride(), kv_strides(problem, k), kv_strides(problem, v),
        out.stride() if not split else (0, 0, 0, 0), lse.stride() if not split else (0, 0, 0),
        *lists.tensors, lists.num.stride(), lists.idx.stride(),
        problem.heads, problem.q_len, problem.kv_len, problem.group, problem.scale,
        sa.fn, sa.bufs, ma.fn, ma.bufs), dict(
        HAS_SCORE_MOD=sa.fn is not None, HAS_MASK_MOD=ma.fn is not None, HAS_FULL=lists.has_full,
        SPARSE_Q=sq, SPARSE_KV=skv, BLOCK_M=layout.block_m, BLOCK_N=cfg.block_n, HEADS=layout.heads,
        ROWS_Q=layout.rows_q, D=D, D_PAD=pad_dim(D), DV=DV, DV_PAD=pad_dim(DV),
        PRECISION=dot_precision(problem.dtype), EVEN_KV=problem.kv_len % skv == 0, STATIC_SUB=cfg.static_sub,
        SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
