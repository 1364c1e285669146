"""flexcomp inside ``torch.compile``: the public entry points run outside the compiled graph.

flexcomp traces your mods with its own tracer, plans and launches Triton kernels from Python; none
of that can be captured by Dynamo. Each public entry point (``flex_attention``,
``create_block_mask``, the flash-attn and SDPA functions) therefore asks
``torch.compiler.is_compiling()`` first and, under Dynamo, calls itself through
``torch.compiler.disable``: the compiled function gets one clean graph break at the call and runs
it eagerly (correct results and gradients, no Dynamo recursion into the tracer, a compile of
seconds rather than tracing flexcomp's internals). ``torch.compile(..., fullgraph=True)`` therefore
refuses a region that calls flexcomp (torch's error names the skipped function): the custom-op route
that would put flexcomp's kernels inside a full graph is not built yet.

For example (tests/test_compile.py runs it, gradients included)::

    def f(q, k, v):
        return flex_attention(q, k, v, block_mask=bm).sin()   # one graph break at flex_attention

    torch.compile(f)(q, k, v)                                 # == f(q, k, v)
"""
from __future__ import annotations

from typing import Callable

import torch

_EAGER: dict[Callable, Callable] = {}


def is_compiling() -> bool:
    """Whether Dynamo is tracing this call (then call :func:`eagerly` instead)."""
    return torch.compiler.is_compiling()


def eagerly(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run outside the compiled graph (``torch.compiler.disable``)."""
    run = _EAGER.get(fn)
    if run is None:
        run = _EAGER.setdefault(fn, torch.compiler.disable(fn, recursive=True))
    return run(*args, **kwargs)
