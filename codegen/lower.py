"""Lowering: an IR graph becomes the source of one small ``@triton.jit`` function.

Every mod, whatever it captures, gets one signature::

    score_mod_<name>_<key>(score, b, h, q_idx, kv_idx, BUFS, STRIDES, SIZES, SCALARS_I, SCALARS_F)
    mask_mod_<name>_<key>(b, h, q_idx, kv_idx, BUFS, STRIDES, SIZES, SCALARS_I, SCALARS_F)

``score``, ``q_idx`` and ``kv_idx`` are tiles (``[BLOCK_M, 1]`` / ``[1, BLOCK_N]`` indices), ``b`` and
``h`` scalars. ``BUFS`` is a tuple of pointers to the captured tensors; ``STRIDES`` and ``SIZES``
are flat tuples, each buffer's dims at the offsets :class:`LoweredMod` records; captured numbers are
read from two small device tensors (``SCALARS_I`` int64, ``SCALARS_F`` float32, or float64 for a
float64 mod), so their values never enter a compiled kernel's specialisation. Loads are masked to
each buffer's extent: no index a mod computes can read outside a captured tensor.

The kernels pass each mod ONE flat tuple (:func:`flat_args`: the pointers, the strides, the sizes,
the two scalar tensors); :func:`entry` renders the small function that unpacks it, ``<name>_args``,
which the kernels call (Triton takes flat tuples of arguments on the GPU, not nested ones).

Each op renders through one row of :data:`TRITON` (``tests/test_codegen.py`` checks that every IR
op has one); the op's other facts live in :data:`flexcomp.ir_ops.OPS`.

Two switches make variants of one graph, each its own function (name and cache key):

- :class:`FloatType`: the Triton type of the IR's working float ``f32`` (float32; float64 for
  float64 inputs, where float constants are formed as float64 tensors too, never rounded to float32),
  and for 16-bit inputs ``tanh`` (soft-capping, ``gelu(approximate="tanh")``, ``mish``) as one
  hardware instruction (``F32_APPROX``: its relative error, 2**-11, is about the inputs' rounding;
  soft-capping runs about twice as fast);
- ``checked``: before each load, every index is compared with its dim (``ops.check_index``) and any
  index outside ``[-size, size)`` is written into an int64 error tensor passed after the pointers in
  ``BUFS`` (one slot per load and dim, :class:`LoadCheck`), so the launcher raises IndexError as torch
  would. Used when ``flexcomp.ranges`` cannot prove every index in range.

One line of Triton per IR node, each commented with the node it comes from.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from flexcomp.errors import FlexcompError
from flexcomp.ir import Const, DType, Graph, ModKind, Node, Op
from flexcomp.plan import Reduce, depends_on, gathers_per_pair, reduce_kind

__all__ = ["TRITON", "FloatType", "CheckKind", "LoadCheck", "LoweredMod", "CodegenError", "lower", "lower_scatter",
           "function_name", "Reduce", "gathers_per_pair"]

_TL_TYPES = {DType.BOOL: "tl.int1", DType.I32: "tl.int32", DType.I64: "tl.int64", DType.F32: "tl.float32"}
_SHIFT_BITS = {DType.I32: 32, DType.I64: 64}


class CodegenError(FlexcompError):
    """A mod uses something the Triton code generator cannot lower (names the op and the mod)."""


class FloatType(enum.Enum):
    """The Triton type that the IR's working float ``f32`` lowers to, how ``tanh`` is computed, and the
    suffix of the function's name (float32 keeps the plain name)."""

    F32 = ("tl.float32", "")  # float32 inputs: libdevice's tanh (error about 1 ulp)
    F32_APPROX = ("tl.float32", "_approx")  # 16-bit inputs: the hardware's tanh (``ops.tanh_approx``)
    F64 = ("tl.float64", "_f64")  # float64 inputs

    @property
    def tl(self) -> str:
        """The Triton type of ``f32``."""
        return self.value[0]

    @property
    def suffix(self) -> str:
        return self.value[1]


