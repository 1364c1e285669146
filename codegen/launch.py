"""Launching the generated kernels: arguments, tile configs, the default block mask.

Nothing here copies q, k or v: strides go to the kernel as they are (GQA, a key/value batch of
one and block masks broadcast over batch or heads are all expressed as strides, zero where
broadcast).

float64 inputs run the same kernels with their ``FP64`` switch on (scores, softmax statistics and
accumulators in float64, ieee dots, float64 mods and LSE); the scale then goes as a float64 device
scalar, since Triton passes Python floats as float32.

Captured-tensor indices: a mod whose loads ``flexcomp.ranges`` cannot prove in range for the call's
sizes runs as its checked variant, and :func:`flex_forward` raises ``FlexcompIndexError`` (an
``IndexError``, as torch) when an index fell outside its tensor.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from flexcomp.errors import FlexcompError, FlexcompIndexError, mod_zero_division
from flexcomp.ir import Op
from flexcomp.ranges import mod_proven_safe
from flexcomp.trace import TracedMod

from .kernels.forward import flex_fwd
from .lower import CheckKind, FloatType, LoadCheck, gathers_per_pair
from .modules import jit_function

INT64_MIN = -(2**63)  # a checked mod's error slots before the kernel: no index was out of range


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
    """What a generated mod reads at run time: buffer pointers, flat strides/sizes, scalar tensors.

    A checked mod also has ``err``: int64 ``[len(checks)]`` (at least 1), the last pointer of
    ``bufs``, preset to :data:`INT64_MIN`, where each :class:`LoadCheck` slot receives an
    out-of-range index."""

    bufs: tuple
    strides: tuple
    sizes: tuple
    scalars_i: torch.Tensor
    scalars_f: torch.Tensor
    err: Optional[torch.Tensor] = None
    checks: tuple[LoadCheck, ...] = ()


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
    elif elt >= 8:  # float64: four times the bytes and twice the registers of bf16; correctness first
        bm, bn, warps, stages = 32, 32, 4 if head_dim <= 128 else 8, 1
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


def mod_args(tm: Optional[TracedMod], device, ft: FloatType = FloatType.F32,
             checked: bool = False) -> tuple[object, ModArgs]:
    """The jitted mod function (None if no mod) and its run-time arguments.

    ``ft``: the mod's working float (float64: captured numbers go as a float64 tensor);
    ``checked``: the variant that reports out-of-range indices into a fresh ``ModArgs.err``.
    Buffers are read afresh each call (in-place updates show; nothing holds them); the function
    and the captured numbers' device tensors are kept with the trace (``launch_cache``)."""
    float_dtype = torch.float64 if ft is FloatType.F64 else torch.float32
    if tm is None:
        z = _scalar_tensor((), torch.int64, device)
        return None, ModArgs((z,), (0,), (1,), z, _scalar_tensor((), float_dtype, device))
    bufs, strides, sizes = [], [], []
    for t in tm.buffers:
        if t.device != device:
            t = t.to(device)
        if t.dtype == torch.bool:
            t = t.view(torch.int8)
        strides += t.stride() or (0,)
        sizes += t.shape or (1,)
        bufs.append(t)
    hit = tm.launch_cache.get(("mod_args", device, ft, checked))
    if hit is None:
        for t in bufs:
            if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31:
                raise FlexcompError(
                    f"the captured tensor of shape {tuple(t.shape)} in {tm.graph.kind.value} {tm.graph.fn_name!r} "
                    f"spans 2**31 elements or more; the triton backend indexes captured tensors with 32-bit offsets")
        lowered, fn = jit_function(tm.graph, ft, checked)
        ints = tuple(int(v) for v, slot in zip(tm.scalars, lowered.int_scalars) if slot >= 0)
        floats = tuple(float(v) for v, slot in zip(tm.scalars, lowered.float_scalars) if slot >= 0)
        hit = (fn, _scalar_tensor(ints, torch.int64, device), _scalar_tensor(floats, float_dtype, device),
               lowered.checks)
        tm.launch_cache[("mod_args", device, ft, checked)] = hit
    fn, si, sf, checks = hit
    err = None
    if checked:  # one more pointer, after the buffers: the generated checks write here
        err = torch.full((max(1, len(checks)),), INT64_MIN, dtype=torch.int64, device=device)
        bufs.append(err)
    if not bufs:
        bufs, strides, sizes = [si], [0], [1]
    return fn, ModArgs(tuple(bufs), tuple(strides), tuple(sizes), si, sf, err, checks)


def needs_index_check(tm: Optional[TracedMod], B: int, H: int, q_len: int, kv_len: int) -> bool:
    """Whether ``tm`` must run checked: it indexes a captured tensor or divides integers, and
    ``flexcomp.ranges.mod_proven_safe`` does not prove every index in range and every integer
    divisor nonzero for these sizes.

    The answer is kept with the trace (whose captured tensors are always the same objects) per
    ``(B, H, q_len, kv_len)``, valid while each tensor keeps its storage and ``_version`` (an
    in-place update, a resize included, can change an index a load reads from another tensor): a
    cached call costs a tuple compare."""
    if tm is None:
        return False
    state = tuple([(t._version, t.data_ptr()) for t in tm.buffers])
    key = ("in_range", B, H, q_len, kv_len)
    hit = tm.launch_cache.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    need = any((n.op is Op.LOAD and n.args) or (n.op in (Op.FLOORDIV, Op.MOD) and n.dtype.is_int)
               for n in tm.graph.nodes)
    if need:
        need = not mod_proven_safe(tm, B, H, q_len, kv_len)
    tm.launch_cache[key] = (state, need)
    return need


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
            if value != INT64_MIN:
                g = tm.graph
                j = [b.name for b in g.buffers].index(check.buffer)
                shape = tuple(tm.buffers[j].shape)
                raise FlexcompIndexError(
                    f"{g.kind.value} {g.fn_name!r}: '{check.node}' indexed the captured tensor {check.buffer!r} of "
                    f"shape {shape} out of range (dim {check.dim}: index {value}, valid {-shape[check.dim]}.."
                    f"{shape[check.dim] - 1}); torch raises IndexError here too")
        at += len(a.checks)


