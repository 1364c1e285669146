"""Packed documents: attention stays inside each document."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .causal import causal_mask


def _positions(doc_ids: Tensor) -> Tensor:
    """Each token's index within its document (documents are contiguous runs of one id), int32."""
    n = doc_ids.shape[-1]
    pos = torch.arange(n, dtype=torch.int32, device=doc_ids.device).expand_as(doc_ids)
    boundary = torch.ones_like(doc_ids, dtype=torch.bool)
    boundary[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return pos - torch.cummax(torch.where(boundary, pos, 0), dim=-1).values.to(torch.int32)


def document_mask(
    lengths: Optional[Union[Tensor, Sequence[int]]] = None,
    inner: Optional[Callable] = causal_mask,
    *,
    doc_ids: Optional[Tensor] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Callable:
    """Packed documents: ``q`` sees ``kv`` only in the same document, and only where ``inner`` allows.

    Give either ``lengths`` (the documents' lengths in packing order, summing to the sequence
    length) or ``doc_ids=`` (the document id of each token: ``[S]``, or ``[B, S]`` for a packing per
    batch element). ``inner`` is a mask_mod that sees *document-local* indices (``q_idx`` minus
    the document's first token), so ``inner=prefix_lm(4)`` gives each document its own prefix.
    ``inner=None`` means no further masking (bidirectional inside documents). ``device``: where the
    captured tensors live (default: torch's default device for ``lengths``, as its factories, and
    ``doc_ids``' own device); give the device the masks are built on (``"cuda"``), or each
    ``create_block_mask`` copies them there first.

    The document ids (and, for an ``inner`` other than ``causal_mask`` or None, the positions within
    documents) are captured tensors: a new packing compiles nothing new, and costs nothing to make
    from device ``doc_ids`` (``causal_mask`` inside a document is ``q_idx >= kv_idx`` there, so the
    default needs no positions). The mod only compares what it reads, so no value of a new packing
    can make 32-bit index arithmetic wrap: it is traced once per structure and never re-checked
    (:mod:`flexcomp.trace`).

    >>> from flexcomp import create_mask
    >>> create_mask(document_mask([2, 2]), 1, 1, 4, 4, device="cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    if (lengths is None) == (doc_ids is None):
        raise ValueError("document_mask: give exactly one of lengths (document lengths) or doc_ids= (id per token)")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        if lengths.dim() != 1 or (lengths <= 0).any():
            raise ValueError(f"document_mask: lengths must be a 1-D list of positive ints, got {lengths.tolist()}; "
                             f"to give the document id of each token instead, call document_mask(doc_ids=...)")
        doc = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32, device="cpu"), lengths)
        device = torch.get_default_device() if device is None else device  # as torch's factories do
    else:
        doc = torch.as_tensor(doc_ids)
        if doc.dim() not in (1, 2) or doc.dtype.is_floating_point:
            raise ValueError(f"document_mask: doc_ids must be an integer tensor [S] or [B, S], got "
                             f"{doc.dtype} of shape {tuple(doc.shape)}")
        doc = doc.to(torch.int32)
    if device is not None:
        doc = doc.to(device)
    local = inner is not None and inner is not causal_mask  # inner needs positions within documents
    pos = _positions(doc) if local else None  # read, not computed, in the mod: no arithmetic on captures
    per_batch = doc.dim() == 2

    def document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same = doc[b, q_idx] == doc[b, kv_idx] if per_batch else doc[q_idx] == doc[kv_idx]
        if inner is None:
            return same
        if not local:  # causal inside a document: its local q >= local kv is q_idx >= kv_idx there
            return same & (q_idx >= kv_idx)
        ql, kl = (pos[b, q_idx], pos[b, kv_idx]) if per_batch else (pos[q_idx], pos[kv_idx])
        return same & inner(b, h, ql, kl)

    return document
