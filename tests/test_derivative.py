"""flexcomp.derivative: score_mod derivatives from the IR, against torch autograd."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flexcomp.derivative import float_loads, load_derivative, score_derivative
from flexcomp.evaluate import evaluate
from flexcomp.ir import Const, DType, ModKind, Node, Op
from flexcomp.masks import alibi, softcap
from flexcomp.trace import trace

B, H, L, S = 2, 3, 9, 11
table = torch.randn(H, L + S, dtype=torch.float64)
scale_h = torch.rand(H, dtype=torch.float64) + 0.5

MODS = {
    "identity": lambda s, b, h, q, kv: s,
    "softcap": softcap(7.0),
    "alibi": alibi(H),
    "poly": lambda s, b, h, q, kv: s * s * 0.3 - s ** 3 / 7 + 2 * s,
    "div": lambda s, b, h, q, kv: (s + 3.0) / (s * s + 1.0),
    "exp_log": lambda s, b, h, q, kv: torch.log(torch.exp(s * 0.5) + 1.0) + torch.exp2(s * 0.1) + torch.log2(s * s + 2),
    "sigmoid_sqrt": lambda s, b, h, q, kv: torch.sigmoid(s) * torch.sqrt(s * s + 1) + torch.rsqrt(s * s + 4),
    "trig": lambda s, b, h, q, kv: torch.sin(s) + torch.cos(s * 2),
    "where": lambda s, b, h, q, kv: torch.where(q >= kv, s * 2, -s),
    "minmax_clamp": lambda s, b, h, q, kv: torch.minimum(s, (q - kv).float()) + torch.clamp(s, -0.5, 0.5) + torch.maximum(s * 3, s.abs()),
    "abs_sign": lambda s, b, h, q, kv: s.abs() * 2 + torch.sign(s),
    "table": lambda s, b, h, q, kv: s * scale_h[h] + table[h, q - kv + S] * s,
    "mod_floordiv": lambda s, b, h, q, kv: torch.remainder(s, 1.5) + (s * 0 + q // 2),
    "pow_general": lambda s, b, h, q, kv: (s * s + 1.0) ** (0.5 + (q % 3)),
    "erf_atan_tan": lambda s, b, h, q, kv: torch.erf(s) + torch.atan(s * 2) + torch.tan(s * 0.2),
    "log1p_expm1": lambda s, b, h, q, kv: torch.log1p(s * s) + torch.expm1(s * 0.3),
    "activations": lambda s, b, h, q, kv: (F.gelu(s) + F.gelu(s, approximate="tanh") + F.silu(s) + F.mish(s)
                                           + F.softplus(s, beta=1.5, threshold=2.0) + F.elu(s) + F.leaky_relu(s, 0.2)
                                           + F.logsigmoid(s) + F.relu6(s * 3)),
}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = dict(b=torch.arange(B, dtype=torch.int32).view(-1, 1, 1, 1), h=torch.arange(H, dtype=torch.int32).view(1, -1, 1, 1),
               q_idx=torch.arange(L, dtype=torch.int32).view(1, 1, -1, 1), kv_idx=torch.arange(S, dtype=torch.int32).view(1, 1, 1, -1))
    score = torch.randn(B, H, L, S, dtype=torch.float64, generator=g) * 2
    return score, idx


@pytest.mark.parametrize("name", MODS)
def test_score_derivative_matches_autograd(name):
    tm = trace(MODS[name], ModKind.SCORE)
    score, idx = _inputs()
    score.requires_grad_()
    out = torch.broadcast_to(evaluate(tm.graph, {"score": score, **idx}, tm.buffers, tm.scalars, torch.float64), score.shape)
    want, = torch.autograd.grad(out.sum(), score)
    d = score_derivative(tm.graph)
    got = torch.broadcast_to(evaluate(d, {"score": score.detach(), **idx}, tm.buffers, tm.scalars, torch.float64), score.shape)
    torch.testing.assert_close(got, want)


def test_load_derivatives_give_captured_tensor_gradients():
    tm = trace(MODS["table"], ModKind.SCORE)
    score, idx = _inputs(1)
    bufs = [t.clone().requires_grad_() for t in tm.buffers]
    out = torch.broadcast_to(evaluate(tm.graph, {"score": score, **idx}, bufs, tm.scalars, torch.float64), score.shape)
    want = torch.autograd.grad(out.sum(), bufs)
    got = [torch.zeros_like(t) for t in tm.buffers]
    pos = {b.name: i for i, b in enumerate(tm.graph.buffers)}
    for load in float_loads(tm.graph):
        d = torch.broadcast_to(evaluate(load_derivative(tm.graph, load), {"score": score, **idx}, tm.buffers,
                                        tm.scalars, torch.float64), score.shape)
        index = [torch.broadcast_to(evaluate_index(tm, a, idx), score.shape).long() for a in load.args]
        got[pos[load.attr]].index_put_(tuple(index), d, accumulate=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def evaluate_index(tm, a, idx):
    """The value of a load's index operand (a node or a constant) on the broadcast indices."""
    if isinstance(a, Const):
        return torch.tensor(a.value)
    cast = Node(len(tm.graph.nodes), Op.CAST, DType.F32, (a,))  # the index node as the graph's output
    sub = dataclasses.replace(tm.graph, nodes=tm.graph.nodes + (cast,), output=cast.id)
    return evaluate(sub, {"score": torch.zeros(()), **idx}, tm.buffers, tm.scalars, torch.float64)


def test_softcap_derivative_is_one_minus_tanh_squared_sharing_the_forward_tanh():
    text = str(score_derivative(trace(softcap(30.0), ModKind.SCORE).graph))
    assert text.count("tanh") == 1 and "sub 1.0, %3" in text
