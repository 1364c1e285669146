"""Causal masking."""
from __future__ import annotations

from torch import Tensor


def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Each query sees itself and the keys before it: ``q_idx >= kv_idx``.

    With Q_LEN != KV_LEN the diagonal starts at the top-left corner, as in torch.

    >>> import torch
    >>> from flexcomp import create_mask
    >>> create_mask(causal_mask, 1, 1, 3, 3, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return q_idx >= kv_idx
