"""Runtime: options, backend choice and dispatch.

``kernel_options`` (torch's dict) is converted once, at the API edge, into the frozen
:class:`Options`; nothing downstream reads the dict.

Backend choice, first match wins:

1. ``kernel_options={"BACKEND": ...}``: ``"reference"`` or ``"triton"`` (torch's ``"AUTO"`` means
   "choose"; torch's ``"TRITON"`` means ``"triton"``);
2. the environment variable ``FLEXCOMP_BACKEND`` (same values);
3. the default: ``triton`` on CUDA tensors, ``reference`` elsewhere.

The Triton backend runs on CPU tensors too when ``TRITON_INTERPRET=1`` was set before flexcomp
first launched a kernel (how CI tests the kernels). Nothing falls back silently: a backend that
cannot run a call raises and says why.
"""
from __future__ import annotations

import enum
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blockmask import _ordered_to_dense
from .errors import FlexcompAssertionError, FlexcompError, FlexcompRuntimeError, FlexcompTypeError
from .reference import DEFAULT_CHUNK_ELEMENTS, BlockMap, ReferencePlan, reference_attention
from .trace import TracedMod


class Backend(enum.Enum):
    """Where attention runs."""

    REFERENCE = "reference"  # torch ops from the IR, chunked; any device; the oracle
    TRITON = "triton"  # generated Triton kernels (flexcomp.codegen)


# torch's FlexKernelOptions keys: accepted so research code runs unchanged. They tune torch's
# Inductor kernels and have no meaning for the reference backend.
TORCH_KERNEL_OPTIONS = frozenset({
    "num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ",
    "FORCE_USE_FLEX_ATTENTION", "USE_TMA", "kpack", "matrix_instr_nonkdim", "waves_per_eu",
    "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE", "OUTPUT_MAX",
})
FLEXCOMP_KERNEL_OPTIONS = frozenset({"BACKEND", "CHUNK_ELEMENTS", "DETERMINISTIC"})
# flexcomp's own tuning keys: passed to the Triton backend's configs with torch's
FLEXCOMP_TUNING_OPTIONS = frozenset({"BWD_SPLIT"})


