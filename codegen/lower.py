"""Lowering: an IR graph becomes the source of one small ``@triton.jit`` function.

Every mod, whatever it captures, gets one signature, so the kernels call it the same way::

    score_mod_<name>_<key>(score, b, h, q_idx, kv_idx, BUFS, STRIDES, SIZES, SCALARS_I, SCALARS_F)
    mask_mod_<name>_<key>(b, h, q_idx, kv_idx, BUFS, STRIDES, SIZES, SCALARS_I, SCALARS_F)

``score``, ``q_idx`` and ``kv_idx`` are tiles (``[BLOCK_M, 1]`` / ``[1, BLOCK_N]`` indices), ``b`` and
``h`` scalars. ``BUFS`` is a tuple of pointers to the captured tensors; ``STRIDES`` and ``SIZES``
are flat tuples, each buffer's dims at the offsets :class:`LoweredMod` records; captured numbers are
read from two small device tensors (``SCALARS_I`` int64, ``SCALARS_F`` float32, or float64 for a
float64 mod), so their values never enter a compiled kernel's specialisation. Loads are masked to
each buffer's extent: no index a mod computes can read outside a captured tensor.

Two switches make variants of one graph, each its own function (name and cache key):

- :class:`FloatType`: the Triton type of the IR's working float ``f32`` (float32; float64 for
  float64 inputs, where float constants are formed as float64 tensors too, never rounded to float32);
- ``checked``: before each load, every index is compared with its dim (``ops.check_index``) and any
  index outside ``[-size, size)`` is written into an int64 error tensor passed as the last pointer of
  ``BUFS`` (one slot per load and dim, :class:`LoadCheck`), so the launcher raises IndexError as torch
  would. Used when ``flexcomp.ranges`` cannot prove every index in range.

One line of Triton per IR node, each commented with the node it comes from.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from flexcomp.errors import FlexcompError
from flexcomp.ir import Const, DType, Graph, ModKind, Node, Op

_TL_TYPES = {DType.BOOL: "tl.int1", DType.I32: "tl.int32", DType.I64: "tl.int64", DType.F32: "tl.float32"}

_BINARY = {
    Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})", Op.TRUEDIV: "({0} / {1})",
    Op.EQ: "({0} == {1})", Op.NE: "({0} != {1})", Op.LT: "({0} < {1})", Op.LE: "({0} <= {1})",
    Op.GT: "({0} > {1})", Op.GE: "({0} >= {1})", Op.AND: "({0} & {1})", Op.OR: "({0} | {1})",
    Op.XOR: "({0} ^ {1})",
}
_UNARY = {
    Op.NEG: "(-{0})", Op.ABS: "tl.abs({0})", Op.EXP: "tl.exp({0})", Op.EXP2: "tl.exp2({0})",
    Op.LOG: "tl.log({0})", Op.LOG2: "tl.log2({0})", Op.SQRT: "tl.sqrt_rn({0})", Op.RSQRT: "tl.rsqrt({0})",
    Op.TANH: "ops.tanh({0})", Op.SIGMOID: "tl.sigmoid({0})", Op.SIN: "tl.sin({0})", Op.COS: "tl.cos({0})",
    Op.SIGN: "ops.sign({0})", Op.FLOOR: "tl.floor({0})", Op.CEIL: "tl.ceil({0})",
    Op.TAN: "ops.tan({0})", Op.ATAN: "ops.atan({0})", Op.ERF: "tl.erf({0})", Op.LOG1P: "ops.log1p({0})",
    Op.EXPM1: "ops.expm1({0})",
}
_SHIFT = {Op.SHL: "shl", Op.SHR: "shr"}  # ops.shl / ops.shr: torch's results for any shift count


class CodegenError(FlexcompError):
    """A mod uses something the Triton code generator cannot lower (names the op and the mod)."""


class FloatType(enum.Enum):
    """The Triton type that the IR's working float ``f32`` lowers to (the value) and the suffix of the
    function's name (float32 keeps the plain name)."""

    F32 = "tl.float32"
    F64 = "tl.float64"

    @property
    def suffix(self) -> str:
        return "" if self is FloatType.F32 else "_f64"


