"""flexcomp.visualize: plot_mask, plot_block_mask, plot_scores (matplotlib, CPU, headless)."""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flexcomp import create_block_mask, create_mask
from flexcomp.blockmask_lists import ordered_to_dense
from flexcomp.masks import alibi, alibi_slopes, causal_mask, document_mask, sliding_window, softcap
from flexcomp.sparsity import BlockKind

pytest.importorskip("matplotlib")
from flexcomp.visualize import (BLOCK_STYLES, attention_weights, block_image, block_kinds,  # noqa: E402
                                plot_block_mask, plot_mask, plot_scores)

LONG = 131072
BIG_TENSOR = 64 * 1024 * 1024  # far below LONG * LONG, far above any block map


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op creates or returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def the_image(fig):
    """The figure's one axes holding an image (a colour bar's axes holds none), and that image."""
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 1 and len(axes[0].images) == 1
    return axes[0], axes[0].images[0]


def check_figure(fig, extent, limits=None):
    ax, im = the_image(fig)
    assert [float(x) for x in im.get_extent()] == [float(x) for x in extent]
    q_len, kv_len = limits or (extent[2], extent[1])
    assert ax.get_xlim() == (0, kv_len) and ax.get_ylim() == (q_len, 0)
    assert ax.get_title() and ax.get_xlabel() == "key position (kv_idx)"
    assert ax.get_ylabel() == "query position (q_idx)"
    return ax, im


# ---- plot_mask ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod", [causal_mask, sliding_window(7), document_mask([30, 20, 70])],
                         ids=["causal", "window", "documents"])
def test_plot_mask_small_shows_every_pair(mod):
    fig = plot_mask(mod, 100, 120)
    ax, im = check_figure(fig, [0, 120, 100, 0])
    dense = create_mask(mod, 1, 1, 100, 120, device="cpu")[0, 0]
    assert torch.equal(torch.as_tensor(im.get_array()).bool(), dense)
    assert f"density {100 * dense.double().mean():.1f}% kept" in ax.get_title()
    assert mod.__name__ in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kept", "masked"]


def test_plot_mask_picks_batch_and_head():
    doc_ids = torch.tensor([[0] * 40 + [1] * 24, [0] * 10 + [1] * 54])
    mod = document_mask(doc_ids=doc_ids)
    _, im = the_image(plot_mask(mod, 64, 64, B=2, b=1))
    assert torch.equal(torch.as_tensor(im.get_array()).bool(), create_mask(mod, 2, 1, 64, 64, device="cpu")[1, 0])

    def by_head(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= h * 8
    fig = plot_mask(by_head, 64, 64, H=4, h=3, max_pixels=16, block_size=8)  # the block map of head 3
    _, im = the_image(fig)
    expect = block_kinds(create_block_mask(by_head, 1, 4, 64, 64, device="cpu", BLOCK_SIZE=8), h=3)
    assert torch.equal(torch.as_tensor(im.get_array()), expect)
    with pytest.raises(ValueError, match="out of range"):
        plot_mask(mod, 64, 64, B=2, b=2)


def test_plot_mask_block_map_beyond_max_pixels():
    fig = plot_mask(causal_mask, 1000, 2000, max_pixels=500, block_size=(64, 128))
    ax, im = check_figure(fig, [0, 16 * 128, 16 * 64, 0], limits=(1000, 2000))
    bm = create_block_mask(causal_mask, 1, 1, 1000, 2000, device="cpu", BLOCK_SIZE=(64, 128))
    assert torch.equal(torch.as_tensor(im.get_array()), block_kinds(bm))
    assert "block map, 16×16 blocks of 64×128" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [BLOCK_STYLES[k].label for k in
                                                                   (BlockKind.EMPTY, BlockKind.PARTIAL, BlockKind.FULL)]


def test_plot_mask_at_128k_never_builds_s_by_s():
    with LargestTensor() as seen:
        fig = plot_mask(causal_mask, LONG, LONG)
    assert seen.numel <= BIG_TENSOR
    ax, im = check_figure(fig, [0, LONG, LONG, 0])
    assert im.get_array().shape == (1024, 1024)
    assert "block map, 1024×1024 blocks of 128" in ax.get_title() and "sparsity 50.0%" in ax.get_title()
    with LargestTensor() as seen:  # downsampled: 4 x 4 blocks a pixel, densities and a colour bar
        fig = plot_mask(sliding_window(1000), LONG, LONG, max_pixels=256)
    assert seen.numel <= BIG_TENSOR
    ax, im = check_figure(fig, [0, LONG, LONG, 0])
    assert im.get_array().shape == (256, 256) and "4×4 blocks per pixel" in ax.get_title()
    assert len(fig.axes) == 2  # the image and its colour bar
    assert 0.0 <= float(im.get_array().min()) and float(im.get_array().max()) <= 1.0


# ---- plot_block_mask ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod", [causal_mask, sliding_window(100), document_mask([300, 212, 500])],
                         ids=["causal", "window", "documents"])
