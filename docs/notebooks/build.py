"""Build the notebooks of docs/notebooks from the cells below, run them, and save them with outputs.

    python docs/notebooks/build.py          # every notebook
    python docs/notebooks/build.py tour     # one

The cells live here (reviewable as code); the committed .ipynb files carry their outputs, plots
included, so they read on the repository page. ``tests/test_notebooks.py`` runs every committed
notebook top to bottom in CI and fails on any error.
"""
from __future__ import annotations

import os
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
CELL_TIMEOUT_S = 120

MD, CODE = "markdown", "code"

TOUR = [
    (MD, """# A tour of flexcomp

Write a `score_mod` and a `mask_mod` as plain Python, see what flexcomp makes of them (the IR, the
derivative the backward uses, the block map), plot them, run attention, check it against a dense
computation, and take gradients. Everything here runs on a CPU in seconds (the reference backend);
on a GPU the same calls run generated Triton kernels."""),
    (CODE, """%matplotlib inline
import torch
import flexcomp
from flexcomp import create_block_mask, explain, flex_attention
from flexcomp.visualize import plot_block_mask, plot_mask, plot_scores

torch.manual_seed(0)
print("flexcomp", flexcomp.__version__, "torch", torch.__version__)"""),
    (MD, """## 1. Two small functions

A soft-capped score with a distance penalty, and a causal sliding window of 256 tokens. They are
ordinary Python on scalars: flexcomp traces them once into its IR."""),
    (CODE, """def score_mod(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0) - 0.01 * (q_idx - kv_idx)


def mask_mod(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 256)"""),
    (MD, """## 2. What flexcomp makes of them

`explain()` prints the IR of each mod (one line per node), the block map, the plan of the Triton
backend (passes, tiles) and the generated Triton source of each function, the backward's joint
value-and-derivative function included (soft-cap's `tanh` is computed once for both)."""),
    (CODE, """text = explain(score_mod, mask_mod, Q_LEN=1024, KV_LEN=1024, print_fn=lambda s: None)
lines = [line for line in text.splitlines() if line.strip()]
print("\\n".join(lines[:80]))
print(f"... ({len(lines)} lines in all)")"""),
    (MD, """## 3. See the mask

`plot_mask` shows every pair for small sizes, and the block map beyond (never an S×S tensor);
`plot_block_mask` shows a BlockMask's full, partial and empty blocks."""),
    (CODE, """plot_mask(mask_mod, 1024, 1024)"""),
    (CODE, """block_mask = create_block_mask(mask_mod, None, None, 1024, 1024, device="cpu")
print(block_mask)
plot_block_mask(block_mask)"""),
    (CODE, """# 128k tokens: the block map, drawn from the BlockMask's lists alone
plot_mask(mask_mod, 131072, 131072)"""),
    (MD, """## 4. Run attention and check it against a dense computation"""),
    (CODE, """B, H, S, D = 1, 4, 1024, 64
q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

# the dense reference: every pair, the same two functions on broadcast (float64) indices
i = torch.arange(S, dtype=torch.float64)
s = q @ k.transpose(-1, -2) / D ** 0.5
s = score_mod(s, 0, 0, i[:, None], i[None, :])
s = s.masked_fill(~mask_mod(0, 0, i[:, None], i[None, :]), float("-inf"))
dense = torch.softmax(s, dim=-1) @ v
print("max |flexcomp - dense| =", (out - dense).abs().max().item())"""),
    (MD, """## 5. Gradients

The backward recomputes each chunk of queries; gradients flow into q, k and v (and into any tensor
a score_mod captures, see the training notebook)."""),
    (CODE, """g_out = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), g_out)
dense_grads = torch.autograd.grad(dense, (q, k, v), g_out)
for name, a, b in zip("qkv", grads, dense_grads):
    print(f"d{name}: max |flexcomp - dense| = {(a - b).abs().max().item():.2e}")"""),
    (MD, """## 6. The attention weights of a small problem"""),
    (CODE, """qs, ks = torch.randn(1, 1, 128, 16), torch.randn(1, 1, 128, 16)
plot_scores(qs, ks, score_mod=score_mod, mask_mod=mask_mod)"""),
]

