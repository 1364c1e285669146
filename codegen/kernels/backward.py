"""The flash-attention backward kernels, driven by a BlockMask.

Two launches (three when the dQ and dK/dV programs run apart: ``BWD_SPLIT``, deterministic mode),
as in FlashAttention-2 (no atomics on dQ, dK or dV):

1. ``flex_bwd_delta``: ``delta = rowsum(dO * O) - dLSE`` per query row (``dLSE`` is the gradient of
   the returned LSE: ``d lse / d s = p``, so it enters exactly where ``delta`` does).
2. ``flex_bwd``, two kinds of programs in one grid:
   - dQ (``_dq_program``): one program per ``BLOCK_M2`` query rows walks the rows' kv blocks (full
     blocks without mask_mod, then partial ones) and accumulates ``dQ``;
   - dK/dV (``_dkdv_program``): one program per ``BLOCK_N1`` keys walks the transposed block lists
     (``q_num_blocks / q_indices``, ``full_q_*``) for every query head of its GQA group, so dK and
     dV sum over the group in registers, without copies.

Per tile, with ``s = q k^T * scale`` and ``s' = score_mod(s)``: ``p = exp(s' - lse)``,
``dP = dO v^T``, ``dS' = p * (dP - delta)`` (the gradient wrt the modified score) and
``dS = dS' * d score_mod / d s``, where ``SCORE_GRAD`` is the generated function returning
``(s', d s'/d s)`` from one shared computation (``flexcomp.derivative.value_and_derivatives``).
Masked pairs (mask_mod False, or out of the sequence) get ``dS = 0`` whatever the derivative is
there, so rows with nothing kept give zero gradients, never NaN.

Gradients into captured tensors are scattered from ``dS'`` by a generated ``SCATTER`` function
(``flexcomp.codegen.lower.lower_scatter``): float32 atomics in the dK/dV pass by default; in
deterministic mode the dQ pass first records the largest contribution (``SCATTER_MODE`` 1) and the
dK/dV pass adds fixed-point int64 values (mode 2), whose sum does not depend on the order.

``FP64`` (float64 inputs): delta, scores, probabilities and the dQ/dK/dV accumulators in float64,
the scale read from a float64 device scalar (``sm_scale`` is then its pointer), the LSE float64;
the generated functions are their float64 variants and scatter float64 contributions. The other
dtypes compile exactly as without the switch.
"""
import triton
import triton.language as tl