@functools.lru_cache(maxsize=64)
def full_block_mask(q_len: int, kv_len: int, device: torch.device):
    from flexcomp.blockmask import create_block_mask, noop_mask

    return create_block_mask(noop_mask, 1, 1, q_len, kv_len, device=device)


def pad_dim(d: int) -> int:
    """Head dims padded to a power of two (at least 16) for the kernels' tiles."""
    return max(16, 1 << (d - 1).bit_length())


def check_inputs(q: torch.Tensor, D: int, DV: int) -> None:
    """What the Triton kernels take: head dims up to 256, float16 / bfloat16 / float32 / float64."""
    if D > 256 or DV > 256:
        raise FlexcompError(f"the triton backend supports head dims up to 256, got query/key {D} and value {DV}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise FlexcompError(f"the triton backend runs float16, bfloat16, float32 and float64 inputs, got {q.dtype}; "
                            f"use kernel_options={{'BACKEND': 'reference'}} for {q.dtype}")


def stats_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the LSE, max scores and the backward's delta: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def kernel_scale(scale: float, q: torch.Tensor):
    """The kernels' ``sm_scale`` argument: the float, or for float64 inputs a float64 device scalar
    (a Python float reaches a kernel as float32, which float64 attention cannot afford)."""
    return _scalar_tensor((scale,), torch.float64, q.device) if q.dtype == torch.float64 else scale


def dot_precision(q: torch.Tensor) -> str:
    """``tl.dot``'s input precision: ieee for float64, and for float32 unless TF32 matmuls are allowed."""
    if q.dtype == torch.float64 or (q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score: Optional[TracedMod],
                 mask: Optional[TracedMod], block_mask, scale: float, torch_options: dict,
                 interpret: bool, want_max: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the generated forward kernel: output ``[B, Hq, L, Ev]`` (input dtype), LSE ``[B, Hq, L]``
    (natural log) and, if ``want_max``, the row maxima of the modified, masked scores ``[B, Hq, L]``
    (score units, ``-inf`` for rows with nothing kept; else None), both float32, float64 for float64
    inputs. Rows whose largest score is ``+inf`` get LSE ``+inf`` (as torch).

    No kernel runs when ``L`` or ``S`` is 0: an empty output, or output 0 and LSE ``-inf``.
    Raises ``FlexcompIndexError`` when a mod indexed a captured tensor out of range.
    """
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    check_inputs(q, D, DV)
    device = q.device
    fp64 = q.dtype == torch.float64
    sd = torch.float64 if fp64 else torch.float32
    if L == 0 or S == 0:  # nothing to attend to, or no one asking: no launch (an empty grid is an error)
        lse = torch.full((B, H, L), float("-inf"), dtype=sd, device=device)
        return (torch.zeros(B, H, L, DV, dtype=q.dtype, device=device), lse,
                lse.clone() if want_max else None)
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
    ft = FloatType.F64 if fp64 else FloatType.F32
    score_fn, sa = mod_args(score, device, ft, needs_index_check(score, B, H, L, S))
    mask_fn, ma = mod_args(mask, device, FloatType.F32, needs_index_check(mask, B, H, L, S))  # masks: float32, as torch
    out = torch.empty(B, H, L, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, H, L, dtype=sd, device=device)
    mx = torch.empty(B, H, L, dtype=sd, device=device) if want_max else None
    kb = 0 if k.shape[0] == 1 and B > 1 else 1
    precision = dot_precision(q)
    while True:
        try:
            _launch_forward(cfg, q, k, v, out, lse, mx, kb, lists, kernel_scale(scale, q), score_fn, sa, mask_fn, ma,
                            sq, skv, precision)
            if sa.err is not None or ma.err is not None:
                raise_if_out_of_range(((score, sa), (mask, ma)))
            return out, lse, mx
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


def _launch_forward(cfg, q, k, v, out, lse, mx, kb, lists, scale, score_fn, sa, mask_fn, ma, sq, skv, precision):
    B, H, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    flex_fwd[grid](
        q, k, v, out, lse, lse if mx is None else mx,
        *q.stride(), k.stride(0) * kb, *k.stride()[1:], v.stride(0) * kb, *v.stride()[1:], *out.stride(),
        *lse.stride(),
        *lists.tensors, *lists.num.stride(), *lists.idx.stride(),
        H, L, S, H // Hkv, scale,
        score_fn, sa.bufs, sa.strides, sa.sizes, sa.scalars_i, sa.scalars_f,
        mask_fn, ma.bufs, ma.strides, ma.sizes, ma.scalars_i, ma.scalars_f,
        HAS_SCORE_MOD=score_fn is not None, HAS_MASK_MOD=mask_fn is not None, HAS_FULL=lists.has_full,
        SPARSE_Q=sq, SPARSE_KV=skv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        D=D, D_PAD=pad_dim(D), DV=DV, DV_PAD=pad_dim(DV), PRECISION=precision, EVEN_KV=S % skv == 0, STATIC_SUB=cfg.static_sub,
        OUTPUT_MAX=mx is not None, FP64=q.dtype == torch.float64,
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
