// CPU expert MLPs (contracts beside the schemas in mars_kernels/ops/expert_mlp.py):
//   * grouped_mlp: per-expert ATen GEMMs (MKL/oneDNN) on each expert's
//     contiguous rows of the expert-sorted activations, with the bias and the
//     activation (and its backward) in one pass over each GEMM's output rows;
//   * moe_mlp, the fused expert computation: for each expert, gather its token
//     rows into a small reused buffer, run the two GEMMs, and accumulate the
//     gate-weighted rows back into the token-order output. Nothing of size
//     T*k*D is materialised; only the pre-activations h [S, H1] are kept for the
//     backward, which regathers rows and gets the gate-weight gradients from
//     G = grad_y W2^T (no saved expert outputs).
// Both share the row gather, the activation passes fused around the GEMMs and
// the weight-shape checks (first below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "activation_math.h"
#include "cpu_common.h"
#include "phase_profile.h"

namespace mars_kernels {
namespace cpu {

// The expert activation, parsed from the ops' `activation` string (grammar and
// meaning: mars_kernels/ops/expert_mlp.py, `Activation`). An element function f,
// applied to h (H1 = H), or gated: a = f(gate) * up with h holding the gate and
// up columns (H1 = 2H), either as [gate | up] halves or interleaved (gate in
// column 2j, up in 2j + 1: GPT-OSS's layout). The clamped form (GPT-OSS and
// similar) caps gate at `limit`, clips up to [-limit, limit] and adds up_offset:
// a = f(min(gate, L)) * (clip(up) + up_offset), f(x) = x sigmoid(alpha x).
enum class Fn { Gelu, GeluTanh, Silu, Relu, Relu2, SiluAlpha };

struct Act {
  Fn fn = Fn::Gelu;
  bool gated = false;
  bool interleaved = false;
  bool clamp = false;
  double alpha = 1.0, limit = std::numeric_limits<double>::infinity(), up_offset = 0.0;
};

inline double parse_number(const std::string& spec, const std::string& item, size_t eq) {
  const std::string text = item.substr(eq + 1);
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  TORCH_CHECK_VALUE(!text.empty() && end && *end == '\0', "activation '", spec, "': '", item, "' is not a number");
  return v;
}

inline Act parse_activation(const std::string& spec) {
  std::vector<std::string> items;
  size_t begin = 0;
  while (true) {
    const size_t colon = spec.find(':', begin);
    items.push_back(spec.substr(begin, colon == std::string::npos ? std::string::npos : colon - begin));
    if (colon == std::string::npos) break;
    begin = colon + 1;
  }
  Act act;
  const std::string& name = items[0];
  if (name == "gelu") act.fn = Fn::Gelu;
  else if (name == "gelu_tanh") act.fn = Fn::GeluTanh;
  else if (name == "silu") act.fn = Fn::Silu;
  else if (name == "relu") act.fn = Fn::Relu;
  else if (name == "relu2") act.fn = Fn::Relu2;
  else if (name == "swiglu") act.fn = Fn::Silu, act.gated = true;
  else if (name == "geglu") act.fn = Fn::Gelu, act.gated = true;
  else if (name == "geglu_tanh") act.fn = Fn::GeluTanh, act.gated = true;
  else if (name == "reglu") act.fn = Fn::Relu, act.gated = true;
  else if (name == "swiglu_clamp") act.fn = Fn::SiluAlpha, act.gated = true, act.clamp = true;
  else
    TORCH_CHECK_VALUE(false, "activation must be one of gelu, gelu_tanh, silu, relu, relu2, swiglu, geglu, geglu_tanh, "
                      "reglu, swiglu_clamp (with ':' options), got '", spec, "'");
  for (size_t i = 1; i < items.size(); ++i) {
    const std::string& item = items[i];
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    if (item == "interleaved" && act.gated) act.interleaved = true;
    else if (act.clamp && eq != std::string::npos && key == "alpha") act.alpha = parse_number(spec, item, eq);
    else if (act.clamp && eq != std::string::npos && key == "limit") act.limit = parse_number(spec, item, eq);
    else if (act.clamp && eq != std::string::npos && key == "up_offset") act.up_offset = parse_number(spec, item, eq);
    else
      TORCH_CHECK_VALUE(false, "activation '", spec, "': unknown option '", item,
                        "' (gated activations take 'interleaved'; swiglu_clamp takes alpha=, limit=, up_offset=)");
  }
  TORCH_CHECK_VALUE(!(act.limit < 0), "activation '", spec, "': limit must be >= 0");
  return act;
}

// f(x) and f'(x) for the element function F (alpha: SiluAlpha's slope).
template <Fn F, typename T>
inline void act_and_grad(T x, T alpha, T& a, T& da) {
  if constexpr (F == Fn::Gelu) gelu_and_grad<T>(x, a, da);
  else if constexpr (F == Fn::GeluTanh) gelu_tanh_and_grad<T>(x, a, da);
  else if constexpr (F == Fn::Silu) silu_and_grad<T>(x, a, da);
  else if constexpr (F == Fn::Relu) relu_and_grad<T>(x, a, da);
  else if constexpr (F == Fn::Relu2) relu2_and_grad<T>(x, a, da);
  else silu_alpha_and_grad<T>(x, alpha, a, da);
}

// Calls f(fn, gated, interleaved, clamp) with each as a compile-time constant,
// for the combinations parse_activation produces.
template <typename F>
inline void with_activation(const Act& act, F&& f) {
  using std::bool_constant;
  auto by_fn = [&](auto gated, auto interleaved, auto clamp) {
    switch (act.fn) {
      case Fn::Gelu: return f(std::integral_constant<Fn, Fn::Gelu>{}, gated, interleaved, clamp);
      case Fn::GeluTanh: return f(std::integral_constant<Fn, Fn::GeluTanh>{}, gated, interleaved, clamp);
      case Fn::Silu: return f(std::integral_constant<Fn, Fn::Silu>{}, gated, interleaved, clamp);
      case Fn::Relu: return f(std::integral_constant<Fn, Fn::Relu>{}, gated, interleaved, clamp);
      case Fn::Relu2: return f(std::integral_constant<Fn, Fn::Relu2>{}, gated, interleaved, clamp);
      case Fn::SiluAlpha: return f(std::integral_constant<Fn, Fn::SiluAlpha>{}, gated, interleaved, clamp);
    }
  };
  if (!act.gated) return by_fn(bool_constant<false>{}, bool_constant<false>{}, bool_constant<false>{});
  if (act.clamp) {
    if (act.interleaved) return by_fn(bool_constant<true>{}, bool_constant<true>{}, bool_constant<true>{});
    return by_fn(bool_constant<true>{}, bool_constant<false>{}, bool_constant<true>{});
  }
  if (act.interleaved) return by_fn(bool_constant<true>{}, bool_constant<true>{}, bool_constant<false>{});
  return by_fn(bool_constant<true>{}, bool_constant<false>{}, bool_constant<false>{});
}

// Element conversions between the storage dtype and the math dtype, written so
// that loops over a row vectorise: bfloat16 converts with shifts and a
// branch-free round-to-nearest-even (c10::BFloat16's own conversion branches
// on NaN, which keeps GCC from vectorising the activation loops, so bfloat16
// rows ran one element at a time). Same values as static_cast (NaN -> 0x7FC0).
template <typename acc_t, typename scalar_t>
inline acc_t ld(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
inline scalar_t st(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t u = std::bit_cast<uint32_t>(v);
    const uint32_t r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : r), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Runs f(scalar_t, acc_t) for the tensor's dtype (acc_t: the float type math is done in).
template <typename F>
inline void dispatch_float_types(const at::Tensor& t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "expert_mlp", [&] {
    f(scalar_t{}, at::opmath_type<scalar_t>{});
  });
}

// <a, b> over m elements, accumulated in acc_t.
template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t m) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += ld<acc_t>(a[j]) * ld<acc_t>(b[j]);
  return s;
}