GALLERY = [
    (MD, """# A mask gallery

Each mask as research code writes it, plotted. The generally useful ones are
`flexcomp.masks` factories (with docstrings and examples); all of them go through
`create_block_mask` without an S×S tensor and run on every backend."""),
    (CODE, """%matplotlib inline
import torch
from flexcomp import and_masks, create_block_mask, flex_attention
from flexcomp.masks import (block_diffusion_mask, causal_mask, dilated_sliding_window, document_mask,
                            global_tokens, natten_mask, prefix_lm, relative_position_bias,
                            shared_prefix_mask, sliding_tile_mask, sliding_window, alibi, softcap)
from flexcomp.visualize import plot_mask, plot_scores

S = 512
torch.manual_seed(0)"""),
    (MD, """## Causal, sliding window, prefix LM"""),
    (CODE, """plot_mask(causal_mask, S, S)"""),
    (CODE, """plot_mask(and_masks(causal_mask, sliding_window(128)), S, S)"""),
    (CODE, """plot_mask(prefix_lm(128), S, S)"""),
    (MD, """## Document packing

Several sequences packed into one row: each token attends causally within its own document."""),
    (CODE, """lengths = torch.tensor([100, 60, 150, 90, 112])
doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
plot_mask(document_mask(lengths), S, S)"""),
    (MD, """## Dilated sliding window and global tokens"""),
    (CODE, """plot_mask(dilated_sliding_window(64, 4), S, S)"""),
    (CODE, """plot_mask(global_tokens(16, and_masks(causal_mask, sliding_window(64))), S, S)"""),
    (MD, """## 2-D neighbourhood (NATTEN) and sliding tiles (STA)

A 24×24 image, flattened row by row: each pixel attends to a 7×7 neighbourhood (kept whole at the
borders), or, with sliding tiles, each 4×4 tile to the 3×3 tiles around it."""),
    (CODE, """plot_mask(natten_mask(24, 24, 7, 7), 576, 576)"""),
    (CODE, """plot_mask(sliding_tile_mask(24, 24, 4, 4, 3, 3), 576, 576)"""),
    (MD, """## Block diffusion and shared prefixes"""),
    (CODE, """plot_mask(block_diffusion_mask(32, 256), 512, 512)"""),
    (CODE, """continuation = torch.cat([torch.full((128,), -1), torch.repeat_interleave(torch.arange(4), 96)])
plot_mask(shared_prefix_mask(128, continuation), S, S)"""),
    (MD, """## Score mods: ALiBi, soft-cap, relative-position bias

Score mods change the weights, not which pairs are kept: `plot_scores` shows the softmax weights
of a small random problem."""),
    (CODE, """q, k = torch.randn(1, 4, 128, 16), torch.randn(1, 4, 128, 16)
plot_scores(q, k, score_mod=alibi(4), mask_mod=causal_mask, h=3)"""),
    (CODE, """plot_scores(q * 4, k * 4, score_mod=softcap(5.0), mask_mod=causal_mask)"""),
    (CODE, """table = torch.zeros(4, 2 * 16 + 1)
table[:, 16 - 3] = 4.0  # favour the key three positions back
plot_scores(q, k, score_mod=relative_position_bias(table, 16), mask_mod=causal_mask)"""),
    (MD, """## Every mask runs

Each one through `create_block_mask` and `flex_attention` (the reference backend on a CPU)."""),
    (CODE, """masks = {
    "causal": causal_mask, "dilated": dilated_sliding_window(64, 4),
    "global": global_tokens(16, causal_mask), "document": document_mask(lengths),
    "natten": natten_mask(16, 32, 5, 5), "sliding tile": sliding_tile_mask(16, 32, 4, 4, 3, 3),
    "block diffusion": block_diffusion_mask(32, 256), "shared prefix": shared_prefix_mask(128, continuation),
}
x = torch.randn(1, 2, S, 32)
for name, mask in masks.items():
    bm = create_block_mask(mask, None, None, S, S, device="cpu", BLOCK_SIZE=32)
    out = flex_attention(x, x, x, block_mask=bm)
    print(f"{name:16s} sparsity {bm.sparsity():5.1f}%  output finite: {bool(torch.isfinite(out).all())}")"""),
]

