"""``explain()``: what flexcomp makes of a score_mod / mask_mod, for people."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .blockmask_build import create_block_mask
from .ir import Graph, ModKind
from .options import Backend, Options
from .plan import plan_for
from .problem import make_problem
from .trace import trace


def generated_source(g: Graph, variant=None) -> str:
    """The Triton source flexcomp generates for a graph of the plan (a message if Triton is missing),
    as ``variant`` (a ``flexcomp.codegen.lower.FloatType``; default: float32)."""
    try:
        from flexcomp.codegen.modules import jit_function
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
        return f"# (no Triton here: {e})"
    return jit_function(g, *(() if variant is None else (variant,)))[0].source


def _score_variant(plan, problem):
    """The FloatType the score_mods of ``problem`` run as on a GPU with the hardware tanh (None
    without Triton)."""
    try:
        from flexcomp.codegen.launch import float_type
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        return None
    return float_type(plan, problem)


def explain(score_mod: Optional[Callable] = None, mask_mod: Optional[Callable] = None,
            Q_LEN: int = 1024, KV_LEN: int = 1024, BLOCK_SIZE=128, print_fn: Callable = print,
            head_dim: int = 64, dtype: torch.dtype = torch.bfloat16) -> str:
    """Print (and return) the IR of each mod, its structural key, its captured inputs, for a
    mask_mod the block map at ``Q_LEN x KV_LEN``, then the plan of the Triton backend for one
    head of that size (``head_dim``, ``dtype``): its passes, graphs, tiles and backward launches,
    and the generated Triton source of each mod as that ``dtype`` runs it (for a score_mod also the
    backward's value-and-derivative function; 16-bit inputs take the hardware's ``tanh``, as on
    NVIDIA GPUs of compute capability 7.5 and up; others run libdevice's, as float32).

    >>> from flexcomp.masks import causal_mask, softcap
    >>> text = explain(softcap(20.0), causal_mask, Q_LEN=256, KV_LEN=256, print_fn=lambda s: None)
    >>> "ge q_idx, kv_idx" in text, "# plan: triton backend, prefill kernels" in text
    (True, True)
    """
    parts, traced, block_mask = [], {}, None
    for kind, fn in ((ModKind.SCORE, score_mod), (ModKind.MASK, mask_mod)):
        if fn is None:
            continue
        tm = traced[kind] = trace(fn, kind)
        parts.append(f"# {kind.value} {getattr(fn, '__qualname__', fn)}  key={tm.key}")
        parts.append(str(tm.graph))
        for spec, t in zip(tm.graph.buffers, tm.buffers):
            parts.append(f"#   buffer {spec.name}: {t.dtype} {tuple(t.shape)} on {t.device}")
        for spec, v in zip(tm.graph.scalars, tm.scalars):
            parts.append(f"#   scalar {spec.name} = {v!r}")
        if kind is ModKind.MASK:
            block_mask = create_block_mask(fn, 1, 1, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE)
            parts.append(f"# block map {Q_LEN}x{KV_LEN}, BLOCK_SIZE={block_mask.BLOCK_SIZE}, "
                         f"sparsity {block_mask.sparsity():.1f}%")
            parts.append(block_mask.to_string())
    q = torch.empty(1, 1, Q_LEN, head_dim, dtype=dtype, device="meta")
    kv = torch.empty(1, 1, KV_LEN, head_dim, dtype=dtype, device="meta")
    problem = make_problem(q, kv, kv, traced.get(ModKind.SCORE), traced.get(ModKind.MASK), block_mask,
                           head_dim ** -0.5, Options())
    plan = plan_for(problem, Backend.TRITON)
    parts.append(plan.describe())
    score = _score_variant(plan, problem)
    for title, g, variant in (("score_mod", plan.score, score), ("mask_mod", plan.mask, None),
                              ("score_mod and its derivative, for the backward", plan.score_grad, score)):
        if g is not None:
            parts.append(f"# generated Triton source ({title}):")
            parts.append(generated_source(g, variant))
    text = "\n".join(parts)
    print_fn(text)
    return text