class CheckKind(enum.Enum):
    """What a checked mod's error slot watches."""

    INDEX = "index"  # an index of a load, against its dim (torch: IndexError)
    DIVISOR = "divisor"  # the divisor of an integer // or % (torch: RuntimeError('ZeroDivisionError'))


@dataclass(frozen=True)
class LoadCheck:
    """One slot of a checked mod's error tensor: dim ``dim`` of the load ``node`` (its IR line) from
    captured tensor ``buffer`` (the name in the graph); or, for ``kind`` DIVISOR, the divisor of the
    integer division ``node`` (``buffer`` empty, ``dim`` -1).

    ``position`` (the tensor's place among the mod's captures) and ``node_id`` say the same by
    structure: a generated function serves every mod of its structure, whatever its names, so an
    error names what the mod that ran calls them."""

    buffer: str
    dim: int
    node: str
    kind: CheckKind = CheckKind.INDEX
    position: int = -1
    node_id: int = -1


@dataclass(frozen=True)
class LoweredMod:
    """The generated source of one mod and how to pass its captured values.

    Fields:
        name: the function's name, ``<kind>_<fn name>_<structural key>``.
        source: a whole Python module defining the ``@triton.jit`` function.
        graph: the IR it was generated from.
        stride_offsets: for each buffer, where its dims start among the strides (and the sizes) in ``BUFS``.
        int_scalars, float_scalars: for each of ``graph.scalars``, its slot in ``SCALARS_I`` or
            ``SCALARS_F`` (-1 when it lives in the other one).
        float_type: what ``f32`` became.
        checks: a checked mod's error-tensor slots, in order (empty when unchecked).
        checked: the checked variant (its error tensor follows the buffers' pointers).
    """

    name: str
    source: str
    graph: Graph
    stride_offsets: tuple[int, ...]
    int_scalars: tuple[int, ...]
    float_scalars: tuple[int, ...]
    float_type: FloatType = FloatType.F32
    checks: tuple[LoadCheck, ...] = ()
    checked: bool = False


def _const(c: Const, ft: FloatType = FloatType.F32) -> str:
    """A literal; float64 mods get float constants as float64 scalars (Triton forms a bare Python
    float as float32 where no float64 operand decides its type, e.g. in ``tl.maximum``)."""
    if c.dtype is DType.F32:
        v = float(c.value)
        lit = f'float("{v}")' if math.isnan(v) or math.isinf(v) else repr(v)
        return lit if ft is not FloatType.F64 else f"tl.full([], {lit}, {ft.tl})"
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


@dataclass
class _Emit:
    """What a renderer sees: the graph, the variant's layout and the lines so far (checks go there)."""

    g: Graph
    lay: "_Layout"
    lines: list


Renderer = Union[str, Callable[[_Emit, Node, list[str]], str]]


def _scalar(e: _Emit, n: Node, a: list[str]) -> str:
    slot = e.lay.scalar_slot[n.attr]
    return (f"tl.load(SCALARS_F + {slot})" if n.dtype is DType.F32
            else f"tl.load(SCALARS_I + {slot}).to({_TL_TYPES[n.dtype]})")


def _render_load(e: _Emit, n: Node, a: list[str]) -> str:
    e.lines += _checks(e.g, e.lay, n, a)
    direct = [not e.lay.checked and not isinstance(x, Const) and e.g.nodes[x].op is Op.INPUT
              and e.g.nodes[x].attr in ModKind.MASK.input_names for x in n.args]
    return _load(e.lay, n, a, direct)


def _cast(e: _Emit, n: Node, a: list[str]) -> str:
    return f"({a[0]} != 0)" if n.dtype is DType.BOOL else f"{a[0]}.to({e.lay.tl(n.dtype)})"


