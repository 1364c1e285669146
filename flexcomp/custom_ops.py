"""flexcomp's kernels as ``torch.library`` custom ops: what ``torch.compile(..., fullgraph=True)`` puts
in its graph when it meets :func:`flexcomp.flex_attention` or :func:`flexcomp.create_block_mask`.

Three ops, each with a fake (meta) implementation that gives the outputs' shapes, dtypes and
devices, so Dynamo, AOTAutograd and Inductor never run flexcomp's Python:

- ``flexcomp::flex_attention`` (q, k, v, the BlockMask's kv lists, the mods' captured tensors and
  numbers, a call number) -> ``(out, lse, max_scores)``, with its gradient registered
  (``torch.library.register_autograd``) as
- ``flexcomp::flex_attention_backward`` -> ``(dq, dk, dv)``;
- ``flexcomp::create_block_mask`` (the mask_mod's captured tensors and numbers, a call number,
  the shape) -> the four kv lists ``[B, H, num_q_blocks(, num_kv_blocks)]``.

The call number names a :class:`Call` kept in :mod:`flexcomp.graph_mods`' registry when Dynamo
traced the call site: the mods' templates, the BlockMask's block size, the options.
At run time each op rebuilds the mods from their templates and this call's leaves and runs flexcomp
as in eager mode (validation, the trace cache, the backends), below autograd.

What runs eagerly instead (one graph break, as before, :mod:`flexcomp.compile`): mods that cannot be
templates (:mod:`flexcomp.graph_mods`), a score_mod whose captured tensors require grad (their
gradients need flexcomp's own autograd Function), and the flash-attn / SDPA / context-parallel
entry points.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import graph_mods
from .blockmask import BlockMask, noop_mask
from .graph_mods import ModTemplate
from .tiles import cdiv


@dataclass(frozen=True)
class Call:
    """One compiled call site's constants: the mods' templates (None: no mod), the BlockMask's
    ``BLOCK_SIZE`` (None: no BlockMask; its ``seq_lengths`` are the query's and key's lengths, which
    may be symbolic) and ``kernel_options`` as sorted items."""

    score: Optional[ModTemplate]
    mask: Optional[ModTemplate]
    block_size: Optional[tuple[int, int]]
    kernel_options: tuple

    def mods(self, tensors, ints, floats) -> tuple[Optional[Callable], Optional[Callable]]:
        """The score_mod and mask_mod rebuilt from this call's leaves (score's first)."""
        mods = []
        for t in (self.score, self.mask):
            if t is None:
                mods.append(None)
                continue
            nt, ni, nf = t.counts()
            mods.append(t.rebuild(tensors[:nt], ints[:ni], floats[:nf]))
            tensors, ints, floats = tensors[nt:], ints[ni:], floats[nf:]
        return mods[0], mods[1]

    def block_mask(self, lists: tuple, mask_mod: Optional[Callable], seq_lengths: tuple) -> Optional[BlockMask]:
        """The BlockMask over the op's lists, kept while they are the same memory, unmodified (a
        compiled graph may hand the same lists over as new tensor objects), so that its q-side lists
        are derived once for a forward and its backward, and once for the layers that share it. An
        entry holds its tensors: their memory cannot be reused by others while it is kept."""
        if self.block_size is None:
            return None
        key = (self, seq_lengths) + tuple(None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()),
                                                                   t.storage_offset(), t.dtype, t.device, t._version)
                                          for t in lists)
        hit = _MASKS.get(key)
        if hit is not None:
            bm = hit[1]
        else:
            kvn, kvi, fkvn, fkvi = lists
            bm = BlockMask._build(kvn, kvi, fkvn, fkvi, self.block_size, None, seq_lengths, True)
            _MASKS[key] = (lists, bm)
            while len(_MASKS) > _MASKS_KEPT:
                _MASKS.pop(next(iter(_MASKS)))
        bm.mask_mod = mask_mod if mask_mod is not None else noop_mask
        return bm

    def resolve(self, query: Tensor, key: Tensor, value: Tensor, lists: tuple, tensors, ints, floats,
                scale: Optional[float], enable_gqa: bool):
        """The op's call checked and traced as eager ``flex_attention`` does (:func:`flexcomp.api.resolve`),
        over the mods and BlockMask rebuilt from this call's leaves and lists."""
        from .api import resolve

        score_mod, mask_mod = self.mods(tensors, ints, floats)
        bm = self.block_mask(lists, mask_mod, (query.shape[2], key.shape[2]))
        return resolve(query, key, value, score_mod, bm, scale, enable_gqa, kernel_options=dict(self.kernel_options))


_MASKS: dict = {}
_MASKS_KEPT = 16


