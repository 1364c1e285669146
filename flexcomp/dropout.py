"""Attention dropout: which (batch, head, query, key) pairs are kept, as a pure function of a seed.

``out = (P * keep / (1 - p)) @ V`` with ``P`` the softmax (the LSE is the softmax's, as
flash-attn). ``keep`` comes from a counter-based generator: a hash of the call's seed and the
pair's coordinates, so nothing of size ``L x S`` is stored: the backward regenerates the same
pattern, and the reference backend reproduces it exactly with torch integer ops (the kernels use
the same constants, :mod:`flexcomp.codegen.kernels.common`).

Resolution: like flash-attn, a pair's keep decision uses 8 random bits, so ``p`` is rounded to a
multiple of 1/256 (``Dropout.p_used``; at least 1/256 when ``p > 0``), and the kept pairs are
weighted ``1 / (1 - p_used)``, so the output's expectation is exact. One 32-bit hash serves the
four pairs ``{q, q + 8} x {kv, kv + 8}`` (``q % 16 < 8``, ``kv % 16 < 8``): one GPU thread holds
exactly those four in the tensor-core tiles of the forward and of both backward kernels, so the
hash costs a quarter per pair and no data moves between threads.

The hash, all modulo 2**32 (``mix`` is the ``lowbias32`` finaliser):

- per (batch, head): ``base = mix(mix(seed ^ b * B_MUL) ^ h * H_MUL)``;
- per query group ``qg = (q // 16) * 8 + q % 8``: ``row = mix(base ^ qg * Q_MUL)``;
- per key group ``kg`` (the same for ``kv``): ``x = (row ^ kg) * MIX_1``, ``x ^= x >> 15``,
  ``x *= MIX_2``, ``x ^= x >> 16``;
- the pair's byte is byte ``3 - sk - 2 sq`` of ``x`` (``sq = q // 8 % 2``, ``sk = kv // 8 % 2``);
  it is kept when that byte is at least ``threshold = 256 * p_used``.

>>> d = Dropout(0.25, seed=7)
>>> keep = keep_mask(d, torch.tensor(0), torch.tensor(1), torch.arange(64).view(-1, 1), torch.arange(64).view(1, -1))
>>> keep.shape, d.threshold, 0.70 < keep.float().mean().item() < 0.80
(torch.Size([64, 64]), 64, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import FlexcompError

MASK32 = 0xFFFFFFFF
MIX_1 = 0x7FEB352D  # lowbias32's multipliers (Chris Wellons' hash prospector)
MIX_2 = 0x846CA68B
B_MUL = 0x9E3779B1  # odd constants spreading each coordinate over 32 bits
H_MUL = 0x85EBCA77
Q_MUL = 0xC2B2AE3D
KEEP_LEVELS = 256  # 8 random bits per pair
GROUP = 8  # pairs q, q + GROUP (and kv, kv + GROUP) share a hash, q % (2 * GROUP) < GROUP


@dataclass(frozen=True)
class Dropout:
    """One call's dropout: probability ``p`` of dropping a pair, in ``[0, 1)``; ``seed`` a 31-bit int."""

    p: float
    seed: int

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise FlexcompError(f"dropout_p must be in [0, 1), got {self.p}")

    @property
    def threshold(self) -> int:
        """Bytes below this are dropped: ``round(p * 256)``, at least 1 when ``p > 0``, at most 255."""
        if self.p == 0.0:
            return 0
        return min(max(int(round(self.p * KEEP_LEVELS)), 1), KEEP_LEVELS - 1)

    @property
    def p_used(self) -> float:
        """The probability the pattern drops with: ``threshold / 256``."""
        return self.threshold / KEEP_LEVELS

    @property
    def scale(self) -> float:
        """``1 / (1 - p_used)``: the kept pairs' weight."""
        return 1.0 / (1.0 - self.p_used)

    @staticmethod
    def draw(p: float) -> Dropout:
        """A dropout with a fresh seed from torch's default generator (``torch.manual_seed`` repeats it)."""
        return Dropout(float(p), int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)))


def _mix(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding 32-bit values (products wrap; the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * MIX_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_2) & MASK32
    return x ^ (x >> 16)


def _group(i: Tensor) -> tuple[Tensor, Tensor]:
    """An index's hash group ``(i // 16) * 8 + i % 8`` and its half ``i // 8 % 2``."""
    return (i >> 4) * GROUP + (i & (GROUP - 1)), (i >> 3) & 1


def keep_mask(d: Dropout, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Where pairs are kept: bool, the broadcast shape of the coordinates (any integer tensors)."""
    def u32(t: Tensor) -> Tensor:
        return torch.as_tensor(t).to(torch.int64) & MASK32

    base = _mix(_mix(torch.as_tensor(d.seed, dtype=torch.int64) ^ ((u32(b) * B_MUL) & MASK32)) ^
                ((u32(h) * H_MUL) & MASK32))
    qg, sq = _group(u32(q_idx))
    kg, sk = _group(u32(kv_idx))
    x = ((_mix(base ^ ((qg * Q_MUL) & MASK32)) ^ kg) * MIX_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_2) & MASK32
    x = x ^ (x >> 16)
    byte = (x >> (24 - 8 * sk - 16 * sq)) & (KEEP_LEVELS - 1)
    return byte >= d.threshold
