"""Tests of flexcomp.ir_ops: one row per op, rows that agree with their family, the verifier per
signature, constant folding against torch, and interval rules that hold at sampled points."""
from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import flexcomp
from flexcomp import ir_ops
from flexcomp import ir_rules as R
from flexcomp.builder import GraphBuilder
from flexcomp.errors import FlexcompIRError
from flexcomp.evaluate import torch_dtype
from flexcomp.ir import Const, DType, Graph, ModKind, Node, verify
from flexcomp.ir_ops import OPS, PER_DIM, Family, Op, OpInfo, Signature

BOOL, I32, I64, F32 = DType.BOOL, DType.I32, DType.I64, DType.F32
COMPUTED = [info for info in OPS.values() if not info.family.structural]
FOLDED = [info for info in OPS.values() if info.fold is not None]

SIGNATURES_OF = {  # what signature each family's ops may have
    Family.INPUT: {Signature.LEAF}, Family.SCALAR: {Signature.LEAF}, Family.LOAD: {Signature.INDEX},
    Family.CAST: {Signature.ANY_TO_ANY}, Family.WHERE: {Signature.SELECT},
    Family.ARITH: {Signature.SAME, Signature.FLOAT}, Family.COMPARE: {Signature.SAME_TO_BOOL},
    Family.LOGIC: {Signature.BITS}, Family.SHIFT: {Signature.INT}, Family.MINMAX: {Signature.SAME},
    Family.UNARY: {Signature.SAME, Signature.BITS}, Family.FLOAT_UNARY: {Signature.FLOAT},
}
NEVER_FLOAT = {Signature.SAME_TO_BOOL, Signature.BITS, Signature.INT}  # results of these are never f32


def ids(infos):
    """Test ids: the ops' printed names."""
    return [info.op.value for info in infos]


# ---- the table ------------------------------------------------------------------------------------
def test_every_op_has_exactly_one_row():
    assert set(OPS) == set(Op)
    assert len(ir_ops._ROWS) == len(Op)
    assert all(key is info.op and isinstance(info, OpInfo) for key, info in OPS.items())
    with pytest.raises(TypeError):
        OPS[Op.ADD] = OPS[Op.SUB]  # read-only
    with pytest.raises(ValueError, match="two rows"):
        ir_ops._index(ir_ops._ROWS + (OPS[Op.ADD],))
    with pytest.raises(ValueError, match="no row"):
        ir_ops._index(ir_ops._ROWS[1:])


@pytest.mark.parametrize("info", OPS.values(), ids=ids(OPS.values()))
def test_row_agrees_with_its_family(info: OpInfo):
    fam = info.family
    assert info.arity == fam.arity
    assert info.signature in SIGNATURES_OF[fam]
    if fam.structural:  # each stage handles leaves and loads itself
        assert (info.fold, info.torch_fn, info.python, info.interval) == (None, None, None, None)
        assert info.derivative is ir_ops.d_zero  # constant, unless it is the seed
        assert not info.dunders and not info.reflected_dunders
        return
    assert info.python is not None and info.interval is not None  # explicitly R.unknown where unbounded
    assert (info.torch_fn is None) == (fam is Family.CAST)  # a cast needs the target dtype: evaluate does it
    assert (info.fold is None) == (fam in (Family.CAST, Family.WHERE))  # the builder simplifies those itself
    args = [f"a{i}" for i in range(info.arity)]
    rendered = info.python.format(*args, dtype="torch.int32")
    assert all(a in rendered for a in args)
    # a rule exactly for ops that can give a float (d_zero where piecewise constant)
    assert (info.derivative is None) == (info.signature in NEVER_FLOAT)
    if info.commutative:
        assert info.arity == 2
    if info.transcendental:
        assert info.signature is Signature.FLOAT or info.op is Op.POW
    if fam is Family.FLOAT_UNARY:
        assert info.transcendental and info.python == f"torch.{info.torch_fn.__name__}({{0}})"


def test_dunders_are_unique_and_paired():
    names = [n for info in OPS.values() for n in info.dunders + info.reflected_dunders]
    assert len(names) == len(set(names))
    for info in OPS.values():
        assert all(n.startswith("__") and n.endswith("__") for n in info.dunders + info.reflected_dunders)
        if info.reflected_dunders:
            assert info.arity == 2
            assert info.reflected_dunders == tuple("__r" + n[2:] for n in info.dunders)
        if info.dunders:
            assert info.arity in (1, 2)
    assert OPS[Op.SHR].dunders == ("__rshift__",) and OPS[Op.SHR].reflected_dunders == ("__rrshift__",)


