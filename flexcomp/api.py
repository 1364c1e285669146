"""The public entry point: ``flex_attention``, argument for argument as torch's.

Validation lives here, once, before anything runs: every error names the argument, what was
expected and what came.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

from torch import Tensor

from .blockmask import BlockMask, _sliced_mask_mod_error, is_noop_block_mask, noop_mask
from .errors import FlexcompError
from .ir import ModKind
from .runtime import Options, run_attention
from .trace import trace


class AuxRequest(NamedTuple):
    """Which auxiliary outputs to return (as torch's ``AuxRequest``)."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs (as torch's ``AuxOutput``): ``lse`` ``[B, Hq, Q_LEN]``, natural log."""

    lse: Optional[Tensor] = None
    max_scores: Optional[Tensor] = None


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _validate(query: Any, key: Any, value: Any, block_mask: Any, enable_gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise FlexcompError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise FlexcompError(f"{name} must be 4-D [B, H, S, D], got {t.dim()}-D with shape {_shape(t)}")
        if not t.dtype.is_floating_point:
            raise FlexcompError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                                f"float64), got {t.dtype}")
        if t.is_nested:
            raise FlexcompError(f"{name} is a NestedTensor; pass dense tensors")
    if not (query.dtype == key.dtype == value.dtype):
        raise FlexcompError(f"query, key and value must have one dtype, got query={query.dtype}, "
                            f"key={key.dtype}, value={value.dtype}")
    if not (query.device == key.device == value.device):
        raise FlexcompError(f"query, key and value must be on one device, got query={query.device}, "
                            f"key={key.device}, value={value.device}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[-1] == 0 or t.shape[0] == 0 or t.shape[1] == 0:
            raise FlexcompError(f"{name} must have a positive batch size, head count and head dim, got shape {_shape(t)}")
    Bq, Hq, Lq, Eq = query.shape
    Bk, Hk, Lk, Ek = key.shape
    Bv, Hv, Lv, _ = value.shape
    if (Bk, Hk, Lk) != (Bv, Hv, Lv):
        raise FlexcompError(f"key and value must agree in batch, heads and length [B, H, S, :], got "
                            f"key {_shape(key)} and value {_shape(value)}")
    if Bk != Bq and Bk != 1:
        raise FlexcompError(f"key/value batch size must equal the query's ({Bq}) or be 1 to broadcast, "
                            f"got query {_shape(query)} and key {_shape(key)}")
    if Ek != Eq:
        raise FlexcompError(f"query and key must have the same head dim (last dim), got query {Eq} "
                            f"({_shape(query)}) and key {Ek} ({_shape(key)})")
    if not enable_gqa and Hq != Hk:
        raise FlexcompError(f"query and key/value must have the same number of heads, got Hq={Hq} and "
                            f"Hkv={Hk}; for grouped-query attention pass enable_gqa=True")
    if enable_gqa and Hq % Hk != 0:
        raise FlexcompError(f"with enable_gqa=True the query heads must be a multiple of the key/value "
                            f"heads, got Hq={Hq} and Hkv={Hk}")
    if block_mask is None:
        return
    for field in ("kv_num_blocks", "kv_indices", "seq_lengths", "BLOCK_SIZE"):
        if not hasattr(block_mask, field):
            raise FlexcompError(f"block_mask must be a BlockMask (from create_block_mask), got "
                                f"{type(block_mask).__name__}")
    if getattr(getattr(block_mask, "mask_mod", None), "__name__", "") == _sliced_mask_mod_error.__name__:
        # ours, or torch's sliced BlockMask (same marker name)
        raise FlexcompError("block_mask was sliced (block_mask[...]) and has no usable mask_mod; create the "
                            "block mask for the batch/heads you need with create_block_mask")
    if is_noop_block_mask(block_mask):
        return
    mq, mkv = block_mask.seq_lengths
    if (mq, mkv) != (Lq, Lk):
        raise FlexcompError(
            f"block_mask was created for (Q_LEN, KV_LEN)=({mq}, {mkv}) but query has {Lq} and key {Lk} "
            f"tokens; create it with create_block_mask(..., Q_LEN={Lq}, KV_LEN={Lk}) or crop a larger "
            f"one with block_mask._adjust({Lq}, {Lk})")
    dims = tuple(block_mask.kv_num_blocks.shape[:-1])
    if len(dims) == 2:
        Bm, Hm = dims
        if Bm not in (1, Bq) or Hm not in (1, Hq):
            raise FlexcompError(f"block_mask has batch/heads ({Bm}, {Hm}), expected ({Bq}, {Hq}) or 1 to "
                                f"broadcast (query shape {_shape(query)})")
    if block_mask.kv_num_blocks.device != query.device:
        raise FlexcompError(f"block_mask is on {block_mask.kv_num_blocks.device} but query is on "
                            f"{query.device}; move it with block_mask.to(query.device)")


def flex_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    score_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Optional[dict] = None,
    *,
    return_aux: Optional[AuxRequest] = None,
):
    r"""Attention with a programmable score_mod and a block-sparse mask; torch's signature.

    ``out = softmax(score_mod(q @ k^T * scale) masked by block_mask) @ v``.

    Args:
        query: ``[B, Hq, L, E]``; key: ``[B or 1, Hkv, S, E]``; value: ``[B or 1, Hkv, S, Ev]``,
            one float dtype and device.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score``, traced to IR (None: identity).
        block_mask: from :func:`create_block_mask` for ``(L, S)`` (None: attend everywhere).
        scale: factor on ``q @ k^T``; default ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` a multiple of ``Hkv``; query head ``h`` reads kv head
            ``h // (Hq // Hkv)``.
        return_lse: also return the log-sum-exp ``[B, Hq, L]`` (natural log, float32, or
            float64 for float64 inputs); rows with nothing kept have LSE ``-inf`` and output 0.
        kernel_options: ``{"BACKEND": "reference" | "triton" | "auto"}``; torch's tuning keys are
            accepted. See :mod:`flexcomp.runtime`.
        return_aux: ``AuxRequest(lse=True)`` returns ``(out, AuxOutput(lse=...))``.

    Returns:
        ``out`` ``[B, Hq, L, Ev]`` in the input dtype; with ``return_lse``, ``(out, lse)``.

    Works with autograd on every device, CPU included (gradients into q, k, v and into tensors
    the score_mod captures that require grad).

    >>> import torch
    >>> from flexcomp import flex_attention, create_block_mask
    >>> from flexcomp.masks import causal_mask, softcap
    >>> q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    >>> bm = create_block_mask(causal_mask, 1, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    >>> out, lse = flex_attention(q, k, v, score_mod=softcap(20.0), block_mask=bm, return_lse=True)
    >>> out.sum().backward()
    >>> out.shape, lse.shape, q.grad.shape
    (torch.Size([1, 2, 64, 16]), torch.Size([1, 2, 64]), torch.Size([1, 2, 64, 16]))
    """
    _validate(query, key, value, block_mask, enable_gqa)
    if score_mod is not None and not callable(score_mod):
        raise FlexcompError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    if return_lse and return_aux is not None:
        raise FlexcompError("give either return_lse=True or return_aux=AuxRequest(lse=True), not both")
    if return_aux is not None and return_aux.max_scores:
        raise FlexcompError("return_aux=AuxRequest(max_scores=True) is not supported by flexcomp; ask for lse")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise FlexcompError(f"scale must be a finite float or None, got {scale!r}")
    options = Options.parse(kernel_options)
    score = trace(score_mod, ModKind.SCORE) if score_mod is not None else None
    if block_mask is not None and is_noop_block_mask(block_mask):
        block_mask = None  # torch's "attend everywhere" placeholder
    mask = None
    if block_mask is not None and block_mask.mask_mod is not noop_mask:
        mask = trace(block_mask.mask_mod, ModKind.MASK)
    out, lse = run_attention(query, key, value, score, mask, block_mask, float(scale), options)
    if return_aux is not None:
        return out, AuxOutput(lse=lse if return_aux.lse else None)
    return (out, lse) if return_lse else out
