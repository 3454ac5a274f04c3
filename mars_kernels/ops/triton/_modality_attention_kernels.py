"""``@triton.jit`` bodies of the modality-attention kernels (launchers:
:mod:`.attention`).

Every program handles ``BLOCK_T`` positions and one head: the ``[BLOCK_T,
BLOCK_DH]`` slices of q, k and v of each modality are read in place from the
packed ``[T, M, 3D]`` projections (``BLOCK_DH`` = next power of two of the
head width, lanes beyond it masked), or from the ``[M, 3D]`` missing rows where
a modality is not observed (``HAS_MISSING``). Scores and probabilities of one
query modality live in a ``[BLOCK_T, BLOCK_M]`` tile (``BLOCK_M`` = next power
of two of M, columns ``>= M`` at -inf / 0). Math in ``CDT`` (float32, or
float64 for float64 input); position offsets in int64.

With P masks (``observed`` [P, T, M]) there are I = P * T instances; instance
p * T + t reads qkv row t. The forward runs a program per block of instances;
the backward a program per block of positions that loops over the P instances
of each, so the qkv gradient sums them without atomics.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(T, M, DH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DH: tl.constexpr):
    """This program's positions: (row_ok [BLOCK_T], rows64, head lanes [BLOCK_DH],
    modality columns [BLOCK_M], tile_ok [BLOCK_T, BLOCK_DH], prob_ok [BLOCK_T, BLOCK_M])."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    lanes = tl.arange(0, BLOCK_DH)
    cols = tl.arange(0, BLOCK_M)
    tile_ok = row_ok[:, None] & (lanes[None, :] < DH)
    prob_ok = row_ok[:, None] & (cols[None, :] < M)
    return row_ok, rows.to(tl.int64), lanes, cols, tile_ok, prob_ok


@triton.jit
def _offsets(rows64, M, D, m, part, h, DH: tl.constexpr, lanes):
    """Offsets [BLOCK_T, BLOCK_DH] of head h of q (part 0), k (1) or v (2) of modality m."""
    return rows64[:, None] * (M * 3 * D) + m * 3 * D + part * D + h * DH + lanes[None, :]


@triton.jit
def _observed(obs_ptr, rows64, row_ok, M, m, HAS_MISSING: tl.constexpr):
    """[BLOCK_T] bool: modality m observed at each position (always, without missing rows)."""
    if HAS_MISSING:
        return tl.load(obs_ptr + rows64 * M + m, mask=row_ok, other=1) != 0
    return row_ok | True


@triton.jit
def _load(qkv_ptr, miss_ptr, seen, rows64, tile_ok, M, D, m, part, h, CDT: tl.constexpr, DH: tl.constexpr, lanes,
          HAS_MISSING: tl.constexpr):
    """Head h of part ``part`` of modality m [BLOCK_T, BLOCK_DH] in CDT: qkv's row
    where ``seen``, the missing row elsewhere."""
    x = tl.load(qkv_ptr + _offsets(rows64, M, D, m, part, h, DH, lanes), mask=tile_ok & seen[:, None], other=0.0)
    x = x.to(CDT)
    if HAS_MISSING:
        fill = tl.load(miss_ptr + m * 3 * D + part * D + h * DH + lanes, mask=lanes < DH, other=0.0).to(CDT)
        x = tl.where(seen[:, None], x, fill[None, :])
    return x


