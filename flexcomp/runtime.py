"""Runtime: the Backend protocol, one autograd Function for every backend, and dispatch.

A call arrives as a :class:`~flexcomp.problem.Problem`; :func:`run_attention` chooses the backend
(:func:`flexcomp.options.choose_backend`), takes its plan (:func:`flexcomp.plan.plan_for`) and
runs :class:`_Attention`, whose forward and backward are the backend's. Backends:

- ``reference`` (:class:`flexcomp.reference.ReferenceBackend`): torch ops from the IR, chunked;
  any device and dtype; the oracle for every kernel family;
- ``triton`` (:class:`flexcomp.codegen.backend.TritonBackend`): the generated kernels; it chooses
  the kernel family inside (prefill today).

Nothing falls back silently: a backend that cannot run a call raises and says why.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .options import Backend, Options, choose_backend
from .plan import Plan, plan_for
from .problem import Grads, Outputs, Problem, Saved, make_problem
from .reference import REFERENCE_BACKEND
from .trace import TracedMod

__all__ = ["AttentionBackend", "Outputs", "Saved", "Grads", "backend_for", "run_attention", "run_forward",
           "run_backward", "Options"]


class AttentionBackend(Protocol):
    """What a backend implements. ``wanted`` says which gradients autograd asks for: q, k, v, then
    one per captured tensor of the score_mod; ``d_out`` / ``d_lse`` may be None (not used)."""

    def check(self, problem: Problem) -> None:
        """Raise if this backend cannot run ``problem`` (before anything runs)."""

    def prepare(self, problem: Problem, plan: Plan, backward: bool) -> None:
        """Before the forward: get ready what it (and, when ``backward``, the backward) will run."""

    def forward(self, problem: Problem, plan: Plan, q: Tensor, k: Tensor, v: Tensor) -> Outputs:
        """Run the forward."""

    def backward(self, problem: Problem, plan: Plan, saved: Saved, d_out: Optional[Tensor],
                 d_lse: Optional[Tensor], wanted: tuple[bool, ...]) -> Grads:
        """Run the backward."""


_BACKENDS: dict[Backend, AttentionBackend] = {Backend.REFERENCE: REFERENCE_BACKEND}


def backend_for(backend: Backend) -> AttentionBackend:
    """The implementation of ``backend`` (the Triton one imports Triton on first use)."""
    impl = _BACKENDS.get(backend)
    if impl is None:  # the Triton backend: its module imports Triton, so it loads when first asked for
        from flexcomp.codegen.backend import TRITON_BACKEND

        impl = _BACKENDS[Backend.TRITON] = TRITON_BACKEND
    return impl


class _Attention(torch.autograd.Function):
    """Every backend's forward, and its backward as the gradient.

    Inputs ``(backend, problem, plan, q, k, v, *score_buffers)``; outputs ``(out, lse, max_scores)``,
    ``max_scores`` None unless asked and never differentiable (as torch). The score_mod's captured
    tensors are inputs, so autograd routes their gradients; the mask_mod's are saved too, so changing
    one in place before backward raises torch's error."""

    @staticmethod
    def forward(ctx, impl: AttentionBackend, problem: Problem, plan: Plan, q: Tensor, k: Tensor, v: Tensor,
                *score_buffers: Tensor):
        impl.prepare(problem, plan, backward=any(ctx.needs_input_grad[3:]))
        res = impl.forward(problem, plan, q, k, v)
        if res.max_scores is not None:
            ctx.mark_non_differentiable(res.max_scores)
        ctx.impl, ctx.problem, ctx.plan = impl, problem, plan
        ctx.n_score = len(score_buffers)
        mask_buffers = problem.mask.buffers if problem.mask is not None else ()
        ctx.save_for_backward(q, k, v, res.out, res.lse, *score_buffers, *mask_buffers)
        ctx.set_materialize_grads(False)
        return res.out, res.lse, res.max_scores

    @staticmethod
    @once_differentiable  # a gradient of the gradient raises instead of silently being zero
    def backward(ctx, d_out: Optional[Tensor], d_lse: Optional[Tensor], d_max: Optional[Tensor] = None):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        saved = Saved(q, k, v, out, lse, tuple(rest[:ctx.n_score]))
        wanted = tuple(ctx.needs_input_grad[3:])
        g = ctx.impl.backward(ctx.problem, ctx.plan, saved, d_out, d_lse, wanted)
        keep = lambda x, want: x if want else None  # noqa: E731
        # a capture held on another device (a CPU bias under CUDA attention) gets its gradient there
        d_buffers = [None if d is None else d.to(b.device) for d, b in zip(g.d_buffers, saved.score_buffers)]
        return (None, None, None, keep(g.dq, wanted[0]), keep(g.dk, wanted[1]), keep(g.dv, wanted[2]),
                *(keep(d, w) for d, w in zip(d_buffers, wanted[3:])))


