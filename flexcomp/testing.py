"""flexcomp.testing: the independent oracle, dense float64 attention that calls the user's mods directly.

No IR, no chunking, no block map: the mods get broadcast index tensors ``b [B,1,1,1]``,
``h [1,H,1,1]``, ``q_idx [1,1,L,1]``, ``kv_idx [1,1,1,S]`` and the full score matrix, as in torch's
eager flex_attention. Differentiable in everything, including captured tensors.

It shares no code with the pipeline (no IR, no BlockMask), which is what makes it an oracle for
the tests, the demo and later the Triton kernels.
"""
from __future__ import annotations

import math

import torch


def dense_attention(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False):
    """Returns (out, lse) in float64; rows with nothing kept give out 0 and lse -inf."""
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.expand(B, Hq, L, S)
    ar = lambda n: torch.arange(n, dtype=torch.int32, device=q.device)  # noqa: E731
    b, h, qi, ki = ar(B).view(-1, 1, 1, 1), ar(Hq).view(1, -1, 1, 1), ar(L).view(1, 1, -1, 1), ar(S).view(1, 1, 1, -1)
    if score_mod is not None:
        s = torch.broadcast_to(score_mod(s, b, h, qi, ki), s.shape).double()
    if mask_mod is not None:
        keep = torch.broadcast_to(torch.as_tensor(mask_mod(b, h, qi, ki)), s.shape)
        s = torch.where(keep, s, -math.inf)
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, 1.0, l)
    out = (p / l_safe) @ v.expand(B, Hq, S, v.shape[-1])
    lse = torch.where(empty, -math.inf, m + torch.log(l_safe)).squeeze(-1)
    return out, lse


def rand_qkv(B, Hq, L, S, E, Ev=None, Hkv=None, dtype=torch.float64, requires_grad=True, gen=None):
    """Fresh random q, k, v (never zeros)."""
    Hkv = Hq if Hkv is None else Hkv
    Ev = E if Ev is None else Ev
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(B, Hq, L, E), mk(B, Hkv, S, E), mk(B, Hkv, S, Ev)


def grads(outputs, inputs, seed=0):
    """Gradients of a random projection of ``outputs`` (out and lse) w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for o in outputs:
        w = torch.randn(o.shape, dtype=torch.float64, generator=g).to(device=o.device, dtype=o.dtype)
        total = total + (torch.where(torch.isinf(o), 0.0, o) * w).sum()
    return torch.autograd.grad(total, inputs, allow_unused=True)
