"""Trace errors: untraceable code names the user's function, this file and the exact line
(found with ``inspect``, never hard-coded), and says what to write instead."""
from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

from flexcomp.errors import FlexcompTraceError
from flexcomp.ir import ModKind
from flexcomp.trace import trace

SCORE, MASK = ModKind.SCORE, ModKind.MASK
NH = 4  # heads of the captured tables


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def line_of(fn, marker: str = "# <- error") -> int:
    """Line number (in this file) of the one source line of ``fn`` containing ``marker``."""
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, hits
    return hits[0]


def assert_trace_error(fn, kind, lineno: int, *must_contain: str) -> FlexcompTraceError:
    with pytest.raises(FlexcompTraceError) as info:
        trace(fn, kind)
    err = info.value
    msg = str(err)
    path = fn.__code__.co_filename
    assert os.path.samefile(path, __file__)
    assert fn.__name__ in msg, msg
    assert fn.__name__ in err.function
    assert f"{path}:{lineno}" in msg, msg
    assert err.lineno == lineno, (err.lineno, lineno, msg)
    assert err.filename and os.path.samefile(err.filename, __file__)
    for s in must_contain:
        assert s in msg, f"{s!r} not in:\n{msg}"
    return err


def test_error_if_on_traced_value():
    def uses_if(b, h, q_idx, kv_idx):
        if q_idx >= kv_idx:  # <- error
            return q_idx >= 0
        return q_idx < 0

    err = assert_trace_error(uses_if, MASK, line_of(uses_if), "'if'", "torch.where")
    assert "if q_idx >= kv_idx:" in str(err)  # the offending source line is quoted


def test_error_and():
    def uses_and(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) and (q_idx - kv_idx < 4)  # <- error

    assert_trace_error(uses_and, MASK, line_of(uses_and), "'and'", "&")


def test_error_or():
    def uses_or(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) or (kv_idx < 4)  # <- error

    assert_trace_error(uses_or, MASK, line_of(uses_or), "'or'", "|")


def test_error_not():
    def uses_not(b, h, q_idx, kv_idx):
        return not (q_idx < kv_idx)  # <- error

    assert_trace_error(uses_not, MASK, line_of(uses_not), "'not'", "~")


def test_error_item():
    def uses_item(score, b, h, q_idx, kv_idx):
        return score * q_idx.item()  # <- error

    assert_trace_error(uses_item, SCORE, line_of(uses_item), ".item()", "Fix:")


def test_error_int():
    def uses_int(score, b, h, q_idx, kv_idx):
        return score + int(q_idx - kv_idx)  # <- error

    assert_trace_error(uses_int, SCORE, line_of(uses_int), "int()", ".to(torch.int32)")


def test_error_bool():
    def uses_bool(b, h, q_idx, kv_idx):
        return bool(q_idx >= kv_idx)  # <- error

    assert_trace_error(uses_bool, MASK, line_of(uses_bool), "bool()", "torch.where")


def test_error_math_function():
    def uses_math(score, b, h, q_idx, kv_idx):
        return math.exp(score)  # <- error

    assert_trace_error(uses_math, SCORE, line_of(uses_math), "math", "torch.exp")


def test_error_unsupported_torch_function():
    def uses_erf(score, b, h, q_idx, kv_idx):
        return torch.lgamma(score)  # <- error

    assert_trace_error(uses_erf, SCORE, line_of(uses_erf), "'lgamma'", "torch.where", "tanh")


def test_error_in_helper_points_at_helper_line():
    def helper(x):
        return x if x > 0 else -x  # <- error

    def uses_helper(score, b, h, q_idx, kv_idx):
        return helper(score)

    with pytest.raises(FlexcompTraceError) as info:
        trace(uses_helper, SCORE)
    assert info.value.lineno == line_of(helper)
    assert "uses_helper" in str(info.value) and "torch.where" in str(info.value)


def test_error_indexing_traced_value():
    def index_score(score, b, h, q_idx, kv_idx):
        return score[0]  # <- error

    assert_trace_error(index_score, SCORE, line_of(index_score), "indexing a traced value")


def test_error_captured_tensor_used_whole():
    bias = torch.randn(4, 4)

    def whole(score, b, h, q_idx, kv_idx):
        return score + bias  # <- error

    assert_trace_error(whole, SCORE, line_of(whole), "(4, 4)", "bias[h, q_idx]")


def test_error_captured_tensor_too_few_indices():
    table = torch.randn(NH, 63)

    def partial_index(score, b, h, q_idx, kv_idx):
        return score + table[h]  # <- error

    # a row of a captured tensor is a vector (torch's vmap allows it), but a mod returns one value
    assert_trace_error(partial_index, SCORE, line_of(partial_index), "shape (63,)", "index every dim")


def test_error_float_index():
    table = torch.randn(NH, 63)

    def float_index(score, b, h, q_idx, kv_idx):
        return table[h, score]  # <- error

    assert_trace_error(float_index, SCORE, line_of(float_index), "integers")


def test_error_mask_mod_returns_float():
    def float_mask(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) * 1.0  # <- error

    assert_trace_error(float_mask, MASK, line_of(float_mask), "must return a bool", "f32", "q_idx >= kv_idx")


def test_error_score_mod_returns_bool():
    def bool_score(score, b, h, q_idx, kv_idx):
        return score > 0  # <- error

    assert_trace_error(bool_score, SCORE, line_of(bool_score), "must return a float", "torch.where")


def test_error_mask_mod_passed_as_score_mod():
    def causal(b, h, q_idx, kv_idx):  # <- error
        return q_idx >= kv_idx

    err = assert_trace_error(causal, SCORE, line_of(causal), "takes 4", "mask_mod")
    assert "score, b, h, q_idx, kv_idx" in str(err)


def test_error_score_mod_passed_as_mask_mod():
    def bias(score, b, h, q_idx, kv_idx):  # <- error
        return score + q_idx

    assert_trace_error(bias, MASK, line_of(bias), "takes 5", "score_mod")


def test_error_returns_none():
    def forgot_return(b, h, q_idx, kv_idx):
        q_idx >= kv_idx  # noqa: B015

    with pytest.raises(FlexcompTraceError, match="None"):
        trace(forgot_return, MASK)
