"""codegen.lower: the IR becomes Triton source, one commented line per node."""
from __future__ import annotations

import pytest
import torch

from flexcomp.codegen.lower import CodegenError, _pow, lower
from flexcomp.errors import FlexcompError
from flexcomp.ir import Const, DType, Graph, ModKind, Node, Op
from flexcomp.masks import alibi, causal_mask, document_mask, prefix_lm, softcap, sliding_window
from flexcomp.trace import trace


def _body(fn, kind):
    src = lower(trace(fn, kind).graph).source
    return src.split("@triton.jit\n", 1)[1].split("\n", 1)[1].rstrip()  # drop the def line


def test_causal_mask_source():
    assert _body(causal_mask, ModKind.MASK) == (
        "    v0 = (q_idx >= kv_idx)  # %0 = ge q_idx, kv_idx : bool\n"
        "    return v0")


def test_softcap_reads_its_cap_from_the_scalar_tensor():
    assert _body(softcap(30.0), ModKind.SCORE) == (
        "    v0 = tl.load(SCALARS_F + 0)  # cap = scalar : f32\n"
        "    v1 = (score / v0)  # %0 = truediv score, cap : f32\n"
        "    v2 = ops.tanh(v1)  # %1 = tanh %0 : f32\n"
        "    v3 = (v0 * v2)  # %2 = mul cap, %1 : f32\n"
        "    return v3")


def test_half_precision_variant_takes_the_hardware_tanh():
    """``F32_APPROX`` (16-bit inputs) differs from float32 in its name and its tanh line only."""
    from flexcomp.codegen.lower import FloatType

    g = trace(softcap(30.0), ModKind.SCORE).graph
    f32, fast = lower(g), lower(g, FloatType.F32_APPROX)
    assert fast.name == f32.name + "_approx" and fast.float_type is FloatType.F32_APPROX
    body = lambda m: m.source.split("@triton.jit\n", 1)[1].split("\n", 1)[1]  # noqa: E731
    assert body(fast) == body(f32).replace("ops.tanh(v1)", "ops.tanh_approx(v1)") != body(f32)


def test_window_is_an_int_scalar():
    assert "tl.load(SCALARS_I + 0).to(tl.int32)  # window = scalar : i32" in _body(sliding_window(9), ModKind.MASK)


def test_loads_are_bounds_masked_with_strides_and_sizes():
    """A load indexed by b / h / q_idx / kv_idx itself is plain in an unchecked mod (the kernels keep
    those in [0, length), and the mod runs unchecked only where its loads are proven in range); a
    computed index keeps the wrap of negatives and the mask."""
    body = _body(alibi(4), ModKind.SCORE)
    assert "tl.load(BUFS[0] + h * STRIDES[0]).to(tl.float32)" in body
    offsets = torch.zeros(4, dtype=torch.int32)
    body = _body(lambda b, h, q_idx, kv_idx: offsets[q_idx % 4] <= kv_idx, ModKind.MASK)
    assert ("tl.load(BUFS[0] + ops.wrap_index(v0, SIZES[0]) * STRIDES[0], mask=ops.in_range(v0, SIZES[0]), "
            "other=0)") in body
    lowered = lower(trace(document_mask([3, 5], inner=prefix_lm(2)), ModKind.MASK).graph)
    assert lowered.stride_offsets == (0, 1)  # doc and positions, one dim each
    assert "tl.load(BUFS[1] + q_idx * STRIDES[1])" in lowered.source


def test_two_dim_buffer_and_bool_buffer():
    table = torch.zeros(2, 3)
    allowed = torch.ones(3, dtype=torch.bool)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(allowed[kv_idx], score + table[h, kv_idx], score)

    body = _body(mod, ModKind.SCORE)
    assert "tl.load(BUFS[0] + kv_idx * STRIDES[0]) != 0" in body
    assert "tl.load(BUFS[1] + h * STRIDES[1] + kv_idx * STRIDES[2])" in body


