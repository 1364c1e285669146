"""Tiles: the Triton kernels' tile sizes, warps and stages for one problem (part of the plan).

Pure decisions from the problem's shapes, dtype and block sizes, the device's shared memory and
what ``kernel_options`` asked (:class:`flexcomp.options.TileRequest`); nothing here launches or
imports Triton. The defaults come from the H200 sweeps in docs/performance.md.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Union

import torch

from .cache import CACHE
from .errors import FlexcompError
from .options import Options, Pass, TileRequest

# shared memory per block (opt-in) of an H100 / H200: the limit where the device cannot be asked
HOPPER_SMEM_BYTES = 232448
MIN_TILE = 16  # tl.dot's smallest tile side


class KernelFamily(enum.Enum):
    """The kernel family a problem's forward runs on (the backward is the prefill one for both)."""

    PREFILL = "prefill"  # flash forward and FlashAttention-2 backward over the BlockMask's lists
    DECODE = "decode"  # split-KV flash-decoding: few queries against many keys (codegen/kernels/decode.py)


DECODE_MAX_Q = 64  # the longest query the decode family takes (speculative decoding, tree verification)
DECODE_MIN_KV_BLOCKS = 2  # below this many kv blocks a row has nothing to split: prefill
DECODE_MAX_ROWS = 64  # query rows (packed heads x positions) in one decode tile


def _request(options: Union[TileRequest, Mapping], which: Pass) -> TileRequest:
    """A pass's tile request; a plain ``kernel_options`` dict is parsed (tests and tools call the
    config functions with one)."""
    if isinstance(options, TileRequest):
        return options
    parsed = Options.parse(dict(options))
    return parsed.forward if which is Pass.FORWARD else parsed.backward


