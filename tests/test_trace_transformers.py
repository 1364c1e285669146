"""HF transformers' own mask functions trace (skipped where transformers is not installed).

transformers' ``and_masks`` / ``or_masks`` call ``.new_ones(())`` and ``.to(result.device)`` on
traced values, and its padding, chunked and packed masks index captured tensors by ``batch_idx``:
every model's mask is one of these compositions. Each is compared with torch's create_mask and
create_block_mask, and run through attention on both backends.
"""
import pytest
import torch
from torch.nn.attention import flex_attention as tfa

from flexcomp import create_block_mask, create_mask, flex_attention
from flexcomp.testing import dense_attention, rand_qkv

mu = pytest.importorskip("transformers.masking_utils")

B, S = 2, 96
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend: a GPU, or the interpreter
PAD = torch.ones(B, S, dtype=torch.bool)
PAD[1, :20] = False  # left padding of the second sequence
PACKED = torch.tensor([[0] * 40 + [1] * 56, [0] * 10 + [1] * 30 + [2] * 56])
LEFT = torch.tensor([0, 20])


def _cases():
    causal = mu.causal_mask_function
    yield "causal & padding", mu.and_masks(causal, mu.padding_mask_function(PAD))
    yield "sliding window causal", mu.sliding_window_causal_mask_function(24)
    yield "sliding & padding", mu.and_masks(mu.sliding_window_causal_mask_function(16), mu.padding_mask_function(PAD))
    yield "chunked", mu.and_masks(causal, mu.chunked_overlay(32, LEFT))
    yield "packed", mu.and_masks(causal, mu.packed_sequence_mask_function(PACKED))
    yield "bidirectional window | causal", mu.or_masks(mu.sliding_window_bidirectional_overlay(5), causal)
    yield "offsets (decode)", mu.add_offsets_to_mask_function(mu.sliding_window_causal_mask_function(16), 7, 3)


CASES = dict(_cases())


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_masks_match_torch(name):
    mod = CASES[name]
    assert torch.equal(create_mask(mod, B, 1, S, S, device="cpu"), tfa.create_mask(mod, B, 1, S, S, device="cpu"))
    ours = create_block_mask(mod, B, None, S, S, device="cpu", BLOCK_SIZE=32)
    theirs = tfa.create_block_mask(mod, B, None, S, S, device="cpu", BLOCK_SIZE=32)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    q, k, v = rand_qkv(B, 2, S, S, 8)
    want, _ = dense_attention(q, k, v, mask_mod=mod)
    for backend, dev in (("reference", "cpu"), ("triton", DEVICE)):
        bm = ours if dev == "cpu" else create_block_mask(mod, B, None, S, S, device=dev, BLOCK_SIZE=32)
        out = flex_attention(*(t.float().to(dev) for t in (q, k, v)), block_mask=bm, kernel_options={"BACKEND": backend})
        torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)
