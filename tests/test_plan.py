"""The plan stage: passes, tiles, launches, index checks, kept once per problem signature."""
from __future__ import annotations

import dataclasses

import torch

from flexcomp.ir import ModKind
from flexcomp.masks import alibi, causal_mask, softcap
from flexcomp.options import Backend, Options
from flexcomp.plan import BackwardLaunch, ScatterMode, plan_for, refit
from flexcomp.problem import make_problem
from flexcomp.tiles import KernelFamily
from flexcomp.trace import trace


def _problem(score=None, mask=None, dtype=torch.bfloat16, kernel_options=None, S=256, D=64, grad_buffers=False):
    q = torch.empty(2, 4, S, D, dtype=dtype, device="meta")
    kv = torch.empty(2, 2, S, D, dtype=dtype, device="meta")
    tm = trace(score, ModKind.SCORE) if score is not None else None
    if tm is not None and grad_buffers:
        for t in tm.buffers:
            t.requires_grad_(True)
    mtm = trace(mask, ModKind.MASK) if mask is not None else None
    options = dataclasses.replace(Options.parse(kernel_options), interpret=False)  # the GPU's tiles, whatever the env
    return make_problem(q, kv, kv, tm, mtm, None, D ** -0.5, options)


def test_problem_record_has_the_call_s_facts():
    p = _problem(softcap(20.0))
    assert (p.batch, p.heads, p.kv_heads, p.group, p.q_len, p.kv_len, p.head_dim, p.value_dim) == (2, 4, 2, 2, 256, 256,
                                                                                                   64, 64)
    assert p.score_grads == () and p.q_offset == 0 and p.page_table is None and p.seq_lens is None
    assert hash(p.signature()) == hash(_problem(softcap(3.0)).signature())  # captured values are not in it


def test_triton_plan_runs_named_passes_and_is_kept():
    p = _problem(softcap(20.0), causal_mask)
    plan = plan_for(p, Backend.TRITON)
    assert plan.passes == ("forward", "value_and_derivatives", "tiles")
    assert plan.family is KernelFamily.PREFILL and plan.score_grad.extra_outputs and plan.scatter is None
    assert plan_for(_problem(softcap(5.0), causal_mask), Backend.TRITON) is plan  # one plan per signature
    assert plan.backward.split and plan.backward_launches == (BackwardLaunch(True, False), BackwardLaunch(False, True))
    text = plan.describe()
    assert text.startswith("# plan: triton backend, prefill kernels; passes forward, value_and_derivatives, tiles")
    assert "# backward tiles: BackwardConfig(" in text and "tanh" in text


def test_reference_plan_runs_only_the_forward_pass():
    plan = plan_for(_problem(softcap(20.0)), Backend.REFERENCE)
    assert plan.passes == ("forward",) and plan.forward is None and plan.score_grad is None


def test_gradients_into_captures_add_the_scatter_pass_and_its_launch_modes():
    slopes = torch.rand(4)

    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    plan = plan_for(_problem(alibi_bias, grad_buffers=True), Backend.TRITON)
    assert plan.passes == ("forward", "value_and_derivatives", "scatter", "tiles")
    assert plan.scatter_buffers == (0,) and plan.loads_per_buffer == (1,)  # by position: slopes
    assert plan.backward_launches == (BackwardLaunch(True, True, dkdv_scatter=ScatterMode.ATOMIC),)
    det = plan_for(_problem(alibi_bias, grad_buffers=True, kernel_options={"DETERMINISTIC": True}), Backend.TRITON)
    assert det.backward_launches == (BackwardLaunch(True, False, dq_scatter=ScatterMode.RECORD_MAX),
                                     BackwardLaunch(False, True, dkdv_scatter=ScatterMode.FIXED_POINT))


def test_tile_requests_are_parsed_once_and_checked_by_the_plan():
    opts = Options.parse({"BLOCK_M": 64, "fwd_BLOCK_M": 32, "bwd_num_warps": 8, "BACKEND": "triton"})
    assert (opts.forward.block_m, opts.forward.key_of("block_m"), opts.backward.num_warps) == (32, "fwd_BLOCK_M", 8)
    assert Options.parse({"BLOCK_M": 64}) is Options.parse({"BLOCK_M": 64})  # kept per content
    plan = plan_for(_problem(kernel_options={"fwd_BLOCK_M": 32, "BLOCK_N1": 32}), Backend.TRITON)
    assert plan.forward.block_m == 32 and plan.backward.block_n1 == 32


def test_refit_is_remembered_for_later_calls():
    p = _problem(alibi(4), causal_mask, D=32)
    plan = plan_for(p, Backend.TRITON)
    smaller = refit(plan, forward=plan.forward.__class__(16, 16, 4, 1, False))
    assert plan_for(p, Backend.TRITON).forward == smaller.forward


def test_index_checks_follow_the_captured_values():
    table = torch.arange(256)

    def shifted(b, h, q_idx, kv_idx):
        return table[kv_idx] <= q_idx

    p = _problem(mask=shifted)
    assert not plan_for(p, Backend.TRITON).mask_checked  # every index in range, proven
    short = torch.arange(100)

    def too_short(b, h, q_idx, kv_idx):
        return short[kv_idx] <= q_idx

    assert plan_for(_problem(mask=too_short), Backend.TRITON).mask_checked  # kv_idx reaches 255
