"""create_block_mask at 65k-131k tokens in a child process with a capped address space: no S x S
tensor can exist, and the block lists must still be exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp import create_block_mask
from flexcomp.masks import document_mask

from test_blockmask import assert_same  # noqa: E402


# ---- long sequences: never an S x S tensor ----------------------------------------------------------
_CAP = 3 << 30  # 3 GiB of address space; 65536**2 bools alone are 4 GiB

_CHILD = textwrap.dedent(r"""
    import json, resource, sys, time
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    import flexcomp
    from flexcomp.masks import causal_mask, sliding_window
    out = {"cap": resource.getrlimit(resource.RLIMIT_AS)[0]}
    try:
        torch.empty(65536 * 65536, dtype=torch.bool)
        out["dense_alloc_refused"] = False
    except (RuntimeError, MemoryError):
        out["dense_alloc_refused"] = True

    def summary(bm, key):
        t = time.time()
        r = {"shape": list(bm.shape), "sparsity": bm.sparsity(),
             "kv_num": bm.kv_num_blocks.tolist()[0][0], "full_kv_num": bm.full_kv_num_blocks.tolist()[0][0],
             "q_num": bm.q_num_blocks.tolist()[0][0], "full_q_num": bm.full_q_num_blocks.tolist()[0][0],
             "kv_idx_shape": list(bm.kv_indices.shape), "dtype": str(bm.kv_indices.dtype)}
        n = bm.kv_indices.shape[-1]
        ar = torch.arange(n, dtype=torch.int32)
        # valid entries: ascending, the expected columns
        r["first_partial"] = bm.kv_indices[0, 0, :, 0].tolist()
        fk = bm.full_kv_indices[0, 0]
        fn = bm.full_kv_num_blocks[0, 0]
        valid = ar.view(1, -1) < fn.view(-1, 1)
        lowest = torch.where(valid, fk, n).amin(-1)
        highest = torch.where(valid, fk, -1).amax(-1)
        r["full_lowest"] = lowest.tolist()
        r["full_highest"] = highest.tolist()
        r["full_ascending"] = bool(((fk[:, 1:] > fk[:, :-1]) | ~valid[:, 1:]).all())
        out[key] = r

    t = time.time()
    summary(flexcomp.create_block_mask(causal_mask, 1, 1, 65536, 65536, device="cpu"), "causal_64k")
    out["t_causal_64k"] = time.time() - t
    t = time.time()
    summary(flexcomp.create_block_mask(causal_mask, 1, 1, 131072, 131072, device="cpu"), "causal_128k")
    out["t_causal_128k"] = time.time() - t
    t = time.time()
    summary(flexcomp.create_block_mask(sliding_window(4096), 1, 1, 131072, 131072, device="cpu"), "window_128k")
    out["t_window_128k"] = time.time() - t
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def long_results():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(_CAP)], capture_output=True, text=True,
                          timeout=300, env=env)
    if proc.returncode != 0:
        # tell apart "torch cannot even import under the cap" from "create_block_mask ran out of memory"
        probe = subprocess.run(
            [sys.executable, "-c", "import resource, sys; c = int(sys.argv[1]); "
             "resource.setrlimit(resource.RLIMIT_AS, (c, c)); import torch, flexcomp; print('ok')", str(_CAP)],
            capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0 and "ok" in probe.stdout, \
            f"torch does not import under a {_CAP >> 30} GiB address-space cap:\n{probe.stderr[-3000:]}"
        pytest.fail(f"create_block_mask failed under the cap:\n{proc.stderr[-5000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_long_sequences_run_under_an_address_space_cap(long_results):
    r = long_results
    assert r["cap"] == _CAP
    assert r["dense_alloc_refused"], "the cap does not stop a 65536 x 65536 bool tensor"
    assert r["maxrss_mb"] < _CAP / 2**20


def test_causal_65536(long_results):
    r = long_results["causal_64k"]
    n = 512
    assert r["shape"] == [1, 1, 65536, 65536]
    assert r["kv_idx_shape"] == [1, 1, n, n] and r["dtype"] == "torch.int32"
    assert sum(r["kv_num"]) == 512 and r["kv_num"] == [1] * n
    assert sum(r["full_kv_num"]) == 130816 and r["full_kv_num"] == list(range(n))
    assert r["q_num"] == [1] * n and r["full_q_num"] == list(range(n - 1, -1, -1))
    assert r["first_partial"] == list(range(n))  # the diagonal
    assert r["full_lowest"][1:] == [0] * (n - 1) and r["full_highest"][1:] == list(range(n - 1))
    assert r["full_ascending"]
    assert r["sparsity"] == pytest.approx(100 * (1 - (512 + 130816) / n**2))


def test_causal_131072(long_results):
    r = long_results["causal_128k"]
    n = 1024
    assert r["shape"] == [1, 1, 131072, 131072]
    assert r["kv_num"] == [1] * n and r["full_kv_num"] == list(range(n))
    assert sum(r["full_kv_num"]) == n * (n - 1) // 2
    assert r["first_partial"] == list(range(n))
    assert r["full_ascending"]


def test_sliding_window_131072(long_results):
    r = long_results["window_128k"]
    n, w = 1024, 4096 // 128  # the window spans 32 blocks
    assert r["shape"] == [1, 1, 131072, 131072]
    # row i: the diagonal block and (from row 32 on) block i - 32 are partial, i-31 .. i-1 full
    assert r["kv_num"] == [1 if i < w else 2 for i in range(n)]
    assert r["full_kv_num"] == [min(i, w - 1) for i in range(n)]
    assert sum(r["kv_num"]) == 2016 and sum(r["full_kv_num"]) == 31248
    assert r["first_partial"] == [i if i < w else i - w for i in range(n)]
    assert r["full_lowest"][1:] == [max(0, i - w + 1) for i in range(1, n)]
    assert r["full_highest"][1:] == [i - 1 for i in range(1, n)]
    assert r["full_ascending"]
    assert sum(r["q_num"]) == 2016 and sum(r["full_q_num"]) == 31248


def _doc_ids_16k(seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 3000, (40,), generator=g)
    return torch.repeat_interleave(torch.arange(40, dtype=torch.int32), lens)[:16384].contiguous()


def test_causal_document_mask_16k_matches_torch():
    S = 16384
    ids = _doc_ids_16k(11)
    lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
    fb = create_block_mask(document_mask(lengths), None, None, S, S, device="cpu")

    def same_doc_causal(b, h, q_idx, kv_idx):  # the same mask, written plainly (cheaper for torch's vmap)
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    tb = tfa.create_block_mask(same_doc_causal, None, None, S, S, device="cpu")
    assert_same(fb, tb, "document 16k causal")