def _division(fn: str) -> Callable[[_Emit, Node, list[str]], str]:
    def render(e: _Emit, n: Node, a: list[str]) -> str:
        if e.g.dtype_of(n.args[0]).is_float:
            return f"ops.{fn}_f({a[0]}, {a[1]})"
        e.lines += _divisor_check(e.g, e.lay, n, a[1])
        return f"ops.{fn}({a[0]}, {a[1]})"
    return render


def _shift(symbol: str, helper: str) -> Callable[[_Emit, Node, list[str]], str]:
    """``<<`` / ``>>`` for in-range constant counts, else ``ops.shl`` / ``ops.shr`` (torch's results
    for any count)."""
    def render(e: _Emit, n: Node, a: list[str]) -> str:
        c, bits = n.args[1], _SHIFT_BITS[n.dtype]
        x = f"tl.full([], {a[0]}, {_TL_TYPES[n.dtype]})" if isinstance(n.args[0], Const) else a[0]  # typed
        if isinstance(c, Const) and 0 <= c.value < bits:
            return f"({x} {symbol} {a[1]})"
        return f"ops.{helper}({x}, {a[1]}, {bits})"
    return render


def _extreme(fn: str) -> Callable[[_Emit, Node, list[str]], str]:
    def render(e: _Emit, n: Node, a: list[str]) -> str:
        nan = ", propagate_nan=tl.PropagateNan.ALL" if e.g.dtype_of(n.args[0]).is_float else ""
        return f"{fn}({a[0]}, {a[1]}{nan})"
    return render


def _tanh(e: _Emit, n: Node, a: list[str]) -> str:
    """libdevice's tanh, or the hardware's in the ``F32_APPROX`` variant (16-bit inputs)."""
    return f"ops.tanh_approx({a[0]})" if e.lay.float_type is FloatType.F32_APPROX else f"ops.tanh({a[0]})"


def _not(e: _Emit, n: Node, a: list[str]) -> str:
    return f"({a[0]} == 0)" if e.g.dtype_of(n.args[0]) is DType.BOOL else f"(~{a[0]})"


def _input(e: _Emit, n: Node, a: list[str]) -> str:  # pragma: no cover - inputs are named, not rendered
    raise CodegenError(f"internal: input {n.attr} rendered as a value")


# The Triton renderer: one row per IR op, a format string over the operands or a function.
TRITON: Mapping[Op, Renderer] = {
    Op.INPUT: _input, Op.SCALAR: _scalar, Op.LOAD: _render_load, Op.CAST: _cast,
    Op.WHERE: "tl.where({0}, {1}, {2})",
    Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})", Op.TRUEDIV: "({0} / {1})",
    Op.FLOORDIV: _division("floordiv"), Op.MOD: _division("pymod"),
    Op.POW: lambda e, n, a: _pow(e.g, n, a[0], n.args[1]),
    Op.EQ: "({0} == {1})", Op.NE: "({0} != {1})", Op.LT: "({0} < {1})", Op.LE: "({0} <= {1})",
    Op.GT: "({0} > {1})", Op.GE: "({0} >= {1})", Op.AND: "({0} & {1})", Op.OR: "({0} | {1})",
    Op.XOR: "({0} ^ {1})", Op.MINIMUM: _extreme("tl.minimum"), Op.MAXIMUM: _extreme("tl.maximum"),
    Op.SHL: _shift("<<", "shl"), Op.SHR: _shift(">>", "shr"),
    Op.NEG: "(-{0})", Op.ABS: "tl.abs({0})", Op.NOT: _not, Op.EXP: "tl.exp({0})", Op.EXP2: "tl.exp2({0})",
    Op.LOG: "tl.log({0})", Op.LOG2: "tl.log2({0})", Op.SQRT: "tl.sqrt_rn({0})", Op.RSQRT: "tl.rsqrt({0})",
    Op.TANH: _tanh, Op.SIGMOID: "tl.sigmoid({0})", Op.SIN: "tl.sin({0})", Op.COS: "tl.cos({0})",
    Op.TAN: "ops.tan({0})", Op.ATAN: "ops.atan({0})", Op.ERF: "tl.erf({0})", Op.LOG1P: "ops.log1p({0})",
    Op.EXPM1: "ops.expm1({0})", Op.SIGN: "ops.sign({0})", Op.FLOOR: "tl.floor({0})", Op.CEIL: "tl.ceil({0})",
}