@dataclass(frozen=True)
class Options:
    """What ``kernel_options`` asked for.

    Fields:
        backend: the chosen :class:`Backend` (None: choose by device).
        chunk_elements: score-tile size of the reference backend (memory bound).
        torch_options: torch's tuning keys as given (kept for the Triton backend's configs).
        deterministic: captured-tensor gradients bit-identical run to run (Triton backend: fixed-point
            accumulation instead of float atomics; the reference backend always is).
    """

    backend: Optional[Backend] = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    torch_options: tuple = ()
    deterministic: bool = False

    @staticmethod
    def parse(kernel_options: Optional[Mapping[str, Any]]) -> "Options":
        """Validate torch's ``kernel_options`` dict and convert it.

        Every key is checked for its type (as torch's ``FlexKernelOptions`` declares it): ints
        (``BLOCK_M``, ``num_warps``, ... and their ``fwd_`` / ``bwd_`` forms, ``CHUNK_ELEMENTS``),
        bools (``PRESCALE_QK``, ``WRITE_DQ``, ..., ``DETERMINISTIC``, ``BWD_SPLIT``) and the
        ``BACKEND`` string; an error names the key, what was expected and what came. As torch:
        ``OUTPUT_LOGSUMEXP`` / ``OUTPUT_MAX`` are internal (AssertionError), and ``BACKEND`` with
        ``FORCE_USE_FLEX_ATTENTION`` is a RuntimeError.

        >>> Options.parse({"BACKEND": "reference"}).backend
        <Backend.REFERENCE: 'reference'>
        >>> Options.parse({"BLOCK_M": "64"})
        Traceback (most recent call last):
        flexcomp.errors.FlexcompTypeError: kernel_options['BLOCK_M'] must be an int (a power of two), got '64' (str)
        """
        if kernel_options is None:
            return Options(backend=_parse_backend(os.environ.get("FLEXCOMP_BACKEND"), "FLEXCOMP_BACKEND"))
        if not isinstance(kernel_options, Mapping):
            raise FlexcompTypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
        for k in kernel_options:
            if not isinstance(k, str):
                raise FlexcompTypeError(f"kernel_options keys must be str, got {k!r} ({type(k).__name__})")
        for k in ("OUTPUT_LOGSUMEXP", "OUTPUT_MAX"):
            if k in kernel_options:
                raise FlexcompAssertionError(
                    f"{k} must not be in kernel_options: flex_attention sets it (ask for the LSE or the row max "
                    f"with return_aux=AuxRequest(lse=True, max_scores=True))")
        known = (TORCH_KERNEL_OPTIONS - {"OUTPUT_MAX"}) | FLEXCOMP_KERNEL_OPTIONS | FLEXCOMP_TUNING_OPTIONS
        unknown = [k for k in kernel_options
                   if k not in known and not (k[:4] in ("fwd_", "bwd_") and k[4:] in TORCH_KERNEL_OPTIONS)]
        if unknown:
            raise FlexcompError(
                f"kernel_options has unknown keys {unknown}; expected flexcomp's "
                f"{sorted(FLEXCOMP_KERNEL_OPTIONS | FLEXCOMP_TUNING_OPTIONS)} "
                f"or torch's FlexKernelOptions keys ({', '.join(sorted(known - FLEXCOMP_KERNEL_OPTIONS - FLEXCOMP_TUNING_OPTIONS))})")
        # the types torch's FlexKernelOptions declares; ints > 0 except ROCm's, which take 0 for "default"
        positive = {"num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
                    "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE", "CHUNK_ELEMENTS"}
        non_negative = {"kpack", "matrix_instr_nonkdim", "waves_per_eu"}
        flags = {"PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
                 "USE_TMA", "DETERMINISTIC", "BWD_SPLIT"}
        for k, v in kernel_options.items():
            base = k[4:] if k[:4] in ("fwd_", "bwd_") and k[4:] in TORCH_KERNEL_OPTIONS else k
            if base in positive | non_negative:
                what = "a power of two" if base.startswith("BLOCK_") else "> 0" if base in positive else ">= 0"
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise FlexcompTypeError(f"kernel_options[{k!r}] must be an int ({what}), got {v!r} ({type(v).__name__})")
                if v < (1 if base in positive else 0):
                    raise FlexcompError(f"kernel_options[{k!r}] must be an int {'> 0' if base in positive else '>= 0'}, "
                                        f"got {v}")
            elif base in flags and not isinstance(v, bool):
                raise FlexcompTypeError(f"kernel_options[{k!r}] must be True or False, got {v!r} ({type(v).__name__})")
        if "BACKEND" in kernel_options and kernel_options.get("FORCE_USE_FLEX_ATTENTION", False):
            raise FlexcompRuntimeError(
                "BACKEND cannot be combined with legacy FORCE_USE_FLEX_ATTENTION (torch refuses it too): drop "
                f"FORCE_USE_FLEX_ATTENTION and keep BACKEND={kernel_options['BACKEND']!r}")
        if "BACKEND" in kernel_options and kernel_options["BACKEND"] in (None, ""):
            raise FlexcompTypeError(f"kernel_options['BACKEND'] must be 'reference', 'triton' or 'auto' (or torch's "
                                    f"'AUTO', 'TRITON'...), got {kernel_options['BACKEND']!r}; leave the key out for "
                                    f"the default")
        backend = _parse_backend(kernel_options.get("BACKEND"), "kernel_options['BACKEND']")
        if backend is None:
            backend = _parse_backend(os.environ.get("FLEXCOMP_BACKEND"), "FLEXCOMP_BACKEND")
        chunk = int(kernel_options.get("CHUNK_ELEMENTS", DEFAULT_CHUNK_ELEMENTS))
        deterministic = kernel_options.get("DETERMINISTIC", False)
        torch_opts = tuple(sorted((k, v) for k, v in kernel_options.items() if k not in FLEXCOMP_KERNEL_OPTIONS))
        return Options(backend, chunk, torch_opts, deterministic)


def _parse_backend(value: Optional[str], source: str) -> Optional[Backend]:
    """``"reference"`` / ``"triton"`` (any case, torch's ``"TRITON"``, ``"FLASH"``, ``"TRITON_DECODE"``),
    or None for ``"auto"`` / unset; anything else names ``source`` and what came."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise FlexcompTypeError(f"{source} must be 'reference', 'triton' or 'auto' (a str), got {value!r} "
                                f"({type(value).__name__})")
    v = value.strip().lower()
    if v == "auto":
        return None
    if v in ("flash", "triton_decode"):
        v = "triton"  # torch's other kernel families: flexcomp's generated kernels serve them
    if v in ("reference", "triton"):
        return Backend(v)
    raise FlexcompError(f"{source} must be 'reference', 'triton' or 'auto', got {value!r}")


def choose_backend(options: Options, device: torch.device) -> Backend:
    """The backend for tensors on ``device``: the asked one, else by device."""
    if options.backend is not None:
        return options.backend
    return Backend.TRITON if device.type == "cuda" else Backend.REFERENCE


def triton_interpret() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TritonPlan:
    """One Triton-backend call without its tensors (what the backward needs besides them).

    ``want_max``: the forward also returns each row's largest modified, masked score."""

    score: Optional[TracedMod]
    mask: Optional[TracedMod]
    block_mask: Any
    scale: float
    torch_options: dict
    interpret: bool
    deterministic: bool
    want_max: bool = False


