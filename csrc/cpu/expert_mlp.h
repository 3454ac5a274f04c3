// Shared by the CPU expert-MLP ops (grouped_mlp.cpp, moe_mlp.cpp): the
// row gather, the activation passes fused around the GEMMs, and the weight-shape
// checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "activation_math.h"
#include "cpu_common.h"

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
  for (int64_t j = 0; j < m; ++j) s += static_cast<acc_t>(a[j]) * static_cast<acc_t>(b[j]);
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
              hr[j] = static_cast<scalar_t>(static_cast<acc_t>(hr[j]) + static_cast<acc_t>(B[j]));
          if constexpr (!gated) {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
              acc_t v, dv;
              act_and_grad<F, acc_t>(static_cast<acc_t>(hr[j]), alpha, v, dv);
              ar[j] = static_cast<scalar_t>(v);
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
              acc_t g = static_cast<acc_t>(hr[interleaved ? 2 * j : j]);
              acc_t u = static_cast<acc_t>(hr[interleaved ? 2 * j + 1 : H + j]);
              if constexpr (clamp) {
                g = std::min(g, limit);
                u = std::max(std::min(u, limit), -limit) + offset;
              }
              acc_t v, dv;
              act_and_grad<F, acc_t>(g, alpha, v, dv);
              ar[j] = static_cast<scalar_t>(v * u);
            }
          }
        }
      });
    });
  });
}

// The backward through a = act(h), one pass per row, given G = dy W2^T [n, H]
// and the rows' gate weights w ([n], acc dtype; undefined: 1):
//   a [n, H]   = act(h)              (recomputed rather than saved)
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
              act_and_grad<F, acc_t>(static_cast<acc_t>(hr[j]), alpha, v, dv);
              const acc_t gj = static_cast<acc_t>(g[j]);
              s += gj * v;
              a[j] = static_cast<scalar_t>(v);
              d[j] = static_cast<scalar_t>(wi * dv * gj);
            }
          } else {
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < H; ++j) {
              const int64_t gi = interleaved ? 2 * j : j, ui = interleaved ? 2 * j + 1 : H + j;
              acc_t gate = static_cast<acc_t>(hr[gi]), up = static_cast<acc_t>(hr[ui]);
              acc_t pass_gate = 1, pass_up = 1;
              if constexpr (clamp) {
                pass_gate = gate <= limit ? acc_t(1) : acc_t(0);
                pass_up = (up >= -limit && up <= limit) ? acc_t(1) : acc_t(0);
                gate = std::min(gate, limit);
                up = std::max(std::min(up, limit), -limit) + offset;
              }
              acc_t v, dv;
              act_and_grad<F, acc_t>(gate, alpha, v, dv);
              const acc_t gj = static_cast<acc_t>(g[j]);
              s += gj * v * up;
              a[j] = static_cast<scalar_t>(v * up);
              d[gi] = static_cast<scalar_t>(wi * gj * up * dv * pass_gate);  // d gate
              d[ui] = static_cast<scalar_t>(wi * gj * v * pass_up);          // d up
            }
          }
          if (D) D[i] = s;
        }
      });
    });
  });
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


}  // namespace cpu
}  // namespace mars_kernels