def test_python_semantics_helpers_for_floor_division_and_remainder():
    def mod(b, h, q_idx, kv_idx):
        return (q_idx // 3) % 2 == kv_idx % -4

    body = _body(mod, ModKind.MASK)
    assert "ops.floordiv(q_idx, 3)" in body and "ops.pymod(" in body


def test_constant_outputs_are_full_tiles():
    assert "tl.zeros_like(score)" in _body(lambda s, b, h, q, kv: (q - kv).float(), ModKind.SCORE)

    def always(b, h, q_idx, kv_idx):
        return (q_idx >= 0) | True

    assert _body(always, ModKind.MASK).endswith("return ((q_idx >= 0) & (kv_idx >= 0))")


def test_integer_powers_unroll_and_others_refuse():
    body = _body(lambda s, b, h, q, kv: s + (q - kv).float() ** 3, ModKind.SCORE)
    assert "v2 = (v1 * v1 * v1)  # %2 = pow %1, 3.0 : f32" in body
    with pytest.raises(CodegenError, match="non-constant or fractional power"):
        lower(trace(lambda s, b, h, q, kv: s ** (q + 1).float(), ModKind.SCORE).graph)


def test_function_names_say_which_variant():
    name = lower(trace(softcap(5.0), ModKind.SCORE).graph).name
    assert name.startswith("score_mod_softcap_score_") and len(name.rsplit("_", 1)[1]) == 16


def test_integer_to_negative_power_is_refused_and_power_zero_is_one():
    with pytest.raises(RuntimeError, match="negative integer powers"):  # now at trace time, as torch refuses it
        trace(lambda s, b, h, q, kv: s + (kv + 1) ** -1, ModKind.SCORE)
    pow_node = Node(0, Op.POW, DType.I32, (Const(3, DType.I32), Const(-1, DType.I32)))
    with pytest.raises(CodegenError, match="integer to a negative power"):  # and the lowering still guards it
        _pow(Graph(ModKind.MASK, "m", (), (), (), Const(True, DType.BOOL)), pow_node, "x", pow_node.args[1])
    assert "(1 + tl.zeros_like(" in _body(lambda s, b, h, q, kv: s + s ** 0, ModKind.SCORE)


def test_forward_config_fits_shared_memory():
    from flexcomp.tiles import forward_config

    smem = 232448  # H100 / H200 opt-in limit
    bf16_128 = forward_config(128, 128, 2, 128, 128, {}, False, False, smem)
    assert (bf16_128.block_m, bf16_128.block_n, bf16_128.num_stages, bf16_128.static_sub) == (128, 128, 3, True)
    f32_128 = forward_config(128, 128, 4, 128, 128, {}, False, False, smem)
    assert (f32_128.block_m, f32_128.num_stages) == (64, 1)  # two stages of 128 fp32 rows of K and V do not fit
    f32_256 = forward_config(256, 256, 4, 128, 128, {}, False, True, smem)
    assert not f32_256.static_sub  # not even one unrolled stage fits: the block's tiles loop
    with pytest.raises(FlexcompError, match=r"kernel_options\['BLOCK_M'\] must be a power of two >= 16, got 8"):
        forward_config(64, 64, 2, 128, 128, {"BLOCK_M": 8}, False)
    gathering = forward_config(128, 128, 2, 128, 128, {}, False, True, smem, pair_gathers=True)
    assert (gathering.block_m, gathering.block_n, gathering.num_warps) == (128, 64, 8)
    wide = forward_config(256, 256, 2, 128, 128, {}, False, False, smem)  # head dim 256, bf16 (H200 sweep)
    assert (wide.block_m, wide.block_n, wide.num_warps, wide.static_sub) == (128, 64, 8, True)
    wide_loads = forward_config(256, 256, 2, 128, 128, {}, False, True, smem)  # document masks: 64x64 was faster
    assert (wide_loads.block_m, wide_loads.block_n, wide_loads.num_warps) == (64, 64, 4)


def test_pair_gathers_are_told_apart_from_per_head_and_per_row_reads():
    from flexcomp.plan import gathers_per_pair

    table, doc, slopes = torch.randn(8, 8), torch.arange(64) // 8, torch.rand(4)
    pair = trace(lambda s, b, h, q, kv: s + table[doc[q], doc[kv]], ModKind.SCORE).graph
    head = trace(lambda s, b, h, q, kv: s + slopes[h] * (kv - q), ModKind.SCORE).graph
    assert gathers_per_pair(pair) and not gathers_per_pair(head)


def test_joint_function_returns_the_value_and_its_derivative_sharing_tanh():
    from flexcomp.derivative import value_and_derivatives

    body = lower(value_and_derivatives(trace(softcap(30.0), ModKind.SCORE).graph)).source
    assert body.count("ops.tanh(") == 1
    assert body.rstrip().endswith("return v3, v8")
    assert "def score_grad_softcap_score_" in body


def test_scatter_sums_a_tile_by_what_the_index_depends_on():
    from flexcomp.codegen.lower import lower_scatter
    from flexcomp.plan import Reduce, scatter_graph

    per_head, per_q, per_kv, pair = (torch.randn(4), torch.randn(64), torch.randn(64), torch.randn(64, 64))

    def score(s, b, h, q_idx, kv_idx):
        return s * per_head[h] + per_q[q_idx] + per_kv[kv_idx] + pair[q_idx, kv_idx]

    g = trace(score, ModKind.SCORE).graph
    src = lower_scatter(scatter_graph(g, tuple(b.name for b in g.buffers)), tuple(b.name for b in g.buffers)).source
    reduces = [line.split("REDUCE=")[1][0] for line in src.splitlines() if "ops.scatter_grad(" in line]
    assert reduces == [str(int(r)) for r in (Reduce.ALL, Reduce.PER_Q, Reduce.PER_KV, Reduce.NONE)]
    assert "grad * score, valid, AUX + 0, REDUCE=1" in src  # d(s * per_head[h]) / d per_head[h] = s
    only_pair = lower_scatter(scatter_graph(g, ("pair",)), ("pair",)).source
    assert only_pair.count("ops.scatter_grad(") == 1  # tensors that need no gradient get no atomics


def test_backward_config_choices_and_errors():
    from flexcomp.tiles import backward_config

    plain = backward_config(128, 128, 2, 128, 128, {}, False)
    assert (plain.block_m1, plain.block_n1, plain.num_warps, plain.split) == (64, 64, 4, False)
    capped = backward_config(128, 128, 2, 128, 128, {}, False, score_mod=True, transcendental=True)
    assert (capped.block_m1, capped.block_n1, capped.block_m2, capped.block_n2, capped.split) == (32, 64, 64, 32, True)
    grouped = backward_config(128, 128, 2, 128, 128, {}, False, grouped=True)  # GQA: dK/dV programs run longer
    assert (grouped.block_m1, grouped.block_n1, grouped.split) == (64, 64, True)
    assert not backward_config(128, 128, 2, 128, 128, {}, False, score_mod=True, grouped=True).split  # not measured
    assert not backward_config(128, 128, 2, 128, 128, {"BWD_SPLIT": False}, False, grouped=True).split
    wide = backward_config(256, 256, 2, 128, 128, {}, False)  # head dim 256: two stages fit beside resident K, V
    assert (wide.block_m1, wide.block_n1, wide.block_m2, wide.block_n2, wide.num_warps, wide.num_stages) == (
        64, 64, 64, 64, 8, 2)
    tuned = backward_config(128, 128, 2, 64, 64, {"bwd_BLOCK_N1": 128, "BWD_SPLIT": True}, False)
    assert tuned.block_n1 == 64 and tuned.split  # tiles never exceed the BlockMask's blocks
    with pytest.raises(FlexcompError, match=r"kernel_options\['BWD_SPLIT'\] must be True or False, got 1"):
        backward_config(64, 64, 2, 128, 128, {"BWD_SPLIT": 1}, False)
    with pytest.raises(FlexcompError, match=r"kernel_options\['bwd_BLOCK_M2'\] must be a power of two >= 16, got 24"):
        backward_config(64, 64, 2, 128, 128, {"bwd_BLOCK_M2": 24}, False)


def test_float64_variant_lowers_the_working_float_to_float64():
    from flexcomp.codegen.lower import FloatType

    bias = torch.zeros(4, 8)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.maximum(score, score * 0 + 0.1) + bias[h, kv_idx] + (q_idx - kv_idx) * 0.5

    g = trace(mod, ModKind.SCORE).graph
    f32, f64 = lower(g), lower(g, FloatType.F64)
    assert f64.name == f32.name + "_f64" and f64.float_type is FloatType.F64
    assert "tl.float64" not in f32.source and "0.1)" in f32.source
    body = f64.source.split("@triton.jit", 1)[1]
    assert "tl.float32" not in body
    assert "tl.full([], 0.1, tl.float64)" in body  # never a bare literal: tl.maximum would round it to float32
    assert "kv_idx * STRIDES[1]).to(tl.float64)  # %" in body


def test_float64_tiles_fit_shared_memory_and_loop_over_sub_tiles():
    from flexcomp.tiles import backward_config, forward_config, pad_dim

    smem = 232448
    for D in (64, 128, 256):
        cfg = forward_config(D, D, 8, 128, 128, {}, False, True, smem)
        assert not cfg.static_sub and cfg.num_stages == 1 and cfg.block_m <= 32
        q_bytes, per_stage = cfg.block_m * pad_dim(D) * 8, cfg.block_n * 2 * pad_dim(D) * 8
        assert q_bytes + cfg.block_m * cfg.block_n * 8 + per_stage <= smem
        bwd = backward_config(D, D, 8, 128, 128, {}, False, smem)
        assert bwd.block_n1 * 2 * pad_dim(D) * 8 + bwd.block_m1 * 2 * pad_dim(D) * 8 <= smem
    assert forward_config(64, 64, 4, 128, 128, {}, False, False, smem).static_sub  # float32 unchanged


def test_every_ir_op_has_one_triton_renderer():
    from flexcomp.codegen.lower import TRITON
    from flexcomp.ir_ops import OPS

    assert set(TRITON) == set(Op) == set(OPS)


def test_the_kernels_entry_unpacks_one_flat_tuple():
    from flexcomp.codegen.lower import arg_counts, entry

    bias, doc = torch.randn(4, 64), torch.arange(64)
    g = trace(lambda s, b, h, q_idx, kv_idx: s + bias[h, doc[kv_idx]], ModKind.SCORE).graph
    name, src = entry(lower(g))
    assert arg_counts(lower(g)) == (2, 3) and arg_counts(lower(g, checked=True)) == (3, 3)
    assert name.endswith("_args") and src.strip().splitlines()[-1].strip() == (
        f"return {lower(g).name}(score, b, h, q_idx, kv_idx, ARGS[0:2], ARGS[2:5], ARGS[5:8], ARGS[-2], ARGS[-1])")


def test_explain_shows_the_variant_the_inputs_run():
    """bfloat16 (explain's default dtype) runs the hardware's tanh, float32 libdevice's."""
    from flexcomp.explain import explain

    quiet = lambda text: None  # noqa: E731
    half = explain(softcap(20.0), Q_LEN=128, KV_LEN=128, print_fn=quiet)
    single = explain(softcap(20.0), Q_LEN=128, KV_LEN=128, print_fn=quiet, dtype=torch.float32)
    assert half.count("ops.tanh_approx(") == 2 and "ops.tanh(" not in half  # the forward's and the backward's
    assert single.count("ops.tanh(") == 2 and "tanh_approx" not in single