def _body(g: Graph, lowered: "_Layout", names: dict | None = None) -> list[str]:
    """One line per node; ``names`` (filled in) maps node ids to the Triton variables."""
    names = {} if names is None else names
    lines: list[str] = []
    emit = _Emit(g, lowered, lines)

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
        render = TRITON[n.op]
        expr = render.format(*a) if isinstance(render, str) else render(emit, n, a)
        lines.append(f"    {var} = {expr}  # {g.format_node(n)}")
        names[n.id] = var
    return lines


def _returns(g: Graph, names: dict, ft: "FloatType" = FloatType.F32) -> str:
    outs = []
    for a in g.outputs:
        out = _const(a, ft) if isinstance(a, Const) else names[a]
        if g.kind is ModKind.SCORE:
            if isinstance(a, Const) or not depends_on(g, a, "score"):
                out = f"({out} + tl.zeros_like(score))"  # a full tile, whatever the mod reads
        elif isinstance(a, Const):  # a constant mask, as a full [BLOCK_M, BLOCK_N] tile
            out = "((q_idx >= 0) & (kv_idx >= 0))" if a.value else "((q_idx >= 0) & (kv_idx < 0))"
        outs.append(out)
    return f"    return {', '.join(outs)}"


def _load(lowered: "_Layout", n: Node, a: list[str], direct: list[bool]) -> str:
    """A masked gather: negative indices count from the end (as torch's indexing); indices still
    outside the tensor read 0 and are never dereferenced. The launcher runs such a function only
    where ``flexcomp.ranges`` proved every index in range; elsewhere the checked variant
    (:func:`_checks`) reports them first. ``direct`` dims are indexed by ``b`` / ``h`` / ``q_idx`` /
    ``kv_idx`` themselves, which the kernels keep inside ``[0, length)``: in an unchecked mod (proven
    in range) they need neither the wrap nor the mask (``doc[q_idx]`` is one plain load, as torch's)."""
    j = lowered.buffer_index[n.attr]
    if not a:
        return f"tl.load(BUFS[{j}]){lowered.load_cast[n.attr]}"
    off, mask = _address(lowered, j, a, "STRIDES", direct)
    if mask is None:
        return f"tl.load(BUFS[{j}] + {off}){lowered.load_cast[n.attr]}"
    return f"tl.load(BUFS[{j}] + {off}, mask={mask}, other=0){lowered.load_cast[n.attr]}"


def _checks(g: Graph, lowered: "_Layout", n: Node, a: list[str]) -> list[str]:
    """In a checked mod, one ``ops.check_index`` line per index of load ``n``, each with its own slot
    of the error tensor (``BUFS[<after the pointers>]``, recorded in ``lowered.checks``); nothing otherwise."""
    if not lowered.checked:
        return []
    j = lowered.buffer_index[n.attr]
    s = lowered.stride_offsets[j]
    err = len(lowered.buffer_index)
    lines = []
    for d, x in enumerate(a):
        slot = len(lowered.checks)
        lowered.checks.append(LoadCheck(n.attr, d, g.format_node(n), CheckKind.INDEX, j, n.id))
        lines.append(f"    ops.check_index({x}, SIZES[{s + d}], BUFS[{err}], {slot})  # {n.attr} dim {d}")
    return lines


def _divisor_check(g: Graph, lowered: "_Layout", n: Node, divisor: str) -> list[str]:
    """In a checked mod, an ``ops.check_divisor`` line before integer division ``n``: a zero divisor
    is recorded in its slot (integer division by zero has no value; torch raises)."""
    if not lowered.checked:
        return []
    slot = len(lowered.checks)
    lowered.checks.append(LoadCheck("", -1, g.format_node(n), CheckKind.DIVISOR, -1, n.id))
    return [f"    ops.check_divisor({divisor}, BUFS[{len(lowered.buffer_index)}], {slot})  # {n.op.value} divisor"]


