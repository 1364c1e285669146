"""ALiBi: a linear distance bias per head (Press et al., 2022)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def alibi_slopes(num_heads: int) -> Tensor:
    """``slopes[h] = 2 ** (-8 * (h + 1) / num_heads)``, float32 ``[num_heads]``.

    >>> alibi_slopes(2).tolist()
    [0.0625, 0.00390625]
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"alibi: num_heads must be a positive int, got {num_heads!r}")
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.exp2(-8.0 * (h + 1) / num_heads).to(torch.float32)


def alibi(num_heads: int, slopes: Tensor | None = None) -> Callable:
    """ALiBi score_mod: ``score + slopes[h] * (kv_idx - q_idx)``.

    The bias is 0 on the diagonal and falls linearly into the past; combine it with
    ``causal_mask``. ``slopes`` (default :func:`alibi_slopes`) is a captured tensor: pass one
    with ``requires_grad=True`` to learn it.

    >>> import torch
    >>> mod = alibi(2)
    >>> float(mod(torch.tensor(0.0), 0, 0, torch.tensor(5), torch.tensor(3)))
    -0.125
    """
    slopes = alibi_slopes(num_heads) if slopes is None else slopes
    if slopes.shape != (num_heads,):
        raise ValueError(f"alibi: slopes must have shape ({num_heads},), got {tuple(slopes.shape)}")

    def alibi_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi_bias
