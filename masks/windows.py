"""Masks defined by index windows: sliding window, prefix LM, per-batch padding."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor


def _check_nonneg_int(fn: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int, got {value!r}")


def sliding_window(window: int) -> Callable:
    """Causal sliding window: query ``q`` sees keys ``kv`` in ``[q - window, q]`` (both ends kept).

    So ``window=0`` is "only itself" and each query sees at most ``window + 1`` keys. The window
    size is a scalar input of the traced IR: changing it compiles nothing new.

    >>> from flexcomp import create_mask
    >>> create_mask(sliding_window(1), 1, 1, 4, 4, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    _check_nonneg_int("sliding_window", "window", window)

    def sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return sliding_window_mask


def prefix_lm(prefix_length: int) -> Callable:
    """Prefix LM: the first ``prefix_length`` keys are seen by every query; the rest causally.

    Mask: ``(kv_idx < prefix_length) | (q_idx >= kv_idx)``.

    >>> from flexcomp import create_mask
    >>> create_mask(prefix_lm(2), 1, 1, 3, 3, device="cpu")[0, 0].int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    _check_nonneg_int("prefix_lm", "prefix_length", prefix_length)

    def prefix_lm_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    return prefix_lm_mask


def padding_mask(lengths: Union[Tensor, Sequence[int]]) -> Callable:
    """Per-batch key padding: in batch ``b`` only keys ``kv_idx < lengths[b]`` are valid.

    ``lengths`` is captured as a tensor (a buffer of the IR): new lengths compile nothing new.
    Rows whose every key is padding give output 0 and LSE -inf.

    >>> from flexcomp import create_mask
    >>> create_mask(padding_mask([1, 3]), 2, 1, 1, 3, device="cpu")[:, 0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 1]]
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    if lengths.dim() != 1:
        raise ValueError(f"padding_mask: lengths must be 1-D [B], got shape {tuple(lengths.shape)}")

    def padding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx < lengths[b]

    return padding
