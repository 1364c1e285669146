"""The flash-attention forward kernel, driven by a BlockMask.

One program computes ``BLOCK_M`` query rows of one (batch, head). It walks the row's *full* kv
blocks (no mask_mod), then its *partial* ones (mask_mod and the sequence bounds applied), with an
online softmax in float32 on the exp2 scale (``log2(e)`` folded into the score scale). Empty
blocks are never visited. It writes the output in the input dtype and the LSE in natural log;
rows with nothing kept get output 0 and LSE -inf, rows whose largest score is +inf LSE +inf (as
torch). ``OUTPUT_MAX`` also writes each row's largest modified, masked score (in score units).

``FP64`` (float64 inputs): scores, softmax statistics, accumulators, LSE and max in float64, the
scale read from a float64 device scalar (``sm_scale`` is then its pointer); the other dtypes
compile exactly as without the switch.

``SCORE_MOD`` and ``MASK_MOD`` are generated ``@triton.jit`` functions (``flexcomp.codegen.lower``)
passed as compile-time arguments, each with one flat tuple of what it captured (``*_BUFS``).
Tensors come as a pointer and a stride tuple (``S*``, see :mod:`.common`); the compiled kernel is
named after its mods (:func:`.common.variant_name`).
"""
import triton
import triton.language as tl

from .common import (LN2, LOG2E, dropout_base, dropout_keep, dropout_rows, head_base, load_rows, store_rows,
                     tile_ptrs, variant_name)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, K_base, V_base, SK, SV, start_n, q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale,
    SCORE_MOD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr, DROPOUT: tl.constexpr, DROP, drop_rows,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_kv = offs_n < KV_LEN
    # every block lies inside the sequence when KV_LEN % SPARSE_KV == 0: then no bounds at all
    k = load_rows(tile_ptrs(K_base, offs_n, offs_d, SK), in_kv, offs_d, D, D_PAD, not EVEN_KV)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if EVEN_KV:
        kv_idx = offs_n[None, :]
    else:
        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]  # mods never see an out-of-range index
    if HAS_SCORE_MOD:
        qk = SCORE_MOD(qk * sm_scale, off_b, off_h, q_idx, kv_idx, SCORE_BUFS) * LOG2E
    else:
        qk = qk * qk_scale
    if APPLY_MASK and HAS_MASK_MOD:  # partial blocks: the mask_mod decides
        keep = MASK_MOD(off_b, off_h, q_idx, kv_idx, MASK_BUFS)
        if not EVEN_KV:
            keep = keep & in_kv[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    elif not EVEN_KV:  # a block (full ones too, e.g. after BlockMask._adjust) may hang over the end
        qk = tl.where(in_kv[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(tile_ptrs(V_base, offs_n, offs_dv, SV), in_kv, offs_dv, DV, DV_PAD, not EVEN_KV)
    if DROPOUT:  # the LSE is the softmax's; only the output sees dropped pairs (weight 0, 1 / (1 - p) at the end)
        p = tl.where(dropout_keep(drop_rows, start_n, BLOCK_N, DROP[1], True), p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=acc.dtype)
    return acc, l_i, m_new


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, K_base, V_base, SK, SV, IDX, n_blocks, stride_in, q_idx, off_b, off_h, KV_LEN, qk_scale,
    sm_scale, SCORE_MOD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SPARSE_KV: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr, EVEN_KV: tl.constexpr,
    STATIC_SUB: tl.constexpr, NUM_KV_BLOCKS, DROPOUT: tl.constexpr, DROP, drop_rows,
):
    """Every kv block listed in ``IDX[0:n_blocks]``, in BLOCK_N-wide tiles.

    ``STATIC_SUB`` unrolls a block's tiles (fastest; each unrolled tile has its own pipeline
    buffers in shared memory), otherwise they run in a loop (for wide heads in float32). Triton
    picks unrolling by the loop's iterator, so the one tile call is written under each.
    Block numbers are clamped to the sequence, so no BlockMask can send a load outside K or V.
    """
    SUB: tl.constexpr = SPARSE_KV // BLOCK_N
    for i in range(n_blocks):
        start = tl.minimum(tl.maximum(tl.load(IDX + i * stride_in), 0), NUM_KV_BLOCKS - 1) * SPARSE_KV
        if STATIC_SUB:
            for j in tl.static_range(SUB):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, K_base, V_base, SK, SV, start + j * BLOCK_N, q_idx, off_b, off_h, KV_LEN,
                    qk_scale, sm_scale, SCORE_MOD, SCORE_BUFS, MASK_MOD, MASK_BUFS, HAS_SCORE_MOD, HAS_MASK_MOD,
                    APPLY_MASK, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV, DROPOUT, DROP, drop_rows)
        else:
            for j in range(SUB):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, K_base, V_base, SK, SV, start + j * BLOCK_N, q_idx, off_b, off_h, KV_LEN,
                    qk_scale, sm_scale, SCORE_MOD, SCORE_BUFS, MASK_MOD, MASK_BUFS, HAS_SCORE_MOD, HAS_MASK_MOD,
                    APPLY_MASK, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV, DROPOUT, DROP, drop_rows)
    return acc, l_i, m_i


