"""Pictures of masks, block masks and attention weights, with matplotlib (an optional dependency).

Three functions, each returning a ``matplotlib.figure.Figure`` (which Jupyter displays) and, given
``path=``, saving it (PNG, SVG, PDF... by the file's suffix):

- :func:`plot_mask`: the mask of a mask_mod for one ``(b, h)``; every pair up to ``max_pixels``
  per side, beyond that the block map of :func:`flexcomp.create_block_mask` (never ``Q_LEN x KV_LEN``).
- :func:`plot_block_mask`: the full / partial / empty blocks of an existing :class:`BlockMask`.
- :func:`plot_scores`: the softmax attention weights of a small problem, score_mod and mask_mod applied.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no backend, no display and
no global figure list are involved, so this works headless and in notebooks alike. Install with
``pip install "flexcomp[plot]"``.

A block map at most ``max_pixels`` blocks per side is drawn one pixel per block in three colours
(empty: skipped, partial: mask_mod applied, full: mask_mod skipped). A larger one is downsampled:
each pixel then covers ``fr x fc`` blocks and shows their mean *block density*, where a full block
counts 1, a partial block 1/2 and an empty block 0, on a colour bar.

>>> from flexcomp.masks import causal_mask
>>> fig = plot_mask(causal_mask, 64, 64)
>>> fig.axes[0].images[0].get_extent()
[0, 64, 64, 0]
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .blockmask import BlockMask, _block_size, _check_bh, _check_len, _ordered_to_dense
from .blockmask_build import create_block_mask, create_mask
from .errors import zero_division_names
from .evaluate import evaluate
from .ir import ModKind
from .ranges import Domain, check_runnable
from .sparsity import BlockKind
from .trace import trace

__all__ = ["plot_mask", "plot_block_mask", "plot_scores", "attention_weights", "block_kinds", "block_image",
           "BlockImage", "Style", "BLOCK_STYLES", "PAIR_STYLES", "INSTALL_HINT"]

INSTALL_HINT = 'pip install "flexcomp[plot]"'
_FIGSIZE = (6.4, 5.2)


@dataclass(frozen=True)
class Style:
    """How one kind of cell is drawn: its ``colour``, its legend ``label`` and, for blocks, its
    ``weight`` in a downsampled pixel's block density."""

    colour: str
    label: str
    weight: float = 0.0


BLOCK_STYLES: dict[BlockKind, Style] = {
    BlockKind.EMPTY: Style("#f4f4f4", "empty: skipped", 0.0),
    BlockKind.PARTIAL: Style("#6baed6", "partial: mask_mod applied", 0.5),
    BlockKind.FULL: Style("#08306b", "full: mask_mod skipped", 1.0),
}
PAIR_STYLES: dict[bool, Style] = {False: Style("#f4f4f4", "masked"), True: Style("#08306b", "kept")}
_DRAWN_KINDS = (BlockKind.EMPTY, BlockKind.PARTIAL, BlockKind.FULL)


@dataclass(frozen=True)
class BlockImage:
    """A block map ready to draw.

    Fields:
        pixels: ``[rows, cols]``; int8 :class:`BlockKind` values when ``per_pixel == (1, 1)``, else
            float32 block densities in ``[0, 1]`` (full 1, partial 1/2, empty 0, mean per pixel).
        per_pixel: ``(fr, fc)``, the q-blocks and kv-blocks one pixel covers.
        num_blocks: ``(num_q_blocks, num_kv_blocks)`` of the whole map.
    """

    pixels: Tensor
    per_pixel: tuple[int, int]
    num_blocks: tuple[int, int]

    @property
    def categorical(self) -> bool:
        return self.per_pixel == (1, 1)


# ---- matplotlib, loaded on use -------------------------------------------------------------------
@dataclass(frozen=True)
class _Matplotlib:
    """The few matplotlib classes used here, imported on first use."""

    Figure: type
    ListedColormap: type
    Patch: type
    FuncFormatter: type


def _matplotlib() -> _Matplotlib:
    """matplotlib's classes, or ImportError naming the extra to install."""
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        raise ImportError(f"flexcomp.visualize needs matplotlib: {INSTALL_HINT}") from e
    return _Matplotlib(Figure, ListedColormap, Patch, FuncFormatter)


def _token_label(value: float, _pos=None) -> str:
    """A tick label in tokens: ``512``, ``4096``, ``20k``, ``120k``."""
    return f"{value:g}" if abs(value) < 10000 else f"{value / 1000:g}k"