@triton.jit
def _column(tile, cols, j):
    """Column j [BLOCK_T] of tile [BLOCK_T, BLOCK_M]."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def modality_attention_fwd_kernel(
    qkv_ptr,  # [T, M, 3D], f16/bf16/f32/f64
    keep_ptr,  # [I, H, M, M] CDT (read only when HAS_KEEP)
    miss_ptr,  # [M, 3D] qkv's dtype (read only when HAS_MISSING)
    obs_ptr,  # [I, M] uint8 (read only when HAS_MISSING)
    out_ptr,  # [I, M, D] in qkv's dtype
    probs_ptr,  # [I, H, M, M] CDT out
    T,
    I,  # instances: P * T
    M,
    D,
    H,
    scale_ptr,  # [1] in CDT: 1 / sqrt(DH), a tensor so float64 math gets a float64 scale
    DH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_MISSING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    CDT: tl.constexpr,
):
    h = tl.program_id(1)
    scale = tl.load(scale_ptr)
    row_ok, rows64, lanes, cols, tile_ok, prob_ok = _tile(I, M, DH, BLOCK_T, BLOCK_M, BLOCK_DH)
    src64 = rows64 % T  # the qkv row of each instance
    for i in range(M):
        seen_i = _observed(obs_ptr, rows64, row_ok, M, i, HAS_MISSING)
        q = _load(qkv_ptr, miss_ptr, seen_i, src64, tile_ok, M, D, i, 0, h, CDT, DH, lanes, HAS_MISSING)
        s = tl.full([BLOCK_T, BLOCK_M], float("-inf"), CDT)
        for j in range(M):
            seen_j = _observed(obs_ptr, rows64, row_ok, M, j, HAS_MISSING)
            k = _load(qkv_ptr, miss_ptr, seen_j, src64, tile_ok, M, D, j, 1, h, CDT, DH, lanes, HAS_MISSING)
            s = tl.where(cols[None, :] == j, (tl.sum(q * k, axis=1) * scale)[:, None], s)
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        prow = ((rows64 * H + h) * M + i) * M
        tl.store(probs_ptr + prow[:, None] + cols[None, :], p, mask=prob_ok)
        if HAS_KEEP:
            p = p * tl.load(keep_ptr + prow[:, None] + cols[None, :], mask=prob_ok, other=0.0)
        acc = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
        for j in range(M):
            seen_j = _observed(obs_ptr, rows64, row_ok, M, j, HAS_MISSING)
            v = _load(qkv_ptr, miss_ptr, seen_j, src64, tile_ok, M, D, j, 2, h, CDT, DH, lanes, HAS_MISSING)
            acc += _column(p, cols, j)[:, None] * v
        out = out_ptr + rows64[:, None] * (M * D) + i * D + h * DH + lanes[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def modality_attention_bwd_scores_kernel(
    grad_out_ptr,  # [I, M, D] in qkv's dtype
    qkv_ptr,  # [T, M, 3D]
    probs_ptr,  # [I, H, M, M] CDT
    keep_ptr,  # [I, H, M, M] CDT (read only when HAS_KEEP)
    miss_ptr,  # [M, 3D] (read only when HAS_MISSING)
    obs_ptr,  # [I, M] uint8 (read only when HAS_MISSING)
    ds_ptr,  # [I, H, M, M] CDT out: d loss / d score (scaled)
    T,
    I,  # instances: P * T
    M,
    D,
    H,
    scale_ptr,  # [1] in CDT: 1 / sqrt(DH)
    DH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_MISSING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    CDT: tl.constexpr,
):
    """Backward, step 1, one program per block of instances and head:
    dp_ij = keep_ij <g_i, v_j>, ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij') * scale."""
    h = tl.program_id(1)
    scale = tl.load(scale_ptr)
    row_ok, rows64, lanes, cols, tile_ok, prob_ok = _tile(I, M, DH, BLOCK_T, BLOCK_M, BLOCK_DH)
    src64 = rows64 % T
    for i in range(M):
        g = tl.load(grad_out_ptr + rows64[:, None] * (M * D) + i * D + h * DH + lanes[None, :], mask=tile_ok,
                    other=0.0).to(CDT)
        prow = ((rows64 * H + h) * M + i) * M
        p = tl.load(probs_ptr + prow[:, None] + cols[None, :], mask=prob_ok, other=0.0)
        dp = tl.zeros([BLOCK_T, BLOCK_M], CDT)
        for j in range(M):
            seen_j = _observed(obs_ptr, rows64, row_ok, M, j, HAS_MISSING)
            v = _load(qkv_ptr, miss_ptr, seen_j, src64, tile_ok, M, D, j, 2, h, CDT, DH, lanes, HAS_MISSING)
            dp = tl.where(cols[None, :] == j, tl.sum(g * v, axis=1)[:, None], dp)
        if HAS_KEEP:
            dp = dp * tl.load(keep_ptr + prow[:, None] + cols[None, :], mask=prob_ok, other=0.0)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale
        tl.store(ds_ptr + prow[:, None] + cols[None, :], ds, mask=prob_ok)


