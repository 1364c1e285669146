"""Context parallel attention: one ``flex_attention`` over a sequence sharded across the ranks of a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

Each rank holds a shard of the sequence of q, k and v (``[B, H, seq_len / world, D]``). The user's
``mask_mod`` and ``score_mod`` see *global* positions: a rank's queries against another rank's keys
are attended with the mods shifted to where those shards sit in the sequence. The pieces merge by
their log-sum-exp, forward and backward, and gradients flow into q, k, v (and into tensors the
score_mod captures; sum those over the group as for any replicated parameter:
:func:`reduce_gradients`).

Block sparsity decides the communication: each rank builds the BlockMask of its queries against
every shard, and only the shards with a non-empty mask travel (point-to-point ``isend`` /
``irecv``, batched): a sliding window or a document mask exchanges with neighbours only, and a
rank never computes an empty pair. The sharding is :attr:`Sharding.ZIGZAG` by default: the sequence
cut in ``2 * world`` chunks, rank ``r`` holding chunks ``r`` and ``2 * world - 1 - r``, so causal
work is balanced (the ``CONTIGUOUS`` alternative gives the last rank most of it).

Typical use (in every rank of an initialised group)::

    cp = ContextParallel(seq_len=S)                       # the default group, zig-zag
    q, k, v = (shard(t, cp) for t in (q_full, k_full, v_full))   # or shards from the data loader
    out = context_parallel_attention(q, k, v, cp, mask_mod=causal_mask)
    full = unshard(out.detach(), cp)                      # the whole output, on every rank
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .api import AuxRequest, flex_attention
from .blockmask import _DEFAULT_SPARSE_BLOCK_SIZE
from .blockmask_build import create_block_mask
from .compile import eager_under_compile
from .errors import FlexcompError


class Sharding(enum.Enum):
    """How the sequence is cut across ranks."""

    CONTIGUOUS = "contiguous"  # rank r holds tokens r * L .. (r + 1) * L
    ZIGZAG = "zigzag"  # 2 * world chunks; rank r holds chunks r and 2 * world - 1 - r (head and tail)


@dataclass(frozen=True)
class ContextParallel:
    """A sequence of ``seq_len`` tokens sharded over ``group`` (None: the default process group).

    >>> cp = ContextParallel(seq_len=16, sharding=Sharding.ZIGZAG)
    >>> cp.pieces(rank=0, world=2), cp.pieces(rank=1, world=2)
    (((0, 4), (12, 4)), ((4, 4), (8, 4)))
    """

    seq_len: int
    sharding: Sharding = Sharding.ZIGZAG
    group: Any = None

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def pieces(self, rank: Optional[int] = None, world: Optional[int] = None) -> tuple[tuple[int, int], ...]:
        """``((start, length), ...)``: where rank ``rank``'s shard lies in the sequence, in the order its
        tokens are stored (one piece, or head and tail for zig-zag)."""
        world = self.world if world is None else world
        rank = self.rank if rank is None else rank
        if self.sharding is Sharding.CONTIGUOUS:
            n = self.seq_len // world
            return ((rank * n, n),)
        c = self.seq_len // (2 * world)
        return ((rank * c, c), ((2 * world - 1 - rank) * c, c))

    def check(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise FlexcompError("context parallel attention needs an initialised torch.distributed process group "
                                "(torch.distributed.init_process_group), got none")
        if not isinstance(self.sharding, Sharding):
            raise FlexcompError(f"ContextParallel.sharding must be a Sharding, got {self.sharding!r}")
        parts = self.world * (2 if self.sharding is Sharding.ZIGZAG else 1)
        if not isinstance(self.seq_len, int) or self.seq_len <= 0 or self.seq_len % parts:
            raise FlexcompError(f"ContextParallel.seq_len must be a positive multiple of {parts} (world size "
                                f"{self.world}, {self.sharding.value} sharding), got {self.seq_len!r}")


def _position(pieces: tuple[tuple[int, int], ...]) -> Callable:
    """Local index -> global position for a shard stored as ``pieces``."""
    (s0, n0) = pieces[0]
    if len(pieces) == 1:
        return lambda i: i + s0
    s1 = pieces[1][0]
    return lambda i: torch.where(i < n0, i + s0, i + (s1 - n0))


def _shift_mask(mask_mod: Callable, qpos: Callable, kpos: Callable) -> Callable:
    def mask_at(b, h, q_idx, kv_idx):
        return mask_mod(b, h, qpos(q_idx), kpos(kv_idx))

    return mask_at


def _shift_score(score_mod: Callable, qpos: Callable, kpos: Callable) -> Callable:
    def score_at(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, qpos(q_idx), kpos(kv_idx))

    return score_at


def shard(x: Tensor, cp: ContextParallel, dim: int = 2) -> Tensor:
    """This rank's shard of the whole-sequence tensor ``x`` (sequence along ``dim``), contiguous.

    Differentiable (a slice); no communication."""
    cp.check()
    if x.shape[dim] != cp.seq_len:
        raise FlexcompError(f"shard: x must have seq_len = {cp.seq_len} along dim {dim}, got shape {tuple(x.shape)}")
    return torch.cat([x.narrow(dim, s, n) for s, n in cp.pieces()], dim=dim).contiguous()


def unshard(x: Tensor, cp: ContextParallel, dim: int = 2) -> Tensor:
    """The whole-sequence tensor from every rank's shard ``x`` (an all-gather; no gradient)."""
    cp.check()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(cp.world)]
    dist.all_gather(parts, x, group=cp.group)
    shape = list(x.shape)
    shape[dim] = cp.seq_len
    out = x.new_empty(shape)
    for r, part in enumerate(parts):
        at = 0
        for s, n in cp.pieces(r):
            out.narrow(dim, s, n).copy_(part.narrow(dim, at, n))
            at += n
    return out


