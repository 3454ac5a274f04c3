// Schemas of every mars_kernels op, declared once. Implementations register
// for the CPU key (cpu/*.cpp) and the CUDA key (cuda/*_binding.cpp). Each op's
// module under mars_kernels/ops/ attaches its fake (meta) implementation and
// autograd formula and defines its Triton twin torch.ops.mars_triton.<name>
// with this same schema (mars_kernels/library.py).
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

  // ---- Dispatch and experts. S = T*k assignments, flat = t*k + j.
  // indices [T,k] int64 with values in [0, E] (E = dropped) -> counts [E],
  // offsets [E+1], permutation [S] (sorted slot -> flat), inverse [S],
  // block_expert [NB], block_start [NB], NB = ceil(S/block_size) + E. All int64;
  // sorted order is stable (by flat index within an expert). See mars_kernels/meta.py.
  m.def(
      "moe_align(Tensor indices, int num_experts, int block_size) -> (Tensor counts, Tensor offsets,"
      " Tensor permutation, Tensor inverse, Tensor block_expert, Tensor block_start)");
  // Both row moves take the permutation and its inverse (each one's backward is
  // the other move); entries outside [0, S) raise (CPU) rather than read out of bounds.
  // x [T,D] -> x_sorted [S,D], x_sorted[s] = x[permutation[s] / top_k].
  m.def("moe_permute(Tensor x, Tensor permutation, Tensor inverse, int top_k) -> Tensor");
  // y_sorted [S,D] -> y [T,D], y[t] = sum_j w[t,j] * y_sorted[inverse[t*k+j]] (w = 1 when
  // weights is None), accumulated in f32 in the order j = 0..k-1, no atomics.
  m.def("moe_unpermute(Tensor y_sorted, Tensor permutation, Tensor inverse, Tensor? weights, int top_k) -> Tensor");
  // Backward of the weighted unpermute: grad_y_sorted[s] = w[p] * grad_out[p / k] with
  // p = permutation[s]; grad_weights[t,j] = <grad_out[t], y_sorted[inverse[t*k+j]]> (f32).
  m.def(
      "moe_unpermute_bwd(Tensor grad_out, Tensor y_sorted, Tensor permutation, Tensor inverse,"
      " Tensor weights) -> (Tensor grad_y_sorted, Tensor grad_weights)");
  // Each expert's MLP on its contiguous rows of x_sorted [S,D]: h = x W1[e] + b1[e]
  // ([S,H1], returned for the backward when save_h, else an empty [0,H1] tensor),
  // y = act(h) W2[e] + b2[e] ([S,D]); rows from offsets[E] on are zero.
  // w1 [E,D,H1], w2 [E,H,D], H1 = 2H for swiglu.
  m.def(
      "grouped_mlp_fwd(Tensor x_sorted, Tensor offsets, Tensor w1, Tensor? b1, Tensor w2,"
      " Tensor? b2, str activation, bool save_h=True) -> (Tensor y_sorted, Tensor h)");
  // -> grad_x_sorted [S,D], grad_w1, grad_b1 [E,H1], grad_w2, grad_b2 [E,D].
  m.def(
      "grouped_mlp_bwd(Tensor grad_y_sorted, Tensor x_sorted, Tensor h, Tensor offsets, Tensor w1,"
      " Tensor w2, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The whole expert computation in token order, without materialising T*k rows:
  // y[t] = sum over t's assignments of w * (act(x[t] W1[e] + b1[e]) W2[e] + b2[e]),
  // accumulated in f32 in expert order. x [T,D], weights [T,k] f32; permutation,
  // inverse, offsets, block_expert, block_start, top_k and block_size are the
  // MoEMeta of moe_align (the CPU kernels read permutation and offsets, the
  // row-block kernels the rest). -> y [T,D], h [S,H1] in sorted order (empty
  // [0,H1] unless save_h).
  m.def(
      "moe_mlp_fwd(Tensor x, Tensor weights, Tensor permutation, Tensor inverse, Tensor offsets,"
      " Tensor block_expert, Tensor block_start, int top_k, int block_size, Tensor w1, Tensor? b1,"
      " Tensor w2, Tensor? b2, str activation, bool save_h) -> (Tensor y, Tensor h)");
  // -> grad_x [T,D], grad_weights [T,k] f32, grad_w1, grad_b1 [E,H1], grad_w2, grad_b2 [E,D].
  m.def(
      "moe_mlp_bwd(Tensor grad_y, Tensor x, Tensor weights, Tensor permutation, Tensor inverse, Tensor offsets,"
      " Tensor block_expert, Tensor block_start, int top_k, int block_size, Tensor w1, Tensor w2, Tensor? b2,"
      " Tensor h, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- MARS training-time routing (DESIGN 2.3), see reference.mars_routing.
  // residual_logits, feature_logits [T,E] same float dtype; noise [T,E] f32 ->
  // weights [T,k] f32, indices [T,k] int64 (top k of l_r + sigma*noise, ties to the
  // lower index), imitation [T] f32 (KL(sg(p_r) || p_f)), divergence [T] f32
  // (KL(p_r || p_f)), prob_sum [E] f32 (sum over T of p_r, deterministic),
  // lse_r, lse_f [T] f32 (row log-sum-exps, for the backward).
  // sigma = min(sigma_0 * divergence + sigma_const, sigma_max).
  m.def(
      "mars_routing_fwd(Tensor residual_logits, Tensor feature_logits, Tensor noise, int k, float sigma_0,"
      " float sigma_const, float sigma_max) -> (Tensor weights, Tensor indices, Tensor imitation,"
      " Tensor divergence, Tensor prob_sum, Tensor lse_r, Tensor lse_f)");
  // grad_r = scatter(w * (g - <g, w>)) + p_r * (grad_prob_sum - <grad_prob_sum, p_r>);
  // grad_f = grad_imitation[t] * (p_f - p_r). -> (grad_residual, grad_feature) in the
  // logits' dtype.
  m.def(
      "mars_routing_bwd(Tensor grad_weights, Tensor grad_imitation, Tensor grad_prob_sum,"
      " Tensor residual_logits, Tensor feature_logits, Tensor weights, Tensor indices, Tensor lse_r,"
      " Tensor lse_f) -> (Tensor, Tensor)");

  // ---- Modality attention (the MARS fusion, DESIGN 3), see reference.modality_attention.
  // qkv [T,M,3D] f16/bf16/f32/f64 contiguous: row (t, m) holds q | k | v of modality
  // m at position t, each split into num_heads heads of D/num_heads columns (the
  // packed in-projection of nn.MultiheadAttention). keep [T,H,M,M] f32 (f64 for f64)
  // or None: multiplies the attention probabilities (a dropout mask, already scaled).
  // missing [M,3D] (qkv's dtype) and observed [T,M] bool, both or neither: row (t, m)
  // is replaced by missing[m] where observed[t, m] is false. observed may also be
  // [P,T,M] (P masks over one projection): then keep, probs and out gain a leading
  // P ([P,T,H,M,M], [P,T,M,D]) and grad_qkv sums the P attentions' gradients.
  // -> out [T,M,D] in qkv's dtype, out[t,i,head h] = sum_j p'[t,h,i,j] v[t,j,h],
  //    probs [T,H,M,M] f32: softmax_j(<q_i, k_j> / sqrt(D/H)) before keep.
  m.def(
      "modality_attention_fwd(Tensor qkv, int num_heads, Tensor? keep, Tensor? missing, Tensor? observed)"
      " -> (Tensor out, Tensor probs)");
  // -> grad_qkv [T,M,3D] in qkv's dtype (dq | dk | dv; zero on unobserved rows),
  //    grad_missing [M,3D] (summed over the unobserved positions, in position-block
  //    order; an empty [0] tensor without missing).
  m.def(
      "modality_attention_bwd(Tensor grad_out, Tensor qkv, Tensor probs, Tensor? keep, Tensor? missing,"
      " Tensor? observed, int num_heads) -> (Tensor grad_qkv, Tensor grad_missing)");

  // ---- Residual + LayerNorm + mean over modalities (the end of the MARS fusion),
  // see reference.residual_norm_mean. h [T,M,D] f16/bf16/f32/f64 (M, D >= 1), y
  // [T,M,D] (or [P,T,M,D] with a [P,T,M] observed), weight and bias [D], missing
  // [M,D] and observed [T,M]/[P,T,M] bool (both or neither); all of h's dtype and
  // contiguous. x = h[t,m] where observed[p,t,m], else missing[m];
  // -> z [T,D] / [P,T,D] in h's dtype: mean_m LayerNorm(y + x) (biased variance,
  //    eps), mean and rstd [T,M] / [P,T,M] f32 (f64 for f64): each row's mean
  //    and 1 / sqrt(variance + eps).
  m.def(
      "residual_norm_mean_fwd(Tensor y, Tensor h, Tensor weight, Tensor bias, Tensor? missing, Tensor? observed,"
      " float eps) -> (Tensor z, Tensor mean, Tensor rstd)");
  // -> grad_y (y's shape), grad_h [T,M,D] (summed over the masks; zero on rows no
  //    mask observes), grad_weight, grad_bias [D], grad_missing [M,D] (an empty [0]
  //    tensor without missing). Sums over positions in position-block order.
  m.def(
      "residual_norm_mean_bwd(Tensor grad_z, Tensor y, Tensor h, Tensor weight, Tensor? missing, Tensor? observed,"
      " Tensor mean, Tensor rstd) -> (Tensor grad_y, Tensor grad_h, Tensor grad_weight, Tensor grad_bias,"
      " Tensor grad_missing)");
}