def test_proxy_binds_the_rows_dunders():
    from flexcomp.proxy import Proxy

    for info in OPS.values():
        for name in info.dunders + info.reflected_dunders:
            assert getattr(Proxy, name).__name__ == name


def test_ir_does_not_import_the_stages():
    # the registry and the IR import nothing above them (evaluate, builder, sparsity, ...)
    root = os.path.dirname(os.path.dirname(os.path.abspath(flexcomp.__file__)))
    code = ("import sys, types\n"
            f"pkg = types.ModuleType('flexcomp'); pkg.__path__ = [{os.path.dirname(flexcomp.__file__)!r}]\n"
            "sys.modules['flexcomp'] = pkg\n"
            "import flexcomp.ir\n"
            "print(sorted(m for m in sys.modules if m.startswith('flexcomp.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["['flexcomp.errors',", "'flexcomp.ir',", "'flexcomp.ir_ops',", "'flexcomp.ir_rules']"]


# ---- the verifier, per signature ------------------------------------------------------------------
def _graph_with(op: Op, dtype: DType, arg_types: list[DType]) -> Graph:
    """A mask graph whose one computed node applies ``op`` to literals of ``arg_types``."""
    value = {BOOL: True, I32: 3, I64: 3, F32: 1.5}
    inputs = tuple(Node(i, Op.INPUT, I32, (), name) for i, name in enumerate(ModKind.MASK.input_names))
    node = Node(len(inputs), op, dtype, tuple(Const(value[t], t) for t in arg_types))
    return Graph(ModKind.MASK, "m", inputs + (node,), (), (), Const(True, BOOL))


def _cases(info: OpInfo) -> tuple[list, list]:
    """(accepted, rejected) lists of (result type, operand types) for an op, from its signature."""
    sig, n = info.signature, info.arity
    if sig is Signature.SELECT:
        return [(F32, [BOOL, F32, F32]), (I32, [BOOL, I32, I32])], \
            [(F32, [I32, F32, F32]), (F32, [BOOL, F32, I32]), (I32, [BOOL, F32, F32]), (F32, [BOOL, F32])]
    if sig is Signature.ANY_TO_ANY:
        return [(F32, [I32]), (BOOL, [F32]), (I64, [BOOL])], [(F32, [I32, I32]), (F32, [])]
    accepted = [t for t in (BOOL, I32, I64, F32) if sig.accepts(t)]
    refused = [t for t in (BOOL, I32, I64, F32) if not sig.accepts(t)]
    t = accepted[-1]
    good = [(sig.result(u), [u] * n) for u in accepted]
    wrong_result = BOOL if sig.result(t) is not BOOL else I32
    bad = [(wrong_result, [t] * n), (sig.result(t), [t] * (n + 1))]
    bad += [(sig.result(u), [u] * n) for u in refused]
    if n == 2:
        bad.append((sig.result(t), [t, BOOL if t is not BOOL else I32]))
    return good, bad


@pytest.mark.parametrize("info", COMPUTED, ids=ids(COMPUTED))
def test_verifier_checks_the_signature(info: OpInfo):
    good, bad = _cases(info)
    for dtype, types in good:
        g = _graph_with(info.op, dtype, types)
        assert verify(g) is g
    for dtype, types in bad:
        with pytest.raises(FlexcompIRError, match=info.op.value):
            verify(_graph_with(info.op, dtype, types))


def test_signature_types():
    assert [s.accepts(F32) for s in (Signature.SAME, Signature.BITS, Signature.INT, Signature.FLOAT)] == \
        [True, False, False, True]
    assert not Signature.INT.accepts(BOOL) and Signature.BITS.accepts(BOOL) and not Signature.FLOAT.accepts(I32)
    assert Signature.SAME_TO_BOOL.result(F32) is BOOL and Signature.SAME.result(I64) is I64
    assert PER_DIM == OPS[Op.LOAD].arity


# ---- folding agrees with torch ----------------------------------------------------------------------
DRAW_TYPES = {  # operand types the builder folds, per signature
    Signature.SAME: (I32, I64, F32), Signature.SAME_TO_BOOL: (BOOL, I32, F32), Signature.BITS: (BOOL, I32, I64),
    Signature.INT: (I32, I64), Signature.FLOAT: (F32,),
}
SPECIAL_FLOATS = (0.0, -0.0, 0.5, 1.0, 2.0, -3.0, math.inf, -math.inf, math.nan)


def _draw(r: random.Random, t: DType, op: Op, position: int):
    """A literal of type ``t``: small, special or extreme."""
    if t is BOOL:
        return r.random() < 0.5
    if t.is_int:
        if op in (Op.SHL, Op.SHR) and position == 1:
            return r.randint(-2, 70)  # shift counts, also past the width
        bits = 32 if t is I32 else 64
        return r.choice([r.randint(-9, 9), r.randint(-9, 9), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, r.randint(-999, 999)])
    return r.choice([r.uniform(-4.0, 4.0), r.uniform(-4.0, 4.0), r.choice(SPECIAL_FLOATS)])


def _same(x, y) -> bool:
    """Equal numbers (floats to 1e-12, nan equal to nan)."""
    if isinstance(x, float) or isinstance(y, float):
        x, y = float(x), float(y)
        return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-12)
    return x == y


