"""The Triton backend: a :class:`flexcomp.runtime.AttentionBackend` over the generated kernels.

It runs the plan's kernel family (``family``): the prefill kernels, or for few queries against
many keys the split-KV decode kernels (their backward is the prefill one: it reads only the
saved output and LSE); the reference backend stays the oracle for all of them.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from flexcomp.cache import CACHE
from flexcomp.errors import FlexcompError
from flexcomp.plan import Plan
from flexcomp.problem import Grads, Outputs, Problem, Saved
from flexcomp.tiles import KernelFamily

from . import ahead, launch, launch_backward, launch_decode


class TritonBackend:
    """Generated Triton kernels: CUDA tensors, or any device under ``TRITON_INTERPRET=1`` (tests)."""

    def check(self, problem: Problem) -> None:
        """The kernels need CUDA tensors, or Triton's interpreter."""
        if problem.device.type != "cuda" and not problem.options.interpret:
            raise FlexcompError(
                f"the 'triton' backend needs CUDA tensors (got {problem.device}) or TRITON_INTERPRET=1 set before "
                f"flexcomp launches its first kernel (the Triton interpreter, slow, for tests)")

    def prepare(self, problem: Problem, plan: Plan, backward: bool) -> None:
        """At a plan's first call: its forward kernel, and the backward's when ``backward`` (a gradient
        will be asked for), compiled in parallel (:mod:`.ahead`); returns when the forward's is ready.
        Later calls: one cache lookup."""
        if problem.options.interpret or plan.family not in (KernelFamily.PREFILL, KernelFamily.DECODE):
            return
        key = ("ahead", plan.key, plan.score_checked, plan.mask_checked, backward)
        if CACHE.get(key) is not None:
            return
        CACHE.put(key, True)
        if not ahead.enabled() or problem.q_len == 0 or problem.kv_len == 0:
            return
        ahead.guarded(lambda: self._compile_ahead(problem, plan, backward))

    @staticmethod
    def _compile_ahead(problem: Problem, plan: Plan, backward: bool) -> None:
        forward = ahead.start([launch.forward_ahead(problem, plan)] if plan.family is KernelFamily.PREFILL else
                              launch_decode.forward_ahead(problem, plan), problem.device)
        if backward:
            ahead.defer(launch_backward.backward_key(plan),
                        ahead.start(launch_backward.backward_ahead(problem, plan), problem.device))
        ahead.wait_all(forward)

    def forward(self, problem: Problem, plan: Plan, q: Tensor, k: Tensor, v: Tensor) -> Outputs:
        """The plan's family's forward."""
        if plan.family is KernelFamily.PREFILL:
            return launch.forward(problem, plan, q, k, v)
        if plan.family is KernelFamily.DECODE:
            return launch_decode.forward(problem, plan, q, k, v)
        raise FlexcompError(f"internal: no Triton forward for kernel family {plan.family.value!r}")

    def backward(self, problem: Problem, plan: Plan, saved: Saved, d_out: Optional[Tensor],
                 d_lse: Optional[Tensor], wanted: tuple[bool, ...]) -> Grads:
        """The plan's family's backward (every gradient; autograd keeps the wanted ones)."""
        if plan.family in (KernelFamily.PREFILL, KernelFamily.DECODE):
            return launch_backward.backward(problem, plan, saved, d_out, d_lse)
        raise FlexcompError(f"internal: no Triton backward for kernel family {plan.family.value!r}")


TRITON_BACKEND = TritonBackend()
