"""2-D neighbourhood masks over flattened images: NATTEN and sliding tile attention (STA)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor


def _check_positive(fn: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")


def natten_mask(height: int, width: int, kernel_h: int, kernel_w: int) -> Callable:
    """Neighbourhood attention (NATTEN, Hassani et al., 2023) on a ``height x width`` image.

    Tokens are the pixels in row-major order: token ``t`` is at ``row = t // width``,
    ``col = t % width`` (so the sequence is ``height * width`` long). A query sees the keys in a
    ``kernel_h x kernel_w`` window around it; near a border the window is not cut but shifted
    inwards, so every query sees exactly ``kernel_h * kernel_w`` keys. With ``centre_row =
    clamp(q_row, kernel_h // 2, height - 1 - kernel_h // 2)`` (and the same for columns):

    ``|centre_row - kv_row| <= kernel_h // 2  &  |centre_col - kv_col| <= kernel_w // 2``.

    This is attention-gym's ``generate_natten`` with rows clamped by the height and columns by
    the width (attention-gym pairs them the other way round, the same on square canvases).
    Kernel sizes must be odd (a centred window) and fit in the image.

    >>> from flexcomp import create_mask
    >>> m = create_mask(natten_mask(3, 3, 3, 1), 1, 1, 9, 9, device="cpu")[0, 0]
    >>> m[4].nonzero().flatten().tolist(), m[0].nonzero().flatten().tolist()
    ([1, 4, 7], [0, 3, 6])
    """
    _check_positive("natten_mask", height=height, width=width, kernel_h=kernel_h, kernel_w=kernel_w)
    for name, kernel, size in (("kernel_h", kernel_h, height), ("kernel_w", kernel_w, width)):
        if kernel % 2 == 0 or kernel > size:
            raise ValueError(f"natten_mask: {name} must be odd and at most {size}, got {kernel}")
    half_h, half_w = kernel_h // 2, kernel_w // 2

    def natten(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_row, q_col = q_idx // width, q_idx % width
        kv_row, kv_col = kv_idx // width, kv_idx % width
        centre_row = q_row.clamp(half_h, height - 1 - half_h)
        centre_col = q_col.clamp(half_w, width - 1 - half_w)
        return ((centre_row - kv_row).abs() <= half_h) & ((centre_col - kv_col).abs() <= half_w)

    natten.__name__ = f"natten_{height}x{width}_k{kernel_h}x{kernel_w}"
    return natten


def sliding_tile_mask(height: int, width: int, tile_h: int, tile_w: int, kernel_tiles_h: int,
                      kernel_tiles_w: int, *, text_len: int = 0) -> Callable:
    """Sliding tile attention (STA, Zhang et al., 2025) on a ``height x width`` image cut into tiles.

    The image is cut into ``tile_h x tile_w`` tiles (which must divide it), giving a
    ``height // tile_h`` by ``width // tile_w`` grid of tiles. Tokens are laid out *tile by tile*:
    the ``tile_h * tile_w`` tokens of a tile are contiguous and tiles come in row-major order, so
    token ``t`` lies in tile ``t // (tile_h * tile_w)`` (at tile row ``tile // tiles_w``, tile
    column ``tile % tiles_w``); the order inside a tile does not matter. A query tile sees the key
    tiles of a ``kernel_tiles_h x kernel_tiles_w`` window of tiles, with NATTEN's borders: the
    window spans ``[c - k // 2, c + (k - 1) // 2]`` tiles around a centre ``c`` = the query's tile
    clamped into ``[k // 2, n_tiles - 1 - (k - 1) // 2]``, so it always holds ``k`` tiles (for an
    even ``k`` one more tile before the centre than after it).

    ``text_len`` text tokens may follow the ``height * width`` image tokens: image queries also see
    every text key and text queries see every key, as in attention-gym's
    ``generate_sta_mask_mod_2d`` (whose definition this is; its kernel is given in tokens, here in
    tiles).

    >>> from flexcomp import create_mask
    >>> m = create_mask(sliding_tile_mask(1, 8, 1, 2, 1, 2), 1, 1, 8, 8, device="cpu")[0, 0]
    >>> m.int().tolist()[0], m.int().tolist()[2], m.int().tolist()[7]
    ([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    """
    _check_positive("sliding_tile_mask", height=height, width=width, tile_h=tile_h, tile_w=tile_w,
                    kernel_tiles_h=kernel_tiles_h, kernel_tiles_w=kernel_tiles_w)
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"sliding_tile_mask: text_len must be a non-negative int, got {text_len!r}")
    if height % tile_h or width % tile_w:
        raise ValueError(f"sliding_tile_mask: tiles {tile_h}x{tile_w} must divide the image {height}x{width}")
    tiles_h, tiles_w = height // tile_h, width // tile_w
    if kernel_tiles_h > tiles_h or kernel_tiles_w > tiles_w:
        raise ValueError(f"sliding_tile_mask: the kernel {kernel_tiles_h}x{kernel_tiles_w} tiles is larger than "
                         f"the {tiles_h}x{tiles_w} grid of tiles")
    tile_numel, n_image = tile_h * tile_w, height * width
    before_h, after_h = kernel_tiles_h // 2, (kernel_tiles_h - 1) // 2
    before_w, after_w = kernel_tiles_w // 2, (kernel_tiles_w - 1) // 2

    def sliding_tile(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_tile, kv_tile = q_idx // tile_numel, kv_idx // tile_numel
        q_row, q_col = q_tile // tiles_w, q_tile % tiles_w
        kv_row, kv_col = kv_tile // tiles_w, kv_tile % tiles_w
        centre_row = q_row.clamp(before_h, tiles_h - 1 - after_h)
        centre_col = q_col.clamp(before_w, tiles_w - 1 - after_w)
        rows = (kv_row >= centre_row - before_h) & (kv_row <= centre_row + after_h)
        cols = (kv_col >= centre_col - before_w) & (kv_col <= centre_col + after_w)
        q_image, kv_image = q_idx < n_image, kv_idx < n_image
        kv_text = ~kv_image & (kv_idx < n_image + text_len)
        tiles = q_image & kv_image & rows & cols
        return tiles | (q_image & kv_text) | (~q_image & (kv_idx < n_image + text_len))

    sliding_tile.__name__ = (f"sliding_tile_{height}x{width}_t{tile_h}x{tile_w}_k{kernel_tiles_h}x{kernel_tiles_w}"
                             + (f"_text{text_len}" if text_len else ""))
    return sliding_tile