// out[i] = src[rows[i]] for i < n: src [*, D], rows [n] int64, out [n, D].
// With bias ([D]) also bias_dots[i] = <src[rows[i]], bias> (acc dtype, [n]).
inline void gather_rows(const at::Tensor& src, const at::Tensor& rows, at::Tensor& out,
                        const c10::optional<at::Tensor>& bias = c10::nullopt, at::Tensor* bias_dots = nullptr) {
  const int64_t n = rows.size(0), D = src.size(1);
  const int64_t* idx = rows.const_data_ptr<int64_t>();
  dispatch_float_types(src, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    const scalar_t* S = src.const_data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const scalar_t* B = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    acc_t* dots = B ? bias_dots->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = S + idx[i] * D;
        std::memcpy(O + i * D, row, D * sizeof(scalar_t));
        if (B) dots[i] = dot_row<scalar_t, acc_t>(row, B, D);
      }
    });
  });
}

// The forward epilogue of the first GEMM, one pass per row:
// h [n, H1] += bias ([H1], optional), then a [n, H] = act(h).
inline void bias_activation_rows(const Act& act, at::Tensor& h, const c10::optional<at::Tensor>& bias, at::Tensor& a) {
  const int64_t n = h.size(0), H1 = h.size(1), H = a.size(1);
  dispatch_float_types(h, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    scalar_t* Hp = h.data_ptr<scalar_t>();
    scalar_t* Ap = a.data_ptr<scalar_t>();
    const scalar_t* B = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const acc_t alpha = act.alpha, limit = act.limit, offset = act.up_offset;
    with_activation(act, [&](auto fn, auto gated, auto interleaved, auto clamp) {
      constexpr Fn F = decltype(fn)::value;
      at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          scalar_t* hr = Hp + i * H1;
          scalar_t* ar = Ap + i * H;
          if (B)  // h is stored rounded to scalar_t, and the activation reads it so, as the backward will
            for (int64_t j = 0; j < H1; ++j)
              hr[j] = st<scalar_t>(ld<acc_t>(hr[j]) + ld<acc_t>(B[j]));
          if constexpr (!gated) {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
              acc_t v, dv;
              act_and_grad<F, acc_t>(ld<acc_t>(hr[j]), alpha, v, dv);
              ar[j] = st<scalar_t>(v);
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
              acc_t g = ld<acc_t>(hr[interleaved ? 2 * j : j]);
              acc_t u = ld<acc_t>(hr[interleaved ? 2 * j + 1 : H + j]);
              if constexpr (clamp) {
                g = std::min(g, limit);
                u = std::max(std::min(u, limit), -limit) + offset;
              }
              acc_t v, dv;
              act_and_grad<F, acc_t>(g, alpha, v, dv);
              ar[j] = st<scalar_t>(v * u);
            }
          }
        }
      });
    });
  });
}

// The backward through a = act(h), one pass per row, given G = dy W2^T [n, H]
// and the rows' gate weights w ([n], acc dtype; undefined: 1):
//   a [n, H]   = w * act(h)          (recomputed rather than saved, and scaled
//                                     here so that the second weight gradient
//                                     a^T dy needs no pass of its own)
//   dh [n, H1] = w * act'(h) * G     (the gradient at the first GEMM's output;
//                                     0 where a clamp cut the input, as torch.clamp)
//   dots [n]   = <G, act(h)>         (acc dtype, optional: d loss / d w)
inline void activation_grad_rows(const Act& act, const at::Tensor& h, const at::Tensor& G, const at::Tensor& w,
                                 at::Tensor& a_out, at::Tensor& dh, at::Tensor* dots = nullptr) {
  const int64_t n = h.size(0), H1 = h.size(1), H = G.size(1);
  dispatch_float_types(h, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    const scalar_t* Hp = h.const_data_ptr<scalar_t>();
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    scalar_t* AO = a_out.data_ptr<scalar_t>();
    scalar_t* DH = dh.data_ptr<scalar_t>();
    const acc_t* W = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    acc_t* D = dots ? dots->data_ptr<acc_t>() : nullptr;
    const acc_t alpha = act.alpha, limit = act.limit, offset = act.up_offset;
    with_activation(act, [&](auto fn, auto gated, auto interleaved, auto clamp) {
      constexpr Fn F = decltype(fn)::value;
      at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* hr = Hp + i * H1;
          const scalar_t* g = Gp + i * H;
          scalar_t* a = AO + i * H;
          scalar_t* d = DH + i * H1;
          const acc_t wi = W ? W[i] : acc_t(1);
          acc_t s = 0;
          if constexpr (!gated) {
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < H; ++j) {
              acc_t v, dv;
              act_and_grad<F, acc_t>(ld<acc_t>(hr[j]), alpha, v, dv);
              const acc_t gj = ld<acc_t>(g[j]);
              s += gj * v;
              a[j] = st<scalar_t>(wi * v);
              d[j] = st<scalar_t>(wi * dv * gj);
            }
          } else {
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < H; ++j) {
              const int64_t gi = interleaved ? 2 * j : j, ui = interleaved ? 2 * j + 1 : H + j;
              acc_t gate = ld<acc_t>(hr[gi]), up = ld<acc_t>(hr[ui]);
              acc_t pass_gate = 1, pass_up = 1;
              if constexpr (clamp) {
                pass_gate = gate <= limit ? acc_t(1) : acc_t(0);
                pass_up = (up >= -limit && up <= limit) ? acc_t(1) : acc_t(0);
                gate = std::min(gate, limit);
                up = std::max(std::min(up, limit), -limit) + offset;
              }
              acc_t v, dv;
              act_and_grad<F, acc_t>(gate, alpha, v, dv);
              const acc_t gj = ld<acc_t>(g[j]);
              s += gj * v * up;
              a[j] = st<scalar_t>(wi * (v * up));
              d[gi] = st<scalar_t>(wi * gj * up * dv * pass_gate);  // d gate
              d[ui] = st<scalar_t>(wi * gj * v * pass_up);          // d up
            }
          }
          if (D) D[i] = s;
        }
      });
    });
  });
}

