"""``@triton.jit`` bodies of the noisy top-k gating kernels (launchers beside this file).

Tiles of a row-major ``[T, E]`` tensor per program, ``BLOCK_T`` rows by
``BLOCK_E`` lanes (the next power of two of ``E``), math in ``CDT``; the selection
keys are described in :mod:`._select_kernels`.
"""
import triton
import triton.language as tl

from ._select_kernels import INV_SQRT2, INV_SQRT_2PI, column, make_keys, row_tile, select, sigmoid, softplus


# --------------------------------------------------------------------------
# noisy top-k gating (training mode)
# --------------------------------------------------------------------------
@triton.jit
def noisy_topk_gating_fwd_kernel(
    clean_ptr,  # [T, E]
    noise_logits_ptr,  # [T, E] (pre-softplus)
    noise_ptr,  # [T, E]
    weights_ptr,  # [T, K] CDT out
    indices_ptr,  # [T, K] int64 out
    thr_ptr,  # [T] int64 out
    imp_part_ptr,  # [num_programs, E] CDT out
    load_part_ptr,  # [num_programs, E] CDT out (written when HAS_LOAD)
    T,
    E,
    stride_c,
    stride_nl,
    stride_n,
    eps_ptr,  # [1] CDT: noise_eps (a tensor so float64 math gets it exactly)
    K: tl.constexpr,
    M: tl.constexpr,  # min(K + 1, E)
    HAS_LOAD: tl.constexpr,  # K < E
    MODE: tl.constexpr,  # 0 (float32) or 3 (float64)
    USE_SORT: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    c = tl.load(clean_ptr + rows64[:, None] * stride_c + lane, mask=mask, other=0.0).to(CDT)
    nl = tl.load(noise_logits_ptr + rows64[:, None] * stride_nl + lane, mask=mask, other=0.0).to(CDT)
    nz = tl.load(noise_ptr + rows64[:, None] * stride_n + lane, mask=mask, other=0.0).to(CDT)
    std = softplus(nl) + tl.load(eps_ptr).to(CDT)
    noisy = c + nz * std

    key = make_keys(noisy, lane, lane_ok, BLOCK_E, MODE)
    sel_idx, sel_val, chosen = select(
        key, lane, lane_ok, M, K, KP, BLOCK_T, BLOCK_E, MODE, USE_SORT
    )
    col = tl.arange(0, KP)[None, :]
    v0 = column(sel_val, col, 0)
    s = tl.sum(tl.where(col < K, tl.exp(sel_val - v0[:, None]), 0.0), axis=1)
    lse = v0 + tl.log(s)
    w = tl.exp(sel_val - lse[:, None])

    out_mask = row_ok[:, None] & (col < K)
    out_off = rows64[:, None] * K + col
    tl.store(weights_ptr + out_off, w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(indices_ptr + out_off, sel_idx.to(tl.int64), mask=out_mask)

    part_off = pid.to(tl.int64) * E + lane1
    gates = tl.where(chosen & row_ok[:, None], tl.exp(noisy - lse[:, None]), 0.0)
    tl.store(imp_part_ptr + part_off, tl.sum(gates, axis=0), mask=lane1 < E)

    if HAS_LOAD:
        thr_idx = column(sel_idx, col, K)
        tl.store(thr_ptr + rows64, thr_idx.to(tl.int64), mask=row_ok)
        v_thr = column(sel_val, col, K)  # (K+1)-th noisy value
        v_last = column(sel_val, col, K - 1)  # K-th noisy value
        thr = tl.where(chosen, v_thr[:, None], v_last[:, None])
        z = (c - thr) / std
        phi = 0.5 * (1.0 + tl.math.erf(z * tl.full([], INV_SQRT2, CDT)))
        tl.store(load_part_ptr + part_off, tl.sum(tl.where(mask, phi, 0.0), axis=0), mask=lane1 < E)
    else:
        tl.store(thr_ptr + rows64, tl.full([BLOCK_T], -1, tl.int64), mask=row_ok)


@triton.jit
def noisy_topk_gating_bwd_kernel(
    grad_w_ptr,  # [T, K]
    grad_imp_ptr,  # [E]
    grad_load_ptr,  # [E]
    clean_ptr,  # [T, E]
    noise_logits_ptr,  # [T, E]
    noise_ptr,  # [T, E]
    weights_ptr,  # [T, K]
    indices_ptr,  # [T, K] int64
    thr_ptr,  # [T] int64
    grad_clean_ptr,  # [T, E] out
    grad_nl_ptr,  # [T, E] out
    T,
    E,
    stride_c,
    stride_nl,
    stride_n,
    stride_gc,
    stride_gnl,
    eps_ptr,  # [1] CDT: noise_eps (a tensor so float64 math gets it exactly)
    K: tl.constexpr,
    HAS_LOAD: tl.constexpr,  # K < E
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CDT: tl.constexpr,
):
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = row_tile(T, E, BLOCK_T, BLOCK_E)

    c = tl.load(clean_ptr + rows64[:, None] * stride_c + lane, mask=mask, other=0.0).to(CDT)
    nl = tl.load(noise_logits_ptr + rows64[:, None] * stride_nl + lane, mask=mask, other=0.0).to(CDT)
    nz = tl.load(noise_ptr + rows64[:, None] * stride_n + lane, mask=mask, other=0.0).to(CDT)
    std = softplus(nl) + tl.load(eps_ptr).to(CDT)

    # scatter the k routed (grad, weight) pairs onto their experts
    gsc = tl.zeros([BLOCK_T, BLOCK_E], dtype=CDT)
    wsc = tl.zeros([BLOCK_T, BLOCK_E], dtype=CDT)
    hits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in range(K):
        gj = tl.load(grad_w_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(CDT)
        wj = tl.load(weights_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(CDT)
        ij = tl.load(indices_ptr + rows64 * K + j, mask=row_ok, other=0).to(tl.int32)
        hit = lane == ij[:, None]
        gsc = tl.where(hit, gj[:, None], gsc)
        wsc = tl.where(hit, wj[:, None], wsc)
        hits = tl.where(hit, 1, hits)
    chosen = (hits != 0) & lane_ok
    gi = tl.load(grad_imp_ptr + lane, mask=lane_ok, other=0.0).to(CDT)
    gw = gsc + gi
    s = tl.sum(tl.where(chosen, wsc * gw, 0.0), axis=1)
    d_noisy = tl.where(chosen, wsc * (gw - s[:, None]), 0.0)

    d_clean = tl.zeros([BLOCK_T, BLOCK_E], dtype=CDT)
    d_std = tl.zeros([BLOCK_T, BLOCK_E], dtype=CDT)
    if HAS_LOAD:
        noisy = c + nz * std
        i_thr = tl.load(thr_ptr + rows64, mask=row_ok, other=0).to(tl.int32)
        i_last = tl.load(indices_ptr + rows64 * K + (K - 1), mask=row_ok, other=0).to(tl.int32)
        is_thr = lane == i_thr[:, None]
        is_last = lane == i_last[:, None]
        v_thr = tl.sum(tl.where(is_thr, noisy, 0.0), axis=1)
        v_last = tl.sum(tl.where(is_last, noisy, 0.0), axis=1)
        thr = tl.where(chosen, v_thr[:, None], v_last[:, None])
        z = (c - thr) / std
        gl = tl.load(grad_load_ptr + lane, mask=lane_ok, other=0.0).to(CDT)
        a = tl.where(mask, gl * tl.exp(-0.5 * z * z) * tl.full([], INV_SQRT_2PI, CDT) / std, 0.0)
        d_clean = a
        d_std = -a * z
        a_ch = tl.sum(tl.where(chosen, a, 0.0), axis=1)
        a_nc = tl.sum(tl.where(chosen, 0.0, a), axis=1)
        d_noisy -= tl.where(is_thr, a_ch[:, None], 0.0) + tl.where(is_last, a_nc[:, None], 0.0)
    d_clean += d_noisy
    d_std += d_noisy * nz
    d_nl = d_std * sigmoid(nl)
    tl.store(
        grad_clean_ptr + rows64[:, None] * stride_gc + lane,
        d_clean.to(grad_clean_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        grad_nl_ptr + rows64[:, None] * stride_gnl + lane,
        d_nl.to(grad_nl_ptr.dtype.element_ty),
        mask=mask,
    )
