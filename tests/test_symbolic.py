"""Tests of flexcomp.symbolic: canonical integer arithmetic, and floats left alone."""
from __future__ import annotations

import random

import pytest
import sympy
import torch

from flexcomp.evaluate import evaluate
from flexcomp.ir import Const, DType, ModKind, Op, verify
from flexcomp.symbolic import canonicalize_int_arith, simplify, to_sympy
from flexcomp.trace import Tracer, trace

SCORE, MASK = ModKind.SCORE, ModKind.MASK
SCORE_HDR = "graph score_mod(score: f32, b: i32, h: i32, q_idx: i32, kv_idx: i32)"
MASK_HDR = "graph mask_mod(b: i32, h: i32, q_idx: i32, kv_idx: i32)"


def raw_graph(fn, kind):
    """The graph as recorded, before :func:`simplify` (folding and CSE only)."""
    g, _, _ = Tracer(fn, kind, set()).run()
    return g


def rand_inputs(seed, B=2, H=3, Q=6, KV=7, n=40):
    g = torch.Generator().manual_seed(seed)

    def idx(shape):
        return torch.randint(0, n, shape, generator=g, dtype=torch.int32)

    return {"score": torch.randn(B, H, Q, KV, generator=g, dtype=torch.float64) * 3,
            "b": idx((B, 1, 1, 1)), "h": idx((1, H, 1, 1)), "q_idx": idx((1, 1, Q, 1)), "kv_idx": idx((1, 1, 1, KV))}


def run(g, ins, buffers=(), scalars=()):
    out = evaluate(g, ins, buffers, scalars, float_dtype=torch.float64)
    return out.broadcast_to(ins["score"].shape)


def call(fn, kind, ins):
    args = (ins["b"], ins["h"], ins["q_idx"], ins["kv_idx"])
    out = fn(ins["score"], *args) if kind is SCORE else fn(*args)
    return torch.as_tensor(out).broadcast_to(ins["score"].shape)


def assert_same_values(fn, kind, *graphs, exact=False, seeds=(0, 1, 2)):
    for seed in seeds:
        ins = rand_inputs(seed)
        ref = call(fn, kind, ins)
        for g in graphs:
            out = run(g, ins)
            if kind is MASK or exact:
                assert torch.equal(out, ref.to(out.dtype)), str(g)
            else:
                torch.testing.assert_close(out, ref.to(torch.float64), msg=lambda m: f"{m}\n{g}")


# ---------------------------------------------------------------------------------------------
# one canonical form
# ---------------------------------------------------------------------------------------------
def rel_a(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx + 31)


def rel_b(score, b, h, q_idx, kv_idx):
    return score + (31 + q_idx - kv_idx)


def rel_c(score, b, h, q_idx, kv_idx):
    return score + (-(kv_idx - q_idx) + 31)


def rel_d(score, b, h, q_idx, kv_idx):
    return score + (31 - (kv_idx - q_idx))


REL = [rel_a, rel_b, rel_c, rel_d]
REL_PRINT = f"""\
{SCORE_HDR}:
  %0 = sub q_idx, kv_idx : i32
  %1 = add %0, 31 : i32
  %2 = cast %1 : f32
  %3 = add score, %2 : f32
  return %3"""


def test_equivalent_index_arithmetic_traces_to_one_graph():
    graphs = [trace(fn, SCORE).graph for fn in REL]
    assert {str(g) for g in graphs} == {REL_PRINT}
    assert len({g.structural_key() for g in graphs}) == 1
    for fn, g in zip(REL, graphs):
        assert_same_values(fn, SCORE, g, exact=True)


def test_canonicalize_int_arith_on_raw_graphs():
    raws = [raw_graph(fn, SCORE) for fn in REL]
    assert len({str(g) for g in raws}) > 1  # as written, they differ
    canon = [verify(canonicalize_int_arith(g)) for g in raws]
    assert {str(g) for g in canon} == {REL_PRINT}
    assert len({g.structural_key() for g in canon}) == 1
    for fn, raw, g in zip(REL, raws, canon):
        assert_same_values(fn, SCORE, raw, g, exact=True)


def test_relative_index_in_a_load_is_canonical():
    table = torch.randn(4, 80, dtype=torch.float64)

    def t1(score, b, h, q_idx, kv_idx):
        return score + table[h % 4, q_idx - kv_idx + 40]

    def t2(score, b, h, q_idx, kv_idx):
        return score + table[h % 4, 40 + q_idx - kv_idx]

    def t3(score, b, h, q_idx, kv_idx):
        return score + table[h % 4, -(kv_idx - q_idx) + 40]

    tms = [trace(f, SCORE) for f in (t1, t2, t3)]
    assert len({str(tm.graph) for tm in tms}) == 1 and len({tm.key for tm in tms}) == 1
    ins = rand_inputs(4)
    for f, tm in zip((t1, t2, t3), tms):
        torch.testing.assert_close(run(tm.graph, ins, tm.buffers), call(f, SCORE, ins), rtol=0, atol=0)