// dst [cols, rows] = src [rows, cols]^T (src row stride ld), in 32 x 32 blocks
// that stay in L1 (bit copies: any 2- or 4-byte element type).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t ld, T* dst) {
  constexpr int64_t kB = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kB)
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t i1 = std::min(i0 + kB, rows), j1 = std::min(j0 + kB, cols);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * ld + j];
    }
}

// out = src^T for a contiguous [n, m] src and a contiguous [m, n] out.
inline void transpose(const at::Tensor& src, at::Tensor& out) {
  const int64_t n = src.size(0), m = src.size(1);
  if (src.element_size() == 2)
    transpose_into(static_cast<const uint16_t*>(src.const_data_ptr()), n, m, m, static_cast<uint16_t*>(out.data_ptr()));
  else if (src.element_size() == 4)
    transpose_into(static_cast<const uint32_t*>(src.const_data_ptr()), n, m, m, static_cast<uint32_t*>(out.data_ptr()));
  else
    out.copy_(src.t());
}

// sums (+)= sum_i w[i] * rows[i] (w: acc dtype [n]), added in row order in double.
void weighted_column_sums(const at::Tensor& rows, const at::Tensor& w, at::Tensor& sums, bool accumulate) {
  const int64_t n = rows.size(0), D = rows.size(1);
  dispatch_float_types(rows, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    const scalar_t* R = rows.const_data_ptr<scalar_t>();
    scalar_t* S = sums.data_ptr<scalar_t>();
    const acc_t* W = w.const_data_ptr<acc_t>();
    std::vector<double> col(D);
    for (int64_t j = 0; j < D; ++j) col[j] = accumulate ? static_cast<double>(S[j]) : 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* r = R + i * D;
      const double wi = static_cast<double>(W[i]);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) col[j] += wi * static_cast<double>(ld<acc_t>(r[j]));
    }
    for (int64_t j = 0; j < D; ++j) S[j] = static_cast<scalar_t>(col[j]);
  });
}

// GEMMs of a few rows (decode: one or two tokens per expert) are bound by
// reading the weights, and the library's bfloat16 GEMM repacks the whole
// weight matrix for every call, so they cost more in bfloat16 than in float32.
// On CPUs with AVX512-BF16 (in a build for them) they run here instead: one
// pass over the weights in their own layout, products summed in float32 by
// vdpbf16ps, one rounding per output. Up to kSmallRows rows when the weights
// are stored transposed (HF's [out, in]: each output is a dot product with a
// contiguous weight row), one row otherwise (a sum of scaled weight rows);
// beyond that the library's AMX kernels are faster.
constexpr int kSmallRows = 4;

inline bool small_gemm(const at::Tensor& x, const at::Tensor& w) {
#if defined(__AVX512BF16__)
  return x.scalar_type() == at::kBFloat16 && x.size(0) <= (w.stride(0) == 1 ? kSmallRows : 1);
#else
  (void)x, (void)w;
  return false;
#endif
}

#if defined(__AVX512BF16__)
// out [n, N] = x [n, K] @ w [K, N] in bfloat16 for small_gemm's shapes (x and out contiguous).
void small_mm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
  using bf16 = c10::BFloat16;
  const int64_t n = x.size(0), K = x.size(1), N = w.size(1), sk = w.stride(0), sn = w.stride(1);
  const bf16* X = x.const_data_ptr<bf16>();
  const bf16* W = w.const_data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  if (sk == 1) {  // all rows' dot products with one weight row at a time, 32 products per instruction
    auto columns = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      for (int64_t j = 0; j < N; ++j) {
        const bf16* wj = W + j * sn;
        __m512 v[R];
        for (int m = 0; m < R; ++m) v[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
          const __m512bh wk = (__m512bh)_mm512_maskz_loadu_epi16(mask, wj + k);
          for (int m = 0; m < R; ++m)
            v[m] = _mm512_dpbf16_ps(v[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, X + m * K + k), wk);
        }
        for (int m = 0; m < R; ++m) {
          alignas(64) float lanes[16];
          _mm512_store_ps(lanes, v[m]);
          float sum = 0.0f;
          for (float l : lanes) sum += l;
          O[m * N + j] = st<bf16>(sum);
        }
      }
    };
    [&]<int... R>(std::integer_sequence<int, R...>) {
      ((n == R + 1 ? columns(std::integral_constant<int, R + 1>{}) : void()), ...);
    }(std::make_integer_sequence<int, kSmallRows>{});
  } else if (n == 1) {  // the weight rows scaled by x's entries and added
    std::vector<float> acc(N, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float xk = ld<float>(X[k]);
      const bf16* wk = W + k * sk;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) acc[j] += xk * ld<float>(wk[j * sn]);
    }
    for (int64_t j = 0; j < N; ++j) O[j] = st<bf16>(acc[j]);
  }
}
#endif

// out = x @ w: the library's GEMM, or small_mm_out for a few bfloat16 rows.
inline void expert_mm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
#if defined(__AVX512BF16__)
  if (small_gemm(x, w)) return small_mm_out(out, x, w);
#endif
  at::mm_out(out, x, w);
}

// The most rows any expert has: offsets [E + 1] (int64 data).
inline int64_t largest_expert(const int64_t* off, int64_t E) {
  int64_t most = 0;
  for (int64_t e = 0; e < E; ++e) most = std::max(most, off[e + 1] - off[e]);
  return most;
}

