"""Block-mask kernels: classify the blocks the interval analysis left undecided, then list them.

:func:`classify_by_bounds` builds the whole map in one launch for a mask with a generated bounds
function (:mod:`flexcomp.codegen.bounds`): it bounds each block itself, then evaluates the
undecided ones as :func:`classify_blocks` does (:func:`_evaluate`).

:func:`classify_blocks` reads a block-kind map ``KIND`` (int8 ``[Bx, Hx, num_q, num_kv]``, values of
:class:`flexcomp.sparsity.BlockKind`: 0 empty, 1 partial, 2 full, 3 unknown). One program reads
``CHUNK`` kv blocks of one q-block row at once and stops there unless one is UNKNOWN (the usual
case: the analysis decides nearly every block); for each UNKNOWN block it evaluates the generated
``MASK_MOD`` on the block's ``BLOCK_M x BLOCK_N`` pairs (indices clamped into the sequence, pairs
outside it not counted, as the torch evaluator does) and writes back EMPTY, FULL (every pair of a
block inside the sequence kept) or PARTIAL. Decided blocks are only read.

:func:`both_lists` turns the finished map into torch's ordered block lists (see
:mod:`flexcomp.blockmask_lists`): per row of the map, the count of partial (and of full) blocks and
their column numbers in ascending order followed by the other columns in ascending order. Rows
are q-block rows (the kv lists) or, with the strides swapped, kv-block columns (the q lists).

:func:`varlen_kinds` writes the map of packed sequences (flash-attn's ``cu_seqlens``) directly, from
each q-block row's first and last query (:mod:`flexcomp.block_ranges`' arithmetic), with no
mask_mod: a new packing's lists then cost two launches instead of ~100 small torch ops.
"""
import triton
import triton.language as tl

from .common import variant_name

EMPTY = tl.constexpr(0)
PARTIAL = tl.constexpr(1)
FULL = tl.constexpr(2)
UNKNOWN = tl.constexpr(3)


@triton.jit
def _map_row(KIND, SK0, SK1, SK2, NUM_Q, HX):
    """This program's row of the map: its base pointer, q-block, batch and head."""
    row = tl.program_id(0)  # (b, h, q-block) of the map
    q_blk = row % NUM_Q
    bh = row // NUM_Q
    off_h = bh % HX
    off_b = bh // HX
    base = KIND + off_b.to(tl.int64) * SK0 + off_h.to(tl.int64) * SK1 + q_blk.to(tl.int64) * SK2
    return base, q_blk, off_b, off_h


@triton.jit
def _evaluate(off_b, off_h, q_blk, j, Q_LEN, KV_LEN, MASK_MOD: tl.constexpr, MASK_BUFS, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, PAD_M: tl.constexpr, PAD_N: tl.constexpr):
    """The kind of block ``(q_blk, j)`` from ``MASK_MOD`` on its pairs (indices clamped into the
    sequence, pairs outside it not counted): FULL only when all ``BLOCK_M x BLOCK_N`` are kept."""
    offs_m = tl.arange(0, PAD_M)
    offs_n = tl.arange(0, PAD_N)
    q_idx = q_blk * BLOCK_M + offs_m[:, None]
    kv_idx = j * BLOCK_N + offs_n[None, :]
    inside = (offs_m[:, None] < BLOCK_M) & (q_idx < Q_LEN) & (offs_n[None, :] < BLOCK_N) & (kv_idx < KV_LEN)
    keep = MASK_MOD(off_b, off_h, tl.minimum(q_idx, Q_LEN - 1), tl.minimum(kv_idx, KV_LEN - 1), MASK_BUFS)
    kept = tl.sum(tl.sum((keep & inside).to(tl.int32), 1), 0)
    return tl.where(kept == 0, EMPTY, tl.where(kept == BLOCK_M * BLOCK_N, FULL, PARTIAL))


