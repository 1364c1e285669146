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
there, so rows with nothing kept give zero gradients, never NaN. With attention dropout
(``DROPOUT``, ``DROP = (seed, threshold, 1 / (1 - p))``) the forward's keep pattern is regenerated
per tile (:func:`.common.dropout_keep`): ``dV`` sums the dropped, rescaled ``p``, and ``dP`` is
zero where a pair was dropped and rescaled where kept; ``delta = rowsum(dO * O)`` already holds
the dropout (``O`` is the dropped output).

Gradients into captured tensors are scattered from ``dS'`` by a generated ``SCATTER`` function
(``flexcomp.codegen.lower.lower_scatter``), in the mode the plan's launches say
(``flexcomp.plan.ScatterMode``, the kernels' ``*_SCATTER``: -1 none, 0 float atomics in the dK/dV
pass, 1 deterministic mode's first pass recording the largest contribution in the dQ pass, 2 its
fixed-point int64 adds in the dK/dV pass, whose sum does not depend on the order).

Tensors come as a pointer and a stride tuple (``S*``, see :mod:`.common`); each mod with one flat
tuple of what it captured (``SCORE_BUFS``, ``MASK_BUFS``), the scatter with one of gradient buffers
(``GRADS``).

``FP64`` (float64 inputs): delta, scores, probabilities and the dQ/dK/dV accumulators in float64,
the scale read from a float64 device scalar (``sm_scale`` is then its pointer), the LSE float64;
the generated functions are their float64 variants and scatter float64 contributions. The other
dtypes compile exactly as without the switch.
"""
import triton
import triton.language as tl

from .common import (LOG2E, dropout_base, dropout_keep, dropout_rows, head_base, load_rows, store_rows, tile_ptrs,
                     variant_name)


@triton.jit
def flex_bwd_delta(O, DO, DLSE, DELTA, SO, SDO, SL, H, Q_LEN,
                   HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                   FP64: tl.constexpr):
    """``DELTA[b, h, m] = sum_d O * dO - dLSE`` in float32, float64 if ``FP64`` (``DELTA`` contiguous
    ``[B, H, L]``)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b, off_h = off_hz // H, off_hz % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    in_q = offs_m < Q_LEN
    o = load_rows(tile_ptrs(head_base(O, SO, off_b, off_h), offs_m, offs_d, SO), in_q, offs_d, DV, DV_PAD, True)
    do = load_rows(tile_ptrs(head_base(DO, SDO, off_b, off_h), offs_m, offs_d, SDO), in_q, offs_d, DV, DV_PAD, True)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    if HAS_DLSE:
        delta -= tl.load(head_base(DLSE, SL, off_b, off_h) + offs_m * SL[2], mask=in_q, other=0.0)
    tl.store(DELTA + off_hz.to(tl.int64) * Q_LEN + offs_m, delta, mask=in_q)