def _new_axes(figsize=None, dpi=None):
    mpl = _matplotlib()
    fig = mpl.Figure(figsize=figsize or _FIGSIZE, dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.set_major_formatter(mpl.FuncFormatter(_token_label))
    ax.yaxis.set_major_formatter(mpl.FuncFormatter(_token_label))
    ax.set_xlabel("key position (kv_idx)")
    ax.set_ylabel("query position (q_idx)")
    return fig, ax


def _finish(fig, ax, title: str, q_len: int, kv_len: int, path) -> object:
    ax.set_title(title, fontsize="medium")
    ax.set_xlim(0, kv_len)
    ax.set_ylim(q_len, 0)
    if path is not None:
        fig.savefig(Path(path))
    return fig


def _legend(ax, styles) -> None:
    handles = [_matplotlib().Patch(facecolor=s.colour, edgecolor="#999999", label=s.label) for s in styles]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)


def _name(fn: Optional[Callable]) -> str:
    if fn is None:
        return "None"
    return getattr(fn, "__name__", None) or type(fn).__name__


# ---- argument checks -----------------------------------------------------------------------------
def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_index(name: str, value, bound: Optional[int], bound_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if bound is not None and value >= bound:
        raise ValueError(f"{name}={value} is out of range for {bound_name}={bound}")
    return int(value)


def _pick(size: int, i: int, what: str) -> int:
    """Index ``i`` of a batch dim of ``size`` (1: broadcast, any ``i``)."""
    if size == 1:
        return 0
    if i >= size:
        raise ValueError(f"{what}={i} is out of range: the block mask has {size} along that dim")
    return i


# ---- block maps ----------------------------------------------------------------------------------
def block_kinds(block_mask: BlockMask, b: int = 0, h: int = 0) -> Tensor:
    """The :class:`BlockKind` of every block of ``(b, h)``: int8 ``[num_q_blocks, num_kv_blocks]``.

    A batch or head dim of size 1 broadcasts (any ``b`` / ``h``). A mask without full lists
    (``full_kv_num_blocks is None``) has only partial and empty blocks.

    >>> from flexcomp import create_block_mask
    >>> from flexcomp.masks import causal_mask
    >>> block_kinds(create_block_mask(causal_mask, 1, 1, 384, 384, device="cpu")).tolist()
    [[1, 0, 0], [2, 1, 0], [2, 2, 1]]
    """
    lead = tuple(block_mask.kv_num_blocks.shape[:-1])
    if len(lead) > 2:
        raise ValueError(f"block mask with batch dims {lead}: expected at most [B, H]")
    pad = (1,) * (2 - len(lead))
    bi, hi = _pick((pad + lead)[0], b, "b"), _pick((pad + lead)[1], h, "h")

    def one(t: Tensor) -> Tensor:  # [*lead, ...] -> [...] of (b, h), on the CPU
        return t.reshape(pad + tuple(t.shape))[bi, hi].cpu()

    n = block_mask.kv_indices.shape[-1]
    kind = _ordered_to_dense(one(block_mask.kv_num_blocks), one(block_mask.kv_indices), n).to(torch.int8)
    kind = kind * int(BlockKind.PARTIAL)
    if block_mask.full_kv_num_blocks is not None:
        full = _ordered_to_dense(one(block_mask.full_kv_num_blocks), one(block_mask.full_kv_indices), n).bool()
        kind = torch.where(full, torch.tensor(int(BlockKind.FULL), dtype=torch.int8), kind)
    return kind


def block_image(kind: Tensor, max_pixels: int = 1024) -> BlockImage:
    """Shrink a block map (int8 ``[num_q_blocks, num_kv_blocks]`` of :class:`BlockKind`) to at most
    ``max_pixels`` per side: unchanged if it fits, else the mean block density of each pixel.

    >>> kind = torch.tensor([[2, 1, 0, 0], [2, 2, 1, 0]], dtype=torch.int8)
    >>> img = block_image(kind, max_pixels=2)
    >>> img.per_pixel, img.pixels.tolist()
    ((1, 2), [[0.75, 0.0], [1.0, 0.25]])
    """
    max_pixels = _check_positive("max_pixels", max_pixels)
    rows, cols = kind.shape
    fr, fc = max(1, -(-rows // max_pixels)), max(1, -(-cols // max_pixels))
    if (fr, fc) == (1, 1):
        return BlockImage(kind, (1, 1), (rows, cols))
    weights = torch.tensor([BLOCK_STYLES[k].weight for k in _DRAWN_KINDS], dtype=torch.float32)
    dens = weights[kind.long()]
    nr, nc = -(-rows // fr), -(-cols // fc)
    padded = torch.full((nr * fr, nc * fc), math.nan)
    padded[:rows, :cols] = dens
    pixels = torch.nanmean(padded.view(nr, fr, nc, fc), dim=(1, 3))
    return BlockImage(pixels, (fr, fc), (rows, cols))


def _block_sparsity(kind: Tensor, q_block: int, kv_block: int, q_len: int, kv_len: int) -> float:
    """Percentage of the ``q_len x kv_len`` area in empty blocks (last blocks clipped to the lengths)."""
    rows, cols = kind.shape
    heights = (q_len - torch.arange(rows, dtype=torch.float64) * q_block).clamp(0, q_block)
    widths = (kv_len - torch.arange(cols, dtype=torch.float64) * kv_block).clamp(0, kv_block)
    kept = float(((kind != int(BlockKind.EMPTY)).double() * heights[:, None] * widths[None, :]).sum())
    area = q_len * kv_len
    return 100.0 * (1.0 - kept / area) if area else 0.0


def _block_size_text(q_block: int, kv_block: int) -> str:
    return f"{q_block}" if q_block == kv_block else f"{q_block}×{kv_block}"


def _draw_blocks(ax, fig, img: BlockImage, q_block: int, kv_block: int) -> str:
    """Draw a block map; returns the title's description of what one pixel is."""
    fr, fc = img.per_pixel
    rows, cols = img.pixels.shape
    extent = [0, cols * fc * kv_block, rows * fr * q_block, 0]
    nq, nk = img.num_blocks
    what = f"block map, {nq}×{nk} blocks of {_block_size_text(q_block, kv_block)}"
    if img.categorical:
        cmap = _matplotlib().ListedColormap([BLOCK_STYLES[k].colour for k in _DRAWN_KINDS])
        ax.imshow(img.pixels.numpy(), cmap=cmap, vmin=0, vmax=len(_DRAWN_KINDS) - 1, extent=extent,
                  interpolation="antialiased", interpolation_stage="rgba", aspect="auto")
        _legend(ax, [BLOCK_STYLES[k] for k in _DRAWN_KINDS])
        return what
    im = ax.imshow(img.pixels.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, extent=extent,
                   interpolation="antialiased", interpolation_stage="rgba", aspect="auto")
    fig.colorbar(im, ax=ax, label="block density (full 1, partial ½, empty 0)", shrink=0.8)
    return f"{what}, {fr}×{fc} blocks per pixel"


def _check_path(path) -> None:
    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")


# ---- public plots --------------------------------------------------------------------------------
def plot_mask(mask_mod: Callable, Q_LEN: int, KV_LEN: int, *, B: Optional[int] = None, H: Optional[int] = None,
              b: int = 0, h: int = 0, max_pixels: int = 1024, block_size: Union[int, tuple[int, int]] = 128,
              title: Optional[str] = None, path: Optional[Union[str, Path]] = None,
              figsize: Optional[tuple[float, float]] = None, dpi: Optional[float] = None):
    """Draw the mask of ``mask_mod(b, h, q_idx, kv_idx)`` for one batch element ``b`` and head ``h``.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool``, as for :func:`flexcomp.create_block_mask`.
        Q_LEN, KV_LEN: the sequence lengths (rows are queries, columns keys).
        B, H: the batch size and head count the mask is meant for (None: not checked); ``b < B``
            and ``h < H`` are required when given.
        b, h: the batch element and head drawn.
        max_pixels: up to this length on both sides every pair is drawn (kept / masked, from
            :func:`flexcomp.create_mask`). Beyond it, the block map of
            :func:`flexcomp.create_block_mask` with ``block_size`` is drawn instead, downsampled to at
            most ``max_pixels`` per side (see the module's docstring); nothing of size
            ``Q_LEN x KV_LEN`` is built, so 131072 tokens take well under a second.
        block_size: ``BLOCK_SIZE`` of that block map: an int or ``(Q_BLOCK, KV_BLOCK)``.
        title: replaces the default title (the mod's name, the sizes and the density or sparsity).
        path: where to save the figure; the suffix picks the format (``.png``, ``.svg``, ...).
        figsize, dpi: the figure's size in inches and its resolution (default 6.4 x 5.2, matplotlib's dpi).

    Returns the ``matplotlib.figure.Figure``: one image axes in token coordinates (extent
    ``[0, KV_LEN, Q_LEN, 0]``, queries downwards), with a legend or a colour bar.

    >>> from flexcomp.masks import causal_mask, sliding_window
    >>> print(plot_mask(sliding_window(16), 256, 256).axes[0].get_title())
    sliding_window_mask (b=0, h=0)
    256×256 pairs, density 6.4% kept
    >>> print(plot_mask(causal_mask, 4096, 4096, max_pixels=16).axes[0].get_title())
    causal_mask (b=0, h=0)
    block map, 32×32 blocks of 128, 2×2 blocks per pixel
    sparsity 48.4% (area in empty blocks)
    """
    _matplotlib()
    if not callable(mask_mod):
        raise TypeError(f"plot_mask: mask_mod must be callable, got {type(mask_mod).__name__}")
    Q_LEN, KV_LEN = _check_len("plot_mask: Q_LEN", Q_LEN), _check_len("plot_mask: KV_LEN", KV_LEN)
    if 0 in (Q_LEN, KV_LEN):
        raise ValueError(f"plot_mask: nothing to draw for Q_LEN={Q_LEN}, KV_LEN={KV_LEN}")
    B = None if B is None else _check_bh("plot_mask: B", B)
    H = None if H is None else _check_bh("plot_mask: H", H)
    b, h = _check_index("plot_mask: b", b, B, "B"), _check_index("plot_mask: h", h, H, "H")
    max_pixels = _check_positive("plot_mask: max_pixels", max_pixels)
    q_block, kv_block = _block_size("plot_mask", block_size)
    _check_path(path)
    # one (b, h): the mod is evaluated over b, h in {0} and shifted there (traced like any mod)
    mod = mask_mod if (b, h) == (0, 0) else (lambda bb, hh, q_idx, kv_idx: mask_mod(bb + b, hh + h, q_idx, kv_idx))
    fig, ax = _new_axes(figsize, dpi)
    head = f"{_name(mask_mod)} (b={b}, h={h})"
    if Q_LEN <= max_pixels and KV_LEN <= max_pixels:
        dense = create_mask(mod, 1, 1, Q_LEN, KV_LEN, device="cpu")[0, 0]
        cmap = _matplotlib().ListedColormap([PAIR_STYLES[False].colour, PAIR_STYLES[True].colour])
        ax.imshow(dense.to(torch.uint8).numpy(), cmap=cmap, vmin=0, vmax=1, extent=[0, KV_LEN, Q_LEN, 0],
                  interpolation="antialiased", interpolation_stage="rgba", aspect="auto")
        _legend(ax, [PAIR_STYLES[True], PAIR_STYLES[False]])
        what = f"{Q_LEN}×{KV_LEN} pairs, density {100.0 * float(dense.double().mean()):.1f}% kept"
    else:
        bm = create_block_mask(mod, 1, 1, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=(q_block, kv_block))
        kind = block_kinds(bm)
        what = _draw_blocks(ax, fig, block_image(kind, max_pixels), q_block, kv_block)
        what += f"\nsparsity {_block_sparsity(kind, q_block, kv_block, Q_LEN, KV_LEN):.1f}% (area in empty blocks)"
    return _finish(fig, ax, title if title is not None else f"{head}\n{what}", Q_LEN, KV_LEN, path)


def plot_block_mask(block_mask: BlockMask, *, b: int = 0, h: int = 0, max_pixels: int = 1024,
                    title: Optional[str] = None, path: Optional[Union[str, Path]] = None,
                    figsize: Optional[tuple[float, float]] = None, dpi: Optional[float] = None):
    """Draw the full / partial / empty blocks of ``block_mask`` for batch element ``b`` and head ``h``.

    Args:
        block_mask: a :class:`flexcomp.BlockMask` (or torch's: the same fields are read:
            ``kv_num_blocks``, ``kv_indices``, ``full_kv_num_blocks``, ``full_kv_indices``,
            ``BLOCK_SIZE``, ``seq_lengths``). A batch or head dim of size 1 broadcasts.
        b, h: the batch element and head drawn.
        max_pixels: up to this many blocks per side, one pixel per block in three colours with a
            legend (empty: skipped; partial: mask_mod applied; full: mask_mod skipped). A larger
            map is downsampled to mean block densities with a colour bar (see the module's
            docstring). 131072 tokens with BLOCK_SIZE 128 are 1024×1024 blocks: drawn as they are.
        title: replaces the default title (mask_mod's name, the block grid and the sparsity of
            this ``(b, h)``: the percentage of the ``Q_LEN x KV_LEN`` area in empty blocks).
        path: where to save the figure; the suffix picks the format.
        figsize, dpi: the figure's size in inches and its resolution (default 6.4 x 5.2, matplotlib's dpi).

    Returns the ``matplotlib.figure.Figure``: one image axes in tokens (block index x block
    size; the axes stop at ``seq_lengths``, clipping a last block that hangs over the end).

    >>> from flexcomp import create_block_mask
    >>> from flexcomp.masks import causal_mask
    >>> bm = create_block_mask(causal_mask, 1, 1, 1024, 1024, device="cpu")
    >>> fig = plot_block_mask(bm)
    >>> print(fig.axes[0].get_title())
    causal_mask (b=0, h=0)
    block map, 8×8 blocks of 128
    sparsity 43.8% (area in empty blocks)
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['empty: skipped', 'partial: mask_mod applied', 'full: mask_mod skipped']
    """
    _matplotlib()
    for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths"):
        if not hasattr(block_mask, attr):
            raise TypeError(f"plot_block_mask: expected a BlockMask, got {type(block_mask).__name__}")
    b, h = _check_index("plot_block_mask: b", b, None, ""), _check_index("plot_block_mask: h", h, None, "")
    max_pixels = _check_positive("plot_block_mask: max_pixels", max_pixels)
    _check_path(path)
    q_block, kv_block = (int(x) for x in block_mask.BLOCK_SIZE)
    q_len, kv_len = (int(x) for x in block_mask.seq_lengths)
    kind = block_kinds(block_mask, b, h)
    fig, ax = _new_axes(figsize, dpi)
    what = _draw_blocks(ax, fig, block_image(kind, max_pixels), q_block, kv_block)
    what += f"\nsparsity {_block_sparsity(kind, q_block, kv_block, q_len, kv_len):.1f}% (area in empty blocks)"
    name = _name(getattr(block_mask, "mask_mod", None))
    name = "BlockMask" if name in ("None", "_sliced_mask_mod_error") else name
    return _finish(fig, ax, title if title is not None else f"{name} (b={b}, h={h})\n{what}",
                   q_len or kind.shape[0] * q_block, kv_len or kind.shape[1] * kv_block, path)


def attention_weights(query: Tensor, key: Tensor, *, score_mod: Optional[Callable] = None,
                      mask_mod: Optional[Callable] = None, b: int = 0, h: int = 0,
                      scale: Optional[float] = None) -> Tensor:
    """The softmax attention weights ``[L, S]`` (float32, or float64 for float64 inputs) of batch
    element ``b`` and query head ``h``: ``softmax(score_mod(q @ k^T * scale), masked by mask_mod)``
    per row, as :func:`flexcomp.flex_attention` computes them; a row with nothing kept is all 0.

    ``query`` is ``[B, Hq, L, E]``, ``key`` ``[B, Hkv, S, E]`` with ``Hkv`` dividing ``Hq`` (GQA:
    query head ``h`` reads key head ``h // (Hq // Hkv)``); ``scale`` defaults to ``1 / sqrt(E)``.
    Both mods are traced and evaluated by flexcomp, as its reference backend does.

    >>> from flexcomp.masks import causal_mask
    >>> q = k = torch.zeros(1, 1, 3, 4)
    >>> attention_weights(q, k, mask_mod=causal_mask).tolist()
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]
    """
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor [B, H, L, E], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    if Bk != B or Ek != E or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match: they need the same "
                         f"batch size and head dim E, and key heads dividing query heads")
    b, h = _check_index("b", b, B, "B"), _check_index("h", h, Hq, "H")
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    wd = torch.float64 if query.dtype == torch.float64 else torch.float32
    dev = query.device
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int32)  # noqa: E731
    idx = {"b": torch.full((1, 1), b, device=dev, dtype=torch.int32),
           "h": torch.full((1, 1), h, device=dev, dtype=torch.int32),
           "q_idx": ar(L).view(-1, 1), "kv_idx": ar(S).view(1, -1)}
    domain = Domain(B, Hq, L, S)
    with torch.no_grad():
        s = (query[b, h].to(wd) @ key[b, h // (Hq // Hkv)].to(wd).transpose(0, 1)) * scale
        if score_mod is not None:
            tm = trace(score_mod, ModKind.SCORE)
            check_runnable(tm, dev, domain)
            with zero_division_names(tm.graph, tm.fn):
                s = torch.broadcast_to(evaluate(tm.graph, {"score": s, **idx}, tm.buffers, tm.scalars, wd), s.shape)
        if mask_mod is not None:
            tm = trace(mask_mod, ModKind.MASK)
            check_runnable(tm, dev, domain)
            with zero_division_names(tm.graph, tm.fn):
                keep = evaluate(tm.graph, idx, tm.buffers, tm.scalars, torch.float32)
            s = torch.where(torch.broadcast_to(keep, s.shape), s, -torch.inf)
        row_max = s.amax(dim=-1, keepdim=True) if S else s.new_full((L, 1), -torch.inf)
        p = torch.exp(s - torch.where(torch.isneginf(row_max), 0.0, row_max))
        total = p.sum(dim=-1, keepdim=True)
        return (p / torch.where(total == 0, 1.0, total)).cpu()


def plot_scores(query: Tensor, key: Tensor, *, score_mod: Optional[Callable] = None,
                mask_mod: Optional[Callable] = None, b: int = 0, h: int = 0, scale: Optional[float] = None,
                max_tokens: int = 4096, title: Optional[str] = None, path: Optional[Union[str, Path]] = None,
                figsize: Optional[tuple[float, float]] = None, dpi: Optional[float] = None):
    """Draw the softmax attention weights of batch element ``b``, query head ``h`` (as attention-gym's
    ``visualize_attention_scores``), computed by :func:`attention_weights`.

    Args:
        query, key: ``[B, Hq, L, E]`` and ``[B, Hkv, S, E]`` float tensors (small: this builds ``L x S``).
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` applied to ``q @ k^T * scale``.
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool``; masked pairs get weight 0.
        b, h: the batch element and query head drawn.
        scale: the factor on ``q @ k^T`` (default ``1 / sqrt(E)``).
        max_tokens: ``L`` or ``S`` above this raise ValueError (draw masks of long sequences with
            :func:`plot_mask`, which never builds ``L x S``).
        title: replaces the default title (the mods' names, ``b``, ``h`` and the sizes).
        path: where to save the figure; the suffix picks the format.
        figsize, dpi: the figure's size in inches and its resolution (default 6.4 x 5.2, matplotlib's dpi).

    Returns the ``matplotlib.figure.Figure``: one image axes (extent ``[0, S, L, 0]``) and a colour
    bar "attention weight". Rows where the mask keeps nothing are 0.

    >>> from flexcomp.masks import causal_mask, softcap
    >>> q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    >>> fig = plot_scores(q, k, score_mod=softcap(20.0), mask_mod=causal_mask, h=1)
    >>> print(fig.axes[0].get_title())
    attention weights (b=0, h=1), 64×64
    score_mod=softcap_score, mask_mod=causal_mask
    """
    _matplotlib()
    max_tokens = _check_positive("plot_scores: max_tokens", max_tokens)
    for name, t in (("query", query), ("key", key)):
        if isinstance(t, Tensor) and t.dim() == 4 and t.shape[2] > max_tokens:
            raise ValueError(f"plot_scores: {name} has {t.shape[2]} tokens, more than max_tokens={max_tokens}; this "
                             f"plot builds the full L x S weights (raise max_tokens to allow it, or draw the mask "
                             f"alone with plot_mask, which never does)")
    _check_path(path)
    w = attention_weights(query, key, score_mod=score_mod, mask_mod=mask_mod, b=b, h=h, scale=scale)
    L, S = w.shape
    if 0 in (L, S):
        raise ValueError(f"plot_scores: nothing to draw for L={L}, S={S}")
    fig, ax = _new_axes(figsize, dpi)
    im = ax.imshow(w.float().numpy(), cmap="viridis", vmin=0.0, extent=[0, S, L, 0], interpolation="antialiased",
                   aspect="auto")
    fig.colorbar(im, ax=ax, label="attention weight", shrink=0.8)
    default = (f"attention weights (b={b}, h={h}), {L}×{S}\n"
               f"score_mod={_name(score_mod)}, mask_mod={_name(mask_mod)}")
    return _finish(fig, ax, title if title is not None else default, L, S, path)