// Expert e's row of an optional [E, *] bias.
inline c10::optional<at::Tensor> expert_bias(const c10::optional<at::Tensor>& b, int64_t e) {
  return b.has_value() ? c10::optional<at::Tensor>((*b)[e]) : c10::nullopt;
}

struct Shapes {
  int64_t S, D, E, H1, H;
};

// rows_per_x: sorted rows per row of x (top_k when x is in token order, 1 when sorted).
inline Shapes check_expert_shapes(const at::Tensor& x, const char* x_name, const at::Tensor& offsets,
                                  const at::Tensor& w1, const at::Tensor& w2, const Act& act, int64_t rows_per_x = 1) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), x_name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "w1 must be [E, D, H1] and w2 [E, H, D]");
  const int64_t E = w1.size(0), D = x.size(1), H1 = w1.size(2), H = w2.size(1);
  TORCH_CHECK(w1.size(1) == D && w2.size(0) == E && w2.size(2) == D, "w1 must be [E, D=", D, ", H1] and w2 [E, H, D=", D,
              "], got ", w1.sizes(), " and ", w2.sizes());
  TORCH_CHECK(H1 == (act.gated ? 2 * H : H), "w1's last dim must be ", act.gated ? "2H" : "H",
              " = ", act.gated ? 2 * H : H, " for this activation, got ", H1);
  check_offsets(offsets, E, x.size(0) * rows_per_x);
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "w1 and w2 must have ", x_name, "'s dtype ", x.scalar_type());
  return {x.size(0), D, E, H1, H};
}

namespace {

// ---------------------------------------------------------------------------
// grouped_mlp: rows already in expert order
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> grouped_mlp_fwd(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w1,
                                                   const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                   const c10::optional<at::Tensor>& b2, std::string activation,
                                                   bool save_h) {
  const Act act = parse_activation(activation);
  const Shapes sh = check_expert_shapes(x, "x_sorted", offsets, w1, w2, act);
  const at::Tensor offs = offsets.contiguous();
  const int64_t* off = offs.const_data_ptr<int64_t>();
  const int64_t most = largest_expert(off, sh.E);
  // Without a backward to feed, h lives one expert at a time.
  at::Tensor h = at::empty({save_h ? sh.S : most, sh.H1}, x.options());
  at::Tensor y = at::empty({sh.S, sh.D}, x.options());
  y.narrow(0, off[sh.E], sh.S - off[sh.E]).zero_();
  if (save_h) h.narrow(0, off[sh.E], sh.S - off[sh.E]).zero_();
  at::Tensor scratch = at::empty({most, sh.H}, x.options());
  for (int64_t e = 0; e < sh.E; ++e) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) continue;
    at::Tensor he = h.narrow(0, save_h ? lo : 0, n), ye = y.narrow(0, lo, n), ae = scratch.narrow(0, 0, n);
    const at::Tensor xe = x.narrow(0, lo, n);
    at::mm_out(he, xe, w1[e]);
    bias_activation_rows(act, he, expert_bias(b1, e), ae);
    if (b2.has_value()) at::addmm_out(ye, (*b2)[e], ae, w2[e]);
    else at::mm_out(ye, ae, w2[e]);
  }
  return {y, save_h ? h : at::empty({0, sh.H1}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_mlp_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h, const at::Tensor& offsets,
    const at::Tensor& w1, const at::Tensor& w2, std::string activation) {
  const Act act = parse_activation(activation);
  const Shapes sh = check_expert_shapes(x, "x_sorted", offsets, w1, w2, act);
  const at::Tensor dy = grad_y.contiguous(), offs = offsets.contiguous();
  const int64_t* off = offs.const_data_ptr<int64_t>();
  at::Tensor dx = at::empty_like(x);
  dx.narrow(0, off[sh.E], sh.S - off[sh.E]).zero_();
  at::Tensor dw1 = at::zeros_like(w1), dw2 = at::zeros_like(w2);
  at::Tensor db1 = at::zeros({sh.E, sh.H1}, w1.options()), db2 = at::zeros({sh.E, sh.D}, w2.options());
  const int64_t most = largest_expert(off, sh.E);
  at::Tensor a_buf = at::empty({most, sh.H}, x.options()), da_buf = at::empty({most, sh.H}, x.options());
  at::Tensor dh_buf = at::empty({most, sh.H1}, x.options());
  for (int64_t e = 0; e < sh.E; ++e) {
    const int64_t lo = off[e], n = off[e + 1] - lo;
    if (n == 0) continue;
    const at::Tensor xe = x.narrow(0, lo, n), he = h.narrow(0, lo, n), dye = dy.narrow(0, lo, n);
    at::Tensor ae = a_buf.narrow(0, 0, n), dae = da_buf.narrow(0, 0, n), dhe = dh_buf.narrow(0, 0, n);
    at::Tensor dw2e = dw2[e], dw1e = dw1[e], db2e = db2[e], db1e = db1[e], dxe = dx.narrow(0, lo, n);
    at::mm_out(dae, dye, w2[e].t());
    activation_grad_rows(act, he, dae, at::Tensor(), ae, dhe);  // ae = act(h), recomputed rather than saved
    at::mm_out(dw2e, ae.t(), dye);
    at::sum_out(db2e, dye, {0});
    at::mm_out(dw1e, xe.t(), dhe);
    at::sum_out(db1e, dhe, {0});
    at::mm_out(dxe, dhe, w1[e].t());
  }
  return {dx, dw1, db1, dw2, db2};
}

// ---------------------------------------------------------------------------
// moe_mlp: the whole expert computation in token order
// ---------------------------------------------------------------------------

// Rows per tile: an expert's rows are processed in tiles whose intermediates
// (gathered rows, activations and their gradients) fit a fixed workspace
// budget. Larger tiles make fewer, larger GEMMs, which run at a higher rate;
// the budget keeps the workspace below what a per-expert loop materialises.
// MARS_KERNELS_CPU_ROW_TILE overrides it (read per call, like
// MARS_KERNELS_CPU_PARTS and MARS_KERNELS_CPU_CHUNK_ROWS below, so tests can
// set them).
constexpr int64_t kWorkspaceBytes = int64_t{48} << 20;
constexpr int64_t kMinTile = 256, kMaxTile = 16384;

int64_t env_int(const char* name) {
  const char* env = std::getenv(name);
  const int64_t v = env ? std::atoll(env) : 0;
  return v > 0 ? v : int64_t{0};
}

// The parts below share the budget (each has its own buffers).
int64_t row_tile(const Shapes& sh, int64_t elem_bytes, int64_t parts) {
  const int64_t forced = env_int("MARS_KERNELS_CPU_ROW_TILE");
  if (forced > 0) return forced;
  const int64_t row_bytes = (2 * sh.D + 2 * sh.H + sh.H1) * elem_bytes;  // the backward's per-row buffers
  return std::clamp(kWorkspaceBytes / parts / std::max<int64_t>(row_bytes, 1), kMinTile, kMaxTile);
}

// The routing in expert order, gathered once per call (not per expert, where
// small ATen ops would cost more than the work): for the first `valid` sorted
// slots s, the token slot s reads (permutation[s] / k) and its gate weight.
struct SortedRouting {
  at::Tensor tokens;   // [valid] int64
  at::Tensor weights;  // [valid] in the weights' dtype (float32 / float64)
};

SortedRouting sort_routing(const at::Tensor& perm, const at::Tensor& weights, int64_t top_k, const int64_t* off,
                           int64_t E) {
  const int64_t valid = off[E];
  at::Tensor tokens = at::empty({valid}, perm.options());
  at::Tensor w = at::empty({valid}, weights.options());
  const int64_t* P = perm.const_data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "sort_routing", [&] {
    const scalar_t* W = weights.const_data_ptr<scalar_t>();
    scalar_t* out = w.data_ptr<scalar_t>();
    for (int64_t s = 0; s < valid; ++s) {
      tok[s] = P[s] / top_k;
      out[s] = W[P[s]];
    }
  });
  return {tokens, w};
}

