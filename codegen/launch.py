"""Launching the generated kernels: arguments, tile configs, the default block mask.

Nothing here copies q, k or v: strides go to the kernel as they are (GQA, a key/value batch of
one and block masks broadcast over batch or heads are all expressed as strides, zero where
broadcast).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from flexcomp.errors import FlexcompError
from flexcomp.trace import TracedMod

from .kernels.forward import flex_fwd
from .modules import jit_function


@dataclass(frozen=True)
class ForwardConfig:
    """Tile sizes and launch parameters of the forward kernel.

    ``block_m`` query rows and ``block_n`` keys per tile (powers of two dividing the BlockMask's
    block sizes), ``num_warps`` and ``num_stages`` as in Triton.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ModArgs:
    """What a generated mod reads at run time: buffer pointers, flat strides/sizes, scalar tensors."""

    bufs: tuple
    strides: tuple
    sizes: tuple
    scalars_i: torch.Tensor
    scalars_f: torch.Tensor


def _largest_pow2_dividing(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def forward_config(head_dim: int, sparse_q: int, sparse_kv: int, options: dict, interpret: bool,
                   heavy_mods: bool = False) -> ForwardConfig:
    """Default tiles, overridden by torch's ``BLOCK_M`` / ``BLOCK_N`` / ``num_warps`` / ``num_stages``
    (or their ``fwd_`` forms) in ``kernel_options``; clipped to divide the mask's blocks.

    The defaults come from the H200 sweep in docs/performance.md (``python -m flexcomp.bench
    --sweep``): at head dim 64, plain attention runs best on 128x64 tiles with 4 warps, while mods
    with loads or transcendentals (``heavy_mods``) need the registers of 64x128 tiles; at 128,
    128x128 tiles with 8 warps win across variants.
    """
    if interpret:
        bm, bn, warps, stages = 64, 64, 4, 1
    elif head_dim <= 64:
        bm, bn, warps, stages = (64, 128, 4, 3) if heavy_mods else (128, 64, 4, 3)
    elif head_dim <= 128:
        bm, bn, warps, stages = 128, 128, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 4, 2
    get = lambda key, default: options.get("fwd_" + key, options.get(key, default))  # noqa: E731
    bm, bn = get("BLOCK_M", bm), get("BLOCK_N", bn)
    bm, bn = _largest_pow2_dividing(sparse_q, bm), _largest_pow2_dividing(sparse_kv, bn)
    if bm < 16 or bn < 16:
        raise FlexcompError(
            f"the triton backend tiles the BlockMask's blocks with tiles of at least 16x16, but block_mask "
            f"has BLOCK_SIZE=({sparse_q}, {sparse_kv}); create it with block sizes that are multiples of 16 "
            f"(the default 128 is best)")
    return ForwardConfig(bm, bn, get("num_warps", warps), get("num_stages", stages))


_SCALAR_TENSORS: dict = {}


def _scalar_tensor(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small device tensor of captured numbers; reused while the values stay the same."""
    key = (values, dtype, device)
    t = _SCALAR_TENSORS.get(key)
    if t is None:
        if len(_SCALAR_TENSORS) > 256:
            _SCALAR_TENSORS.clear()
        t = torch.tensor(values or (0,), dtype=dtype, device=device)
        _SCALAR_TENSORS[key] = t
    return t


def mod_args(tm: Optional[TracedMod], device) -> tuple[object, ModArgs]:
    """The jitted mod function (None if no mod) and its run-time arguments."""
    if tm is None:
        z = _scalar_tensor((), torch.int64, device)
        return None, ModArgs((z,), (0,), (1,), z, _scalar_tensor((), torch.float32, device))
    lowered, fn = jit_function(tm.graph)
    bufs, strides, sizes = [], [], []
    for t in tm.buffers:
        t = t.detach()
        if t.device != device:
            t = t.to(device)
        if t.dtype == torch.bool:
            t = t.view(torch.int8)
        bufs.append(t)
        strides += list(t.stride()) or [0]
        sizes += list(t.shape) or [1]
    ints = tuple(int(v) for v, slot in zip(tm.scalars, lowered.int_scalars) if slot >= 0)
    floats = tuple(float(v) for v, slot in zip(tm.scalars, lowered.float_scalars) if slot >= 0)
    si = _scalar_tensor(ints, torch.int64, device)
    sf = _scalar_tensor(floats, torch.float32, device)
    if not bufs:
        bufs, strides, sizes = [si], [0], [1]
    return fn, ModArgs(tuple(bufs), tuple(strides), tuple(sizes), si, sf)


@functools.lru_cache(maxsize=64)
def _full_block_mask(q_len: int, kv_len: int, device: torch.device):
    from flexcomp.blockmask import create_block_mask, noop_mask

    return create_block_mask(noop_mask, 1, 1, q_len, kv_len, device=device)


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score: Optional[TracedMod],
                 mask: Optional[TracedMod], block_mask, scale: float, torch_options: dict,
                 interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the generated forward kernel: output ``[B, Hq, L, Ev]`` (input dtype), LSE float32."""
    B, H, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    if D > 256 or DV > 256:
        raise FlexcompError(f"the triton backend supports head dims up to 256, got query/key {D} and value {DV}")
    device = q.device
    if block_mask is None:
        block_mask = _full_block_mask(L, S, device)
    sq, skv = block_mask.BLOCK_SIZE
    heavy = score is not None or (mask is not None and bool(mask.graph.buffers))
    cfg = forward_config(D, sq, skv, torch_options, interpret, heavy)
    nq = block_mask.kv_num_blocks.shape[-1]
    kv_num = block_mask.kv_num_blocks.expand(B, H, nq)
    kv_idx = block_mask.kv_indices.expand(B, H, nq, block_mask.kv_indices.shape[-1])
    has_full = block_mask.full_kv_num_blocks is not None
    full_num = block_mask.full_kv_num_blocks.expand(B, H, nq) if has_full else kv_num
    full_idx = block_mask.full_kv_indices.expand(kv_idx.shape) if has_full else kv_idx
    if has_full and (full_num.stride() != kv_num.stride() or full_idx.stride() != kv_idx.stride()):
        full_num, full_idx = full_num.contiguous(), full_idx.contiguous()
        kv_num, kv_idx = kv_num.contiguous(), kv_idx.contiguous()
    score_fn, sa = mod_args(score, device)
    mask_fn, ma = mod_args(mask, device)
    out = torch.empty(B, H, L, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=device)
    kb = 0 if k.shape[0] == 1 and B > 1 else 1
    precision = "ieee" if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    flex_fwd[grid](
        q, k, v, out, lse,
        *q.stride(), k.stride(0) * kb, *k.stride()[1:], v.stride(0) * kb, *v.stride()[1:], *out.stride(),
        *lse.stride(),
        kv_num, kv_idx, full_num, full_idx, *kv_num.stride(), *kv_idx.stride(),
        H, L, S, H // Hkv, scale,
        score_fn, sa.bufs, sa.strides, sa.sizes, sa.scalars_i, sa.scalars_f,
        mask_fn, ma.bufs, ma.strides, ma.sizes, ma.scalars_i, ma.scalars_f,
        HAS_SCORE_MOD=score_fn is not None, HAS_MASK_MOD=mask_fn is not None, HAS_FULL=has_full,
        SPARSE_Q=sq, SPARSE_KV=skv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        D=D, D_PAD=_pad(D), DV=DV, DV_PAD=_pad(DV), PRECISION=precision, EVEN_KV=S % skv == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse

