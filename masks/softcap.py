"""Soft-capping of attention logits (Gemma 2, Grok)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def softcap(cap: float) -> Callable:
    """Soft-cap score_mod: ``cap * tanh(score / cap)``, squashing scores into ``(-cap, cap)``.

    ``cap`` is a scalar input of the traced IR: changing it compiles nothing new.

    >>> import torch
    >>> round(float(softcap(30.0)(torch.tensor(1000.0), 0, 0, 0, 0)), 3)
    30.0
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap: cap must be a positive finite number, got {cap!r}")
    cap = float(cap)

    def softcap_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    return softcap_score