def _power_of_two(request: TileRequest, name: str, default: int) -> int:
    v = getattr(request, name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < MIN_TILE or v & (v - 1):
        raise FlexcompError(f"kernel_options[{request.key_of(name)!r}] must be a power of two >= 16, got {v!r}")
    return v


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


def largest_pow2_dividing(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def smem_limit_of(device) -> int:
    """Shared memory one block may use on ``device`` (kept in the cache: a device query costs)."""
    def query() -> int:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return getattr(props, "shared_memory_per_block_optin", HOPPER_SMEM_BYTES)
        return HOPPER_SMEM_BYTES

    return CACHE.get_or_make(("smem", device), query)


def forward_config(head_dim: int, value_dim: int, elt: int, sparse_q: int, sparse_kv: int,
                   options: Union[TileRequest, Mapping],
                   interpret: bool, heavy_mods: bool = False, smem_limit: int = HOPPER_SMEM_BYTES,
                   pair_gathers: bool = False) -> ForwardConfig:
    """Tiles for the forward kernel.

    Defaults come from the H200 sweep in docs/performance.md (``python -m flexcomp.bench --sweep``):
    at head dim 64, plain attention runs best on 128x64 tiles with 4 warps, while mods with loads
    or transcendentals (``heavy_mods``) need the registers of 64x128 tiles; at 128, 128x128 tiles
    with 8 warps, except for a score_mod gathering a captured tensor pair by pair (``pair_gathers``,
    ``table[b, doc[q], doc[kv]]``): 128x64 (4.4 ms against 5.6 ms on H200 at 4x16x4096x128); above
    128, 128x64 tiles with 8 warps, or 64x64 with 4 for heavy mods.
    torch's ``BLOCK_M`` / ``BLOCK_N`` / ``num_warps`` / ``num_stages`` (or ``fwd_`` forms) in
    ``kernel_options`` override them.

    Shared memory: the tiles of one BlockMask block are unrolled, each with ``num_stages`` buffers
    of K and V, so a config needs about ``q + stages * SPARSE_KV * (D + Dv) * elt`` bytes (measured
    on H100/H200). Stages drop until that fits the device; if even one does not, the block's tiles
    run in a loop (``static_sub`` False), which needs only ``BLOCK_N`` rows per stage.
    """
    if interpret:
        bm, bn, warps, stages = 64, 64, 4, 1
    elif elt >= 8:  # float64: four times the bytes and twice the registers of bf16; correctness first
        bm, bn, warps, stages = 32, 32, 4 if head_dim <= 128 else 8, 1
    elif elt >= 4:  # float32 inputs: twice the bytes per tile, and ieee dots
        bm, bn, warps, stages = 64, 64, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = (64, 128, 4, 3) if heavy_mods else (128, 64, 4, 3)
    elif head_dim <= 128:
        bm, bn, warps, stages = (128, 64, 8, 3) if pair_gathers else (128, 128, 8, 3)
    else:  # head dims up to 256, H200 of 2026-12-02 at 2x8x4096x256: causal 251 TF/s (64x64x4: 223), but
        # heavy mods keep 64x64x4 (document, whose mask loads: 68 against 104; soft-cap 218, above 1.5x torch)
        bm, bn, warps, stages = (64, 64, 4, 2) if heavy_mods else (128, 64, 8, 2)
    req = _request(options, Pass.FORWARD)
    bm = largest_pow2_dividing(sparse_q, _power_of_two(req, "block_m", bm))
    bn = largest_pow2_dividing(sparse_kv, _power_of_two(req, "block_n", bn))
    if bm < 16 or bn < 16:
        raise FlexcompError(
            f"the triton backend tiles the BlockMask's blocks with tiles of at least 16x16, but block_mask "
            f"has BLOCK_SIZE=({sparse_q}, {sparse_kv}); create it with block sizes that are multiples of 16 "
            f"(the default 128 is best)")
    warps = warps if req.num_warps is None else req.num_warps
    stages = stages if req.num_stages is None else req.num_stages
    d_pad, dv_pad = pad_dim(head_dim), pad_dim(value_dim)
    q_bytes = bm * d_pad * elt
    margin = bm * bn * elt if elt >= 4 else 0  # float32/64 inputs also stage the probabilities
    static_sub = elt < 8  # float64: the block's tiles in a loop (unrolled, their registers spill)
    per_stage = (sparse_kv if static_sub else bn) * (d_pad + dv_pad) * elt
    if not interpret:
        while stages > 1 and q_bytes + margin + stages * per_stage > smem_limit:
            stages -= 1
        if q_bytes + margin + stages * per_stage > smem_limit:
            static_sub = False
            per_stage = bn * (d_pad + dv_pad) * elt
            stages = max(1, min(stages, (smem_limit - q_bytes - margin) // max(1, per_stage)))
    return ForwardConfig(bm, bn, warps, stages, static_sub)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``, as ``triton.cdiv`` (host side: that one costs about 2 us a
    call, a wrapper made for use inside kernels).

    >>> cdiv(257, 128), cdiv(256, 128), cdiv(0, 128)
    (3, 2, 0)
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1`` (0 for 0), as ``triton.next_power_of_2``.

    >>> next_power_of_2(0), next_power_of_2(1), next_power_of_2(17), next_power_of_2(64)
    (0, 1, 32, 64)
    """
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def pad_dim(d: int) -> int:
    """Head dims padded to a power of two (at least 16) for the kernels' tiles."""
    return max(16, 1 << (d - 1).bit_length())


def smaller_forward(cfg: ForwardConfig) -> Optional[ForwardConfig]:
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


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two backward kernels.

    dK/dV: each program owns ``block_n1`` keys and walks queries ``block_m1`` rows at a time;
    dQ: each program owns ``block_m2`` queries and walks keys ``block_n2`` at a time. All four
    are powers of two dividing the BlockMask's block sizes; ``num_warps`` and ``num_stages`` as
    in Triton (both kernels); ``split``: launch the dQ and the dK/dV programs separately (each
    compiled on its own, so neither pays for the other's registers) instead of in one grid.
    """

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    split: bool = False


def backward_config(head_dim: int, value_dim: int, elt: int, sparse_q: int, sparse_kv: int,
                    options: Union[TileRequest, Mapping],
                    interpret: bool, smem_limit: int = HOPPER_SMEM_BYTES, score_mod: bool = False,
                    transcendental: bool = False, scatter: bool = False, grouped: bool = False) -> BackwardConfig:
    """Tiles for the backward kernels; torch's ``BLOCK_M1 / BLOCK_N1 / BLOCK_M2 / BLOCK_N2``,
    ``num_warps``, ``num_stages`` (or their ``bwd_`` forms) in ``kernel_options`` override them.

    Defaults come from the H200 sweeps in docs/performance.md (4x16x4096, bf16), by what the
    score_mod does (``score_mod``: there is one; ``transcendental``: it calls tanh, exp and the like):

    - no score_mod: 64x64 tiles everywhere with 4 warps, 2 stages, one grid (at head dim 128 15%
      faster than torch's Hopper choice, 64/128/128/64 with 8 warps);
    - arithmetic score_mods (ALiBi) at head dim 128: torch's choice, 64/128/128/64, 8 warps, 3 stages;
    - transcendental score_mods (soft-cap): 32/64/64/32, 4 warps, 2 stages, and the dQ and dK/dV
      programs as two launches (``split``), 6% faster than one grid;
    - gradients into captured tensors (``scatter``): the scatter's layout conversions need shared
      memory, so the 64x64 tiles (torch's 64/128/128/64 ran out of it on a relative-position bias);
    - GQA (``grouped``: several query heads per key/value head) in 16-bit floats without a
      score_mod: ``split``, as each dK/dV program then walks every query head of its group, twice
      (or more) the work of a dQ program, and in one grid those finish last (causal, 16 query / 8
      kv heads, head dim 128, 4x4096: 337 -> 369 TF/s on the H200, docs/performance.md);
    - head dims above 128 in 16-bit floats: 64x64 tiles with 8 warps and 2 stages (causal
      2x8x4096x256: 189 TF/s, against 108 for 32/64/64/32 with 4 warps and 1 stage).

    If a config still runs out of shared memory when compiled, :func:`flex_backward` retries with
    fewer stages, then smaller tiles (``_smaller``), and remembers what fitted.

    ``kernel_options={"BWD_SPLIT": ...}`` overrides the launch choice. Stages drop until the
    pipelined tiles fit shared memory.
    """
    split = (transcendental or (grouped and not score_mod and elt <= 2)) and not interpret
    if interpret:  # large tiles: the interpreter's cost is per tile
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 1
    elif elt >= 8:  # float64: resident dK/dV accumulators and K/V tiles of 8-byte elements
        widest = max(head_dim, value_dim)
        m1, n1, m2, n2 = (16, 32, 32, 16) if widest <= 128 else (16, 16, 16, 16)
        warps, stages = 4 if widest <= 64 else 8, 1
    elif elt >= 4:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
    elif max(head_dim, value_dim) <= 128 and transcendental:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 2
    elif max(head_dim, value_dim) <= 64:
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 2
    elif max(head_dim, value_dim) <= 128 and score_mod and not scatter:
        m1, n1, m2, n2, warps, stages = 64, 128, 128, 64, 8, 3
    elif max(head_dim, value_dim) <= 128:
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 2
    else:  # head dims up to 256: the H200 sweep of 2026-12-02 (causal 2x8x4096x256: 189 TF/s, 32/64/64/32 x4: 108)
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 8, 2
    req = _request(options, Pass.BACKWARD)
    check_backward_request(req)
    tiles = {}
    for key, default, sparse in (("block_m1", m1, sparse_q), ("block_n1", n1, sparse_kv),
                                 ("block_m2", m2, sparse_q), ("block_n2", n2, sparse_kv)):
        tiles[key] = largest_pow2_dividing(sparse, _power_of_two(req, key, default))
        if tiles[key] < MIN_TILE:
            raise FlexcompError(
                f"the triton backend tiles the BlockMask's blocks with tiles of at least 16x16, but block_mask "
                f"has BLOCK_SIZE=({sparse_q}, {sparse_kv}); create it with block sizes that are multiples of 16")
    warps = warps if req.num_warps is None else req.num_warps
    stages = stages if req.num_stages is None else req.num_stages
    split = split if req.split is None else req.split
    if not interpret:
        d_pad, dv_pad = pad_dim(head_dim), pad_dim(value_dim)
        # per stage, the dK/dV loop streams a q and a dO tile; k, v stay resident
        resident = tiles["block_n1"] * (d_pad + dv_pad) * elt
        per_stage = tiles["block_m1"] * (d_pad + dv_pad) * elt
        while stages > 1 and resident + stages * per_stage > smem_limit:
            stages -= 1
    return BackwardConfig(tiles["block_m1"], tiles["block_n1"], tiles["block_m2"], tiles["block_n2"], warps, stages,
                          split)


def check_backward_request(request: TileRequest) -> None:
    """The backward's tile request, checked when the forward is called (not at ``.backward()``)."""
    for name in ("block_m1", "block_n1", "block_m2", "block_n2"):
        _power_of_two(request, name, MIN_TILE)
    if request.split is not None and not isinstance(request.split, bool):
        raise FlexcompError(f"kernel_options['BWD_SPLIT'] must be True or False, got {request.split!r}")


def smaller_backward(cfg: BackwardConfig) -> Optional[BackwardConfig]:
    """The next config down when ``cfg`` does not fit the device: fewer stages, then halved tiles."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    tiles = [max(16, t // 2) for t in (cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2)]
    if tiles == [cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2]:
        return None
    return replace(cfg, block_m1=tiles[0], block_n1=tiles[1], block_m2=tiles[2], block_n2=tiles[3], num_warps=4)




@dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the decode kernel: ``block_n`` keys per tile (a power of two dividing the BlockMask's
    kv block), ``num_warps`` / ``num_stages`` as in Triton, ``static_sub`` as in :class:`ForwardConfig`,
    and ``waves``: programs aimed at per streaming multiprocessor when choosing the number of splits."""

    block_n: int
    num_warps: int
    num_stages: int
    waves: int
    static_sub: bool = True


def decode_config(head_dim: int, value_dim: int, elt: int, sparse_kv: int, options: Union[TileRequest, Mapping],
                  interpret: bool, smem_limit: int = HOPPER_SMEM_BYTES) -> DecodeConfig:
    """Tiles for the decode kernel. A decode step is bound by reading K and V once: tiles of 64 keys
    (128 at head dim <= 64) in 4 warps, 4 stages of loads in flight, and enough splits for about
    four programs per multiprocessor. ``BLOCK_N`` / ``num_warps`` / ``num_stages`` (or ``fwd_``
    forms) in ``kernel_options`` override them."""
    if interpret:
        bn, warps, stages = 64, 4, 1
    elif elt >= 4:
        bn, warps, stages = 32, 4, 2
    else:
        bn, warps, stages = (128 if head_dim <= 64 else 64), 4, 4
    req = _request(options, Pass.FORWARD)
    bn = largest_pow2_dividing(sparse_kv, _power_of_two(req, "block_n", bn))
    if bn < MIN_TILE:
        raise FlexcompError(
            f"the triton backend tiles the BlockMask's blocks with tiles of at least 16 keys, but block_mask has a "
            f"kv block of {sparse_kv}; create it with block sizes that are multiples of 16")
    warps = warps if req.num_warps is None else req.num_warps
    stages = stages if req.num_stages is None else req.num_stages
    static_sub = True
    if not interpret:
        per_stage = sparse_kv * (pad_dim(head_dim) + pad_dim(value_dim)) * elt
        while stages > 1 and stages * per_stage > smem_limit:
            stages -= 1
        static_sub = stages * per_stage <= smem_limit
    return DecodeConfig(bn, warps, stages, 4, static_sub)


@dataclass(frozen=True)
class DecodeLayout:
    """How one decode call maps onto programs: ``heads`` query heads of one GQA group packed in a
    tile's rows with ``rows_q`` query positions each (``block_m`` rows, padded to a power of two >= 16),
    ``tiles`` query tiles per head group, and ``splits`` programs sharing each row's kv blocks."""

    heads: int
    rows_q: int
    block_m: int
    tiles: int
    splits: int


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_layout(batch: int, heads: int, group: int, q_len: int, kv_len: int, sparse_q: int, sparse_kv: int,
                  lists_per_head: bool, multiprocessors: int, waves: int) -> DecodeLayout:
    """The :class:`DecodeLayout` of a call: a GQA group's heads share a tile when the block lists do not
    differ by head (``lists_per_head`` False) and the group fits :data:`DECODE_MAX_ROWS`; query
    positions fill the rest (never across a BlockMask row); splits bring the grid to about ``waves``
    programs per multiprocessor, at most one per kv block."""
    packed = 1 if lists_per_head or group > DECODE_MAX_ROWS else group
    room = max(1, DECODE_MAX_ROWS // _pow2_at_least(packed))
    rows_q = largest_pow2_dividing(sparse_q, min(_pow2_at_least(q_len), room))
    block_m = max(MIN_TILE, _pow2_at_least(packed * rows_q))
    tiles = -(-q_len // rows_q)
    programs = batch * (heads // packed) * tiles
    kv_blocks = -(-kv_len // sparse_kv)
    splits = max(1, min(kv_blocks, -(-waves * multiprocessors // programs)))
    return DecodeLayout(packed, rows_q, block_m, tiles, splits)