def _address(lowered: "_Layout", j: int, a: list[str], strides: str,
             direct: Optional[list[bool]] = None) -> tuple[str, Optional[str]]:
    """Element offset into buffer ``j`` at indices ``a`` (negatives wrapped) and the in-range mask
    (None: every dim ``direct``, known in range); ``strides`` names the flat stride tuple (the mod's
    ``STRIDES``, or the gradients' ``GSTRIDES``)."""
    s = lowered.stride_offsets[j]
    direct = direct or [False] * len(a)
    idx = [x if sure else f"ops.wrap_index({x}, SIZES[{s + d}])" for d, (x, sure) in enumerate(zip(a, direct))]
    off = " + ".join(f"{x} * {strides}[{s + d}]" for d, x in enumerate(idx))
    terms = [f"ops.in_range({x}, SIZES[{s + d}])" for d, (x, sure) in enumerate(zip(a, direct)) if not sure]
    return off, " & ".join(terms) if terms else None


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
        return self.float_type.tl if dtype is DType.F32 else _TL_TYPES[dtype]


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
    fts = {DType.F32: ft.tl}
    cast = {b.name: (" != 0" if b.dtype is DType.BOOL else f".to({fts.get(b.dtype) or _TL_TYPES[b.dtype]})")
            for b in g.buffers}
    return _Layout({b.name: i for i, b in enumerate(g.buffers)}, tuple(offsets), slots, cast, ints, floats, ft,
                   checked)


def function_name(g: Graph, ft: FloatType = FloatType.F32, checked: bool = False) -> str:
    """``score_mod_<fn>_<key>``, or ``score_grad_<fn>_<key>`` for a graph that also returns derivatives;
    ``_f64`` for float64 mods, ``_approx`` for the hardware-tanh ones (16-bit inputs), ``_checked`` for
    checked ones."""
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
                      lay.float_scalars, ft, tuple(lay.checks), checked)


def lower_scatter(joint: Graph, grad_buffers: tuple[str, ...], ft: FloatType = FloatType.F32) -> LoweredMod:
    """The gradient scatter into the captured tensors named in ``grad_buffers``, from ``joint``: the
    plan's ``scatter`` graph (``flexcomp.plan``), which returns the score_mod's value, ``d/d score``
    and ``d/d load`` for each float load of those tensors, in order.

    For each such load, ``grad * d score_mod / d load`` is added into the tensor's gradient at the
    load's own (wrapped) index, for the ``valid`` pairs, by ``ops.scatter_grad`` (atomics, or the two
    deterministic passes; ``MODE``)::

        score_scatter_<fn>_<key>(score, grad, valid, <mod args>, GRADS, GSTRIDES, AUX, Q_AXIS, MODE)

    ``GRADS`` holds one gradient pointer per captured tensor of the score_mod, ``GSTRIDES`` their
    strides, flat as ``STRIDES``; ``AUX`` one float per tensor (largest contribution, then the
    fixed-point scale); ``Q_AXIS`` the tile axis of queries. The kernels pass ``GRADS``,
    ``GSTRIDES`` and ``AUX`` as one flat tuple too (:func:`entry`). ``ft``: the working float (float64 for float64 inputs:
    contributions and atomics in float64).
    """
    loads = [n for n in joint.nodes if n.op is Op.LOAD and n.dtype.is_float and n.attr in grad_buffers]
    if len(loads) != len(joint.extra_outputs) - 1:
        raise CodegenError(f"internal: score_mod {joint.fn_name!r}: the scatter graph has {len(loads)} loads of "
                           f"{grad_buffers} and {len(joint.extra_outputs) - 1} load derivatives")
    lay = _layout(joint, ft)
    tag = "_".join(str(lay.buffer_index[b]) for b in grad_buffers)
    name = f"score_scatter_{joint.fn_name}_{joint.structural_key()}_{tag}{ft.suffix}"
    params = f"score, grad, valid, {_MOD_PARAMS}, GRADS, GSTRIDES, AUX, Q_AXIS: tl.constexpr, MODE: tl.constexpr"
    names: dict = {}
    body = _body(joint, lay, names)
    for load, d in zip(loads, joint.extra_outputs[1:]):  # extra_outputs[0] is d / d score
        j = lay.buffer_index[load.attr]
        idx = [_const(x) if isinstance(x, Const) else names[x] for x in load.args]
        off, inb = _address(lay, j, idx, "GSTRIDES") if idx else ("0", "(b >= 0)")
        dval = _const(d, ft) if isinstance(d, Const) else names[d]
        body.append(f"    ops.scatter_grad(GRADS[{j}], {off}, {inb}, grad * {dval}, valid, AUX + {j}, "
                    f"REDUCE={int(reduce_kind(joint, load))}, Q_AXIS=Q_AXIS, MODE=MODE)"
                    f"  # d/d {joint.format_node(load)}")
    return LoweredMod(name, _module(joint, name, params, body, "gradient scatter"), joint, lay.stride_offsets,
                      lay.int_scalars, lay.float_scalars, ft)


