"""``python -m flexcomp.bench``'s shape syntax and tables on the CPU (the benchmark itself needs a GPU)."""
from __future__ import annotations

import pytest

from flexcomp import bench


def test_shapes_with_and_without_grouped_heads():
    assert bench.parse_shape("4x16x4096x64") == (4, 16, 16, 4096, 64)
    assert bench.parse_shape("4x32:8x4096x128") == (4, 32, 8, 4096, 128)


@pytest.mark.parametrize("shape", ["4x16x4096", "4x30:8x4096x128", "4x32:8:2x4096x128"])
def test_bad_shapes_say_what_is_expected(shape):
    with pytest.raises(SystemExit, match="--shapes") as e:
        bench.parse_shape(shape)
    assert repr(shape) in str(e.value)


def _row(**extra) -> dict:
    return {"shape": "4x32:8x4096x128", "variant": "causal", "flexcomp_tflops": 400.0, "torch_tflops": 360.0,
            "ratio": 400 / 360, "flexcomp_bwd_tflops": 350.0, "torch_bwd_tflops": 350.0, "bwd_ratio": 1.0, **extra}


def test_cudnn_rows_get_their_own_table():
    rows = [_row(cudnn_tflops=500.0, cudnn_ratio=0.8, cudnn_bwd_tflops=437.5, cudnn_bwd_ratio=0.8),
            _row(variant="document")]
    lines = bench.table(rows).splitlines()
    assert lines[2].startswith("| 4×32:8×4096×128 | causal | 400 / 360 | 1.11 | 350 / 350 | 1.00 |")
    at = lines.index("Against cuDNN SDPA (ratio: cuDNN time / flexcomp time):")
    assert lines[at + 4:] == ["| 4×32:8×4096×128 | causal | 400 / 500 | 0.80 | 350 / 438 | 0.80 |"]


def test_no_cudnn_table_without_cudnn_rows():
    assert "cuDNN" not in bench.table([_row()])


def test_cudnn_only_for_what_sdpa_computes():
    causal = bench.make_case("causal", 1, 2, 256, "cpu")
    assert bench._cudnn(causal, gqa=False) is not None
    assert bench._cudnn(bench.make_case("sliding", 1, 2, 256, "cpu"), gqa=False) is None
    assert bench._cudnn(bench.make_case("alibi", 1, 2, 256, "cpu"), gqa=False) is None
