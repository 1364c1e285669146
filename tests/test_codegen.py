"""codegen.lower: the IR becomes Triton source, one commented line per node."""
from __future__ import annotations

import pytest
import torch

from flexcomp.codegen.lower import CodegenError, lower
from flexcomp.errors import FlexcompError
from flexcomp.ir import ModKind
from flexcomp.masks import alibi, causal_mask, document_mask, softcap, sliding_window
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


def test_window_is_an_int_scalar():
    assert "tl.load(SCALARS_I + 0).to(tl.int32)  # window = scalar : i32" in _body(sliding_window(9), ModKind.MASK)


def test_loads_are_bounds_masked_with_strides_and_sizes():
    body = _body(alibi(4), ModKind.SCORE)
    assert ("tl.load(BUFS[0] + ops.wrap_index(h, SIZES[0]) * STRIDES[0], mask=ops.in_range(h, SIZES[0]), "
            "other=0).to(tl.float32)") in body
    lowered = lower(trace(document_mask([3, 5]), ModKind.MASK).graph)
    assert lowered.stride_offsets == (0, 1)  # doc and start, one dim each
    assert "STRIDES[1]" in lowered.source and "SIZES[1]" in lowered.source


def test_two_dim_buffer_and_bool_buffer():
    table = torch.zeros(2, 3)
    allowed = torch.ones(3, dtype=torch.bool)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(allowed[kv_idx], score + table[h, kv_idx], score)

    body = _body(mod, ModKind.SCORE)
    assert "mask=ops.in_range(kv_idx, SIZES[0]), other=0) != 0" in body
    assert "BUFS[1] + ops.wrap_index(h, SIZES[1]) * STRIDES[1] + ops.wrap_index(kv_idx, SIZES[2]) * STRIDES[2]" in body


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
    with pytest.raises(CodegenError, match="integer to a negative power"):
        lower(trace(lambda s, b, h, q, kv: s + (kv + 1) ** -1, ModKind.SCORE).graph)
    assert "(1 + tl.zeros_like(" in _body(lambda s, b, h, q, kv: s + s ** 0, ModKind.SCORE)


def test_forward_config_fits_shared_memory():
    from flexcomp.codegen.launch import forward_config

    smem = 232448  # H100 / H200 opt-in limit
    bf16_128 = forward_config(128, 128, 2, 128, 128, {}, False, False, smem)
    assert (bf16_128.block_m, bf16_128.block_n, bf16_128.num_stages, bf16_128.static_sub) == (128, 128, 3, True)
    f32_128 = forward_config(128, 128, 4, 128, 128, {}, False, False, smem)
    assert (f32_128.block_m, f32_128.num_stages) == (64, 1)  # two stages of 128 fp32 rows of K and V do not fit
    f32_256 = forward_config(256, 256, 4, 128, 128, {}, False, True, smem)
    assert not f32_256.static_sub  # not even one unrolled stage fits: the block's tiles loop
    with pytest.raises(FlexcompError, match=r"kernel_options\['BLOCK_M'\] must be a power of two >= 16, got 8"):
        forward_config(64, 64, 2, 128, 128, {"BLOCK_M": 8}, False)
