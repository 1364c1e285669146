"""The split-KV decode kernels (flash-decoding): few queries against a long key/value sequence.

A decode step has one query (up to ~64: speculative decoding, tree verification) per head, so the
prefill grid (one program per 128 query rows) would leave the GPU idle while one program streams the
whole cache. Here:

- ``flex_decode``: program ``(split, group, tile)`` takes the query rows of ``HEADS`` query heads
  that share one key/value head (a GQA group, packed into the rows of one tile, so K and V are read
  once per group) and ``ROWS_Q`` query positions, and walks its share (``split`` of
  ``num_programs(0)``) of the row's listed kv blocks: full ones first, then partial ones (mask_mod),
  with the prefill kernel's tile (:func:`.forward._fwd_blocks`). It writes a normalised partial
  output and its LSE (log2 units) per split, or, with one split, the final output and LSE.
- ``decode_merge``: per (batch, head, query) combines the splits' partial outputs weighted by
  ``exp2(lse_s - max)`` into the output and the natural-log LSE.

Mods, block masks and bounds are exactly the prefill kernel's; the row's head (``h``) reaches the
mods as a column ``[BLOCK_M, 1]`` (rows of several heads share a tile). Rows with nothing kept get
output 0 and LSE -inf.
"""
import triton
import triton.language as tl

from .common import LN2, LOG2E, head_base, load_rows, variant_name
from .forward import _fwd_blocks


