// Schemas of every mars_kernels op, declared once. Implementations register
// for the CPU key (cpu/*.cpp) and the CUDA key (cuda/*_binding.cpp); fake
// (meta) implementations live in mars_kernels/_fake.py.
//
// Shapes: T tokens, E experts, k chosen per token. "f32" means float32, or
// float64 when the logits are float64. Indices are int64, ordered by
// descending logit with ties to the lower expert index (NaN ranks as +inf).
#include <torch/library.h>

TORCH_LIBRARY(mars_kernels, m) {
  // logits [T,E] f16/bf16/f32/f64, contiguous ->
  //   weights [T,k] f32, indices [T,k] int64, lse [T] f32.
  // lse is the normaliser of the weights: weights[t,j] = exp(logits[t,idx] - lse[t]).
  // It is the log-sum-exp of the whole row when softmax_first && !renormalize,
  // else of the k selected logits.
  m.def(
      "topk_gating_fwd(Tensor logits, int k, bool softmax_first, bool renormalize)"
      " -> (Tensor weights, Tensor indices, Tensor lse)");
  // -> grad_logits [T,E] in the logits' dtype.
  m.def(
      "topk_gating_bwd(Tensor grad_weights, Tensor logits, Tensor weights, Tensor indices,"
      " Tensor lse, bool softmax_first, bool renormalize) -> Tensor");

  // Training-mode noisy top-k gating (Shazeer et al. 2017).
  // clean_logits, noise_logits (pre-softplus) [T,E] same float dtype; noise [T,E] f32.
  // -> weights [T,k] f32, indices [T,k] int64, threshold_index [T] int64 (the
  //    expert ranked k+1 in noisy order, -1 when k == E), importance [E] f32,
  //    load [E] f32. Sums over T are deterministic (fixed-size token blocks).
  m.def(
      "noisy_topk_gating_fwd(Tensor clean_logits, Tensor noise_logits, Tensor noise, int k,"
      " float noise_eps) -> (Tensor weights, Tensor indices, Tensor threshold_index,"
      " Tensor importance, Tensor load)");
  // -> grad_clean_logits, grad_noise_logits [T,E] in the logits' dtype.
  m.def(
      "noisy_topk_gating_bwd(Tensor grad_weights, Tensor grad_importance, Tensor grad_load,"
      " Tensor clean_logits, Tensor noise_logits, Tensor noise, Tensor weights, Tensor indices,"
      " Tensor threshold_index, float noise_eps) -> (Tensor, Tensor)");

  // Softmax statistics for the auxiliary losses, one pass over the logits.
  // logits [T,E] -> lse [T] f32 (row log-sum-exp), prob_sum [E] f32 (sum over T
  // of softmax(logits), deterministic).
  m.def("router_stats_fwd(Tensor logits) -> (Tensor lse, Tensor prob_sum)");
  // grad_logits = p * (grad_lse[t] + grad_prob_sum[e] - sum_e' grad_prob_sum[e'] p[t,e']).
  m.def(
      "router_stats_bwd(Tensor grad_lse, Tensor grad_prob_sum, Tensor logits, Tensor lse)"
      " -> Tensor");
}