class CheckKind(enum.Enum):
    """What a checked mod's error slot watches."""

    INDEX = "index"  # an index of a load, against its dim (torch: IndexError)
    DIVISOR = "divisor"  # the divisor of an integer // or % (torch: RuntimeError('ZeroDivisionError'))


@dataclass(frozen=True)
class LoadCheck:
    """One slot of a checked mod's error tensor: dim ``dim`` of the load ``node`` (its IR line) from
    captured tensor ``buffer`` (the name in the graph); or, for ``kind`` DIVISOR, the divisor of the
    integer division ``node`` (``buffer`` empty, ``dim`` -1)."""

    buffer: str
    dim: int
    node: str
    kind: CheckKind = CheckKind.INDEX


@dataclass(frozen=True)
class LoweredMod:
    """The generated source of one mod and how to pass its captured values.

    Fields:
        name: the function's name, ``<kind>_<fn name>_<structural key>``.
        source: a whole Python module defining the ``@triton.jit`` function.
        graph: the IR it was generated from.
        stride_offsets: for each buffer, where its dims start in ``STRIDES`` / ``SIZES``.
        int_scalars, float_scalars: for each of ``graph.scalars``, its slot in ``SCALARS_I`` or
            ``SCALARS_F`` (-1 when it lives in the other one).
        float_type: what ``f32`` became.
        checks: a checked mod's error-tensor slots, in order (empty when unchecked).
    """

    name: str
    source: str
    graph: Graph
    stride_offsets: tuple[int, ...]
    int_scalars: tuple[int, ...]
    float_scalars: tuple[int, ...]
    float_type: FloatType = FloatType.F32
    checks: tuple[LoadCheck, ...] = ()


def _const(c: Const, ft: FloatType = FloatType.F32) -> str:
    """A literal; float64 mods get float constants as float64 scalars (Triton forms a bare Python
    float as float32 where no float64 operand decides its type, e.g. in ``tl.maximum``)."""
    if c.dtype is DType.F32:
        v = float(c.value)
        lit = f'float("{v}")' if math.isnan(v) or math.isinf(v) else repr(v)
        return lit if ft is FloatType.F32 else f"tl.full([], {lit}, {ft.value})"
    return repr(c.value)


def _pow(g: Graph, n: Node, a: str, exp) -> str:
    """``a ** c`` for a constant integer c (repeated products) or 0.5 (sqrt); nothing else."""
    if isinstance(exp, Const) and float(exp.value).is_integer() and abs(exp.value) <= 16:
        e = int(exp.value)
        if e < 0 and n.dtype.is_int:
            raise CodegenError(f"{g.kind.value} {g.fn_name!r}: '{g.format_node(n)}' raises an integer to a negative "
                               f"power, which torch refuses too; convert to float first (.float())")
        if e == 0:
            return f"(1 + tl.zeros_like({a}))"  # 1 even for inf and nan, as torch
        prod = " * ".join([a] * abs(e))
        return f"({prod})" if e > 0 else f"(1.0 / ({prod}))"
    if isinstance(exp, Const) and exp.value == 0.5 and n.dtype is DType.F32:
        return f"tl.sqrt_rn({a})"
    raise CodegenError(
        f"{g.kind.value} {g.fn_name!r}: '{g.format_node(n)}' raises to a non-constant or fractional power, "
        "which the Triton backend does not lower; write torch.exp(b * torch.log(a)) (for a > 0), or a "
        "constant integer exponent")


