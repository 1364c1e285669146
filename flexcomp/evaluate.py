"""Running an IR graph with torch ops on broadcast index tensors.

Used by the reference backend (scores for a chunk of queries), by ``create_block_mask`` (the mask
on a batch of blocks) and by ``create_mask``. The user's function is never called again: what
runs is the recorded graph.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .errors import FlexcompIndexError
from .ir import OPS, Const, DType, Graph, Op

Number = bool | int | float

def torch_dtype(dtype: DType, float_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype an IR type is evaluated in (``f32`` is the working float)."""
    return {DType.BOOL: torch.bool, DType.I32: torch.int32, DType.I64: torch.int64}.get(dtype, float_dtype)


def ir_dtype_of(t: torch.dtype) -> DType | None:
    """The IR type a captured tensor of this dtype loads as; None if it cannot be captured."""
    if t == torch.bool:
        return DType.BOOL
    if t == torch.int64:
        return DType.I64
    if t in (torch.int8, torch.int16, torch.int32, torch.uint8):
        return DType.I32
    if t.is_floating_point:
        return DType.F32
    return None


def evaluate(
    g: Graph,
    inputs: Mapping[str, torch.Tensor],
    buffers: Sequence[torch.Tensor],
    scalars: Sequence[Number],
    float_dtype: torch.dtype = torch.float32,
    grad_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluate ``g`` on broadcastable tensors.

    Args:
        inputs: ``score`` (float, any shape) and ``b, h, q_idx, kv_idx`` (int32, broadcastable,
            e.g. ``[B,1,1,1], [1,H,1,1], [1,1,Q,1], [1,1,1,KV]``).
        buffers, scalars: values for ``g.buffers`` and ``g.scalars``, in order.
        float_dtype: the working float (``f32`` nodes); gradients flow into float buffers.
        grad_keep: the pairs whose gradients count (bool, broadcastable): a differentiable load is
            expanded to its shape and gets no gradient elsewhere, so masked pairs, where a mod may
            be NaN (``log`` of a negative distance), send nothing into captured tensors.

    Returns the output, broadcast over the inputs' shapes as far as the graph uses them (a graph
    that ignores ``kv_idx`` returns a tensor without that extent; callers expand).
    """
    device = next(iter(inputs.values())).device
    buf_of = {b.name: t for b, t in zip(g.buffers, buffers)}
    scalar_of = {c.name: v for c, v in zip(g.scalars, scalars)}
    vals: list = [None] * len(g.nodes)

    def arg(a):
        if isinstance(a, Const):
            return torch.tensor(a.value, dtype=torch_dtype(a.dtype, float_dtype), device=device)
        return vals[a]

    for n in g.nodes:
        if n.op is Op.INPUT:
            vals[n.id] = inputs[n.attr]
        elif n.op is Op.SCALAR:
            vals[n.id] = torch.tensor(scalar_of[n.attr], dtype=torch_dtype(n.dtype, float_dtype), device=device)
        elif n.op is Op.LOAD:
            t = buf_of[n.attr]
            idx = tuple(arg(a).long() for a in n.args)
            try:
                vals[n.id] = t[idx].to(torch_dtype(n.dtype, float_dtype))
                if grad_keep is not None and vals[n.id].requires_grad:
                    vals[n.id] = vals[n.id].expand(torch.broadcast_shapes(vals[n.id].shape, grad_keep.shape))
                    vals[n.id].register_hook(lambda gr, keep=grad_keep: torch.where(keep, gr, 0.0))
            except IndexError:
                bad = [f"dim {d}: {int(i.min())}..{int(i.max())} of {t.shape[d]}" for d, i in enumerate(idx)
                       if i.numel() and (int(i.min()) < -t.shape[d] or int(i.max()) >= t.shape[d])]
                raise FlexcompIndexError(
                    f"{g.kind.value} {g.fn_name!r}: '{g.format_node(n)}' indexes the captured tensor {n.attr!r} of "
                    f"shape {tuple(t.shape)} out of range ({'; '.join(bad)}); make it cover every index the "
                    f"sequence lengths reach") from None
        elif n.op is Op.CAST:
            vals[n.id] = arg(n.args[0]).to(torch_dtype(n.dtype, float_dtype))
        else:
            vals[n.id] = OPS[n.op].torch_fn(*(arg(a) for a in n.args))
    return arg(g.output)