TRAINING = [
    (MD, """# Training a tiny model on a CPU, with a learnable relative-position bias

torch's `flex_attention` cannot train on a CPU; flexcomp's reference backend can, and gradients flow
into tensors a `score_mod` captures. The task: predict the token three positions back. One
attention layer whose score_mod adds a learnable bias per head and distance learns where to look."""),
    (CODE, """%matplotlib inline
import matplotlib.figure
import torch
from flexcomp import create_block_mask, flex_attention
from flexcomp.masks import causal_mask, relative_position_bias

torch.manual_seed(0)
V, L, D, H, MAX_DIST = 32, 64, 32, 2, 8"""),
    (CODE, """class TinyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.out = torch.nn.Linear(D, V)
        self.bias = torch.nn.Parameter(torch.zeros(H, 2 * MAX_DIST + 1))  # captured by the score_mod
        self.block_mask = create_block_mask(causal_mask, None, None, L, L, device="cpu", BLOCK_SIZE=32)

    def forward(self, tokens):
        B = tokens.shape[0]
        q, k, v = self.qkv(self.embed(tokens)).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = flex_attention(q, k, v, score_mod=relative_position_bias(self.bias, MAX_DIST), block_mask=self.block_mask)
        return self.out(a.transpose(1, 2).reshape(B, L, D))


model = TinyAttention()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
losses = []
for step in range(150):
    tokens = torch.randint(0, V, (16, L))
    target = torch.roll(tokens, 3, dims=1)  # the token three positions back
    logits = model(tokens)[:, 3:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), target[:, 3:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}")"""),
    (CODE, """fig = matplotlib.figure.Figure(figsize=(6, 3))
ax = fig.subplots()
ax.plot(losses)
ax.set(xlabel="step", ylabel="cross-entropy", title="training loss")
fig"""),
    (MD, """The learned bias: each head's score bonus by distance `kv_idx - q_idx` (negative: looking back).
Distance -3 should stand out."""),
    (CODE, """fig = matplotlib.figure.Figure(figsize=(6, 3))
ax = fig.subplots()
for h in range(H):
    ax.plot(range(-MAX_DIST, MAX_DIST + 1), model.bias[h].detach(), marker="o", label=f"head {h}")
ax.set(xlabel="kv_idx - q_idx", ylabel="learned bias", title="relative-position bias after training")
ax.legend()
print("largest bias at distance", [int(model.bias[h].argmax()) - MAX_DIST for h in range(H)])
fig"""),
]

