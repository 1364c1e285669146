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
def dropout_keep(base, q_idx, kv_idx, threshold):
    """Where the pairs ``(q_idx, kv_idx)`` (broadcast tiles) are kept: hash >= ``threshold``."""
    x = _mix32(base ^ (q_idx.to(tl.uint32) * tl.full([], Q_MUL, tl.uint32)))
    x = _mix32(x ^ kv_idx.to(tl.uint32))
    return x >= tl.cast(threshold, tl.uint32)