def arg_counts(lowered: LoweredMod) -> tuple[int, int]:
    """``(pointers, dims)`` of a mod's flat tuple: its captured tensors (a checked mod's error tensor
    after them) and their dims (0-d tensors count one); a mod that captures no tensor gets one
    placeholder pointer with one dim, so no tuple is empty."""
    g = lowered.graph
    pointers = len(g.buffers) + (1 if lowered.checked else 0)
    dims = sum(max(1, b.ndim) for b in g.buffers)
    return (pointers, dims) if pointers else (1, 1)


def flat_args(pointers: list, strides: list, sizes: list, scalars_i, scalars_f) -> tuple:
    """The one flat tuple the kernels pass a mod (:func:`entry` unpacks it)."""
    if not pointers:  # the placeholder of arg_counts
        pointers, strides, sizes = [scalars_i], [0], [1]
    return (*pointers, *strides, *sizes, scalars_i, scalars_f)


def entry(lowered: LoweredMod, scatter: bool = False) -> tuple[str, str]:
    """``(name, source)`` of the function the kernels call: it unpacks the flat tuple of captured
    values (and, for a gradient scatter, the flat tuple of gradient pointers, strides and ``AUX``)
    into ``lowered``'s signature. Appended to the generated module by the loader."""
    nb, nd = arg_counts(lowered)
    mod = f"ARGS[0:{nb}], ARGS[{nb}:{nb + nd}], ARGS[{nb + nd}:{nb + 2 * nd}], ARGS[-2], ARGS[-1]"
    name = lowered.name + "_args"
    if scatter:
        ng, gd = len(lowered.graph.buffers), sum(max(1, b.ndim) for b in lowered.graph.buffers)
        params = "score, grad, valid, b, h, q_idx, kv_idx, ARGS, GARGS, Q_AXIS: tl.constexpr, MODE: tl.constexpr"
        call = (f"{lowered.name}(score, grad, valid, b, h, q_idx, kv_idx, {mod}, GARGS[0:{ng}], "
                f"GARGS[{ng}:{ng + gd}], GARGS[-1], Q_AXIS, MODE)")
    else:
        inputs = "score, b, h, q_idx, kv_idx" if lowered.graph.kind is ModKind.SCORE else "b, h, q_idx, kv_idx"
        params = f"{inputs}, ARGS"
        call = f"{lowered.name}({inputs}, {mod})"
    return name, "\n".join(["", "", "@triton.jit", f"def {name}({params}):",
                            '    """The kernels\' entry: one flat tuple of captured values, unpacked."""',
                            f"    return {call}", ""])