def reduce_gradients(tensors, cp: ContextParallel) -> None:
    """Sum the ``.grad`` of replicated tensors (a score_mod's learnable bias, say) over the group: each
    rank holds the contribution of its queries only, as data parallel ranks do for parameters."""
    cp.check()
    for t in tensors:
        if t.grad is not None:
            dist.all_reduce(t.grad, group=cp.group)


def _peer(cp: ContextParallel, r: int) -> int:
    return r if cp.group is None else dist.get_global_rank(cp.group, r)


def _needed(cp: ContextParallel, mine: list[bool], device) -> list[list[bool]]:
    """``needed[r][o]``: rank r's queries see rank o's keys (every rank's row, all-gathered)."""
    row = torch.tensor([int(m) for m in mine], dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(cp.world)]
    dist.all_gather(rows, row, group=cp.group)
    return [[bool(x) for x in r.tolist()] for r in rows]


def _exchange(cp: ContextParallel, send: list[int], recv: list[int], mine: Tensor) -> dict[int, Tensor]:
    """Send ``mine`` to the ranks in ``send`` and receive a tensor like it from each rank in ``recv``."""
    got = {o: torch.empty_like(mine) for o in recv}
    ops = [dist.P2POp(dist.isend, mine, _peer(cp, r), cp.group) for r in send]
    ops += [dist.P2POp(dist.irecv, got[o], _peer(cp, o), cp.group) for o in recv]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return got