@triton.jit(repr=variant_name("flex_fwd"))
def flex_fwd(
    Q, K, V, O, LSE, MAX, SQ, SK, SV, SO, SL,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, SN, SI,
    H, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_MOD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr, STATIC_SUB: tl.constexpr,
    OUTPUT_MAX: tl.constexpr, FP64: tl.constexpr, DROPOUT: tl.constexpr, DROP,
):
    """``O [B, H, Q_LEN, DV]``, ``LSE`` and (``OUTPUT_MAX``) ``MAX`` ``[B, H, Q_LEN]`` (strides
    ``SL`` for both) for the ``BLOCK_M`` query rows ``program_id(0)`` of (batch, head)
    ``program_id(1)``. ``SN`` / ``SI``: strides of the block counts ``[B, H, rows]`` and of the
    block lists ``[B, H, rows, n]``. ``DROPOUT``: attention dropout, ``DROP = (seed, threshold,
    1 / (1 - p))`` (:mod:`flexcomp.dropout`)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    if FP64:
        sm_scale = tl.load(sm_scale)  # a float64 scalar's pointer: kernel arguments are float32
    pid_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = off_hz // H
    off_h = off_hz % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_q = offs_m < Q_LEN
    q = load_rows(tile_ptrs(head_base(Q, SQ, off_b, off_h), offs_m, offs_d, SQ), in_q, offs_d, D, D_PAD, True)
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    K_base = head_base(K, SK, off_b, off_h // GROUP)
    V_base = head_base(V, SV, off_b, off_h // GROUP)
    NUM_KV_BLOCKS = tl.cdiv(KV_LEN, SPARSE_KV)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, DV_PAD], ACC)
    row = (pid_m * BLOCK_M) // SPARSE_Q
    num_off = head_base(0, SN, off_b, off_h) + row * SN[2]
    idx_off = head_base(0, SI, off_b, off_h) + row * SI[2]
    drop_rows = dropout_rows(dropout_base(DROP[0], off_b, off_h), pid_m * BLOCK_M, BLOCK_M) if DROPOUT else 0
    # partial blocks first, then full ones (as torch): 2-3.5% faster on the H200 (docs/performance.md)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_base, V_base, SK, SV, KV_IDX + idx_off, tl.load(KV_NUM + num_off), SI[3],
        q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale, SCORE_MOD, SCORE_BUFS, MASK_MOD, MASK_BUFS,
        HAS_SCORE_MOD, HAS_MASK_MOD, True, SPARSE_KV, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV,
        STATIC_SUB, NUM_KV_BLOCKS, DROPOUT, DROP, drop_rows)
    if HAS_FULL:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_base, V_base, SK, SV, FULL_IDX + idx_off, tl.load(FULL_NUM + num_off), SI[3],
            q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale, SCORE_MOD, SCORE_BUFS, MASK_MOD, MASK_BUFS,
            HAS_SCORE_MOD, HAS_MASK_MOD, False, SPARSE_KV, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV,
            STATIC_SUB, NUM_KV_BLOCKS, DROPOUT, DROP, drop_rows)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * DROP[2]  # the kept pairs' weight 1 / (1 - p)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)  # inf - inf made l_i NaN; torch's logsumexp: +inf
    store_rows(tile_ptrs(head_base(O, SO, off_b, off_h), offs_m, offs_dv, SO), out, in_q, offs_dv, DV)
    lse_ptrs = head_base(LSE, SL, off_b, off_h) + offs_m * SL[2]
    tl.store(lse_ptrs, lse, mask=in_q)
    if OUTPUT_MAX:  # m_i is on the exp2 scale; -inf stays -inf for rows with nothing kept
        tl.store(head_base(MAX, SL, off_b, off_h) + offs_m * SL[2], m_i * LN2, mask=in_q)
