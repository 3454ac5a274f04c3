"""``@triton.jit`` bodies of the gating kernels (launchers: :mod:`.gating`).

Every kernel handles a ``BLOCK_T x BLOCK_E`` tile of a row-major ``[T, E]``
logits tensor per program: ``BLOCK_E`` is the next power of two of ``E`` (lanes
``>= E`` are masked), ``BLOCK_T`` rows per program (rows ``>= T`` masked). Math
runs in ``CDT`` (float32, or float64 for float64 input). Row offsets are formed
in int64.

Selection ("larger first, ties to the lower expert index, NaN as +inf") works on
integer keys that are unique within a row, so one ``tl.max`` per round (or one
``tl.sort``) gives the order with the tie-break built in:

* ``MODE 0`` (float32 values): the value's bits made order-preserving as an
  int32, in the high half of an int64; ``BLOCK_E - 1 - lane`` in the low half.
* ``MODE 1`` / ``MODE 2`` (float16 / bfloat16 logits): the 16-bit pattern made
  order-preserving, times 65536, plus ``BLOCK_E - 1 - lane``: an int32 key
  (needs ``BLOCK_E <= 65536``), half the register and shuffle traffic of int64.
* ``MODE 3`` (float64): the order-preserving int64 of the value bits, not
  unique, so each round takes a second reduction (lowest lane among the maxima).

Before keying, NaN becomes +inf and -0.0 becomes +0.0 (so they tie, as in
``torch.sort``). Padded lanes get the key type's minimum, which no real value
reaches. The selected value is decoded back from the key, which is exact.
"""
import triton
import triton.language as tl

_I64_MIN = tl.constexpr(-(2**63))
_I32_MIN = tl.constexpr(-(2**31))
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# --------------------------------------------------------------------------
# small elementwise helpers
# --------------------------------------------------------------------------
@triton.jit
def _routed_dot(grad_w_ptr, weights_ptr, rows64, row_ok, K: tl.constexpr, KP: tl.constexpr, CDT: tl.constexpr):
    """s [BLOCK_T] = sum_j grad_weights[t, j] * weights[t, j] over the k routed experts."""
    colk = tl.arange(0, KP)[None, :]
    kmask = row_ok[:, None] & (colk < K)
    koff = rows64[:, None] * K + colk
    g = tl.load(grad_w_ptr + koff, mask=kmask, other=0.0).to(CDT)
    w = tl.load(weights_ptr + koff, mask=kmask, other=0.0).to(CDT)
    return tl.sum(g * w, axis=1)