class _KeysValues(torch.autograd.Function):
    """The exchange of K and V (packed along the last dim) between the ranks that need them; its
    backward sends each received shard's gradient back to its owner and sums what comes back.
    Outputs: this rank's own shard (passed through, so that the backward runs on every rank that
    sent: the caller ties it to the output) and the received shards, in ``recv`` order."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, needed: list, kv: Tensor):
        me, world = cp.rank, cp.world
        ctx.cp = cp
        ctx.send = [r for r in range(world) if r != me and needed[r][me]]
        ctx.recv = [o for o in range(world) if o != me and needed[me][o]]
        ctx.like = kv.shape
        ctx.dtype, ctx.device = kv.dtype, kv.device
        got = _exchange(cp, ctx.send, ctx.recv, kv.contiguous())
        return (kv.view_as(kv), *(got[o] for o in ctx.recv))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_own, *grads):
        cp = ctx.cp

        def zeros():
            return torch.zeros(ctx.like, dtype=ctx.dtype, device=ctx.device)

        ops, back = [], {}
        for o, g in zip(ctx.recv, grads):  # each received shard's gradient to its owner (zeros if unused)
            g = zeros() if g is None else g.contiguous()
            ops.append(dist.P2POp(dist.isend, g, _peer(cp, o), cp.group))
        for r in ctx.send:  # the gradients of this rank's shard from the ranks that used it
            back[r] = zeros()
            ops.append(dist.P2POp(dist.irecv, back[r], _peer(cp, r), cp.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        total = zeros() if d_own is None else d_own.clone()
        for g in back.values():
            total += g
        return None, None, total


@eager_under_compile
def context_parallel_attention(
    query: Tensor, key: Tensor, value: Tensor, cp: ContextParallel,
    score_mod: Optional[Callable] = None, mask_mod: Optional[Callable] = None, scale: Optional[float] = None,
    enable_gqa: bool = False, block_size: int = _DEFAULT_SPARSE_BLOCK_SIZE, kernel_options: Optional[dict] = None,
    return_lse: bool = False,
):
    """Attention of this rank's queries over the whole sharded sequence.

    Args:
        query: ``[B, Hq, L, E]``, this rank's shard (``L = cp.seq_len / world``, laid out as
            :meth:`ContextParallel.pieces` says: :func:`shard` makes it from a whole tensor).
        key, value: ``[B, Hkv, L, E]`` / ``[B, Hkv, L, Ev]``, this rank's shards.
        cp: the sharding and the process group.
        score_mod, mask_mod: as :func:`flexcomp.flex_attention`'s, on *global* positions
            (``q_idx`` and ``kv_idx`` in ``0 .. seq_len``).
        scale, enable_gqa, kernel_options: as :func:`flexcomp.flex_attention`'s.
        block_size: the BlockMasks' block size (their sparsity decides which shards travel).
        return_lse: also return the LSE ``[B, Hq, L]`` of the whole rows.

    Returns ``out [B, Hq, L, Ev]`` (and the LSE): this rank's rows of the whole attention,
    differentiable in q, k, v and the score_mod's captured tensors. Every rank of the group must
    call it (and its backward) together. In each process of an initialised group (a runnable
    version that spawns the processes: ``python -m flexcomp.bench_context_parallel --backend gloo
    --world 2 --seq 1024 --heads 2 --dim 32 --dtype float32``)::

        cp = ContextParallel(seq_len=1024)
        out = context_parallel_attention(shard(q, cp), shard(k, cp), shard(v, cp), cp, mask_mod=causal_mask)
    """
    cp.check()
    where = "context_parallel_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise FlexcompError(f"{where}: {name} must be a [B, H, L, D] tensor (this rank's shard), got "
                                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    world, me = cp.world, cp.rank
    L = cp.seq_len // world
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[2] != L:
            raise FlexcompError(f"{where}: {name} must hold this rank's {L} tokens (seq_len {cp.seq_len} over "
                                f"{world} ranks) along dim 2, got shape {tuple(t.shape)}")
    if key.shape[-1] != query.shape[-1] or key.shape[:3] != value.shape[:3]:
        raise FlexcompError(f"{where}: key must be [B, Hkv, L, E] like query's E and value [B, Hkv, L, Ev], got "
                            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    B, Hq = query.shape[:2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    qpos = _position(cp.pieces(me, world))
    kpos = {o: _position(cp.pieces(o, world)) for o in range(world)}
    masks: dict[int, Any] = {}
    if mask_mod is not None:
        for o in range(world):
            bm = create_block_mask(_shift_mask(mask_mod, qpos, kpos[o]), B, Hq, L, L, device=query.device,
                                   BLOCK_SIZE=block_size)
            nonempty = bool(bm.kv_num_blocks.any()) or (bm.full_kv_num_blocks is not None
                                                        and bool(bm.full_kv_num_blocks.any()))
            masks[o] = bm if nonempty else None
        mine = [masks[o] is not None for o in range(world)]
    else:
        mine = [True] * world
    needed = _needed(cp, mine, query.device)
    Dk = key.shape[-1]
    kv = torch.cat([key, value], dim=-1)
    recv = [o for o in range(world) if o != me and needed[me][o]]
    own, *received = _KeysValues.apply(cp, needed, kv)
    got = {me: own, **dict(zip(recv, received))}
    outs, lses = [], []
    for o in range(world):
        if not mine[o]:
            continue
        kv_o = got[o]
        k_o, v_o = kv_o[..., :Dk], kv_o[..., Dk:]
        score = None if score_mod is None else _shift_score(score_mod, qpos, kpos[o])
        out_o, aux = flex_attention(query, k_o, v_o, score_mod=score, block_mask=masks.get(o), scale=scale,
                                    enable_gqa=enable_gqa, kernel_options=kernel_options,
                                    return_aux=AuxRequest(lse=True))
        outs.append(out_o)
        lses.append(aux.lse)
    out, lse = _merge(query, value, outs, lses)
    if not mine[me]:  # the exchange's backward must run on every rank: tie it to the output
        out = _Tie.apply(out, own)
    return (out, lse) if return_lse else out


class _Tie(torch.autograd.Function):
    """``out`` unchanged, with ``anchor`` in its graph (a zero gradient)."""

    @staticmethod
    def forward(ctx, out: Tensor, anchor: Tensor):
        ctx.like = (anchor.shape, anchor.dtype, anchor.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        shape, dtype, device = ctx.like
        return d_out, torch.zeros(shape, dtype=dtype, device=device)


def _merge(query: Tensor, value: Tensor, outs: list, lses: list) -> tuple[Tensor, Tensor]:
    """One row's pieces ``(out_i, lse_i)`` into the whole row's output and LSE; rows with nothing kept
    anywhere give output 0 and LSE -inf, with zero gradients."""
    B, H, L = query.shape[:3]
    wd = torch.float64 if query.dtype == torch.float64 else torch.float32
    if not outs:  # nothing kept for any query of this rank (the caller ties the graph to the keys)
        return (_Tie.apply(query.new_zeros(B, H, L, value.shape[-1]), query),
                torch.full((B, H, L), -torch.inf, dtype=wd, device=query.device))
    lse_all = torch.stack(lses).to(wd)
    m = lse_all.detach().amax(0)
    m = torch.where(torch.isneginf(m), 0.0, m)
    total = torch.exp(lse_all - m).sum(0)
    empty = total == 0
    lse = torch.where(empty, -torch.inf, m + torch.log(torch.where(empty, 1.0, total)))
    w = torch.exp(lse_all - torch.where(empty, 0.0, lse).unsqueeze(0))
    out = sum(w[i].unsqueeze(-1) * o.to(wd) for i, o in enumerate(outs))
    return out.to(query.dtype), lse