@contextlib.contextmanager
def _autograd_inside():
    """Autograd back on inside an op's implementation (the dispatcher runs it below autograd): the
    reference backend differentiates score_mods with autograd in its backward."""
    keys = torch._C.DispatchKey
    with torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False):
        yield


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- flexcomp::flex_attention ------------------------------------------------------------------
@torch.library.custom_op("flexcomp::flex_attention", mutates_args=())
def _flex_attention(query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Optional[Tensor],
                    kv_indices: Optional[Tensor], full_kv_num_blocks: Optional[Tensor],
                    full_kv_indices: Optional[Tensor], tensors: list[Tensor], ints: list[int], floats: list[float],
                    call: int, scale: Optional[float], enable_gqa: bool,
                    want_max: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .runtime import run_forward

    c: Call = graph_mods.registered(call)
    r = c.resolve(query, key, value, (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), tensors, ints,
                  floats, scale, enable_gqa)
    res = run_forward(query, key, value, r.score, r.mask, r.block_mask, r.scale, r.options, want_max)
    mx = res.max_scores if res.max_scores is not None else res.lse.new_empty(0)
    return res.out.contiguous(), res.lse.contiguous(), mx.contiguous()  # the layouts the fake promises


@_flex_attention.register_fake
def _flex_attention_fake(query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                         tensors, ints, floats, call, scale, enable_gqa, want_max):
    from .api import _validate

    c: Call = graph_mods.registered(call)
    bm = None
    if c.block_size is not None:
        bm = BlockMask((query.shape[2], key.shape[2]), kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                       None, None, None, None, c.block_size)
    _validate(query, key, value, bm, enable_gqa)
    B, H, L, _ = query.shape
    out = query.new_empty((B, H, L, value.shape[-1]))
    lse = query.new_empty((B, H, L), dtype=_lse_dtype(query))
    mx = query.new_empty((B, H, L) if want_max else (0,), dtype=_lse_dtype(query))
    return out, lse, mx


# ---- flexcomp::flex_attention_backward ---------------------------------------------------------
@torch.library.custom_op("flexcomp::flex_attention_backward", mutates_args=())
def _flex_attention_backward(query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                             d_out: Optional[Tensor], d_lse: Optional[Tensor], kv_num_blocks: Optional[Tensor],
                             kv_indices: Optional[Tensor], full_kv_num_blocks: Optional[Tensor],
                             full_kv_indices: Optional[Tensor], tensors: list[Tensor], ints: list[int],
                             floats: list[float], call: int, scale: Optional[float],
                             enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .runtime import run_backward

    c: Call = graph_mods.registered(call)
    r = c.resolve(query, key, value, (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), tensors, ints,
                  floats, scale, enable_gqa)
    with _autograd_inside():
        g = run_backward(query, key, value, out, lse, d_out, d_lse, r.score, r.mask, r.block_mask, r.scale, r.options)
    return tuple(_like(g, t) for g, t in ((g.dq, query), (g.dk, key), (g.dv, value)))


def _like(grad: Tensor, t: Tensor) -> Tensor:
    """``grad`` in ``t``'s layout (what the fake kernel promises: ``empty_like(t)``)."""
    if grad.stride() == t.stride():
        return grad
    return torch.empty_like(t).copy_(grad)


@_flex_attention_backward.register_fake
def _flex_attention_backward_fake(query, key, value, out, lse, d_out, d_lse, kv_num_blocks, kv_indices,
                                  full_kv_num_blocks, full_kv_indices, tensors, ints, floats, call, scale, enable_gqa):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, kvn, kvi, fkvn, fkvi, tensors, ints, floats, call, scale, enable_gqa, _) = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, *(t for t in (kvn, kvi, fkvn, fkvi) if t is not None), *tensors)
    ctx.lists_present = tuple(t is not None for t in (kvn, kvi, fkvn, fkvi))
    ctx.constants = (list(ints), list(floats), call, scale, enable_gqa)
    # no gradient for the captured tensors and numbers, in torch.library's structure: a None per tensor,
    # one None for a non-empty list of numbers, and an empty list for an empty one
    ctx.no_grads = ([None] * len(tensors), None if len(ints) else [], None if len(floats) else [])


def _backward(ctx, d_out, d_lse, d_max):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    lists = []
    for present in ctx.lists_present:
        lists.append(rest.pop(0) if present else None)
    ints, floats, call, scale, enable_gqa = ctx.constants
    dq, dk, dv = _flex_attention_backward(q, k, v, out, lse, d_out, d_lse, *lists, rest, ints, floats, call, scale,
                                          enable_gqa)
    return (dq, dk, dv, None, None, None, None, *ctx.no_grads, None, None, None, None)


torch.library.register_autograd("flexcomp::flex_attention", _backward, setup_context=_setup_context)


