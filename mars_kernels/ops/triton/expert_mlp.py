"""Triton launchers for the expert MLP (ScatterMoE / vLLM fused-MoE technique;
ops module :mod:`mars_kernels.ops.expert_mlp`, kernels in ``_expert_mlp_kernels.py``).

The functions have the schemas of the ``torch.ops.mars_kernels`` ops of the same
names (schemas in :mod:`mars_kernels.ops.expert_mlp`): ``moe_mlp_fwd/_bwd`` take the dispatch metadata of
``moe_align`` as separate tensors; ``grouped_mlp_fwd/_bwd`` (rows already in
expert order) run the same kernels with an identity gather and unit gates.

Shapes: ``T`` tokens, ``k`` experts per token, ``S = T * k`` assignments, ``D``
model width, ``H`` expert hidden width, ``H1 = 2H`` for swiglu (``w1``'s columns
are ``[gate | up]``) else ``H``, ``E`` experts. The row tiles of the kernels are
the metadata's row blocks, so ``block_size`` is the kernels' ``BLOCK_M`` (any
power of two >= 16).
Assignments to the sentinel expert ``E`` (dropped by a capacity limit) contribute
nothing (their output rows are never read, their gradients are zero).

Forward (:func:`moe_mlp_fwd`), three launches, no permuted copy of ``x``:

1. ``h[s] = x[perm[s] // k] @ W1[e] + b1[e]`` (gather fused into the A loads),
   stored pre-activation in sorted order, ``[S, H1]``.
2. ``buf[flat] = w[flat] * (act(h[s]) @ W2[e] + b2[e])`` (activation fused into
   the A loads, gate weight and scatter to assignment order in the epilogue).
3. ``y[t] = sum_j buf[t*k + j]`` in fp32 (deterministic, no atomics).

Backward (:func:`moe_mlp_bwd`), five launches: ``dh`` with the gate-weight
gradient partials, ``dX`` (``dh @ W1^T``, scattered, then the same combine),
``dW1``/``db1`` and ``dW2``/``db2`` (per-expert ``A^T B`` over the expert's rows).

Everything is deterministic: every reduction is either inside one program in a
fixed order or a ``torch.sum`` over a fixed-shape buffer of partials. Inputs may
have any strides. Supported dtypes: float16, bfloat16, float32 (x, w1, w2 and the
biases of one dtype); gate weights any float dtype (read as fp32). On a GPU,
float32 matmuls use full fp32 precision ("ieee") unless
``torch.backends.cuda.matmul.allow_tf32`` is set, as torch does.
"""
from __future__ import annotations

import torch
import triton

from ...meta import MoEMeta
from ..dispatch import row_blocks_from_offsets
from ..activation import Activation, parse_activation
from . import _expert_mlp_kernels as _k
from .launch import device_guard

__all__ = ["moe_mlp_fwd", "moe_mlp_bwd", "grouped_mlp_fwd", "grouped_mlp_bwd"]

#: The row-block size of grouped_mlp's identity metadata.
GROUPED_BLOCK_M = 64

_FN_CODES = {"gelu": _k.ACT_GELU, "silu": _k.ACT_SILU, "gelu_tanh": _k.ACT_GELU_TANH, "relu": _k.ACT_RELU,
             "relu2": _k.ACT_RELU2, "silu_alpha": _k.ACT_SILU_ALPHA}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Launch configurations (fixed: no autotuning). "gemm": the row-tiled kernels
# (up/down projections, dX); "dh": the backward dh kernel (its epilogue reads one
# or two h tiles and writes one or two dh tiles); "wgrad": per-expert dW tiles
# (BLOCK_M x BLOCK_N output, BLOCK_R rows per step); "combine": the top-k sum.
# GPU values target H100/H200 with 16-bit operands (wgmma, cp.async pipelined:
# about 96 KiB of shared memory for the 4-stage row GEMM, no register spills when
# compiled for sm_90). float32 operands (full-precision FMA dots, no tensor cores
# unless TF32 is allowed) halve BLOCK_K/BLOCK_R and use 8 warps for the row GEMM
# (only the swiglu down projection then spills, 16 bytes).
_GPU_CONFIGS = {
    "gemm": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    "dh": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "wgrad": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, num_warps=8, num_stages=3),
    "combine": dict(BLOCK_T=8, BLOCK_D=256, num_warps=4, num_stages=1),
}
_GPU_FP32_OVERRIDES = {
    "gemm": dict(BLOCK_K=32, num_warps=8, num_stages=3),
    "dh": dict(BLOCK_K=32),
    "wgrad": dict(BLOCK_R=32),
}
# Under the interpreter small tiles, so that the test shapes need several
# column tiles, several K steps and masked tails.
_INTERPRETER_CONFIGS = {
    "gemm": dict(BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1),
    "dh": dict(BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1),
    "wgrad": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_R=16, num_warps=4, num_stages=1),
    "combine": dict(BLOCK_T=16, BLOCK_D=32, num_warps=4, num_stages=1),
}