@triton.jit
def modality_attention_bwd_grads_kernel(
    grad_out_ptr,  # [I, M, D] in qkv's dtype
    qkv_ptr,  # [T, M, 3D]
    probs_ptr,  # [I, H, M, M] CDT
    keep_ptr,  # [I, H, M, M] CDT (read only when HAS_KEEP)
    ds_ptr,  # [I, H, M, M] CDT, from modality_attention_bwd_scores_kernel
    miss_ptr,  # [M, 3D] (read only when HAS_MISSING)
    obs_ptr,  # [I, M] uint8 (read only when HAS_MISSING)
    grad_ptr,  # [T, M, 3D] CDT out: every row of the program's positions written once
    part_ptr,  # [num_position_blocks, M, 3D] CDT out: this block's missing-row gradients
    T,
    P,  # masks: instance p * T + t reads qkv row t
    M,
    D,
    H,
    DH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_MISSING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    CDT: tl.constexpr,
):
    """Backward, step 2, one program per block of positions and head; for each
    target modality m, summed over the masks p in loop-carried registers and
    stored once (no read-modify-write of global memory):
    dq_m = sum_j ds_mj k_j, dk_m = sum_i ds_im q_i, dv_m = sum_i p'_im g_i,
    to qkv's gradient where the mask observes m, else to the missing row's partial."""
    pid, h = tl.program_id(0), tl.program_id(1)
    row_ok, rows64, lanes, cols, tile_ok, prob_ok = _tile(T, M, DH, BLOCK_T, BLOCK_M, BLOCK_DH)
    part_ptr += pid.to(tl.int64) * M * 3 * D
    lane_ok = lanes < DH
    for m in range(M):
        dq = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
        dk = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
        dv = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
        mq = tl.zeros([BLOCK_DH], CDT)
        mk = tl.zeros([BLOCK_DH], CDT)
        mv = tl.zeros([BLOCK_DH], CDT)
        for p_mask in range(P):
            inst64 = p_mask * T + rows64  # this mask's instances of the block's positions
            cq = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
            ck = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
            cv = tl.zeros([BLOCK_T, BLOCK_DH], CDT)
            base = (inst64 * H + h) * M
            ds_row_m = tl.load(ds_ptr + (base + m)[:, None] * M + cols[None, :], mask=prob_ok, other=0.0)
            for j in range(M):
                seen_j = _observed(obs_ptr, inst64, row_ok, M, j, HAS_MISSING)
                k_j = _load(qkv_ptr, miss_ptr, seen_j, rows64, tile_ok, M, D, j, 1, h, CDT, DH, lanes, HAS_MISSING)
                cq += _column(ds_row_m, cols, j)[:, None] * k_j
                ds_jm = tl.load(ds_ptr + (base + j) * M + m, mask=row_ok, other=0.0)
                q_j = _load(qkv_ptr, miss_ptr, seen_j, rows64, tile_ok, M, D, j, 0, h, CDT, DH, lanes, HAS_MISSING)
                ck += ds_jm[:, None] * q_j
                p_jm = tl.load(probs_ptr + (base + j) * M + m, mask=row_ok, other=0.0)
                if HAS_KEEP:
                    p_jm = p_jm * tl.load(keep_ptr + (base + j) * M + m, mask=row_ok, other=0.0)
                g_j = tl.load(grad_out_ptr + inst64[:, None] * (M * D) + j * D + h * DH + lanes[None, :],
                              mask=tile_ok, other=0.0).to(CDT)
                cv += p_jm[:, None] * g_j
            seen_m = _observed(obs_ptr, inst64, row_ok, M, m, HAS_MISSING)
            keep_row = tile_ok & seen_m[:, None]
            dq += tl.where(keep_row, cq, 0.0)
            dk += tl.where(keep_row, ck, 0.0)
            dv += tl.where(keep_row, cv, 0.0)
            if HAS_MISSING:
                unseen = tile_ok & ~seen_m[:, None]
                mq += tl.sum(tl.where(unseen, cq, 0.0), axis=0)
                mk += tl.sum(tl.where(unseen, ck, 0.0), axis=0)
                mv += tl.sum(tl.where(unseen, cv, 0.0), axis=0)
        tl.store(grad_ptr + _offsets(rows64, M, D, m, 0, h, DH, lanes), dq, mask=tile_ok)
        tl.store(grad_ptr + _offsets(rows64, M, D, m, 1, h, DH, lanes), dk, mask=tile_ok)
        tl.store(grad_ptr + _offsets(rows64, M, D, m, 2, h, DH, lanes), dv, mask=tile_ok)
        if HAS_MISSING:
            dst = part_ptr + m * 3 * D + h * DH + lanes
            tl.store(dst, mq, mask=lane_ok)
            tl.store(dst + D, mk, mask=lane_ok)
            tl.store(dst + 2 * D, mv, mask=lane_ok)
