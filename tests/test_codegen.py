"""codegen.lower: the IR becomes Triton source, one commented line per node."""
from __future__ import annotations

import pytest
import torch

from flexcomp.codegen.lower import CodegenError, lower
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
    assert "tl.load(BUFS[0] + h * STRIDES[0], mask=(h >= 0) & (h < SIZES[0]), other=0).to(tl.float32)" in body
    lowered = lower(trace(document_mask([3, 5]), ModKind.MASK).graph)
    assert lowered.stride_offsets == (0, 1)  # doc and start, one dim each
    assert "STRIDES[1]" in lowered.source and "SIZES[1]" in lowered.source


def test_two_dim_buffer_and_bool_buffer():
    table = torch.zeros(2, 3)
    allowed = torch.ones(3, dtype=torch.bool)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(allowed[kv_idx], score + table[h, kv_idx], score)

    body = _body(mod, ModKind.SCORE)
    assert "BUFS[0] + kv_idx * STRIDES[0], mask=(kv_idx >= 0) & (kv_idx < SIZES[0]), other=0) != 0" in body
    assert "BUFS[1] + h * STRIDES[1] + kv_idx * STRIDES[2]" in body


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
