"""Fake (meta) implementations of the torch.ops.mars_kernels ops: output
shapes and dtypes only, so torch.compile and FakeTensor tracing work."""
from __future__ import annotations

import torch

from ._validate import leading_shape


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def register_fakes() -> None:
    _register_gating_fakes()
    _register_dispatch_fakes()
    _register_attention_fakes()


def _register_gating_fakes() -> None:
    @torch.library.register_fake("mars_kernels::topk_gating_fwd")
    def _(logits, k, softmax_first, renormalize):
        T = logits.shape[0]
        return (
            logits.new_empty((T, k), dtype=_acc(logits)),
            logits.new_empty((T, k), dtype=torch.int64),
            logits.new_empty((T,), dtype=_acc(logits)),
        )

    @torch.library.register_fake("mars_kernels::topk_gating_bwd")
    def _(grad_weights, logits, weights, indices, lse, softmax_first, renormalize):
        return torch.empty_like(logits)

    @torch.library.register_fake("mars_kernels::noisy_topk_gating_fwd")
    def _(clean_logits, noise_logits, noise, k, noise_eps):
        T, E = clean_logits.shape
        acc = _acc(clean_logits)
        return (
            clean_logits.new_empty((T, k), dtype=acc),
            clean_logits.new_empty((T, k), dtype=torch.int64),
            clean_logits.new_empty((T,), dtype=torch.int64),
            clean_logits.new_empty((E,), dtype=acc),
            clean_logits.new_empty((E,), dtype=acc),
        )

    @torch.library.register_fake("mars_kernels::noisy_topk_gating_bwd")
    def _(grad_weights, grad_importance, grad_load, clean_logits, noise_logits, noise, weights, indices,
          threshold_index, noise_eps):
        return torch.empty_like(clean_logits), torch.empty_like(noise_logits)

    @torch.library.register_fake("mars_kernels::mars_routing_fwd")
    def _(residual_logits, feature_logits, noise, k, sigma_0, sigma_const, sigma_max):
        T, E = residual_logits.shape
        acc = _acc(residual_logits)
        vec = lambda n: residual_logits.new_empty((n,), dtype=acc)  # noqa: E731
        return (
            residual_logits.new_empty((T, k), dtype=acc),
            residual_logits.new_empty((T, k), dtype=torch.int64),
            vec(T), vec(T), vec(E), vec(T), vec(T),
        )

    @torch.library.register_fake("mars_kernels::mars_routing_bwd")
    def _(grad_weights, grad_imitation, grad_prob_sum, residual_logits, feature_logits, weights, indices, lse_r, lse_f):
        return torch.empty_like(residual_logits), torch.empty_like(feature_logits)

    @torch.library.register_fake("mars_kernels::router_stats_fwd")
    def _(logits):
        T, E = logits.shape
        return logits.new_empty((T,), dtype=_acc(logits)), logits.new_empty((E,), dtype=_acc(logits))

    @torch.library.register_fake("mars_kernels::router_stats_bwd")
    def _(grad_lse, grad_prob_sum, logits, lse):
        return torch.empty_like(logits)


def _register_dispatch_fakes() -> None:
    @torch.library.register_fake("mars_kernels::moe_align")
    def _(indices, num_experts, block_size):
        S = indices.numel()
        nb = -(-S // block_size) + num_experts
        new = lambda n: indices.new_empty((n,), dtype=torch.int64)  # noqa: E731
        return new(num_experts), new(num_experts + 1), new(S), new(S), new(nb), new(nb)

    @torch.library.register_fake("mars_kernels::moe_permute")
    def _(x, permutation, top_k):
        return x.new_empty((permutation.shape[0], x.shape[1]))

    @torch.library.register_fake("mars_kernels::moe_unpermute")
    def _(y_sorted, inverse, weights, top_k):
        return y_sorted.new_empty((y_sorted.shape[0] // top_k, y_sorted.shape[1]))

    @torch.library.register_fake("mars_kernels::moe_unpermute_bwd")
    def _(grad_out, y_sorted, permutation, inverse, weights):
        return torch.empty_like(y_sorted), torch.empty_like(weights)

    @torch.library.register_fake("mars_kernels::grouped_mlp_fwd")
    def _(x_sorted, offsets, w1, b1, w2, b2, activation, save_h=True):
        rows = x_sorted.shape[0] if save_h else 0
        return x_sorted.new_empty((x_sorted.shape[0], w2.shape[2])), x_sorted.new_empty((rows, w1.shape[2]))

    @torch.library.register_fake("mars_kernels::grouped_mlp_bwd")
    def _(grad_y_sorted, x_sorted, h, offsets, w1, w2, activation):
        E, H1, D = w1.shape[0], w1.shape[2], w2.shape[2]
        return (
            torch.empty_like(x_sorted),
            torch.empty_like(w1),
            w1.new_empty((E, H1)),
            torch.empty_like(w2),
            w2.new_empty((E, D)),
        )

    @torch.library.register_fake("mars_kernels::moe_mlp_fwd")
    def _(x, weights, permutation, offsets, top_k, w1, b1, w2, b2, activation, save_h):
        rows = permutation.shape[0] if save_h else 0
        return torch.empty_like(x), x.new_empty((rows, w1.shape[2]))

    @torch.library.register_fake("mars_kernels::moe_mlp_bwd")
    def _(grad_y, x, weights, permutation, offsets, top_k, w1, w2, b2, h, activation):
        E, H1, D = w1.shape[0], w1.shape[2], w2.shape[2]
        return (
            torch.empty_like(x),
            torch.empty_like(weights),
            torch.empty_like(w1),
            w1.new_empty((E, H1)),
            torch.empty_like(w2),
            w2.new_empty((E, D)),
        )


def _register_attention_fakes() -> None:
    @torch.library.register_fake("mars_kernels::modality_attention_fwd")
    def _(qkv, num_heads, keep, missing, observed):
        T, M, D3 = qkv.shape
        lead = leading_shape(observed, T)
        return qkv.new_empty((*lead, M, D3 // 3)), qkv.new_empty((*lead, num_heads, M, M), dtype=_acc(qkv))

    @torch.library.register_fake("mars_kernels::residual_norm_mean_fwd")
    def _(y, h, weight, bias, missing, observed, eps):
        T, M, D = h.shape
        lead = leading_shape(observed, T)
        stats = h.new_empty((*lead, M), dtype=_acc(h))
        return h.new_empty((*lead, D)), stats, torch.empty_like(stats)

    @torch.library.register_fake("mars_kernels::residual_norm_mean_bwd")
    def _(grad_z, y, h, weight, missing, observed, mean, rstd):
        grad_missing = h.new_empty((0,)) if missing is None else torch.empty_like(missing)
        return torch.empty_like(y), torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight), grad_missing

    @torch.library.register_fake("mars_kernels::modality_attention_bwd")
    def _(grad_out, qkv, probs, keep, missing, observed, num_heads):
        return torch.empty_like(qkv), (qkv.new_empty((0,)) if missing is None else torch.empty_like(missing))