@triton.jit
def _row_tile(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's tile of BLOCK_T token rows x BLOCK_E expert lanes:
    (pid, rows64 [BLOCK_T] int64, row_ok [BLOCK_T], lane1 [BLOCK_E],
    lane [1, BLOCK_E], lane_ok [1, BLOCK_E], mask [BLOCK_T, BLOCK_E])."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    lane1 = tl.arange(0, BLOCK_E)
    lane = lane1[None, :]
    lane_ok = lane < E
    return pid, rows.to(tl.int64), row_ok, lane1, lane, lane_ok, row_ok[:, None] & lane_ok


@triton.jit
def _log1p(y):
    """log(1 + y) for y >= 0, accurate for tiny y (Goldberg's correction)."""
    u = 1.0 + y
    d = u - 1.0
    return tl.where(d == 0.0, y, tl.log(u) * (y / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(x):
    """softplus(x) = log(1 + exp(x)), torch's form (identity above 20)."""
    return tl.where(x > 20.0, x, _log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) without overflow."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _remove(key, hit, MODE: tl.constexpr):
    """key with the lanes in hit set to the pad key (below every real key)."""
    if MODE == 1 or MODE == 2:
        key = tl.where(hit, _I32_MIN, key)
    else:
        key = tl.where(hit, _I64_MIN, key)
    return key


@triton.jit
def _is_pad(key, MODE: tl.constexpr):
    if MODE == 1 or MODE == 2:
        r = key == _I32_MIN
    else:
        r = key == _I64_MIN
    return r


@triton.jit
def _make_keys(x, lane, lane_ok, BLOCK_E: tl.constexpr, MODE: tl.constexpr):
    """Selection keys [BLOCK_T, BLOCK_E] of the values x (float32, float64 in MODE 3).

    Larger key = ranks first; unique per row in MODEs 0-2; padded lanes get
    the key type's minimum.
    """
    x = tl.where(x != x, float("inf"), x)  # NaN ranks as +inf
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0
    if MODE == 0:
        bits = x.to(tl.int32, bitcast=True)
        o = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = o.to(tl.int64) * 4294967296 + (BLOCK_E - 1 - lane).to(tl.int64)
        key = tl.where(lane_ok, key, _I64_MIN)
    elif MODE == 1:
        # exact: x came from float16
        b = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        o = tl.where(b >= 0, b, b ^ 0x7FFF)
        key = o * 65536 + (BLOCK_E - 1 - lane)
        key = tl.where(lane_ok, key, _I32_MIN)
    elif MODE == 2:
        # x came from bfloat16: its float32 bits' high half is the bf16 pattern
        b = x.to(tl.int32, bitcast=True) >> 16
        o = tl.where(b >= 0, b, b ^ 0x7FFF)
        key = o * 65536 + (BLOCK_E - 1 - lane)
        key = tl.where(lane_ok, key, _I32_MIN)
    else:
        bits = x.to(tl.int64, bitcast=True)
        o = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
        key = tl.where(lane_ok, o, _I64_MIN)
    return key


@triton.jit
def _decode_value(key, MODE: tl.constexpr):
    """The (canonical) value a key was built from, float32 (float64 in MODE 3)."""
    if MODE == 0:
        hi = (key >> 32).to(tl.int32)
        bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
        val = bits.to(tl.float32, bitcast=True)
    elif MODE == 1:
        hi = key >> 16
        b = tl.where(hi >= 0, hi, hi ^ 0x7FFF)
        val = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    elif MODE == 2:
        hi = key >> 16
        b = tl.where(hi >= 0, hi, hi ^ 0x7FFF)
        val = (b * 65536).to(tl.float32, bitcast=True)
    else:
        bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFFFFFFFFFF)
        val = bits.to(tl.float64, bitcast=True)
    return val


@triton.jit
def _decode_index(key, BLOCK_E: tl.constexpr, MODE: tl.constexpr):
    """The expert index (int32) stored in a key's low bits (MODEs 0-2)."""
    if MODE == 0:
        low = (key - (key >> 32) * 4294967296).to(tl.int32)
    else:
        low = key & 0xFFFF
    return BLOCK_E - 1 - low


@triton.jit
def _column(tile, col, j):
    """tile[:, j] of a [BLOCK_T, KP] tile (a masked row reduction)."""
    return tl.sum(tl.where(col == j, tile, 0), axis=1)


@triton.jit
def _select(
    key,
    lane,
    lane_ok,
    M: tl.constexpr,
    K_CHOSEN: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    MODE: tl.constexpr,
    USE_SORT: tl.constexpr,
):
    """The M best entries of each row, in order.

    key [BLOCK_T, BLOCK_E] from :func:`_make_keys`; lane [1, BLOCK_E].
    Returns sel_idx [BLOCK_T, KP] int32, sel_val [BLOCK_T, KP] (columns >= M
    are junk), and chosen [BLOCK_T, BLOCK_E]: lane is among the first K_CHOSEN
    (K_CHOSEN == M or M - 1). USE_SORT (MODEs 0-2 only) sorts the whole row
    (KP must be BLOCK_E); otherwise M rounds of a row max.
    """
    col = tl.arange(0, KP)[None, :]
    if USE_SORT:
        skey = tl.sort(key, dim=1, descending=True)
        sel_idx = _decode_index(skey, BLOCK_E, MODE)
        sel_val = _decode_value(skey, MODE)
        kth = _column(skey, col, K_CHOSEN - 1)  # keys are unique: ">= kth" is the top K_CHOSEN
        chosen = (key >= kth[:, None]) & lane_ok
    else:
        sel_idx = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
        last = tl.zeros([BLOCK_T], dtype=tl.int32)
        if MODE == 3:
            # keys may tie: the second reduction picks the lowest lane among the maxima
            sel_val = tl.zeros([BLOCK_T, KP], dtype=tl.float64)
            for j in range(M):
                m = tl.max(key, axis=1)
                i = tl.min(tl.where(key == m[:, None], lane, BLOCK_E), axis=1)
                key = tl.where(lane == i[:, None], _I64_MIN, key)
                sel_idx = tl.where(col == j, i[:, None], sel_idx)
                sel_val = tl.where(col == j, _decode_value(m, MODE)[:, None], sel_val)
                last = i
        else:
            sel_val = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
            for j in tl.static_range(M):
                m = tl.max(key, axis=1)
                i = _decode_index(m, BLOCK_E, MODE)
                key = _remove(key, key == m[:, None], MODE)
                sel_idx = tl.where(col == j, i[:, None], sel_idx)
                sel_val = tl.where(col == j, _decode_value(m, MODE)[:, None], sel_val)
                last = i
        # every taken lane now holds the pad key; drop the M-th if it is extra
        chosen = _is_pad(key, MODE) & lane_ok
        if K_CHOSEN < M:
            chosen = chosen & (lane != last[:, None])
    return sel_idx, sel_val, chosen


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
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = _row_tile(T, E, BLOCK_T, BLOCK_E)
    x = tl.load(logits_ptr + rows64[:, None] * stride_l + lane, mask=mask, other=0.0).to(CDT)

    key = _make_keys(x, lane, lane_ok, BLOCK_E, MODE)
    sel_idx, sel_val, _chosen = _select(
        key, lane, lane_ok, K, K, KP, BLOCK_T, BLOCK_E, MODE, USE_SORT
    )
    col = tl.arange(0, KP)[None, :]
    v0 = _column(sel_val, col, 0)  # the row max (NaN -> +inf)
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
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = _row_tile(T, E, BLOCK_T, BLOCK_E)

    s = _routed_dot(grad_w_ptr, weights_ptr, rows64, row_ok, K, KP, CDT)

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
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = _row_tile(T, E, BLOCK_T, BLOCK_E)

    c = tl.load(clean_ptr + rows64[:, None] * stride_c + lane, mask=mask, other=0.0).to(CDT)
    nl = tl.load(noise_logits_ptr + rows64[:, None] * stride_nl + lane, mask=mask, other=0.0).to(CDT)
    nz = tl.load(noise_ptr + rows64[:, None] * stride_n + lane, mask=mask, other=0.0).to(CDT)
    std = _softplus(nl) + tl.load(eps_ptr).to(CDT)
    noisy = c + nz * std

    key = _make_keys(noisy, lane, lane_ok, BLOCK_E, MODE)
    sel_idx, sel_val, chosen = _select(
        key, lane, lane_ok, M, K, KP, BLOCK_T, BLOCK_E, MODE, USE_SORT
    )
    col = tl.arange(0, KP)[None, :]
    v0 = _column(sel_val, col, 0)
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
        thr_idx = _column(sel_idx, col, K)
        tl.store(thr_ptr + rows64, thr_idx.to(tl.int64), mask=row_ok)
        v_thr = _column(sel_val, col, K)  # (K+1)-th noisy value
        v_last = _column(sel_val, col, K - 1)  # K-th noisy value
        thr = tl.where(chosen, v_thr[:, None], v_last[:, None])
        z = (c - thr) / std
        phi = 0.5 * (1.0 + tl.math.erf(z * tl.full([], _INV_SQRT2, CDT)))
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
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = _row_tile(T, E, BLOCK_T, BLOCK_E)

    c = tl.load(clean_ptr + rows64[:, None] * stride_c + lane, mask=mask, other=0.0).to(CDT)
    nl = tl.load(noise_logits_ptr + rows64[:, None] * stride_nl + lane, mask=mask, other=0.0).to(CDT)
    nz = tl.load(noise_ptr + rows64[:, None] * stride_n + lane, mask=mask, other=0.0).to(CDT)
    std = _softplus(nl) + tl.load(eps_ptr).to(CDT)

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
        a = tl.where(mask, gl * tl.exp(-0.5 * z * z) * tl.full([], _INV_SQRT_2PI, CDT) / std, 0.0)
        d_clean = a
        d_std = -a * z
        a_ch = tl.sum(tl.where(chosen, a, 0.0), axis=1)
        a_nc = tl.sum(tl.where(chosen, 0.0, a), axis=1)
        d_noisy -= tl.where(is_thr, a_ch[:, None], 0.0) + tl.where(is_last, a_nc[:, None], 0.0)
    d_clean += d_noisy
    d_std += d_noisy * nz
    d_nl = d_std * _sigmoid(nl)
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
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = _row_tile(T, E, BLOCK_T, BLOCK_E)

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
    pid, rows64, row_ok, lane1, lane, lane_ok, mask = _row_tile(T, E, BLOCK_T, BLOCK_E)

    x = tl.load(logits_ptr + rows64[:, None] * stride_l + lane, mask=mask, other=0.0).to(CDT)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    gl = tl.load(grad_lse_ptr + rows64, mask=row_ok, other=0.0).to(CDT)
    gp = tl.load(grad_ps_ptr + lane, mask=lane_ok, other=0.0).to(CDT)
    p = tl.where(lane_ok, tl.exp(x - lse[:, None]), 0.0)
    dot = tl.sum(p * gp, axis=1)
    g = p * (gl[:, None] + gp - dot[:, None])
    tl.store(grad_ptr + rows64[:, None] * stride_g + lane, g.to(grad_ptr.dtype.element_ty), mask=mask)
