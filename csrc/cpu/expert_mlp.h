// Shared by the CPU expert-MLP ops (grouped_mlp.cpp, moe_mlp.cpp): the
// activations and their backward on ATen tensors, and the weight-shape checks.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mars_kernels {
namespace cpu {

enum class Act { Gelu, Silu, SwiGLU };

inline Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "silu") return Act::Silu;
  if (name == "swiglu") return Act::SwiGLU;
  TORCH_CHECK(false, "activation must be 'gelu', 'silu' or 'swiglu', got '", name, "'");
}

// a = act(h): h [n, H1] -> a [n, H] (out).
inline void activation_out(Act act, const at::Tensor& h, at::Tensor& a) {
  switch (act) {
    case Act::Gelu: at::gelu_out(a, h); break;
    case Act::Silu: at::silu_out(a, h); break;
    case Act::SwiGLU: {
      const int64_t H = a.size(1);
      at::silu_out(a, h.narrow(1, 0, H));
      a.mul_(h.narrow(1, H, H));
      break;
    }
  }
}

// dh = d act(h) given da [n, H]; dh [n, H1] (out).
inline void activation_backward_out(Act act, const at::Tensor& da, const at::Tensor& h, at::Tensor& dh) {
  switch (act) {
    case Act::Gelu: at::gelu_backward_out(dh, da, h); break;
    case Act::Silu: at::silu_backward_out(dh, da, h); break;
    case Act::SwiGLU: {
      const int64_t H = da.size(1);
      const at::Tensor gate = h.narrow(1, 0, H), up = h.narrow(1, H, H);
      at::Tensor d_gate = dh.narrow(1, 0, H), d_up = dh.narrow(1, H, H);
      at::silu_out(d_up, gate);
      d_up.mul_(da);                                        // d up = da * silu(gate)
      at::silu_backward_out(d_gate, da * up, gate);         // d gate = da * up * silu'(gate)
      break;
    }
  }
}

struct Shapes {
  int64_t S, D, E, H1, H;
};

inline Shapes check_expert_shapes(const at::Tensor& x, const char* x_name, const at::Tensor& offsets,
                                  const at::Tensor& w1, const at::Tensor& w2, Act act) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), x_name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "w1 must be [E, D, H1] and w2 [E, H, D]");
  const int64_t E = w1.size(0), D = x.size(1), H1 = w1.size(2), H = w2.size(1);
  TORCH_CHECK(w1.size(1) == D && w2.size(0) == E && w2.size(2) == D, "w1 must be [E, D=", D, ", H1] and w2 [E, H, D=", D,
              "], got ", w1.sizes(), " and ", w2.sizes());
  TORCH_CHECK(H1 == (act == Act::SwiGLU ? 2 * H : H), "w1's last dim must be ", act == Act::SwiGLU ? "2H" : "H",
              " = ", act == Act::SwiGLU ? 2 * H : H, " for this activation, got ", H1);
  TORCH_CHECK(offsets.numel() == E + 1 && offsets.scalar_type() == at::kLong, "offsets must be int64 [E+1]");
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "w1 and w2 must have ", x_name, "'s dtype ", x.scalar_type());
  return {x.size(0), D, E, H1, H};
}


}  // namespace cpu
}  // namespace mars_kernels
