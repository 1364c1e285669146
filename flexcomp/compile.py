"""flexcomp inside ``torch.compile``: custom ops in the graph where possible, else one graph break.

flexcomp traces your mods with its own tracer, plans and launches Triton kernels from Python; none
of that can be captured by Dynamo, and it never is. Each public entry point asks
``torch.compiler.is_compiling()`` first; under Dynamo:

- ``flex_attention`` and ``create_block_mask`` become the custom ops of :mod:`flexcomp.custom_ops`
  when their mods can be templates (:mod:`flexcomp.graph_mods`: functions defined outside the
  compiled region, closures included, and ``functools.partial`` objects made anywhere). The mods are
  traced once, when Dynamo meets the call, outside the graph; their captured tensors and numbers are
  the ops' inputs. ``torch.compile(..., fullgraph=True)`` works, with any backend, and gradients flow
  through the registered backward.
- Otherwise (a closure made inside the compiled region, whose cells Dynamo hides; a score_mod whose
  captured tensors require grad; the flash-attn, SDPA and context-parallel functions) the call runs
  eagerly through ``torch.compiler.disable``: one graph break, correct results and gradients.
  ``fullgraph=True`` then refuses the region (torch's error names the skipped function).

For example (tests/test_compile.py runs these, gradients included)::

    bm = create_block_mask(causal_mask, 1, 1, S, S)           # or inside the compiled function

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return flex_attention(q, k, v, score_mod=alibi, block_mask=bm).sin()   # alibi: a module function
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

_EAGER: dict[Callable, Callable] = {}


def is_compiling() -> bool:
    """Whether Dynamo is tracing this call (then call :func:`eagerly` instead)."""
    return torch.compiler.is_compiling()


def eager_under_compile(fn: Callable) -> Callable:
    """Decorator of an entry point with no custom op: under Dynamo it runs through its
    ``torch.compiler.disable`` twin (a graph break), otherwise as itself. The twin is made when
    first needed: importing ``torch._dynamo`` at flexcomp's import would fix Triton's interpreter
    switch (``TRITON_INTERPRET``) before a script sets it."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():
            return eagerly(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    return entry


def eagerly(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run outside the compiled graph (``torch.compiler.disable``)."""
    run = _EAGER.get(fn)
    if run is None:
        run = _EAGER.setdefault(fn, torch.compiler.disable(fn, recursive=True))
    return run(*args, **kwargs)