// How the work is shared between threads: the sorted rows are processed in
// chunks of whole experts (below), and each chunk's rows are cut into one
// contiguous range per thread ("part") of equal size; each part runs its
// experts' rows with single-threaded GEMMs: a fork/join per chunk instead of
// one per GEMM and row pass, and a load that stays balanced however skewed the
// routing is. Each expert's rows are one contiguous slice, so a part's GEMMs
// take all of an expert's rows at once (up to the row tile) and the weights
// are packed once per expert and part; only an expert that straddles a part
// boundary is cut in two. The weight gradients of such an expert are the
// owner's (the part holding its first row) plus one partial per later part,
// added in part order.
// MARS_KERNELS_CPU_PARTS=N forces N parts (any N >= 1; N = 1: ATen shares
// each GEMM and row pass between the threads instead).
int64_t num_parts(int64_t valid) {
  const int64_t forced = env_int("MARS_KERNELS_CPU_PARTS");
  if (forced > 0) return std::max<int64_t>(1, std::min(forced, valid));
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), valid));
}

// Runs f(p) for each part p, one part per thread. The workers take the
// caller's thread-local state (grad mode, dispatch exclusions), or ATen calls
// on them would see autograd and refuse the out= GEMMs on parameters.
template <typename F>
void for_each_part(int64_t parts, const F& f) {
  if (parts == 1) return f(0);
  const at::ThreadLocalState caller;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    at::ThreadLocalStateGuard guard(caller);
    for (int64_t p = p0; p < p1; ++p) f(p);
  });
}

// Calls f(e, lo, hi) for each expert e with rows [lo, hi) in part p's share
// [r0 + n * p / parts, r0 + n * (p + 1) / parts) of the rows [r0, r0 + n), in
// expert order.
template <typename F>
void for_each_segment(const int64_t* off, int64_t E, int64_t r0, int64_t n, int64_t p, int64_t parts, const F& f) {
  const int64_t b0 = r0 + n * p / parts, b1 = r0 + n * (p + 1) / parts;
  const int64_t first = std::upper_bound(off, off + E + 1, b0) - off - 1;  // the expert holding row b0
  for (int64_t e = std::max<int64_t>(first, 0); e < E && off[e] < b1; ++e) {
    const int64_t lo = std::max(off[e], b0), hi = std::min(off[e + 1], b1);
    if (lo < hi) f(e, lo, hi);
  }
}

// The expert outputs (forward) and input gradients (backward) of the sorted
// rows are written chunk by chunk into a buffer that is reused, and each chunk
// is added into the token-order result right away: the buffer stays small and
// warm instead of holding all T*k rows (k times the output). Chunks are whole
// experts, up to kChunkBytes of rows (an expert larger than that is cut into
// chunks of its own). MARS_KERNELS_CPU_CHUNK_ROWS overrides the rows per chunk.
constexpr int64_t kChunkBytes = int64_t{16} << 20;

// [begin, end) row ranges of the chunks over the sorted rows [0, off[E]).
std::vector<std::pair<int64_t, int64_t>> row_chunks(const int64_t* off, int64_t E, int64_t row_bytes) {
  const int64_t forced = env_int("MARS_KERNELS_CPU_CHUNK_ROWS");
  const int64_t budget = forced > 0 ? forced : std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(row_bytes, 1));
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t begin = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (off[e + 1] - begin > budget && off[e] > begin) {  // close the chunk before expert e
      chunks.emplace_back(begin, off[e]);
      begin = off[e];
    }
    while (off[e + 1] - begin > budget) {  // expert e alone is larger than a chunk
      chunks.emplace_back(begin, begin + budget);
      begin += budget;
    }
  }
  if (off[E] > begin) chunks.emplace_back(begin, off[E]);
  return chunks;
}

// The number of rows of the largest chunk.
inline int64_t largest_chunk(const std::vector<std::pair<int64_t, int64_t>>& chunks) {
  int64_t most = 0;
  for (const auto& [b, e] : chunks) most = std::max(most, e - b);
  return most;
}

// Columns per task of the column-split row passes: at least 64, and enough
// that a task covers ~16K elements of the n rows, so a handful of rows (decode:
// one token per expert) runs inline instead of paying a fork/join per pass.
inline int64_t column_grain(int64_t n) {
  return std::max<int64_t>(64, (int64_t{16384} + n - 1) / std::max<int64_t>(n, 1));
}

