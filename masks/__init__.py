"""flexcomp.masks: ready-made mask_mods and score_mods, each a plain function you can compose.

mask_mods (for ``create_block_mask``): :func:`causal_mask`, :func:`sliding_window`,
:func:`prefix_lm`, :func:`document_mask`, :func:`padding_mask`, :func:`dilated_sliding_window`,
:func:`global_tokens`, :func:`shared_prefix_mask`, :func:`block_diffusion_mask` (``patterns``),
:func:`natten_mask`, :func:`sliding_tile_mask` (2-D images, ``spatial``).
score_mods (for ``flex_attention(score_mod=...)``): :func:`alibi`, :func:`softcap`,
:func:`relative_position_bias` (``bias``).

Combine mask_mods with ``flexcomp.and_masks`` / ``flexcomp.or_masks``.
"""
from .alibi import alibi, alibi_slopes
from .bias import relative_position_bias
from .causal import causal_mask
from .documents import document_mask
from .patterns import block_diffusion_mask, dilated_sliding_window, global_tokens, shared_prefix_mask
from .softcap import softcap
from .spatial import natten_mask, sliding_tile_mask
from .windows import padding_mask, prefix_lm, sliding_window

__all__ = ["causal_mask", "sliding_window", "prefix_lm", "document_mask", "padding_mask", "alibi",
           "alibi_slopes", "softcap", "dilated_sliding_window", "global_tokens", "shared_prefix_mask",
           "block_diffusion_mask", "natten_mask", "sliding_tile_mask", "relative_position_bias"]
