"""The plan stage: what runs for one problem, decided once, verified, kept.

From the traced mods, the BlockMask and the :class:`~flexcomp.problem.Problem`, :func:`plan_for`
derives, in named passes each followed by the IR verifier:

1. ``forward``: the score_mod and mask_mod graphs as traced (simplified, verified);
2. ``value_and_derivatives``: the score_mod's joint graph returning its value and ``d/d score``
   (the backward kernels' mod; :func:`flexcomp.derivative.value_and_derivatives`);
3. ``scatter``: the joint graph with ``d/d load`` for each float load of a captured tensor whose
   gradient is wanted (the gradient scatter);
4. ``tiles``: the kernel family, forward and backward tiles (:mod:`flexcomp.tiles`) and the
   backward's launches (:class:`BackwardLaunch`, with their :class:`ScatterMode`).

The plan is kept in :data:`flexcomp.cache.CACHE` under the problem's signature (shapes, dtypes,
options, the mods' structure; never tensor values), so a training step plans once. Which mods
must run with index checks depends on the captured tensors' values: that is decided per call
(:func:`index_checks`, kept while the tensors' versions stay) and set on a copy of the plan.
Codegen renders and loads what the plan names; backends run it.

>>> import torch
>>> from flexcomp.masks import softcap
>>> from flexcomp.trace import trace
>>> from flexcomp.ir import ModKind
>>> from flexcomp.options import Backend, Options
>>> from flexcomp.problem import make_problem
>>> q = torch.randn(1, 2, 256, 64, dtype=torch.bfloat16)
>>> p = make_problem(q, q, q, trace(softcap(20.0), ModKind.SCORE), None, None, 0.125, Options())
>>> plan = plan_for(p, Backend.TRITON)
>>> plan.passes, plan.family.value
(('forward', 'value_and_derivatives', 'tiles'), 'prefill')
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .cache import CACHE
from .derivative import float_loads, value_and_derivatives
from .errors import FlexcompError
from .ir import Arg, Const, Graph, Node, Op, verify
from .ir_ops import OPS
from .options import Backend
from .problem import Problem
from .ranges import mod_proven_safe
from .tiles import (DECODE_MAX_Q, DECODE_MIN_KV_BLOCKS, BackwardConfig, DecodeConfig, ForwardConfig, KernelFamily,
                    backward_config, decode_config, forward_config, smem_limit_of)
from .trace import TracedMod

MAX_HEAD_DIM = 256  # the Triton kernels' widest query/key and value heads
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ScatterMode(enum.IntEnum):
    """What a backward pass does with captured-tensor gradients (the kernels' ``*_SCATTER`` switch)."""

    NONE = -1  # no gradient into captured tensors in this pass
    ATOMIC = 0  # float atomics (the default)
    RECORD_MAX = 1  # deterministic mode, first pass: record each tensor's largest contribution
    FIXED_POINT = 2  # deterministic mode, second pass: add int64 fixed-point values


class Reduce(enum.IntEnum):
    """How a captured-tensor gradient is summed in a tile before its atomic add, by what its
    index depends on (see ``flexcomp.codegen.ops.scatter_grad``)."""

    NONE = 0  # on (q_idx and kv_idx): one atomic per pair
    ALL = 1  # on b and h only: one atomic per tile
    PER_Q = 2  # on b, h, q_idx: one per query row
    PER_KV = 3  # on b, h, kv_idx: one per key


@dataclass(frozen=True)
class BackwardLaunch:
    """One launch of the backward kernel: which programs run and what each does with captured-tensor
    gradients."""

    run_dq: bool
    run_dkdv: bool
    dq_scatter: ScatterMode = ScatterMode.NONE
    dkdv_scatter: ScatterMode = ScatterMode.NONE


@dataclass(frozen=True)
class Plan:
    """What runs for one problem (see the module's docstring).

    Fields:
        key: the cache key (the problem's signature and the backend).
        backend: where it runs; family: which kernels (the Triton backend).
        score, mask: the mods' graphs (None: identity / no mask_mod).
        score_grad: the score_mod's value and ``d/d score`` (Triton backward); None otherwise.
        scatter: value, ``d/d score`` and ``d/d load`` for each load of ``scatter_buffers``.
        scatter_buffers: the captured tensors that receive gradients from the kernels, by position
            in the score_mod's buffers (plans and derived graphs are shared by mods of one structure,
            whose captures may be named differently).
        loads_per_buffer: per captured tensor of the score_mod, how many differentiated loads read it.
        fp64: the working float is float64 (float64 inputs).
        forward, backward: the tiles (Triton backend); decode: the decode kernel's (decode family).
        backward_launches: the backward kernel's launches, in order.
        passes: the passes that ran, each verified.
        score_checked, mask_checked: run the mod's checked variant (an index or a divisor not
            proven safe for this call's sizes and captured values).
        score_may_fault, mask_may_fault: the mod indexes a captured tensor or divides integers, so
            each call asks :func:`index_checks` (the others never run checked).
    """

    key: tuple
    backend: Backend
    family: KernelFamily
    score: Optional[Graph]
    mask: Optional[Graph]
    score_grad: Optional[Graph] = None
    scatter: Optional[Graph] = None
    scatter_buffers: tuple[int, ...] = ()
    loads_per_buffer: tuple[int, ...] = ()
    fp64: bool = False
    forward: Optional[ForwardConfig] = None
    backward: Optional[BackwardConfig] = None
    decode: Optional[DecodeConfig] = None
    backward_launches: tuple[BackwardLaunch, ...] = ()
    passes: tuple[str, ...] = ()
    score_checked: bool = False
    mask_checked: bool = False
    score_may_fault: bool = False
    mask_may_fault: bool = False

    def describe(self) -> str:
        """The plan for people (``flexcomp.explain`` prints it): passes, graphs, tiles, launches."""
        lines = [f"# plan: {self.backend.value} backend, {self.family.value} kernels"
                 f"{', float64' if self.fp64 else ''}; passes {', '.join(self.passes)} (each verified)"]
        into = ", ".join(self.score.buffers[i].name for i in self.scatter_buffers) if self.scatter is not None else ""
        for title, g in (("score_mod", self.score), ("mask_mod", self.mask), ("value and d/d score", self.score_grad),
                         (f"gradient scatter into {into}", self.scatter)):
            if g is not None:
                lines += [f"# {title}:", str(g)]
        if self.forward is not None:
            lines.append(f"# forward tiles: {self.forward}")
        if self.decode is not None:
            lines.append(f"# decode tiles: {self.decode} (splits and packed heads chosen per call)")
        if self.backward is not None:
            lines.append(f"# backward tiles: {self.backward}")
            lines += [f"#   launch {i}: {launch}" for i, launch in enumerate(self.backward_launches)]
        if self.score_checked or self.mask_checked:
            lines.append(f"# checked variants: score_mod {self.score_checked}, mask_mod {self.mask_checked}")
        return "\n".join(lines)


def depends_on(g: Graph, a: Arg, name: str) -> bool:
    """Whether value ``a`` of ``g`` depends on input ``name``."""
    stack, seen = [a], set()
    while stack:
        i = stack.pop()
        if isinstance(i, Const) or i in seen:
            continue
        seen.add(i)
        n = g.nodes[i]
        if n.op is Op.INPUT and n.attr == name:
            return True
        stack += list(n.args)
    return False


def reduce_kind(g: Graph, load: Node) -> Reduce:
    """How the gradient of ``load`` can be summed in a tile, by what its index depends on."""
    if any(depends_on(g, a, "score") for a in load.args):  # an index computed from the score: per pair
        return Reduce.NONE
    on_q = any(depends_on(g, a, "q_idx") for a in load.args)
    on_kv = any(depends_on(g, a, "kv_idx") for a in load.args)
    return {(False, False): Reduce.ALL, (True, False): Reduce.PER_Q, (False, True): Reduce.PER_KV}.get(
        (on_q, on_kv), Reduce.NONE)


def gathers_per_pair(g: Graph) -> bool:
    """Whether ``g`` reads a captured tensor at an index that differs pair by pair (a bias table
    indexed by query and key): such mods favour narrower forward tiles (``tiles.forward_config``)."""
    return any(reduce_kind(g, n) is Reduce.NONE for n in g.nodes if n.op is Op.LOAD)


def transcendental(g: Graph) -> bool:
    """Whether ``g`` calls exp, tanh and the like (the registry's ``transcendental`` ops)."""
    return any(OPS[n.op].transcendental for n in g.nodes)


def check_inputs(q: torch.Tensor, D: int, DV: int) -> None:
    """What the Triton kernels take: head dims up to 256, float16 / bfloat16 / float32 / float64."""
    _check_head_dims(D, DV)
    _check_dtype(q.dtype)


def _check_head_dims(D: int, DV: int) -> None:
    if D > MAX_HEAD_DIM or DV > MAX_HEAD_DIM:
        raise FlexcompError(f"the triton backend supports head dims up to 256, got query/key {D} and value {DV}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise FlexcompError(f"the triton backend runs float16, bfloat16, float32 and float64 inputs, got {dtype}; "
                            f"use kernel_options={{'BACKEND': 'reference'}} for {dtype}")


def _verified(passes: list, name: str, *graphs: Optional[Graph]) -> None:
    for g in graphs:
        if g is not None:
            verify(g)
    passes.append(name)


def _derived(g: Graph, loads: tuple[Node, ...] = ()) -> Graph:
    """The joint value-and-derivatives graph, kept per structure and loads (shared by plans)."""
    key = ("value_and_derivatives", g.structural_key(), g.fn_name, tuple(n.id for n in loads))
    return CACHE.get_or_make(key, lambda: value_and_derivatives(g, loads))


def scatter_graph(g: Graph, grad_buffers: tuple[str, ...]) -> Graph:
    """The ``scatter`` pass alone: value, ``d/d score`` and ``d/d load`` for every float load of the
    captured tensors named in ``grad_buffers`` (what ``codegen.lower.lower_scatter`` renders)."""
    return verify(_derived(g, tuple(n for n in float_loads(g) if n.attr in grad_buffers)))


def _make(problem: Problem, backend: Backend, key: tuple) -> Plan:
    score = problem.score.graph if problem.score is not None else None
    mask = problem.mask.graph if problem.mask is not None else None
    passes: list[str] = []
    _verified(passes, "forward", score, mask)
    plan = Plan(key, backend, KernelFamily.PREFILL, score, mask, fp64=problem.dtype == torch.float64,
                score_may_fault=may_fault(score), mask_may_fault=may_fault(mask))
    if backend is not Backend.TRITON:
        return replace(plan, passes=tuple(passes))
    _check_head_dims(problem.head_dim, problem.value_dim)
    _check_dtype(problem.dtype)
    score_grad = scatter = None
    positions: tuple[int, ...] = ()
    loads_per_buffer: tuple[int, ...] = ()
    if score is not None:
        score_grad = _derived(score)
        _verified(passes, "value_and_derivatives", score_grad)
        floats = float_loads(score)
        positions = tuple(i for i, (b, w) in enumerate(zip(score.buffers, problem.score_grads))
                          if w and any(n.attr == b.name for n in floats))
        if positions:
            scatter = scatter_graph(score, tuple(score.buffers[i].name for i in positions))
            _verified(passes, "scatter", scatter)
        loads_per_buffer = tuple(sum(n.attr == b.name for n in floats) for b in score.buffers)
    forward, backward = _tiles(problem, score, mask, bool(positions))
    family = family_for(problem)
    decode = None
    if family is KernelFamily.DECODE:
        decode = decode_config(problem.head_dim, problem.value_dim, problem.dtype.itemsize, problem.block_size[1],
                               problem.options.forward, problem.options.interpret, smem_limit_of(problem.device))
    passes.append("tiles")
    return replace(plan, family=family, score_grad=score_grad, scatter=scatter, scatter_buffers=positions,
                   loads_per_buffer=loads_per_buffer, forward=forward, backward=backward, decode=decode,
                   backward_launches=backward_launches(backward, bool(positions), problem.options.deterministic),
                   passes=tuple(passes))


def family_for(problem: Problem) -> KernelFamily:
    """The forward's kernel family: decode (split-KV) for at most :data:`DECODE_MAX_Q` queries against
    at least :data:`DECODE_MIN_KV_BLOCKS` kv blocks, without dropout, row maxima or float64 (which the
    prefill kernel serves); ``kernel_options`` may ask for either (``BACKEND="TRITON_DECODE"``,
    ``FORCE_USE_FLEX_ATTENTION``). Asking for decode where it cannot run is an error."""
    unsupported = [what for what, bad in (("dropout", problem.dropout is not None),
                                          ("max_scores", problem.want_max),
                                          ("float64", problem.dtype == torch.float64)) if bad]
    asked = problem.options.family
    if asked == "decode":
        if unsupported:
            raise FlexcompError(f"kernel_options BACKEND='TRITON_DECODE': the decode kernels do not serve "
                                f"{', '.join(unsupported)}; leave BACKEND out (the prefill kernel runs)")
        return KernelFamily.DECODE
    if asked == "prefill" or unsupported:
        return KernelFamily.PREFILL
    kv_blocks = -(-problem.kv_len // problem.block_size[1])
    if problem.q_len <= DECODE_MAX_Q and kv_blocks >= DECODE_MIN_KV_BLOCKS:
        return KernelFamily.DECODE
    return KernelFamily.PREFILL


def _tiles(problem: Problem, score: Optional[Graph], mask: Optional[Graph],
           scatter: bool) -> tuple[ForwardConfig, BackwardConfig]:
    opts = problem.options
    sq, skv = problem.block_size
    elt = problem.dtype.itemsize
    heavy = score is not None or (mask is not None and bool(mask.buffers))
    smem = smem_limit_of(problem.device)
    fwd = forward_config(problem.head_dim, problem.value_dim, elt, sq, skv, opts.forward, opts.interpret, heavy,
                         smem, score is not None and gathers_per_pair(score))
    bwd = backward_config(problem.head_dim, problem.value_dim, elt, sq, skv, opts.backward, opts.interpret, smem,
                          score is not None, score is not None and transcendental(score), scatter, problem.group > 1)
    return fwd, bwd


def backward_launches(cfg: BackwardConfig, scatter: bool, deterministic: bool) -> tuple[BackwardLaunch, ...]:
    """The backward kernel's launches: deterministic scatter (dQ recording maxima, then dK/dV adding
    fixed point), split (dQ, then dK/dV) or one grid of both."""
    if scatter and deterministic:
        return (BackwardLaunch(True, False, dq_scatter=ScatterMode.RECORD_MAX),
                BackwardLaunch(False, True, dkdv_scatter=ScatterMode.FIXED_POINT))
    mode = ScatterMode.ATOMIC if scatter else ScatterMode.NONE
    if cfg.split:
        return BackwardLaunch(True, False), BackwardLaunch(False, True, dkdv_scatter=mode)
    return (BackwardLaunch(True, True, dkdv_scatter=mode),)


def plan_for(problem: Problem, backend: Backend) -> Plan:
    """The plan of ``problem`` on ``backend``: made once per signature, kept in the cache; for the
    Triton backend with each mod's index checks decided for this call (:func:`index_checks`)."""
    key = ("plan", backend, problem.signature())
    plan = CACHE.get(key)
    if plan is None:
        plan = CACHE.put(key, _make(problem, backend, key))
    if backend is Backend.TRITON and (plan.score_may_fault or plan.mask_may_fault):
        score_checked = plan.score_may_fault and index_checks(problem.score, problem)
        mask_checked = plan.mask_may_fault and index_checks(problem.mask, problem)
        if score_checked or mask_checked:
            plan = replace(plan, score_checked=score_checked, mask_checked=mask_checked)
    return plan


def refit(plan: Plan, **changes) -> Plan:
    """``plan`` with ``changes`` (smaller tiles after the device refused a config), remembered for
    every later call with its key."""
    base = CACHE.get(plan.key)
    if base is not None:
        CACHE.put(plan.key, replace(base, **changes))
    return replace(plan, **changes)


def may_fault(g: Optional[Graph]) -> bool:
    """Whether ``g`` indexes a captured tensor or divides integers (what a checked variant guards)."""
    return g is not None and any((n.op is Op.LOAD and n.args) or (n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int)
                                 for n in g.nodes)


def index_checks(tm: Optional[TracedMod], problem: Problem) -> bool:
    """Whether ``tm`` must run checked: it indexes a captured tensor or divides integers, and
    :func:`flexcomp.ranges.mod_proven_safe` does not prove every index in range and every integer
    divisor nonzero for the problem's sizes.

    The answer is kept (owned by the captured tensors) per sizes, valid while each tensor keeps its
    storage, ``_version``, shape and strides (an in-place update, a resize or ``t.data = ...``
    included, can change an index a load reads or the extent it must stay in): a kept answer costs
    a tuple compare."""
    if tm is None:
        return False
    g = tm.graph
    sizes = (problem.batch, problem.heads, problem.q_len, problem.kv_len)
    key = ("index_checks", g.structural_key(), tuple(map(id, tm.buffers)), tuple(map(repr, tm.scalars)), sizes)
    state = tuple([(t._version, t.data_ptr(), t.shape, t.stride()) for t in tm.buffers])
    hit = CACHE.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    need = may_fault(g) and not mod_proven_safe(tm, *sizes)
    CACHE.put(key, (state, need), owners=tm.buffers)
    return need