@triton.jit(repr=variant_name("classify_blocks"))
def classify_blocks(
    KIND, SK0, SK1, SK2, NUM_Q, NUM_KV, HX, Q_LEN, KV_LEN,
    MASK_MOD: tl.constexpr, MASK_BUFS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_M: tl.constexpr, PAD_N: tl.constexpr, CHUNK: tl.constexpr,
):
    base, q_blk, off_b, off_h = _map_row(KIND, SK0, SK1, SK2, NUM_Q, HX)
    first = tl.program_id(1) * CHUNK
    cols = first + tl.arange(0, CHUNK)
    kinds = tl.load(base + cols, mask=cols < NUM_KV, other=EMPTY)
    if tl.sum((kinds == UNKNOWN).to(tl.int32), 0) > 0:  # most programs stop at this one vector load
        for j in range(first, tl.minimum(first + CHUNK, NUM_KV)):
            if tl.load(base + j) == UNKNOWN:
                kind = _evaluate(off_b, off_h, q_blk, j, Q_LEN, KV_LEN, MASK_MOD, MASK_BUFS, BLOCK_M, BLOCK_N,
                                 PAD_M, PAD_N)
                tl.store(base + j, kind.to(tl.int8))


@triton.jit(repr=variant_name("classify_by_bounds"))
def classify_by_bounds(
    KIND, SK0, SK1, SK2, NUM_Q, NUM_KV, HX, Q_LEN, KV_LEN,
    BOUNDS: tl.constexpr, SCALARS, BOUNDS_BUFS, RUNS, MASK_MOD: tl.constexpr, MASK_BUFS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_M: tl.constexpr, PAD_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """The whole map in one launch: each program bounds the mask over ``CHUNK`` kv blocks of one
    q-block row with the generated ``BOUNDS`` (:mod:`flexcomp.codegen.bounds`; ``BOUNDS_BUFS`` the
    mask's captures as the unchecked mod takes them: a checked ``MASK_BUFS`` has one more pointer,
    its error slots; ``RUNS`` the run tables its loads read), writes the blocks it
    decides (EMPTY where the mask is surely false, FULL where surely true on a block inside the
    sequence, PARTIAL where surely true on a block hanging over its end) and evaluates the others
    pair by pair as :func:`classify_blocks` does."""
    base, q_blk, off_b, off_h = _map_row(KIND, SK0, SK1, SK2, NUM_Q, HX)
    first = tl.program_id(1) * CHUNK
    cols = first + tl.arange(0, CHUNK)
    zero = tl.zeros([CHUNK], dtype=tl.float64)
    q_first = q_blk * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M - 1, Q_LEN - 1)
    kv_first = cols * BLOCK_N
    kv_last = tl.minimum(kv_first + BLOCK_N - 1, KV_LEN - 1)
    lo, hi, unsafe = BOUNDS(off_b + zero, off_h + zero, q_first + zero, q_last + zero, kv_first.to(tl.float64),
                            kv_last.to(tl.float64), zero, SCALARS, BOUNDS_BUFS, RUNS, BLOCK_M, BLOCK_N, PAD_M,
                            PAD_N)
    inside = (q_first + BLOCK_M <= Q_LEN) & (kv_first + BLOCK_N <= KV_LEN)
    kinds = tl.where(hi == 0, EMPTY, tl.where(lo == 1, tl.where(inside, FULL, PARTIAL), UNKNOWN))
    kinds = tl.where(unsafe, UNKNOWN, kinds)
    if tl.sum((kinds == UNKNOWN).to(tl.int32), 0) > 0:
        for j in range(first, tl.minimum(first + CHUNK, NUM_KV)):
            if tl.sum(tl.where(cols == j, kinds, 0), 0) == UNKNOWN:
                kind = _evaluate(off_b, off_h, q_blk, j, Q_LEN, KV_LEN, MASK_MOD, MASK_BUFS, BLOCK_M, BLOCK_N,
                                 PAD_M, PAD_N)
                kinds = tl.where(cols == j, kind, kinds)
    tl.store(base + cols, kinds.to(tl.int8), mask=cols < NUM_KV)


@triton.jit
def _is_listed(k, SEPARATE_FULL: tl.constexpr):
    """The partial list's blocks: partial ones, or every kept one when full blocks are not separated."""
    if SEPARATE_FULL:
        return k == PARTIAL
    else:
        return k != EMPTY


