// CPU grouped expert MLP: per-expert ATen GEMMs (MKL/oneDNN) on each expert's
// contiguous rows of the expert-sorted activations, with the bias and the
// activation (and its backward) in one pass over each GEMM's output rows.
// Contract beside the schema in mars_kernels/ops/expert_mlp.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "expert_mlp.h"

namespace mars_kernels {
namespace cpu {
namespace {

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

}  // namespace

TORCH_LIBRARY_IMPL(mars_kernels, CPU, m) {
  m.impl("grouped_mlp_fwd", &grouped_mlp_fwd);
  m.impl("grouped_mlp_bwd", &grouped_mlp_bwd);
}

}  // namespace cpu
}  // namespace mars_kernels