def test_expanded_polynomial():
    def poly(score, b, h, q_idx, kv_idx):
        return score + ((q_idx - kv_idx) * 2 - q_idx)

    g = trace(poly, SCORE).graph
    assert str(g) == f"""\
{SCORE_HDR}:
  %0 = mul kv_idx, 2 : i32
  %1 = sub q_idx, %0 : i32
  %2 = cast %1 : f32
  %3 = add score, %2 : f32
  return %3"""
    assert_same_values(poly, SCORE, g, raw_graph(poly, SCORE), exact=True)


def test_expanded_polynomial_mask():
    def poly(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) * 2 - q_idx >= 3

    g = trace(poly, MASK).graph
    assert str(g) == f"""\
{MASK_HDR}:
  %0 = mul kv_idx, 2 : i32
  %1 = sub q_idx, %0 : i32
  %2 = ge %1, 3 : bool
  return %2"""
    assert_same_values(poly, MASK, g)


def test_product_and_cancellation():
    def square(score, b, h, q_idx, kv_idx):
        return score + (q_idx + 1) * (q_idx - 1)

    g = trace(square, SCORE).graph  # q_idx**2 leaves int32 for long sequences: computed in int64, as torch
    assert str(g).splitlines()[1:4] == ["  %0 = cast q_idx : i64", "  %1 = mul %0, %0 : i64", "  %2 = sub %1, 1 : i64"]
    assert_same_values(square, SCORE, g, exact=True)

    def cancels(score, b, h, q_idx, kv_idx):
        return score + ((q_idx - kv_idx) + (kv_idx - q_idx) + 5)

    g = trace(cancels, SCORE).graph
    assert str(g) == f"{SCORE_HDR}:\n  %0 = add score, 5.0 : f32\n  return %0"

    def always(b, h, q_idx, kv_idx):
        return q_idx - q_idx == 0

    g = trace(always, MASK).graph
    assert g.output == Const(True, DType.BOOL)


def test_to_sympy_polynomial():
    def poly(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) * 2 - q_idx > 0

    g = raw_graph(poly, MASK)
    (gt,) = [n for n in g.nodes if n.op is Op.GT]
    e = to_sympy(g, gt.args[0])
    q = sympy.Symbol(f"x{g.kind.input_names.index('q_idx'):05d}", integer=True)
    kv = sympy.Symbol(f"x{g.kind.input_names.index('kv_idx'):05d}", integer=True)
    assert sympy.expand(e - (q - 2 * kv)) == 0


def test_simplify_is_idempotent_and_verified():
    def mod(b, h, q_idx, kv_idx):
        return 3 * (q_idx - 2 * kv_idx) - (q_idx + h) * (kv_idx - b) >= -(b * b) + 7

    g = trace(mod, MASK).graph
    assert str(simplify(g)) == str(g)
    assert str(canonicalize_int_arith(g)) == str(g)
    assert verify(g) is g
    assert_same_values(mod, MASK, g, raw_graph(mod, MASK))


# ---------------------------------------------------------------------------------------------
# floats are not reassociated
# ---------------------------------------------------------------------------------------------
def test_float_arithmetic_is_not_reassociated():
    def mod(score, b, h, q_idx, kv_idx):
        return (score + 1e16) - 1e16 + score * 2.0 * 3.0

    g = trace(mod, SCORE).graph
    assert str(g) == f"""\
{SCORE_HDR}:
  %0 = add score, 1e+16 : f32
  %1 = sub %0, 1e+16 : f32
  %2 = mul score, 2.0 : f32
  %3 = mul %2, 3.0 : f32
  %4 = add %1, %3 : f32
  return %4"""
    ins = rand_inputs(7)
    out = run(g, ins)
    assert torch.equal(out, call(mod, SCORE, ins))  # bit for bit: the same operations in the same order
    assert not torch.equal(out, ins["score"] + ins["score"] * 6.0)  # what reassociation would give


def test_float_cast_of_ints_is_a_leaf():
    def mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx.float() + kv_idx.float()) - kv_idx.float()

    g = trace(mod, SCORE).graph
    ops = [n.op for n in g.nodes if n.op not in (Op.INPUT, Op.SCALAR)]
    assert ops.count(Op.CAST) == 2 and ops.count(Op.ADD) == 2 and ops.count(Op.SUB) == 1
    assert all(n.dtype is DType.F32 for n in g.nodes if n.op in (Op.ADD, Op.SUB))
    assert_same_values(mod, SCORE, g)