def _body(g: Graph, lowered: "_Layout", names: dict | None = None) -> list[str]:
    """One line per node; ``names`` (filled in) maps node ids to the Triton variables."""
    names = {} if names is None else names
    lines: list[str] = []

    def arg(a) -> str:
        return _const(a, lowered.float_type) if isinstance(a, Const) else names[a]

    n_values = 0  # v0, v1, ...: one per node (check lines take none)

    for n in g.nodes:
        if n.op is Op.INPUT:
            names[n.id] = n.attr
            continue
        var = f"v{n_values}"
        n_values += 1
        a = [arg(x) for x in n.args]
        if a and all(isinstance(x, Const) for x in n.args):  # left unfolded (e.g. 1 // 0): compute on the device
            a[0] = f"tl.full([], {_const(n.args[0])}, {lowered.tl(g.dtype_of(n.args[0]))})"
        ts = [g.dtype_of(x) for x in n.args]
        if n.op is Op.SCALAR:
            slot = lowered.scalar_slot[n.attr]
            expr = (f"tl.load(SCALARS_F + {slot})" if n.dtype is DType.F32
                    else f"tl.load(SCALARS_I + {slot}).to({_TL_TYPES[n.dtype]})")
        elif n.op is Op.LOAD:
            lines += _checks(g, lowered, n, a)
            expr = _load(lowered, n, a)
        elif n.op is Op.CAST:
            expr = f"({a[0]} != 0)" if n.dtype is DType.BOOL else f"{a[0]}.to({lowered.tl(n.dtype)})"
        elif n.op is Op.WHERE:
            expr = f"tl.where({a[0]}, {a[1]}, {a[2]})"
        elif n.op in _BINARY:
            expr = _BINARY[n.op].format(*a)
        elif n.op in (Op.FLOORDIV, Op.MOD):
            if not ts[0].is_float:
                lines += _divisor_check(g, lowered, n, a[1])
            fn = {Op.FLOORDIV: "floordiv", Op.MOD: "pymod"}[n.op] + ("_f" if ts[0].is_float else "")
            expr = f"ops.{fn}({a[0]}, {a[1]})"
        elif n.op is Op.POW:
            expr = _pow(g, n, a[0], n.args[1])
        elif n.op in _SHIFT:
            c = n.args[1]
            bits = 32 if n.dtype is DType.I32 else 64
            if isinstance(n.args[0], Const):  # a typed scalar: ops.shl/shr need a dtype
                a[0] = f"tl.full([], {a[0]}, {_TL_TYPES[n.dtype]})"
            if isinstance(c, Const) and 0 <= c.value < bits:
                expr = f"({a[0]} {'<<' if n.op is Op.SHL else '>>'} {a[1]})"
            else:
                expr = f"ops.{_SHIFT[n.op]}({a[0]}, {a[1]}, {bits})"
        elif n.op in (Op.MINIMUM, Op.MAXIMUM):
            fn = "tl.minimum" if n.op is Op.MINIMUM else "tl.maximum"
            nan = ", propagate_nan=tl.PropagateNan.ALL" if ts[0].is_float else ""
            expr = f"{fn}({a[0]}, {a[1]}{nan})"
        elif n.op is Op.NOT:
            expr = f"({a[0]} == 0)" if ts[0] is DType.BOOL else f"(~{a[0]})"
        elif n.op in _UNARY:
            expr = _UNARY[n.op].format(*a)
        else:  # pragma: no cover - the verifier admits no other op
            raise CodegenError(f"{g.kind.value} {g.fn_name!r}: cannot lower '{g.format_node(n)}'")
        lines.append(f"    {var} = {expr}  # {g.format_node(n)}")
        names[n.id] = var
    return lines


def _returns(g: Graph, names: dict, ft: "FloatType" = FloatType.F32) -> str:
    outs = []
    for a in g.outputs:
        out = _const(a, ft) if isinstance(a, Const) else names[a]
        if g.kind is ModKind.SCORE:
            if isinstance(a, Const) or not _depends_on(g, a, "score"):
                out = f"({out} + tl.zeros_like(score))"  # a full tile, whatever the mod reads
        elif isinstance(a, Const):  # a constant mask, as a full [BLOCK_M, BLOCK_N] tile
            out = "((q_idx >= 0) & (kv_idx >= 0))" if a.value else "((q_idx >= 0) & (kv_idx < 0))"
        outs.append(out)
    return f"    return {', '.join(outs)}"


