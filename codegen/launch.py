"""The Triton backend's forward: what the kernels read (mod arguments, block lists) and the launch.

Nothing here copies q, k or v: strides go to the kernel as they are (GQA, a key/value batch of
one and block masks broadcast over batch or heads are all expressed as strides, zero where
broadcast). What runs comes from the plan (:mod:`flexcomp.plan`): the mods' graphs, whether each
runs checked, the tiles; nothing is decided here.

float64 inputs run the same kernels with their ``FP64`` switch on (scores, softmax statistics and
accumulators in float64, ieee dots, float64 mods and LSE); the scale then goes as a float64 device
scalar, since Triton passes Python floats as float32.

Captured-tensor indices: a mod the plan marks checked runs as its checked variant, and
:func:`forward` raises ``FlexcompIndexError`` (an ``IndexError``, as torch) when an index fell
outside its tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from triton.runtime.errors import OutOfResources

from flexcomp.blockmask import noop_mask
from flexcomp.blockmask_build import create_block_mask
from flexcomp.cache import CACHE
from flexcomp.errors import FlexcompError, FlexcompIndexError, mod_zero_division
from flexcomp.ir import Graph
from flexcomp.options import Sources
from flexcomp.plan import Plan, refit
from flexcomp.problem import Outputs, Problem
from flexcomp.tiles import cdiv, pad_dim, smaller_forward
from flexcomp.trace import TracedMod

from .ahead import KernelLaunch
from .kernels.forward import flex_fwd
from .lower import CheckKind, FloatType, LoadCheck, flat_args
from .modules import jit_function

INT64_MIN = -(2**63)  # a checked mod's error slots before the kernel: no index was out of range
MAX_OFFSET = 2**31  # captured tensors are indexed with 32-bit offsets


@dataclass(frozen=True)
class ModArgs:
    """A generated mod and what it reads at run time: ``bufs``, the flat tuple the kernels pass it
    (pointers, a checked mod's error tensor, strides, sizes, the captured numbers' tensors).

    A checked mod also has ``err``: int64 ``[len(checks)]`` (at least 1), preset to
    :data:`INT64_MIN`, where each :class:`LoadCheck` slot receives an out-of-range index."""

    fn: object
    bufs: tuple
    err: Optional[torch.Tensor] = None
    checks: tuple[LoadCheck, ...] = ()


def scalar_tensor(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small device tensor of captured numbers; reused while the values stay the same."""
    key = ("scalars", tuple(repr(v) for v in values), dtype, device)  # repr keeps 0.0 and -0.0 apart
    return CACHE.get_or_make(key, lambda: torch.tensor(values or (0,), dtype=dtype, device=device))


HALF_DTYPES = (torch.float16, torch.bfloat16)  # inputs whose mods take the hardware's tanh
HARDWARE_TANH = (7, 5)  # the first compute capability with PTX's tanh.approx.f32


def float_type(plan: Plan, problem: Problem) -> FloatType:
    """The generated score_mod's working float: float64 for float64 inputs; for 16-bit inputs
    float32 with the hardware's tanh where the GPU has one (under the interpreter ``ops.tanh_approx``
    is the same exp formula as ``ops.tanh``), unless ``kernel_options={"FAST_TANH": False}``."""
    if plan.fp64:
        return FloatType.F64
    fast = problem.dtype in HALF_DTYPES and problem.options.fast_tanh and _has_hardware_tanh(problem.device)
    return FloatType.F32_APPROX if fast else FloatType.F32


def _has_hardware_tanh(device: torch.device) -> bool:
    """Whether ``device`` runs PTX's ``tanh.approx.f32``: NVIDIA GPUs of compute capability 7.5 on
    (ROCm's ``cuda`` devices run no PTX); True off CUDA, where the interpreter runs the formula."""
    if device.type != "cuda":
        return True
    if torch.version.hip is not None:
        return False
    return CACHE.get_or_make(("hardware_tanh", device),
                             lambda: torch.cuda.get_device_capability(device) >= HARDWARE_TANH)


