"""``explain()``: what flexcomp makes of a score_mod / mask_mod, for people."""
from __future__ import annotations

from typing import Callable, Optional

from .ir import ModKind
from .trace import TracedMod, trace


def generated_source(tm: TracedMod, backward: bool = False) -> str:
    """The Triton source flexcomp generates for a traced mod (a message if Triton is missing);
    ``backward``: the score_mod's joint (value, d value / d score) function of the backward kernels."""
    try:
        from flexcomp.codegen.modules import jit_function, jit_grad_function
    except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
        return f"# (no Triton here: {e})"
    return (jit_grad_function if backward else jit_function)(tm.graph)[0].source


def explain(score_mod: Optional[Callable] = None, mask_mod: Optional[Callable] = None,
            Q_LEN: int = 1024, KV_LEN: int = 1024, BLOCK_SIZE=128, print_fn: Callable = print) -> str:
    """Print (and return) the IR of each mod, its structural key, its captured inputs, the
    generated Triton source (for a score_mod also the backward's value-and-derivative function)
    and, for a mask_mod, the block map at ``Q_LEN x KV_LEN``.

    >>> from flexcomp.masks import causal_mask
    >>> text = explain(mask_mod=causal_mask, Q_LEN=256, KV_LEN=256, print_fn=lambda s: None)
    >>> "ge q_idx, kv_idx" in text
    True
    """
    from .blockmask import create_block_mask

    parts = []
    for kind, fn in ((ModKind.SCORE, score_mod), (ModKind.MASK, mask_mod)):
        if fn is None:
            continue
        tm = trace(fn, kind)
        parts.append(f"# {kind.value} {getattr(fn, '__qualname__', fn)}  key={tm.key}")
        parts.append(str(tm.graph))
        for spec, t in zip(tm.graph.buffers, tm.buffers):
            parts.append(f"#   buffer {spec.name}: {t.dtype} {tuple(t.shape)} on {t.device}")
        for spec, v in zip(tm.graph.scalars, tm.scalars):
            parts.append(f"#   scalar {spec.name} = {v!r}")
        parts.append(f"# generated Triton source ({kind.value}):")
        parts.append(generated_source(tm))
        if kind is ModKind.SCORE:
            parts.append("# generated Triton source (score_mod and its derivative, for the backward):")
            parts.append(generated_source(tm, backward=True))
        if kind is ModKind.MASK:
            bm = create_block_mask(fn, 1, 1, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BLOCK_SIZE)
            parts.append(f"# block map {Q_LEN}x{KV_LEN}, BLOCK_SIZE={bm.BLOCK_SIZE}, "
                         f"sparsity {bm.sparsity():.1f}%")
            parts.append(bm.to_string())
    text = "\n".join(parts)
    print_fn(text)
    return text
