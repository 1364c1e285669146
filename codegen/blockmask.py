"""Block masks on the device: the launchers of :mod:`flexcomp.codegen.kernels.blockmask`.

``create_block_mask`` on a CUDA device (or under ``TRITON_INTERPRET=1`` with
``FLEXCOMP_BACKEND=triton``) builds the block-kind map with :func:`classify` (the generated bounds
of :mod:`.bounds`, after their run tables' kernel where the mask loads runs of a capture, and the
mask_mod on each undecided block: one or two launches), or, for a mask those bounds do not cover,
with the interval analysis of :mod:`flexcomp.sparsity` as torch ops and :func:`evaluate_unknown`
(one launch); then :func:`ordered_lists` (the kv and q lists, one launch). Nothing is read back to the host,
except the error slots of a mask_mod whose indices (or integer divisors) the shapes alone do not
prove in range (:func:`flexcomp.ranges.proven_by_shapes`): it runs checked and raises IndexError /
ZeroDivisionError as torch would.

:func:`varlen_lists` builds a packing's lists (``flexcomp.flash_attn``) from its ``cu_seqlens`` alone.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from flexcomp.cache import CACHE
from flexcomp.plan import may_fault
from flexcomp.ranges import Domain, proven_by_shapes
from flexcomp.sparsity import BlockGrid
from flexcomp.tiles import cdiv, next_power_of_2
from flexcomp.trace import TracedMod

from . import ahead
from .ahead import KernelLaunch
from .kernels import blockmask as kernels
from .bounds import bounds_function
from .launch import ModArgs, mod_args, raise_if_out_of_range, scalar_tensor

# kv blocks one classify program reads (one vector load; its undecided ones it evaluates in turn):
# small, so that the rows where undecided blocks crowd (a document boundary) spread over programs
CLASSIFY_CHUNK = 16
# columns one list program reads at a time
LIST_CHUNK = 1024


def evaluate_unknown(tm: TracedMod, grid: BlockGrid, kind: torch.Tensor, separate_full: Optional[bool] = None) -> None:
    """Decide the UNKNOWN blocks of ``kind`` (int8 ``[Bx, Hx, num_q, num_kv]``, contiguous, in place)
    with one kernel launch: :data:`flexcomp.sparsity.UnknownEvaluator` on the device.

    ``separate_full``: the lists :func:`ordered_lists` will make next (None: unknown); at the first
    map of a mask structure and sizes, their two kernels compile in parallel with this one
    (:mod:`.ahead`)."""
    if kind.numel() == 0:
        return
    args = _mask_args(tm, grid, kind)
    launch = _classify_launch(kind, grid, args)
    if separate_full is not None:
        _start_with_lists(("blockmask", tm.graph.structural_key(), kind.shape, grid, kind.device), kind, [launch],
                          separate_full)
    launch.run()
    if args.err is not None:
        raise_if_out_of_range(((tm, args),))


def _mask_args(tm: TracedMod, grid: BlockGrid, kind: torch.Tensor) -> ModArgs:
    """The mask_mod's arguments for evaluating blocks of ``kind``: its checked variant (error slots in
    ``err``) where the shapes do not prove its indices and divisors safe."""
    Bx, Hx = kind.shape[:2]
    domain = Domain(Bx, Hx, grid.q_len, grid.kv_len)
    key = ("checked_mask", tm.graph.structural_key(), tuple(tuple(t.shape) for t in tm.buffers), domain)
    checked = CACHE.get_or_make(key, lambda: may_fault(tm.graph) and not proven_by_shapes(tm, domain))  # shapes only
    return mod_args(tm, tm.graph, kind.device, checked=checked)


def classify(tm: TracedMod, grid: BlockGrid, B: int, H: int, device: torch.device,
             separate_full: bool) -> Optional[torch.Tensor]:
    """The block-kind map (int8 ``[Bx, Hx, num_q, num_kv]``: Bx = 1 where the mask ignores ``b``, Hx
    likewise) in one launch, bounds and evaluation together (:func:`kernels.classify_by_bounds`), for a mask with
    a generated bounds function (:mod:`.bounds`); None otherwise (the torch analysis runs then)."""
    bf = bounds_function(tm)
    if bf is None:
        return None
    g = tm.graph
    Bx, Hx = (B if g.uses_input("b") else 1), (H if g.uses_input("h") else 1)
    kind = torch.empty(Bx, Hx, grid.num_q, grid.num_kv, dtype=torch.int8, device=device)
    if kind.numel() == 0:
        return kind
    args = _mask_args(tm, grid, kind)
    plain = args if args.err is None else mod_args(tm, g, device)  # the captures' layout the bounds read
    scalars = scalar_tensor(tuple(float(tm.scalars[i]) for i in bf.runtime_scalars), torch.float64, device)
    qb, kvb = grid.q_block, grid.kv_block
    pads = (next_power_of_2(qb), next_power_of_2(kvb))
    launches = []
    runs = scalars  # read only where the bounds load runs
    if bf.runs:
        size, programs = bf.table([tuple(t.shape) for t in tm.buffers], grid)
        runs = torch.empty(size, dtype=torch.float64, device=device)
        launches.append(KernelLaunch(bf.runs_fn, (programs,), (plain.bufs, runs, qb, kvb, *pads)))
    programs = (Bx * Hx * grid.num_q, cdiv(grid.num_kv, CLASSIFY_CHUNK))
    launches.append(KernelLaunch(kernels.classify_by_bounds, programs, (
        kind, kind.stride(0), kind.stride(1), kind.stride(2), grid.num_q, grid.num_kv, Hx, grid.q_len, grid.kv_len,
        bf.fn, scalars, plain.bufs, runs, args.fn, args.bufs, qb, kvb, *pads, CLASSIFY_CHUNK), dict(num_warps=4)))
    _start_with_lists(("bounds", bf.fn, kind.shape, grid, kind.device), kind, launches, separate_full)
    for launch in launches:
        launch.run()
    if args.err is not None:
        raise_if_out_of_range(((tm, args),))
    return kind


def _classify_launch(kind: torch.Tensor, grid: BlockGrid, args: ModArgs) -> KernelLaunch:
    Bx, Hx, nq, nkv = kind.shape
    qb, kvb = grid.q_block, grid.kv_block
    return KernelLaunch(kernels.classify_blocks, (Bx * Hx * nq, cdiv(nkv, CLASSIFY_CHUNK)), (
        kind, kind.stride(0), kind.stride(1), kind.stride(2), nq, nkv, Hx, grid.q_len, grid.kv_len,
        args.fn, args.bufs, qb, kvb, next_power_of_2(qb), next_power_of_2(kvb), CLASSIFY_CHUNK),
        dict(num_warps=4))


def _start_with_lists(key: tuple, kind: torch.Tensor, first: list[KernelLaunch], separate_full: bool) -> None:
    """Once per ``key`` (a map's structure, sizes and device): compile the launches ``first`` (that
    write the block-kind map ``kind``) and the lists' kernel over a ``meta`` stand-in of that map in
    parallel (:mod:`.ahead`); returns when all are ready."""
    key = ("ahead", *key, separate_full)
    if CACHE.get(key) is not None:
        return
    CACHE.put(key, True)
    if not ahead.enabled():
        return

    def compile_all() -> None:
        meta = torch.empty(kind.shape, dtype=kind.dtype, device="meta")
        views = _list_views(meta, separate_full, *kind.shape[:2])[0]
        ahead.wait_all(ahead.start([*first, _list_launch(meta, separate_full, views)], kind.device))

    ahead.guarded(compile_all)


def _chunk(cols: int) -> int:
    """Columns one program handles at a time: :data:`LIST_CHUNK`, or all of a short row."""
    return LIST_CHUNK if cols > 256 else next_power_of_2(max(cols, 16))


def ordered_lists(kind: torch.Tensor, separate_full: bool, B: Optional[int] = None, H: Optional[int] = None
                  ) -> tuple:
    """torch's ordered lists of a finished block-kind map (int8 ``[Bx, Hx, num_q, num_kv]``):
    ``(kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx)``, int32,
    ``[B, H, rows]`` / ``[B, H, rows, cols]`` (``B`` / ``H`` default to ``Bx`` / ``Hx``; a dim of 1
    that is not is broadcast, stride 0). Without ``separate_full`` every kept block is listed as
    partial and the full ones are None. One allocation and one launch (:func:`kernels.both_lists`)."""
    kind = kind.contiguous()  # (b, h) at b * Hx + h times num_q * num_kv
    views, buf = _list_views(kind, separate_full, B or kind.shape[0], H or kind.shape[1])
    if buf.numel():
        _list_launch(kind, separate_full, views).run()
    return views


# int32 elements each list's start is rounded to: 64 bytes, so that every list is as aligned as a
# tensor of its own (Triton specialises on 16-byte alignment; the stand-ins compiled ahead assume it)
LIST_ALIGN = 16


def _list_views(kind: torch.Tensor, separate_full: bool, B: int, H: int) -> tuple[tuple, torch.Tensor]:
    """The eight lists of :func:`ordered_lists` as views of one int32 buffer (the full ones None
    without ``separate_full``), and the buffer."""
    total, layout = _list_layout(tuple(kind.shape), separate_full, B, H)
    buf = torch.empty(total, dtype=torch.int32, device=kind.device)
    return tuple(None if at is None else buf.as_strided(*at) for at in layout), buf


@functools.lru_cache(maxsize=256)
def _list_layout(shape: tuple, separate_full: bool, B: int, H: int) -> tuple[int, tuple]:
    """The buffer's length and each list's ``(size, stride, offset)`` (None: not made), for a map of
    ``shape``: each list starts :data:`LIST_ALIGN`-aligned; broadcast dims have stride 0."""
    Bx, Hx, nq, nkv = shape
    layout, total = [], 0
    for rows, cols in ((nq, nkv), (nkv, nq)):
        for full in (False, True):
            for dims in ((rows,), (rows, cols)):
                if full and not separate_full:
                    layout.append(None)
                    continue
                inner = math.prod(dims)
                row = (cols, 1) if len(dims) == 2 else (1,)
                layout.append(((B, H, *dims), (Hx * inner if Bx == B else 0, inner if Hx == H else 0, *row), total))
                total += cdiv(Bx * Hx * inner, LIST_ALIGN) * LIST_ALIGN
    return total, tuple(layout)


def _list_launch(kind: torch.Tensor, separate_full: bool, views: tuple, kv: bool = True, q: bool = True
                 ) -> KernelLaunch:
    """The launch of :func:`kernels.both_lists` writing ``views`` (:func:`_list_views`) from the
    contiguous map ``kind``: the kv lists, the q lists, or both (a program per row listed)."""
    Bx, Hx, nq, nkv = kind.shape
    num, idx, full_num, full_idx, q_num, q_idx, q_full_num, q_full_idx = views
    if not separate_full:  # placeholders the kernel never writes
        full_num, full_idx, q_full_num, q_full_idx = num, idx, q_num, q_idx
    kv_rows = Bx * Hx * nq if kv else 0
    return KernelLaunch(kernels.both_lists, (kv_rows + (Bx * Hx * nkv if q else 0),), (
        kind, nq * nkv, nq, nkv, kv_rows, num, idx, full_num, full_idx, q_num, q_idx, q_full_num, q_full_idx,
        separate_full, _chunk(nkv), _chunk(nq)))


# sequences one varlen program compares a token against at a time (cumulative lengths, one vector load)
DOC_CHUNK = 256


def varlen_lists(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, left: int, right: int,
                 block: int) -> tuple:
    """The kv lists ``(kv_num, kv_idx, full_kv_num, full_kv_idx)`` (int32 ``[1, 1, rows]`` /
    ``[1, 1, rows, cols]``) of packed sequences (``cu_q`` / ``cu_k``: int64 cumulative lengths on
    the device) under the window ``(left, right)``, and a function making the q lists when a
    backward first asks (their memory is taken now): two launches (the block-kind map, then the kv
    lists), no host read."""
    nq, nkv = cdiv(total_q, block), cdiv(total_k, block)
    kind = torch.empty(1, 1, nq, nkv, dtype=torch.int8, device=cu_q.device)
    chunk = _chunk(nkv)
    launch = KernelLaunch(kernels.varlen_kinds, (nq, cdiv(nkv, chunk)), (
        kind, cu_q, cu_k, cu_q.numel() - 1, total_q, nkv, left, right, block, block, chunk, DOC_CHUNK),
        dict(num_warps=4))
    _start_with_lists(("varlen", kind.shape, block, left, right, kind.device), kind, [launch], separate_full=True)
    launch.run()
    views, _ = _list_views(kind, True, 1, 1)
    _list_launch(kind, True, views, q=False).run()

    def q_lists() -> tuple:
        _list_launch(kind, True, views, kv=False).run()
        return views[4:]

    return views[:4], q_lists