def _depends_on(g: Graph, a, name: str) -> bool:
    stack, seen = [a], set()
    while stack:
        i = stack.pop()
        if isinstance(i, Const) or i in seen:
            continue
        seen.add(i)
        n = g.nodes[i]
        if n.op is Op.INPUT and n.attr == name:
            return True
        stack += list(n.args)
    return False


def _load(lowered: "_Layout", n: Node, a: list[str]) -> str:
    """A masked gather: negative indices count from the end (as torch's indexing); indices still
    outside the tensor read 0 and are never dereferenced. The launcher runs such a function only
    where ``flexcomp.ranges`` proved every index in range; elsewhere the checked variant
    (:func:`_checks`) reports them first."""
    j = lowered.buffer_index[n.attr]
    if not a:
        return f"tl.load(BUFS[{j}]){lowered.load_cast[n.attr]}"
    off, mask = _address(lowered, j, a, "STRIDES")
    return f"tl.load(BUFS[{j}] + {off}, mask={mask}, other=0){lowered.load_cast[n.attr]}"


def _checks(g: Graph, lowered: "_Layout", n: Node, a: list[str]) -> list[str]:
    """In a checked mod, one ``ops.check_index`` line per index of load ``n``, each with its own slot
    of the error tensor (``BUFS[-1]``, recorded in ``lowered.checks``); nothing otherwise."""
    if not lowered.checked:
        return []
    j = lowered.buffer_index[n.attr]
    s = lowered.stride_offsets[j]
    err = len(lowered.buffer_index)
    lines = []
    for d, x in enumerate(a):
        slot = len(lowered.checks)
        lowered.checks.append(LoadCheck(n.attr, d, g.format_node(n)))
        lines.append(f"    ops.check_index({x}, SIZES[{s + d}], BUFS[{err}], {slot})  # {n.attr} dim {d}")
    return lines


def _divisor_check(g: Graph, lowered: "_Layout", n: Node, divisor: str) -> list[str]:
    """In a checked mod, an ``ops.check_divisor`` line before integer division ``n``: a zero divisor
    is recorded in its slot (integer division by zero has no value; torch raises)."""
    if not lowered.checked:
        return []
    slot = len(lowered.checks)
    lowered.checks.append(LoadCheck("", -1, g.format_node(n), CheckKind.DIVISOR))
    return [f"    ops.check_divisor({divisor}, BUFS[{len(lowered.buffer_index)}], {slot})  # {n.op.value} divisor"]


def _address(lowered: "_Layout", j: int, a: list[str], strides: str) -> tuple[str, str]:
    """Element offset into buffer ``j`` at indices ``a`` (negatives wrapped) and the in-range mask."""
    s = lowered.stride_offsets[j]
    idx = [f"ops.wrap_index({x}, SIZES[{s + d}])" for d, x in enumerate(a)]
    off = " + ".join(f"{x} * {strides}[{s + d}]" for d, x in enumerate(idx))
    mask = " & ".join(f"ops.in_range({x}, SIZES[{s + d}])" for d, x in enumerate(a))
    return off, mask


@dataclass
class _Layout:
    buffer_index: dict
    stride_offsets: tuple
    scalar_slot: dict
    load_cast: dict
    int_scalars: tuple
    float_scalars: tuple
    float_type: FloatType = FloatType.F32
    checked: bool = False
    checks: list = field(default_factory=list)  # filled in by _checks

    def tl(self, dtype: DType) -> str:
        """The Triton type of IR type ``dtype`` in this variant."""
        return self.float_type.value if dtype is DType.F32 else _TL_TYPES[dtype]


