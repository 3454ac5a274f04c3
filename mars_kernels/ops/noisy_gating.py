"""Noisy top-k gating (Shazeer et al. 2017, as FastMoE's NoisyGate).

Shapes: T tokens, D model width, E experts, k experts per token. Routing math
in float32 (float64 for float64 input). Sums over tokens (importance, load) are
deterministic: fixed token blocks in the kernels, no atomics.

Kernel-level ops (schemas below, beside their callers):
``noisy_topk_gating_fwd/_bwd`` (training mode; eval mode is plain top-k gating
of the clean logits); C++ in ``csrc/cpu/noisy_gating.cpp``, CUDA in
``csrc/cuda/noisy_gating.cu`` (+ ``noisy_gating_binding.cpp``), Triton in
``ops/triton/noisy_gating.py``.
"""
from __future__ import annotations

import functools

import torch

from .. import backend as _backend
from .. import checks as check
from .. import library
from .common import compute_dtype, randn, topk_order
from .gating import topk_gating
from .losses import expert_counts

__all__ = ["noisy_topk_gating", "noisy_topk_gating_torch"]


@functools.cache
def _launchers():
    """The Triton launchers, imported on first call (triton is optional)."""
    from .triton import noisy_gating

    return noisy_gating


def noisy_topk_gating(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    k: int,
    *,
    training: bool,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_eps: float = 1e-2,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating: x [T, D], w_gate [D, E], w_noise [D, E] ->
    weights [T, k], indices [T, k], importance [E], load [E].

    See :func:`noisy_topk_gating_torch` for the formulas. ``noise`` [T, E]
    (standard normal draws) makes a call reproducible; otherwise it is drawn
    with ``torch.randn`` from ``generator``. Gradients flow to x, w_gate and
    w_noise (load through the normal CDF). ``training=False`` adds no noise and
    reports hard counts as the load.
    """
    check.float_matrix(x, "x")
    check.float_matrix(w_gate, "w_gate")
    check.float_matrix(w_noise, "w_noise")
    T, D = x.shape
    if w_gate.shape[0] != D or w_gate.shape[1] < 1:
        raise ValueError(f"w_gate must have shape [D={D}, E>=1] to match x [T, D], got {tuple(w_gate.shape)}")
    E = w_gate.shape[1]
    check.shape(w_noise, (D, E), "w_noise", "[D, E] like w_gate")
    for name_, t in (("w_gate", w_gate), ("w_noise", w_noise)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name_} must have the dtype of x ({x.dtype}), got {t.dtype}")
    check.top_k(k, E)
    check.flag(training, "training")
    noise_eps = check.positive_float(noise_eps, "noise_eps")
    tensors = {"x": x, "w_gate": w_gate, "w_noise": w_noise}
    if noise is not None:
        check.float_matrix(noise, "noise")
        check.shape(noise, (T, E), "noise", "[T, E]")
        tensors["noise"] = noise
    check.same_device(tensors)
    check.generator(generator, x.device)
    name = _backend.resolve(backend, x.device)
    impl = _backend.implementation("noisy_topk_gating", name)
    if impl == "torch":
        return noisy_topk_gating_torch(
            x, w_gate, w_noise, k, training=training, noise=noise, generator=generator, noise_eps=noise_eps
        )
    ct = compute_dtype(x.dtype)
    clean = x @ w_gate
    if not training:
        weights, indices = topk_gating(clean, k, mode="topk_softmax", backend=name)
        # A dense scatter and a column sum, not a float index_add: no atomics, so deterministic on a GPU.
        importance = torch.zeros(T, E, dtype=weights.dtype, device=x.device).scatter(1, indices, weights).sum(0)
        return weights, indices, importance, expert_counts(indices, E, ct)
    if noise is None:
        noise = randn(T, E, generator=generator, device=x.device, dtype=ct)
    raw = x @ w_noise
    weights, indices, _, importance, load = library.namespace(impl).noisy_topk_gating_fwd(
        clean.contiguous(), raw.contiguous(), noise.to(ct).contiguous(), k, noise_eps
    )
    return weights, indices, importance, load


def noisy_topk_gating_torch(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    k: int,
    *,
    training: bool,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_eps: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pure-PyTorch twin of :func:`noisy_topk_gating`.

    Training: H = x W_g + eps * (softplus(x W_n) + noise_eps), eps ~ N(0, 1)
    (``noise`` [T, E] or drawn from ``generator``); keep the top k of H and
    softmax over them. importance_e = sum of the gates routed to e. load_e =
    sum_t Phi((clean_te - thr_te) / std_te) where thr is the (k+1)-th noisy
    value if e is among the chosen k and the k-th otherwise (load_e = T when
    k = E: every expert is always chosen). Eval: no noise, softmax over the top
    k clean logits, load = the hard count of tokens routed to each expert.
    """
    ct = compute_dtype(x.dtype)
    clean = (x @ w_gate).to(ct)
    T, E = clean.shape
    if training:
        std = torch.nn.functional.softplus((x @ w_noise).to(ct)) + noise_eps
        if noise is None:
            noise = randn(T, E, generator=generator, device=x.device, dtype=ct)
        noisy = clean + noise.to(ct) * std
    else:
        noisy = clean
    m = min(k + 1, E)
    order = topk_order(noisy, m)
    top_vals = noisy.gather(1, order)
    indices = order[:, :k]
    weights = torch.softmax(top_vals[:, :k], dim=-1)
    gates = torch.zeros_like(clean).scatter(1, indices, weights)
    importance = gates.sum(0)
    if not training:
        load = torch.zeros(E, dtype=ct, device=x.device).index_add_(
            0, indices.reshape(-1), torch.ones(T * k, dtype=ct, device=x.device)
        )
    elif k == E:
        load = torch.full((E,), float(T), dtype=ct, device=x.device)
    else:
        chosen = torch.zeros_like(clean, dtype=torch.bool).scatter(1, indices, True)
        threshold = torch.where(chosen, top_vals[:, k : k + 1], top_vals[:, k - 1 : k])
        load = torch.special.ndtr((clean - threshold) / std).sum(0)
    return weights, indices, importance, load


def _fwd_fake(clean_logits, noise_logits, noise, k, noise_eps):
    T, E = clean_logits.shape
    acc = compute_dtype(clean_logits.dtype)
    return (
        clean_logits.new_empty((T, k), dtype=acc),
        clean_logits.new_empty((T, k), dtype=torch.int64),
        clean_logits.new_empty((T,), dtype=torch.int64),
        clean_logits.new_empty((E,), dtype=acc),
        clean_logits.new_empty((E,), dtype=acc),
    )


def _bwd_fake(grad_weights, grad_importance, grad_load, clean_logits, noise_logits, noise, weights, indices,
              threshold_index, noise_eps):
    return torch.empty_like(clean_logits), torch.empty_like(noise_logits)


def _setup(ctx, args, output):
    weights, indices, threshold_index, _importance, _load = output
    ctx.save_for_backward(args["clean_logits"], args["noise_logits"], args["noise"], weights, indices, threshold_index)
    ctx.noise_eps = args["noise_eps"]
    ctx.mark_non_differentiable(indices, threshold_index)


def _backward(ops, ctx, grad_weights, _grad_indices, _grad_threshold, grad_importance, grad_load):
    clean, raw, noise, weights, indices, threshold_index = ctx.saved_tensors
    vec = weights.new_zeros(clean.shape[1])

    def dense(g, like):
        return torch.zeros_like(like) if g is None else g.contiguous()

    grad_clean, grad_raw = ops.noisy_topk_gating_bwd(
        dense(grad_weights, weights), dense(grad_importance, vec), dense(grad_load, vec),
        clean, raw, noise, weights, indices, threshold_index, ctx.noise_eps,
    )
    return {"clean_logits": grad_clean, "noise_logits": grad_raw}


# Training-mode noisy top-k gating (Shazeer et al. 2017).
# clean_logits, noise_logits (pre-softplus) [T,E] same float dtype; noise [T,E] f32
# ("f32": float64 for float64 logits).
# -> weights [T,k] f32, indices [T,k] int64, threshold_index [T] int64 (the
#    expert ranked k+1 in noisy order, -1 when k == E), importance [E] f32,
#    load [E] f32. Sums over T are deterministic (fixed-size token blocks).
library.register(
    "noisy_topk_gating_fwd(Tensor clean_logits, Tensor noise_logits, Tensor noise, int k,"
    " float noise_eps) -> (Tensor weights, Tensor indices, Tensor threshold_index,"
    " Tensor importance, Tensor load)",
    fake=_fwd_fake, triton=lambda *args: _launchers().noisy_topk_gating_fwd(*args),
    setup=_setup, backward=_backward,
)
# -> grad_clean_logits, grad_noise_logits [T,E] in the logits' dtype.
library.register(
    "noisy_topk_gating_bwd(Tensor grad_weights, Tensor grad_importance, Tensor grad_load,"
    " Tensor clean_logits, Tensor noise_logits, Tensor noise, Tensor weights, Tensor indices,"
    " Tensor threshold_index, float noise_eps) -> (Tensor, Tensor)",
    fake=_bwd_fake, triton=lambda *args: _launchers().noisy_topk_gating_bwd(*args),
)
