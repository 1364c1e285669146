"""The inputs and mods the bad-input table (test_bad_inputs.py) calls: the ``Row`` record, builders
of tensors, block masks and calls with either library, and mods that each make one mistake."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp.masks import causal_mask


@dataclass(frozen=True)
class Row:
    """One bad input.

    ``call(L, ko)`` makes the call with library ``L`` (flexcomp, or torch's flex_attention module)
    and ``ko`` (flexcomp: ``{"BACKEND": backend}`` for flex_attention rows; torch: None).
    """

    name: str
    call: Callable
    exc: type
    match: str
    flex: bool = False  # a flex_attention call: parametrised over both backends
    torch: bool = True  # torch raises an instance of ``exc`` for the same input
    ours: bool = True  # flexcomp raises one of its own errors (False: torch's, from inside torch)
    xfail: str = ""  # 'fix in <file>' (both backends)
    xfail_triton: str = ""  # 'fix in <file>' (the triton backend only)


# ---- inputs ----------------------------------------------------------------------------------------
def qkv(B=1, H=2, L=32, S=32, D=16, Hkv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(L * 31 + S)
    Hkv = H if Hkv is None else Hkv
    return (torch.randn(B, H, L, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype),
            torch.randn(B, Hkv, S, D, generator=g).to(dtype))


def ko_with(ko, **extra):
    return {**(ko or {}), **extra}


@functools.lru_cache(maxsize=None)
def bm_of(L, B=1, H=2, Q=32, KV=32, block=16, mask=causal_mask):
    return L.create_block_mask(mask, B, H, Q, KV, device="cpu", BLOCK_SIZE=block)


def fa(L, ko, *args, q=None, k=None, v=None, **kw):
    """flex_attention on the default inputs (or those given), with the row's kernel_options."""
    dq, dk, dv = qkv()
    if "kernel_options" not in kw:
        kw["kernel_options"] = ko
    return L.flex_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, *args, **kw)


def cbm(L, mask=causal_mask, B=1, H=1, Q=32, KV=32, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("BLOCK_SIZE", 16)
    return L.create_block_mask(mask, B, H, Q, KV, **kw)


def lists():
    g = torch.Generator().manual_seed(1)
    dense = torch.randint(0, 3, (1, 2, 2, 2), generator=g)
    return tfa._dense_to_ordered(dense == 1), tfa._dense_to_ordered(dense == 2)


def fkb(L, *args, **kw):
    (n, i), _ = lists()
    args = args or (n, i)
    kw.setdefault("BLOCK_SIZE", 16)
    return L.BlockMask.from_kv_blocks(*args, **kw)


# ---- mods ------------------------------------------------------------------------------------------
ZEROS = torch.zeros(4, dtype=torch.int64)
SHORT = torch.arange(4)
SHORT_F = torch.randn(4)
TABLE2D = torch.randint(0, 5, (4, 4))
META = torch.arange(4, device="meta")
COMPLEX = torch.randn(4, dtype=torch.complex64)
PY_LIST = [1, 2, 3]


def score_if(score, b, h, q_idx, kv_idx):
    if q_idx > kv_idx:
        return score
    return score * 2


def score_while(score, b, h, q_idx, kv_idx):
    while score > 0:
        score = score - 1
    return score


def score_bool(score, b, h, q_idx, kv_idx):
    return score * float(bool(q_idx))


def score_item(score, b, h, q_idx, kv_idx):
    return score + q_idx.item()


def score_numpy(score, b, h, q_idx, kv_idx):
    return score + q_idx.numpy()


def score_none(score, b, h, q_idx, kv_idx):
    return None


def score_str(score, b, h, q_idx, kv_idx):
    return "score"


def score_index_traced(score, b, h, q_idx, kv_idx):
    return score[0]


def score_div0(score, b, h, q_idx, kv_idx):
    return score + q_idx // ZEROS[h]


def score_mod0(score, b, h, q_idx, kv_idx):
    return score + (kv_idx % (q_idx * 0))


def score_oob(score, b, h, q_idx, kv_idx):
    return score + SHORT_F[q_idx]


def score_meta(score, b, h, q_idx, kv_idx):
    return score + META[h]


def score_complex(score, b, h, q_idx, kv_idx):
    return score + COMPLEX[h].real


def score_list(score, b, h, q_idx, kv_idx):
    return score + PY_LIST[h]


def mask_if(b, h, q_idx, kv_idx):
    return True if q_idx >= kv_idx else False


def mask_bool(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx if bool(h == 0) else q_idx < kv_idx


def mask_item(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx.item()


def mask_float(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).float()


def mask_int(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def mask_none(b, h, q_idx, kv_idx):
    return None


def mask_str(b, h, q_idx, kv_idx):
    return "keep"


def mask_div0(b, h, q_idx, kv_idx):
    return (q_idx // ZEROS[h]) >= 0


def mask_mod0(b, h, q_idx, kv_idx):
    return (q_idx % (kv_idx - kv_idx)) == 0


def mask_oob(b, h, q_idx, kv_idx):
    return SHORT[q_idx] >= kv_idx


def mask_oob_negative(b, h, q_idx, kv_idx):
    return SHORT[q_idx - 40] >= 0


def mask_too_many_indices(b, h, q_idx, kv_idx):
    return TABLE2D[b, h, q_idx] > 0


def mask_float_index(b, h, q_idx, kv_idx):
    return SHORT[q_idx.float() / 8] >= 0


def mask_meta(b, h, q_idx, kv_idx):
    return META[h] >= 0


def mask_three(b, h, q_idx):
    return q_idx >= 0


def mask_none_args():
    return True


def score_three(score, b, h):
    return score


def score_six(score, b, h, q_idx, kv_idx, extra):
    return score


def with_mask_mod(L, mod):
    bm = L.create_block_mask(causal_mask, 1, 2, 32, 32, device="cpu", BLOCK_SIZE=16)
    bm.mask_mod = mod
    return bm