def test_float_neg_is_untouched_int_inside_is_canonical():
    def mod(score, b, h, q_idx, kv_idx):
        return -(-score) + (31 - (kv_idx - q_idx)) * 0.5

    g = trace(mod, SCORE).graph
    assert str(g) == f"""\
{SCORE_HDR}:
  %0 = neg score : f32
  %1 = neg %0 : f32
  %2 = sub q_idx, kv_idx : i32
  %3 = add %2, 31 : i32
  %4 = cast %3 : f32
  %5 = mul %4, 0.5 : f32
  %6 = add %1, %5 : f32
  return %6"""
    assert_same_values(mod, SCORE, g, exact=True)


# ---------------------------------------------------------------------------------------------
# values: random integer expressions, and int32 wrap-around
# ---------------------------------------------------------------------------------------------
def _random_expr(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(["b", "h", "q_idx", "kv_idx", str(rng.randint(-9, 9))])
    op = rng.choice(["+", "-", "*", "neg"])
    if op == "neg":
        return f"(-{_random_expr(rng, depth - 1)})"
    return f"({_random_expr(rng, depth - 1)} {op} {_random_expr(rng, depth - 1)})"


def _random_mods(seed):
    rng = random.Random(seed)
    lhs, rhs = _random_expr(rng, 4), _random_expr(rng, 3)
    ns: dict = {}
    exec(f"def mask(b, h, q_idx, kv_idx):\n    return {lhs} >= {rhs}\n"
         f"def score_mod(score, b, h, q_idx, kv_idx):\n    return score + ({lhs}) * 0.5 - ({rhs})\n"
         # the same difference written two ways: equal polynomials
         f"def diff1(b, h, q_idx, kv_idx):\n    return ({lhs}) - ({rhs}) >= 0\n"
         f"def diff2(b, h, q_idx, kv_idx):\n    return -({rhs}) + ({lhs}) >= 0\n", ns)
    return ns


@pytest.mark.parametrize("seed", range(12))
def test_random_integer_expressions_keep_their_values(seed):
    ns = _random_mods(seed)
    for fn, kind in ((ns["mask"], MASK), (ns["score_mod"], SCORE)):
        raw = raw_graph(fn, kind)
        canon = verify(canonicalize_int_arith(raw))
        assert_same_values(fn, kind, raw, canon, trace(fn, kind).graph, seeds=(seed, seed + 100))


@pytest.mark.parametrize("seed", range(12))
def test_random_equal_polynomials_give_one_graph(seed):
    ns = _random_mods(seed)
    g1, g2 = trace(ns["diff1"], MASK).graph, trace(ns["diff2"], MASK).graph
    assert_same_values(ns["diff1"], MASK, g1, seeds=(seed,))
    assert_same_values(ns["diff2"], MASK, g2, seeds=(seed,))
    assert str(g1) == str(g2)
    assert g1.structural_key() == g2.structural_key()


def test_equal_polynomials_with_products_give_one_graph():
    # the monomials kv_idx*kv_idx and q_idx*q_idx must come out in one order however the sum is written
    def written_a(b, h, q_idx, kv_idx):
        return q_idx * q_idx - kv_idx * kv_idx >= 0

    def written_b(b, h, q_idx, kv_idx):
        return -(kv_idx * kv_idx) + q_idx * q_idx >= 0

    def written_c(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) * (q_idx + kv_idx) >= 0

    graphs = [trace(f, MASK).graph for f in (written_a, written_b, written_c)]
    for f, g in zip((written_a, written_b, written_c), graphs):
        assert_same_values(f, MASK, g)
    assert len({str(g) for g in graphs}) == 1, "\n".join(map(str, graphs))
    assert len({g.structural_key() for g in graphs}) == 1


def test_large_coefficients_fit_their_type_and_give_torchs_int64_result():
    # q_idx * 65536 * 65536 leaves int32: torch computes it on int64 indices (nonzero for q > 0), so
    # the graph is widened; no constant may exceed the range of its type
    def big(b, h, q_idx, kv_idx):
        return (q_idx * 65536) * 65536 + kv_idx == kv_idx

    g = trace(big, MASK).graph
    assert verify(g) is g and "i64" in str(g)
    for n in g.nodes:
        for a in n.args:
            if isinstance(a, Const) and a.dtype is DType.I32:
                assert -2**31 <= a.value < 2**31, str(g)
    for seed in (0, 1):
        ins = {k: v.long() if k != "score" else v for k, v in rand_inputs(seed).items()}
        assert torch.equal(run(g, rand_inputs(seed)), call(big, MASK, ins))


def test_summed_constants_past_int32_give_torchs_int64_result():
    def past(b, h, q_idx, kv_idx):
        return q_idx + 2147483647 + 1 < kv_idx  # torch's int64 indices: never true (int32 would wrap)

    g = trace(past, MASK).graph
    assert g.output == Const(False, DType.BOOL) or "i64" in str(g)
    for seed in (0, 1):
        ins = {k: v.long() if k != "score" else v for k, v in rand_inputs(seed).items()}
        assert torch.equal(run(g, rand_inputs(seed)), call(past, MASK, ins))