@triton.jit(repr=variant_name("flex_decode"))
def flex_decode(
    Q, K, V, O, LSE, SQ, SK, SV, SO, SL,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, SN, SI,
    H, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_MOD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr, ROWS_Q: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr, STATIC_SUB: tl.constexpr, SPLIT: tl.constexpr,
):
    """``SPLIT``: write split ``s``'s partial output ``O [B, H, S, Q_LEN, DV_PAD]`` (float32,
    contiguous) and LSE ``[B, H, S, Q_LEN]`` (log2 units, float32, contiguous), ``S =
    num_programs(0)``; otherwise the output ``O [B, H, Q_LEN, DV]`` (strides ``SO``) and natural-log
    LSE ``[B, H, Q_LEN]`` (strides ``SL``). Query heads ``h0 .. h0 + HEADS`` share key/value head
    ``h0 // GROUP`` and the block lists of head ``h0`` (the launcher packs heads only when the
    lists do not depend on the head)."""
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_t = tl.program_id(2)
    splits = tl.num_programs(0)
    groups = H // HEADS
    off_b = pid_g // groups
    h0 = (pid_g % groups) * HEADS
    r = tl.arange(0, BLOCK_M)
    head = h0 + tl.minimum(r // ROWS_Q, HEADS - 1)
    pos = pid_t * ROWS_Q + r % ROWS_Q
    in_q = (r // ROWS_Q < HEADS) & (pos < Q_LEN)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_q = off_b.to(tl.int64) * SQ[0] + head.to(tl.int64) * SQ[1] + pos.to(tl.int64) * SQ[2]
    q = load_rows(Q + row_q[:, None] + offs_d[None, :] * SQ[3], in_q, offs_d, D, D_PAD, True)
    q_idx = tl.minimum(pos, Q_LEN - 1)[:, None]
    off_h = head[:, None]
    K_base = head_base(K, SK, off_b, h0 // GROUP)
    V_base = head_base(V, SV, off_b, h0 // GROUP)
    NUM_KV_BLOCKS = tl.cdiv(KV_LEN, SPARSE_KV)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    row = (pid_t * ROWS_Q) // SPARSE_Q
    num_off = head_base(0, SN, off_b, h0) + row * SN[2]
    idx_off = head_base(0, SI, off_b, h0) + row * SI[2]
    n_part = tl.load(KV_NUM + num_off)
    if HAS_FULL:
        n_full = tl.load(FULL_NUM + num_off)
    else:
        n_full = n_part * 0
    total = n_full + n_part
    per = tl.cdiv(total, splits)
    lo = tl.minimum(pid_s * per, total)
    hi = tl.minimum(lo + per, total)
    if HAS_FULL:  # this split's share of the full blocks (entries lo .. hi of full, then partial)
        f_lo = tl.minimum(lo, n_full)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_base, V_base, SK, SV, FULL_IDX + idx_off + f_lo * SI[3],
            tl.minimum(hi, n_full) - f_lo, SI[3], q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale,
            SCORE_MOD, SCORE_BUFS, MASK_MOD, MASK_BUFS, HAS_SCORE_MOD, HAS_MASK_MOD, False, SPARSE_KV, BLOCK_N,
            D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV, STATIC_SUB, NUM_KV_BLOCKS, False, (0, 0, 1.0), 0)
    p_lo = tl.maximum(lo, n_full) - n_full
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_base, V_base, SK, SV, KV_IDX + idx_off + p_lo * SI[3],
        tl.maximum(hi, n_full) - n_full - p_lo, SI[3], q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale,
        SCORE_MOD, SCORE_BUFS, MASK_MOD, MASK_BUFS, HAS_SCORE_MOD, HAS_MASK_MOD, True, SPARSE_KV, BLOCK_N,
        D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV, STATIC_SUB, NUM_KV_BLOCKS, False, (0, 0, 1.0), 0)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    lse2 = tl.where(m_i == float("inf"), float("inf"), lse2)
    if SPLIT:
        part = ((off_b.to(tl.int64) * H + head) * splits + pid_s) * Q_LEN + pos  # [B, H, S, Q_LEN] row
        tl.store(O + part[:, None] * DV_PAD + offs_dv[None, :], out, mask=in_q[:, None])
        tl.store(LSE + part, lse2, mask=in_q)
    else:
        row_o = off_b.to(tl.int64) * SO[0] + head.to(tl.int64) * SO[1] + pos.to(tl.int64) * SO[2]
        tl.store(O + row_o[:, None] + offs_dv[None, :] * SO[3], out.to(O.dtype.element_ty),
                 mask=in_q[:, None] & (offs_dv[None, :] < DV))
        row_l = off_b.to(tl.int64) * SL[0] + head.to(tl.int64) * SL[1] + pos.to(tl.int64) * SL[2]
        tl.store(LSE + row_l, lse2 * LN2, mask=in_q)


@triton.jit
def decode_merge(
    O_PART, LSE_PART, O, LSE, SO, SL, H, Q_LEN, SPLITS,
    SPLITS_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):
    """Program ``(b * H + h, pos)``: the output row and natural-log LSE from the ``SPLITS`` partial
    rows of :func:`flex_decode` (weights ``exp2(lse_s - max_s lse_s)``; nothing kept anywhere:
    output 0, LSE -inf; an LSE of +inf stays +inf)."""
    bh = tl.program_id(0)
    pos = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    part = (bh.to(tl.int64) * SPLITS + s) * Q_LEN + pos
    lse = tl.load(LSE_PART + part, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where((top == float("-inf")) | (top == float("inf")), 0.0, top)
    w = tl.exp2(lse - top_safe)
    o = tl.load(O_PART + part[:, None] * DV_PAD + offs_dv[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    den = tl.sum(w, 0)
    den_safe = tl.where(den == 0.0, 1.0, den)
    out = tl.sum(o * w[:, None], 0) / den_safe
    lse_out = tl.where(den == 0.0, float("-inf"), (top_safe + tl.log2(den_safe)) * LN2)
    lse_out = tl.where(top == float("inf"), float("inf"), lse_out)
    b = bh // H
    h = bh % H
    row_o = b.to(tl.int64) * SO[0] + h.to(tl.int64) * SO[1] + pos.to(tl.int64) * SO[2]
    tl.store(O + row_o + offs_dv * SO[3], out.to(O.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + b.to(tl.int64) * SL[0] + h.to(tl.int64) * SL[1] + pos.to(tl.int64) * SL[2], lse_out)
