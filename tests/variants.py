"""The masks and score_mods of issues 2-3 and their compositions, shared by the kernel tests
(forward and backward), sized for 200-token sequences (documents and padding fit ragged ends)."""
from flexcomp import and_masks, or_masks
from flexcomp.masks import alibi, causal_mask, document_mask, padding_mask, prefix_lm, sliding_window, softcap

MASKS = {
    "none": None,
    "causal": causal_mask,
    "sliding": sliding_window(37),
    "prefix": prefix_lm(50),
    "document": document_mask([50, 90, 60]),
    "padding": padding_mask([150, 61]),
    "and": and_masks(causal_mask, sliding_window(64), document_mask([120, 80])),
    "or": or_masks(prefix_lm(16), sliding_window(8)),
}


def scores(heads: int) -> dict:
    """Score_mods for ``heads`` query heads (ALiBi has one slope per head)."""
    return {"none": None, "alibi": alibi(heads), "softcap": softcap(4.0)}
