"""flexcomp.masks: ready-made mask_mods and score_mods, each a plain function you can compose.

mask_mods (for ``create_block_mask``): :func:`causal_mask`, :func:`sliding_window`,
:func:`prefix_lm`, :func:`document_mask`, :func:`padding_mask`.
score_mods (for ``flex_attention(score_mod=...)``): :func:`alibi`, :func:`softcap`.

Combine mask_mods with ``flexcomp.and_masks`` / ``flexcomp.or_masks``.
"""
from .alibi import alibi, alibi_slopes
from .causal import causal_mask
from .documents import document_mask
from .softcap import softcap
from .windows import padding_mask, prefix_lm, sliding_window

__all__ = ["causal_mask", "sliding_window", "prefix_lm", "document_mask", "padding_mask", "alibi",
           "alibi_slopes", "softcap"]
