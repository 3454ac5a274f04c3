"""``@triton.jit`` bodies of the top-k gating and router statistics kernels (launchers beside this file).

Tiles of a row-major ``[T, E]`` tensor per program, ``BLOCK_T`` rows by
``BLOCK_E`` lanes (the next power of two of ``E``), math in ``CDT``; the selection
keys are described in :mod:`._select_kernels`.
"""
import triton
import triton.language as tl

from ._select_kernels import column, make_keys, routed_dot, row_tile, select


# --------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------
@triton.jit
def topk_gating_fwd_kernel(
    logits_ptr,  # [T, E] f16/bf16/f32/f64
    weights_ptr,  # [T, K] CDT out
    indices_ptr,  # [T, K] int64 out
    lse_ptr,  # [T] CDT out
    T,
    E,
    stride_l,
    K: tl.constexpr,
    DENSE: tl.constexpr,  # softmax_first and not renormalize: lse over the whole row
    MODE: tl.constexpr,
    USE_SORT: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)
    x = tl.load(logits_ptr + rows64[:, None] * stride_l + lane, mask=mask, other=0.0).to(CDT)

    key = make_keys(x, lane, lane_ok, BLOCK_E, MODE)
    sel_idx, sel_val, _chosen = select(
        key, lane, lane_ok, K, K, KP, BLOCK_T, BLOCK_E, MODE, USE_SORT
    )
    col = tl.arange(0, KP)[None, :]
    v0 = column(sel_val, col, 0)  # the row max (NaN -> +inf)
    if DENSE:
        s = tl.sum(tl.where(lane_ok, tl.exp(x - v0[:, None]), 0.0), axis=1)
    else:
        s = tl.sum(tl.where(col < K, tl.exp(sel_val - v0[:, None]), 0.0), axis=1)
    lse = v0 + tl.log(s)
    w = tl.exp(sel_val - lse[:, None])

    out_mask = row_ok[:, None] & (col < K)
    out_off = rows64[:, None] * K + col
    tl.store(weights_ptr + out_off, w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(indices_ptr + out_off, sel_idx.to(tl.int64), mask=out_mask)
    tl.store(lse_ptr + rows64, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def topk_gating_bwd_kernel(
    grad_w_ptr,  # [T, K]
    logits_ptr,  # [T, E] (read only when DENSE)
    weights_ptr,  # [T, K]
    indices_ptr,  # [T, K] int64
    lse_ptr,  # [T] (read only when DENSE)
    grad_ptr,  # [T, E] out, logits dtype
    T,
    E,
    stride_l,
    stride_g,
    K: tl.constexpr,
    KP: tl.constexpr,
    DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    s = routed_dot(grad_w_ptr, weights_ptr, rows64, row_ok, K, KP, CDT)

    if DENSE:
        x = tl.load(logits_ptr + rows64[:, None] * stride_l + lane, mask=mask, other=0.0).to(CDT)
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
        acc = -s[:, None] * tl.exp(x - lse[:, None])
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=CDT)
    for j in range(K):
        gj = tl.load(grad_w_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(CDT)
        wj = tl.load(weights_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(CDT)
        ij = tl.load(indices_ptr + rows64 * K + j, mask=row_ok, other=0).to(tl.int32)
        if DENSE:
            c = wj * gj
        else:
            c = wj * (gj - s)
        acc += tl.where(lane == ij[:, None], c[:, None], 0.0)
    tl.store(
        grad_ptr + rows64[:, None] * stride_g + lane,
        acc.to(grad_ptr.dtype.element_ty),
        mask=mask,
    )


# --------------------------------------------------------------------------
# router statistics (z-loss / switch-loss inputs)
# --------------------------------------------------------------------------
@triton.jit
def router_stats_fwd_kernel(
    logits_ptr,  # [T, E]
    lse_ptr,  # [T] CDT out
    prob_part_ptr,  # [num_programs, E] CDT out
    T,
    E,
    stride_l,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    x = tl.load(logits_ptr + rows64[:, None] * stride_l + lane, mask=mask, other=0.0).to(CDT)
    m = tl.max(tl.where(lane_ok, x, float("-inf")), axis=1)
    # as torch.logsumexp: an infinite max is not subtracted
    m = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    e = tl.where(lane_ok, tl.exp(x - m[:, None]), 0.0)
    s = tl.sum(e, axis=1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows64, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)
    # as torch.softmax: a row whose log-sum-exp is not finite (NaN, +inf, all -inf) is all NaN
    finite = (lse == lse) & (tl.abs(lse) < float("inf"))
    p = tl.where(mask, tl.where(finite[:, None], e / s[:, None], float("nan")), 0.0)
    tl.store(prob_part_ptr + pid.to(tl.int64) * E + lane1, tl.sum(p, axis=0), mask=lane1 < E)


@triton.jit
def router_stats_bwd_kernel(
    grad_lse_ptr,  # [T]
    grad_ps_ptr,  # [E]
    logits_ptr,  # [T, E]
    lse_ptr,  # [T]
    grad_ptr,  # [T, E] out, logits dtype
    T,
    E,
    stride_l,
    stride_g,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    x = tl.load(logits_ptr + rows64[:, None] * stride_l + lane, mask=mask, other=0.0).to(CDT)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    gl = tl.load(grad_lse_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    gp = tl.load(grad_ps_ptr + lane, mask=lane_ok, other=0.0).to(CDT)
    p = tl.where(lane_ok, tl.exp(x - lse[:, None]), 0.0)
    dot = tl.sum(p * gp, axis=1)
    g = p * (gl[:, None] + gp - dot[:, None])
    tl.store(grad_ptr + rows64[:, None] * stride_g + lane, g.to(grad_ptr.dtype.element_ty), mask=mask)
