"""Hypothesis: random compositions of the elementwise functions and shifts a mod may use, traced
and evaluated from the IR, equal the same Python function called on broadcast tensors (what torch
computes), and their IR derivative equals autograd's."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcomp.derivative import score_derivative
from flexcomp.evaluate import evaluate
from flexcomp.ir import ModKind
from flexcomp.trace import trace

FLOAT_FNS = [
    ("gelu", F.gelu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")), ("silu", F.silu),
    ("softplus", lambda x: F.softplus(x, beta=2.0, threshold=3.0)), ("erf", torch.erf), ("atan", torch.atan),
    ("tanh", torch.tanh), ("log1p_abs", lambda x: torch.log1p(x.abs())), ("expm1", lambda x: torch.expm1(x * 0.25)),
    ("elu", F.elu), ("logsigmoid", F.logsigmoid), ("square", torch.square), ("mish", F.mish),
]
INT_FNS = [
    ("shl", lambda i: i << 2), ("shr", lambda i: i >> 1), ("mod", lambda i: i % 5), ("xor", lambda i: i ^ 3),
]
COMBINE = [("add", lambda a, b: a + b), ("mul", lambda a, b: a * b), ("max", torch.maximum),
           ("sub", lambda a, b: a - b)]


@st.composite
def expressions(draw, depth=3):
    """(description, fn(score, q, kv) -> float tensor)."""
    if depth == 0 or draw(st.booleans()) and depth < 3:
        leaf = draw(st.sampled_from(["score", "q", "kv", "intmix"]))
        if leaf == "score":
            return "s", lambda s, q, kv: s
        if leaf == "intmix":
            n1, f1 = draw(st.sampled_from(INT_FNS))
            n2, f2 = draw(st.sampled_from(INT_FNS))
            return f"({n1}(q) - {n2}(kv))", lambda s, q, kv: (f1(q) - f2(kv)).to(s.dtype) * 0.1
        # .to(score's dtype): the IR computes floats in the working float, as torch does at score's precision
        return leaf, (lambda s, q, kv: q.to(s.dtype) * 0.05) if leaf == "q" else (lambda s, q, kv: kv.to(s.dtype) * 0.05)
    if draw(st.booleans()):
        name, fn = draw(st.sampled_from(FLOAT_FNS))
        d, inner = draw(expressions(depth - 1))
        return f"{name}({d})", lambda s, q, kv: fn(inner(s, q, kv))
    name, fn = draw(st.sampled_from(COMBINE))
    (da, a), (db, b) = draw(expressions(depth - 1)), draw(expressions(depth - 1))
    return f"{name}({da}, {db})", lambda s, q, kv: fn(a(s, q, kv), b(s, q, kv))


@settings(max_examples=60, deadline=None)
@given(expressions(), st.integers(0, 2**16))
def test_random_compositions_trace_evaluate_and_differentiate(expr, seed):
    desc, body = expr

    def mod(score, b, h, q_idx, kv_idx):
        return score + body(score, q_idx, kv_idx)

    g = torch.Generator().manual_seed(seed)
    score = (torch.randn(1, 1, 7, 9, dtype=torch.float64, generator=g) * 2).requires_grad_()
    idx = {"b": torch.zeros(1, 1, 1, 1, dtype=torch.int32), "h": torch.zeros(1, 1, 1, 1, dtype=torch.int32),
           "q_idx": torch.arange(7, dtype=torch.int32).view(1, 1, -1, 1),
           "kv_idx": torch.arange(9, dtype=torch.int32).view(1, 1, 1, -1)}
    want = mod(score, idx["b"], idx["h"], idx["q_idx"].long(), idx["kv_idx"].long())
    tm = trace(mod, ModKind.SCORE)
    got = torch.broadcast_to(evaluate(tm.graph, {"score": score, **idx}, tm.buffers, tm.scalars, torch.float64),
                             score.shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{desc}\n{m}\n{tm.graph}")
    (dwant,) = torch.autograd.grad(want.sum(), score)
    d = score_derivative(tm.graph)
    dgot = torch.broadcast_to(evaluate(d, {"score": score.detach(), **idx}, tm.buffers, tm.scalars, torch.float64),
                              score.shape)
    torch.testing.assert_close(dgot, dwant, rtol=1e-8, atol=1e-10, msg=lambda m: f"{desc}\n{m}")
