// CPU implementation and schemas of the tensor-product ops (torch.ops.equikern.tensor_product*).
//
// weighted_only=True evaluates only the weighted paths: the derivative of the product in the
// direction of the weights, which the double backward needs (unweighted paths do not depend on
// the weights).
//
// The plan tensors (paths, blocks, cg_ijk, cg_val) come from equikern.nn.tensor_product; they are
// validated here in full, so no input can make the kernels index out of bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tensor_product_plan.h"

namespace equikern {
namespace {

// Number of batch chunks: fixed (not tied to the thread count) so that reductions over the batch
// (gradients of shared operands) sum in the same order on every machine.
constexpr int64_t kMaxChunks = 64;

at::Tensor tp_forward_cpu(const at::Tensor& x1_, const at::Tensor& x2_, const at::Tensor& w_,
                          const at::Tensor& paths, const at::Tensor& blocks,
                          const at::Tensor& cg_ijk, const at::Tensor& cg_val, int64_t out_dim,
                          bool weighted_only) {
  const int64_t z = check_operands(x1_, x2_, w_, nullptr);
  TORCH_CHECK(out_dim >= 0, "tensor_product: out_dim must be >= 0");
  auto x1 = x1_.contiguous(), x2 = x2_.contiguous(), w = w_.contiguous();
  auto out = at::empty({z, out_dim}, x1.options());  // every row is written in full
  if (z == 0 || out_dim == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "tensor_product_fwd", [&] {
    using T = scalar_t;
    const auto plan_ptr = cached_plan<T>(paths, blocks, cg_ijk, cg_val, x1.size(1), x2.size(1),
                                         out_dim, w.size(1), weighted_only);
    const Plan<T>& plan = *plan_ptr;
    const T* p1 = x1.data_ptr<T>();
    const T* p2 = x2.data_ptr<T>();
    const T* pw = w.data_ptr<T>();
    T* po = out.data_ptr<T>();
    const int64_t s1 = x1.size(0) == 1 ? 0 : x1.size(1);
    const int64_t s2 = x2.size(0) == 1 ? 0 : x2.size(1);
    const int64_t sw = w.size(0) == 1 ? 0 : w.size(1);
    at::parallel_for(0, z, 16, [&](int64_t begin, int64_t end) {
      tp::Scratch<T> scratch(plan);
      for (int64_t b = begin; b < end; ++b) {
        if (b + 1 < end) {
          tp::prefetch(p1 + (b + 1) * s1, x1.size(1));
          tp::prefetch(p2 + (b + 1) * s2, x2.size(1));
          tp::prefetch(pw + (b + 1) * sw, w.size(1));
        }
        tp::forward_sample(plan, p1 + b * s1, p2 + b * s2, pw + b * sw, po + b * out_dim, scratch);
      }
      tp::stream_fence();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tp_backward_cpu(
    const at::Tensor& gout_, const at::Tensor& x1_, const at::Tensor& x2_, const at::Tensor& w_,
    const at::Tensor& paths, const at::Tensor& blocks, const at::Tensor& cg_ijk,
    const at::Tensor& cg_val, bool weighted_only) {
  const int64_t z = check_operands(x1_, x2_, w_, &gout_);
  auto x1 = x1_.contiguous(), x2 = x2_.contiguous(), w = w_.contiguous(), gout = gout_.contiguous();
  // Rows of batched gradients are written by their own sample (backward_sample zeroes what it
  // needs to, while the rows are in cache); broadcast operands are reduced from per-chunk partial
  // sums below.
  auto g1 = at::empty_like(x1), g2 = at::empty_like(x2), gw = at::empty_like(w);
  if (z == 0) return {g1.zero_(), g2.zero_(), gw.zero_()};
  const int64_t out_dim = gout.size(1);
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "tensor_product_bwd", [&] {
    using T = scalar_t;
    const auto plan_ptr = cached_plan<T>(paths, blocks, cg_ijk, cg_val, x1.size(1), x2.size(1),
                                         out_dim, w.size(1), weighted_only);
    const Plan<T>& plan = *plan_ptr;
    const bool b1 = x1.size(0) == 1 && z > 1, b2 = x2.size(0) == 1 && z > 1,
               bw = w.size(0) == 1 && z > 1;
    const int64_t d1 = x1.size(1), d2 = x2.size(1), dw = w.size(1);
    const int64_t chunks = std::min(z, kMaxChunks);
    // Broadcast operands get one partial sum per chunk, reduced in chunk order below.
    std::vector<T> part1(b1 ? chunks * d1 : 0), part2(b2 ? chunks * d2 : 0),
        partw(bw ? chunks * dw : 0);
    const T* p1 = x1.data_ptr<T>();
    const T* p2 = x2.data_ptr<T>();
    const T* pw = w.data_ptr<T>();
    const T* pg = gout.data_ptr<T>();
    T* q1 = g1.data_ptr<T>();
    T* q2 = g2.data_ptr<T>();
    T* qw = gw.data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
      tp::Scratch<T> scratch(plan);
      for (int64_t c = cbegin; c < cend; ++c) {
        const int64_t begin = z * c / chunks, end = z * (c + 1) / chunks;
        for (int64_t b = begin; b < end; ++b) {
          T* o1 = b1 ? part1.data() + c * d1 : q1 + b * d1;
          T* o2 = b2 ? part2.data() + c * d2 : q2 + b * d2;
          T* ow = bw ? partw.data() + c * dw : qw + b * dw;
          if (!b2) std::fill(o2, o2 + d2, T(0));
          if (b + 1 < end) {
            tp::prefetch(pg + (b + 1) * out_dim, out_dim);
            if (!b1) tp::prefetch(p1 + (b + 1) * d1, d1);
            if (!bw) tp::prefetch(pw + (b + 1) * dw, dw);
          }
          tp::backward_sample(plan, pg + b * out_dim, p1 + (b1 ? 0 : b * d1),
                              p2 + (b2 ? 0 : b * d2), pw + (bw ? 0 : b * dw), o1, o2, ow, scratch,
                              !b1, !bw);
        }
      }
    });
    auto reduce = [&](const std::vector<T>& part, T* dst, int64_t d) {
      std::fill(dst, dst + d, T(0));
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t i = 0; i < d; ++i) dst[i] += part[c * d + i];
    };
    if (b1) reduce(part1, q1, d1);
    if (b2) reduce(part2, q2, d2);
    if (bw) reduce(partw, qw, dw);
  });
  return {g1, g2, gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def(
      "tensor_product(Tensor x1, Tensor x2, Tensor weight, Tensor paths, Tensor blocks, "
      "Tensor cg_ijk, Tensor cg_val, int out_dim, bool weighted_only=False) -> Tensor");
  m.def(
      "tensor_product_backward(Tensor grad_out, Tensor x1, Tensor x2, Tensor weight, "
      "Tensor paths, Tensor blocks, Tensor cg_ijk, Tensor cg_val, bool weighted_only=False) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("tensor_product", &tp_forward_cpu);
  m.impl("tensor_product_backward", &tp_backward_cpu);
}

}  // namespace equikern