@triton.jit
def _scores(
    s, off_b, off_h, q_idx, kv_idx, in_bounds, SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr,
    MASK_BUFS, HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr,
):
    """The modified scores on the exp2 scale (-inf where masked), ``d s' / d s`` and the kept pairs."""
    if HAS_SCORE_MOD:
        post, dmod = SCORE_GRAD(s, off_b, off_h, q_idx, kv_idx, SCORE_BUFS)
    else:
        post = s
        dmod = 1.0
    keep = in_bounds
    if APPLY_MASK and HAS_MASK_MOD:
        keep = keep & MASK_MOD(off_b, off_h, q_idx, kv_idx, MASK_BUFS)
    if (APPLY_MASK and HAS_MASK_MOD) or CHECK_BOUNDS:
        post = tl.where(keep, post * LOG2E, float("-inf"))
    else:
        post = post * LOG2E
    return post, dmod, keep


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, K_base, V_base, SK, SV, start_n, q_idx, in_q, off_b, off_h, KV_LEN, sm_scale,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS, SCATTER: tl.constexpr, GRADS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr, EVEN_KV: tl.constexpr,
    DROPOUT: tl.constexpr, DROP, drop_rows,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_kv = offs_n < KV_LEN
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = load_rows(tile_ptrs(K_base, offs_n, offs_d, SK), in_kv, offs_d, D, D_PAD, not EVEN_KV)
    v = load_rows(tile_ptrs(V_base, offs_n, offs_dv, SV), in_kv, offs_dv, DV, DV_PAD, not EVEN_KV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
    if EVEN_KV:
        kv_idx = offs_n[None, :]
    else:
        kv_idx = tl.minimum(offs_n, KV_LEN - 1)[None, :]
    post, dmod, keep = _scores(s, off_b, off_h, q_idx, kv_idx, in_kv[None, :], SCORE_GRAD, SCORE_BUFS, MASK_MOD,
                               MASK_BUFS, HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, CHECK_BOUNDS=not EVEN_KV)
    p = tl.exp2(post - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:  # the forward's pattern, regenerated: d(out) reaches kept pairs only, weighted 1 / (1 - p)
        dp = tl.where(dropout_keep(drop_rows, start_n, BLOCK_N, DROP[1], True), dp * DROP[2], 0.0)
    dsp = p * (dp - delta[:, None])
    if SCATTER_MODE == 1:  # deterministic mode, first pass: the largest contribution
        SCATTER(s, dsp, keep & in_q[:, None], off_b, off_h, q_idx, kv_idx, SCORE_BUFS, GRADS,
                Q_AXIS=0, MODE=1)
    ds = dsp * dmod
    if HAS_SCORE_MOD or (APPLY_MASK and HAS_MASK_MOD) or not EVEN_KV:
        ds = tl.where(keep, ds, 0.0)  # no NaN from a derivative where nothing was kept
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=dq.dtype)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, K_base, V_base, SK, SV, IDX, n_blocks, stride_in, q_idx, in_q, off_b, off_h, KV_LEN,
    sm_scale, SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS, SCATTER: tl.constexpr, GRADS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_KV: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_KV: tl.constexpr, NUM_KV_BLOCKS, DROPOUT: tl.constexpr, DROP, drop_rows,
):
    """The kv blocks listed in ``IDX[0:n_blocks]``, in BLOCK_N-wide tiles, as one flat loop
    (one software pipeline over every tile); block numbers are clamped to the sequence."""
    MULT: tl.constexpr = SPARSE_KV // BLOCK_N
    for t in range(n_blocks * MULT):
        kv_block = tl.minimum(tl.maximum(tl.load(IDX + (t // MULT) * stride_in), 0), NUM_KV_BLOCKS - 1)
        dq = _dq_tile(
            dq, q, do, lse2, delta, K_base, V_base, SK, SV, kv_block * SPARSE_KV + (t % MULT) * BLOCK_N, q_idx, in_q,
            off_b, off_h, KV_LEN, sm_scale, SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS,
            HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, SCATTER_MODE, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV,
            DROPOUT, DROP, drop_rows)
    return dq


@triton.jit
def _dq_program(
    pid_m, off_b, off_h, Q, K, V, DO, GRAD_Q, LSE, DELTA, SQ, SK, SV, SDO, SDQ, SL,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, SN, SI, H, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS, SCATTER: tl.constexpr, GRADS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_KV: tl.constexpr, FP64: tl.constexpr, DROPOUT: tl.constexpr, DROP,
):
    """dQ for ``BLOCK_M`` query rows of one (batch, query head)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    off_hz = off_b * H + off_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_q = offs_m < Q_LEN
    q = load_rows(tile_ptrs(head_base(Q, SQ, off_b, off_h), offs_m, offs_d, SQ), in_q, offs_d, D, D_PAD, True)
    do = load_rows(tile_ptrs(head_base(DO, SDO, off_b, off_h), offs_m, offs_dv, SDO), in_q, offs_dv, DV, DV_PAD, True)
    lse = tl.load(head_base(LSE, SL, off_b, off_h) + offs_m * SL[2], mask=in_q, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)  # rows with nothing kept: every p is 0
    delta = tl.load(DELTA + off_hz.to(tl.int64) * Q_LEN + offs_m, mask=in_q, other=0.0)
    q_idx = tl.minimum(offs_m, Q_LEN - 1)[:, None]
    K_base = head_base(K, SK, off_b, off_h // GROUP)
    V_base = head_base(V, SV, off_b, off_h // GROUP)
    NUM_KV_BLOCKS = tl.cdiv(KV_LEN, SPARSE_KV)
    dq = tl.zeros([BLOCK_M, D_PAD], ACC)
    row = (pid_m * BLOCK_M) // SPARSE_Q
    num_off = head_base(0, SN, off_b, off_h) + row * SN[2]
    idx_off = head_base(0, SI, off_b, off_h) + row * SI[2]
    drop_rows = dropout_rows(dropout_base(DROP[0], off_b, off_h), pid_m * BLOCK_M, BLOCK_M) if DROPOUT else 0
    if HAS_FULL:
        dq = _dq_blocks(
            dq, q, do, lse2, delta, K_base, V_base, SK, SV, FULL_IDX + idx_off, tl.load(FULL_NUM + num_off), SI[3],
            q_idx, in_q, off_b, off_h, KV_LEN, sm_scale, SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS,
            HAS_SCORE_MOD, HAS_MASK_MOD, False, SCATTER_MODE, SPARSE_KV, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION,
            EVEN_KV, NUM_KV_BLOCKS, DROPOUT, DROP, drop_rows)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, K_base, V_base, SK, SV, KV_IDX + idx_off, tl.load(KV_NUM + num_off), SI[3],
        q_idx, in_q, off_b, off_h, KV_LEN, sm_scale, SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS,
        HAS_SCORE_MOD, HAS_MASK_MOD, True, SCATTER_MODE, SPARSE_KV, BLOCK_N, D, D_PAD, DV, DV_PAD, PRECISION,
        EVEN_KV, NUM_KV_BLOCKS, DROPOUT, DROP, drop_rows)
    store_rows(tile_ptrs(head_base(GRAD_Q, SDQ, off_b, off_h), offs_m, offs_d, SDQ), dq * sm_scale, in_q, offs_d, D)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, SQ, SDO, SL, start_m, kv_idx, in_kv, kv_start, off_b, off_h,
    Q_LEN,
    sm_scale, SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS, SCATTER: tl.constexpr, GRADS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr, EVEN_Q: tl.constexpr,
    DROPOUT: tl.constexpr, DROP, drop_base,
):
    """One ``[BLOCK_N, BLOCK_M]`` tile in the transposed orientation (keys down, queries across)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_q = offs_m < Q_LEN
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_rows(tile_ptrs(Q_base, offs_m, offs_d, SQ), in_q, offs_d, D, D_PAD, not EVEN_Q)
    do = load_rows(tile_ptrs(DO_base, offs_m, offs_dv, SDO), in_q, offs_dv, DV, DV_PAD, not EVEN_Q)
    if EVEN_Q:
        lse = tl.load(LSE_base + offs_m * SL[2])
        delta = tl.load(DELTA_base + offs_m)
        q_idx = offs_m[None, :]
    else:
        lse = tl.load(LSE_base + offs_m * SL[2], mask=in_q, other=0.0)
        delta = tl.load(DELTA_base + offs_m, mask=in_q, other=0.0)
        q_idx = tl.minimum(offs_m, Q_LEN - 1)[None, :]
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale
    post, dmod, keep = _scores(sT, off_b, off_h, q_idx, kv_idx, in_q[None, :], SCORE_GRAD, SCORE_BUFS, MASK_MOD,
                               MASK_BUFS, HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK, CHECK_BOUNDS=not EVEN_Q)
    pT = tl.exp2(post - lse2[None, :])
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if DROPOUT:  # the forward's pattern, regenerated (keys down, queries across)
        kept = dropout_keep(dropout_rows(drop_base, start_m, BLOCK_M), kv_start, k.shape[0], DROP[1], False)
        dv = tl.dot(tl.where(kept, pT, 0.0).to(do.dtype), do, dv, input_precision=PRECISION,
                    out_dtype=dv.dtype)  # 1 / (1 - p) when dV is stored
        dpT = tl.where(kept, dpT * DROP[2], 0.0)
    else:
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=dv.dtype)
    dspT = pT * (dpT - delta[None, :])
    if SCATTER_MODE == 0 or SCATTER_MODE == 2:  # captured-tensor gradients: atomics or fixed point
        SCATTER(sT, dspT, keep & in_kv[:, None], off_b, off_h, q_idx, kv_idx, SCORE_BUFS, GRADS,
                Q_AXIS=1, MODE=SCATTER_MODE)
    dsT = dspT * dmod
    if HAS_SCORE_MOD or (APPLY_MASK and HAS_MASK_MOD) or not EVEN_Q:
        dsT = tl.where(keep, dsT, 0.0)
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, SQ, SDO, SL, IDX, n_blocks, stride_in, kv_idx, in_kv,
    kv_start, off_b, off_h, Q_LEN, sm_scale, SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS,
    SCATTER: tl.constexpr, GRADS, HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_Q: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_Q: tl.constexpr, NUM_Q_BLOCKS, DROPOUT: tl.constexpr, DROP, drop_base,
):
    """The query blocks listed in ``IDX[0:n_blocks]``, in BLOCK_M-tall tiles, as one flat loop."""
    MULT: tl.constexpr = SPARSE_Q // BLOCK_M
    for t in range(n_blocks * MULT):
        q_block = tl.minimum(tl.maximum(tl.load(IDX + (t // MULT) * stride_in), 0), NUM_Q_BLOCKS - 1)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, SQ, SDO, SL,
            q_block * SPARSE_Q + (t % MULT) * BLOCK_M, kv_idx, in_kv, kv_start, off_b, off_h, Q_LEN, sm_scale,
            SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS, HAS_SCORE_MOD, HAS_MASK_MOD, APPLY_MASK,
            SCATTER_MODE, BLOCK_M, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_Q, DROPOUT, DROP, drop_base)
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, off_b, off_hkv, Q, K, V, DO, GRAD_K, GRAD_V, LSE, DELTA, SQ, SK, SV, SDO, SDK, SDV, SL,
    Q_NUM, Q_IDX, FULL_NUM, FULL_IDX, SN, SI, HKV, Q_LEN, KV_LEN, GROUP, sm_scale,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS, SCATTER: tl.constexpr, GRADS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_FULL: tl.constexpr,
    SCATTER_MODE: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_Q: tl.constexpr, FP64: tl.constexpr, DROPOUT: tl.constexpr, DROP,
):
    """dK and dV for ``BLOCK_N`` keys of one (batch, key/value head), summed over its query heads.
    ``SN`` / ``SI``: strides of the transposed lists (``[B, H, kv blocks]``, ``[B, H, kv blocks, n]``)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_kv = offs_n < KV_LEN
    k = load_rows(tile_ptrs(head_base(K, SK, off_b, off_hkv), offs_n, offs_d, SK), in_kv, offs_d, D, D_PAD, True)
    v = load_rows(tile_ptrs(head_base(V, SV, off_b, off_hkv), offs_n, offs_dv, SV), in_kv, offs_dv, DV, DV_PAD, True)
    kv_idx = tl.minimum(offs_n, KV_LEN - 1)[:, None]
    NUM_Q_BLOCKS = tl.cdiv(Q_LEN, SPARSE_Q)
    dk = tl.zeros([BLOCK_N, D_PAD], ACC)
    dv = tl.zeros([BLOCK_N, DV_PAD], ACC)
    col = (pid_n * BLOCK_N) // SPARSE_KV
    for g in range(GROUP):  # the query heads sharing this key/value head
        off_h = off_hkv * GROUP + g
        Q_base = head_base(Q, SQ, off_b, off_h)
        DO_base = head_base(DO, SDO, off_b, off_h)
        LSE_base = head_base(LSE, SL, off_b, off_h)
        DELTA_base = DELTA + (off_b * (HKV * GROUP) + off_h).to(tl.int64) * Q_LEN
        num_off = head_base(0, SN, off_b, off_h) + col * SN[2]
        idx_off = head_base(0, SI, off_b, off_h) + col * SI[2]
        drop_base = dropout_base(DROP[0], off_b, off_h) if DROPOUT else 0
        if HAS_FULL:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, SQ, SDO, SL, FULL_IDX + idx_off,
                tl.load(FULL_NUM + num_off), SI[3], kv_idx, in_kv, pid_n * BLOCK_N, off_b, off_h, Q_LEN, sm_scale,
                SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS, HAS_SCORE_MOD, HAS_MASK_MOD, False,
                SCATTER_MODE, SPARSE_Q, BLOCK_M, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_Q, NUM_Q_BLOCKS,
                DROPOUT, DROP, drop_base)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, SQ, SDO, SL, Q_IDX + idx_off,
            tl.load(Q_NUM + num_off), SI[3], kv_idx, in_kv, pid_n * BLOCK_N, off_b, off_h, Q_LEN, sm_scale,
            SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS, HAS_SCORE_MOD, HAS_MASK_MOD, True,
            SCATTER_MODE, SPARSE_Q, BLOCK_M, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_Q, NUM_Q_BLOCKS,
                DROPOUT, DROP, drop_base)
    store_rows(tile_ptrs(head_base(GRAD_K, SDK, off_b, off_hkv), offs_n, offs_d, SDK), dk * sm_scale, in_kv, offs_d, D)
    if DROPOUT:
        dv = dv * DROP[2]  # the kept pairs' weight
    store_rows(tile_ptrs(head_base(GRAD_V, SDV, off_b, off_hkv), offs_n, offs_dv, SDV), dv, in_kv, offs_dv, DV)


@triton.jit(repr=variant_name("flex_bwd"))
def flex_bwd(
    Q, K, V, DO, GRAD_Q, GRAD_K, GRAD_V, LSE, DELTA, SQ, SK, SV, SDO, SDQ, SDK, SDV, SL,
    KV_NUM, KV_IDX, KV_FULL_NUM, KV_FULL_IDX, SKN, SKI, Q_NUM, Q_IDX, Q_FULL_NUM, Q_FULL_IDX, SQN, SQI,
    HKV, Q_LEN, KV_LEN, GROUP, sm_scale, N_KV_PROGRAMS, N_Q_PROGRAMS,
    SCORE_GRAD: tl.constexpr, SCORE_BUFS, MASK_MOD: tl.constexpr, MASK_BUFS, SCATTER: tl.constexpr, GRADS,
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_KV_FULL: tl.constexpr, HAS_Q_FULL: tl.constexpr,
    DQ_SCATTER: tl.constexpr, DKDV_SCATTER: tl.constexpr, RUN_DQ: tl.constexpr, RUN_DKDV: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, FP64: tl.constexpr,
    DROPOUT: tl.constexpr, DROP,
):
    """dQ and dK/dV programs in one launch (grid ``(N_KV_PROGRAMS + GROUP * N_Q_PROGRAMS, B * HKV)``
    when both run): the first ``N_KV_PROGRAMS`` of each (batch, kv head) are dK/dV programs, the
    rest dQ programs of the group's query heads, so the two kinds fill the GPU together.
    Deterministic mode launches the dQ half (``RUN_DQ``) before the dK/dV half (``RUN_DKDV``).
    ``SKN`` / ``SKI``: strides of the kv lists; ``SQN`` / ``SQI``: of the transposed (q) lists."""
    if FP64:
        sm_scale = tl.load(sm_scale)  # a float64 scalar's pointer: kernel arguments are float32
    pid = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = off_hz // HKV
    off_hkv = off_hz % HKV
    if RUN_DKDV and pid < N_KV_PROGRAMS:
        _dkdv_program(
            pid, off_b, off_hkv, Q, K, V, DO, GRAD_K, GRAD_V, LSE, DELTA, SQ, SK, SV, SDO, SDK, SDV, SL,
            Q_NUM, Q_IDX, Q_FULL_NUM, Q_FULL_IDX, SQN, SQI, HKV, Q_LEN, KV_LEN, GROUP, sm_scale,
            SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS, HAS_SCORE_MOD, HAS_MASK_MOD, HAS_Q_FULL,
            DKDV_SCATTER, SPARSE_Q, SPARSE_KV, BLOCK_M1, BLOCK_N1, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_Q, FP64,
            DROPOUT, DROP)
    elif RUN_DQ:
        off_pid = pid - N_KV_PROGRAMS if RUN_DKDV else pid
        _dq_program(
            off_pid % N_Q_PROGRAMS, off_b, off_hkv * GROUP + off_pid // N_Q_PROGRAMS, Q, K, V, DO, GRAD_Q, LSE, DELTA,
            SQ, SK, SV, SDO, SDQ, SL, KV_NUM, KV_IDX, KV_FULL_NUM, KV_FULL_IDX, SKN, SKI,
            HKV * GROUP, Q_LEN, KV_LEN, GROUP, sm_scale,
            SCORE_GRAD, SCORE_BUFS, MASK_MOD, MASK_BUFS, SCATTER, GRADS, HAS_SCORE_MOD, HAS_MASK_MOD, HAS_KV_FULL,
            DQ_SCATTER, SPARSE_Q, SPARSE_KV, BLOCK_M2, BLOCK_N2, D, D_PAD, DV, DV_PAD, PRECISION, EVEN_KV, FP64,
            DROPOUT, DROP)