@triton.jit
def _write_ranks(IDX, listed, cols, ok, seen, total):
    """Store each column at its place: listed ones from ``seen`` on, the others after all ``total``
    listed ones, both in ascending order. Returns the listed count so far."""
    inclusive = seen + tl.cumsum(listed.to(tl.int32), 0)
    rank = tl.where(listed, inclusive - 1, total + cols - inclusive)
    tl.store(IDX + rank, cols, mask=ok)
    return seen + tl.sum(listed.to(tl.int32), 0)


@triton.jit
def _list_row(
    KIND, pid, S_OUTER, S_ROW, S_COL, NUM_ROWS, NUM_COLS, NUM, IDX, FULL_NUM, FULL_IDX,
    SEPARATE_FULL: tl.constexpr, CHUNK: tl.constexpr,
):
    """Row ``pid`` (``(b * Hx + h) * NUM_ROWS + row``: the outputs are contiguous in that order) of
    the map's lists: its counts, then every column to its place."""
    row = pid % NUM_ROWS
    base = KIND + (pid // NUM_ROWS).to(tl.int64) * S_OUTER + row.to(tl.int64) * S_ROW
    offs = tl.arange(0, CHUNK)
    listed_total = 0
    full_total = 0
    for start in range(0, NUM_COLS, CHUNK):  # first pass: the counts
        cols = start + offs
        k = tl.load(base + cols.to(tl.int64) * S_COL, mask=cols < NUM_COLS, other=0)
        listed_total += tl.sum(_is_listed(k, SEPARATE_FULL).to(tl.int32), 0)
        full_total += tl.sum((k == FULL).to(tl.int32), 0)
    out = pid.to(tl.int64) * NUM_COLS
    listed_seen = 0
    full_seen = 0
    for start in range(0, NUM_COLS, CHUNK):  # second pass: every column to its place
        cols = start + offs
        ok = cols < NUM_COLS
        k = tl.load(base + cols.to(tl.int64) * S_COL, mask=ok, other=0)
        listed_seen = _write_ranks(IDX + out, _is_listed(k, SEPARATE_FULL) & ok, cols, ok, listed_seen, listed_total)
        if SEPARATE_FULL:
            full_seen = _write_ranks(FULL_IDX + out, (k == FULL) & ok, cols, ok, full_seen, full_total)
    tl.store(NUM + pid, listed_total)
    if SEPARATE_FULL:
        tl.store(FULL_NUM + pid, full_total)


@triton.jit(do_not_specialize=["KV_ROWS"])  # 0 (the q side only) or not: one compiled kernel
def both_lists(
    KIND, S_OUTER, NUM_Q, NUM_KV, KV_ROWS, NUM, IDX, FULL_NUM, FULL_IDX, Q_NUM, Q_IDX, Q_FULL_NUM, Q_FULL_IDX,
    SEPARATE_FULL: tl.constexpr, KV_CHUNK: tl.constexpr, Q_CHUNK: tl.constexpr,
):
    """Both directions' lists of a contiguous map (``S_OUTER = NUM_Q * NUM_KV``) in one launch: the
    kv lists (a program per q-block row) from programs ``0 .. KV_ROWS``, then the q lists (a program
    per kv-block column). A grid of ``KV_ROWS`` programs lists only the kv side; ``KV_ROWS = 0``
    only the q side."""
    pid = tl.program_id(0)
    if pid < KV_ROWS:
        _list_row(KIND, pid, S_OUTER, NUM_KV, 1, NUM_Q, NUM_KV, NUM, IDX, FULL_NUM, FULL_IDX, SEPARATE_FULL,
                  KV_CHUNK)
    else:
        _list_row(KIND, pid - KV_ROWS, S_OUTER, 1, NUM_KV, NUM_KV, NUM_Q, Q_NUM, Q_IDX, Q_FULL_NUM,
                  Q_FULL_IDX, SEPARATE_FULL, Q_CHUNK)


@triton.jit
def _sequence_of(CU, N, t, CHUNK: tl.constexpr):
    """The packed sequence holding token ``t``: how many of ``CU[1 .. N]`` (cumulative lengths, int64)
    are <= ``t``, at most ``N - 1`` (empty sequences are skipped, as ``searchsorted`` does)."""
    count = 0
    for start in range(0, N, CHUNK):
        s = start + 1 + tl.arange(0, CHUNK)
        ends = tl.load(CU + s, mask=s <= N, other=0)
        count += tl.sum(((s <= N) & (ends <= t)).to(tl.int32), 0)
    return tl.minimum(count, N - 1)


@triton.jit
def _lowest(start, pos, shift, LEFT):
    """First key (global) the query at ``pos`` of its sequence sees (``LEFT < 0``: unbounded)."""
    return start + tl.where(LEFT >= 0, tl.maximum(pos + shift - LEFT, 0), 0)


@triton.jit
def _highest(start, keys, pos, shift, RIGHT):
    """One past the last key (global) the query at ``pos`` sees (``RIGHT < 0``: unbounded)."""
    return start + tl.where(RIGHT >= 0, tl.minimum(tl.maximum(pos + shift + RIGHT + 1, 0), keys), keys)


@triton.jit
def varlen_kinds(
    KIND, CU_Q, CU_K, N, TOTAL_Q, NUM_KV, LEFT, RIGHT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DOC_CHUNK: tl.constexpr,
):
    """The block-kind map ``KIND`` (int8 ``[num_q, NUM_KV]``, contiguous) of ``N`` packed sequences
    (``CU_Q`` / ``CU_K``: int64 cumulative query / key lengths) under flash-attn's window ``(LEFT,
    RIGHT)`` with bottom-right alignment, as :mod:`flexcomp.block_ranges` derives it: per q-block row
    (``program_id(0)``) its first and last query's sequences and positions give the keys any query of
    the row may see (``[lo, hi)``) and those all of them see (``[flo, fhi)``, one sequence only);
    blocks inside the latter are FULL, the others overlapping the former PARTIAL, the rest EMPTY.
    ``program_id(1)`` writes ``CHUNK`` columns."""
    r = tl.program_id(0)
    first = r.to(tl.int64) * BLOCK_M
    last = tl.minimum(first + BLOCK_M - 1, TOTAL_Q - 1)
    da = _sequence_of(CU_Q, N, first, DOC_CHUNK)
    db = _sequence_of(CU_Q, N, last, DOC_CHUNK)
    qa, ka = tl.load(CU_Q + da), tl.load(CU_K + da)
    qb, kb = tl.load(CU_Q + db), tl.load(CU_K + db)
    keys_a = tl.load(CU_K + da + 1) - ka
    keys_b = tl.load(CU_K + db + 1) - kb
    shift_a = keys_a - (tl.load(CU_Q + da + 1) - qa)  # the sequence's keys minus its queries
    shift_b = keys_b - (tl.load(CU_Q + db + 1) - qb)
    pos_a = first - qa
    pos_b = last - qb
    lo = _lowest(ka, pos_a, shift_a, LEFT)
    hi = tl.maximum(_highest(kb, keys_b, pos_b, shift_b, RIGHT), lo)
    flo = _lowest(ka, pos_b, shift_a, LEFT)
    fhi = _highest(ka, keys_a, pos_a, shift_a, RIGHT)
    fhi = tl.where(da == db, tl.maximum(fhi, flo), flo)  # a row spanning two sequences: no full block
    blo = lo // BLOCK_N
    bhi = tl.maximum((hi + BLOCK_N - 1) // BLOCK_N, blo)
    fblo = tl.minimum(tl.maximum((flo + BLOCK_N - 1) // BLOCK_N, blo), bhi)
    fbhi = tl.maximum(tl.minimum(fhi // BLOCK_N, bhi), fblo)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    kind = tl.where((cols >= fblo) & (cols < fbhi), FULL, tl.where((cols >= blo) & (cols < bhi), PARTIAL, EMPTY))
    tl.store(KIND + r.to(tl.int64) * NUM_KV + cols, kind.to(tl.int8), mask=cols < NUM_KV)