@pytest.mark.parametrize("info", FOLDED, ids=ids(FOLDED))
def test_folding_agrees_with_torch(info: OpInfo):
    r = random.Random(info.op.value)
    types = DRAW_TYPES[info.signature]
    folded = 0
    for _ in range(60):
        t = r.choice(types)
        values = [_draw(r, t, info.op, i) for i in range(info.arity)]
        out_t = info.signature.result(t)
        got = GraphBuilder(ModKind.SCORE, "f").emit(info.op, out_t, tuple(Const(v, t) for v in values))
        if not isinstance(got, Const):
            continue  # left for run time (x // 0, log of a negative, a negative shift count, ...)
        folded += 1
        want = info.torch_fn(*(torch.tensor(v, dtype=torch_dtype(t, torch.float64)) for v in values))
        assert got.dtype is out_t
        assert _same(got.value, want.item()), f"{info.op.value}{tuple(values)}: folded {got.value}, torch {want.item()}"
        if info.commutative:
            assert _same(info.fold(*values), info.fold(*reversed(values)))
    assert folded >= 20


# ---- interval rules hold at sampled points ------------------------------------------------------------
def _points(r: random.Random, t: DType, op: Op, position: int) -> list:
    """A few sorted values of one operand (one: a literal, for the operands rules need literal)."""
    if t is BOOL:
        return r.choice([[False], [True], [False, True]])
    if t.is_int:
        if op in (Op.SHL, Op.SHR, Op.FLOORDIV, Op.MOD) and position == 1:
            return [r.choice([1, 2, 3, 5, -4])]  # literal: the rules bound these only then
        lo = r.randint(-20, 20)
        return sorted({lo, lo + r.randint(0, 9), r.randint(lo, lo + 9)})
    lo = r.uniform(-3.0, 3.0)
    return sorted({lo, lo + r.uniform(0.0, 2.0), r.uniform(lo, lo + 2.0)})


def _check_bounds(info: OpInfo, out_t: DType, types: list[DType], pts: list[list]):
    """The op's value at every combination of points lies in its rule's bounds from the points' hulls."""
    like = torch.zeros((), dtype=torch.float64)
    xs = tuple(R.Interval(like + min(map(float, p)), like + max(map(float, p))) for p in pts)
    consts = tuple(p[0] if len(p) == 1 and i > 0 else None for i, p in enumerate(pts))
    bound = info.interval(R.IntervalArgs(xs, consts, out_t, tuple(types), like))
    for combo in itertools.product(*pts):
        args = [torch.tensor(v, dtype=torch_dtype(t, torch.float64)) for v, t in zip(combo, types)]
        try:
            v = args[0].to(torch_dtype(out_t, torch.float64)) if info.family is Family.CAST else info.torch_fn(*args)
        except RuntimeError:  # integers to negative powers: an error in torch, no value to bound
            continue
        v = float(v)
        if not math.isnan(v):
            assert float(bound.lo) <= v <= float(bound.hi), f"{info.op.value}{combo} = {v} outside [{bound.lo}, {bound.hi}]"


@pytest.mark.parametrize("info", COMPUTED, ids=ids(COMPUTED))
def test_interval_rule_holds_at_sampled_points(info: OpInfo):
    r = random.Random("iv" + info.op.value)
    for _ in range(25):
        if info.signature is Signature.SELECT:
            t = r.choice((I32, F32))
            out_t, types = t, [BOOL, t, t]
        elif info.signature is Signature.ANY_TO_ANY:
            types, out_t = [r.choice((BOOL, I32, F32))], r.choice((BOOL, I32, I64, F32))
        else:
            t = r.choice([u for u in DRAW_TYPES[info.signature] if u is not I64])
            out_t, types = info.signature.result(t), [t] * info.arity
        _check_bounds(info, out_t, types, [_points(r, u, info.op, i) for i, u in enumerate(types)])