def mod_args(tm: Optional[TracedMod], graph: Optional[Graph], device, ft: FloatType = FloatType.F32,
             checked: bool = False, sources: Optional[Sources] = None) -> ModArgs:
    """The jitted function of ``graph`` (the plan's graph of ``tm``; None if no mod) and its flat
    run-time arguments from ``tm``'s captured values.

    ``ft``: the mod's working float (float64: captured numbers go as a float64 tensor); ``checked``:
    the variant that reports out-of-range indices into a fresh ``ModArgs.err``. Tensors are read
    afresh each call (in-place updates show); the captured numbers' device tensors are kept."""
    float_dtype = torch.float64 if ft is FloatType.F64 else torch.float32
    if tm is None:
        return CACHE.get_or_make(("no_mod_args", device, float_dtype), lambda: ModArgs(None, flat_args(
            [], [], [], scalar_tensor((), torch.int64, device), scalar_tensor((), float_dtype, device))))
    bufs, strides, sizes = [], [], []
    for t in tm.buffers:
        if t.device != device:
            t = t.to(device)
        if t.dtype == torch.bool:
            t = t.view(torch.int8)
        if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= MAX_OFFSET:
            raise FlexcompError(
                f"the captured tensor of shape {tuple(t.shape)} in {tm.graph.kind.value} {tm.graph.fn_name!r} "
                f"spans 2**31 elements or more; the triton backend indexes captured tensors with 32-bit offsets")
        strides += t.stride() or (0,)
        sizes += t.shape or (1,)
        bufs.append(t)
    fn, si, sf, checks = CACHE.get_or_make(
        ("mod_args", graph.structural_key(), tuple(map(repr, tm.scalars)), device, ft, checked),
        lambda: _compiled(graph, tm, device, ft, float_dtype, checked, sources))
    err = None
    if checked:  # one more pointer, after the buffers: the generated checks write here
        err = torch.full((max(1, len(checks)),), INT64_MIN, dtype=torch.int64, device=device)
        bufs.append(err)
    return ModArgs(fn, flat_args(bufs, strides, sizes, si, sf), err, checks)


def _compiled(graph: Graph, tm: TracedMod, device, ft: FloatType, float_dtype: torch.dtype, checked: bool,
              sources: Optional[Sources]) -> tuple:
    """A mod's function, its captured numbers' tensors and its checks, once per structure and values."""
    lowered, fn = jit_function(graph, ft, checked, sources)
    ints = tuple(int(v) for v, s in zip(tm.scalars, lowered.int_scalars) if s >= 0)
    floats = tuple(float(v) for v, s in zip(tm.scalars, lowered.float_scalars) if s >= 0)
    return fn, scalar_tensor(ints, torch.int64, device), scalar_tensor(floats, float_dtype, device), lowered.checks


def raise_if_out_of_range(mods: tuple) -> None:
    """After a forward launch: ``FlexcompIndexError`` for the first out-of-range index any checked
    mod recorded. ``mods``: ``(TracedMod, ModArgs)`` pairs; one device sync for all of them."""
    checked = [(tm, a) for tm, a in mods if a.err is not None and a.checks]
    if not checked:
        return
    values = torch.cat([a.err for _, a in checked]).tolist()
    at = 0
    for tm, a in checked:
        for check, value in zip(a.checks, values[at:at + len(a.checks)]):
            if value != INT64_MIN and check.kind is CheckKind.DIVISOR:
                raise mod_zero_division(tm.graph, tm.fn)
            if value != INT64_MIN:  # names from the mod that ran (the function may have been made for another)
                g = tm.graph
                j = check.position
                shape, name = tuple(tm.buffers[j].shape), g.buffers[j].name
                raise FlexcompIndexError(
                    f"{g.kind.value} {g.fn_name!r}: '{g.format_node(g.nodes[check.node_id])}' indexed the captured "
                    f"tensor {name!r} of "
                    f"shape {shape} out of range (dim {check.dim}: index {value}, valid {-shape[check.dim]}.."
                    f"{shape[check.dim] - 1}); torch raises IndexError here too")
        at += len(a.checks)


def full_block_mask(q_len: int, kv_len: int, device: torch.device):
    """The BlockMask of no mask (every block full), kept per sizes and device."""
    return CACHE.get_or_make(("full_block_mask", q_len, kv_len, device),
                             lambda: create_block_mask(noop_mask, 1, 1, q_len, kv_len, device=device))


def block_mask_of(problem: Problem):
    """The BlockMask the kernels walk: the call's, or without one, every block full."""
    if problem.block_mask is not None:
        return problem.block_mask
    return full_block_mask(problem.q_len, problem.kv_len, problem.device)


@dataclass(frozen=True)
class BlockLists:
    """One direction's block lists, expanded to ``[B, H, n]`` (strides only), partial and full."""

    num: torch.Tensor
    idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    has_full: bool

    @property
    def tensors(self) -> tuple:
        """The four list tensors, in the kernels' order."""
        return self.num, self.idx, self.full_num, self.full_idx


