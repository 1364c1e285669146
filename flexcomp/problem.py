"""The problem record: one attention call, checked and frozen, built once at the API edge; and the
records a backend returns (:class:`Outputs`, :class:`Grads`) and reads back (:class:`Saved`).

Everything a backend needs besides the tensors' values: shapes, strides, the GQA group, dtypes, the
device, query and key offsets, an optional page table and per-sequence used lengths (decode, paged
KV and context parallel fill these), the BlockMask (its block lists), the traced mods with their
captured values, the scale and the parsed options. The plan stage (:mod:`flexcomp.plan`) reads it
once; backends receive it whole.

>>> import torch
>>> q = k = v = torch.randn(2, 4, 64, 16)
>>> p = make_problem(q, k, v, None, None, None, 0.25, Options())
>>> p.batch, p.heads, p.group, p.q_len, p.head_dim, p.kv_batch
(2, 4, 1, 64, 16, 2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .blockmask import _DEFAULT_SPARSE_BLOCK_SIZE
from .dropout import Dropout
from .options import Options
from .trace import TracedMod


@dataclass(frozen=True)
class Problem:
    """One attention call, without the values of q, k and v.

    Fields:
        batch, heads: of the query (``B``, ``Hq``); kv_heads: ``Hkv`` (``Hq`` is a multiple).
        q_len, kv_len: ``L`` and ``S``; head_dim: ``E`` of query and key; value_dim: ``Ev``.
        kv_batch: the key/value batch, ``B`` or 1 (broadcast over the query batch).
        dtype, device: of q, k and v (one of each).
        q_strides, k_strides, v_strides: element strides of ``[B, H, L, E]`` tensors as given.
        scale: the factor on ``q @ k^T``.
        score, mask: the traced mods (None: identity / keep everything inside the blocks).
        block_mask: the BlockMask (None: every pair, no mask_mod).
        options: ``kernel_options`` and the environment, parsed.
        want_max: also return each row's largest modified, masked score.
        score_grads: per captured tensor of the score_mod, whether a gradient flows into it.
        q_offset, kv_offset: positions of the first query and key in the whole sequence (0 here;
            context parallel and decode shift them).
        page_table: ``[B, pages]`` int32 page numbers of a paged KV cache (None: contiguous).
        seq_lens: ``[B]`` int32 keys used per sequence (None: all ``kv_len``).
        dropout: attention dropout's probability and seed (:mod:`flexcomp.dropout`; None: none).
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    kv_batch: int
    dtype: torch.dtype
    device: torch.device
    q_strides: tuple[int, ...]
    k_strides: tuple[int, ...]
    v_strides: tuple[int, ...]
    scale: float
    score: Optional[TracedMod]
    mask: Optional[TracedMod]
    block_mask: Any
    options: Options
    want_max: bool = False
    score_grads: tuple[bool, ...] = ()
    q_offset: int = 0
    kv_offset: int = 0
    page_table: Optional[Tensor] = None
    seq_lens: Optional[Tensor] = None
    dropout: Optional[Dropout] = None

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA; 1 without it)."""
        return self.heads // self.kv_heads

    @property
    def block_size(self) -> tuple[int, int]:
        """The BlockMask's ``(q_block, kv_block)``; without one, that of the every-block-full mask the
        kernels run then (``create_block_mask``'s default)."""
        if self.block_mask is None:
            return _DEFAULT_SPARSE_BLOCK_SIZE, _DEFAULT_SPARSE_BLOCK_SIZE
        return tuple(self.block_mask.BLOCK_SIZE)

    def signature(self) -> tuple:
        """What a plan depends on, hashable: never the values of tensors or captured numbers."""
        bm = self.block_mask
        lists = None if bm is None else (tuple(bm.BLOCK_SIZE), bm.full_kv_num_blocks is not None,
                                         _has_full_q_lists(bm))
        return (self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim, self.value_dim,
                self.kv_batch, self.dtype, self.device, _mod_key(self.score), _mod_key(self.mask), lists,
                self.options, self.want_max, self.score_grads, self.page_table is not None,
                self.seq_lens is not None, self.dropout is not None)


def _has_full_q_lists(bm) -> bool:
    """The BlockMask has full q-side lists (a flexcomp BlockMask answers without deriving them)."""
    has = getattr(bm, "_has_full_q_lists", None)
    return has() if has is not None else bm.full_q_num_blocks is not None


def _mod_key(tm: Optional[TracedMod]) -> Optional[tuple]:
    return None if tm is None else (tm.graph.structural_key(), tm.graph.fn_name)


def make_problem(q: Tensor, k: Tensor, v: Tensor, score: Optional[TracedMod], mask: Optional[TracedMod],
                 block_mask, scale: float, options: Options, want_max: bool = False,
                 dropout: Optional[Dropout] = None) -> Problem:
    """The record of a validated call (``flexcomp.api`` checked shapes, dtypes and devices).

    ``score_grads`` come from the captured tensors: float ones that require grad, while grad mode
    is on (the same as autograd's ``needs_input_grad`` later)."""
    B, H, L, D = q.shape
    grads = ()
    if score is not None:
        on = torch.is_grad_enabled()
        grads = tuple(on and t.requires_grad and t.is_floating_point() for t in score.buffers)
    return Problem(B, H, k.shape[1], L, k.shape[2], D, v.shape[3], k.shape[0], q.dtype, q.device,
                   tuple(q.stride()), tuple(k.stride()), tuple(v.stride()), scale, score, mask, block_mask,
                   options, want_max, grads, dropout=dropout)


@dataclass(frozen=True)
class Outputs:
    """A forward's results: ``out [B, Hq, L, Ev]`` (input dtype), ``lse [B, Hq, L]`` (natural log)
    and ``max_scores [B, Hq, L]`` (None unless the problem wants it); LSE and max in float32, or
    float64 for float64 inputs."""

    out: Tensor
    lse: Tensor
    max_scores: Optional[Tensor] = None


@dataclass(frozen=True)
class Saved:
    """What the backward reads: the inputs, the forward's output and LSE, the score_mod's captured
    tensors (as given, on their own devices)."""

    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Tensor
    score_buffers: tuple[Tensor, ...]


@dataclass(frozen=True)
class Grads:
    """Gradients of q, k, v and of each captured tensor of the score_mod (None where not wanted)."""

    dq: Optional[Tensor]
    dk: Optional[Tensor]
    dv: Optional[Tensor]
    d_buffers: tuple[Optional[Tensor], ...]
