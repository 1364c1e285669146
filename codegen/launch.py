"""Launching the generated kernels: arguments, tile configs, the default block mask.

Nothing here copies q, k or v: strides go to the kernel as they are (GQA, a key/value batch of
one and block masks broadcast over batch or heads are all expressed as strides, zero where
broadcast).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from flexcomp.errors import FlexcompError
from flexcomp.trace import TracedMod

from .kernels.forward import flex_fwd
from .lower import gathers_per_pair
from .modules import jit_function


@dataclass(frozen=True)
class ForwardConfig:
    """Tile sizes and launch parameters of the forward kernel.

    ``block_m`` query rows and ``block_n`` keys per tile (powers of two dividing the BlockMask's
    block sizes), ``num_warps`` and ``num_stages`` as in Triton; ``static_sub``: unroll the tiles of
    one BlockMask block (else loop over them, for shared memory's sake).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    static_sub: bool = True


@dataclass(frozen=True)
class ModArgs:
    """What a generated mod reads at run time: buffer pointers, flat strides/sizes, scalar tensors."""

    bufs: tuple
    strides: tuple
    sizes: tuple
    scalars_i: torch.Tensor
    scalars_f: torch.Tensor


def largest_pow2_dividing(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


@functools.lru_cache(maxsize=16)
def smem_limit_of(device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", 232448)
    return 232448


def forward_config(head_dim: int, value_dim: int, elt: int, sparse_q: int, sparse_kv: int, options: dict,
                   interpret: bool, heavy_mods: bool = False, smem_limit: int = 232448,
                   pair_gathers: bool = False) -> ForwardConfig:
    """Tiles for the forward kernel.

    Defaults come from the H200 sweep in docs/performance.md (``python -m flexcomp.bench --sweep``):
    at head dim 64, plain attention runs best on 128x64 tiles with 4 warps, while mods with loads
    or transcendentals (``heavy_mods``) need the registers of 64x128 tiles; at 128, 128x128 tiles
    with 8 warps, except for a score_mod gathering a captured tensor pair by pair (``pair_gathers``,
    ``table[b, doc[q], doc[kv]]``): 128x64 (4.4 ms against 5.6 ms on H200 at 4x16x4096x128).
    torch's ``BLOCK_M`` / ``BLOCK_N`` / ``num_warps`` / ``num_stages`` (or ``fwd_`` forms) in
    ``kernel_options`` override them.

    Shared memory: the tiles of one BlockMask block are unrolled, each with ``num_stages`` buffers
    of K and V, so a config needs about ``q + stages * SPARSE_KV * (D + Dv) * elt`` bytes (measured
    on H100/H200). Stages drop until that fits the device; if even one does not, the block's tiles
    run in a loop (``static_sub`` False), which needs only ``BLOCK_N`` rows per stage.
    """
    if interpret:
        bm, bn, warps, stages = 64, 64, 4, 1
    elif elt >= 4:  # float32 inputs: twice the bytes per tile, and ieee dots
        bm, bn, warps, stages = 64, 64, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = (64, 128, 4, 3) if heavy_mods else (128, 64, 4, 3)
    elif head_dim <= 128:
        bm, bn, warps, stages = (128, 64, 8, 3) if pair_gathers else (128, 128, 8, 3)
    else:
        bm, bn, warps, stages = 64, 64, 4, 2
    get = lambda key, default: options.get("fwd_" + key, options.get(key, default))  # noqa: E731
    for key, default in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        v = get(key, default)
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise FlexcompError(f"kernel_options[{key!r}] must be a power of two >= 16, got {v!r}")
    bm, bn = largest_pow2_dividing(sparse_q, get("BLOCK_M", bm)), largest_pow2_dividing(sparse_kv, get("BLOCK_N", bn))
    if bm < 16 or bn < 16:
        raise FlexcompError(
            f"the triton backend tiles the BlockMask's blocks with tiles of at least 16x16, but block_mask "
            f"has BLOCK_SIZE=({sparse_q}, {sparse_kv}); create it with block sizes that are multiples of 16 "
            f"(the default 128 is best)")
    warps, stages = get("num_warps", warps), get("num_stages", stages)
    d_pad, dv_pad = pad_dim(head_dim), pad_dim(value_dim)
    q_bytes = bm * d_pad * elt
    margin = bm * bn * 4 if elt == 4 else 0  # float32 inputs also stage the fp32 probabilities
    per_stage = sparse_kv * (d_pad + dv_pad) * elt
    static_sub = True
    if not interpret:
        while stages > 1 and q_bytes + margin + stages * per_stage > smem_limit:
            stages -= 1
        if q_bytes + margin + stages * per_stage > smem_limit:
            static_sub = False
            per_stage = bn * (d_pad + dv_pad) * elt
            stages = max(1, min(stages, (smem_limit - q_bytes - margin) // max(1, per_stage)))
    return ForwardConfig(bm, bn, warps, stages, static_sub)


_MEMO: dict = {}


def memo_set(key: tuple, value):
    """Replace what :func:`memo` keeps under ``key`` (a config that did not fit, say)."""
    _MEMO[key] = value
    return value


def memo(key: tuple, make):
    """``make()`` once per key: configs and the like, so a call's host time stays small."""
    hit = _MEMO.get(key)
    if hit is None:
        if len(_MEMO) > 1024:
            _MEMO.clear()
        hit = _MEMO[key] = make()
    return hit


_SCALAR_TENSORS: dict = {}


def _scalar_tensor(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small device tensor of captured numbers; reused while the values stay the same."""
    key = (tuple(repr(v) for v in values), dtype, device)  # repr keeps 0.0 and -0.0 apart
    t = _SCALAR_TENSORS.get(key)
    if t is None:
        if len(_SCALAR_TENSORS) > 256:
            _SCALAR_TENSORS.clear()
        t = torch.tensor(values or (0,), dtype=dtype, device=device)
        _SCALAR_TENSORS[key] = t
    return t


def mod_args(tm: Optional[TracedMod], device) -> tuple[object, ModArgs]:
    """The jitted mod function (None if no mod) and its run-time arguments.

    Buffers are read afresh each call (in-place updates show; nothing holds them); the function
    and the captured numbers' device tensors are kept with the trace (``launch_cache``)."""
    if tm is None:
        z = _scalar_tensor((), torch.int64, device)
        return None, ModArgs((z,), (0,), (1,), z, _scalar_tensor((), torch.float32, device))
    bufs, strides, sizes = [], [], []
    for t in tm.buffers:
        if t.device != device:
            t = t.to(device)
        if t.dtype == torch.bool:
            t = t.view(torch.int8)
        strides += t.stride() or (0,)
        sizes += t.shape or (1,)
        bufs.append(t)
    hit = tm.launch_cache.get(("mod_args", device))
    if hit is None:
        for t in bufs:
            if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31:
                raise FlexcompError(
                    f"the captured tensor of shape {tuple(t.shape)} in {tm.graph.kind.value} {tm.graph.fn_name!r} "
                    f"spans 2**31 elements or more; the triton backend indexes captured tensors with 32-bit offsets")
        lowered, fn = jit_function(tm.graph)
        ints = tuple(int(v) for v, slot in zip(tm.scalars, lowered.int_scalars) if slot >= 0)
        floats = tuple(float(v) for v, slot in zip(tm.scalars, lowered.float_scalars) if slot >= 0)
        hit = (fn, _scalar_tensor(ints, torch.int64, device), _scalar_tensor(floats, torch.float32, device))
        tm.launch_cache[("mod_args", device)] = hit
    fn, si, sf = hit
    if not bufs:
        bufs, strides, sizes = [si], [0], [1]
    return fn, ModArgs(tuple(bufs), tuple(strides), tuple(sizes), si, sf)


@functools.lru_cache(maxsize=64)
def full_block_mask(q_len: int, kv_len: int, device: torch.device):
    from flexcomp.blockmask import create_block_mask, noop_mask

    return create_block_mask(noop_mask, 1, 1, q_len, kv_len, device=device)


def pad_dim(d: int) -> int:
    """Head dims padded to a power of two (at least 16) for the kernels' tiles."""
    return max(16, 1 << (d - 1).bit_length())


def check_inputs(q: torch.Tensor, D: int, DV: int) -> None:
    """What the Triton kernels take: head dims up to 256, float16 / bfloat16 / float32."""
    if D > 256 or DV > 256:
        raise FlexcompError(f"the triton backend supports head dims up to 256, got query/key {D} and value {DV}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise FlexcompError(f"the triton backend runs float16, bfloat16 and float32 inputs, got {q.dtype}; "
                            f"use kernel_options={{'BACKEND': 'reference'}} for {q.dtype}")


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score: Optional[TracedMod],
                 mask: Optional[TracedMod], block_mask, scale: float, torch_options: dict,
                 interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the generated forward kernel: output ``[B, Hq, L, Ev]`` (input dtype), LSE float32."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    check_inputs(q, D, DV)
    device = q.device
    if block_mask is None:
        block_mask = full_block_mask(L, S, device)
    sq, skv = block_mask.BLOCK_SIZE
    heavy = score is not None or (mask is not None and bool(mask.graph.buffers))
    pairs = score is not None and memo(("pairs", score.graph.structural_key()), lambda: gathers_per_pair(score.graph))
    cfg_key = ("fwd", D, DV, q.element_size(), sq, skv, tuple(sorted(torch_options.items())), interpret, heavy, pairs,
               device)
    cfg = memo(cfg_key, lambda: forward_config(D, DV, q.element_size(), sq, skv, torch_options, interpret, heavy,
                                               smem_limit_of(device), pairs))
    lists = block_lists(block_mask, B, H, transposed=False)
    score_fn, sa = mod_args(score, device)
    mask_fn, ma = mod_args(mask, device)
    out = torch.empty(B, H, L, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=device)
    kb = 0 if k.shape[0] == 1 and B > 1 else 1
    precision = "ieee" if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    while True:
        try:
            _launch_forward(cfg, q, k, v, out, lse, kb, lists, scale, score_fn, sa, mask_fn, ma, sq, skv, precision)
            return out, lse
        except OutOfResources:  # e.g. a gathered bias needs shared memory for its layout: smaller, remembered
            smaller = _smaller_forward(cfg)
            if smaller is None:
                raise
            cfg = memo_set(cfg_key, smaller)


def _smaller_forward(cfg: ForwardConfig) -> Optional[ForwardConfig]:
    """The next forward config down when ``cfg`` does not fit: fewer stages, then looped sub-tiles,
    then halved tiles."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.static_sub:
        return replace(cfg, static_sub=False)
    if cfg.block_n > 16:
        return replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > 16:
        return replace(cfg, block_m=cfg.block_m // 2, num_warps=4)
    return None


def _launch_forward(cfg, q, k, v, out, lse, kb, lists, scale, score_fn, sa, mask_fn, ma, sq, skv, precision):
    B, H, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    flex_fwd[grid](
        q, k, v, out, lse,
        *q.stride(), k.stride(0) * kb, *k.stride()[1:], v.stride(0) * kb, *v.stride()[1:], *out.stride(),
        *lse.stride(),
        *lists.tensors, *lists.num.stride(), *lists.idx.stride(),
        H, L, S, H // Hkv, scale,
        score_fn, sa.bufs, sa.strides, sa.sizes, sa.scalars_i, sa.scalars_f,
        mask_fn, ma.bufs, ma.strides, ma.sizes, ma.scalars_i, ma.scalars_f,
        HAS_SCORE_MOD=score_fn is not None, HAS_MASK_MOD=mask_fn is not None, HAS_FULL=lists.has_full,
        SPARSE_Q=sq, SPARSE_KV=skv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        D=D, D_PAD=pad_dim(D), DV=DV, DV_PAD=pad_dim(DV), PRECISION=precision, EVEN_KV=S % skv == 0, STATIC_SUB=cfg.static_sub,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


@dataclass(frozen=True)
class _Lists:
    """One direction's block lists, expanded to ``[B, H, n]`` (strides only), partial and full."""

    num: torch.Tensor
    idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    has_full: bool

    @property
    def tensors(self) -> tuple:
        return self.num, self.idx, self.full_num, self.full_idx


_LISTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def block_lists(block_mask, B: int, H: int, transposed: bool) -> "_Lists":
    """The BlockMask's kv lists (``transposed``: its q lists) for a ``[B, H]`` launch, as strides;
    kept per BlockMask while its tensors stay the same objects (host time per call matters)."""
    fields = ((block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks, block_mask.full_q_indices)
              if transposed else
              (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
               block_mask.full_kv_indices))
    key = (B, H, *map(id, fields))
    try:
        per_mask = _LISTS.setdefault(block_mask, {})
    except TypeError:  # not weakly referenceable: no cache
        per_mask = {}
    hit = per_mask.get(key)
    if hit is None:
        if len(per_mask) > 8:
            per_mask.clear()
        hit = per_mask[key] = _lists(*fields, B, H, fields[0].shape[-1])
    return hit


def _lists(num, idx, full_num, full_idx, B: int, H: int, n: int) -> _Lists:
    num = num.expand(B, H, n)
    idx = idx.expand(B, H, n, idx.shape[-1])
    has_full = full_num is not None
    fnum = full_num.expand(B, H, n) if has_full else num
    fidx = full_idx.expand(B, H, n, full_idx.shape[-1]) if has_full else idx
    if has_full and (fnum.stride() != num.stride() or fidx.stride() != idx.stride()):
        num, idx, fnum, fidx = num.contiguous(), idx.contiguous(), fnum.contiguous(), fidx.contiguous()
    return _Lists(num, idx, fnum, fidx, has_full)