def run_attention(q: Tensor, k: Tensor, v: Tensor, score: Optional[TracedMod], mask: Optional[TracedMod],
                  block_mask, scale: float, options: Options, want_max: bool = False, dropout=None):
    """Run one validated call on its backend; returns ``(output, lse, max_scores)``.

    ``max_scores`` (``[B, Hq, Q_LEN]``, the row max of the post-mod, masked scores, no gradient) is
    None unless ``want_max``. ``dropout``: a :class:`flexcomp.dropout.Dropout` or None. Every backend
    returns the same triple.

    >>> import torch
    >>> from flexcomp.options import Options
    >>> q = k = v = torch.randn(1, 2, 16, 8)
    >>> out, lse, mx = run_attention(q, k, v, None, None, None, 0.5, Options.parse({"BACKEND": "reference"}), True)
    >>> out.shape, lse.shape, torch.allclose(mx, (q @ k.transpose(-1, -2) * 0.5).amax(-1))
    (torch.Size([1, 2, 16, 8]), torch.Size([1, 2, 16]), True)
    """
    impl, problem, plan = _prepare(q, k, v, score, mask, block_mask, scale, options, want_max, dropout)
    buffers = score.buffers if score else ()
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *buffers))):
        # nothing to differentiate (inference, no_grad): the backend's forward without autograd's
        # Function machinery, about a fifth of a call's host time
        res = _forward_only(impl, problem, plan, q, k, v)
        return res.out, res.lse, res.max_scores if want_max else None
    out, lse, max_scores = _Attention.apply(impl, problem, plan, q, k, v, *buffers)
    return out, lse, max_scores if want_max else None


def _prepare(q: Tensor, k: Tensor, v: Tensor, score: Optional[TracedMod], mask: Optional[TracedMod], block_mask,
             scale: float, options: Options, want_max: bool = False, dropout=None):
    """The backend, the problem record and its plan for one call."""
    problem = make_problem(q, k, v, score, mask, block_mask, scale, options, want_max, dropout)
    backend = choose_backend(options, q.device)
    impl = backend_for(backend)
    impl.check(problem)
    return impl, problem, plan_for(problem, backend)


def run_forward(q: Tensor, k: Tensor, v: Tensor, score: Optional[TracedMod], mask: Optional[TracedMod], block_mask,
                scale: float, options: Options, want_max: bool = False) -> Outputs:
    """The forward alone, outside autograd (:mod:`flexcomp.custom_ops` registers its own gradient):
    ``Outputs(out, lse, max_scores)`` as :func:`run_attention` computes them."""
    impl, problem, plan = _prepare(q, k, v, score, mask, block_mask, scale, options, want_max)
    return _forward_only(impl, problem, plan, q, k, v)


def _forward_only(impl: AttentionBackend, problem: Problem, plan: Plan, q: Tensor, k: Tensor, v: Tensor) -> Outputs:
    """The backend's forward for a call no backward will follow."""
    impl.prepare(problem, plan, backward=False)
    return impl.forward(problem, plan, q, k, v)


def run_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Optional[Tensor],
                 d_lse: Optional[Tensor], score: Optional[TracedMod], mask: Optional[TracedMod], block_mask,
                 scale: float, options: Options) -> Grads:
    """The gradients of q, k and v for a forward of :func:`run_forward` (its ``out`` and ``lse``), given
    the gradients of the output and of the LSE (either may be None); none into captured tensors."""
    impl, problem, plan = _prepare(q, k, v, score, mask, block_mask, scale, options)
    saved = Saved(q, k, v, out, lse, tuple(score.buffers) if score else ())
    wanted = (True, True, True) + (False,) * len(saved.score_buffers)
    return impl.backward(problem, plan, saved, d_out, d_lse, wanted)
