"""``@triton.jit`` bodies of the fused expert MLP (launchers: :mod:`.moe`).

Row layout (see :class:`mars_kernels.meta.MoEMeta`): sorted slot ``s`` holds
assignment ``flat = permutation[s]`` of token ``flat // TOP_K``; expert ``e``
owns slots ``offsets[e] .. offsets[e+1]-1``. The row-tiled kernels run one
program per (row block ``b``, output column tile): block ``b`` belongs to expert
``block_expert[b]`` (-1: unused, the program exits) and covers slots
``block_start[b] ..  min(block_start[b] + BLOCK_M, offsets[e+1]) - 1``, so a
tile never straddles two experts and padding exists only in the index space.

* :func:`moe_gemm_kernel`: ``C[rows] = act(A[rows]) @ B[e] (+ bias[e]) (* gate weight)``
  with the rows of A gathered from token order (``A_GATHER``) or read in sorted
  order, the activation applied while loading A (``ACT``), and C stored at the
  sorted slot or scattered to the flat assignment row (``C_SCATTER``). B's
  strides are free, so ``W^T`` is the same kernel.
* :func:`moe_bwd_dh_kernel`: ``G = grad_y[tok] @ W2[e]^T`` tile, then in the
  epilogue ``dh = act'(h) * w * G`` and the per-tile partial of
  ``grad_weights = <G, act(h)> + <grad_y[tok], b2[e]>``.
* :func:`moe_wgrad_kernel`: per expert ``C[e] = A_rows^T @ B_rows`` (dW), looping
  over the expert's rows in ``BLOCK_R`` chunks, with the column sums of B (db)
  on the side.
* :func:`moe_combine_kernel`: ``out[t] = sum_j buf[t*TOP_K + j]`` in fp32, in
  the order j = 0..TOP_K-1, skipping dropped assignments (deterministic).

All row offsets are int64 (row indices come from int64 metadata); accumulation
is fp32. ``UPCAST`` casts the ``tl.dot`` operands to fp32 (bf16 under the
interpreter, whose bf16 dot is wrong). ``ACT``: 0 none, 1 gelu (erf), 2 silu,
3 gelu (tanh), 4 relu, 5 x sigmoid(alpha x), 6 relu^2; ``GATED``: A holds gate and up
columns, each up ``UP_STEP`` elements after its gate (``[gate | up]`` halves or
interleaved columns), a = f(gate) * up; ``CLAMP``: gate capped at ``limit``, up
clipped to +-``limit`` plus ``up_offset`` (the clamped SwiGLU of GPT-OSS).
"""
import triton
import triton.language as tl

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

ACT_NONE = 0
ACT_GELU = 1
ACT_SILU = 2
ACT_GELU_TANH = 3
ACT_RELU = 4
ACT_SILU_ALPHA = 5  # x sigmoid(alpha x): the gate function of the clamped SwiGLU
ACT_RELU2 = 6


# --------------------------------------------------------------------------
# activations (fp32 in, fp32 out)
# --------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _tanh(u):
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act_fwd(h, ACT: tl.constexpr, alpha):
    """f(h) of fp32 h for the element function ACT (identity for ACT 0)."""
    if ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
    elif ACT == 2:
        out = h * _sigmoid(h)
    elif ACT == 3:
        out = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACT == 4:
        out = tl.where(h > 0, h, tl.where(h != h, h, 0.0))
    elif ACT == 5:
        out = h * _sigmoid(alpha * h)
    elif ACT == 6:
        r = tl.where(h > 0, h, tl.where(h != h, h, 0.0))
        out = r * r
    else:
        out = h
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr, alpha):
    """f'(h) of fp32 h for the element function ACT (1..5)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2))
        out = cdf + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif ACT == 2:
        s = _sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    elif ACT == 4:
        out = tl.where(h > 0, 1.0, 0.0)
    elif ACT == 6:
        out = 2.0 * tl.where(h > 0, h, 0.0)
    else:
        s = _sigmoid(alpha * h)
        out = s + alpha * h * s * (1.0 - s)
    return out


@triton.jit
def _gate_up(g, u, CLAMP: tl.constexpr, limit, up_offset):
    """The clamped SwiGLU's inputs: min(gate, limit), clip(up, +-limit) + up_offset."""
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit) + up_offset
    return g, u