// Each token's sorted rows, ascending: [T, k] int64, row s of the sorted
// order for the token's slots that reached an expert, then -1s. The combines
// below walk it so that every token sums its rows in sorted (expert) order
// whichever chunk holds them: deterministic, independent of the thread count.
at::Tensor token_rows(const at::Tensor& perm, int64_t valid, int64_t T, int64_t top_k) {
  at::Tensor rows = at::full({T, top_k}, -1, perm.options());
  const int64_t* P = perm.const_data_ptr<int64_t>();
  int64_t* R = rows.data_ptr<int64_t>();
  for (int64_t s = 0; s < valid; ++s) R[P[s]] = s;
  for (int64_t t = 0; t < T; ++t) {  // k is small: an insertion sort, -1s last
    int64_t* r = R + t * top_k;
    for (int64_t j = 1; j < top_k; ++j) {
      const int64_t v = r[j];
      int64_t i = j;
      for (; i > 0 && (r[i - 1] < 0 || (v >= 0 && r[i - 1] > v)); --i) r[i] = r[i - 1];
      r[i] = v;
    }
  }
  return rows;
}

// The token-order combine of the chunk of sorted rows [c0, c1): for each token
// t, its rows s in the chunk (ascending) are summed in acc_t onto what the
// earlier chunks left in acc[t] (none for the first chunk: `from_acc` false):
//   sum = acc[t] + sum_s scale[s] * (rows[s - c0] + bias[expert of s])
// with scale ([valid], acc dtype) and bias ([E, D]) optional; the last chunk
// writes sum to out[t] in out's dtype (one rounding, no float32 copy of the
// result), the others to acc[t]. Threads split the tokens: each writes whole
// rows of its own, and reads whole rows.
void combine_rows(at::Tensor& out, const at::Tensor& acc, const at::Tensor& rows, const at::Tensor& by_token,
                  int64_t c0, int64_t c1, bool from_acc, bool last, const int64_t* off, int64_t E,
                  const at::Tensor& scale, const c10::optional<at::Tensor>& bias = c10::nullopt) {
  const int64_t T = by_token.size(0), k = by_token.size(1), D = out.size(1);
  const int64_t* TR = by_token.const_data_ptr<int64_t>();
  constexpr int64_t kBlock = 512;  // columns summed in registers / L1 at a time
  dispatch_float_types(rows, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    const scalar_t* R = rows.const_data_ptr<scalar_t>();
    const scalar_t* B = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* W = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
    scalar_t* O = last ? out.data_ptr<scalar_t>() : nullptr;
    acc_t* A = acc.defined() ? acc.data_ptr<acc_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, int64_t{16384} / std::max<int64_t>(k * D, 1));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      acc_t buf[kBlock];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t* s_of = TR + t * k;
        int64_t j0 = 0, j1 = 0;  // the token's rows in this chunk: s_of[j0 .. j1)
        while (j0 < k && s_of[j0] >= 0 && s_of[j0] < c0) ++j0;
        for (j1 = j0; j1 < k && s_of[j1] >= 0 && s_of[j1] < c1;) ++j1;
        if (j0 == j1 && !last && from_acc) continue;  // nothing to add
        for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
          const int64_t m = std::min(kBlock, D - d0);
          if (from_acc) {
            const acc_t* a = A + t * D + d0;
#pragma omp simd
            for (int64_t d = 0; d < m; ++d) buf[d] = a[d];
          } else {
#pragma omp simd
            for (int64_t d = 0; d < m; ++d) buf[d] = acc_t(0);
          }
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t s = s_of[j];
            const scalar_t* r = R + (s - c0) * D + d0;
            const acc_t w = W ? W[s] : acc_t(1);
            if (B) {
              const int64_t e = std::upper_bound(off, off + E + 1, s) - off - 1;
              const scalar_t* b = B + e * D + d0;
#pragma omp simd
              for (int64_t d = 0; d < m; ++d) buf[d] += w * (ld<acc_t>(r[d]) + ld<acc_t>(b[d]));
            } else if (W) {
#pragma omp simd
              for (int64_t d = 0; d < m; ++d) buf[d] += w * ld<acc_t>(r[d]);
            } else {
#pragma omp simd
              for (int64_t d = 0; d < m; ++d) buf[d] += ld<acc_t>(r[d]);
            }
          }
          if (last) {
            scalar_t* o = O + t * D + d0;
#pragma omp simd
            for (int64_t d = 0; d < m; ++d) o[d] = st<scalar_t>(buf[d]);
          } else {
            acc_t* a = A + t * D + d0;
#pragma omp simd
            for (int64_t d = 0; d < m; ++d) a[d] = buf[d];
          }
        }
      }
    });
  });
}

void check_routing(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& permutation, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == x.size(0) && weights.size(1) == top_k &&
                  weights.scalar_type() == routing_dtype(x) && weights.is_contiguous(),
              "weights must be a contiguous [T, k] ", routing_dtype(x), " tensor, got ", weights.scalar_type(), " ",
              weights.sizes());
  check_slots(permutation, x.size(0) * top_k, "permutation");
}

