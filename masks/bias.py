"""Learned relative position bias (T5 / Swin style, with clipped distances)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor


def relative_position_bias(table: Tensor, max_distance: int) -> Callable:
    """Relative position score_mod: ``score + table[h, clamp(kv_idx - q_idx, -M, M) + M]``, ``M = max_distance``.

    ``table`` is ``[H, 2 * max_distance + 1]``: column ``M + d`` is the bias of a key ``d``
    positions after the query (``d < 0``: before it); distances beyond ``M`` share the edge columns.
    It is a captured tensor: give one with ``requires_grad=True`` and ``flex_attention``'s backward
    fills ``table.grad`` (the sum of ``dscore`` over the pairs using each entry).

    >>> import torch
    >>> table = torch.arange(10.0).view(2, 5)
    >>> mod = relative_position_bias(table, 2)
    >>> [float(mod(torch.tensor(0.0), 0, 1, torch.tensor(9), torch.tensor(k))) for k in (0, 8, 9, 10, 20)]
    [5.0, 6.0, 7.0, 8.0, 9.0]
    """
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0:
        raise ValueError(f"relative_position_bias: max_distance must be a non-negative int, got {max_distance!r}")
    width = 2 * max_distance + 1
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != width:
        shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"relative_position_bias: table must be a tensor [H, {width}] (2 * max_distance + 1 "
                         f"columns), got {shape}")
    if not table.dtype.is_floating_point:
        raise ValueError(f"relative_position_bias: table must be a float tensor, got {table.dtype}")

    def relative_position(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        offset = (kv_idx - q_idx).clamp(-max_distance, max_distance) + max_distance
        return score + table[h, offset]

    relative_position.__name__ = f"relative_position_bias_{max_distance}"
    return relative_position