def test_plot_block_mask_small(mod):
    bm = create_block_mask(mod, 1, 1, 1012, 1012, device="cpu", BLOCK_SIZE=64)
    fig = plot_block_mask(bm)
    ax, im = check_figure(fig, [0, 16 * 64, 16 * 64, 0], limits=(1012, 1012))
    kinds = torch.as_tensor(im.get_array())
    assert kinds.shape == (16, 16)
    assert torch.equal(kinds != int(BlockKind.EMPTY), bm.to_dense()[0, 0].bool())
    full = ordered_to_dense(bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0], 16).bool()
    assert torch.equal(kinds == int(BlockKind.FULL), full)
    assert mod.__name__ in ax.get_title() and ax.get_legend() is not None


def test_plot_block_mask_batch_head_and_broadcast():
    def per_bh(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= (b * 3 + h) * 32
    bm = create_block_mask(per_bh, 2, 3, 512, 512, device="cpu", BLOCK_SIZE=32)
    for b, h in [(0, 0), (1, 2), (0, 1)]:
        _, im = the_image(plot_block_mask(bm, b=b, h=h))
        assert torch.equal(torch.as_tensor(im.get_array()), block_kinds(bm[b, h]))
    shared = create_block_mask(causal_mask, None, None, 512, 512, device="cpu", BLOCK_SIZE=32)
    _, im = the_image(plot_block_mask(shared, b=5, h=7))  # B = H = 1 broadcasts
    assert torch.equal(torch.as_tensor(im.get_array()), block_kinds(shared))
    no_full = create_block_mask(causal_mask, 1, 1, 512, 512, device="cpu", BLOCK_SIZE=32, separate_full_blocks=False)
    _, im = the_image(plot_block_mask(no_full))
    assert set(torch.as_tensor(im.get_array()).unique().tolist()) == {int(BlockKind.EMPTY), int(BlockKind.PARTIAL)}
    with pytest.raises(ValueError, match="out of range"):
        plot_block_mask(bm, b=2)


def test_plot_block_mask_at_128k():
    bm = create_block_mask(causal_mask, 1, 1, LONG, LONG, device="cpu")
    with LargestTensor() as seen:
        fig = plot_block_mask(bm)
    assert seen.numel <= BIG_TENSOR
    ax, im = check_figure(fig, [0, LONG, LONG, 0])
    assert im.get_array().shape == (1024, 1024)  # one pixel per block: 1024 x 1024 blocks of 128
    with LargestTensor() as seen:
        fig = plot_block_mask(bm, max_pixels=300)
    assert seen.numel <= BIG_TENSOR
    ax, im = check_figure(fig, [0, LONG, LONG, 0])
    assert im.get_array().shape == (256, 256) and "4×4 blocks per pixel" in ax.get_title()


def test_block_image_density():
    kind = torch.tensor([[2, 1, 0], [2, 2, 1], [2, 2, 2]], dtype=torch.int8)
    assert block_image(kind, 3).categorical
    img = block_image(kind, 2)  # 2 x 2 blocks a pixel; the pad beyond the map does not count
    assert img.per_pixel == (2, 2) and img.num_blocks == (3, 3)
    assert img.pixels.tolist() == [[(1 + 0.5 + 1 + 1) / 4, (0 + 0.5) / 2], [1.0, 1.0]]


# ---- plot_scores -------------------------------------------------------------------------------------------
def dense_weights(q, k, b, h, scale, score_fn=None, keep_fn=None):
    """softmax of the [L, S] scores of (b, h), computed densely here; rows with nothing kept are 0."""
    Hq, Hkv = q.shape[1], k.shape[1]
    s = (q[b, h].double() @ k[b, h // (Hq // Hkv)].double().T) * scale
    L, S = s.shape
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    if score_fn is not None:
        s = score_fn(s, qi, ki)
    if keep_fn is not None:
        s = torch.where(keep_fn(qi, ki), s, -math.inf)
    w = torch.softmax(s, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def test_plot_scores_against_dense_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 40, 16)  # GQA: query head 3 reads key head 1
    fig = plot_scores(q, k, mask_mod=causal_mask, b=1, h=3)
    ax, im = check_figure(fig, [0, 40, 48, 0])
    expect = dense_weights(q, k, 1, 3, 16 ** -0.5, keep_fn=lambda qi, ki: qi >= ki)
    torch.testing.assert_close(torch.as_tensor(im.get_array()).double(), expect, rtol=1e-5, atol=1e-6)
    assert "causal_mask" in ax.get_title() and "(b=1, h=3)" in ax.get_title()
    assert [a.get_ylabel() for a in fig.axes if not a.images] == ["attention weight"]

    w = attention_weights(q, k, score_mod=softcap(5.0), mask_mod=sliding_window(6), scale=0.3)
    expect = dense_weights(q, k, 0, 0, 0.3, score_fn=lambda s, qi, ki: 5.0 * torch.tanh(s / 5.0),
                           keep_fn=lambda qi, ki: (qi >= ki) & (qi - ki <= 6))
    torch.testing.assert_close(w.double(), expect, rtol=1e-5, atol=1e-6)


def test_plot_scores_score_mod_and_empty_rows():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 32, 8, dtype=torch.float64), torch.randn(1, 2, 32, 8, dtype=torch.float64)

    def no_row_3(b, h, q_idx, kv_idx):
        return (q_idx % 4 != 3) & (kv_idx <= q_idx)
    fig = plot_scores(q, k, score_mod=alibi(2), mask_mod=no_row_3, h=1)
    assert "score_mod=alibi_bias, mask_mod=no_row_3" in the_image(fig)[0].get_title()
    w = attention_weights(q, k, score_mod=alibi(2), mask_mod=no_row_3, h=1)
    assert w.dtype == torch.float64
    slope = float(alibi_slopes(2)[1])
    expect = dense_weights(q, k, 0, 1, 8 ** -0.5, score_fn=lambda s, qi, ki: s + slope * (ki - qi),
                           keep_fn=lambda qi, ki: (qi % 4 != 3) & (ki <= qi))
    torch.testing.assert_close(w, expect)
    assert torch.all(w[3::4] == 0) and torch.allclose(w[0::4].sum(-1), torch.ones(8, dtype=torch.float64))
    doc = document_mask([10, 22])
    w = attention_weights(q, k, mask_mod=doc)
    assert torch.all(w[10:, :10] == 0) and torch.all(w[:10, 10:] == 0)


def test_plot_scores_refuses_long_and_bad_inputs():
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="max_tokens=32"):
        plot_scores(q, q, max_tokens=32)
    with pytest.raises(ValueError, match="max_tokens"):
        plot_scores(q, torch.randn(1, 1, 5000, 8))
    with pytest.raises(ValueError, match="do not match"):
        plot_scores(q, torch.randn(1, 1, 64, 4))
    with pytest.raises(ValueError, match="out of range"):
        plot_scores(q, q, h=1)


# ---- saving and the optional dependency --------------------------------------------------------------------
def test_path_writes_png_and_svg(tmp_path):
    q = torch.randn(1, 1, 16, 8)
    bm = create_block_mask(causal_mask, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=32)
    for i, draw in enumerate([lambda p: plot_mask(document_mask([6, 10]), 16, 16, path=p),
                              lambda p: plot_block_mask(bm, path=p),
                              lambda p: plot_scores(q, q, mask_mod=causal_mask, path=p)]):
        png, svg = tmp_path / f"{i}.png", str(tmp_path / f"{i}.svg")
        draw(png)
        draw(svg)
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert "<svg" in (tmp_path / f"{i}.svg").read_text()


def test_custom_title():
    fig = plot_mask(causal_mask, 8, 8, title="mine")
    assert the_image(fig)[0].get_title() == "mine"


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "flexcomp\[plot\]"'):
        plot_mask(causal_mask, 8, 8)


def test_figure_size_and_resolution_can_be_chosen():
    from flexcomp.masks import causal_mask

    fig = plot_mask(causal_mask, 128, 128, figsize=(3.0, 2.5), dpi=50)
    assert tuple(fig.get_size_inches()) == (3.0, 2.5) and fig.dpi == 50
    q = torch.randn(1, 1, 32, 8)
    assert tuple(plot_scores(q, q, figsize=(4.0, 4.0)).get_size_inches()) == (4.0, 4.0)