class _TritonAttention(torch.autograd.Function):
    """The generated forward kernel, and the generated backward kernels as its gradient.

    Outputs ``(out, lse, max_scores)``; ``max_scores`` (None unless ``plan.want_max``) is not
    differentiable, as in torch."""

    @staticmethod
    def forward(ctx, plan: TritonPlan, q: Tensor, k: Tensor, v: Tensor, *score_buffers: Tensor):
        from flexcomp.codegen.launch import flex_forward

        out, lse, max_scores = flex_forward(q, k, v, plan.score, plan.mask, plan.block_mask, plan.scale,
                                            plan.torch_options, plan.interpret, plan.want_max)
        if max_scores is not None:
            ctx.mark_non_differentiable(max_scores)
        ctx.plan = plan
        # the mask's captures are saved too: changing one in place before backward raises torch's error
        ctx.n_score = len(score_buffers)
        mask_buffers = plan.mask.buffers if plan.mask is not None else ()
        ctx.save_for_backward(q, k, v, out, lse, *score_buffers, *mask_buffers)
        ctx.set_materialize_grads(False)
        return out, lse, max_scores

    @staticmethod
    @once_differentiable  # a gradient of the gradient raises instead of silently being zero
    def backward(ctx, d_out: Optional[Tensor], d_lse: Optional[Tensor], d_max: Optional[Tensor] = None):
        from flexcomp.codegen.launch_backward import flex_backward

        plan: TritonPlan = ctx.plan
        q, k, v, out, lse, *saved = ctx.saved_tensors
        bufs = saved[:ctx.n_score]
        if d_out is None:
            d_out = torch.zeros_like(out)
        wanted = tuple(n and b.is_floating_point() for b, n in zip(bufs, ctx.needs_input_grad[4:]))
        dq, dk, dv, dbufs = flex_backward(
            q, k, v, out, lse, d_out, d_lse, plan.score, plan.mask, plan.block_mask, plan.scale, plan.torch_options,
            plan.interpret, wanted, plan.deterministic)
        dbufs = [None if g is None else g.to(b.device) for g, b in zip(dbufs, bufs)]
        need = ctx.needs_input_grad
        return (None, dq if need[1] else None, dk if need[2] else None, dv if need[3] else None, *dbufs)


def _run_triton(q, k, v, score, mask, block_mask, scale, options: Options, want_max: bool = False):
    """The Triton backend: ``(out, lse, max_scores)``, ``max_scores`` None unless ``want_max``."""
    interpret = triton_interpret()
    if q.device.type != "cuda" and not interpret:
        raise FlexcompError(
            f"the 'triton' backend needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1 set before "
            f"flexcomp launches its first kernel (the Triton interpreter, slow, for tests)")
    plan = TritonPlan(score, mask, block_mask, scale, dict(options.torch_options), interpret, options.deterministic,
                      want_max)
    from flexcomp.codegen.launch_backward import check_backward_options

    check_backward_options(plan.torch_options)  # at the forward call, not only when backward runs
    return _TritonAttention.apply(plan, q, k, v, *(score.buffers if score is not None else ()))


def block_map_of(block_mask, device) -> Optional[BlockMap]:
    """Unpack a BlockMask's partial/full lists into the reference's dense block map."""
    if block_mask is None:
        return None
    n = block_mask.kv_indices.shape[-1]
    kind = _ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, n).to(torch.int8)
    if block_mask.full_kv_num_blocks is not None:
        full = _ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n).to(torch.int8)
        kind = torch.where(full.bool(), 2, kind).to(torch.int8)
    while kind.dim() < 4:
        kind = kind.unsqueeze(0)
    return BlockMap(kind.to(device), block_mask.BLOCK_SIZE[0], block_mask.BLOCK_SIZE[1])


def _on(t: Tensor, device) -> Tensor:
    return t if t.device == device else t.to(device)


def run_attention(q: Tensor, k: Tensor, v: Tensor, score: Optional[TracedMod], mask: Optional[TracedMod],
                  block_mask, scale: float, options: Options, want_max: bool = False):
    """Dispatch one validated call to its backend; returns ``(output, lse, max_scores)``.

    ``max_scores`` (``[B, Hq, Q_LEN]``, the row max of the post-mod, masked scores, no gradient) is
    None unless ``want_max``. Both backends return the same triple.
    """
    backend = choose_backend(options, q.device)
    if backend is Backend.TRITON:
        return _run_triton(q, k, v, score, mask, block_mask, scale, options, want_max)
    plan = ReferencePlan(
        score=score,
        mask=mask,
        blocks=block_map_of(block_mask, q.device),
        mask_buffers=tuple(_on(t, q.device) for t in mask.buffers) if mask is not None else (),
        scale=scale,
        chunk_elements=options.chunk_elements,
    )
    score_buffers = tuple(_on(t, q.device) for t in score.buffers) if score is not None else ()
    out, lse, max_scores = reference_attention(q, k, v, plan, score_buffers, want_max=True)
    return out, lse, max_scores if want_max else None
