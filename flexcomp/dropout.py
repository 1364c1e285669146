"""Attention dropout: which (batch, head, query, key) pairs are kept, as a pure function of a seed.

``out = (P * keep / (1 - p)) @ V`` with ``P`` the softmax (the LSE is the softmax's, as
flash-attn). ``keep`` comes from a counter-based generator: a 32-bit hash of the call's seed and
the pair's coordinates, so nothing of size ``L x S`` is stored: the backward regenerates the same
pattern, and the reference backend reproduces it exactly with torch integer ops (the kernels use
the same constants, :mod:`flexcomp.codegen.kernels.common`).

The hash: ``base = mix(mix(seed ^ b * B_MUL) ^ h * H_MUL)`` per (batch, head), then per pair
``mix(mix(base ^ q * Q_MUL) ^ kv)``, where ``mix`` is the ``lowbias32`` integer finaliser (two
multiplies, three xor-shifts, all modulo 2**32); a pair is kept when the hash is at least
``threshold = round(p * 2**32)``.

>>> d = Dropout(0.25, seed=7)
>>> keep = keep_mask(d, torch.tensor(0), torch.tensor(1), torch.arange(64).view(-1, 1), torch.arange(64).view(1, -1))
>>> keep.shape, 0.70 < keep.float().mean().item() < 0.80
(torch.Size([64, 64]), True)
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
        """Hashes below this are dropped: ``round(p * 2**32)``."""
        return min(int(round(self.p * 2.0 ** 32)), MASK32)

    @property
    def scale(self) -> float:
        """``1 / (1 - p)``: the kept pairs' weight."""
        return 1.0 / (1.0 - self.p)

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


def keep_mask(d: Dropout, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Where pairs are kept: bool, the broadcast shape of the coordinates (any integer tensors)."""
    def u32(t: Tensor) -> Tensor:
        return torch.as_tensor(t).to(torch.int64) & MASK32

    base = _mix(_mix(torch.as_tensor(d.seed, dtype=torch.int64) ^ ((u32(b) * B_MUL) & MASK32)) ^
                ((u32(h) * H_MUL) & MASK32))
    x = _mix(_mix(base ^ ((u32(q_idx) * Q_MUL) & MASK32)) ^ u32(kv_idx))
    return x >= d.threshold