def _layout(g: Graph, ft: FloatType = FloatType.F32, checked: bool = False) -> _Layout:
    offsets, k = [], 0
    for b in g.buffers:
        offsets.append(k)
        k += max(1, b.ndim)
    slots: dict[str, int] = {}
    n_int = n_float = 0
    for c in g.scalars:
        if c.dtype is DType.F32:
            slots[c.name], n_float = n_float, n_float + 1
        else:
            slots[c.name], n_int = n_int, n_int + 1
    ints = tuple(slots[c.name] if c.dtype is not DType.F32 else -1 for c in g.scalars)
    floats = tuple(slots[c.name] if c.dtype is DType.F32 else -1 for c in g.scalars)
    # bool tensors are passed as int8 views; everything else converts to its IR type
    fts = {DType.F32: ft.value}
    cast = {b.name: (" != 0" if b.dtype is DType.BOOL else f".to({fts.get(b.dtype) or _TL_TYPES[b.dtype]})")
            for b in g.buffers}
    return _Layout({b.name: i for i, b in enumerate(g.buffers)}, tuple(offsets), slots, cast, ints, floats, ft,
                   checked)


def function_name(g: Graph, ft: FloatType = FloatType.F32, checked: bool = False) -> str:
    """``score_mod_<fn>_<key>``, or ``score_grad_<fn>_<key>`` for a graph that also returns derivatives;
    ``_f64`` for float64 mods, ``_checked`` for checked ones."""
    kind = "score_grad" if g.extra_outputs else g.kind.value
    return f"{kind}_{g.fn_name}_{g.structural_key()}{ft.suffix}{'_checked' if checked else ''}"


_MOD_PARAMS = "b, h, q_idx, kv_idx, BUFS, STRIDES, SIZES, SCALARS_I, SCALARS_F"


def _module(g: Graph, name: str, params: str, body: list[str], what: str) -> str:
    ir = "\n".join("# " + line for line in str(g).splitlines())
    return "\n".join([
        f'"""flexcomp generated {what} of {g.kind.value} {g.fn_name!r}, structural key {g.structural_key()}."""',
        ir,
        "import triton",
        "import triton.language as tl",
        "",
        "from flexcomp.codegen import ops",
        "",
        "",
        "@triton.jit",
        f"def {name}({params}):",
        *body,
        "",
    ])


def lower(g: Graph, ft: FloatType = FloatType.F32, checked: bool = False) -> LoweredMod:
    """Generate the Triton source of ``g`` (``ft``: what ``f32`` becomes; ``checked``: report
    out-of-range indices, see the module's docstring).

    >>> from flexcomp.trace import trace
    >>> from flexcomp.masks import causal_mask
    >>> print(lower(trace(causal_mask, ModKind.MASK).graph).source.split("@triton.jit")[1].strip())
    def mask_mod_causal_mask_...(b, h, q_idx, kv_idx, BUFS, STRIDES, SIZES, SCALARS_I, SCALARS_F):
        v0 = (q_idx >= kv_idx)  # %0 = ge q_idx, kv_idx : bool
        return v0
    """
    lay = _layout(g, ft, checked)
    name = function_name(g, ft, checked)
    params = ("score, " if g.kind is ModKind.SCORE else "") + _MOD_PARAMS
    names: dict = {}
    body = _body(g, lay, names) + [_returns(g, names, ft)]
    what = ("value and derivatives" if g.extra_outputs else "code") + (" with index checks" if checked else "")
    return LoweredMod(name, _module(g, name, params, body, what), g, lay.stride_offsets, lay.int_scalars,
                      lay.float_scalars, ft, tuple(lay.checks))


class Reduce(enum.IntEnum):
    """How a captured-tensor gradient is summed in a tile before its atomic add, by what its
    index depends on (see ``ops.scatter_grad``)."""

    NONE = 0  # on (q_idx and kv_idx): one atomic per pair
    ALL = 1  # on b and h only: one atomic per tile
    PER_Q = 2  # on b, h, q_idx: one per query row
    PER_KV = 3  # on b, h, kv_idx: one per key


