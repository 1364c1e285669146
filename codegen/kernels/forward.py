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
passed as compile-time arguments; their captured tensors and numbers come in the ``*_BUFS``,
``*_STRIDES``, ``*_SIZES``, ``*_SI`` and ``*_SF`` arguments.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_rows(ptrs, in_rows, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A [rows, D_PAD] tile: bounds on the rows only if asked, on the head dim only if padded."""
    if CHECK_ROWS:
        return tl.load(ptrs, mask=in_rows[:, None] & (offs_d[None, :] < D), other=0.0)
    elif D == D_PAD:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, K_base, V_base, start_n, q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    SCORE_MOD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_kv = offs_n < KV_LEN
    k_ptrs = K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    # every block lies inside the sequence when KV_LEN % SPARSE_KV == 0: then no bounds at all
    k = _load_rows(k_ptrs, in_kv, offs_d, D, D_PAD, not EVEN_KV)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if EVEN_KV:
        kv_idx = offs_n[None, :]
    else:
        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]  # mods never see an out-of-range index
    if HAS_SCORE_MOD:
        qk = SCORE_MOD(qk * sm_scale, off_b, off_h, q_idx, kv_idx,
                       SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF) * LOG2E
    else:
        qk = qk * qk_scale
    if APPLY_MASK and HAS_MASK_MOD:  # partial blocks: the mask_mod decides
        keep = MASK_MOD(off_b, off_h, q_idx, kv_idx, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF)
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
    v = _load_rows(v_ptrs, in_kv, offs_dv, DV, DV_PAD, not EVEN_KV)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=acc.dtype)
    return acc, l_i, m_new


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, K_base, V_base, IDX, n_blocks, stride_in, q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    SCORE_MOD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SPARSE_KV: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr, EVEN_KV: tl.constexpr,
    STATIC_SUB: tl.constexpr, NUM_KV_BLOCKS,
):
    """Every kv block listed in ``IDX[0:n_blocks]``, in BLOCK_N-wide tiles.

    ``STATIC_SUB`` unrolls a block's tiles (fastest; each unrolled tile has its own pipeline
    buffers in shared memory), otherwise they run in a loop (for wide heads in float32).
    Block numbers are clamped to the sequence, so no BlockMask can send a load outside K or V.
    """
    for i in range(n_blocks):
        kv_block = tl.minimum(tl.maximum(tl.load(IDX + i * stride_in), 0), NUM_KV_BLOCKS - 1)
        if STATIC_SUB:
            for j in tl.static_range(SPARSE_KV // BLOCK_N):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, K_base, V_base, kv_block * SPARSE_KV + j * BLOCK_N, q_idx, off_b, off_h,
                    KV_LEN, qk_scale, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                    SCORE_MOD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
                    MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
                    HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=APPLY_MASK, BLOCK_N=BLOCK_N, D=D, D_PAD=D_PAD,
                    DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_KV=EVEN_KV)
        else:
            for j in range(SPARSE_KV // BLOCK_N):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, K_base, V_base, kv_block * SPARSE_KV + j * BLOCK_N, q_idx, off_b, off_h,
                    KV_LEN, qk_scale, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                    SCORE_MOD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
                    MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
                    HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=APPLY_MASK, BLOCK_N=BLOCK_N, D=D, D_PAD=D_PAD,
                    DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_KV=EVEN_KV)
    return acc, l_i, m_i


@triton.jit
def flex_fwd(
    Q, K, V, O, LSE, MAX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    H, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_MOD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr, STATIC_SUB: tl.constexpr,
    OUTPUT_MAX: tl.constexpr, FP64: tl.constexpr,
):
    """``O [B, H, Q_LEN, DV]``, ``LSE`` and (``OUTPUT_MAX``) ``MAX`` ``[B, H, Q_LEN]`` (strides
    ``stride_l*`` for both) for the ``BLOCK_M`` query rows ``program_id(0)`` of (batch, head)
    ``program_id(1)``."""
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
    ob, oh = off_b.to(tl.int64), off_h.to(tl.int64)  # base offsets in 64 bits: large batches overflow 32
    q = tl.load(Q + ob * stride_qb + oh * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    K_base = K + ob * stride_kb + (oh // GROUP) * stride_kh
    V_base = V + ob * stride_vb + (oh // GROUP) * stride_vh
    NUM_KV_BLOCKS = tl.cdiv(KV_LEN, SPARSE_KV)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, DV_PAD], ACC)
    row = (pid_m * BLOCK_M) // SPARSE_Q
    num_off = ob * stride_nb + oh * stride_nh + row * stride_nm
    idx_off = ob * stride_ib + oh * stride_ih + row * stride_im
    if HAS_FULL:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_base, V_base, FULL_IDX + idx_off, tl.load(FULL_NUM + num_off), stride_in,
            q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            SCORE_MOD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=False, SPARSE_KV=SPARSE_KV, BLOCK_N=BLOCK_N, D=D, D_PAD=D_PAD,
            DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_KV=EVEN_KV, STATIC_SUB=STATIC_SUB,
            NUM_KV_BLOCKS=NUM_KV_BLOCKS)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_base, V_base, KV_IDX + idx_off, tl.load(KV_NUM + num_off), stride_in,
        q_idx, off_b, off_h, KV_LEN, qk_scale, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
        SCORE_MOD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
        MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
        HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=True, SPARSE_KV=SPARSE_KV, BLOCK_N=BLOCK_N, D=D, D_PAD=D_PAD,
        DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_KV=EVEN_KV, STATIC_SUB=STATIC_SUB,
        NUM_KV_BLOCKS=NUM_KV_BLOCKS)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)  # inf - inf made l_i NaN; torch's logsumexp: +inf
    tl.store(O + ob * stride_ob + oh * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=in_q[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + ob * stride_lb + oh * stride_lh + offs_m * stride_lm, lse, mask=in_q)
    if OUTPUT_MAX:  # m_i is on the exp2 scale; -inf stays -inf for rows with nothing kept
        tl.store(MAX + ob * stride_lb + oh * stride_lh + offs_m * stride_lm, m_i * LN2, mask=in_q)
