// Helpers shared by the CPU op implementations: input checks and the
// deterministic block layout used for sums over tokens.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <vector>

namespace mars_kernels {
namespace cpu {

// Tokens per block for sums over T. Each block writes its own partial row and
// the partials are added in block order, so the result does not depend on
// the number of threads.
constexpr int64_t kTokenBlock = 128;

inline at::ScalarType routing_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D [T, E] tensor, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Dispatch metadata arrives from Python (a MoEMeta can be built or edited by
// hand), so its slot indices are checked before any kernel reads through them:
// one pass, cheap next to the row moves. A bad entry is a ValueError naming the field.
inline void check_slots(const at::Tensor& slots, int64_t S, const char* name) {
  TORCH_CHECK_VALUE(slots.scalar_type() == at::kLong && slots.numel() == S, name, " must be int64 with ", S,
                    " entries, got ", slots.scalar_type(), " ", slots.sizes());
  const at::Tensor c = slots.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < S, name, " must hold slots in [0, ", S, "), got ", p[i], " at entry ", i);
}

// offsets [E+1] of a MoEMeta: 0 first, non-decreasing, the last at most `rows`.
inline void check_offsets(const at::Tensor& offsets, int64_t E, int64_t rows) {
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong && offsets.numel() == E + 1, "offsets must be int64 [E+1 = ",
                    E + 1, "], got ", offsets.scalar_type(), " ", offsets.sizes());
  const at::Tensor c = offsets.contiguous();
  const int64_t* o = c.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, "offsets must start at 0, got ", o[0]);
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(o[e + 1] >= o[e], "offsets must be non-decreasing, got ", o[e], " then ", o[e + 1],
                      " at expert ", e);
  TORCH_CHECK_VALUE(o[E] <= rows, "offsets[E] must be at most the ", rows, " rows, got ", o[E]);
}

inline void check_k(int64_t k, int64_t E) {
  TORCH_CHECK(k >= 1 && k <= E, "k must be in [1, E=", E, "], got ", k);
}

// The masks of the fusion ops (modality attention, residual norm mean):
// observed [T, M] or [P, T, M] bool, or none, over T positions. P masks make
// P * T instances, instance p * T + t reading position t; the per-instance
// tensors have the leading shape `lead`: [T], or [P, T] for a [P, T, M] mask.
struct Masks {
  int64_t P = 1, T = 0;
  std::vector<int64_t> lead;
  int64_t instances() const { return P * T; }
  std::vector<int64_t> shape(std::initializer_list<int64_t> tail) const {
    std::vector<int64_t> out(lead);
    out.insert(out.end(), tail);
    return out;
  }
};

inline Masks check_masks(const std::optional<at::Tensor>& observed, int64_t T, int64_t M) {
  Masks s{1, T, {T}};
  if (!observed) return s;
  TORCH_CHECK((observed->dim() == 2 || observed->dim() == 3) && observed->size(-2) == T && observed->size(-1) == M,
              "observed must have shape [T, M] or [P, T, M] with T = ", T, ", M = ", M, ", got ", observed->sizes());
  TORCH_CHECK(observed->scalar_type() == at::kBool, "observed must be bool, got ", observed->scalar_type());
  TORCH_CHECK(observed->is_contiguous(), "observed must be contiguous");
  if (observed->dim() == 3) s.P = observed->size(0), s.lead = {s.P, T};
  return s;
}

// Sums partial[nblocks, E] over blocks in block order into a fresh [E] tensor.
template <typename acc_t>
inline at::Tensor sum_blocks(const std::vector<acc_t>& partial, int64_t nblocks, int64_t E,
                             at::ScalarType dtype) {
  at::Tensor out = at::zeros({E}, at::TensorOptions().dtype(dtype));
  acc_t* o = out.data_ptr<acc_t>();
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t e = 0; e < E; ++e) o[e] += partial[b * E + e];
  return out;
}

}  // namespace cpu
}  // namespace mars_kernels