def block_lists(block_mask, B: int, H: int, transposed: bool) -> BlockLists:
    """The BlockMask's kv lists (``transposed``: its q lists) for a ``[B, H]`` launch, as strides;
    kept while the BlockMask and its list tensors live (host time per call matters)."""
    fields = ((block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks, block_mask.full_q_indices)
              if transposed else
              (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
               block_mask.full_kv_indices))
    key = ("block_lists", B, H, transposed, id(block_mask), *map(id, fields),
           *(f._version for f in fields if f is not None))  # an in-place update of a list makes new ones
    make = lambda: _lists(*fields, B, H, fields[0].shape[-1])  # noqa: E731
    try:
        return CACHE.get_or_make(key, make, owners=(block_mask, *(f for f in fields if f is not None)))
    except TypeError:  # a BlockMask that cannot be weakly referenced: no cache
        return make()


def _lists(num, idx, full_num, full_idx, B: int, H: int, n: int) -> BlockLists:
    num = num.expand(B, H, n)
    idx = idx.expand(B, H, n, idx.shape[-1])
    has_full = full_num is not None
    fnum = full_num.expand(B, H, n) if has_full else num
    fidx = full_idx.expand(B, H, n, full_idx.shape[-1]) if has_full else idx
    if has_full and (fnum.stride() != num.stride() or fidx.stride() != idx.stride()):
        num, idx, fnum, fidx = num.contiguous(), idx.contiguous(), fnum.contiguous(), fidx.contiguous()
    return BlockLists(num, idx, fnum, fidx, has_full)


def output_like(q: torch.Tensor, value_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty output ``[B, H, L, value_dim]`` in the memory order of ``q``'s dims (as torch's flex
    allocates it): a ``[B, L, H, D]`` layout seen through a transpose (flash-attn's, transformers')
    gets its output in that layout, so the caller's transpose back is free instead of a copy."""
    B, H, L, _ = q.shape
    if q.is_contiguous():
        return torch.empty(B, H, L, value_dim, dtype=dtype, device=q.device)
    order = sorted(range(3), key=lambda d: -q.stride(d))  # outer to inner among B, H, L
    shape = (B, H, L)
    out = torch.empty(*(shape[d] for d in order), value_dim, dtype=dtype, device=q.device)
    return out.permute(*(order.index(d) for d in range(3)), 3)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LSE, max scores and the backward's delta: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_scale(problem: Problem):
    """The kernels' ``sm_scale`` argument: the float, or for float64 inputs a float64 device scalar
    (a Python float reaches a kernel as float32, which float64 attention cannot afford)."""
    if problem.dtype == torch.float64:
        return scalar_tensor((problem.scale,), torch.float64, problem.device)
    return problem.scale


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: ieee for float64, and for float32 unless TF32 matmuls are allowed."""
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def kv_strides(problem: Problem, t: torch.Tensor) -> tuple:
    """Strides of a key/value-shaped tensor, the batch stride 0 where one batch serves every query's."""
    s = t.stride()
    return (0 if problem.kv_batch == 1 and problem.batch > 1 else s[0], *s[1:])