# ---- flexcomp::create_block_mask ---------------------------------------------------------------
@torch.library.custom_op("flexcomp::create_block_mask", mutates_args=())
def _create_block_mask(tensors: list[Tensor], ints: list[int], floats: list[float], call: int, B: int, H: int,
                       Q_LEN: int, KV_LEN: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .blockmask_build import create_block_mask

    c: Call = graph_mods.registered(call)
    _, mask_mod = c.mods(tensors, ints, floats)
    bm = create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=c.block_size)
    # the op's outputs are fresh tensors of the full [B, H, ...] shape (create_block_mask may return
    # broadcast views or lists it shares with earlier calls)
    return tuple(t.expand(B, H, *t.shape[2:]).contiguous() for t in (bm.kv_num_blocks, bm.kv_indices,
                                                                      bm.full_kv_num_blocks, bm.full_kv_indices))


@_create_block_mask.register_fake
def _create_block_mask_fake(tensors, ints, floats, call, B, H, Q_LEN, KV_LEN, device):
    c: Call = graph_mods.registered(call)
    nq, nkv = cdiv(Q_LEN, c.block_size[0]), cdiv(KV_LEN, c.block_size[1])
    num = torch.empty((B, H, nq), dtype=torch.int32, device=device)
    idx = torch.empty((B, H, nq, nkv), dtype=torch.int32, device=device)
    return num, idx, torch.empty_like(num), torch.empty_like(idx)


# ---- what the compiled code calls (Dynamo inlines these) ----------------------------------------
@torch._dynamo.assume_constant_result
def _attention_call(score_mod: Any, mask_mod: Any, block_size: Any, kernel_options: Any) -> tuple:
    """Run by Dynamo at trace time with the real objects: ``(call number, score paths, mask paths)``,
    or ``(-1, (), ())`` where a mod cannot be a template."""
    score = graph_mods.template_or_none(score_mod)
    mask = graph_mods.template_or_none(mask_mod) if mask_mod is not None else None
    if (score_mod is not None and score is None) or (mask_mod is not None and mask is None):
        return -1, (), ()
    items = tuple(sorted((kernel_options or {}).items()))
    call = Call(score, mask, None if block_size is None else tuple(block_size), items)
    return (graph_mods.register(call), score.paths() if score else (), mask.paths() if mask else ())


def graph_flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Optional[Callable],
                         block_mask: Optional[BlockMask], scale: Optional[float], enable_gqa: bool,
                         kernel_options: Optional[dict], want_max: bool) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """``(out, lse, max_scores)`` through ``flexcomp::flex_attention``, or None where this call must run
    eagerly (its mods cannot be templates, or a captured tensor of the score_mod requires grad)."""
    mask_mod = None if block_mask is None else block_mask.mask_mod
    if block_mask is not None and tuple(block_mask.seq_lengths) != (query.shape[2], key.shape[2]):
        return None  # the eager call raises flex_attention's error
    if not (graph_mods.reaches_cells(score_mod) and graph_mods.reaches_cells(mask_mod)):
        return None
    lists = (None, None, None, None)
    if block_mask is not None:
        lists = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                 block_mask.full_kv_indices)
    block = None if block_mask is None else block_mask.BLOCK_SIZE
    call, score_paths, mask_paths = _attention_call(graph_mods.shadow(score_mod), graph_mods.shadow(mask_mod), block,
                                                    kernel_options)
    if call < 0:
        return None
    st, si, sf = graph_mods.fetch(score_mod, score_paths, "flex_attention: score_mod")
    if any(t.requires_grad for t in st):
        return None
    mt, mi, mf = graph_mods.fetch(mask_mod, mask_paths, "flex_attention: block_mask.mask_mod")
    if scale is not None:
        scale = float(scale)
    return torch.ops.flexcomp.flex_attention(query, key, value, *lists, st + mt, si + mi, sf + mf, call, scale,
                                             enable_gqa, want_max)


def graph_create_block_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                            device: Any, BLOCK_SIZE: Any) -> Optional[BlockMask]:
    """:func:`flexcomp.create_block_mask` through ``flexcomp::create_block_mask``, or None where the
    mask_mod cannot be a template (then it runs eagerly)."""
    if not graph_mods.reaches_cells(mask_mod):
        return None
    block = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    call, _, mask_paths = _attention_call(None, graph_mods.shadow(mask_mod), block, None)
    if call < 0:
        return None
    mt, mi, mf = graph_mods.fetch(mask_mod, mask_paths, "create_block_mask: mask_mod")
    b, h = (1 if B is None else B), (1 if H is None else H)
    lists = torch.ops.flexcomp.create_block_mask(mt, mi, mf, call, b, h, Q_LEN, KV_LEN, torch.device(device))
    return BlockMask._build(*lists, block, mask_mod, (Q_LEN, KV_LEN), True)