// The row-block fields of the metadata (inverse, block_expert, block_start,
// block_size) are for the row-block kernels of the Triton/GPU path; these
// kernels walk each expert's sorted slots instead.
std::tuple<at::Tensor, at::Tensor> moe_mlp_fwd(const at::Tensor& x, const at::Tensor& weights,
                                               const at::Tensor& permutation, const at::Tensor& /*inverse*/,
                                               const at::Tensor& offsets, const at::Tensor& /*block_expert*/,
                                               const at::Tensor& /*block_start*/, int64_t top_k,
                                               int64_t /*block_size*/, const at::Tensor& w1,
                                               const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                               const c10::optional<at::Tensor>& b2, std::string activation,
                                               bool save_h) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const Shapes sh = check_expert_shapes(x, "x", offsets, w1, w2, act, top_k);
  check_routing(x, weights, permutation, top_k);
  const int64_t T = x.size(0), S = T * top_k;
  const at::Tensor offs = offsets.contiguous(), perm = permutation.contiguous();
  const int64_t* off = offs.const_data_ptr<int64_t>();
  const int64_t valid = off[sh.E];
  const SortedRouting route = sort_routing(perm, weights, top_k, off, sh.E);
  const int64_t parts = num_parts(valid);
  const auto chunks = row_chunks(off, sh.E, sh.D * x.element_size());
  const int64_t tile = std::max<int64_t>(
      1, std::min({largest_expert(off, sh.E), largest_chunk(chunks), row_tile(sh, x.element_size(), parts)}));
  const auto opts = x.options();
  at::Tensor h = save_h ? at::empty({S, sh.H1}, opts) : at::empty({parts, tile, sh.H1}, opts);
  if (save_h) h.narrow(0, valid, S - valid).zero_();
  at::Tensor xg = at::empty({parts, tile, sh.D}, opts), a = at::empty({parts, tile, sh.H}, opts);
  at::Tensor ys = at::empty({largest_chunk(chunks), sh.D}, opts);  // a chunk's expert outputs, without b2
  // The result, and (more than one chunk) the sums of the chunks so far in the math dtype.
  at::Tensor y = at::empty({T, sh.D}, opts);
  const auto acc_type = routing_dtype(x);
  const at::Tensor acc = chunks.size() < 2 ? at::Tensor()
                         : acc_type == x.scalar_type() ? y : at::empty({T, sh.D}, opts.dtype(acc_type));
  const at::Tensor by_token = token_rows(perm, valid, T, top_k);
  for (size_t c = 0; c < std::max<size_t>(chunks.size(), 1); ++c) {
    const auto [c0, c1] = c < chunks.size() ? chunks[c] : std::pair<int64_t, int64_t>(0, 0);
    for_each_part(parts, [&](int64_t p) {
      for_each_segment(off, sh.E, c0, c1 - c0, p, parts, [&](int64_t e, int64_t lo, int64_t hi) {
        for (int64_t r0 = lo; r0 < hi; r0 += tile) {
          const int64_t n = std::min(tile, hi - r0);
          at::Tensor xe = xg[p].narrow(0, 0, n), he = save_h ? h.narrow(0, r0, n) : h[p].narrow(0, 0, n);
          at::Tensor ae = a[p].narrow(0, 0, n), y_e = ys.narrow(0, r0 - c0, n);
          {
            MK_PHASE("fwd.gather_x");
            gather_rows(x, route.tokens.narrow(0, r0, n), xe);
          }
          {
            MK_PHASE("fwd.gemm_h=xW1");
            expert_mm_out(he, xe, w1[e]);
          }
          {
            MK_PHASE("fwd.activation");
            bias_activation_rows(act, he, expert_bias(b1, e), ae);
          }
          {
            MK_PHASE("fwd.gemm_y=aW2");
            expert_mm_out(y_e, ae, w2[e]);
          }
        }
      });
    });
    MK_PHASE("fwd.combine");
    combine_rows(y, acc, ys, by_token, c0, c1, c > 0, c + 1 >= chunks.size(), off, sh.E, route.weights, b2);
  }
  MK_PHASE_REPORT();
  return {y, save_h ? h : at::empty({0, sh.H1}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& permutation,
    const at::Tensor& /*inverse*/, const at::Tensor& offsets, const at::Tensor& /*block_expert*/,
    const at::Tensor& /*block_start*/, int64_t top_k, int64_t /*block_size*/, const at::Tensor& w1,
    const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& h, std::string activation) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const Shapes sh = check_expert_shapes(x, "x", offsets, w1, w2, act, top_k);
  check_routing(x, weights, permutation, top_k);
  const int64_t T = x.size(0);
  TORCH_CHECK(h.size(0) == T * top_k && h.size(1) == sh.H1, "h must be the [S, H1] tensor saved by moe_mlp_fwd");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y must have x's shape ", x.sizes(), ", got ", grad_y.sizes());
  const at::Tensor dy = grad_y.contiguous(), offs = offsets.contiguous(), perm = permutation.contiguous();
  const int64_t* off = offs.const_data_ptr<int64_t>();
  const int64_t valid = off[sh.E];
  const SortedRouting route = sort_routing(perm, weights, top_k, off, sh.E);
  const int64_t parts = num_parts(valid);
  const auto chunks = row_chunks(off, sh.E, sh.D * x.element_size());
  const int64_t tile = std::max<int64_t>(
      1, std::min({largest_expert(off, sh.E), largest_chunk(chunks), row_tile(sh, x.element_size(), parts)}));
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(routing_dtype(x));
  // The part holding an expert's first row writes its weight gradients; a part
  // whose first segment continues an expert begun before its rows (by an
  // earlier part, or an earlier chunk) writes that expert's partial [p],
  // added after the chunk in part order. The first row tile of a segment
  // overwrites, later ones add.
  at::Tensor dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  at::Tensor db1 = at::empty({sh.E, sh.H1}, w1.options()), db2 = at::empty({sh.E, sh.D}, w2.options());
  std::vector<at::Tensor> part_w1(parts), part_w2(parts), part_b1(parts), part_b2(parts);
  std::vector<int64_t> continued(parts, -1);  // per chunk: the expert part p continues, or -1
  // With bfloat16 / half the GEMM library runs a weight-gradient GEMM about
  // twice as fast when its first operand and its output are both row-major (no
  // transposed view for it to copy), so the tile's rows are transposed here,
  // in cache, and the product is taken in whichever orientation writes the
  // gradient in the weights' own layout: dW = X^T Y, or dW^T = Y^T X for
  // weights stored transposed (HF's [E, out, in]).
  const bool low_precision = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool w1_rows = w1.stride(2) == 1, w1_cols = w1.stride(1) == 1 && !w1_rows;
  const bool w2_rows = w2.stride(2) == 1, w2_cols = w2.stride(1) == 1 && !w2_rows;
  const int64_t t_cols = low_precision ? std::max({sh.D, sh.H, sh.H1}) : 0;
  at::Tensor dg = at::empty({parts, tile, sh.D}, opts), xg = at::empty({parts, tile, sh.D}, opts);
  at::Tensor a = at::empty({parts, tile, sh.H}, opts), G = at::empty({parts, tile, sh.H}, opts);
  at::Tensor dh = at::empty({parts, tile, sh.H1}, opts), tr = at::empty({parts, t_cols * tile}, opts);
  at::Tensor dxs = at::empty({largest_chunk(chunks), sh.D}, opts);  // a chunk's input gradients
  // dx, and (more than one chunk) the sums of the chunks so far in the math dtype.
  at::Tensor dx = at::empty({T, sh.D}, opts);
  const at::Tensor dx_acc = chunks.size() < 2 ? at::Tensor()
                            : acc_opts.dtype() == opts.dtype() ? dx : at::empty({T, sh.D}, acc_opts);
  const at::Tensor by_token = token_rows(perm, valid, T, top_k);
  // d weight of each sorted slot = <grad_y[t], act(h) W2 + b2> = <G, act(h)> + <grad_y[t], b2>.
  at::Tensor dots = at::empty({valid}, acc_opts), bias_dots = at::zeros({valid}, acc_opts);
  for (size_t c = 0; c < std::max<size_t>(chunks.size(), 1); ++c) {
    const auto [c0, c1] = c < chunks.size() ? chunks[c] : std::pair<int64_t, int64_t>(0, 0);
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t b0 = c0 + (c1 - c0) * p / parts;
      const int64_t e = std::upper_bound(off, off + sh.E + 1, b0) - off - 1;
      continued[p] = b0 < c0 + (c1 - c0) * (p + 1) / parts && off[e] < b0 ? e : -1;
      if (continued[p] >= 0 && !part_w1[p].defined()) {
        part_w1[p] = at::empty_like(w1[0]), part_w2[p] = at::empty_like(w2[0]);
        part_b1[p] = at::empty({sh.H1}, w1.options()), part_b2[p] = at::empty({sh.D}, w2.options());
      }
    }
    for_each_part(parts, [&](int64_t p) {
      for_each_segment(off, sh.E, c0, c1 - c0, p, parts, [&](int64_t e, int64_t lo, int64_t hi) {
        const bool own = lo == off[e];
        at::Tensor dw2e = own ? dw2[e] : part_w2[p], db2e = own ? db2[e] : part_b2[p];
        at::Tensor dw1e = own ? dw1[e] : part_w1[p], db1e = own ? db1[e] : part_b1[p];
        for (int64_t r0 = lo; r0 < hi; r0 += tile) {
          const int64_t n = std::min(tile, hi - r0);
          const bool first = r0 == lo;
          const at::Tensor tokens = route.tokens.narrow(0, r0, n), w_rows = route.weights.narrow(0, r0, n);
          const at::Tensor he = h.narrow(0, r0, n);
          at::Tensor xe = xg[p].narrow(0, 0, n), dge = dg[p].narrow(0, 0, n), ae = a[p].narrow(0, 0, n);
          at::Tensor Ge = G[p].narrow(0, 0, n), dhe = dh[p].narrow(0, 0, n);
          at::Tensor dots_e = dots.narrow(0, r0, n), bd = bias_dots.narrow(0, r0, n);
          // The weight gradients, summed over a segment's row tiles in tile order (deterministic):
          // dst (+)= lhs @ rhs.
          auto wgrad = [&](at::Tensor dst, const at::Tensor& lhs, const at::Tensor& rhs) {
            if (first) at::mm_out(dst, lhs, rhs);
            else dst.addmm_(lhs, rhs);
          };
          // rows^T as a row-major [m, n] view of this part's transpose buffer.
          auto transposed = [&](const at::Tensor& rows) {
            at::Tensor t = tr[p].narrow(0, 0, rows.size(1) * n).view({rows.size(1), n});
            MK_PHASE("bwd.transpose");
            transpose(rows, t);
            return t;
          };
          {
            MK_PHASE("bwd.gather_dy");
            gather_rows(dy, tokens, dge, expert_bias(b2, e), &bd);
          }
          {
            MK_PHASE("bwd.gemm_G=dyW2^T");
            at::mm_out(Ge, dge, w2[e].t());
          }
          {
            MK_PHASE("bwd.activation_grad");
            activation_grad_rows(act, he, Ge, w_rows, ae, dhe, &dots_e);  // ae = w act(h), dhe = d h
          }
          if (b2.has_value()) {
            MK_PHASE("bwd.db2");
            weighted_column_sums(dge, w_rows, db2e, !first);
          }
          {  // dW2 = (w act(h))^T dy
            auto [dst, lhs, rhs] = low_precision && w2_cols ? std::tuple(dw2e.t(), transposed(dge), ae)
                                   : low_precision && w2_rows ? std::tuple(dw2e, transposed(ae), dge)
                                                              : std::tuple(dw2e, ae.t(), dge);
            MK_PHASE("bwd.gemm_dW2=a^Tdy");
            wgrad(dst, lhs, rhs);
          }
          {
            MK_PHASE("bwd.gather_x");
            gather_rows(x, tokens, xe);
          }
          {  // dW1 = x^T dh
            auto [dst, lhs, rhs] = low_precision && w1_cols ? std::tuple(dw1e.t(), transposed(dhe), xe)
                                   : low_precision && w1_rows ? std::tuple(dw1e, transposed(xe), dhe)
                                                              : std::tuple(dw1e, xe.t(), dhe);
            MK_PHASE("bwd.gemm_dW1=x^Tdh");
            wgrad(dst, lhs, rhs);
          }
          {
            MK_PHASE("bwd.db1");
            if (first) at::sum_out(db1e, dhe, {0});
            else db1e.add_(dhe.sum(0));
          }
          {
            MK_PHASE("bwd.gemm_dX=dhW1^T");
            at::Tensor dxe = dxs.narrow(0, r0 - c0, n);
            at::mm_out(dxe, dhe, w1[e].t());
          }
        }
      });
    });
    {
      MK_PHASE("bwd.partials_combine_dx");
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t e = continued[p];
        if (e < 0) continue;
        dw1[e].add_(part_w1[p]);
        dw2[e].add_(part_w2[p]);
        db1[e].add_(part_b1[p]);
        if (b2.has_value()) db2[e].add_(part_b2[p]);
      }
      combine_rows(dx, dx_acc, dxs, by_token, c0, c1, c > 0, c + 1 >= chunks.size(), off, sh.E, at::Tensor());
    }
  }
  at::Tensor grad_w = at::zeros({T, top_k}, acc_opts);
  {
    MK_PHASE("bwd.grad_w_dx");
    if (!b2.has_value()) db2.zero_();  // not computed: the caller has no b2
    for (int64_t e = 0; e < sh.E; ++e)
      if (off[e] == off[e + 1])
        for (at::Tensor t : {dw1[e], dw2[e], db1[e], db2[e]}) t.zero_();
    AT_DISPATCH_FLOATING_TYPES(grad_w.scalar_type(), "moe_mlp_bwd_grad_w", [&] {
      const int64_t* P = perm.const_data_ptr<int64_t>();
      const scalar_t *Dt = dots.const_data_ptr<scalar_t>(), *Bd = bias_dots.const_data_ptr<scalar_t>();
      scalar_t* GW = grad_w.data_ptr<scalar_t>();
      for (int64_t s = 0; s < valid; ++s) GW[P[s]] = Dt[s] + Bd[s];
    });
  }
  MK_PHASE_REPORT();
  return {dx, grad_w, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("grouped_mlp_fwd", &grouped_mlp_fwd);
  m.impl("grouped_mlp_bwd", &grouped_mlp_bwd);
  m.impl("moe_mlp_fwd", &moe_mlp_fwd);
  m.impl("moe_mlp_bwd", &moe_mlp_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
