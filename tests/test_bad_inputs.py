"""Bad inputs, one table: each row is a real mistake, the exception type expected and a fragment of
the message (which names the argument or the user's mod, what was expected and what came).

- Rows that call ``flex_attention`` run on both backends ("reference", and "triton" on CPU tensors
  under TRITON_INTERPRET=1, see conftest.py).
- Where torch 2.13 raises for the same input, ``test_torch_raises_it_too`` checks that torch's
  exception is an instance of the row's type: flexcomp's errors subclass both ``FlexcompError``
  (a ValueError) and torch's type, so research code catching torch's exceptions keeps working.
- Rows whose fix belongs to another stage are ``xfail(strict=True)`` with the reason 'fix in <file>'.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Optional

import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tfa

import flexcomp
from flexcomp import FlexcompError
from flexcomp.masks import causal_mask


from bad_inputs_mods import (  # tests/ is on sys.path (as for variants.py)
    Row,
    bm_of,
    cbm,
    fa,
    fkb,
    ko_with,
    lists,
    mask_bool,
    mask_div0,
    mask_float,
    mask_float_index,
    mask_if,
    mask_int,
    mask_item,
    mask_meta,
    mask_mod0,
    mask_none,
    mask_none_args,
    mask_oob,
    mask_oob_negative,
    mask_str,
    mask_three,
    mask_too_many_indices,
    qkv,
    score_bool,
    score_complex,
    score_div0,
    score_if,
    score_index_traced,
    score_item,
    score_list,
    score_meta,
    score_mod0,
    score_none,
    score_numpy,
    score_oob,
    score_six,
    score_str,
    score_three,
    score_while,
    with_mask_mod,
)


# ---- the table -------------------------------------------------------------------------------------
ROWS: list[Row] = []


def row(*args, **kw):
    ROWS.append(Row(*args, **kw))


def flex(*args, **kw):
    ROWS.append(Row(*args, flex=True, **kw))


# A. query, key, value
flex("query list", lambda L, ko: fa(L, ko, q=[1.0]), AttributeError, r"query must be a torch.Tensor, got list")
flex("key None", lambda L, ko: L.flex_attention(qkv()[0], None, qkv()[2], kernel_options=ko), AttributeError,
     r"key must be a torch.Tensor, got NoneType")
flex("value int", lambda L, ko: L.flex_attention(*qkv()[:2], 3, kernel_options=ko), AttributeError,
     r"value must be a torch.Tensor, got int")
flex("query numpy", lambda L, ko: fa(L, ko, q=np.zeros((1, 2, 32, 16), np.float32) + 1), AttributeError,
     r"query must be a torch.Tensor, got ndarray")
flex("query 3-D", lambda L, ko: fa(L, ko, q=torch.randn(2, 32, 16)), NotImplementedError,
     r"query must be 4-D \[B, H, S, D\], got 3-D with shape \(2, 32, 16\)")
flex("key 5-D", lambda L, ko: fa(L, ko, k=torch.randn(1, 1, 2, 32, 16)), NotImplementedError, r"key must be 4-D .* got 5-D")
flex("value 2-D", lambda L, ko: fa(L, ko, v=torch.randn(32, 16)), NotImplementedError, r"value must be 4-D .* got 2-D")
flex("query 1-D", lambda L, ko: fa(L, ko, q=torch.randn(16)), ValueError, r"query must be 4-D .* got 1-D")
flex("query 0-D", lambda L, ko: fa(L, ko, q=torch.tensor(1.5)), ValueError, r"query must be 4-D .* got 0-D")
flex("query nested", lambda L, ko: fa(L, ko, q=torch.nested.nested_tensor([torch.randn(2, 32, 16)])),
     NotImplementedError, r"query is a NestedTensor")
flex("query int64", lambda L, ko: fa(L, ko, q=torch.randint(0, 3, (1, 2, 32, 16))), ValueError,
     r"query must be a floating-point tensor .* got torch.int64", torch=False)
flex("key bool", lambda L, ko: fa(L, ko, k=torch.ones(1, 2, 32, 16, dtype=torch.bool)), ValueError,
     r"key must be a floating-point tensor .* got torch.bool", torch=False)
flex("value complex", lambda L, ko: fa(L, ko, v=torch.randn(1, 2, 32, 16, dtype=torch.complex64)), ValueError,
     r"value must be a floating-point tensor .* got torch.complex64", torch=False)
flex("dtype mix f32/f64", lambda L, ko: fa(L, ko, k=qkv(dtype=torch.float64)[1]), ValueError,
     r"one dtype, got query=torch.float32, key=torch.float64, value=torch.float32", torch=False)
flex("dtype mix f32/f16 value", lambda L, ko: fa(L, ko, v=qkv(dtype=torch.float16)[2]), ValueError,
     r"one dtype, got .* value=torch.float16", torch=False)
flex("value on meta", lambda L, ko: fa(L, ko, v=torch.randn(1, 2, 32, 16, device="meta")), ValueError,
     r"one device, got query=cpu, key=cpu, value=meta")
flex("all on meta", lambda L, ko: L.flex_attention(*(torch.randn(1, 2, 32, 16, device="meta") for _ in range(3)),
                                                   kernel_options=ko), ValueError, r"meta device, which holds no values")
flex("head dim 0", lambda L, ko: L.flex_attention(*(torch.randn(1, 2, 32, 0) for _ in range(3)), kernel_options=ko),
     ZeroDivisionError, r"query must have a positive head dim .* got shape \(1, 2, 32, 0\)")
flex("key/value lengths differ", lambda L, ko: fa(L, ko, v=torch.randn(1, 2, 31, 16)), RuntimeError,
     r"key and value must agree in batch, heads and length .* key \(1, 2, 32, 16\) and value \(1, 2, 31, 16\)")
flex("key/value heads differ", lambda L, ko: fa(L, ko, v=torch.randn(1, 1, 32, 16)), RuntimeError,
     r"key and value must agree .* value \(1, 1, 32, 16\)", torch=False)
flex("key/value batch differ", lambda L, ko: fa(L, ko, q=torch.randn(2, 2, 32, 16), k=torch.randn(2, 2, 32, 16),
                                                v=torch.randn(1, 2, 32, 16)), RuntimeError,
     r"key and value must agree .* key \(2, 2, 32, 16\) and value \(1, 2, 32, 16\)", torch=False)
flex("kv batch 3 vs query 2", lambda L, ko: fa(L, ko, q=torch.randn(2, 2, 32, 16), k=torch.randn(3, 2, 32, 16),
                                               v=torch.randn(3, 2, 32, 16)), ValueError,
     r"key/value batch size must equal the query's \(2\) or be 1")
flex("kv batch 2 vs query 1", lambda L, ko: fa(L, ko, k=torch.randn(2, 2, 32, 16), v=torch.randn(2, 2, 32, 16)),
     ValueError, r"key/value batch size must equal the query's \(1\) or be 1 to broadcast")
flex("head dims differ", lambda L, ko: fa(L, ko, k=torch.randn(1, 2, 32, 8)), ValueError,
     r"same head dim .* got query 16 .* and key 8")
flex("heads differ without gqa", lambda L, ko: fa(L, ko, q=torch.randn(1, 4, 32, 16)), ValueError,
     r"got Hq=4 and Hkv=2; for grouped-query attention pass enable_gqa=True")
flex("gqa ratio 3/2", lambda L, ko: fa(L, ko, q=torch.randn(1, 3, 32, 16), enable_gqa=True), ValueError,
     r"multiple of the key/value heads, got Hq=3 and Hkv=2")
flex("gqa more kv heads", lambda L, ko: fa(L, ko, k=torch.randn(1, 4, 32, 16), v=torch.randn(1, 4, 32, 16),
                                           enable_gqa=True), ValueError, r"got Hq=2 and Hkv=4")

# B. scale, score_mod, return_lse / return_aux
flex("scale str", lambda L, ko: fa(L, ko, scale="0.25"), TypeError, r"scale must be a finite float or None, got '0.25'")
flex("scale nan", lambda L, ko: fa(L, ko, scale=math.nan), ValueError, r"scale must be a finite float or None, got nan",
     torch=False)
flex("scale inf", lambda L, ko: fa(L, ko, scale=math.inf), ValueError, r"got inf", torch=False)
flex("scale -inf", lambda L, ko: fa(L, ko, scale=-math.inf), ValueError, r"got -inf", torch=False)
flex("scale complex", lambda L, ko: fa(L, ko, scale=1j), TypeError, r"scale must be a finite float or None, got 1j",
     torch=False)
flex("scale tensor", lambda L, ko: fa(L, ko, scale=torch.tensor(0.25)), TypeError, r"got tensor\(0.2500\) \(Tensor\)",
     torch=False)
flex("scale True", lambda L, ko: fa(L, ko, scale=True), TypeError, r"got True \(bool\)", torch=False)
flex("scale list", lambda L, ko: fa(L, ko, scale=[0.25]), TypeError, r"got \[0.25\] \(list\)", torch=False)
flex("score_mod int", lambda L, ko: fa(L, ko, score_mod=3), RuntimeError, r"score_mod must be callable or None, got int")
flex("score_mod str", lambda L, ko: fa(L, ko, score_mod="softcap"), RuntimeError, r"score_mod must be callable .* got str")
flex("score_mod is a mask_mod", lambda L, ko: fa(L, ko, score_mod=causal_mask), RuntimeError,
     r"score_mod 'causal_mask' at .* takes 4 positional arguments")
flex("score_mod 3 args", lambda L, ko: fa(L, ko, score_mod=score_three), RuntimeError,
     r"score_mod 'score_three' at .* takes 3 positional arguments")
flex("score_mod 6 args", lambda L, ko: fa(L, ko, score_mod=score_six), RuntimeError,
     r"score_mod 'score_six' at .* takes 6 positional arguments")
flex("score_mod if on traced", lambda L, ko: fa(L, ko, score_mod=score_if), RuntimeError,
     r"cannot trace score_mod 'score_if' at .*bad_inputs_mods.py")
flex("score_mod while on traced", lambda L, ko: fa(L, ko, score_mod=score_while), RuntimeError,
     r"cannot trace score_mod 'score_while'")
flex("score_mod bool()", lambda L, ko: fa(L, ko, score_mod=score_bool), RuntimeError, r"cannot trace score_mod 'score_bool'")
flex("score_mod .item()", lambda L, ko: fa(L, ko, score_mod=score_item), RuntimeError, r"score_mod 'score_item'.*item")
flex("score_mod .numpy()", lambda L, ko: fa(L, ko, score_mod=score_numpy), RuntimeError, r"score_mod 'score_numpy'.*numpy",
     torch=False)
flex("score_mod returns None", lambda L, ko: fa(L, ko, score_mod=score_none), ValueError,
     r"score_mod 'score_none'.*returned None")
flex("score_mod returns str", lambda L, ko: fa(L, ko, score_mod=score_str), RuntimeError,
     r"score_mod 'score_str'.*returned a str")
flex("score_mod returns bool", lambda L, ko: fa(L, ko, score_mod=lambda s, b, h, q_idx, kv_idx: q_idx >= kv_idx),
     RuntimeError, r"a score_mod must return a float score, this one returns bool", torch=False)
flex("score_mod indexes the score", lambda L, ko: fa(L, ko, score_mod=score_index_traced), RuntimeError,
     r"score_mod 'score_index_traced'.*indexing a traced value")
flex("score_mod indexes a list", lambda L, ko: fa(L, ko, score_mod=score_list), RuntimeError,
     r"score_mod 'score_list'")
flex("score_mod captures complex", lambda L, ko: fa(L, ko, score_mod=score_complex), RuntimeError,
     r"score_mod 'score_complex'.*complex64", torch=False)
flex("score_mod // 0", lambda L, ko: fa(L, ko, score_mod=score_div0), RuntimeError,
     r"score_mod 'score_div0' at .*bad_inputs_mods.py:\d+ divides an integer by zero in '%\d+ = floordiv")
flex("score_mod % 0", lambda L, ko: fa(L, ko, score_mod=score_mod0), ZeroDivisionError,
     r"score_mod 'score_mod0' .* divides an integer by zero", torch=False)
flex("score_mod index out of range", lambda L, ko: fa(L, ko, score_mod=score_oob), IndexError,
     r"score_mod 'score_oob': .* index(es|ed) the captured tensor 'SHORT_F' of shape \(4,\) out of range")
flex("score_mod captures meta", lambda L, ko: fa(L, ko, score_mod=score_meta), RuntimeError,
     r"score_mod 'score_meta' at .*bad_inputs_mods.py.* on the meta device")
flex("return_aux True", lambda L, ko: fa(L, ko, return_aux=True), AttributeError,
     r"return_aux must be an AuxRequest\(lse=..., max_scores=...\) or None, got bool")
flex("return_aux str", lambda L, ko: fa(L, ko, return_aux="lse"), AttributeError, r"return_aux must be an AuxRequest.* got str")
flex("return_aux dict", lambda L, ko: fa(L, ko, return_aux={"lse": True}), AttributeError, r"got dict")
flex("return_lse and return_aux", lambda L, ko: fa(L, ko, return_lse=True, return_aux=L.AuxRequest(lse=True)),
     ValueError, r"Cannot specify both return_lse and return_aux")
flex("return_lse and empty return_aux", lambda L, ko: fa(L, ko, return_lse=True, return_aux=L.AuxRequest()),
     ValueError, r"Cannot specify both return_lse and return_aux")

# C. block_mask given to flex_attention
flex("block_mask str", lambda L, ko: fa(L, ko, block_mask="causal"), AttributeError,
     r"block_mask must be a BlockMask \(from create_block_mask\), got str")
flex("block_mask dense tensor", lambda L, ko: fa(L, ko, block_mask=torch.ones(32, 32, dtype=torch.bool)),
     AttributeError, r"block_mask must be a BlockMask .* got Tensor")
flex("block_mask dict", lambda L, ko: fa(L, ko, block_mask={"kv_num_blocks": 1}), AttributeError, r"got dict")
flex("block_mask sliced [0]", lambda L, ko: fa(L, ko, block_mask=bm_of(L)[0]), RuntimeError,
     r"Cannot use mask_mod from a sliced BlockMask")
flex("block_mask sliced [:, 1]", lambda L, ko: fa(L, ko, block_mask=bm_of(L)[:, 1]), RuntimeError,
     r"Cannot use mask_mod from a sliced BlockMask")
flex("block_mask sliced q rows", lambda L, ko: fa(L, ko, block_mask=bm_of(L)[:, :, torch.tensor([0])]), RuntimeError,
     r"sliced BlockMask")
flex("block_mask longer", lambda L, ko: fa(L, ko, block_mask=bm_of(L, Q=64, KV=64)), ValueError,
     r"created for \(Q_LEN, KV_LEN\)=\(64, 64\) but query has 32 and key 32 tokens")
flex("block_mask shorter", lambda L, ko: fa(L, ko, block_mask=bm_of(L, Q=16, KV=16)), ValueError,
     r"created for \(Q_LEN, KV_LEN\)=\(16, 16\)")
flex("block_mask kv longer", lambda L, ko: fa(L, ko, block_mask=bm_of(L, Q=32, KV=64)), ValueError,
     r"created for \(Q_LEN, KV_LEN\)=\(32, 64\)")
flex("block_mask q longer kv shorter", lambda L, ko: fa(L, ko, block_mask=bm_of(L, Q=48, KV=16)), ValueError,
     r"created for \(Q_LEN, KV_LEN\)=\(48, 16\)")
flex("block_mask on meta", lambda L, ko: fa(L, ko, block_mask=bm_of(L).to("meta")), RuntimeError,
     r"block_mask is on meta but query is on cpu; move it with block_mask.to\(query.device\)")
flex("block_mask batch 3 vs 1", lambda L, ko: fa(L, ko, block_mask=bm_of(L, B=3)), ValueError,
     r"block_mask has batch/heads \(3, 2\), expected \(1, 2\)", torch=False)
flex("block_mask heads 3 vs 2", lambda L, ko: fa(L, ko, block_mask=bm_of(L, H=3)), ValueError,
     r"block_mask has batch/heads \(1, 3\), expected \(1, 2\)", torch=False)
flex("block_mask lists do not cover", lambda L, ko: fa(L, ko, block_mask=bm_of(L, Q=16, KV=16)._adjust(32, 32)),
     ValueError, r"lists have 1 q-block rows and 1 kv-block columns, but \(Q_LEN, KV_LEN\)=\(32, 32\)", torch=False)
flex("block_mask mask_mod not callable", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, 3)), RuntimeError,
     r"mask_mod must be callable, got int")
flex("block_mask mask_mod is a score_mod", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, score_three)),
     RuntimeError, r"mask_mod 'score_three' at .* takes 3 positional arguments")
flex("block_mask mask_mod returns float", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, mask_float)),
     RuntimeError, r"mask_mod 'mask_float'.*a mask_mod must return a bool")
flex("block_mask mask_mod if", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, mask_if)), RuntimeError,
     r"cannot trace mask_mod 'mask_if'")
flex("block_mask mask_mod out of range", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, mask_oob)), IndexError,
     r"mask_mod 'mask_oob': .* index(es|ed) the captured tensor 'SHORT' of shape \(4,\) out of range", torch=False)
flex("block_mask mask_mod // 0", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, mask_div0)), RuntimeError,
     r"mask_mod 'mask_div0' at .* divides an integer by zero")
flex("block_mask mask_mod captures meta", lambda L, ko: fa(L, ko, block_mask=with_mask_mod(L, mask_meta)), RuntimeError,
     r"mask_mod 'mask_meta' at .*bad_inputs_mods.py.* on the meta device", torch=False)

# D. kernel_options: container, keys, and the type of every key's value
flex("kernel_options list", lambda L, ko: fa(L, ko, kernel_options=[1]), TypeError,
     r"kernel_options must be a dict or None, got list")
flex("kernel_options list of pairs", lambda L, ko: fa(L, ko, kernel_options=[("BLOCK_M", 64)]), TypeError,
     r"kernel_options must be a dict or None, got list", torch=False)
flex("kernel_options str", lambda L, ko: fa(L, ko, kernel_options="fast"), ValueError,
     r"kernel_options must be a dict or None, got str")
flex("kernel_options int", lambda L, ko: fa(L, ko, kernel_options=1), TypeError, r"got int")
flex("kernel_options int key", lambda L, ko: fa(L, ko, kernel_options={**(ko or {}), 1: 2}), TypeError,
     r"kernel_options keys must be str, got 1 \(int\)", torch=False)
flex("kernel_options unknown key", lambda L, ko: fa(L, ko, kernel_options=ko_with(ko, BLOK_M=64)), ValueError,
     r"kernel_options has unknown keys \['BLOK_M'\]", torch=False)
flex("kernel_options unknown prefixed key", lambda L, ko: fa(L, ko, kernel_options=ko_with(ko, fwd_BACKEND="TRITON")),
     ValueError, r"unknown keys \['fwd_BACKEND'\]", torch=False)
flex("kernel_options OUTPUT_MAX", lambda L, ko: fa(L, ko, kernel_options=ko_with(ko, OUTPUT_MAX=True)), AssertionError,
     r"OUTPUT_MAX must not be in kernel_options")
flex("kernel_options OUTPUT_LOGSUMEXP", lambda L, ko: fa(L, ko, kernel_options=ko_with(ko, OUTPUT_LOGSUMEXP=False)),
     AssertionError, r"OUTPUT_LOGSUMEXP must not be in kernel_options")
flex("BACKEND unknown", lambda L, ko: fa(L, ko, kernel_options={"BACKEND": "fast"}), ValueError,
     r"kernel_options\['BACKEND'\] must be 'reference', 'triton' or 'auto', got 'fast'")
flex("BACKEND int", lambda L, ko: fa(L, ko, kernel_options={"BACKEND": 1}), ValueError,
     r"kernel_options\['BACKEND'\] must be .* \(a str\), got 1 \(int\)")
flex("BACKEND None", lambda L, ko: fa(L, ko, kernel_options={"BACKEND": None}), ValueError,
     r"kernel_options\['BACKEND'\] must be .* got None")
flex("BACKEND empty", lambda L, ko: fa(L, ko, kernel_options={"BACKEND": ""}), ValueError, r"got ''")
flex("BACKEND list", lambda L, ko: fa(L, ko, kernel_options={"BACKEND": ["TRITON"]}), ValueError,
     r"got \['TRITON'\] \(list\)")
flex("BACKEND with FORCE_USE_FLEX_ATTENTION", lambda L, ko: fa(L, ko, kernel_options={"BACKEND": "AUTO",
                                                                                     "FORCE_USE_FLEX_ATTENTION": True}),
     RuntimeError, r"BACKEND cannot be combined with legacy FORCE_USE_FLEX_ATTENTION")

INT_KEYS = ["num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "kpack",
            "matrix_instr_nonkdim", "waves_per_eu", "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE", "CHUNK_ELEMENTS",
            "fwd_BLOCK_M", "bwd_BLOCK_N1", "fwd_num_warps", "bwd_num_stages"]
for key in INT_KEYS:
    flex(f"{key}='64'", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: "64"})), TypeError,
         rf"kernel_options\['{key}'\] must be an int .* got '64' \(str\)", torch=False)
for key in ["num_warps", "BLOCK_N", "BLOCK_M2", "waves_per_eu", "CHUNK_ELEMENTS", "bwd_BLOCK_M2"]:
    flex(f"{key}=64.0", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: 64.0})), TypeError,
         rf"kernel_options\['{key}'\] must be an int .* got 64.0 \(float\)", torch=False)
for key in ["num_stages", "BLOCK_M", "kpack", "fwd_BLOCK_N"]:
    flex(f"{key}=True", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: True})), TypeError,
         rf"kernel_options\['{key}'\] must be an int .* got True \(bool\)", torch=False)
for key in ["num_warps", "num_stages", "BLOCK_M", "BLOCK_N1", "SPARSE_KV_BLOCK_SIZE", "CHUNK_ELEMENTS"]:
    flex(f"{key}=0", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: 0})), ValueError,
         rf"kernel_options\['{key}'\] must be an int > 0, got 0", torch=False)
for key in ["kpack", "matrix_instr_nonkdim", "waves_per_eu"]:
    flex(f"{key}=-1", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: -1})), ValueError,
         rf"kernel_options\['{key}'\] must be an int >= 0, got -1", torch=False)
BOOL_KEYS = ["PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
             "USE_TMA", "DETERMINISTIC", "BWD_SPLIT", "FAST_TANH", "fwd_PRESCALE_QK", "bwd_WRITE_DQ"]
for key in BOOL_KEYS:
    flex(f"{key}=1", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: 1})), TypeError,
         rf"kernel_options\['{key}'\] must be True or False, got 1 \(int\)", torch=False)
for key in ["PRESCALE_QK", "DETERMINISTIC", "USE_TMA", "BWD_SPLIT", "FAST_TANH"]:
    flex(f"{key}='yes'", lambda L, ko, key=key: fa(L, ko, kernel_options=ko_with(ko, **{key: "yes"})), TypeError,
         rf"kernel_options\['{key}'\] must be True or False, got 'yes' \(str\)", torch=False)

# E. create_block_mask
row("cbm mask_mod None", lambda L, ko: cbm(L, None), TypeError, r"mask_mod must be callable, got NoneType")
row("cbm mask_mod int", lambda L, ko: cbm(L, 3), TypeError, r"mask_mod must be callable, got int")
row("cbm mask_mod str", lambda L, ko: cbm(L, "causal"), TypeError, r"mask_mod must be callable, got str")
row("cbm mask_mod is a score_mod", lambda L, ko: cbm(L, lambda s, b, h, q, k: s),
    AssertionError, r"mask_mod '.*<lambda>' at .* takes 5 positional arguments",
)
row("cbm mask_mod 3 args", lambda L, ko: cbm(L, mask_three), AssertionError,
    r"mask_mod 'mask_three' at .* takes 3 positional arguments",
)
row("cbm mask_mod no args", lambda L, ko: cbm(L, mask_none_args), AssertionError,
    r"mask_mod 'mask_none_args' at .* takes 0 positional arguments",
)
row("cbm mask_mod returns float", lambda L, ko: cbm(L, mask_float), AssertionError,
    r"mask_mod 'mask_float'.*a mask_mod must return a bool",
)
row("cbm mask_mod returns int", lambda L, ko: cbm(L, mask_int), AssertionError,
    r"mask_mod 'mask_int'.*a mask_mod must return a bool",
)
row("cbm mask_mod returns None", lambda L, ko: cbm(L, mask_none), ValueError, r"mask_mod 'mask_none'.*returned None")
row("cbm mask_mod returns str", lambda L, ko: cbm(L, mask_str), ValueError, r"mask_mod 'mask_str'.*returned a str")
row("cbm mask_mod if", lambda L, ko: cbm(L, mask_if), RuntimeError, r"cannot trace mask_mod 'mask_if'")
row("cbm mask_mod bool()", lambda L, ko: cbm(L, mask_bool), RuntimeError, r"cannot trace mask_mod 'mask_bool'")
row("cbm mask_mod .item()", lambda L, ko: cbm(L, mask_item), RuntimeError, r"mask_mod 'mask_item'.*item")
row("cbm mask_mod // 0", lambda L, ko: cbm(L, mask_div0), RuntimeError,
    r"mask_mod 'mask_div0' at .*bad_inputs_mods.py:\d+ divides an integer by zero in '%\d+ = floordiv")
row("cbm mask_mod % 0", lambda L, ko: cbm(L, mask_mod0), ZeroDivisionError,
    r"mask_mod 'mask_mod0' .* divides an integer by zero", torch=False)
row("cbm mask_mod out of range", lambda L, ko: cbm(L, mask_oob), IndexError,
    r"mask_mod 'mask_oob': .* indexes the captured tensor 'SHORT' of shape \(4,\) out of range")
row("cbm mask_mod negative out of range", lambda L, ko: cbm(L, mask_oob_negative), IndexError,
    r"mask_mod 'mask_oob_negative': .* out of range")
row("cbm mask_mod too many indices", lambda L, ko: cbm(L, mask_too_many_indices), IndexError,
    r"mask_mod 'mask_too_many_indices'.*shape \(4, 4\) was indexed with 3",
)
row("cbm mask_mod float index", lambda L, ko: cbm(L, mask_float_index), IndexError,
    r"mask_mod 'mask_float_index'.*index with integers",
)
row("cbm mask_mod captures meta", lambda L, ko: cbm(L, mask_meta), RuntimeError,
    r"mask_mod 'mask_meta' at .*bad_inputs_mods.py.* on the meta device and holds no values", torch=False)
row("cbm B str", lambda L, ko: cbm(L, B="2"), TypeError, r"B \(or None to broadcast\) must be an int >= 0, got '2' \(str\)")
row("cbm B float", lambda L, ko: cbm(L, B=1.5), TypeError, r"got 1.5 \(float\)", torch=False)
row("cbm B negative", lambda L, ko: cbm(L, B=-1), RuntimeError, r"B \(or None to broadcast\) must be an int >= 0, got -1")
row("cbm B bool", lambda L, ko: cbm(L, B=True), TypeError, r"got True \(bool\)", torch=False)
row("cbm H str", lambda L, ko: cbm(L, H="3"), TypeError, r"H \(or None to broadcast\) must be an int >= 0, got '3'")
row("cbm H negative", lambda L, ko: cbm(L, H=-3), RuntimeError, r"H .* got -3")
row("cbm H float", lambda L, ko: cbm(L, H=2.0), TypeError, r"got 2.0 \(float\)", torch=False)
row("cbm Q_LEN str", lambda L, ko: cbm(L, Q="32"), TypeError, r"Q_LEN must be an int >= 0, got '32' \(str\)")
row("cbm Q_LEN negative", lambda L, ko: cbm(L, Q=-1), RuntimeError, r"Q_LEN must be an int >= 0, got -1")
row("cbm Q_LEN float", lambda L, ko: cbm(L, Q=32.0), TypeError, r"Q_LEN must be an int >= 0, got 32.0", torch=False)
row("cbm Q_LEN None", lambda L, ko: cbm(L, Q=None), TypeError, r"Q_LEN must be an int >= 0, got None")
row("cbm KV_LEN str", lambda L, ko: cbm(L, KV="32"), TypeError, r"KV_LEN must be an int >= 0, got '32'")
row("cbm KV_LEN negative", lambda L, ko: cbm(L, KV=-5), RuntimeError, r"KV_LEN must be an int >= 0, got -5")
row("cbm KV_LEN None", lambda L, ko: cbm(L, KV=None), TypeError, r"KV_LEN must be an int >= 0, got None")
row("cbm BLOCK_SIZE 0", lambda L, ko: cbm(L, BLOCK_SIZE=0), ZeroDivisionError, r"BLOCK_SIZE\[0\] must be a positive int, got 0")
row("cbm BLOCK_SIZE (16, 0)", lambda L, ko: cbm(L, BLOCK_SIZE=(16, 0)), ZeroDivisionError, r"BLOCK_SIZE\[1\] .* got 0")
row("cbm BLOCK_SIZE (0, 16)", lambda L, ko: cbm(L, BLOCK_SIZE=(0, 16)), ZeroDivisionError, r"BLOCK_SIZE\[0\] .* got 0")
row("cbm BLOCK_SIZE negative", lambda L, ko: cbm(L, BLOCK_SIZE=-16), RuntimeError, r"BLOCK_SIZE\[0\] must be a positive int, got -16")
row("cbm BLOCK_SIZE (16, -16)", lambda L, ko: cbm(L, BLOCK_SIZE=(16, -16)), RuntimeError, r"BLOCK_SIZE\[1\] .* got -16")
row("cbm BLOCK_SIZE str", lambda L, ko: cbm(L, BLOCK_SIZE="16"), TypeError,
    r"BLOCK_SIZE must be an int or a \(Q_BLOCK, KV_BLOCK\) pair, got '16'")
row("cbm BLOCK_SIZE float", lambda L, ko: cbm(L, BLOCK_SIZE=16.0), TypeError, r"BLOCK_SIZE must be an int or .* got 16.0")
row("cbm BLOCK_SIZE None", lambda L, ko: cbm(L, BLOCK_SIZE=None), TypeError, r"BLOCK_SIZE must be an int or .* got None")
row("cbm BLOCK_SIZE (16,)", lambda L, ko: cbm(L, BLOCK_SIZE=(16,)), ValueError, r"pair, got \(16,\)")
row("cbm BLOCK_SIZE triple", lambda L, ko: cbm(L, BLOCK_SIZE=(16, 16, 16)), ValueError, r"pair, got \(16, 16, 16\)")
row("cbm BLOCK_SIZE (16, 16.0)", lambda L, ko: cbm(L, BLOCK_SIZE=(16, 16.0)), TypeError,
    r"BLOCK_SIZE\[1\] must be a positive int, got 16.0 \(float\)", torch=False)
row("cbm BLOCK_SIZE (True, 16)", lambda L, ko: cbm(L, BLOCK_SIZE=(True, 16)), TypeError, r"BLOCK_SIZE\[0\] .* got True",
    torch=False)
row("cbm device bogus", lambda L, ko: cbm(L, device="bogus"), RuntimeError, r"Expected one of cpu, cuda", ours=False)
row("cbm dq_kv_order int", lambda L, ko: cbm(L, dq_kv_order=1), ValueError,
    r"dq_kv_order must be a bool when using create_block_mask, got 1")
row("cbm dq_kv_order str", lambda L, ko: cbm(L, dq_kv_order="desc"), ValueError, r"dq_kv_order must be a bool .* got 'desc'")
row("cbm dq_kv_order None", lambda L, ko: cbm(L, dq_kv_order=None), ValueError, r"dq_kv_order must be a bool .* got None")

# F. create_mask, and_masks, or_masks
row("create_mask mod None", lambda L, ko: L.create_mask(None, 1, 1, 8, 8, device="cpu"), TypeError,
    r"create_mask: mod_fn must be callable, got NoneType")
row("create_mask B negative", lambda L, ko: L.create_mask(causal_mask, -1, 1, 8, 8, device="cpu"), RuntimeError,
    r"create_mask: B .* got -1")
row("create_mask Q_LEN str", lambda L, ko: L.create_mask(causal_mask, 1, 1, "8", 8, device="cpu"), TypeError,
    r"create_mask: Q_LEN must be an int >= 0, got '8'")
row("create_mask // 0", lambda L, ko: L.create_mask(mask_div0, 1, 1, 8, 8, device="cpu"), RuntimeError,
    r"mask_mod 'mask_div0' .* divides an integer by zero")
row("create_mask out of range", lambda L, ko: L.create_mask(mask_oob, 1, 1, 8, 8, device="cpu"), IndexError,
    r"mask_mod 'mask_oob'.*out of range")
row("create_mask 3 args", lambda L, ko: L.create_mask(mask_three, 1, 1, 8, 8, device="cpu"), AssertionError,
    r"mask_mod 'mask_three' .* takes 3 positional arguments",
)
row("create_mask captures meta", lambda L, ko: L.create_mask(mask_meta, 1, 1, 8, 8, device="cpu"), RuntimeError,
    r"mask_mod 'mask_meta' at .* on the meta device", torch=False)
row("and_masks int", lambda L, ko: L.and_masks(causal_mask, 3), RuntimeError,
    r"and_masks: every argument must be a callable mask_mod")
row("and_masks str", lambda L, ko: L.and_masks("causal"), RuntimeError, r"and_masks: every argument must be a callable")
row("or_masks None", lambda L, ko: L.or_masks(None), RuntimeError, r"or_masks: every argument must be a callable mask_mod")
row("or_masks tensor", lambda L, ko: L.or_masks(causal_mask, torch.ones(3)), RuntimeError, r"or_masks: every argument")


# G. BlockMask constructor, from_kv_blocks, methods
def ctor(L, num="n", idx="i", fnum=None, fidx=None, qnum=None, qidx=None, fqnum=None, fqidx=None, **kw):
    (n, i), _ = lists()
    num, idx = n if num == "n" else num, i if idx == "i" else idx
    return L.BlockMask((32, 32), num, idx, fnum, fidx, qnum, qidx, fqnum, fqidx, (16, 16), **kw)


N, I = lists()[0]
FN, FI = lists()[1]
row("ctor kv_indices 1-D", lambda L, ko: ctor(L, N.flatten(), I.flatten()), RuntimeError,
    r"BlockMask must have at least 2 dimensions: kv_indices must be .* got shape \(8,\)")
row("ctor kv_indices None", lambda L, ko: ctor(L, idx=None), AttributeError, r"kv_indices must be a torch.Tensor, got NoneType")
row("ctor kv_num_blocks None", lambda L, ko: ctor(L, num=None), AssertionError, r"kv_num_blocks must be provided, got None")
row("ctor full_kv half", lambda L, ko: ctor(L, fnum=FN), AssertionError,
    r"full_kv_num_blocks and full_kv_indices must be both provided or omitted")
row("ctor full_q half", lambda L, ko: ctor(L, fqidx=FI), AssertionError,
    r"full_q_num_blocks and full_q_indices must be both provided or omitted")
row("ctor dq_write_order_full alone", lambda L, ko: ctor(L, dq_write_order_full=I), ValueError,
    r"dq_write_order_full requires dq_write_order")
row("fkb kv_indices 1-D", lambda L, ko: fkb(L, N.flatten(), I.flatten()), RuntimeError, r"BlockMask must have at least 2 dimensions")
row("fkb kv_indices list", lambda L, ko: fkb(L, N, I.tolist()), AttributeError,
    r"from_kv_blocks: kv_indices must be a torch.Tensor \(int32\), got list")
row("fkb kv_num_blocks list", lambda L, ko: fkb(L, N.tolist(), I), AttributeError,
    r"from_kv_blocks: kv_num_blocks must be a torch.Tensor \(int32\), got list")
row("fkb full half", lambda L, ko: fkb(L, N, I, FN), AssertionError,
    r"full_kv_num_blocks and full_kv_indices must be both provided or omitted, got full_kv_num_blocks=a tensor")
row("fkb float indices", lambda L, ko: fkb(L, N, I.float()), IndexError,
    r"kv_indices must be an integer tensor \(int32, as create_block_mask makes\), got torch.float32")
row("fkb bool counts", lambda L, ko: fkb(L, N.bool(), I), IndexError, r"kv_num_blocks must be an integer tensor .* torch.bool",
    torch=False)
row("fkb counts shape", lambda L, ko: fkb(L, N[..., :1], I), RuntimeError,
    r"kv_num_blocks must have shape kv_indices.shape\[:-1\] = \(1, 2, 2\) .* got \(1, 2, 1\)", torch=False)
row("fkb BLOCK_SIZE '8'", lambda L, ko: fkb(L, BLOCK_SIZE="8"), IndexError, r"BLOCK_SIZE must be an int or .* got '8'")
row("fkb BLOCK_SIZE (8,)", lambda L, ko: fkb(L, BLOCK_SIZE=(8,)), IndexError, r"got \(8,\)")
row("fkb BLOCK_SIZE 8.0", lambda L, ko: fkb(L, BLOCK_SIZE=8.0), TypeError, r"got 8.0")
row("fkb BLOCK_SIZE 0", lambda L, ko: fkb(L, BLOCK_SIZE=0), ZeroDivisionError, r"BLOCK_SIZE\[0\] must be a positive int, got 0",
    torch=False)
row("fkb dq_kv_order str", lambda L, ko: fkb(L, dq_kv_order="desc"), ValueError,
    r"dq_kv_order must be a bool, Tensor, or None, got str")
row("fkb dq_write_order_full alone", lambda L, ko: fkb(L, dq_write_order_full=I), ValueError,
    r"dq_write_order_full requires dq_write_order")
row("fkb dq_write_order list", lambda L, ko: fkb(L, dq_write_order=[[0]]), TypeError,
    r"dq_write_order must be a Tensor or None, got list", torch=False)
row("fkb mask_mod not callable", lambda L, ko: fkb(L, mask_mod=3), TypeError, r"mask_mod must be callable or None, got int",
    torch=False)
row("fkb seq_lengths int", lambda L, ko: fkb(L, seq_lengths=32), TypeError,
    r"seq_lengths must be a \(Q_LEN, KV_LEN\) pair or None, got 32", torch=False)
row("fkb seq_lengths negative", lambda L, ko: fkb(L, seq_lengths=(-1, 32)), RuntimeError,
    r"seq_lengths\[0\] must be an int >= 0, got -1", torch=False)
row("fkb seq_lengths str", lambda L, ko: fkb(L, seq_lengths=("32", 32)), TypeError, r"seq_lengths\[0\] .* got '32'", torch=False)
row("fkb rows do not cover", lambda L, ko: fkb(L, seq_lengths=(33, 32)), ValueError,
    r"kv_indices has 2 q-block rows, but seq_lengths\[0\]=Q_LEN=33 with BLOCK_SIZE\[0\]=16 needs 3", torch=False)
row("fkb columns do not cover", lambda L, ko: fkb(L, seq_lengths=(32, 48)), ValueError,
    r"kv_indices has 2 columns, but seq_lengths\[1\]=KV_LEN=48 with BLOCK_SIZE\[1\]=16 has 3 kv-blocks", torch=False)
row("fkb count above width", lambda L, ko: fkb(L, N.clone().fill_(3), I), ValueError,
    r"kv_num_blocks must be in 0..2 \(the columns of kv_indices\), got 3 at \[0, 0, 0\]", torch=False)
row("fkb negative count", lambda L, ko: fkb(L, N.clone().fill_(-2), I), ValueError, r"kv_num_blocks must be in 0..2 .* got -2",
    torch=False)
row("fkb index out of range", lambda L, ko: fkb(L, N.clone().fill_(2), I.clone().fill_(5)), ValueError,
    r"kv_indices lists kv-block 5 at \[0, 0, 0, 0\], expected 0..1", torch=False)
row("fkb negative index", lambda L, ko: fkb(L, N.clone().fill_(1), I.clone().fill_(-1)), ValueError,
    r"lists kv-block -1 .* expected 0..1", torch=False)
row("fkb duplicate index", lambda L, ko: fkb(L, N.clone().fill_(2), I.clone().fill_(0)), ValueError,
    r"kv_indices lists kv-block 0 twice in q-block row \[0, 0, 0\]", torch=False)
row("fkb partial and full overlap", lambda L, ko: fkb(L, N.clone().fill_(2), I, N.clone().fill_(1), I), ValueError,
    r"listed both as partial \(kv_indices\) and as full \(full_kv_indices\)", torch=False)
row("fkb full shape differs", lambda L, ko: fkb(L, N, I, FN[..., :1], FI[..., :1, :]), RuntimeError,
    r"full_kv_indices must have kv_indices' shape \(1, 2, 2, 2\), got \(1, 2, 1, 2\)", torch=False)


def _tensor_ordered(L):
    (n, i), _ = lists()
    order = torch.zeros(1, 2, 2, dtype=torch.int32)
    return L.BlockMask.from_kv_blocks(n, i, BLOCK_SIZE=16, dq_write_order=i, dq_kv_order=order)


row("slice with tensor dq_kv_order", lambda L, ko: _tensor_ordered(L)[0], NotImplementedError,
    r"Slicing BlockMask with tensor dq_kv_order is not supported yet")
row("_adjust with tensor dq_kv_order", lambda L, ko: _tensor_ordered(L)._adjust(16, 16), NotImplementedError,
    r"Adjusting BlockMask with tensor dq_kv_order is not supported yet")
row("sliced mask_mod called", lambda L, ko: bm_of(L)[0].mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(0),
                                                                 torch.tensor(0)),
    RuntimeError, r"Cannot use mask_mod from a sliced BlockMask", ours=False)
row("to bogus device", lambda L, ko: bm_of(L).to("bogus"), RuntimeError, r"Expected one of cpu", ours=False)


# ---- the tests ---------------------------------------------------------------------------------------
def _params():
    out = []
    for r in ROWS:
        for backend in (("reference", "triton") if r.flex else (None,)):
            marks = []
            reason = r.xfail or (r.xfail_triton if backend == "triton" else "")
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(r, backend, marks=marks, id=r.name + (f"-{backend}" if backend else "")))
    return out


def test_the_table_is_large_and_names_are_unique():
    assert len(ROWS) >= 150
    assert len({r.name for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("r,backend", _params())
def test_bad_input_raises(r: Row, backend: Optional[str]):
    ko = {"BACKEND": backend} if backend else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(r.exc, match=re.compile(r.match, re.S)) as info:
            r.call(flexcomp, ko)
    if r.ours:
        assert isinstance(info.value, FlexcompError), f"{type(info.value).__mro__} is not a FlexcompError"


@pytest.mark.parametrize("r", [pytest.param(r, id=r.name) for r in ROWS if r.torch])
def test_torch_raises_it_too(r: Row):
    """torch 2.13 raises an instance of the row's type for the same input (so catching it catches ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(r.exc):
            r.call(tfa, None)
