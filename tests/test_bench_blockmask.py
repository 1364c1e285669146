"""``python -m flexcomp.bench_blockmask``'s timing and table on the CPU (the benchmark itself needs a
GPU): the wall and host medians of a build, and the table's cells."""
from __future__ import annotations

import time

import torch

from flexcomp import bench_blockmask as bench


def test_medians_split_the_wall_time_into_host_and_device(monkeypatch):
    """The device's share (here a 'sync' that sleeps 2 ms) is in the wall time, not in the host time."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: time.sleep(0.002))
    calls = []
    wall, host = bench._medians_ms(calls.append, list(range(bench.WARMUP + 5)))
    assert calls == list(range(bench.WARMUP + 5))  # every mod built once, the warm-up ones too
    assert 0 <= host < 1.0 and wall >= 2.0 and wall > host


def test_table_shows_the_host_share_and_err_for_a_failed_step():
    row = {"case": "document", "S": 32768, "B": 1, "flexcomp_build_ms": 0.31, "flexcomp_host_ms": 0.24,
           "flexcomp_reuse_ms": 0.1, "torch_ms": 2.2, "build_ratio": 2.2 / 0.31, "flexcomp_peak_mib": 1.1,
           "torch_peak_mib": 1.5, "match": True}
    lines = bench.table([row, {**row, "flexcomp_build_ms": None, "flexcomp_host_ms": None, "match": None}])
    head, _, ok, failed = lines.splitlines()
    assert "| flexcomp build ms | of which host ms |" in head
    assert ok == "| document | 32768 | 1 | 0.31 | 0.24 | 0.100 | 2.20 | 7.10 | 1.1 / 1.5 | true |"
    assert failed.startswith("| document | 32768 | 1 | err | err | 0.100 |") and failed.endswith("| err |")
