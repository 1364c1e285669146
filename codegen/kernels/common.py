"""Helpers every kernel shares: addresses of a (batch, head)'s rows, bounded tile loads, names.

Tensors reach the kernels as a pointer and a stride tuple ``S`` for ``[batch, head, row, col]``
(``[batch, head, row]`` for the LSE); a stride of 0 broadcasts (a key/value batch of one, a
BlockMask shared by heads). :func:`head_base` and :func:`tile_ptrs` are the only places that turn
them into addresses.
"""
import re

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def head_base(PTR, S, b, h):
    """``PTR`` at (batch ``b``, head ``h``), in 64-bit offsets (large batches overflow 32 bits)."""
    return PTR + b.to(tl.int64) * S[0] + h.to(tl.int64) * S[1]


@triton.jit
def tile_ptrs(base, rows, cols, S):
    """``[len(rows), len(cols)]`` pointers from a :func:`head_base`."""
    return base + rows[:, None] * S[2] + cols[None, :] * S[3]


@triton.jit
def load_rows(ptrs, in_rows, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A [rows, D_PAD] tile: bounds on the rows only if asked, on the head dim only if padded."""
    if CHECK_ROWS:
        return tl.load(ptrs, mask=in_rows[:, None] & (offs_d[None, :] < D), other=0.0)
    elif D == D_PAD:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def store_rows(ptrs, value, in_rows, offs_d, D: tl.constexpr):
    """Store a [rows, D_PAD] tile's ``D`` real columns of the rows in range."""
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=in_rows[:, None] & (offs_d[None, :] < D))


_MOD_ARGS = ("SCORE_MOD", "SCORE_GRAD", "MASK_MOD", "SCATTER")
_LONG_KEY = re.compile(r"_([0-9a-f]{6})[0-9a-f]{10}")  # a generated function's 16-digit structural key


def variant_name(kernel: str):
    """A ``repr`` for ``@triton.jit``: the compiled kernel is named after the generated mods it was
    specialised with (``flex_fwd__score_mod_softcap_score_1a2b3c__mask_mod_causal_mask_4d5e6f``), so a
    profile tells the variants apart."""
    def name(spec) -> str:
        parts = [kernel]
        for arg in _MOD_ARGS:
            fn = spec.constants.get(arg)
            generated = getattr(getattr(fn, "value", fn), "__name__", None)
            if generated:
                parts.append(_LONG_KEY.sub(r"_\1", generated.removesuffix("_args")))
        return re.sub(r"\W", "_", "__".join(parts))
    return name


# attention dropout's counter-based hash (flexcomp.dropout holds the same constants and the torch twin)
MIX_1 = tl.constexpr(0x7FEB352D)
MIX_2 = tl.constexpr(0x846CA68B)
B_MUL = tl.constexpr(0x9E3779B1)
H_MUL = tl.constexpr(0x85EBCA77)
Q_MUL = tl.constexpr(0xC2B2AE3D)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (products wrap modulo 2**32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], MIX_1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], MIX_2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def dropout_base(seed, b, h):
    """The hash state of one (batch, query head) for the call's ``seed``."""
    # tl.cast, not .to: an int argument of 1 arrives as a compile-time constant
    x = _mix32(tl.cast(seed, tl.uint32) ^ (tl.cast(b, tl.uint32) * tl.full([], B_MUL, tl.uint32)))
    return _mix32(x ^ (tl.cast(h, tl.uint32) * tl.full([], H_MUL, tl.uint32)))


@triton.jit
def _groups(start, N: tl.constexpr):
    """``[N // 16, 8]`` hash groups ``(i // 16) * 8 + i % 8`` of indices ``start + 16 a + c`` (``start``
    a multiple of 16): the first halves of the pairs ``(i, i + 8)`` that share a hash."""
    return (start // 2 + (tl.arange(0, N // 16) * 8)[:, None] + tl.arange(0, 8)[None, :]).to(tl.uint32)


@triton.jit
def dropout_rows(base, q_start, BQ: tl.constexpr):
    """``[BQ // 16, 8]`` row hashes of the query groups of rows ``q_start .. q_start + BQ``."""
    return _mix32(base ^ (_groups(q_start, BQ) * tl.full([], Q_MUL, tl.uint32)))


@triton.jit
def dropout_keep(rows, kv_start, BK: tl.constexpr, threshold, Q_ROWS: tl.constexpr):
    """Where the pairs of a tile are kept: ``[BQ, BK]`` (``Q_ROWS``: queries down, as the forward and
    dQ tiles) or ``[BK, BQ]`` (keys down, as the dK/dV tiles), for query rows hashed by
    :func:`dropout_rows` and keys ``kv_start .. kv_start + BK``. One hash gives the four pairs
    ``{q, q + 8} x {kv, kv + 8}`` a byte each (:mod:`flexcomp.dropout`); ``threshold`` is the
    8-bit threshold. The join / permute / reshape only relabel registers: in Hopper's tensor-core
    accumulator one thread holds rows ``r, r + 8`` and columns ``c, c + 8``."""
    BQ: tl.constexpr = rows.shape[0] * 16
    kg = _groups(kv_start, BK)
    if Q_ROWS:
        x = rows[:, :, None, None] ^ kg[None, None, :, :]
    else:
        x = kg[:, :, None, None] ^ rows[None, None, :, :]
    x = x * tl.full([], MIX_1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], MIX_2, tl.uint32)
    x = x ^ (x >> 16)
    # the pair's byte on top: shifted by 8 * (kv // 8 % 2) + 16 * (q // 8 % 2)
    z = tl.join(tl.join(x, x << 8), tl.join(x << 16, x << 24))  # [row group, c, col group, c, sk, sq]
    if Q_ROWS:
        y = tl.reshape(tl.permute(z, (0, 5, 1, 2, 4, 3)), [BQ, BK])
    else:
        y = tl.reshape(tl.permute(z, (0, 4, 1, 2, 5, 3)), [BK, BQ])
    return y >= (tl.cast(threshold, tl.uint32) << 24)
