"""Tests of flexcomp.ir and flexcomp.builder: printouts, folding, CSE, the verifier, keys, to_python."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flexcomp.builder import GraphBuilder, const
from flexcomp.errors import FlexcompIRError
from flexcomp.evaluate import evaluate
from flexcomp.ir import BufferSpec, Const, DType, ModKind, Node, Op, verify
from flexcomp.masks import (alibi, causal_mask, document_mask, padding_mask, prefix_lm, sliding_window,
                            softcap)
from flexcomp.trace import trace

SCORE, MASK = ModKind.SCORE, ModKind.MASK
SCORE_HDR = "graph score_mod(score: f32, b: i32, h: i32, q_idx: i32, kv_idx: i32)"
MASK_HDR = "graph mask_mod(b: i32, h: i32, q_idx: i32, kv_idx: i32)"


def rel_bias_mod(table):
    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 31]
    return rel_bias


def ops_of(g) -> list[Op]:
    return [n.op for n in g.nodes if n.op not in (Op.INPUT, Op.SCALAR)]


def rand_inputs(seed=0, B=2, H=4, Q=8, KV=8):
    g = torch.Generator().manual_seed(seed)
    return {
        "score": torch.randn(B, H, Q, KV, generator=g, dtype=torch.float64) * 3,
        "b": torch.randint(0, B, (B, 1, 1, 1), generator=g, dtype=torch.int32),
        "h": torch.randint(0, H, (1, H, 1, 1), generator=g, dtype=torch.int32),
        "q_idx": torch.randint(0, Q, (1, 1, Q, 1), generator=g, dtype=torch.int32),
        "kv_idx": torch.randint(0, KV, (1, 1, 1, KV), generator=g, dtype=torch.int32),
    }


def run(tm, ins):
    out = evaluate(tm.graph, ins, tm.buffers, tm.scalars, float_dtype=torch.float64)
    return out.detach().broadcast_to(ins["score"].shape)


# ---------------------------------------------------------------------------------------------
# pinned printouts
# ---------------------------------------------------------------------------------------------
def test_print_causal():
    assert str(trace(causal_mask, MASK).graph) == f"""\
{MASK_HDR}:
  %0 = ge q_idx, kv_idx : bool
  return %0"""


def test_print_sliding_window():
    assert str(trace(sliding_window(128), MASK).graph) == f"""\
{MASK_HDR} scalars(window: i32):
  %0 = ge q_idx, kv_idx : bool
  %1 = sub q_idx, kv_idx : i32
  %2 = le %1, window : bool
  %3 = and %0, %2 : bool
  return %3"""


def test_print_alibi():
    assert str(trace(alibi(8), SCORE).graph) == f"""\
{SCORE_HDR} buffers(slopes: f32[1]):
  %0 = load slopes[h] : f32
  %1 = sub kv_idx, q_idx : i32
  %2 = cast %1 : f32
  %3 = mul %0, %2 : f32
  %4 = add score, %3 : f32
  return %4"""


def test_print_softcap():
    assert str(trace(softcap(30.0), SCORE).graph) == f"""\
{SCORE_HDR} scalars(cap: f32):
  %0 = truediv score, cap : f32
  %1 = tanh %0 : f32
  %2 = mul cap, %1 : f32
  return %2"""


def test_print_relative_bias_table():
    assert str(trace(rel_bias_mod(torch.randn(8, 63)), SCORE).graph) == f"""\
{SCORE_HDR} buffers(table: f32[2]):
  %0 = sub q_idx, kv_idx : i32
  %1 = add %0, 31 : i32
  %2 = load table[h, %1] : f32
  %3 = add score, %2 : f32
  return %3"""


def test_print_document_mask():
    assert str(trace(document_mask([3, 5, 8]), MASK).graph) == f"""\
{MASK_HDR} buffers(doc: i32[1]):
  %0 = load doc[q_idx] : i32
  %1 = load doc[kv_idx] : i32
  %2 = eq %0, %1 : bool
  %3 = ge q_idx, kv_idx : bool
  %4 = and %2, %3 : bool
  return %4"""


def test_print_where_with_infinity_and_padding():
    lengths = torch.tensor([5, 7], dtype=torch.int64)

    def padded_causal(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx >= kv_idx) & (kv_idx < lengths[b]), score, -float("inf"))

    assert str(trace(padded_causal, SCORE).graph) == f"""\
{SCORE_HDR} buffers(lengths: i64[1]):
  %0 = ge q_idx, kv_idx : bool
  %1 = load lengths[b] : i64
  %2 = cast kv_idx : i64
  %3 = lt %2, %1 : bool
  %4 = and %0, %3 : bool
  %5 = where %4, score, -inf : f32
  return %5"""


def test_builder_docstring_example():
    gb = GraphBuilder(MASK, "causal")
    out = gb.binary(Op.GE, gb.inputs["q_idx"], gb.inputs["kv_idx"])
    g = verify(gb.finish(out))
    assert str(g) == f"{MASK_HDR}:\n  %0 = ge q_idx, kv_idx : bool\n  return %0"


# ---------------------------------------------------------------------------------------------
# CSE, constant folding, identities
# ---------------------------------------------------------------------------------------------
def test_cse_same_subexpression_twice_is_one_node():
    def mod(score, b, h, q_idx, kv_idx):
        return score * (q_idx - kv_idx) + (q_idx - kv_idx)

    g = trace(mod, SCORE).graph
    assert ops_of(g).count(Op.SUB) == 1
    assert ops_of(g).count(Op.CAST) == 1  # the cast of the shared value is shared too
    assert str(g) == f"""\
{SCORE_HDR}:
  %0 = sub q_idx, kv_idx : i32
  %1 = cast %0 : f32
  %2 = mul score, %1 : f32
  %3 = add %1, %2 : f32
  return %3"""


def test_cse_commutative_operands_and_loads():
    doc = torch.arange(16, dtype=torch.int32) // 4

    def mod(b, h, q_idx, kv_idx):
        return ((q_idx + kv_idx) % 3 == (kv_idx + q_idx) % 3) & (doc[q_idx] == doc[q_idx]) & (doc[q_idx] >= doc[kv_idx])

    g = trace(mod, MASK).graph
    # q_idx + kv_idx and kv_idx + q_idx are one node; doc[q_idx] read three times is one load
    assert str(g) == f"""\
{MASK_HDR} buffers(doc: i32[1]):
  %0 = add q_idx, kv_idx : i32
  %1 = mod %0, 3 : i32
  %2 = eq %1, %1 : bool
  %3 = load doc[q_idx] : i32
  %4 = eq %3, %3 : bool
  %5 = and %2, %4 : bool
  %6 = load doc[kv_idx] : i32
  %7 = ge %3, %6 : bool
  %8 = and %5, %7 : bool
  return %8"""


def test_constant_folding():
    def mod(score, b, h, q_idx, kv_idx):
        return (2 + 3) * score

    assert str(trace(mod, SCORE).graph) == f"{SCORE_HDR}:\n  %0 = mul score, 5.0 : f32\n  return %0"


def test_constant_folding_through_the_builder():
    gb = GraphBuilder(SCORE, "m")
    c = gb.binary(Op.MUL, gb.binary(Op.ADD, const(2), const(3)), const(4))
    assert c == Const(20, DType.I32)
    assert gb.binary(Op.TRUEDIV, const(1), const(4)) == Const(0.25, DType.F32)
    assert gb.binary(Op.FLOORDIV, const(-7), const(2)) == Const(-4, DType.I32)  # rounds towards -inf
    assert gb.binary(Op.MOD, const(-7), const(3)) == Const(2, DType.I32)  # sign of the divisor
    assert gb.binary(Op.LT, const(2), const(3)) == Const(True, DType.BOOL)
    assert gb.unary(Op.EXP, const(0.0)) == Const(1.0, DType.F32)
    assert gb.cast(const(2.7), DType.I32) == Const(2, DType.I32)
    # division by zero is left for run time, not folded into an exception
    z = gb.binary(Op.FLOORDIV, const(1), const(0))
    assert not isinstance(z, Const)
    assert gb.nodes == gb.nodes[:len(gb.inputs)] + [gb.nodes[z]]


def test_identities():
    def true_and(b, h, q_idx, kv_idx):
        return True & (q_idx >= kv_idx)

    def or_false(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | False

    def self_and(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx >= kv_idx)

    def double_not(b, h, q_idx, kv_idx):
        return ~~(q_idx >= kv_idx)

    causal = str(trace(causal_mask, MASK).graph)
    for mod in (true_and, or_false, self_and, double_not):
        assert str(trace(mod, MASK).graph) == causal, mod.__name__

    def true_or(b, h, q_idx, kv_idx):
        return True | (q_idx >= kv_idx)

    g = trace(true_or, MASK).graph
    assert g.output == Const(True, DType.BOOL) and ops_of(g) == []

    def arith_ids(score, b, h, q_idx, kv_idx):
        return (score * 1 + 0) / 1 - 0 + torch.where(q_idx >= 0, kv_idx, kv_idx) * 0.0

    g = trace(arith_ids, SCORE).graph
    assert Op.WHERE not in ops_of(g) and Op.TRUEDIV not in ops_of(g)
    assert ops_of(g).count(Op.ADD) == 1


def test_cse_keeps_plus_and_minus_zero_apart():
    # 1/(x*0.0) and 1/(x*-0.0) are +inf and -inf for x > 0: they are different values
    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, 1.0 / (score * 0.0), 1.0 / (score * -0.0))

    tm = trace(mod, SCORE)
    ins = rand_inputs(1)
    ins["score"] = ins["score"].abs() + 1
    ref = mod(ins["score"], ins["b"], ins["h"], ins["q_idx"], ins["kv_idx"]).broadcast_to(ins["score"].shape)
    assert (ref == -float("inf")).any()
    torch.testing.assert_close(run(tm, ins), ref)


def test_simplify_cache_keeps_plus_and_minus_zero_apart():
    # two mods of one name that differ only in the sign of a zero constant
    def f(score, b, h, q_idx, kv_idx):
        return 1.0 / (score * 0.0)

    g_plus = trace(f, SCORE).graph

    def f(score, b, h, q_idx, kv_idx):  # noqa: F811 - the same name on purpose
        return 1.0 / (score * -0.0)

    g_minus = trace(f, SCORE).graph
    assert "-0.0" not in str(g_plus)
    assert "-0.0" in str(g_minus)
    assert g_plus.structural_key() != g_minus.structural_key()


# ---------------------------------------------------------------------------------------------
# the verifier
# ---------------------------------------------------------------------------------------------
def _replace_node(g, i, **changes):
    nodes = list(g.nodes)
    nodes[i] = dataclasses.replace(nodes[i], **changes)
    return dataclasses.replace(g, nodes=tuple(nodes))


def _node(g, op):
    (n,) = [n for n in g.nodes if n.op is op]
    return n


def test_verifier_accepts_traced_graphs():
    for mod, kind in [(causal_mask, MASK), (sliding_window(4), MASK), (alibi(4), SCORE), (softcap(20.0), SCORE),
                      (rel_bias_mod(torch.randn(4, 63)), SCORE), (document_mask([2, 6]), MASK)]:
        g = trace(mod, kind).graph
        assert verify(g) is g


def test_verifier_forward_reference():
    g = trace(sliding_window(4), MASK).graph
    ge, sub = _node(g, Op.GE), _node(g, Op.SUB)
    assert sub.id > ge.id
    bad = _replace_node(g, ge.id, args=(ge.args[0], sub.id))  # ge uses a later node
    with pytest.raises(FlexcompIRError, match="not an earlier node"):
        verify(bad)
    own = _replace_node(g, sub.id, args=(sub.id, sub.args[1]))  # a node using itself
    with pytest.raises(FlexcompIRError, match="not an earlier node"):
        verify(own)


def test_verifier_wrong_output_dtype():
    g = trace(sliding_window(4), MASK).graph
    with pytest.raises(FlexcompIRError, match="output has type i32"):
        verify(dataclasses.replace(g, output=_node(g, Op.SUB).id))
    s = trace(alibi(4), SCORE).graph
    with pytest.raises(FlexcompIRError, match="must return f32"):
        verify(dataclasses.replace(s, output=Const(True, DType.BOOL)))
    with pytest.raises(FlexcompIRError, match="output has type i32"):
        verify(dataclasses.replace(s, output=_node(s, Op.SUB).id))


def test_verifier_load_with_wrong_number_of_indices():
    g = trace(rel_bias_mod(torch.randn(4, 63)), SCORE).graph
    load = _node(g, Op.LOAD)
    assert len(load.args) == 2
    with pytest.raises(FlexcompIRError, match="1 indices, buffer has 2 dims"):
        verify(_replace_node(g, load.id, args=load.args[:1]))
    with pytest.raises(FlexcompIRError, match="3 indices"):
        verify(_replace_node(g, load.id, args=load.args + (Const(0, DType.I32),)))
    with pytest.raises(FlexcompIRError, match="undeclared buffer"):
        verify(_replace_node(g, load.id, attr="nope"))
    with pytest.raises(FlexcompIRError, match="non-integer index"):
        verify(_replace_node(g, load.id, args=(load.args[0], Const(1.0, DType.F32))))


def test_verifier_binary_op_with_mismatched_operand_types():
    g = trace(alibi(4), SCORE).graph
    mul, sub = _node(g, Op.MUL), _node(g, Op.SUB)
    # skip the cast: f32 * i32
    with pytest.raises(FlexcompIRError, match="two operands of one type"):
        verify(_replace_node(g, mul.id, args=(mul.args[0], sub.id)))
    # an i32 constant added to the f32 score
    add = _node(g, Op.ADD)
    with pytest.raises(FlexcompIRError, match="two operands of one type"):
        verify(_replace_node(g, add.id, args=(add.args[0], Const(1, DType.I32))))


def test_verifier_other_invariants():
    g = trace(sliding_window(4), MASK).graph
    ge, sub, and_ = _node(g, Op.GE), _node(g, Op.SUB), _node(g, Op.AND)
    with pytest.raises(FlexcompIRError, match="ge gives i32"):
        verify(_replace_node(g, ge.id, dtype=DType.I32))
    with pytest.raises(FlexcompIRError, match="has id"):
        verify(_replace_node(g, sub.id, id=sub.id + 1))
    with pytest.raises(FlexcompIRError, match="and on floats"):
        verify(_replace_node(g, and_.id, args=(Const(1.0, DType.F32), Const(2.0, DType.F32)), dtype=DType.F32))
    with pytest.raises(FlexcompIRError, match="inputs"):
        verify(dataclasses.replace(g, kind=SCORE))
    s = trace(softcap(20.0), SCORE).graph
    tanh = _node(s, Op.TANH)
    with pytest.raises(FlexcompIRError, match="tanh needs f32 -> f32"):
        verify(_replace_node(s, tanh.id, args=(s.nodes[0].id + 1,)))  # tanh of b (i32)
    with pytest.raises(FlexcompIRError, match="scalar"):
        verify(dataclasses.replace(s, scalars=()))


def test_verifier_where_condition_must_be_bool():
    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, 0.0)

    g = trace(mod, SCORE).graph
    where = _node(g, Op.WHERE)
    with pytest.raises(FlexcompIRError, match="where needs"):
        verify(_replace_node(g, where.id, args=(2,) + where.args[1:]))  # condition q_idx (i32)


def test_replaced_graph_prints_its_own_nodes():
    # printing caches value names; a Graph made from it with dataclasses.replace must not reuse them
    g = trace(causal_mask, MASK).graph
    str(g)
    extra = Node(len(g.nodes), Op.NOT, DType.BOOL, (g.output,))
    g2 = dataclasses.replace(g, nodes=g.nodes + (extra,), output=extra.id)
    assert str(g2) == f"{MASK_HDR}:\n  %0 = ge q_idx, kv_idx : bool\n  %1 = not %0 : bool\n  return %1"
    # and a broken one reports a verifier error, not a KeyError from the printout
    bad = dataclasses.replace(g, nodes=g.nodes + (Node(len(g.nodes), Op.NOT, DType.I32, (g.output,)),),
                              output=len(g.nodes))
    with pytest.raises(FlexcompIRError):
        verify(bad)


# ---------------------------------------------------------------------------------------------
# structural keys
# ---------------------------------------------------------------------------------------------
def _biased_window_a(slopes, window):
    def first_name(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx <= window, score + slopes[h] * (kv_idx - q_idx), -float("inf"))
    return first_name


def _biased_window_b(per_head, w):
    def other_name(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx <= w, score + per_head[h] * (kv_idx - q_idx), -float("inf"))
    return other_name


def test_structural_key_ignores_names_and_values():
    tm_a = trace(_biased_window_a(torch.rand(4), 16), SCORE)
    tm_b = trace(_biased_window_b(torch.rand(4) + 3, 99), SCORE)
    assert tm_a.graph.fn_name != tm_b.graph.fn_name
    assert [b.name for b in tm_a.graph.buffers] != [b.name for b in tm_b.graph.buffers]
    assert [c.name for c in tm_a.graph.scalars] != [c.name for c in tm_b.graph.scalars]
    assert str(tm_a.graph) != str(tm_b.graph)
    assert tm_a.key == tm_b.key == tm_a.graph.structural_key()


def test_structural_key_renamed_graph_directly():
    g = trace(_biased_window_a(torch.rand(4), 16), SCORE).graph
    renamed = dataclasses.replace(
        g, fn_name="zzz",
        buffers=(dataclasses.replace(g.buffers[0], name="q"),),
        nodes=tuple(dataclasses.replace(n, attr="q") if n.op is Op.LOAD else n for n in g.nodes))
    assert renamed.structural_key() == g.structural_key()


def test_structural_key_sees_structure():
    base = trace(rel_bias_mod(torch.randn(4, 63)), SCORE).key

    def shifted(table):
        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + 32]
        return rel_bias

    def swapped(table):
        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + 31]
        return rel_bias

    def multiplied(table):
        def rel_bias(score, b, h, q_idx, kv_idx):
            return score * table[h, q_idx - kv_idx + 31]
        return rel_bias

    others = [
        trace(shifted(torch.randn(4, 63)), SCORE).key,
        trace(swapped(torch.randn(4, 63)), SCORE).key,
        trace(multiplied(torch.randn(4, 63)), SCORE).key,
        trace(rel_bias_mod(torch.randn(4, 63, dtype=torch.float64)), SCORE).key,  # storage dtype
        trace(rel_bias_mod(torch.randint(0, 5, (4, 63))), SCORE).key,  # integer buffer
    ]
    assert len({base, *others}) == len(others) + 1
    assert trace(causal_mask, MASK).key != trace(prefix_lm(0), MASK).key


# ---------------------------------------------------------------------------------------------
# to_python round trip
# ---------------------------------------------------------------------------------------------
def _round_trip(tm):
    src = tm.graph.to_python()
    ns = {"torch": torch}
    exec(compile(src, "<to_python>", "exec"), ns)
    rebuilt = ns["make"](*tm.buffers, *tm.scalars)
    return trace(rebuilt, tm.graph.kind), src


def _padded_causal(lengths):
    def padded_causal(score, b, h, q_idx, kv_idx):
        ok = (q_idx >= kv_idx) & (kv_idx < lengths[b])
        return torch.where(ok, torch.tanh(score / 5.0) * 5.0 - (q_idx // 2) % 3, -float("inf"))
    return padded_causal


def _everything(score, b, h, q_idx, kv_idx):
    x = torch.maximum(score, -score / 2).abs() ** 2 + torch.sign(score) * torch.exp2(-torch.abs(score))
    y = torch.minimum(q_idx, kv_idx) - torch.maximum(q_idx // 2, kv_idx % 3)
    z = torch.sqrt(torch.abs(score) + 1) + torch.rsqrt(torch.abs(score) + 1) + torch.log(score * score + 1)
    ok = ((q_idx ^ kv_idx) & 1 == 0) | ~(b != h)
    return torch.where(ok, x + y / 4, z + torch.floor(score) - torch.ceil(score) + torch.sigmoid(score))


def _clamp_constant(score, b, h, q_idx, kv_idx):
    return score.clamp(-3.0, 3.0) + torch.clamp(q_idx, max=9)


ROUND_TRIP = {
    "causal": lambda: (causal_mask, MASK),
    "sliding_window": lambda: (sliding_window(128), MASK),
    "prefix_lm": lambda: (prefix_lm(5), MASK),
    "alibi": lambda: (alibi(8), SCORE),
    "softcap": lambda: (softcap(30.0), SCORE),
    "relative_bias": lambda: (rel_bias_mod(torch.randn(4, 63)), SCORE),
    "document": lambda: (document_mask([3, 5, 8]), MASK),
    "document_per_batch": lambda: (document_mask(doc_ids=torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])), MASK),
    "padding": lambda: (padding_mask([3, 5]), MASK),
    "padded_causal_i64": lambda: (_padded_causal(torch.tensor([5, 7])), SCORE),
    "everything": lambda: (_everything, SCORE),
    "clamp_constant": lambda: (_clamp_constant, SCORE),
    "document_no_inner": lambda: (document_mask([3, 5], inner=None), MASK),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_to_python_round_trip(name):
    mod, kind = ROUND_TRIP[name]()
    tm = trace(mod, kind)
    tm2, src = _round_trip(tm)
    assert tm2.key == tm.key, src
    assert str(tm2.graph) == str(tm.graph), src
    assert tm2.scalars == tm.scalars
    assert len(tm2.buffers) == len(tm.buffers) and all(a is b for a, b in zip(tm2.buffers, tm.buffers))


def test_dead_loads_leave_no_buffers():
    # document_mask(inner=None) computes document-local indices from `start` and then ignores them
    tm = trace(document_mask([3, 5], inner=None), MASK)
    assert str(tm.graph) == f"""\
{MASK_HDR} buffers(doc: i32[1]):
  %0 = load doc[q_idx] : i32
  %1 = load doc[kv_idx] : i32
  %2 = eq %0, %1 : bool
  return %2"""
    assert len(tm.buffers) == 1


def test_to_python_round_trip_evaluates_the_same():
    tm = trace(_everything, SCORE)
    tm2, _ = _round_trip(tm)
    ins = rand_inputs(5)
    torch.testing.assert_close(run(tm2, ins), run(tm, ins))
    ref = _everything(ins["score"], ins["b"], ins["h"], ins["q_idx"], ins["kv_idx"])
    torch.testing.assert_close(run(tm, ins), ref.broadcast_to(ins["score"].shape), rtol=1e-6, atol=1e-6)


def test_to_python_round_trip_zero_dim_buffer():
    temperature = torch.tensor(0.5)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * temperature

    tm = trace(scaled, SCORE)
    assert tm.graph.buffers == (BufferSpec("temperature", DType.F32, 0, "float32"),)
    tm2, src = _round_trip(tm)
    assert tm2.key == tm.key and str(tm2.graph) == str(tm.graph), src


def test_to_python_round_trip_lambda():
    mod = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < 8)  # noqa: E731
    tm = trace(mod, MASK)
    tm2, src = _round_trip(tm)
    assert tm2.key == tm.key and str(tm2.graph) == str(tm.graph), src


def test_uses_input_names_what_the_mod_reads_or_returns():
    mask = trace(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, ModKind.MASK).graph
    assert [n for n in ("b", "h", "q_idx", "kv_idx") if mask.uses_input(n)] == ["q_idx", "kv_idx"]
    score = trace(lambda score, b, h, q_idx, kv_idx: score, ModKind.SCORE).graph  # returned, not read
    assert [n for n in ("score", "b", "h", "q_idx", "kv_idx") if score.uses_input(n)] == ["score"]
