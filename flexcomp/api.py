"""The public entry point: ``flex_attention``, argument for argument as torch's.

Validation lives here, once, before anything runs: every error names the argument, what was
expected and what came, and is an instance of the exception type torch 2.13 raises for the same
input (see :mod:`flexcomp.errors`).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from torch import Tensor

from .blockmask import BlockMask, _sliced_mask_mod_error, is_noop_block_mask, noop_mask
from .compile import eagerly, is_compiling
from .dropout import Dropout
from .errors import (FlexcompAttributeError, FlexcompError, FlexcompNotCallableError, FlexcompNotImplementedError,
                     FlexcompRuntimeError, FlexcompTypeError, FlexcompZeroDivisionError)
from .ir import ModKind
from .ranges import Domain, check_runnable
from .options import Options
from .runtime import run_attention
from .tiles import cdiv
from .trace import TracedMod, trace


class AuxRequest(NamedTuple):
    """Which auxiliary outputs to return (as torch's ``AuxRequest``)."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs (as torch's ``AuxOutput``), None where not asked for (or empty).

    ``lse`` ``[B, Hq, Q_LEN]``: log-sum-exp of each row's modified, masked scores, natural log.
    ``max_scores`` ``[B, Hq, Q_LEN]``: each row's largest modified, masked score (natural units,
    ``-inf`` where nothing is kept), no gradient. Both float32, float64 for float64 inputs.
    """

    lse: Optional[Tensor] = None
    max_scores: Optional[Tensor] = None


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


# torch's warning for the deprecated return_lse, shown once per process as torch does
_RETURN_LSE_WARNING = ("return_lse is deprecated and will be removed in v2.10. "
                       "Please use return_aux=AuxRequest(lse=True) instead.")
_WARNINGS_SHOWN: set[str] = set()


def _warn_once(warning_id: str, message: str, category: type[Warning], stacklevel: int = 3) -> None:
    if warning_id not in _WARNINGS_SHOWN:
        warnings.warn(message, category, stacklevel=stacklevel)
        _WARNINGS_SHOWN.add(warning_id)


def _validate(query: Any, key: Any, value: Any, block_mask: Any, enable_gqa: bool) -> None:
    """Every check flex_attention makes before running, each raising the type torch raises for it."""
    qkv = (("query", query), ("key", key), ("value", value))
    for name, t in qkv:
        if not isinstance(t, Tensor):
            raise FlexcompAttributeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in qkv:
        if t.is_nested:
            raise FlexcompNotImplementedError(f"{name} is a NestedTensor, which flex_attention does not take; "
                                              f"pass dense [B, H, S, D] tensors")
    for name, t in qkv:
        if t.dim() != 4:
            raise FlexcompNotImplementedError(f"{name} must be 4-D [B, H, S, D], got {t.dim()}-D with shape {_shape(t)}")
        if not t.dtype.is_floating_point:
            raise FlexcompError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                                f"float64), got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise FlexcompError(f"query, key and value must have one dtype, got query={query.dtype}, "
                            f"key={key.dtype}, value={value.dtype}")
    if not (query.device == key.device == value.device):
        raise FlexcompError(f"query, key and value must be on one device, got query={query.device}, "
                            f"key={key.device}, value={value.device}")
    if query.device.type == "meta":
        raise FlexcompError("query, key and value are on the meta device, which holds no values: flex_attention "
                            "runs on CPU, CUDA and other devices with data")
    if query.shape[-1] == 0:
        raise FlexcompZeroDivisionError(f"query must have a positive head dim (last dim; the default scale is "
                                        f"1/sqrt(head dim)), got shape {_shape(query)}")
    for name, t in qkv:
        if t.shape[-1] == 0 or t.shape[0] == 0 or t.shape[1] == 0:
            raise FlexcompError(f"{name} must have a positive batch size, head count and head dim, got shape {_shape(t)}")
    Bq, Hq, Lq, Eq = query.shape
    Bk, Hk, Lk, Ek = key.shape
    Bv, Hv, Lv, _ = value.shape
    if (Bk, Hk, Lk) != (Bv, Hv, Lv):
        raise FlexcompRuntimeError(f"key and value must agree in batch, heads and length [B, H, S, :], got "
                                   f"key {_shape(key)} and value {_shape(value)}")
    if Bk != Bq and Bk != 1:
        raise FlexcompRuntimeError(f"key/value batch size must equal the query's ({Bq}) or be 1 to broadcast, "
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
    if block_mask is not None:
        _validate_block_mask(block_mask, query, Lk)


def _validate_block_mask(block_mask: Any, query: Tensor, Lk: int) -> None:
    Bq, Hq, Lq, _ = query.shape
    for field in ("kv_num_blocks", "kv_indices", "seq_lengths", "BLOCK_SIZE"):
        if not hasattr(block_mask, field):
            raise FlexcompAttributeError(f"block_mask must be a BlockMask (from create_block_mask), got "
                                         f"{type(block_mask).__name__}")
    if getattr(getattr(block_mask, "mask_mod", None), "__name__", "") == _sliced_mask_mod_error.__name__:
        # ours, or torch's sliced BlockMask (same marker name)
        raise FlexcompRuntimeError("Cannot use mask_mod from a sliced BlockMask: block_mask was sliced "
                                   "(block_mask[...]) and has no usable mask_mod; create the block mask for the "
                                   "batch/heads you need with create_block_mask")
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
    qb, kvb = block_mask.BLOCK_SIZE
    rows, cols = block_mask.kv_indices.shape[-2:]
    if rows < cdiv(Lq, qb) or cols < cdiv(Lk, kvb):
        raise FlexcompError(
            f"block_mask's lists have {rows} q-block rows and {cols} kv-block columns, but (Q_LEN, KV_LEN)=({Lq}, "
            f"{Lk}) with BLOCK_SIZE=({qb}, {kvb}) needs {cdiv(Lq, qb)} and {cdiv(Lk, kvb)}: they must cover "
            f"every query and key (build it with create_block_mask, or from_kv_blocks with covering lists)")
    if block_mask.kv_num_blocks.device != query.device:
        raise FlexcompRuntimeError(f"block_mask is on {block_mask.kv_num_blocks.device} but query is on "
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
            Deprecated as in torch (a FutureWarning, once): use ``return_aux``.
        kernel_options: ``{"BACKEND": "reference" | "triton" | "auto"}``; torch's tuning keys are
            accepted (types checked). See :mod:`flexcomp.runtime`.
        return_aux: ``AuxRequest(lse=True, max_scores=True)`` returns ``(out, AuxOutput(lse, max_scores))``:
            ``max_scores`` ``[B, Hq, L]`` is each row's largest score after score_mod and masking
            (``-inf`` for rows with nothing kept), without gradient. Not with ``return_lse``.

    Returns:
        ``out`` ``[B, Hq, L, Ev]`` in the input dtype; with ``return_lse``, ``(out, lse)``; with
        ``return_aux``, ``(out, AuxOutput)``. An empty LSE or max (``L == 0``) comes back as None, as torch.

    Works with autograd on every device, CPU included (gradients into q, k, v and into tensors
    the score_mod captures that require grad).

    >>> import torch
    >>> from flexcomp import flex_attention, create_block_mask
    >>> from flexcomp.masks import causal_mask, softcap
    >>> q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    >>> bm = create_block_mask(causal_mask, 1, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    >>> out, aux = flex_attention(q, k, v, score_mod=softcap(20.0), block_mask=bm, return_aux=AuxRequest(lse=True))
    >>> out.sum().backward()
    >>> out.shape, aux.lse.shape, q.grad.shape
    (torch.Size([1, 2, 64, 16]), torch.Size([1, 2, 64]), torch.Size([1, 2, 64, 16]))
    >>> out, aux = flex_attention(q, k, v, block_mask=bm, return_aux=AuxRequest(lse=True, max_scores=True))
    >>> s = (q @ k.transpose(-1, -2) / 4).masked_fill(~torch.ones(64, 64).tril().bool(), float("-inf"))
    >>> torch.allclose(aux.max_scores, s.amax(-1)), aux.max_scores.requires_grad
    (True, False)
    """
    if is_compiling():  # under torch.compile: the custom op, else one graph break (flexcomp.compile)
        res = compiled_flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                                      kernel_options, return_aux=return_aux)
        if res is not None:
            return res
        return eagerly(flex_attention, query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                       kernel_options, return_aux=return_aux)
    return attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                     return_aux=return_aux)