def _config(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIGS[name])
    cfg = dict(_GPU_CONFIGS[name])
    if dtype == torch.float32:
        cfg.update(_GPU_FP32_OVERRIDES.get(name, {}))
    return cfg


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_PREC and UPCAST for tl.dot on operands of this dtype.

    UPCAST: bf16 operands are cast to fp32 off-GPU (the interpreter's bf16 dot is
    wrong). DOT_PREC only matters for fp32 operands: "ieee" (full fp32, torch's
    default) unless ``torch.backends.cuda.matmul.allow_tf32`` is set on a GPU.
    """
    on_gpu = device.type == "cuda"
    upcast = dtype == torch.bfloat16 and not on_gpu
    fp32_dot = dtype == torch.float32 or upcast
    tf32 = on_gpu and torch.backends.cuda.matmul.allow_tf32
    prec = "ieee" if fp32_dot and not tf32 else "tf32"
    return dict(DOT_PREC=prec, UPCAST=upcast)


_NO_ACT = dict(ACT=_k.ACT_NONE, GATED=False, CLAMP=False)


def _act_access(act: Activation | None, a: torch.Tensor) -> tuple[int, int, dict, tuple]:
    """How a kernel reads act(A) from A = h [S, H1]: (column stride of the
    activation's inputs, element step from a gate to its up value, the
    ACT/GATED/CLAMP flags, (alpha, limit, up_offset)). Gated halves: the up of
    column j is column H + j; interleaved: gate 2j, up 2j + 1."""
    params = (1.0, 0.0, 0.0)
    if act is None:
        return a.stride(1), 0, _NO_ACT, params
    params = (float(act.alpha), float(act.limit), float(act.up_offset))
    flags = dict(ACT=_FN_CODES[act.fn], GATED=act.gated, CLAMP=act.clamp)
    if not act.gated:
        return a.stride(1), 0, flags, params
    if act.interleaved:
        return 2 * a.stride(1), a.stride(1), flags, params
    return a.stride(1), (a.shape[1] // 2) * a.stride(1), flags, params


def _check(x, weights, meta, w1, b1, w2, b2, activation):
    """Validate and return (T, k, D, H, H1, E, Activation)."""
    act = parse_activation(activation)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"expected x [T, D], w1 [E, D, H1], w2 [E, H, D]; "
            f"got {tuple(x.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    T, D = x.shape
    E, D1, H1 = w1.shape
    H = w2.shape[1]
    want_h1 = 2 * H if act.gated else H
    if D1 != D or tuple(w2.shape) != (E, H, D) or H1 != want_h1:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} "
            f"(w1 must be [E, D, {'2H' if act.gated else 'H'}], w2 [E, H, D])"
        )
    for name, t, shape in (("w1", w1, None), ("w2", w2, None), ("b1", b1, (E, H1)), ("b2", b2, (E, D))):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(t.shape)}")
    k = meta.top_k
    if tuple(weights.shape) != (T, k):
        raise ValueError(f"weights must be [T, k] = {(T, k)}, got {tuple(weights.shape)}")
    if meta.num_experts != E:
        raise ValueError(f"meta is for {meta.num_experts} experts, the weights have {E}")
    if meta.permutation.numel() != T * k:
        raise ValueError(f"meta has {meta.permutation.numel()} assignments, expected T*k = {T * k}")
    bs = meta.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton expert MLP, got {bs}")
    return T, k, D, H, H1, E, act


def _combine(buf: torch.Tensor, meta, T: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """out [T, D] (dtype) = sum_j buf[t*k + j] over kept assignments, fp32 sum."""
    out = torch.empty((T, D), dtype=dtype, device=buf.device)
    cfg = _config("combine", buf.device, buf.dtype)
    bt, bd = cfg.pop("BLOCK_T"), cfg.pop("BLOCK_D")
    grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
    _k.moe_combine_kernel[grid](
        buf, meta.inverse, meta.offsets, out,
        T, D, meta.top_k, meta.num_experts,
        buf.stride(0), buf.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=bt, BLOCK_D=bd, **cfg,
    )
    return out


def _row_gemm(a, b3, strides_b, bias, gate_w, c, meta, N, K, act, *, a_gather, c_scatter, mul_weight):
    """Launch :func:`moe_gemm_kernel`: c[rows, :N] from act(a[rows, :K]) (act None:
    a itself) and b3[e] (strides_b = e, k, n)."""
    cfg = _config("gemm", a.device, a.dtype)
    nb = meta.block_expert.numel()
    grid = (nb * triton.cdiv(N, cfg["BLOCK_N"]),)
    has_bias = bias is not None
    bias_t = bias if has_bias else b3
    stride_ak, up_step, flags, params = _act_access(act, a)
    _k.moe_gemm_kernel[grid](
        a, b3, bias_t, gate_w, c,
        meta.permutation, meta.block_expert, meta.block_start, meta.offsets,
        N, K, nb, meta.top_k, up_step,
        a.stride(0), stride_ak,
        *strides_b,
        bias_t.stride(0) if has_bias else 0, bias_t.stride(1) if has_bias else 0,
        c.stride(0), c.stride(1),
        *params,
        A_GATHER=a_gather, C_SCATTER=c_scatter, HAS_BIAS=has_bias, MUL_WEIGHT=mul_weight,
        BLOCK_M=meta.block_size, **flags, **_dot_flags(a.dtype, a.device), **cfg,
    )


def _meta(permutation, inverse, offsets, block_expert, block_start, top_k, block_size, num_experts) -> MoEMeta:
    return MoEMeta(num_experts, int(top_k), int(block_size), None, offsets, permutation, inverse, block_expert,
                   block_start)


def moe_mlp_fwd(
    x: torch.Tensor,
    weights: torch.Tensor,
    permutation: torch.Tensor,
    inverse: torch.Tensor,
    offsets: torch.Tensor,
    block_expert: torch.Tensor,
    block_start: torch.Tensor,
    top_k: int,
    block_size: int,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused expert MLP forward.

    x [T, D] (token order), weights [T, k] gate weights, the metadata of
    ``moe_align(indices, E, block_size)``, w1 [E, D, H1], b1 [E, H1] or None,
    w2 [E, H, D], b2 [E, D] or None, activation in {"gelu", "silu", "swiglu"} ->

    * y [T, D] in x's dtype: y[t] = sum_j weights[t, j] * (act(x[t] @ W1[e] + b1[e]) @ W2[e] + b2[e])
      with e = indices[t, j], dropped assignments skipped, summed in fp32 over j;
    * h [S, H1] in x's dtype: the pre-activation x[t] @ W1[e] + b1[e] of sorted slot s
      (kept for :func:`moe_mlp_bwd`; zero on the slots of dropped assignments), or an
      empty [0, H1] tensor unless ``save_h``.
    """
    meta = _meta(permutation, inverse, offsets, block_expert, block_start, top_k, block_size, w1.shape[0])
    T, k, D, H, H1, E, act = _check(x, weights, meta, w1, b1, w2, b2, activation)
    dev = x.device
    S = T * k
    # Zeroed: the slots of dropped assignments are never written.
    h = torch.zeros((S, H1), dtype=x.dtype, device=dev)
    if S == 0 or D == 0:
        return torch.zeros((T, D), dtype=x.dtype, device=dev), h if save_h else h[:0].clone()
    gate_w = weights.reshape(-1).contiguous()
    buf = torch.empty((S, D), dtype=x.dtype, device=dev)
    with device_guard(x):
        # 1. h = x[tok] @ W1[e] + b1[e]  (sorted order)
        _row_gemm(x, w1, (w1.stride(0), w1.stride(1), w1.stride(2)), b1, gate_w, h, meta, H1, D, None,
                  a_gather=True, c_scatter=False, mul_weight=False)
        # 2. buf[flat] = w * (act(h) @ W2[e] + b2[e])  (assignment order)
        _row_gemm(h, w2, (w2.stride(0), w2.stride(1), w2.stride(2)), b2, gate_w, buf, meta, D, H, act,
                  a_gather=False, c_scatter=True, mul_weight=True)
        # 3. y[t] = sum_j buf[t*k + j]
        y = _combine(buf, meta, T, D, x.dtype)
    return y, (h if save_h else x.new_empty((0, H1)))


