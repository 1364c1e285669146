"""Loading: generated sources become importable ``@triton.jit`` functions, once per structure.

Triton reads a jitted function's source from its file, so each generated mod is written to a
file named after what it is (``score_mod_softcap_score_<key>.py``) in a folder and imported from
there: ``Sources.dump_dir`` (``FLEXCOMP_DUMP_DIR``, to keep and read them) or a per-process
temporary folder; ``Sources.echo`` (``FLEXCOMP_DEBUG=1``) also prints each one as it is generated
(:class:`flexcomp.options.Sources`, read with the call's options).

What to generate comes from the plan (:mod:`flexcomp.plan`): the mods' graphs, the joint
value-and-derivative graph, the scatter graph. Nothing here derives or analyses: it renders
(:mod:`flexcomp.codegen.lower`) and loads, keyed by structure in :data:`flexcomp.cache.CACHE`.
:data:`STATS` counts generations, so tests can check that new captured values generate nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from flexcomp.cache import CACHE
from flexcomp.ir import Graph
from flexcomp.options import Sources

from .lower import FloatType, LoweredMod, entry, lower, lower_scatter


@dataclass
class Stats:
    """How many mod sources were generated and imported in this process."""

    generated: int = 0


STATS = Stats()
_LOCK = threading.Lock()
_TEMP: list[str] = []  # the per-process folder, made on first use


def source_dir(sources: Optional[Sources] = None) -> str:
    """Where generated sources are written: the dump folder or a per-process temporary one."""
    sources = sources or Sources.from_env()
    if sources.dump_dir:
        os.makedirs(sources.dump_dir, exist_ok=True)
        return sources.dump_dir
    with _LOCK:
        if not _TEMP:
            _TEMP.append(tempfile.mkdtemp(prefix="flexcomp_"))
    return _TEMP[0]


def jit_function(g: Graph, ft: FloatType = FloatType.F32, checked: bool = False,
                 sources: Optional[Sources] = None) -> tuple[LoweredMod, object]:
    """The lowered mod and the ``@triton.jit`` entry the kernels call for ``g``: generated once per structure,
    working float ``ft`` and ``checked`` (``lower.lower``'s variants).

    A graph with derivatives among its outputs (the plan's ``score_grad``) becomes a function
    returning all of them (the backward kernels' mod, called with the forward mod's arguments)."""
    # names do not matter, structure does
    key = ("kernel", "mod", g.kind, g.structural_key(), ft, checked)
    return _jit(key, lambda: lower(g, ft, checked), sources, scatter=False)


def jit_scatter(joint: Graph, grad_buffers: tuple[str, ...], ft: FloatType = FloatType.F32,
                sources: Optional[Sources] = None) -> tuple[LoweredMod, object]:
    """The gradient scatter from the plan's ``scatter`` graph into captured tensors ``grad_buffers``."""
    pos = tuple(i for i, b in enumerate(joint.buffers) if b.name in grad_buffers)
    return _jit(("kernel", "scatter", joint.structural_key(), pos, ft), lambda: lower_scatter(joint, grad_buffers, ft),
                sources, scatter=True)


def _jit(key: tuple, make: Callable[[], LoweredMod], sources: Optional[Sources],
         scatter: bool) -> tuple[LoweredMod, object]:
    return CACHE.get_or_make(key, lambda: _load(make(), sources or Sources.from_env(), scatter))


def _load(lowered: LoweredMod, sources: Sources, scatter: bool) -> tuple[LoweredMod, object]:
    """Write the function and its entry (``lower.entry``: what the kernels call) to one file, import it."""
    name, entry_source = entry(lowered, scatter)
    path = os.path.join(source_dir(sources), lowered.name + ".py")
    with open(path, "w") as f:
        f.write(lowered.source + entry_source)
    if sources.echo:
        print(f"# flexcomp: generated {path}\n{lowered.source}", file=sys.stderr)
    spec = importlib.util.spec_from_file_location(f"flexcomp_generated.{lowered.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with _LOCK:
        STATS.generated += 1
    return lowered, getattr(module, name)
