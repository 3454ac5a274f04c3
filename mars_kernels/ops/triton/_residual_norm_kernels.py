"""``@triton.jit`` bodies of the residual + LayerNorm + mean kernels (launchers:
:mod:`.residual_norm`).

A program handles ``BLOCK_T`` rows and the whole feature width (``BLOCK_D`` =
next power of two of D, lanes beyond it masked). The forward runs over the
I = P * T instances (instance p * T + t reads h's row t); the backward over
positions, looping over the P masks of each so that h's gradient sums them in
registers, and writes this program's partial sums of d weight, d bias and d
missing to its own slot (no atomics). Math in ``CDT``; offsets in int64.
"""
import triton
import triton.language as tl


@triton.jit
def _rows(n, BLOCK_T: tl.constexpr, D, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    return rows.to(tl.int64), row_ok, lanes, row_ok[:, None] & (lanes[None, :] < D)


@triton.jit
def _residual(y_ptr, h_ptr, miss_ptr, obs_ptr, inst64, pos64, row_ok, lanes, tile_ok, m, M, D,
              CDT: tl.constexpr, HAS_MISSING: tl.constexpr):
    """(r = y + x [BLOCK_T, BLOCK_D] in CDT, seen [BLOCK_T]) for modality m."""
    y = tl.load(y_ptr + (inst64[:, None] * M + m) * D + lanes[None, :], mask=tile_ok, other=0.0).to(CDT)
    if HAS_MISSING:
        seen = tl.load(obs_ptr + inst64 * M + m, mask=row_ok, other=1) != 0
        x = tl.load(h_ptr + (pos64[:, None] * M + m) * D + lanes[None, :], mask=tile_ok & seen[:, None], other=0.0)
        fill = tl.load(miss_ptr + m * D + lanes, mask=lanes < D, other=0.0).to(CDT)
        x = tl.where(seen[:, None], x.to(CDT), fill[None, :])
    else:
        seen = row_ok | True
        x = tl.load(h_ptr + (pos64[:, None] * M + m) * D + lanes[None, :], mask=tile_ok, other=0.0).to(CDT)
    return tl.where(tile_ok, y + x, 0.0), seen


@triton.jit
def residual_norm_mean_fwd_kernel(
    y_ptr,  # [I, M, D]
    h_ptr,  # [T, M, D]
    w_ptr,  # [D]
    b_ptr,  # [D]
    miss_ptr,  # [M, D] (read only when HAS_MISSING)
    obs_ptr,  # [I, M] uint8 (read only when HAS_MISSING)
    z_ptr,  # [I, D] out, h's dtype
    mean_ptr,  # [I, M] CDT out
    rstd_ptr,  # [I, M] CDT out
    T,
    I,
    M,
    D,
    eps_ptr,  # [1] in CDT: a tensor so float64 math gets a float64 eps
    HAS_MISSING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CDT: tl.constexpr,
):
    inst64, row_ok, lanes, tile_ok = _rows(I, BLOCK_T, D, BLOCK_D)
    pos64 = inst64 % T
    w = tl.load(w_ptr + lanes, mask=lanes < D, other=0.0).to(CDT)
    b = tl.load(b_ptr + lanes, mask=lanes < D, other=0.0).to(CDT)
    z = tl.zeros([BLOCK_T, BLOCK_D], CDT)
    for m in range(M):
        r, _seen = _residual(y_ptr, h_ptr, miss_ptr, obs_ptr, inst64, pos64, row_ok, lanes, tile_ok, m, M, D,
                             CDT, HAS_MISSING)
        mu = tl.sum(r, axis=1) / D
        diff = tl.where(tile_ok, r - mu[:, None], 0.0)
        rs = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + tl.load(eps_ptr))
        tl.store(mean_ptr + inst64 * M + m, mu, mask=row_ok)
        tl.store(rstd_ptr + inst64 * M + m, rs, mask=row_ok)
        z += diff * rs[:, None] * w[None, :] + b[None, :]
    tl.store(z_ptr + inst64[:, None] * D + lanes[None, :], (z / M).to(z_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def residual_norm_mean_bwd_kernel(
    gz_ptr,  # [I, D]
    y_ptr,  # [I, M, D]
    h_ptr,  # [T, M, D]
    w_ptr,  # [D]
    miss_ptr,  # [M, D] (read only when HAS_MISSING)
    obs_ptr,  # [I, M] uint8 (read only when HAS_MISSING)
    mean_ptr,  # [I, M] CDT
    rstd_ptr,  # [I, M] CDT
    gy_ptr,  # [I, M, D] out, h's dtype
    gh_ptr,  # [T, M, D] out, h's dtype
    part_ptr,  # [programs, 2 + M, D] CDT out: d weight, d bias, d missing of this program's rows
    T,
    P,
    M,
    D,
    HAS_MISSING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CDT: tl.constexpr,
):
    pos64, row_ok, lanes, tile_ok = _rows(T, BLOCK_T, D, BLOCK_D)
    lane_ok = lanes < D
    part_ptr += tl.program_id(0).to(tl.int64) * (2 + M) * D
    w = tl.load(w_ptr + lanes, mask=lane_ok, other=0.0).to(CDT)
    dw = tl.zeros([BLOCK_D], CDT)
    db = tl.zeros([BLOCK_D], CDT)
    for m in range(M):
        gh = tl.zeros([BLOCK_T, BLOCK_D], CDT)
        dmiss = tl.zeros([BLOCK_D], CDT)
        for p in range(P):
            inst64 = p * T + pos64
            g = tl.load(gz_ptr + inst64[:, None] * D + lanes[None, :], mask=tile_ok, other=0.0).to(CDT) / M
            r, seen = _residual(y_ptr, h_ptr, miss_ptr, obs_ptr, inst64, pos64, row_ok, lanes, tile_ok, m, M, D,
                                CDT, HAS_MISSING)
            mu = tl.load(mean_ptr + inst64 * M + m, mask=row_ok, other=0.0)
            rs = tl.load(rstd_ptr + inst64 * M + m, mask=row_ok, other=0.0)
            xhat = tl.where(tile_ok, (r - mu[:, None]) * rs[:, None], 0.0)
            gw = g * w[None, :]
            c1 = tl.sum(gw, axis=1) / D
            c2 = tl.sum(gw * xhat, axis=1) / D
            dr = tl.where(tile_ok, rs[:, None] * (gw - c1[:, None] - xhat * c2[:, None]), 0.0)
            tl.store(gy_ptr + (inst64[:, None] * M + m) * D + lanes[None, :], dr.to(gy_ptr.dtype.element_ty),
                     mask=tile_ok)
            gh += tl.where(seen[:, None], dr, 0.0)
            dmiss += tl.sum(tl.where(seen[:, None], 0.0, dr), axis=0)
            dw += tl.sum(g * xhat, axis=0)
            db += tl.sum(g, axis=0)
        tl.store(gh_ptr + (pos64[:, None] * M + m) * D + lanes[None, :], gh.to(gh_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(part_ptr + (2 + m) * D + lanes, dmiss, mask=lane_ok)
    tl.store(part_ptr + lanes, dw, mask=lane_ok)
    tl.store(part_ptr + D + lanes, db, mask=lane_ok)
