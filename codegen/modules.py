"""Generated sources become importable ``@triton.jit`` functions, once per structure.

Triton reads a jitted function's source from its file, so each generated mod is written to a
file named after what it is (``score_mod_softcap_score_<key>.py``) in a cache folder and imported
from there. ``FLEXCOMP_DUMP_DIR=path`` writes them to ``path`` instead (keep them to read);
``FLEXCOMP_DEBUG=1`` also prints each one as it is generated.

:data:`STATS` counts generations, so tests can check that new captured values generate nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass

from flexcomp.errors import FlexcompError
from flexcomp.ir import Graph

from .lower import FloatType, LoweredMod, lower, lower_scatter


@dataclass
class Stats:
    """How many mod sources were generated and imported in this process."""

    generated: int = 0


STATS = Stats()
_LOCK = threading.Lock()
_CACHE: dict[tuple, tuple[LoweredMod, object]] = {}
_DIR = None


def source_dir() -> str:
    """Where generated sources are written: ``FLEXCOMP_DUMP_DIR`` or a per-process temp folder."""
    global _DIR
    dump = os.environ.get("FLEXCOMP_DUMP_DIR")
    if dump:
        os.makedirs(dump, exist_ok=True)
        return dump
    if _DIR is None:
        _DIR = tempfile.mkdtemp(prefix="flexcomp_")
    return _DIR


def jit_function(g: Graph, ft: FloatType = FloatType.F32, checked: bool = False) -> tuple[LoweredMod, object]:
    """The lowered mod and its ``@triton.jit`` function for ``g``: generated once per structure,
    working float ``ft`` and ``checked`` (``lower.lower``'s variants).

    A graph with derivatives among its outputs (``value_and_derivatives``) becomes a function
    returning all of them."""
    # names do not matter, structure does
    return _jit((g.kind, g.structural_key(), ft, checked), lambda: lower(g, ft, checked))


def jit_grad_function(g: Graph, ft: FloatType = FloatType.F32) -> tuple[LoweredMod, object]:
    """The ``(value, d value / d score)`` function of score_mod ``g`` (the backward kernels' mod):
    derived and generated once per structure and working float."""
    from flexcomp.derivative import value_and_derivatives

    ref, _ = jit_function(g, ft)  # the forward mod: the kernels pass both the same arguments

    def make() -> LoweredMod:
        lowered = lower(value_and_derivatives(g), ft)
        if (lowered.stride_offsets, lowered.int_scalars, lowered.float_scalars) != (
                ref.stride_offsets, ref.int_scalars, ref.float_scalars):  # pragma: no cover - derivation keeps inputs
            raise FlexcompError(f"internal: deriving score_mod {g.fn_name!r} changed its captured inputs")
        return lowered

    return _jit(("grad", g.structural_key(), ft), make)


def jit_scatter(g: Graph, grad_buffers: tuple[str, ...], ft: FloatType = FloatType.F32) -> tuple[LoweredMod, object]:
    """The gradient scatter of score_mod ``g`` into its captured tensors ``grad_buffers``."""
    pos = tuple(i for i, b in enumerate(g.buffers) if b.name in grad_buffers)
    return _jit(("scatter", g.structural_key(), pos, ft), lambda: lower_scatter(g, grad_buffers, ft))


def _jit(key: tuple, make) -> tuple[LoweredMod, object]:
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        lowered = make()
        path = os.path.join(source_dir(), lowered.name + ".py")
        with open(path, "w") as f:
            f.write(lowered.source)
        if os.environ.get("FLEXCOMP_DEBUG", "0") not in ("", "0"):
            print(f"# flexcomp: generated {path}\n{lowered.source}", file=sys.stderr)
        spec = importlib.util.spec_from_file_location(f"flexcomp_generated.{lowered.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        STATS.generated += 1
        _CACHE[key] = (lowered, getattr(module, lowered.name))
        return _CACHE[key]
