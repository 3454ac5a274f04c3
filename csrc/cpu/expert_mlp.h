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

#include <string>

#include "activation_math.h"
#include "cpu_common.h"

namespace mars_kernels {
namespace cpu {

enum class Act { Gelu, Silu, SwiGLU };

inline Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "silu") return Act::Silu;
  if (name == "swiglu") return Act::SwiGLU;
  TORCH_CHECK(false, "activation must be 'gelu', 'silu' or 'swiglu', got '", name, "'");
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
inline void bias_activation_rows(Act act, at::Tensor& h, const c10::optional<at::Tensor>& bias, at::Tensor& a) {
  const int64_t n = h.size(0), H1 = h.size(1), H = a.size(1);
  dispatch_float_types(h, [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    scalar_t* Hp = h.data_ptr<scalar_t>();
    scalar_t* Ap = a.data_ptr<scalar_t>();
    const scalar_t* B = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* hr = Hp + i * H1;
        scalar_t* ar = Ap + i * H;
        if (B)  // h is stored rounded to scalar_t, and the activation reads it so, as the backward will
          for (int64_t j = 0; j < H1; ++j)
            hr[j] = static_cast<scalar_t>(static_cast<acc_t>(hr[j]) + static_cast<acc_t>(B[j]));
        switch (act) {
          case Act::Gelu:
            for (int64_t j = 0; j < H; ++j) ar[j] = static_cast<scalar_t>(gelu<acc_t>(static_cast<acc_t>(hr[j])));
            break;
          case Act::Silu:
            for (int64_t j = 0; j < H; ++j) ar[j] = static_cast<scalar_t>(silu<acc_t>(static_cast<acc_t>(hr[j])));
            break;
          case Act::SwiGLU:
            for (int64_t j = 0; j < H; ++j)
              ar[j] = static_cast<scalar_t>(silu<acc_t>(static_cast<acc_t>(hr[j])) * static_cast<acc_t>(hr[H + j]));
            break;
        }
      }
    });
  });
}

// The backward through a = act(h), one pass per row, given G = dy W2^T [n, H]
// and the rows' gate weights w ([n], acc dtype; undefined: 1):
//   a [n, H]   = act(h)              (recomputed rather than saved)
//   dh [n, H1] = w * act'(h) * G     (the gradient at the first GEMM's output)
//   dots [n]   = <G, act(h)>         (acc dtype, optional: d loss / d w)
inline void activation_grad_rows(Act act, const at::Tensor& h, const at::Tensor& G, const at::Tensor& w,
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
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* hr = Hp + i * H1;
        const scalar_t* g = Gp + i * H;
        scalar_t* a = AO + i * H;
        scalar_t* d = DH + i * H1;
        const acc_t wi = W ? W[i] : acc_t(1);
        // One vectorised pass; `both` gives act(x) and act'(x).
        auto unary = [&](auto both) {
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < H; ++j) {
            acc_t v, dv;
            both(static_cast<acc_t>(hr[j]), v, dv);
            const acc_t gj = static_cast<acc_t>(g[j]);
            s += gj * v;
            a[j] = static_cast<scalar_t>(v);
            d[j] = static_cast<scalar_t>(wi * dv * gj);
          }
          return s;
        };
        acc_t s = 0;
        switch (act) {
          case Act::Gelu:
            s = unary([](acc_t x, acc_t& v, acc_t& dv) { gelu_and_grad<acc_t>(x, v, dv); });
            break;
          case Act::Silu:
            s = unary([](acc_t x, acc_t& v, acc_t& dv) { silu_and_grad<acc_t>(x, v, dv); });
            break;
          case Act::SwiGLU:
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < H; ++j) {
              acc_t sg, dsg;
              silu_and_grad<acc_t>(static_cast<acc_t>(hr[j]), sg, dsg);
              const acc_t up = static_cast<acc_t>(hr[H + j]), gj = static_cast<acc_t>(g[j]);
              s += gj * sg * up;
              a[j] = static_cast<scalar_t>(sg * up);
              d[j] = static_cast<scalar_t>(wi * gj * up * dsg);  // d gate
              d[H + j] = static_cast<scalar_t>(wi * gj * sg);     // d up
            }
            break;
        }
        if (D) D[i] = s;
      }
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
                                  const at::Tensor& w1, const at::Tensor& w2, Act act, int64_t rows_per_x = 1) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), x_name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "w1 must be [E, D, H1] and w2 [E, H, D]");
  const int64_t E = w1.size(0), D = x.size(1), H1 = w1.size(2), H = w2.size(1);
  TORCH_CHECK(w1.size(1) == D && w2.size(0) == E && w2.size(2) == D, "w1 must be [E, D=", D, ", H1] and w2 [E, H, D=", D,
              "], got ", w1.sizes(), " and ", w2.sizes());
  TORCH_CHECK(H1 == (act == Act::SwiGLU ? 2 * H : H), "w1's last dim must be ", act == Act::SwiGLU ? "2H" : "H",
              " = ", act == Act::SwiGLU ? 2 * H : H, " for this activation, got ", H1);
  check_offsets(offsets, E, x.size(0) * rows_per_x);
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "w1 and w2 must have ", x_name, "'s dtype ", x.scalar_type());
  return {x.size(0), D, E, H1, H};
}


}  // namespace cpu
}  // namespace mars_kernels
