"""Tests of flexcomp.trace: what the tracer records, and how it fails.

Every traced graph is checked by running it with :func:`flexcomp.evaluate.evaluate` on random
broadcast index tensors and comparing with a direct call of the user's function on the same
tensors. Error tests check that the message names the user's function, this file and the exact
line (found with ``inspect``, never hard-coded).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flexcomp.evaluate import evaluate
from flexcomp.ir import Const, DType, ModKind, Op
from flexcomp.masks import alibi, document_mask, padding_mask, sliding_window, softcap
from flexcomp.trace import trace

SCORE, MASK = ModKind.SCORE, ModKind.MASK

# shapes of the broadcast index tensors, and the ranges their random values are drawn from
B, H, Q, KV = 2, 3, 7, 9
NB, NH, NQ, NKV = 3, 4, 24, 24


def rand_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def idx(n, shape):
        return torch.randint(0, n, shape, generator=g, dtype=torch.int32)

    return {
        "score": torch.randn(B, H, Q, KV, generator=g, dtype=torch.float64) * 4,
        "b": idx(NB, (B, 1, 1, 1)),
        "h": idx(NH, (1, H, 1, 1)),
        "q_idx": idx(NQ, (1, 1, Q, 1)),
        "kv_idx": idx(NKV, (1, 1, 1, KV)),
    }


def call_user(fn, kind, ins):
    args = (ins["b"], ins["h"], ins["q_idx"], ins["kv_idx"])
    if kind is SCORE:
        args = (ins["score"],) + args
    return fn(*args)


def run_graph(tm, ins, buffers=None, scalars=None):
    return evaluate(tm.graph, ins, tm.buffers if buffers is None else buffers,
                    tm.scalars if scalars is None else scalars, float_dtype=torch.float64)


def full(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().broadcast_to((B, H, Q, KV))


def assert_traces_like_python(fn, kind, *, rtol=1e-7, atol=1e-7, varies=True, seeds=(0, 1, 2)):
    """Trace ``fn``; its graph must give what ``fn`` gives, on several random inputs."""
    tm = trace(fn, kind)
    seen = []
    for seed in seeds:
        ins = rand_inputs(seed)
        out = full(run_graph(tm, ins))
        ref = full(call_user(fn, kind, ins))
        if kind is MASK:
            assert out.dtype == torch.bool
            assert torch.equal(out, ref.to(torch.bool)), f"seed {seed}:\n{tm.graph}"
        else:
            assert out.dtype == torch.float64
            torch.testing.assert_close(out, ref.to(torch.float64), rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"seed {seed}: {m}\n{tm.graph}")
        seen.append(out.flatten())
    if varies:  # the comparison must not be vacuous
        assert torch.cat(seen).unique().numel() > 1
    return tm


def ops_of(g) -> list[Op]:
    return [n.op for n in g.nodes if n.op not in (Op.INPUT, Op.SCALAR)]


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------
SCORE_MODS = {
    "add": lambda score, b, h, q_idx, kv_idx: score + q_idx,
    "sub": lambda score, b, h, q_idx, kv_idx: score - kv_idx,
    "mul": lambda score, b, h, q_idx, kv_idx: score * (q_idx - kv_idx),
    "truediv": lambda score, b, h, q_idx, kv_idx: score / (kv_idx + 1),
    "int_truediv": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) / (kv_idx + 1),
    "int_floordiv": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) // 3,
    "int_floordiv_neg_divisor": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) // -3,
    "float_floordiv": lambda score, b, h, q_idx, kv_idx: score // 0.7,
    "int_mod": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) % 5,
    "int_mod_neg_divisor": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) % -4,
    "float_mod": lambda score, b, h, q_idx, kv_idx: score % 1.5,
    "pow_float": lambda score, b, h, q_idx, kv_idx: score ** 2,
    "pow_int": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) ** 2,
    "pow_fractional": lambda score, b, h, q_idx, kv_idx: abs(score) ** 0.5,
    "abs_builtin": lambda score, b, h, q_idx, kv_idx: abs(score) + abs(q_idx - kv_idx),
    "neg": lambda score, b, h, q_idx, kv_idx: -score + -(q_idx - kv_idx),
    "pos": lambda score, b, h, q_idx, kv_idx: +score,
    # Python numbers on either side
    "const_left_sub": lambda score, b, h, q_idx, kv_idx: score + (31 - q_idx),
    "const_left_mul_float": lambda score, b, h, q_idx, kv_idx: 2.0 * score,
    "const_left_add": lambda score, b, h, q_idx, kv_idx: 3 + score,
    "const_left_truediv": lambda score, b, h, q_idx, kv_idx: 1.0 / (abs(score) + 1),
    "const_left_floordiv": lambda score, b, h, q_idx, kv_idx: score + 50 // (kv_idx + 1),
    "const_left_mod": lambda score, b, h, q_idx, kv_idx: score + 7 % (kv_idx + 1),
    "const_left_pow": lambda score, b, h, q_idx, kv_idx: 2.0 ** (score / 4),
    "const_left_pow_int": lambda score, b, h, q_idx, kv_idx: score + 2 ** (q_idx % 5),
    "const_right_float_mul_int": lambda score, b, h, q_idx, kv_idx: score + q_idx * 0.25,
    # comparisons, in torch.where
    "cmp_gt": lambda score, b, h, q_idx, kv_idx: torch.where(score > 0.5, score, -score),
    "cmp_ge": lambda score, b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, score, float("-inf")),
    "cmp_lt": lambda score, b, h, q_idx, kv_idx: torch.where(q_idx < kv_idx, score, 2 * score),
    "cmp_le": lambda score, b, h, q_idx, kv_idx: torch.where(score <= kv_idx, score, 0.5),
    "cmp_eq": lambda score, b, h, q_idx, kv_idx: torch.where(q_idx % 3 == kv_idx % 3, score, score - 10),
    "cmp_ne": lambda score, b, h, q_idx, kv_idx: torch.where(q_idx != kv_idx, score, score * 3),
    "cmp_const_left": lambda score, b, h, q_idx, kv_idx: torch.where(5 < q_idx, score, -score),
    # bitwise on integers and bools
    "bit_and_or_xor": lambda score, b, h, q_idx, kv_idx: score + ((q_idx & 6) | (kv_idx ^ 3)),
    "bit_not_int": lambda score, b, h, q_idx, kv_idx: score + ~q_idx,
    "bit_const_left": lambda score, b, h, q_idx, kv_idx: score + (12 & kv_idx) + (1 | q_idx) + (5 ^ q_idx),
    "bool_arith": lambda score, b, h, q_idx, kv_idx: score + (q_idx > kv_idx) * 2.5 + (q_idx == kv_idx),
    # torch functions
    "where_int": lambda score, b, h, q_idx, kv_idx: score + torch.where(q_idx > kv_idx, q_idx, kv_idx),
    "where_mixed": lambda score, b, h, q_idx, kv_idx: torch.where(q_idx > kv_idx, score, q_idx),
    "exp": lambda score, b, h, q_idx, kv_idx: torch.exp(score / 4),
    "exp2": lambda score, b, h, q_idx, kv_idx: torch.exp2(score / 4),
    "log": lambda score, b, h, q_idx, kv_idx: torch.log(torch.abs(score) + 1),
    "log2": lambda score, b, h, q_idx, kv_idx: torch.log2(torch.abs(score) + 1),
    "sqrt": lambda score, b, h, q_idx, kv_idx: torch.sqrt(torch.abs(score)),
    "rsqrt": lambda score, b, h, q_idx, kv_idx: torch.rsqrt(torch.abs(score) + 1),
    "tanh": lambda score, b, h, q_idx, kv_idx: torch.tanh(score),
    "sigmoid": lambda score, b, h, q_idx, kv_idx: torch.sigmoid(score),
    "sin": lambda score, b, h, q_idx, kv_idx: torch.sin(score),
    "cos": lambda score, b, h, q_idx, kv_idx: torch.cos(score),
    "torch_abs": lambda score, b, h, q_idx, kv_idx: torch.abs(score) + torch.abs(q_idx - kv_idx),
    "sign": lambda score, b, h, q_idx, kv_idx: torch.sign(score) + torch.sign(q_idx - kv_idx),
    "clamp": lambda score, b, h, q_idx, kv_idx: torch.clamp(score, -1.0, 1.5),
    "clamp_min_kw": lambda score, b, h, q_idx, kv_idx: torch.clamp(score, min=0.0),
    "clamp_max_kw": lambda score, b, h, q_idx, kv_idx: torch.clamp(score, max=-0.5),
    "clamp_int": lambda score, b, h, q_idx, kv_idx: score + torch.clamp(q_idx - kv_idx, -4, 4),
    "minimum": lambda score, b, h, q_idx, kv_idx: torch.minimum(score, (q_idx - kv_idx) * 0.5),
    "maximum": lambda score, b, h, q_idx, kv_idx: torch.maximum(score, kv_idx / 8),
    "maximum_int": lambda score, b, h, q_idx, kv_idx: score + torch.maximum(q_idx, kv_idx),
    "floor": lambda score, b, h, q_idx, kv_idx: torch.floor(score),
    "ceil": lambda score, b, h, q_idx, kv_idx: torch.ceil(score),
    # tensor methods
    "method_abs": lambda score, b, h, q_idx, kv_idx: score.abs() + (q_idx - kv_idx).abs(),
    "method_to": lambda score, b, h, q_idx, kv_idx: score * (q_idx - kv_idx).to(torch.float32),
    "method_to_kw": lambda score, b, h, q_idx, kv_idx: score + (q_idx * 3).to(dtype=torch.float32),
    "method_to_int": lambda score, b, h, q_idx, kv_idx: (score * 3).to(torch.int32) + score,
    "method_float": lambda score, b, h, q_idx, kv_idx: score + q_idx.float() / (kv_idx.float() + 1),
    "method_clamp": lambda score, b, h, q_idx, kv_idx: score.clamp(-2.0, 2.0),
    "method_clamp_kw": lambda score, b, h, q_idx, kv_idx: score.clamp(min=-1.0) + score.clamp(max=0.5),
    "method_clamp_int": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx).clamp(0, 5),
    "method_exp_tanh": lambda score, b, h, q_idx, kv_idx: (score / 4).exp() + score.tanh(),
}


@pytest.mark.parametrize("name", sorted(SCORE_MODS))
def test_score_mod_operator(name):
    fn = SCORE_MODS[name]
    # int -> float casts of the direct call happen in float32 (torch's default), the graph's in f64
    assert_traces_like_python(fn, SCORE, rtol=1e-6, atol=1e-6)


MASK_MODS = {
    "ge": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
    "gt": lambda b, h, q_idx, kv_idx: q_idx > kv_idx,
    "le": lambda b, h, q_idx, kv_idx: q_idx <= kv_idx,
    "lt": lambda b, h, q_idx, kv_idx: q_idx < kv_idx,
    "eq": lambda b, h, q_idx, kv_idx: q_idx % 4 == kv_idx % 4,
    "ne": lambda b, h, q_idx, kv_idx: q_idx // 4 != kv_idx // 4,
    "const_left": lambda b, h, q_idx, kv_idx: (5 <= q_idx) & (12 > kv_idx),
    "const_left_arith": lambda b, h, q_idx, kv_idx: 31 - q_idx > kv_idx,
    "and": lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < 6),
    "or": lambda b, h, q_idx, kv_idx: (kv_idx < 4) | (q_idx >= kv_idx),
    "xor": lambda b, h, q_idx, kv_idx: (kv_idx < 10) ^ (q_idx >= kv_idx),
    "invert": lambda b, h, q_idx, kv_idx: ~(q_idx >= kv_idx) | (b == h),
    "int_bits": lambda b, h, q_idx, kv_idx: ((q_idx ^ kv_idx) & 1) == 0,
    "mixed_int_float": lambda b, h, q_idx, kv_idx: q_idx * 0.5 > kv_idx - 3,
    "uses_b_h": lambda b, h, q_idx, kv_idx: (q_idx + b) % 3 != (kv_idx + h) % 3,
    "torch_logical": lambda b, h, q_idx, kv_idx: torch.logical_and(q_idx >= kv_idx, torch.logical_not(b == 1)),
    "torch_where_bool": lambda b, h, q_idx, kv_idx: torch.where(b == 0, q_idx >= kv_idx, q_idx <= kv_idx),
}


@pytest.mark.parametrize("name", sorted(MASK_MODS))
def test_mask_mod_operator(name):
    assert_traces_like_python(MASK_MODS[name], MASK)


def test_operators_record_the_expected_ops():
    def mod(score, b, h, q_idx, kv_idx):
        x = (q_idx - kv_idx) // 3 % 5 * 2 + 1
        y = torch.exp(score) ** 2 / 3.0 - torch.sigmoid(score)
        return torch.where((x > 0) & ~(q_idx == kv_idx) | (b != h) ^ (h < 2), y, abs(-score))

    g = trace(mod, SCORE).graph
    ops = set(ops_of(g))
    assert {Op.FLOORDIV, Op.MOD, Op.EXP, Op.POW, Op.TRUEDIV, Op.SIGMOID, Op.SUB, Op.GT, Op.EQ, Op.NE,
            Op.LT, Op.AND, Op.OR, Op.XOR, Op.NOT, Op.WHERE, Op.ABS, Op.NEG} <= ops
    assert_traces_like_python(mod, SCORE, rtol=1e-6, atol=1e-6)


def test_constants_on_either_side_are_inline_constants():
    def mod(score, b, h, q_idx, kv_idx):
        return 2.0 * score + (31 - q_idx)

    g = trace(mod, SCORE).graph
    consts = {a.value for n in g.nodes for a in n.args if isinstance(a, Const)}
    assert 2.0 in consts and 31 in consts
    assert not g.buffers and not g.scalars
    # 2.0 * score is a float multiply by an inline 2.0; 31 - q_idx stays integer arithmetic
    # (canonicalized by flexcomp.symbolic to -q_idx + 31)
    assert str(g).splitlines()[1:] == [
        "  %0 = mul score, 2.0 : f32",
        "  %1 = neg q_idx : i32",
        "  %2 = add %1, 31 : i32",
        "  %3 = cast %2 : f32",
        "  %4 = add %0, %3 : f32",
        "  return %4",
    ]
    assert_traces_like_python(mod, SCORE)


def test_types_follow_torch_promotion():
    def mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx / 2) + (q_idx // 2) + (q_idx > kv_idx)

    g = trace(mod, SCORE).graph
    by_op = {n.op: n for n in g.nodes}
    assert by_op[Op.TRUEDIV].dtype is DType.F32  # int / int is a float
    assert by_op[Op.FLOORDIV].dtype is DType.I32
    assert by_op[Op.GT].dtype is DType.BOOL
    assert g.dtype_of(g.output) is DType.F32


# ---------------------------------------------------------------------------------------------
# captured tensors
# ---------------------------------------------------------------------------------------------
GLOBAL_BIAS = torch.randn(NH, NQ, dtype=torch.float64)


def _doc_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, 5, (n,), generator=g)).values.to(torch.int32)


def test_closure_tensor_indexed_by_q_idx():
    doc = _doc_ids(NQ, 0)

    def doc_mask(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    tm = assert_traces_like_python(doc_mask, MASK)
    assert [bs.name for bs in tm.graph.buffers] == ["doc"]  # one buffer, read twice
    assert tm.buffers[0] is doc
    assert sum(n.op is Op.LOAD for n in tm.graph.nodes) == 2


def test_closure_tensor_indexed_by_head_alibi():
    slopes = torch.rand(NH, dtype=torch.float64) + 0.1

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    tm = assert_traces_like_python(alibi_mod, SCORE)
    assert tm.buffers == (slopes,)
    (spec,) = tm.graph.buffers
    assert (spec.name, spec.dtype, spec.ndim, spec.storage) == ("slopes", DType.F32, 1, "float64")


def test_library_alibi_float32_slopes():
    assert_traces_like_python(alibi(NH), SCORE, rtol=1e-6, atol=1e-6)


def test_two_dim_table_with_relative_index():
    table = torch.randn(NH, 63, dtype=torch.float64)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 31]

    tm = assert_traces_like_python(rel_bias, SCORE)
    (load,) = [n for n in tm.graph.nodes if n.op is Op.LOAD]
    assert len(load.args) == 2 and load.attr == "table"


def test_lengths_indexed_by_batch():
    lengths = torch.tensor([3, 17, 11], dtype=torch.int64)

    def pad(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    tm = assert_traces_like_python(pad, MASK)
    assert tm.graph.buffers[0].dtype is DType.I64
    assert_traces_like_python(padding_mask([5, 20, 9]), MASK)


def test_several_dims_and_several_tensors():
    table = torch.randn(NH, 63, dtype=torch.float64)
    scale = torch.rand(NB, NH, dtype=torch.float32) + 0.5
    doc = torch.stack([_doc_ids(NQ, s) for s in range(NB)])  # [NB, NQ] int32
    allowed = torch.tensor([True, False, True, True])  # per head, bool storage

    def mod(score, b, h, q_idx, kv_idx):
        same = (doc[b, q_idx] == doc[b, kv_idx]) | ~allowed[h]
        biased = score * scale[b, h] + table[h, q_idx - kv_idx + 31]
        return torch.where(same, biased, -float("inf"))

    tm = assert_traces_like_python(mod, SCORE, rtol=1e-6, atol=1e-6)
    assert [(s.name, s.ndim, s.dtype) for s in tm.graph.buffers] == [
        ("doc", 2, DType.I32), ("allowed", 1, DType.BOOL), ("scale", 2, DType.F32), ("table", 2, DType.F32)]
    assert tm.buffers == (doc, allowed, scale, table)


def test_global_tensor():
    def global_bias(score, b, h, q_idx, kv_idx):
        return score + GLOBAL_BIAS[h, q_idx]

    tm = assert_traces_like_python(global_bias, SCORE)
    assert tm.buffers[0] is GLOBAL_BIAS
    assert tm.graph.buffers[0].name == "GLOBAL_BIAS"


def test_tensor_attribute_of_captured_object():
    class Holder:
        def __init__(self):
            self.bias = torch.randn(NQ, dtype=torch.float64)

    obj = Holder()

    def obj_bias(score, b, h, q_idx, kv_idx):
        return score + obj.bias[kv_idx]

    tm = assert_traces_like_python(obj_bias, SCORE)
    assert tm.buffers[0] is obj.bias
    key = tm.key
    obj.bias = torch.randn(NQ, dtype=torch.float64)  # a new tensor: a new value, the same structure
    tm2 = assert_traces_like_python(obj_bias, SCORE)
    assert tm2.buffers[0] is obj.bias and tm2.key == key


def test_tensor_attributes_of_captured_module():
    class RelBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(NH, 63, dtype=torch.float64))
            self.register_buffer("gain", torch.rand(NH, dtype=torch.float64) + 0.5)

    module = RelBias()

    def module_bias(score, b, h, q_idx, kv_idx):
        return score * module.gain[h] + module.table[h, q_idx - kv_idx + 31]

    tm = assert_traces_like_python(module_bias, SCORE)
    assert len(tm.buffers) == 2
    assert any(t is module.table for t in tm.buffers) and any(t is module.gain for t in tm.buffers)
    # the parameter is not baked: gradients reach it through the evaluated graph
    out = run_graph(tm, rand_inputs(0))
    out.sum().backward()
    assert module.table.grad is not None and module.table.grad.abs().sum() > 0


def test_zero_dim_captured_tensor():
    temperature = torch.tensor(0.75, dtype=torch.float64)

    def temp(score, b, h, q_idx, kv_idx):
        return score * temperature

    tm = assert_traces_like_python(temp, SCORE)
    assert tm.buffers == (temperature,) and tm.graph.buffers[0].ndim == 0


def test_tensor_in_captured_list():
    tables = [torch.randn(NQ, dtype=torch.float64), torch.randn(NKV, dtype=torch.float64)]

    def two_tables(score, b, h, q_idx, kv_idx):
        return score + tables[0][q_idx] - tables[1][kv_idx]

    tm = assert_traces_like_python(two_tables, SCORE)
    assert len(tm.buffers) == 2 and tm.buffers[0] is tables[0] and tm.buffers[1] is tables[1]


def test_library_document_mask():
    assert_traces_like_python(document_mask([3, 5, 7, 9]), MASK)
    doc_ids = torch.stack([_doc_ids(NQ, s) for s in range(NB)])
    assert_traces_like_python(document_mask(doc_ids=doc_ids), MASK)


def test_captured_tensor_is_a_buffer_not_baked_in():
    slopes = torch.rand(NH, dtype=torch.float64) + 0.1

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    tm = trace(alibi_mod, SCORE)
    # no slope value appears as a constant of the graph
    consts = {a.value for n in tm.graph.nodes for a in n.args if isinstance(a, Const)}
    assert not consts & set(slopes.tolist())
    ins = rand_inputs(3)
    before = run_graph(tm, ins).clone()

    slopes.mul_(3.0)  # same tensor, new values
    tm2 = trace(alibi_mod, SCORE)
    assert tm2.key == tm.key
    after = run_graph(tm2, ins)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(full(after), full(alibi_mod(ins["score"], ins["b"], ins["h"], ins["q_idx"], ins["kv_idx"])))
    # the first graph, given the new value as its buffer, gives the new result too
    torch.testing.assert_close(run_graph(tm, ins, buffers=(slopes,)), after)


def test_different_tensors_same_structure_same_key():
    def make(doc):
        def doc_mask(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]
        return doc_mask

    m1, m2 = make(_doc_ids(NQ, 1)), make(_doc_ids(NQ, 2))
    tm1, tm2 = assert_traces_like_python(m1, MASK), assert_traces_like_python(m2, MASK)
    assert tm1.key == tm2.key
    ins = rand_inputs(0)
    assert not torch.equal(full(run_graph(tm1, ins)), full(run_graph(tm2, ins)))
    # a different storage dtype is a different structure
    tm3 = trace(make(_doc_ids(NQ, 1).to(torch.int64)), MASK)
    assert tm3.key != tm1.key


# ---------------------------------------------------------------------------------------------
# captured Python numbers
# ---------------------------------------------------------------------------------------------
def test_sliding_window_scalar_not_baked():
    tm128, tm256 = trace(sliding_window(128), MASK), trace(sliding_window(256), MASK)
    assert tm128.key == tm256.key
    assert tm128.scalars == (128,) and tm256.scalars == (256,)
    assert [(c.name, c.dtype) for c in tm128.graph.scalars] == [("window", DType.I32)]
    assert str(tm128.graph) == str(tm256.graph)
    assert all(not (isinstance(a, Const) and a.value in (128, 256)) for n in tm128.graph.nodes for a in n.args)


def test_sliding_window_scalar_value_is_used():
    for w in (0, 3, 10):
        tm = assert_traces_like_python(sliding_window(w), MASK)
        assert tm.scalars == (w,)
    tm = trace(sliding_window(3), MASK)
    ins = rand_inputs(0)
    a = full(run_graph(tm, ins, scalars=(3,)))
    b = full(run_graph(tm, ins, scalars=(10,)))
    assert not torch.equal(a, b)
    assert torch.equal(b, full(call_user(sliding_window(10), MASK, ins)))


def test_softcap_scalar_not_baked():
    tm30, tm50 = trace(softcap(30.0), SCORE), trace(softcap(50.0), SCORE)
    assert tm30.key == tm50.key
    assert tm30.scalars == (30.0,) and tm50.scalars == (50.0,)
    assert [(c.name, c.dtype) for c in tm30.graph.scalars] == [("cap", DType.F32)]

    def big(seed):
        ins = rand_inputs(seed)
        ins["score"] = ins["score"] * 20  # large enough for the cap to matter
        return ins

    for cap in (3.0, 30.0):
        mod = softcap(cap)
        tm = trace(mod, SCORE)
        ins = big(1)
        torch.testing.assert_close(full(run_graph(tm, ins)), full(call_user(mod, SCORE, ins)))
    ins = big(2)
    assert not torch.allclose(run_graph(tm30, ins), run_graph(tm50, ins))


def test_user_closure_numbers_become_scalars():
    def make(shift, temp):
        def mod(score, b, h, q_idx, kv_idx):
            return score / temp + (q_idx - kv_idx + shift)
        return mod

    tm1 = assert_traces_like_python(make(3, 0.5), SCORE)
    tm2 = assert_traces_like_python(make(-7, 2.0), SCORE)
    assert tm1.key == tm2.key
    assert tm1.scalars == (3, 0.5) and tm2.scalars == (-7, 2.0)
    assert [c.dtype for c in tm1.graph.scalars] == [DType.I32, DType.F32]


def test_closure_int_in_range_is_baked_in():
    def make(n):
        def repeated(score, b, h, q_idx, kv_idx):
            out = score
            for i in range(n):
                out = out * 0.5 + (q_idx - kv_idx) * (i + 1)
            return out
        return repeated

    tm2 = assert_traces_like_python(make(2), SCORE)
    tm4 = assert_traces_like_python(make(4), SCORE)
    assert tm2.scalars == () and tm4.scalars == ()
    assert tm2.key != tm4.key  # the loop count is structure
    assert ops_of(tm4.graph).count(Op.MUL) > ops_of(tm2.graph).count(Op.MUL)


def test_closure_int_in_if_is_baked_in_and_others_stay_scalars():
    def make(n, cap):
        def mod(score, b, h, q_idx, kv_idx):
            if n > 0:
                return score * cap + n
            return score
        return mod

    tm = assert_traces_like_python(make(3, 2.5), SCORE)
    assert tm.scalars == (2.5,)  # n was baked, cap was not
    assert trace(make(3, 4.0), SCORE).key == tm.key
    tm0 = assert_traces_like_python(make(0, 2.5), SCORE, varies=True)
    assert tm0.key != tm.key


def test_trace_cache_keeps_no_captured_tensor_alive():
    import gc
    import weakref

    def make():
        bias = torch.randn(1000)

        def mod(score, b, h, q_idx, kv_idx):
            return score + bias[kv_idx]

        return mod, weakref.ref(bias)

    mod, ref = make()
    assert trace(mod, SCORE) is not None and trace(mod, SCORE).buffers[0] is ref()  # second call: a cache hit
    del mod
    gc.collect()
    assert ref() is None