def forward(problem: Problem, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Outputs:
    """Run the generated forward kernel: output ``[B, Hq, L, Ev]`` (input dtype), LSE ``[B, Hq, L]``
    (natural log) and, if the problem wants it, the row maxima of the modified, masked scores
    ``[B, Hq, L]`` (score units, ``-inf`` for rows with nothing kept), both float32, float64 for
    float64 inputs. Rows whose largest score is ``+inf`` get LSE ``+inf`` (as torch).

    No kernel runs when ``L`` or ``S`` is 0: an empty output, or output 0 and LSE ``-inf``.
    Raises ``FlexcompIndexError`` when a mod indexed a captured tensor out of range.
    """
    B, H, L, S, DV = problem.batch, problem.heads, problem.q_len, problem.kv_len, problem.value_dim
    device, sd = problem.device, stats_dtype(problem.dtype)
    if L == 0 or S == 0:  # nothing to attend to, or no one asking: no launch (an empty grid is an error)
        lse = torch.full((B, H, L), float("-inf"), dtype=sd, device=device)
        return Outputs(torch.zeros(B, H, L, DV, dtype=problem.dtype, device=device), lse,
                       lse.clone() if problem.want_max else None)
    a = forward_args(problem, plan, q)
    while True:
        try:
            forward_launch(problem, plan, q, k, v, a).run()
            if a.sa.err is not None or a.ma.err is not None:
                raise_if_out_of_range(((problem.score, a.sa), (problem.mask, a.ma)))
            return Outputs(a.out, a.lse, a.mx)
        except OutOfResources:  # e.g. a gathered bias needs shared memory for its layout: smaller, remembered
            smaller = smaller_forward(plan.forward)
            if smaller is None:
                raise
            plan = refit(plan, forward=smaller)


def forward_launch(problem: Problem, plan: Plan, q, k, v, a: ForwardArgs) -> KernelLaunch:
    """The forward kernel's launch for these tensors (:func:`forward` runs it; :func:`forward_ahead`
    compiles it for stand-ins)."""
    cfg = plan.forward
    sq, skv = a.block_mask.BLOCK_SIZE
    D, DV = problem.head_dim, problem.value_dim
    grid = (cdiv(problem.q_len, cfg.block_m), problem.batch * problem.heads)
    lists, sa, ma, lse, mx = a.lists, a.sa, a.ma, a.lse, a.mx
    return KernelLaunch(flex_fwd, grid, (
        q, k, v, a.out, lse, lse if mx is None else mx, q.stride(), kv_strides(problem, k), kv_strides(problem, v),
        a.out.stride(), lse.stride(), *lists.tensors, lists.num.stride(), lists.idx.stride(),
        problem.heads, problem.q_len, problem.kv_len, problem.group, kernel_scale(problem),
        sa.fn, sa.bufs, ma.fn, ma.bufs), dict(
        HAS_SCORE_MOD=sa.fn is not None, HAS_MASK_MOD=ma.fn is not None, HAS_FULL=lists.has_full,
        SPARSE_Q=sq, SPARSE_KV=skv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        D=D, D_PAD=pad_dim(D), DV=DV, DV_PAD=pad_dim(DV), PRECISION=dot_precision(problem.dtype),
        EVEN_KV=problem.kv_len % skv == 0, STATIC_SUB=cfg.static_sub, OUTPUT_MAX=mx is not None,
        FP64=problem.dtype == torch.float64, DROPOUT=problem.dropout is not None, DROP=dropout_args(problem),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def stand_ins(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``meta`` tensors with the problem's q, k and v shapes, strides and dtype: what a kernel
    compiled ahead is specialised for (:mod:`.ahead`)."""
    meta, dt = torch.device("meta"), problem.dtype
    q = torch.empty_strided((problem.batch, problem.heads, problem.q_len, problem.head_dim), problem.q_strides,
                            dtype=dt, device=meta)
    k = torch.empty_strided((problem.kv_batch, problem.kv_heads, problem.kv_len, problem.head_dim),
                            problem.k_strides, dtype=dt, device=meta)
    v = torch.empty_strided((problem.kv_batch, problem.kv_heads, problem.kv_len, problem.value_dim),
                            problem.v_strides, dtype=dt, device=meta)
    return q, k, v


def dropout_args(problem: Problem) -> tuple:
    """The kernels' ``DROP = (seed, threshold, 1 / (1 - p))`` (zeros without dropout)."""
    d = problem.dropout
    return (0, 0, 1.0) if d is None else (d.seed, d.threshold, d.scale)


@dataclass(frozen=True)
class ForwardArgs:
    """A forward's arguments besides q, k and v: the BlockMask and its kv lists, the mods' arguments,
    and the empty output, LSE and (if asked) row maxima, on q's device and in its layout (``meta``
    stand-ins when compiling ahead)."""

    block_mask: object
    lists: BlockLists
    sa: ModArgs
    ma: ModArgs
    out: torch.Tensor
    lse: torch.Tensor
    mx: Optional[torch.Tensor]


def forward_args(problem: Problem, plan: Plan, q: torch.Tensor) -> ForwardArgs:
    """The :class:`ForwardArgs` of ``problem``'s forward (prefill or decode) for ``q``."""
    block_mask = block_mask_of(problem)
    lists = block_lists(block_mask, problem.batch, problem.heads, transposed=False)
    ft, sources = float_type(plan, problem), problem.options.sources
    sa = mod_args(problem.score, plan.score, problem.device, ft, plan.score_checked, sources)
    ma = mod_args(problem.mask, plan.mask, problem.device, FloatType.F32, plan.mask_checked, sources)  # float32
    stats = (problem.batch, problem.heads, problem.q_len)
    sd = stats_dtype(problem.dtype)
    lse = torch.empty(stats, dtype=sd, device=q.device)
    mx = torch.empty(stats, dtype=sd, device=q.device) if problem.want_max else None
    return ForwardArgs(block_mask, lists, sa, ma, output_like(q, problem.value_dim, problem.dtype), lse, mx)


def forward_ahead(problem: Problem, plan: Plan) -> KernelLaunch:
    """:func:`forward`'s launch for ``meta`` stand-ins of q, k, v and the outputs (the block lists and
    the mods' arguments are the real ones): to compile before the first call launches (:mod:`.ahead`)."""
    q, k, v = stand_ins(problem)
    return forward_launch(problem, plan, q, k, v, forward_args(problem, plan, q))
