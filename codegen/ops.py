"""Small ``@triton.jit`` helpers that generated mod bodies call: Python/torch semantics in Triton.

Triton's ``//`` and ``%`` truncate towards zero (C); torch's (and Python's) floor. ``tanh`` and
``pow`` come from libdevice on the GPU; the interpreter (``TRITON_INTERPRET=1``) has no
libdevice, so there they are written with ``exp``. ``tanh_approx`` is the hardware's one-instruction
tanh, for mods of 16-bit inputs (:class:`flexcomp.codegen.lower.FloatType`).
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
def check_index(i, size, ERR, slot: tl.constexpr):
    """Checked mods only: write every index outside ``[-size, size)`` (any one of them, the writes
    race harmlessly) into ``ERR[slot]`` (int64, preset to ``INT64_MIN`` by the launcher, which raises
    IndexError when it changed). ``i`` may be a tile, a scalar or a Python constant."""
    ii = i + tl.zeros([], tl.int64)
    tl.store(ERR + slot + 0 * ii, ii, mask=(ii < -size) | (ii >= size))


@triton.jit
def check_divisor(d, ERR, slot: tl.constexpr):
    """Checked mods only: record an integer divisor of 0 in ``ERR[slot]`` (as :func:`check_index`)."""
    dd = d + tl.zeros([], tl.int64)
    tl.store(ERR + slot + 0 * dd, dd, mask=dd == 0)


@triton.jit
def sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def scatter_grad(base, off, inb, contrib, valid, aux, REDUCE: tl.constexpr, Q_AXIS: tl.constexpr, MODE: tl.constexpr):
    """Add one tile's gradient contributions ``contrib`` (zero where not ``valid``) into a captured
    tensor's gradient at ``base + off`` (masked by ``inb``, the load's in-range mask).

    ``REDUCE`` (``lower.Reduce``): when the index depends on b and h only, or on the query or the
    key only, the tile is summed first, so one atomic serves a whole tile, row or column. Otherwise
    a tile whose kept pairs all hit one element (a table indexed by document pair, inside one pair
    of documents) is summed to one atomic too, checked at run time; the rest add pair by pair.
    ``MODE``: 0 float32 atomic add (fast; the order of additions varies run to run); deterministic
    mode runs 1 then 2: 1 records the largest ``|contribution|`` in ``aux``, 2 adds
    ``round(contribution * scale)`` into an int64 buffer (``aux`` now holds the power-of-two scale),
    and integer addition gives the same bits in any order.
    """
    c = tl.where(valid, contrib, 0.0)
    if MODE == 1:
        tl.atomic_max(aux, tl.max(tl.max(tl.abs(c), 1), 0))
    elif REDUCE == 0:
        mask = inb & valid
        lo = tl.min(tl.min(tl.where(mask, off, 2147483647), 1), 0)
        hi = tl.max(tl.max(tl.where(mask, off, -1), 1), 0)
        if lo == hi:
            _atomic_add(base + hi, tl.sum(tl.sum(c, 1), 0), hi >= 0, aux, MODE)
        else:
            _atomic_add(base + off, c, mask, aux, MODE)
    else:
        if REDUCE == 1:
            c = tl.sum(tl.sum(c, 1), 0)
        elif REDUCE == 2:
            c = tl.sum(c, 1 - Q_AXIS, keep_dims=True)
        else:
            c = tl.sum(c, Q_AXIS, keep_dims=True)
        _atomic_add(base + off, c, inb, aux, MODE)


@triton.jit
def _atomic_add(ptr, c, mask, aux, MODE: tl.constexpr):
    if MODE == 0:
        tl.atomic_add(ptr, c, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, tl.floor(c * tl.load(aux) + 0.5).to(tl.int64), mask=mask, sem="relaxed")


@triton.jit
def shl(a, s, BITS: tl.constexpr):
    """``a << s`` as torch computes it: 0 for shift counts outside ``[0, BITS)`` (LLVM leaves those undefined)."""
    ok = (s >= 0) & (s < BITS)
    return tl.where(ok, a << tl.where(ok, s, 0).to(a.dtype), 0)


@triton.jit
def shr(a, s, BITS: tl.constexpr):
    """Arithmetic ``a >> s`` as torch: counts outside ``[0, BITS)`` give 0, or -1 for negative ``a``."""
    ok = (s >= 0) & (s < BITS)
    return tl.where(ok, a >> tl.where(ok, s, 0).to(a.dtype), tl.where(a < 0, -1, 0).to(a.dtype))


if INTERPRET:  # the interpreter has no libdevice: the same functions from its primitives

    @triton.jit
    def tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    tanh_approx = tanh  # the interpreter has no PTX: the formula above

    @triton.jit
    def tan(x):
        return tl.sin(x) / tl.cos(x)

    @triton.jit
    def log1p(x):
        u = 1.0 + x  # Kahan: log(u) * x / (u - 1) is accurate where u rounds
        return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))

    @triton.jit
    def expm1(x):
        u = tl.exp(x)
        lu = tl.log(u)
        good = (u != 1.0) & (lu != 0.0) & (u < float("inf"))
        return tl.where(u == 1.0, x, tl.where(good, (u - 1.0) * (x / tl.where(good, lu, 1.0)), u - 1.0))

    @triton.jit
    def atan(x):
        # atan(x) = s * pi/2 - atan(1/|x|) for |x| > 1; two half-angle steps t -> t / (1 + sqrt(1 + t^2))
        # bring |t| under tan(pi/16) ~ 0.2, where 14 terms of the series reach float64 precision
        ax = tl.abs(x)
        big = ax > 1.0
        t = tl.where(big, 1.0 / tl.where(big, ax, 1.0), ax)
        t = t / (1.0 + tl.sqrt(1.0 + t * t))
        t = t / (1.0 + tl.sqrt(1.0 + t * t))
        t2 = t * t
        zero = t * 0.0  # constants are formed in x's dtype: a literal would be rounded to float32
        acc = zero
        for i in tl.static_range(14):
            k = 13 - i
            acc = acc * t2 + (zero + (1 - 2 * (k % 2))) / (zero + (2 * k + 1))
        r = 4.0 * t * acc
        half_pi = (zero + 1.5707963705062866) + (zero - 4.371139000186241e-08)  # float32 hi + lo parts
        r = tl.where(big, half_pi - r, r)
        return tl.where(x < 0, -r, r)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def tanh_approx(x):
        """tanh of float32 ``x`` in one instruction (PTX ``tanh.approx.f32``, sm_75 on; relative error
        at most 2**-11, measured against the float64 oracle in ``docs/performance.md``); other types:
        libdevice."""
        if x.dtype == tl.float32:
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return libdevice.tanh(x)

    @triton.jit
    def tan(x):
        return libdevice.tan(x)

    @triton.jit
    def atan(x):
        return libdevice.atan(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def expm1(x):
        return libdevice.expm1(x)
