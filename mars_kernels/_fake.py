"""Fake (meta) implementations of the torch.ops.mars_kernels ops: output
shapes and dtypes only, so torch.compile and FakeTensor tracing work."""
from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def register_fakes() -> None:
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

    @torch.library.register_fake("mars_kernels::router_stats_fwd")
    def _(logits):
        T, E = logits.shape
        return logits.new_empty((T,), dtype=_acc(logits)), logits.new_empty((E,), dtype=_acc(logits))

    @torch.library.register_fake("mars_kernels::router_stats_bwd")
    def _(grad_lse, grad_prob_sum, logits, lse):
        return torch.empty_like(logits)