@triton.jit
def _load_act(ptrs, up_step, mask, ACT: tl.constexpr, GATED: tl.constexpr, CLAMP: tl.constexpr,
              alpha, limit, up_offset):
    """Load a tile of h (pre-activation) and return act(h) in h's dtype.

    Gated: the up column of each gate column is ``up_step`` elements further on
    (H for [gate | up] halves, 1 for interleaved columns), a = f(gate) * up;
    masked lanes give 0 (f(0) = 0 for every activation here).
    """
    a = tl.load(ptrs, mask=mask, other=0.0)
    if GATED:
        u = tl.load(ptrs + up_step, mask=mask, other=0.0).to(tl.float32)
        g, u = _gate_up(a.to(tl.float32), u, CLAMP, limit, up_offset)
        a = (_act_fwd(g, ACT, alpha) * u).to(ptrs.dtype.element_ty)
    elif ACT != 0:
        a = _act_fwd(a.to(tl.float32), ACT, alpha).to(ptrs.dtype.element_ty)
    return a


@triton.jit
def _block_tile(NUM_BLOCKS, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column tile) of this program in a 1-D grid of
    NUM_BLOCKS * cdiv(N, BLOCK_N), GROUP_M row blocks per column sweep (L2 reuse)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(NUM_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


# --------------------------------------------------------------------------
# row-tiled grouped GEMM (forward up/down projections, backward dX)
# --------------------------------------------------------------------------
@triton.jit
def moe_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, gate_w_ptr, c_ptr,
    perm_ptr, block_expert_ptr, block_start_ptr, offsets_ptr,
    N, K, NUM_BLOCKS, TOP_K, UP_STEP,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_biase, stride_biasn,
    stride_cm, stride_cn,
    alpha, limit, up_offset,
    A_GATHER: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    CLAMP: tl.constexpr,
    C_SCATTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """C[r, n] = sum_k act(A[ra, k]) * B[e, k, n] (+ bias[e, n]) (* w[flat]) for the
    rows r of one row block; ra = flat // TOP_K (A_GATHER) or the slot; r = flat
    (C_SCATTER) or the slot. Grid: (NUM_BLOCKS * cdiv(N, BLOCK_N),)."""
    pid_m, pid_n = _block_tile(NUM_BLOCKS, N, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    start = tl.load(block_start_ptr + pid_m)
    end = tl.load(offsets_ptr + e + 1)
    rows = start + tl.arange(0, BLOCK_M)  # int64 sorted slots
    row_mask = rows < end
    flat = tl.load(perm_ptr + rows, mask=row_mask, other=0)
    if A_GATHER:
        a_rows = flat // TOP_K
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    # weight offsets in int64 too: B may be a strided view of a larger tensor
    b_ptrs = (b_ptr + e * stride_be + offs_k[:, None].to(tl.int64) * stride_bk
              + offs_n[None, :].to(tl.int64) * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = _load_act(a_ptrs, UP_STEP, row_mask[:, None] & k_mask[None, :], ACT, GATED, CLAMP, alpha, limit, up_offset)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e * stride_biase + offs_n * stride_biasn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_WEIGHT:
        w = tl.load(gate_w_ptr + flat, mask=row_mask, other=0.0)
        acc = acc * w.to(tl.float32)[:, None]
    if C_SCATTER:
        c_rows = flat
    else:
        c_rows = rows
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------
# backward: dh and the gate-weight gradient
# --------------------------------------------------------------------------
@triton.jit
def moe_bwd_dh_kernel(
    gy_ptr, w2_ptr, b2_ptr, h_ptr, gate_w_ptr, dh_ptr, gw_part_ptr,
    perm_ptr, block_expert_ptr, block_start_ptr, offsets_ptr,
    H, D, NUM_BLOCKS, TOP_K, NUM_H_TILES, UP_STEP_H, UP_STEP_DH,
    stride_gym, stride_gyd,
    stride_w2e, stride_w2h, stride_w2d,
    stride_b2e, stride_b2d,
    stride_hm, stride_hn,
    stride_dhm, stride_dhn,
    alpha, limit, up_offset,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    CLAMP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """For the rows of one row block and hidden columns n of one tile:
    G = grad_y[tok] @ W2[e][n, :]^T (fp32), a = act(h[rows]) recomputed,
    dh = act'(h) * w * G (gated: the gate and up columns, UP_STEP_* apart in
    h / dh; 0 where a clamp cut the input), stored at the sorted slot;
    gw_part[flat, pid_n] = sum_n G * a (+ <grad_y[tok], b2[e]> on tile 0).
    Grid: (NUM_BLOCKS * NUM_H_TILES,)."""
    pid_m, pid_n = _block_tile(NUM_BLOCKS, H, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    start = tl.load(block_start_ptr + pid_m)
    end = tl.load(offsets_ptr + e + 1)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    flat = tl.load(perm_ptr + rows, mask=row_mask, other=0)
    tok = flat // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = gy_ptr + tok[:, None] * stride_gym + offs_k[None, :] * stride_gyd
    b_ptrs = (w2_ptr + e * stride_w2e + offs_k[:, None].to(tl.int64) * stride_w2d
              + offs_n[None, :].to(tl.int64) * stride_w2h)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bterm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = offs_k < D - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_BIAS:
            bb = tl.load(b2_ptr + e * stride_b2e + (k0 + offs_k) * stride_b2d, mask=k_mask, other=0.0)
            bterm += tl.sum(a.to(tl.float32) * bb.to(tl.float32)[None, :], axis=1)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_gyd
        b_ptrs += BLOCK_K * stride_w2d
    mask2 = row_mask[:, None] & n_mask[None, :]
    w = tl.load(gate_w_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)
    d_a = acc * w[:, None]
    h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn
    dh_ptrs = dh_ptr + rows[:, None] * stride_dhm + offs_n[None, :] * stride_dhn
    hv = tl.load(h_ptrs, mask=mask2, other=0.0).to(tl.float32)
    if GATED:
        u_raw = tl.load(h_ptrs + UP_STEP_H, mask=mask2, other=0.0).to(tl.float32)
        g, u = _gate_up(hv, u_raw, CLAMP, limit, up_offset)
        f = _act_fwd(g, ACT, alpha)
        a = f * u
        d_gate = d_a * u * _act_grad(g, ACT, alpha)
        d_up = d_a * f
        if CLAMP:  # torch.clamp passes the gradient where the input is inside the bounds
            d_gate = tl.where(hv <= limit, d_gate, 0.0)
            d_up = tl.where((u_raw >= -limit) & (u_raw <= limit), d_up, 0.0)
        tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask2)
        tl.store(dh_ptrs + UP_STEP_DH, d_up.to(dh_ptr.dtype.element_ty), mask=mask2)
    else:
        a = _act_fwd(hv, ACT, alpha)
        dh = d_a * _act_grad(hv, ACT, alpha)
        tl.store(dh_ptrs, dh.to(dh_ptr.dtype.element_ty), mask=mask2)
    # the forward fed act(h) to the dot rounded to h's dtype: use the same values
    a = a.to(h_ptr.dtype.element_ty).to(tl.float32)
    part = tl.sum(acc * a, axis=1)
    if HAS_BIAS:
        part += tl.where(pid_n == 0, bterm, 0.0)
    tl.store(gw_part_ptr + flat * NUM_H_TILES + pid_n, part, mask=row_mask)


# --------------------------------------------------------------------------
# backward: per-expert weight and bias gradients
# --------------------------------------------------------------------------
@triton.jit
def moe_wgrad_kernel(
    a_ptr, b_ptr, gate_w_ptr, c_ptr, db_ptr,
    perm_ptr, offsets_ptr,
    M_OUT, N_OUT, TOP_K, UP_STEP,
    stride_am, stride_ak,
    stride_bm, stride_bn,
    stride_ce, stride_cm, stride_cn,
    stride_dbe, stride_dbn,
    alpha, limit, up_offset,
    A_GATHER: tl.constexpr,
    A_ACT: tl.constexpr,
    GATED: tl.constexpr,
    CLAMP: tl.constexpr,
    B_GATHER: tl.constexpr,
    B_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """C[e, m, n] = sum over expert e's slots s of act(A[ra(s), m]) * B'[rb(s), n], with
    ra/rb = token (GATHER) or slot, B' = B * w[flat] (B_WEIGHT) rounded to B's dtype;
    db[e, n] = sum_s B'[rb(s), n] (written by the programs of output row tile 0).
    Empty experts give zeros. Grid: (cdiv(M_OUT, BLOCK_M) * cdiv(N_OUT, BLOCK_N), E): the
    tiles on axis 0, whose limit is 2^31 - 1 (axis 1 allows only 65535)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M_OUT
    n_mask = offs_n < N_OUT
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    n_chunks = tl.cdiv(hi - lo, BLOCK_R).to(tl.int32)
    for i in range(0, n_chunks):
        rows = lo + i * BLOCK_R + offs_r  # int64 sorted slots
        r_mask = rows < hi
        flat = tl.load(perm_ptr + rows, mask=r_mask, other=0)
        if A_GATHER:
            a_rows = flat // TOP_K
        else:
            a_rows = rows
        if B_GATHER:
            b_rows = flat // TOP_K
        else:
            b_rows = rows
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_m[None, :] * stride_ak
        a = _load_act(a_ptrs, UP_STEP, r_mask[:, None] & m_mask[None, :], A_ACT, GATED, CLAMP, alpha, limit,
                      up_offset)
        b_ptrs = b_ptr + b_rows[:, None] * stride_bm + offs_n[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if B_WEIGHT:
            w = tl.load(gate_w_ptr + flat, mask=r_mask, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * w[:, None]).to(b_ptr.dtype.element_ty)
        db += tl.sum(b.to(tl.float32), axis=0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
    c_ptrs = (c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None].to(tl.int64) * stride_cm
              + offs_n[None, :].to(tl.int64) * stride_cn)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if pid_m == 0:
        db_ptrs = db_ptr + e.to(tl.int64) * stride_dbe + offs_n * stride_dbn
        tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------
# combine: deterministic sum over a token's k assignment rows
# --------------------------------------------------------------------------
@triton.jit
def moe_combine_kernel(
    buf_ptr, inv_ptr, offsets_ptr, out_ptr,
    T, D, TOP_K, NUM_EXPERTS,
    stride_bm, stride_bd,
    stride_om, stride_od,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, d] = sum_{j < TOP_K, inverse[t*TOP_K+j] < offsets[E]} buf[t*TOP_K + j, d],
    summed in fp32 in the order j = 0..TOP_K-1 (rows of dropped assignments are
    never read). Grid: (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    toks = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = toks < T
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    n_kept = tl.load(offsets_ptr + NUM_EXPERTS)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, TOP_K):
        flat = toks * TOP_K + j
        slot = tl.load(inv_ptr + flat, mask=t_mask, other=0)
        keep = t_mask & (slot < n_kept)
        v = tl.load(
            buf_ptr + flat[:, None] * stride_bm + offs_d[None, :] * stride_bd,
            mask=keep[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += v.to(tl.float32)
    out_ptrs = out_ptr + toks[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & d_mask[None, :])
