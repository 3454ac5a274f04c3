"""Triton launchers for the gating ops.

Each function has exactly the signature and semantics of the ``torch.ops.mars_kernels``
op of the same name (see ``csrc/ops.cpp`` and :mod:`mars_kernels.reference`), so a
caller can use this module in place of ``torch.ops.mars_kernels``. Inputs are
expected validated and row-contiguous (``stride(1) == 1``); shapes: ``T`` tokens,
``E`` experts, ``k`` experts chosen per token.

Dtypes: logits may be float16, bfloat16, float32 or float64. Routing math runs in
float32 (float64 for float64 logits); weights, lse, importance, load and prob_sum
come back in that dtype, indices as int64, gradients in the logits' dtype.

Sums over tokens (importance, load, prob_sum) are deterministic: every program
writes the partial sum of its ``BLOCK_T`` tokens to a ``[num_programs, E]`` buffer,
which is reduced with ``torch.sum`` (no atomics). ``BLOCK_T`` depends only on
``T``, ``E`` and the device type, so results are bitwise reproducible per shape.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (tests), where a
larger tile keeps the number of (sequentially simulated) programs small.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _gating_kernels as _k

__all__ = [
    "topk_gating_fwd",
    "topk_gating_bwd",
    "noisy_topk_gating_fwd",
    "noisy_topk_gating_bwd",
    "router_stats_fwd",
    "router_stats_bwd",
]

# Elements per program tile on a GPU (BLOCK_T * BLOCK_E), and under the interpreter.
_GPU_TILE = 4096
_INTERPRETER_TILE = 1 << 15
# Above this many selected experts (k, or k+1 for noisy gating) a bitonic sort of
# the row replaces the k rounds of a row max.
_SORT_ABOVE = 8

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def _check_k(k: int, E: int) -> None:
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")


def _key_mode(dtype: torch.dtype, block_e: int) -> int:
    """Selection-key scheme of :mod:`._gating_kernels` for logits of this dtype."""
    if dtype == torch.float64:
        return 3
    if block_e <= 65536 and dtype == torch.float16:
        return 1
    if block_e <= 65536 and dtype == torch.bfloat16:
        return 2
    return 0


def _blocks(T: int, E: int, device: torch.device, gpu_tile: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) for a [T, E] problem with about ``gpu_tile``
    elements per program on a GPU (4 warps up to one tile, 8 up to two, else 16)."""
    gpu_tile = gpu_tile or _GPU_TILE
    block_e = triton.next_power_of_2(E)
    tile = gpu_tile if device.type == "cuda" else _INTERPRETER_TILE
    block_t = max(1, min(tile // block_e, triton.next_power_of_2(max(T, 1))))
    elems = block_t * block_e
    num_warps = 4 if elems <= gpu_tile else (8 if elems <= 2 * gpu_tile else 16)
    return block_t, block_e, num_warps


def _select_params(m: int, block_e: int, mode: int) -> tuple[bool, int]:
    """(USE_SORT, KP) for selecting the m best of block_e lanes."""
    use_sort = m > _SORT_ABOVE and mode != 3
    kp = block_e if use_sort else triton.next_power_of_2(m)
    return use_sort, kp


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------
def topk_gating_fwd(
    logits: torch.Tensor, k: int, softmax_first: bool, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k gating forward.

    logits [T, E] -> weights [T, k] f32/f64, indices [T, k] int64, lse [T] f32/f64.

    indices: the k largest logits per row, descending, ties to the lower expert
    index, NaN ranked as +inf. weights[t, j] = exp(logits[t, indices[t, j]] - lse[t]),
    where lse is the log-sum-exp of the whole row when ``softmax_first and not
    renormalize`` (softmax then top-k), else of the k selected logits (top-k then
    softmax, or softmax then top-k renormalised: the same weights).
    """
    _check_float("logits", logits)
    T, E = logits.shape
    k = int(k)
    _check_k(k, E)
    cdt = _compute_dtype(logits.dtype)
    dev = logits.device
    weights = torch.empty((T, k), dtype=cdt, device=dev)
    indices = torch.empty((T, k), dtype=torch.int64, device=dev)
    lse = torch.empty((T,), dtype=cdt, device=dev)
    if T == 0:
        return weights, indices, lse
    block_t, block_e, num_warps = _blocks(T, E, dev)
    mode = _key_mode(logits.dtype, block_e)
    use_sort, kp = _select_params(k, block_e, mode)
    grid = (triton.cdiv(T, block_t),)
    with _device_guard(logits):
        _k.topk_gating_fwd_kernel[grid](
            logits, weights, indices, lse,
            T, E, logits.stride(0),
            K=k,
            DENSE=bool(softmax_first) and not bool(renormalize),
            MODE=mode,
            USE_SORT=use_sort,
            KP=kp,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=_tl_dtype(logits.dtype),
            num_warps=num_warps,
        )
    return weights, indices, lse


def topk_gating_bwd(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    softmax_first: bool,
    renormalize: bool,
) -> torch.Tensor:
    """Top-k gating backward: grad_logits [T, E] in the logits' dtype.

    grad_weights, weights [T, k], indices [T, k] int64, lse [T], as returned by
    :func:`topk_gating_fwd`. With s[t] = sum_j grad_weights[t, j] * weights[t, j]:

    * softmax_first and not renormalize (dense): grad[t, e] =
      -s[t] * exp(logits[t, e] - lse[t]) + sum_j [indices[t, j] == e] weights[t, j] grad_weights[t, j];
    * otherwise (sparse): grad[t, indices[t, j]] = weights[t, j] * (grad_weights[t, j] - s[t]),
      zero elsewhere (logits and lse are not read).
    """
    _check_float("logits", logits)
    T, E = logits.shape
    k = indices.shape[1]
    grad = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    dense = bool(softmax_first) and not bool(renormalize)
    block_t, block_e, num_warps = _blocks(T, E, logits.device)
    grid = (triton.cdiv(T, block_t),)
    with _device_guard(logits):
        _k.topk_gating_bwd_kernel[grid](
            grad_weights, logits, weights, indices, lse, grad,
            T, E, logits.stride(0), grad.stride(0),
            K=k,
            KP=triton.next_power_of_2(k),
            DENSE=dense,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=_tl_dtype(logits.dtype),
            num_warps=num_warps,
        )
    return grad


# --------------------------------------------------------------------------
# noisy top-k gating (training mode)
# --------------------------------------------------------------------------
def noisy_topk_gating_fwd(
    clean_logits: torch.Tensor,
    noise_logits: torch.Tensor,
    noise: torch.Tensor,
    k: int,
    noise_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating forward, training mode (Shazeer et al. 2017).

    clean_logits, noise_logits (pre-softplus) [T, E], noise [T, E] ->
    weights [T, k] f32/f64, indices [T, k] int64, threshold_index [T] int64,
    importance [E] f32/f64, load [E] f32/f64.

    std = softplus(noise_logits) + noise_eps; noisy = clean + noise * std. indices
    are the top k of noisy (descending, ties to the lower index, NaN as +inf),
    threshold_index the (k+1)-th (-1 when k == E); weights = softmax of the k
    selected noisy values. importance[e] = sum over tokens of the weight routed to
    e. load[e] = sum_t Phi((clean[t, e] - thr[t, e]) / std[t, e]), thr being the
    (k+1)-th noisy value if e is among the chosen k, else the k-th; load = T
    everywhere when k == E.
    """
    _check_float("clean_logits", clean_logits)
    _check_float("noise_logits", noise_logits)
    _check_float("noise", noise)
    T, E = clean_logits.shape
    k = int(k)
    _check_k(k, E)
    cdt = _compute_dtype(clean_logits.dtype)
    dev = clean_logits.device
    has_load = k < E
    weights = torch.empty((T, k), dtype=cdt, device=dev)
    indices = torch.empty((T, k), dtype=torch.int64, device=dev)
    threshold_index = torch.empty((T,), dtype=torch.int64, device=dev)
    if T == 0:
        zeros = torch.zeros((E,), dtype=cdt, device=dev)
        return weights, indices, threshold_index, zeros, zeros.clone()
    block_t, block_e, num_warps = _blocks(T, E, dev)
    mode = 3 if cdt == torch.float64 else 0  # noisy values are computed in cdt
    m = min(k + 1, E)
    use_sort, kp = _select_params(m, block_e, mode)
    n_prog = triton.cdiv(T, block_t)
    imp_part = torch.empty((n_prog, E), dtype=cdt, device=dev)
    load_part = torch.empty((n_prog, E), dtype=cdt, device=dev) if has_load else imp_part
    eps = torch.full((1,), float(noise_eps), dtype=cdt, device=dev)
    with _device_guard(clean_logits):
        _k.noisy_topk_gating_fwd_kernel[(n_prog,)](
            clean_logits, noise_logits, noise,
            weights, indices, threshold_index, imp_part, load_part,
            T, E, clean_logits.stride(0), noise_logits.stride(0), noise.stride(0), eps,
            K=k,
            M=m,
            HAS_LOAD=has_load,
            MODE=mode,
            USE_SORT=use_sort,
            KP=kp,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=_tl_dtype(cdt),
            num_warps=num_warps,
        )
    importance = imp_part.sum(0)
    if has_load:
        load = load_part.sum(0)
    else:
        load = torch.full((E,), float(T), dtype=cdt, device=dev)
    return weights, indices, threshold_index, importance, load


def noisy_topk_gating_bwd(
    grad_weights: torch.Tensor,
    grad_importance: torch.Tensor,
    grad_load: torch.Tensor,
    clean_logits: torch.Tensor,
    noise_logits: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    threshold_index: torch.Tensor,
    noise_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy top-k gating backward -> (grad_clean_logits, grad_noise_logits) [T, E].

    grad_weights [T, k], grad_importance [E], grad_load [E]; the rest as passed to
    / returned by :func:`noisy_topk_gating_fwd`. Gradients come back in the logits'
    dtype. The top-k set and thresholds are treated as constants (piecewise), as
    autograd through :func:`mars_kernels.reference.noisy_topk_gating` does.
    """
    _check_float("clean_logits", clean_logits)
    T, E = clean_logits.shape
    k = indices.shape[1]
    dev = clean_logits.device
    cdt = _compute_dtype(clean_logits.dtype)
    grad_clean = torch.empty((T, E), dtype=clean_logits.dtype, device=dev)
    grad_nl = torch.empty((T, E), dtype=noise_logits.dtype, device=dev)
    if T == 0:
        return grad_clean, grad_nl
    block_t, block_e, num_warps = _blocks(T, E, dev)
    eps = torch.full((1,), float(noise_eps), dtype=cdt, device=dev)
    with _device_guard(clean_logits):
        _k.noisy_topk_gating_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_weights, grad_importance, grad_load,
            clean_logits, noise_logits, noise, weights, indices, threshold_index,
            grad_clean, grad_nl,
            T, E, clean_logits.stride(0), noise_logits.stride(0), noise.stride(0),
            grad_clean.stride(0), grad_nl.stride(0), eps,
            K=k,
            HAS_LOAD=k < E,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            CDT=_tl_dtype(cdt),
            num_warps=num_warps,
        )
    return grad_clean, grad_nl


# --------------------------------------------------------------------------
# router statistics
# --------------------------------------------------------------------------
def router_stats_fwd(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax statistics in one pass: logits [T, E] -> lse [T], prob_sum [E] (f32/f64).

    lse[t] = logsumexp(logits[t]) (as ``torch.logsumexp``: +-inf rows give +-inf);
    prob_sum[e] = sum_t softmax(logits[t])[e], summed deterministically.
    """
    _check_float("logits", logits)
    T, E = logits.shape
    cdt = _compute_dtype(logits.dtype)
    dev = logits.device
    lse = torch.empty((T,), dtype=cdt, device=dev)
    if T == 0:
        return lse, torch.zeros((E,), dtype=cdt, device=dev)
    block_t, block_e, num_warps = _blocks(T, E, dev)
    n_prog = triton.cdiv(T, block_t)
    part = torch.empty((n_prog, E), dtype=cdt, device=dev)
    with _device_guard(logits):
        _k.router_stats_fwd_kernel[(n_prog,)](
            logits, lse, part, T, E, logits.stride(0),
            BLOCK_T=block_t, BLOCK_E=block_e, CDT=_tl_dtype(cdt), num_warps=num_warps,
        )
    return lse, part.sum(0)


def router_stats_bwd(
    grad_lse: torch.Tensor, grad_prob_sum: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """Backward of :func:`router_stats_fwd`: grad_logits [T, E] in the logits' dtype.

    grad_lse [T], grad_prob_sum [E], lse [T] from the forward. With p = exp(logits - lse):
    grad[t, e] = p[t, e] * (grad_lse[t] + grad_prob_sum[e] - sum_e' grad_prob_sum[e'] p[t, e']).
    """
    _check_float("logits", logits)
    T, E = logits.shape
    grad = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    block_t, block_e, num_warps = _blocks(T, E, logits.device)
    with _device_guard(logits):
        _k.router_stats_bwd_kernel[(triton.cdiv(T, block_t),)](
            grad_lse, grad_prob_sum, logits, lse, grad,
            T, E, logits.stride(0), grad.stride(0),
            BLOCK_T=block_t, BLOCK_E=block_e, CDT=_tl_dtype(_compute_dtype(logits.dtype)),
            num_warps=num_warps,
        )
    return grad
