"""Small ``@triton.jit`` helpers that generated mod bodies call: Python/torch semantics in Triton.

Triton's ``//`` and ``%`` truncate towards zero (C); torch's (and Python's) floor. ``tanh`` and
``pow`` come from libdevice on the GPU; the interpreter (``TRITON_INTERPRET=1``) has no
libdevice, so there they are written with ``exp``.
"""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def floordiv(a, b):
    """Integer division rounding towards -inf (torch.floor_divide)."""
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@triton.jit
def pymod(a, b):
    """Integer remainder with the sign of the divisor (torch.remainder)."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def floordiv_f(a, b):
    return tl.floor(a / b)


@triton.jit
def pymod_f(a, b):
    return a - b * tl.floor(a / b)


@triton.jit
def wrap_index(i, size):
    """A captured-tensor index, negative ones counted from the end (torch's indexing).

    32-bit: the launcher refuses captured tensors whose offsets need more."""
    return tl.where(i < 0, i + size, i)


@triton.jit
def in_range(i, size):
    """Whether ``i`` indexes a dim of ``size`` (after counting negatives from the end)."""
    return (i >= -size) & (i < size)


@triton.jit
def sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


if INTERPRET:

    @triton.jit
    def tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)