def moe_mlp_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    permutation: torch.Tensor,
    inverse: torch.Tensor,
    offsets: torch.Tensor,
    block_expert: torch.Tensor,
    block_start: torch.Tensor,
    top_k: int,
    block_size: int,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    h: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused expert MLP backward.

    grad_y [T, D]; x, weights, the metadata, w1, w2, b2, activation as passed to
    :func:`moe_mlp_fwd`; h [S, H1] as returned by it. Returns

    * grad_x [T, D] (x's dtype): sum_j dh[s] @ W1[e]^T over kept assignments;
    * grad_weights [T, k] (weights' dtype): <grad_y[t], act(h[s]) @ W2[e] + b2[e]>,
      0 for dropped assignments;
    * grad_w1 [E, D, H1], grad_b1 [E, H1]: sum over e's rows of x[t]^T dh[s], of dh[s];
    * grad_w2 [E, H, D], grad_b2 [E, D]: sum over e's rows of act(h[s])^T (w grad_y[t]),
      of w grad_y[t] (zeros for experts without rows);

    where dh = act'(h) * weights[t, j] * (grad_y[t] @ W2[e]^T) (swiglu: d_gate =
    dA * up * silu'(gate), d_up = dA * silu(gate)). grad_b1 / grad_b2 are returned
    (in w1's / w2's dtype) whether or not the forward had biases.
    """
    meta = _meta(permutation, inverse, offsets, block_expert, block_start, top_k, block_size, w1.shape[0])
    T, k, D, H, H1, E, act = _check(x, weights, meta, w1, None, w2, b2, activation)
    if tuple(grad_y.shape) != (T, D) or grad_y.dtype != x.dtype:
        raise ValueError(
            f"grad_y must be [T, D] = {(T, D)} of dtype {x.dtype}, got {tuple(grad_y.shape)} {grad_y.dtype}"
        )
    S = T * k
    if tuple(h.shape) != (S, H1):
        raise ValueError(f"h must be [S, H1] = {(S, H1)}, got {tuple(h.shape)}")
    dev = x.device
    # The weight gradients take the weights' strides, so a transposed view (HF's
    # layout) gets its gradient back in the parameter's own layout, without a copy.
    grad_w1 = torch.empty_like(w1)
    grad_w2 = torch.empty_like(w2)
    grad_b1 = torch.empty((E, H1), dtype=w1.dtype, device=dev)
    grad_b2 = torch.empty((E, D), dtype=w2.dtype, device=dev)
    if S == 0:
        return (
            torch.zeros_like(x), torch.zeros_like(weights), grad_w1.zero_(), grad_b1.zero_(),
            grad_w2.zero_(), grad_b2.zero_(),
        )
    gate_w = weights.reshape(-1).contiguous()
    nb = meta.block_expert.numel()
    flags = _dot_flags(x.dtype, dev)
    with device_guard(x):
        # dh and the gate-weight gradient partials (one column per H tile)
        cfg = _config("dh", dev, x.dtype)
        n_h = triton.cdiv(H, cfg["BLOCK_N"])
        dh = torch.empty((S, H1), dtype=x.dtype, device=dev)
        gw_part = torch.zeros((S, max(n_h, 1)), dtype=torch.float32, device=dev)
        if n_h > 0:
            has_b2 = b2 is not None
            b2_t = b2 if has_b2 else w2
            h_col, h_up, act_flags, params = _act_access(act, h)
            dh_col, dh_up, _, _ = _act_access(act, dh)
            _k.moe_bwd_dh_kernel[(nb * n_h,)](
                grad_y, w2, b2_t, h, gate_w, dh, gw_part,
                meta.permutation, meta.block_expert, meta.block_start, meta.offsets,
                H, D, nb, k, n_h, h_up, dh_up,
                grad_y.stride(0), grad_y.stride(1),
                w2.stride(0), w2.stride(1), w2.stride(2),
                b2_t.stride(0) if has_b2 else 0, b2_t.stride(1) if has_b2 else 0,
                h.stride(0), h_col,
                dh.stride(0), dh_col,
                *params,
                HAS_BIAS=has_b2, BLOCK_M=meta.block_size, **act_flags, **flags, **cfg,
            )
        grad_weights = gw_part.sum(1).view(T, k).to(weights.dtype)

        # grad_x: buf[flat] = dh[s] @ W1[e]^T, then the top-k sum
        buf = torch.empty((S, D), dtype=x.dtype, device=dev)
        if D > 0:
            _row_gemm(dh, w1, (w1.stride(0), w1.stride(2), w1.stride(1)), None, gate_w, buf, meta, D, H1, None,
                      a_gather=False, c_scatter=True, mul_weight=False)
        grad_x = _combine(buf, meta, T, D, x.dtype) if D > 0 else torch.zeros_like(x)

        cfg = _config("wgrad", dev, x.dtype)
        # grad_w1[e] = x[tok]^T @ dh[rows], grad_b1[e] = sum dh[rows]. The output
        # tiles go on grid axis 0 (up to 2^31 - 1 programs), the experts on axis 1.
        grid = (triton.cdiv(D, cfg["BLOCK_M"]) * triton.cdiv(H1, cfg["BLOCK_N"]), E)
        _k.moe_wgrad_kernel[grid](
            x, dh, gate_w, grad_w1, grad_b1,
            meta.permutation, meta.offsets,
            D, H1, k, 0,
            x.stride(0), x.stride(1),
            dh.stride(0), dh.stride(1),
            grad_w1.stride(0), grad_w1.stride(1), grad_w1.stride(2),
            grad_b1.stride(0), grad_b1.stride(1),
            1.0, 0.0, 0.0,
            A_GATHER=True, A_ACT=_k.ACT_NONE, GATED=False, CLAMP=False, B_GATHER=False, B_WEIGHT=False,
            **flags, **cfg,
        )
        # grad_w2[e] = act(h[rows])^T @ (w * grad_y[tok]), grad_b2[e] = sum w * grad_y[tok]
        h_col, h_up, act_flags, params = _act_access(act, h)
        grid = (triton.cdiv(H, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]), E)
        _k.moe_wgrad_kernel[grid](
            h, grad_y, gate_w, grad_w2, grad_b2,
            meta.permutation, meta.offsets,
            H, D, k, h_up,
            h.stride(0), h_col,
            grad_y.stride(0), grad_y.stride(1),
            grad_w2.stride(0), grad_w2.stride(1), grad_w2.stride(2),
            grad_b2.stride(0), grad_b2.stride(1),
            *params,
            A_GATHER=False, A_ACT=act_flags["ACT"], GATED=act_flags["GATED"], CLAMP=act_flags["CLAMP"],
            B_GATHER=True, B_WEIGHT=True,
            **flags, **cfg,
        )
    return grad_x, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2


def _identity_meta(x_sorted: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> MoEMeta:
    """Metadata for rows already in expert order: each row is its own token (k = 1)."""
    S = x_sorted.shape[0]
    ident = torch.arange(S, device=x_sorted.device)
    block_expert, block_start = row_blocks_from_offsets(offsets, S, num_experts, GROUPED_BLOCK_M)
    return MoEMeta(num_experts, 1, GROUPED_BLOCK_M, None, offsets, ident, ident, block_expert, block_start)


def _meta_args(meta: MoEMeta) -> tuple:
    return (meta.permutation, meta.inverse, meta.offsets, meta.block_expert, meta.block_start, meta.top_k,
            meta.block_size)


def grouped_mlp_fwd(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    save_h: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's MLP on its rows of x_sorted [S, D] (expert e owns rows
    offsets[e] .. offsets[e+1]-1; rows from offsets[E] on give zeros) ->
    (y_sorted [S, D], h [S, H1] or an empty [0, H1] unless ``save_h``)."""
    meta = _identity_meta(x_sorted, offsets, w1.shape[0])
    ones = x_sorted.new_ones((x_sorted.shape[0], 1), dtype=torch.float32)
    return moe_mlp_fwd(x_sorted, ones, *_meta_args(meta), w1, b1, w2, b2, activation, save_h)


def grouped_mlp_bwd(
    grad_y_sorted: torch.Tensor,
    x_sorted: torch.Tensor,
    h: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_x_sorted [S, D], grad_w1, grad_b1 [E, H1], grad_w2, grad_b2 [E, D]."""
    meta = _identity_meta(x_sorted, offsets, w1.shape[0])
    ones = x_sorted.new_ones((x_sorted.shape[0], 1), dtype=torch.float32)
    dx, _, dw1, db1, dw2, db2 = moe_mlp_bwd(
        grad_y_sorted, x_sorted, ones, *_meta_args(meta), w1, w2, None, h, activation
    )
    return dx, dw1, db1, dw2, db2