def _reduce_kind(g: Graph, load: Node) -> Reduce:
    if any(_depends_on(g, a, "score") for a in load.args):  # an index computed from the score: per pair
        return Reduce.NONE
    on_q = any(_depends_on(g, a, "q_idx") for a in load.args)
    on_kv = any(_depends_on(g, a, "kv_idx") for a in load.args)
    return {(False, False): Reduce.ALL, (True, False): Reduce.PER_Q, (False, True): Reduce.PER_KV}.get(
        (on_q, on_kv), Reduce.NONE)


def gathers_per_pair(g: Graph) -> bool:
    """Whether ``g`` reads a captured tensor at an index that differs pair by pair (a bias table
    indexed by query and key): such mods favour narrower forward tiles (``launch.forward_config``)."""
    return any(_reduce_kind(g, n) is Reduce.NONE for n in g.nodes if n.op is Op.LOAD)


def lower_scatter(g: Graph, grad_buffers: tuple[str, ...], ft: FloatType = FloatType.F32) -> LoweredMod:
    """The gradient scatter of score_mod ``g`` into its captured tensors named in ``grad_buffers``.

    For each float load of those tensors, ``grad * d score_mod / d load`` (derived by
    :func:`flexcomp.derivative.value_and_derivatives`, sharing the forward nodes) is added into
    ``GRADS[buffer]`` at the load's own (wrapped) index, for the ``valid`` pairs, by
    ``ops.scatter_grad`` (atomics, or the two deterministic passes; ``MODE``)::

        score_scatter_<fn>_<key>(score, grad, valid, <mod args>, GRADS, GSTRIDES, AUX, Q_AXIS, MODE)

    ``GSTRIDES`` are the gradient buffers' strides, flat as ``STRIDES``; ``AUX`` one float32 per
    buffer (largest contribution, then the fixed-point scale); ``Q_AXIS`` the tile axis of queries.
    ``ft``: the working float (float64 for float64 inputs: contributions and atomics in float64).
    """
    from flexcomp.derivative import float_loads, value_and_derivatives

    loads = tuple(n for n in float_loads(g) if n.attr in grad_buffers)
    joint = value_and_derivatives(g, loads)
    joint_loads = [n for n in float_loads(joint) if n.attr in grad_buffers]
    if len(joint_loads) != len(loads):  # pragma: no cover - re-emission keeps every load
        raise CodegenError(f"score_mod {g.fn_name!r}: loads changed while deriving {[str(n) for n in loads]}")
    lay = _layout(joint, ft)
    tag = "_".join(str(lay.buffer_index[b]) for b in grad_buffers)
    name = f"score_scatter_{g.fn_name}_{g.structural_key()}_{tag}{ft.suffix}"
    params = f"score, grad, valid, {_MOD_PARAMS}, GRADS, GSTRIDES, AUX, Q_AXIS: tl.constexpr, MODE: tl.constexpr"
    names: dict = {}
    body = _body(joint, lay, names)
    for load, d in zip(joint_loads, joint.extra_outputs[1:]):  # extra_outputs[0] is d / d score
        j = lay.buffer_index[load.attr]
        idx = [_const(x) if isinstance(x, Const) else names[x] for x in load.args]
        off, inb = _address(lay, j, idx, "GSTRIDES") if idx else ("0", "(b >= 0)")
        dval = _const(d, ft) if isinstance(d, Const) else names[d]
        body.append(f"    ops.scatter_grad(GRADS[{j}], {off}, {inb}, grad * {dval}, valid, AUX + {j}, "
                    f"REDUCE={int(_reduce_kind(joint, load))}, Q_AXIS=Q_AXIS, MODE=MODE)"
                    f"  # d/d {joint.format_node(load)}")
    return LoweredMod(name, _module(joint, name, params, body, "gradient scatter"), joint, lay.stride_offsets,
                      lay.int_scalars, lay.float_scalars, ft)