from .forward import _load_rows

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def flex_bwd_delta(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    H, Q_LEN,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, FP64: tl.constexpr,
):
    """``DELTA[b, h, m] = sum_d O * dO - dLSE`` in float32, float64 if ``FP64`` (``DELTA`` contiguous
    ``[B, H, L]``)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    ob, oh = (off_hz // H).to(tl.int64), (off_hz % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    in_q = offs_m < Q_LEN
    mask = in_q[:, None] & (offs_d[None, :] < DV)
    o = tl.load(O + ob * stride_ob + oh * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + ob * stride_dob + oh * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(ACC)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + ob * stride_lb + oh * stride_lh + offs_m * stride_lm, mask=in_q, other=0.0)
    tl.store(DELTA + off_hz.to(tl.int64) * Q_LEN + offs_m, delta, mask=in_q)


@triton.jit
def _scores(
    s, off_b, off_h, q_idx, kv_idx, in_bounds,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr,
):
    """The modified scores on the exp2 scale (-inf where masked), ``d s' / d s`` and the kept pairs."""
    if HAS_SCORE_MOD:
        post, dmod = SCORE_GRAD(s, off_b, off_h, q_idx, kv_idx,
                                SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF)
    else:
        post = s
        dmod = 1.0
    keep = in_bounds
    if APPLY_MASK and HAS_MASK_MOD:
        keep = keep & MASK_MOD(off_b, off_h, q_idx, kv_idx, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF)
    if (APPLY_MASK and HAS_MASK_MOD) or CHECK_BOUNDS:
        post = tl.where(keep, post * LOG2E, float("-inf"))
    else:
        post = post * LOG2E
    return post, dmod, keep


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, K_base, V_base, start_n, q_idx, in_q, off_b, off_h, KV_LEN, sm_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr, EVEN_KV: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_kv = offs_n < KV_LEN
    k = _load_rows(K_base + offs_n[:, None] * stride_kn + tl.arange(0, D_PAD)[None, :] * stride_kd,
                   in_kv, tl.arange(0, D_PAD), D, D_PAD, not EVEN_KV)
    v = _load_rows(V_base + offs_n[:, None] * stride_vn + tl.arange(0, DV_PAD)[None, :] * stride_vd,
                   in_kv, tl.arange(0, DV_PAD), DV, DV_PAD, not EVEN_KV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
    if EVEN_KV:
        kv_idx = offs_n[None, :]
    else:
        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]
    post, dmod, keep = _scores(
        s, off_b, off_h, q_idx, kv_idx, in_kv[None, :],
        SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
        MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
        HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, CHECK_BOUNDS=not EVEN_KV)
    p = tl.exp2(post - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    dsp = p * (dp - delta[:, None])
    if SCATTER_MODE == 1:  # deterministic mode, first pass: the largest contribution
        SCATTER(s, dsp, keep & in_q[:, None], off_b, off_h, q_idx, kv_idx,
                SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF, GRADS, GSTRIDES, AUX,
                Q_AXIS=0, MODE=1)
    ds = dsp * dmod
    if HAS_SCORE_MOD or (APPLY_MASK and HAS_MASK_MOD) or not EVEN_KV:
        ds = tl.where(keep, ds, 0.0)  # no NaN from a derivative where nothing was kept
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=dq.dtype)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, K_base, V_base, IDX, n_blocks, stride_in, q_idx, in_q, off_b, off_h, KV_LEN, sm_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_KV: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_KV: tl.constexpr, NUM_KV_BLOCKS,
):
    """The kv blocks listed in ``IDX[0:n_blocks]``, in BLOCK_N-wide tiles, as one flat loop
    (one software pipeline over every tile); block numbers are clamped to the sequence."""
    MULT: tl.constexpr = SPARSE_KV // BLOCK_N
    for t in range(n_blocks * MULT):
        kv_block = tl.minimum(tl.maximum(tl.load(IDX + (t // MULT) * stride_in), 0), NUM_KV_BLOCKS - 1)
        dq = _dq_tile(
            dq, q, do, lse2, delta, K_base, V_base, kv_block * SPARSE_KV + (t % MULT) * BLOCK_N, q_idx, in_q,
            off_b, off_h, KV_LEN, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            SCATTER, GRADS, GSTRIDES, AUX,
            HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, SCATTER_MODE, BLOCK_N, D, D_PAD, DV, DV_PAD,
            PRECISION, EVEN_KV)
    return dq


@triton.jit
def _dq_program(
    pid_m, off_b, off_h, Q, K, V, DO, GRAD_Q, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    H, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr, FP64: tl.constexpr,
):
    """dQ for ``BLOCK_M`` query rows of one (batch, query head)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    off_hz = off_b * H + off_h
    ob, oh = off_b.to(tl.int64), off_h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_q = offs_m < Q_LEN
    q = _load_rows(Q + ob * stride_qb + oh * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   in_q, offs_d, D, D_PAD, True)
    do = _load_rows(DO + ob * stride_dob + oh * stride_doh + offs_m[:, None] * stride_dom
                    + offs_dv[None, :] * stride_dod, in_q, offs_dv, DV, DV_PAD, True)
    lse = tl.load(LSE + ob * stride_lb + oh * stride_lh + offs_m * stride_lm, mask=in_q, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)  # rows with nothing kept: every p is 0
    delta = tl.load(DELTA + off_hz.to(tl.int64) * Q_LEN + offs_m, mask=in_q, other=0.0)
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    K_base = K + ob * stride_kb + (oh // GROUP) * stride_kh
    V_base = V + ob * stride_vb + (oh // GROUP) * stride_vh
    NUM_KV_BLOCKS = tl.cdiv(KV_LEN, SPARSE_KV)
    dq = tl.zeros([BLOCK_M, D_PAD], ACC)
    row = (pid_m * BLOCK_M) // SPARSE_Q
    num_off = ob * stride_nb + oh * stride_nh + row * stride_nm
    idx_off = ob * stride_ib + oh * stride_ih + row * stride_im
    if HAS_FULL:
        dq = _dq_blocks(
            dq, q, do, lse2, delta, K_base, V_base, FULL_IDX + idx_off, tl.load(FULL_NUM + num_off), stride_in,
            q_idx, in_q, off_b, off_h, KV_LEN, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            SCATTER, GRADS, GSTRIDES, AUX,
            HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=False, SCATTER_MODE=SCATTER_MODE, SPARSE_KV=SPARSE_KV,
            BLOCK_N=BLOCK_N, D=D, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_KV=EVEN_KV,
            NUM_KV_BLOCKS=NUM_KV_BLOCKS)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, K_base, V_base, KV_IDX + idx_off, tl.load(KV_NUM + num_off), stride_in,
        q_idx, in_q, off_b, off_h, KV_LEN, sm_scale, stride_kn, stride_kd, stride_vn, stride_vd,
        SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
        MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
        SCATTER, GRADS, GSTRIDES, AUX,
        HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=True, SCATTER_MODE=SCATTER_MODE, SPARSE_KV=SPARSE_KV,
        BLOCK_N=BLOCK_N, D=D, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_KV=EVEN_KV,
        NUM_KV_BLOCKS=NUM_KV_BLOCKS)
    dq = dq * sm_scale
    tl.store(GRAD_Q + ob * stride_dqb + oh * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(GRAD_Q.dtype.element_ty), mask=in_q[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, start_m, kv_idx, in_kv, off_b, off_h, Q_LEN, sm_scale,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr, EVEN_Q: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_M]`` tile in the transposed orientation (keys down, queries across)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_q = offs_m < Q_LEN
    q = _load_rows(Q_base + offs_m[:, None] * stride_qm + tl.arange(0, D_PAD)[None, :] * stride_qd,
                   in_q, tl.arange(0, D_PAD), D, D_PAD, not EVEN_Q)
    do = _load_rows(DO_base + offs_m[:, None] * stride_dom + tl.arange(0, DV_PAD)[None, :] * stride_dod,
                    in_q, tl.arange(0, DV_PAD), DV, DV_PAD, not EVEN_Q)
    if EVEN_Q:
        lse = tl.load(LSE_base + offs_m * stride_lm)
        delta = tl.load(DELTA_base + offs_m)
        q_idx = offs_m[None, :]
    else:
        lse = tl.load(LSE_base + offs_m * stride_lm, mask=in_q, other=0.0)
        delta = tl.load(DELTA_base + offs_m, mask=in_q, other=0.0)
        q_idx = tl.minimum(offs_m, Q_LEN - 1)[None, :]
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale
    post, dmod, keep = _scores(
        sT, off_b, off_h, q_idx, kv_idx, in_q[None, :],
        SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
        MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
        HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, CHECK_BOUNDS=not EVEN_Q)
    pT = tl.exp2(post - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=dv.dtype)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dspT = pT * (dpT - delta[None, :])
    if SCATTER_MODE == 0 or SCATTER_MODE == 2:  # captured-tensor gradients: atomics or fixed point
        SCATTER(sT, dspT, keep & in_kv[:, None], off_b, off_h, q_idx, kv_idx,
                SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF, GRADS, GSTRIDES, AUX,
                Q_AXIS=1, MODE=SCATTER_MODE)
    dsT = dspT * dmod
    if HAS_SCORE_MOD or (APPLY_MASK and HAS_MASK_MOD) or not EVEN_Q:
        dsT = tl.where(keep, dsT, 0.0)
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, IDX, n_blocks, stride_in, kv_idx, in_kv, off_b, off_h,
    Q_LEN, sm_scale, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_Q: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_Q: tl.constexpr, NUM_Q_BLOCKS,
):
    """The query blocks listed in ``IDX[0:n_blocks]``, in BLOCK_M-tall tiles, as one flat loop."""
    MULT: tl.constexpr = SPARSE_Q // BLOCK_M
    for t in range(n_blocks * MULT):
        q_block = tl.minimum(tl.maximum(tl.load(IDX + (t // MULT) * stride_in), 0), NUM_Q_BLOCKS - 1)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, q_block * SPARSE_Q + (t % MULT) * BLOCK_M,
            kv_idx, in_kv, off_b, off_h, Q_LEN, sm_scale, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
            SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            SCATTER, GRADS, GSTRIDES, AUX,
            HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, SCATTER_MODE, BLOCK_M, D, D_PAD, DV, DV_PAD,
            PRECISION, EVEN_Q)
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, off_b, off_hkv, Q, K, V, DO, GRAD_K, GRAD_V, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    Q_NUM, Q_IDX, FULL_NUM, FULL_IDX,
    stride_nb, stride_nh, stride_nn,
    stride_ib, stride_ih, stride_in, stride_im,
    HKV, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_Q: tl.constexpr, FP64: tl.constexpr,
):
    """dK and dV for ``BLOCK_N`` keys of one (batch, key/value head), summed over its query heads."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    ob = off_b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_kv = offs_n < KV_LEN
    k = _load_rows(K + ob * stride_kb + off_hkv.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, in_kv, offs_d, D, D_PAD, True)
    v = _load_rows(V + ob * stride_vb + off_hkv.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                   + offs_dv[None, :] * stride_vd, in_kv, offs_dv, DV, DV_PAD, True)
    kv_idx = tl.minimum(offs_n, KV_LEN - 1)[:, None]
    NUM_Q_BLOCKS = tl.cdiv(Q_LEN, SPARSE_Q)
    dk = tl.zeros([BLOCK_N, D_PAD], ACC)
    dv = tl.zeros([BLOCK_N, DV_PAD], ACC)
    col = (pid_n * BLOCK_N) // SPARSE_KV
    for g in range(GROUP):  # the query heads sharing this key/value head
        off_h = off_hkv * GROUP + g
        oh = off_h.to(tl.int64)
        Q_base = Q + ob * stride_qb + oh * stride_qh
        DO_base = DO + ob * stride_dob + oh * stride_doh
        LSE_base = LSE + ob * stride_lb + oh * stride_lh
        DELTA_base = DELTA + (off_b * (HKV * GROUP) + off_h).to(tl.int64) * Q_LEN
        num_off = ob * stride_nb + oh * stride_nh + col * stride_nn
        idx_off = ob * stride_ib + oh * stride_ih + col * stride_in
        if HAS_FULL:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, FULL_IDX + idx_off, tl.load(FULL_NUM + num_off),
                stride_im, kv_idx, in_kv, off_b, off_h, Q_LEN, sm_scale, stride_qm, stride_qd, stride_dom, stride_dod,
                stride_lm,
                SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
                MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
                SCATTER, GRADS, GSTRIDES, AUX,
                HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=False, SCATTER_MODE=SCATTER_MODE, SPARSE_Q=SPARSE_Q,
                BLOCK_M=BLOCK_M, D=D, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_Q=EVEN_Q,
                NUM_Q_BLOCKS=NUM_Q_BLOCKS)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, Q_IDX + idx_off, tl.load(Q_NUM + num_off),
            stride_im, kv_idx, in_kv, off_b, off_h, Q_LEN, sm_scale, stride_qm, stride_qd, stride_dom, stride_dod,
            stride_lm,
            SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            SCATTER, GRADS, GSTRIDES, AUX,
            HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK=True, SCATTER_MODE=SCATTER_MODE, SPARSE_Q=SPARSE_Q,
            BLOCK_M=BLOCK_M, D=D, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, PRECISION=PRECISION, EVEN_Q=EVEN_Q,
            NUM_Q_BLOCKS=NUM_Q_BLOCKS)
    dk = dk * sm_scale
    store_mask = in_kv[:, None]
    tl.store(GRAD_K + ob * stride_dkb + off_hkv.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(GRAD_K.dtype.element_ty), mask=store_mask & (offs_d[None, :] < D))
    tl.store(GRAD_V + ob * stride_dvb + off_hkv.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(GRAD_V.dtype.element_ty), mask=store_mask & (offs_dv[None, :] < DV))


@triton.jit
def flex_bwd(
    Q, K, V, DO, GRAD_Q, GRAD_K, GRAD_V, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    KV_NUM, KV_IDX, KV_FULL_NUM, KV_FULL_IDX,
    stride_kv_nb, stride_kv_nh, stride_kv_nm,
    stride_kv_ib, stride_kv_ih, stride_kv_im, stride_kv_in,
    Q_NUM, Q_IDX, Q_FULL_NUM, Q_FULL_IDX,
    stride_q_nb, stride_q_nh, stride_q_nn,
    stride_q_ib, stride_q_ih, stride_q_in, stride_q_im,
    HKV, Q_LEN, KV_LEN, GROUP, sm_scale, N_KV_PROGRAMS, N_Q_PROGRAMS,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
    MASK_MOD: tl.constexpr, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
    SCATTER: tl.constexpr, GRADS, GSTRIDES, AUX,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_KV_FULL: tl.constexpr, HAS_Q_FULL: tl.constexpr,
    DQ_SCATTER: tl.constexpr, DKDV_SCATTER: tl.constexpr, RUN_DQ: tl.constexpr, RUN_DKDV: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, FP64: tl.constexpr,
):
    """dQ and dK/dV programs in one launch (grid ``(N_KV_PROGRAMS + GROUP * N_Q_PROGRAMS, B * HKV)``
    when both run): the first ``N_KV_PROGRAMS`` of each (batch, kv head) are dK/dV programs, the
    rest dQ programs of the group's query heads, so the two kinds fill the GPU together.
    Deterministic mode launches the dQ half (``RUN_DQ``) before the dK/dV half (``RUN_DKDV``)."""
    if FP64:
        sm_scale = tl.load(sm_scale)  # a float64 scalar's pointer: kernel arguments are float32
    pid = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = off_hz // HKV
    off_hkv = off_hz % HKV
    if RUN_DKDV and pid < N_KV_PROGRAMS:
        _dkdv_program(
            pid, off_b, off_hkv, Q, K, V, DO, GRAD_K, GRAD_V, LSE, DELTA,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_lb, stride_lh, stride_lm,
            Q_NUM, Q_IDX, Q_FULL_NUM, Q_FULL_IDX, stride_q_nb, stride_q_nh, stride_q_nn,
            stride_q_ib, stride_q_ih, stride_q_in, stride_q_im,
            HKV, Q_LEN, KV_LEN, GROUP, sm_scale,
            SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            SCATTER, GRADS, GSTRIDES, AUX,
            HAS_SCORE_MOD, HAS_MASK_MOD, HAS_Q_FULL, DKDV_SCATTER, SPARSE_Q, SPARSE_KV, BLOCK_M1, BLOCK_N1,
            D, D_PAD, DV, DV_PAD, PRECISION, EVEN_Q, FP64)
    elif RUN_DQ:
        off_pid = pid - N_KV_PROGRAMS if RUN_DKDV else pid
        _dq_program(
            off_pid % N_Q_PROGRAMS, off_b, off_hkv * GROUP + off_pid // N_Q_PROGRAMS,
            Q, K, V, DO, GRAD_Q, LSE, DELTA,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_lb, stride_lh, stride_lm,
            KV_NUM, KV_IDX, KV_FULL_NUM, KV_FULL_IDX, stride_kv_nb, stride_kv_nh, stride_kv_nm,
            stride_kv_ib, stride_kv_ih, stride_kv_im, stride_kv_in,
            HKV * GROUP, Q_LEN, KV_LEN, GROUP, sm_scale,
            SCORE_GRAD, SCORE_BUFS, SCORE_STRIDES, SCORE_SIZES, SCORE_SI, SCORE_SF,
            MASK_MOD, MASK_BUFS, MASK_STRIDES, MASK_SIZES, MASK_SI, MASK_SF,
            SCATTER, GRADS, GSTRIDES, AUX,
            HAS_SCORE_MOD, HAS_MASK_MOD, HAS_KV_FULL, DQ_SCATTER, SPARSE_Q, SPARSE_KV, BLOCK_M2, BLOCK_N2,
            D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV, FP64)
