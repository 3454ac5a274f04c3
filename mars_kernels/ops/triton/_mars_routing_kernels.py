"""``@triton.jit`` bodies of the MARS routing kernels (launchers: :mod:`.mars_routing`).

Layout as in :mod:`._gating_kernels`: every program handles a ``BLOCK_T x
BLOCK_E`` tile of the row-major ``[T, E]`` residual / feature logits
(``BLOCK_E`` = next power of two of ``E``, lanes ``>= E`` and rows ``>= T``
masked), math in ``CDT`` (float32, or float64 for float64 logits), row offsets
in int64. Selection reuses the integer keys of :mod:`._select_kernels`
(``MODE`` 0 for float32 noisy values, 3 for float64): larger first, ties to
the lower expert index, NaN ranked as +inf.

Row log-sum-exps are shifted by the row max whatever it is, so they follow
``torch.log_softmax``: a row holding NaN or +inf, or all -inf, gets a NaN lse
and an all-NaN softmax (the reference computes ``p = exp(log_softmax(l))``).
"""
import triton
import triton.language as tl

from ._select_kernels import column, make_keys, routed_dot, row_tile, select


@triton.jit
def _row_lse(x, lane_ok):
    """Log-sum-exp [BLOCK_T] of the valid lanes of x [BLOCK_T, BLOCK_E]."""
    m = tl.max(tl.where(lane_ok, x, float("-inf")), axis=1)
    s = tl.sum(tl.where(lane_ok, tl.exp(x - m[:, None]), 0.0), axis=1)
    return m + tl.log(s)


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------
@triton.jit
def mars_routing_fwd_kernel(
    lr_ptr,  # [T, E] residual logits, f16/bf16/f32/f64
    lf_ptr,  # [T, E] feature logits, same dtype
    noise_ptr,  # [T, E]
    sigma_ptr,  # [3] CDT: sigma_0, sigma_const, sigma_max (a tensor: exact in float64)
    weights_ptr,  # [T, K] CDT out
    indices_ptr,  # [T, K] int64 out
    imit_ptr,  # [T] CDT out
    div_ptr,  # [T] CDT out
    prob_part_ptr,  # [num_programs, E] CDT out: this program's sum over its rows of p_r
    lse_r_ptr,  # [T] CDT out
    lse_f_ptr,  # [T] CDT out
    T,
    E,
    stride_r,
    stride_f,
    stride_n,
    K: tl.constexpr,
    MODE: tl.constexpr,  # 0 (float32) or 3 (float64)
    USE_SORT: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    # Softmax statistics of both routers and the divergence KL(p_r || p_f).
    lr = tl.load(lr_ptr + rows64[:, None] * stride_r + lane, mask=mask, other=0.0).to(CDT)
    lf = tl.load(lf_ptr + rows64[:, None] * stride_f + lane, mask=mask, other=0.0).to(CDT)
    lse_r = _row_lse(lr, lane_ok)
    lse_f = _row_lse(lf, lane_ok)
    log_pr = lr - lse_r[:, None]
    pr = tl.exp(log_pr)
    kl = tl.sum(tl.where(lane_ok, pr * (log_pr - (lf - lse_f[:, None])), 0.0), axis=1)

    # Noisy logits; sigma as torch.clamp(max=): a NaN sigma stays NaN.
    sigma_0 = tl.load(sigma_ptr).to(CDT)
    sigma_const = tl.load(sigma_ptr + 1).to(CDT)
    sigma_max = tl.load(sigma_ptr + 2).to(CDT)
    sigma = sigma_0 * kl + sigma_const
    sigma = tl.where(sigma > sigma_max, sigma_max, sigma)
    nz = tl.load(noise_ptr + rows64[:, None] * stride_n + lane, mask=mask, other=0.0).to(CDT)
    noisy = lr + sigma[:, None] * nz

    # Top K of the noisy logits, softmax over the K selected values.
    key = make_keys(noisy, lane, lane_ok, BLOCK_E, MODE)
    sel_idx, sel_val, _chosen = select(
        key, lane, lane_ok, K, K, KP, BLOCK_T, BLOCK_E, MODE, USE_SORT
    )
    col = tl.arange(0, KP)[None, :]
    v0 = column(sel_val, col, 0)  # the largest noisy value (NaN -> +inf)
    s = tl.sum(tl.where(col < K, tl.exp(sel_val - v0[:, None]), 0.0), axis=1)
    lse_sel = v0 + tl.log(s)
    w = tl.exp(sel_val - lse_sel[:, None])

    out_mask = row_ok[:, None] & (col < K)
    out_off = rows64[:, None] * K + col
    tl.store(weights_ptr + out_off, w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(indices_ptr + out_off, sel_idx.to(tl.int64), mask=out_mask)
    tl.store(imit_ptr + rows64, kl.to(imit_ptr.dtype.element_ty), mask=row_ok)
    tl.store(div_ptr + rows64, kl.to(div_ptr.dtype.element_ty), mask=row_ok)
    tl.store(lse_r_ptr + rows64, lse_r.to(lse_r_ptr.dtype.element_ty), mask=row_ok)
    tl.store(lse_f_ptr + rows64, lse_f.to(lse_f_ptr.dtype.element_ty), mask=row_ok)
    p_sum = tl.sum(tl.where(mask, pr, 0.0), axis=0)
    tl.store(prob_part_ptr + pid.to(tl.int64) * E + lane1, p_sum, mask=lane1 < E)


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------
@triton.jit
def mars_routing_bwd_kernel(
    grad_w_ptr,  # [T, K] CDT
    grad_imit_ptr,  # [T] CDT
    grad_ps_ptr,  # [E] CDT
    lr_ptr,  # [T, E]
    lf_ptr,  # [T, E]
    weights_ptr,  # [T, K] CDT
    indices_ptr,  # [T, K] int64
    lse_r_ptr,  # [T] CDT
    lse_f_ptr,  # [T] CDT
    grad_r_ptr,  # [T, E] out, logits dtype
    grad_f_ptr,  # [T, E] out, logits dtype
    T,
    E,
    stride_r,
    stride_f,
    stride_gr,
    stride_gf,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    s = routed_dot(grad_w_ptr, weights_ptr, rows64, row_ok, K, KP, CDT)

    # Dense part of grad_r from prob_sum: p_r * (gps - <gps, p_r>).
    lr = tl.load(lr_ptr + rows64[:, None] * stride_r + lane, mask=mask, other=0.0).to(CDT)
    lse_r = tl.load(lse_r_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    pr = tl.where(lane_ok, tl.exp(lr - lse_r[:, None]), 0.0)
    gp = tl.load(grad_ps_ptr + lane, mask=lane_ok, other=0.0).to(CDT)
    dot = tl.sum(pr * gp, axis=1)
    acc = pr * (gp - dot[:, None])
    # Sparse part: the softmax over the K noisy values (d noisy / d l_r = 1).
    for j in range(K):
        gj = tl.load(grad_w_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(CDT)
        wj = tl.load(weights_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(CDT)
        ij = tl.load(indices_ptr + rows64 * K + j, mask=row_ok, other=0).to(tl.int32)
        acc += tl.where(lane == ij[:, None], (wj * (gj - s))[:, None], 0.0)
    tl.store(
        grad_r_ptr + rows64[:, None] * stride_gr + lane,
        acc.to(grad_r_ptr.dtype.element_ty),
        mask=mask,
    )

    # grad_f = grad_imitation * (p_f - p_r).
    lf = tl.load(lf_ptr + rows64[:, None] * stride_f + lane, mask=mask, other=0.0).to(CDT)
    lse_f = tl.load(lse_f_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    gi = tl.load(grad_imit_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    gf = gi[:, None] * (tl.exp(lf - lse_f[:, None]) - pr)
    tl.store(
        grad_f_ptr + rows64[:, None] * stride_gf + lane,
        gf.to(grad_f_ptr.dtype.element_ty),
        mask=mask,
    )