@dataclass(frozen=True)
class Resolved:
    """A checked call's pieces for the runtime: the traced mods, the BlockMask (None: every pair),
    the scale and the parsed options."""

    score: Optional[TracedMod]
    mask: Optional[TracedMod]
    block_mask: Optional[BlockMask]
    scale: float
    options: Options


def resolve(query: Tensor, key: Tensor, value: Tensor, score_mod: Optional[Callable], block_mask: Optional[BlockMask],
            scale: Optional[float], enable_gqa: bool, return_lse: bool = False, kernel_options: Optional[dict] = None,
            return_aux: Optional[AuxRequest] = None) -> Resolved:
    """Check a call as :func:`flex_attention` does (each error names the argument and is torch's
    type) and trace its mods (the trace cache makes a repeated call cheap)."""
    _validate(query, key, value, block_mask, enable_gqa)
    if score_mod is not None and not callable(score_mod):
        raise FlexcompNotCallableError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    if return_aux is not None and not (hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise FlexcompAttributeError(f"return_aux must be an AuxRequest(lse=..., max_scores=...) or None, got "
                                     f"{type(return_aux).__name__}")
    if return_lse and return_aux is not None:
        raise FlexcompError("Cannot specify both return_lse and return_aux. return_lse is deprecated, please use "
                            "return_aux=AuxRequest(lse=True) instead (give either, not both)")
    if return_lse:
        _warn_once("deprecated_return_lse", _RETURN_LSE_WARNING, FutureWarning, stacklevel=5)  # flex_attention's caller
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise FlexcompTypeError(f"scale must be a finite float or None, got {scale!r} ({type(scale).__name__})")
    elif not math.isfinite(scale):
        raise FlexcompError(f"scale must be a finite float or None, got {scale!r}")
    options = Options.parse(kernel_options)
    score = trace(score_mod, ModKind.SCORE) if score_mod is not None else None
    if block_mask is not None and is_noop_block_mask(block_mask):
        block_mask = None  # torch's "attend everywhere" placeholder
    mask = None
    if block_mask is not None and block_mask.mask_mod is not noop_mask:
        mask = trace(block_mask.mask_mod, ModKind.MASK)
    for tm in (score, mask):
        if tm is not None:
            check_runnable(tm, query.device, Domain(query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
    return Resolved(score, mask, block_mask, float(scale), options)


def compiled_flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Optional[Callable] = None,
                            block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                            enable_gqa: bool = False, return_lse: bool = False, kernel_options: Optional[dict] = None,
                            *, return_aux: Optional[AuxRequest] = None):
    """:func:`flex_attention` as Dynamo traces it: the ``flexcomp::flex_attention`` custom op
    (:mod:`flexcomp.custom_ops`) where the mods can be templates, else None (the caller runs it
    eagerly behind one graph break, :func:`flexcomp.compile.eagerly`)."""
    from .custom_ops import graph_flex_attention  # here: it imports torch._dynamo (see flexcomp.compile)

    res = None
    plain = not return_lse and (return_aux is None or isinstance(return_aux, AuxRequest))
    if plain and isinstance(query, Tensor) and (block_mask is None or isinstance(block_mask, BlockMask)):
        if block_mask is not None and is_noop_block_mask(block_mask):
            block_mask = None
        want_max = return_aux is not None and bool(return_aux.max_scores)
        res = graph_flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options,
                                   want_max)
    if res is None:
        return None
    out, lse, max_scores = res
    if return_aux is None:
        return out
    empty = query.shape[0] * query.shape[1] * query.shape[2] == 0  # as torch: an empty LSE / max is None
    return out, AuxOutput(lse=lse if return_aux.lse and not empty else None,
                          max_scores=max_scores if return_aux.max_scores and not empty else None)


def attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Optional[Callable] = None,
              block_mask: Optional[BlockMask] = None, scale: Optional[float] = None, enable_gqa: bool = False,
              return_lse: bool = False, kernel_options: Optional[dict] = None, *,
              return_aux: Optional[AuxRequest] = None, dropout: Optional[Dropout] = None):
    """:func:`flex_attention` with flexcomp's extension: attention ``dropout`` (a
    :class:`flexcomp.dropout.Dropout`: probability and seed; the output is ``(P * keep / (1 - p)) @ V``,
    the LSE the softmax's). torch's ``flex_attention`` has no dropout, so :func:`flex_attention` keeps
    torch's signature and ``flexcomp.flash_attn`` / ``flexcomp.sdpa`` reach dropout through here."""
    call = resolve(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                   return_aux)
    want_lse = return_lse or (return_aux is not None and bool(return_aux.lse))
    want_max = return_aux is not None and bool(return_aux.max_scores)
    out, lse, max_scores = run_attention(query, key, value, call.score, call.mask, call.block_mask, call.scale,
                                         call.options, want_max, dropout)
    # as torch: an empty LSE / max (no query, or no batch) is returned as None
    lse = lse if want_lse and lse.numel() > 0 else None
    max_scores = max_scores if want_max and max_scores.numel() > 0 else None
    if return_aux is not None:
        return out, AuxOutput(lse=lse, max_scores=max_scores)
    return (out, lse) if return_lse else out