MIGRATING = [
    (MD, """# Migrating to flexcomp

The same causal attention written with PyTorch's SDPA, torch's own `flex_attention` and flexcomp:
switching from torch's flex_attention is one import line; flash-attn's and SDPA's functions have
flexcomp twins with the same arguments (`flexcomp.flash_attn`, `flexcomp.sdpa`), and decoding with
a KV cache (flash-attn's `flash_attn_with_kvcache`, torch's `PagedAttention`) works the same way."""),
    (CODE, """%matplotlib inline
import warnings

import torch
import torch.nn.functional as F

torch.manual_seed(0)
B, H, S, D = 2, 4, 256, 32
q, k, v = (torch.randn(B, H, S, D) for _ in range(3))"""),
    (MD, """## SDPA"""),
    (CODE, """sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)"""),
    (MD, """## torch's flex_attention"""),
    (CODE, """from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eager torch flex_attention warns that it is unfused
    torch_bm = torch_create_block_mask(causal, None, None, S, S, device="cpu")
    torch_out = torch_flex_attention(q, k, v, block_mask=torch_bm)"""),
    (MD, """## flexcomp: the same code, one import line changed"""),
    (CODE, """from flexcomp import create_block_mask, flex_attention

bm = create_block_mask(causal, None, None, S, S, device="cpu")
out = flex_attention(q, k, v, block_mask=bm)
print("max |flexcomp - SDPA|       =", (out - sdpa).abs().max().item())
print("max |flexcomp - torch flex| =", (out - torch_out).abs().max().item())"""),
    (MD, """## What flexcomp adds

Training on a CPU (gradients, here into q, k, v), no `torch.compile`, and block masks at long
sequences without an S×S tensor."""),
    (CODE, """qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
flex_attention(qg, kg, vg, block_mask=bm).sum().backward()
ref = [t.clone().requires_grad_() for t in (q, k, v)]
F.scaled_dot_product_attention(*ref, is_causal=True).sum().backward()
print("max |dq flexcomp - dq SDPA| =", (qg.grad - ref[0].grad).abs().max().item())
long_bm = create_block_mask(causal, None, None, 131072, 131072, device="cpu")
print(f"a 131,072-token causal BlockMask: {long_bm.kv_indices.shape[-1]}x{long_bm.kv_indices.shape[-1]} blocks, "
      f"sparsity {long_bm.sparsity():.2f}%")"""),
    (CODE, """from flexcomp.visualize import plot_block_mask

plot_block_mask(long_bm)"""),
    (MD, """## flash-attn's functions

`[batch, seq, heads, dim]` tensors, flash-attn's argument names; `varlen` packs sequences along
one axis with `cu_seqlens` (each its own causal attention: here checked against SDPA on each
sequence alone)."""),
    (CODE, """from flexcomp.flash_attn import flash_attn_func, flash_attn_varlen_func

qf, kf, vf = (t.transpose(1, 2) for t in (q, k, v))  # [batch, seq, heads, dim]
fa = flash_attn_func(qf, kf, vf, causal=True).transpose(1, 2)
print("max |flash_attn_func - SDPA| =", (fa - sdpa).abs().max().item())

lens = [100, 60, 96]
cu = torch.tensor([0, 100, 160, 256], dtype=torch.int32)
packed = flash_attn_varlen_func(qf[0], kf[0], vf[0], cu, cu, max(lens), max(lens), causal=True)
alone = [F.scaled_dot_product_attention(*(t[:1, :, a:b] for t in (q, k, v)), is_causal=True)[0].transpose(0, 1)
         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
print("max |varlen - SDPA per sequence| =", (packed - torch.cat(alone)).abs().max().item())"""),
    (MD, """## SDPA's signature, masks included"""),
    (CODE, """from flexcomp.sdpa import scaled_dot_product_attention

keep = torch.rand(S, S) > 0.3
keep.fill_diagonal_(True)
print("max |flexcomp sdpa - SDPA| =",
      (scaled_dot_product_attention(q, k, v, attn_mask=keep) - F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
      .abs().max().item())"""),
    (MD, """## Decoding with a KV cache

One new token per step: `flash_attn_with_kvcache` writes its key and value into the cache in place
and attends to everything cached (split-KV decode kernels on a GPU). torch's `PagedAttention`
has a flexcomp twin whose kernels read K and V in their pages."""),
    (CODE, """from flexcomp.flash_attn import flash_attn_with_kvcache

k_cache, v_cache = torch.zeros(B, 512, H, D), torch.zeros(B, 512, H, D)
k_cache[:, :S], v_cache[:, :S] = kf, vf  # the prompt's keys and values
q_new, k_new, v_new = (torch.randn(B, 1, H, D) for _ in range(3))
step = flash_attn_with_kvcache(q_new, k_cache, v_cache, k_new, v_new, cache_seqlens=S, causal=True)
full_k, full_v = torch.cat([kf, k_new], 1), torch.cat([vf, v_new], 1)
want = F.scaled_dot_product_attention(q_new.transpose(1, 2), full_k.transpose(1, 2), full_v.transpose(1, 2))
print("max |decode step - SDPA over the cache| =", (step.transpose(1, 2) - want).abs().max().item())"""),
    (CODE, """from flexcomp.paged import PagedAttention

page = 32
paged = PagedAttention(n_pages=32, page_size=page, max_batch_size=B, device="cpu")
k_pages, v_pages = torch.zeros(1, H, 32 * page, D), torch.zeros(1, H, 32 * page, D)
for b in range(B):
    paged.reserve(torch.tensor([b]), torch.tensor(S))
    paged.assign(torch.tensor([b]), torch.arange(S).view(1, -1), k[b:b + 1], v[b:b + 1], k_pages, v_pages)
print("sequence 0's pages:", paged.page_table[0, :S // page].tolist())
offset = torch.tensor(S - 1)
logical = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx + offset >= kv_idx, B, None, 1, S, device="cpu",
                            BLOCK_SIZE=(32, page))
out_paged = flex_attention(q[:, :, -1:], k_pages, v_pages, block_mask=paged.convert_logical_block_mask(logical))
print("max |paged - SDPA last row| =", (out_paged - sdpa[:, :, -1:]).abs().max().item())"""),
]

NOTEBOOKS = {"tour": TOUR, "mask_gallery": GALLERY, "training_on_cpu": TRAINING, "migrating": MIGRATING}


def build(name: str, cells: list, run: bool = True) -> str:
    """Write ``docs/notebooks/<name>.ipynb`` from ``cells`` (and run it, keeping the outputs)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == MD else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if run:
        with tempfile.TemporaryDirectory() as cwd:  # not the checkout: its flexcomp/ folder is partial
            NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                           resources={"metadata": {"path": cwd}}).execute()
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(NOTEBOOKS)
    for name in wanted:
        print("built", build(name, NOTEBOOKS[name]))
