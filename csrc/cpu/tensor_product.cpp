// CPU implementation and schemas of the tensor-product ops (torch.ops.equikern.tensor_product*).
//
// weighted_only=True evaluates only the weighted paths: the derivative of the product in the
// direction of the weights, which the double backward needs (unweighted paths do not depend on
// the weights).
//
// The plan tensors (paths, blocks, cg_ijk, cg_val) come from equikern.nn.tensor_product; they are
// validated here in full, so no input can make the kernels index out of bounds.
#include "kernels/tensor_product.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace equikern {
namespace {

using tp::Block;
using tp::Path;
using tp::Plan;

// Number of batch chunks: fixed (not tied to the thread count) so that reductions over the batch
// (gradients of shared operands) sum in the same order on every machine.
constexpr int64_t kMaxChunks = 64;

void check_plan_tensor(const at::Tensor& t, const char* name, int64_t cols, at::ScalarType dt) {
  TORCH_CHECK(t.device().is_cpu(), "tensor_product: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "tensor_product: ", name, " must have dtype ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(cols < 0 ? t.dim() == 1 : (t.dim() == 2 && t.size(1) == cols),
              "tensor_product: ", name, " has shape ", t.sizes(), ", expected [n, ", cols, "]");
}

template <class T>
Plan<T> make_plan(const at::Tensor& paths, const at::Tensor& blocks, const at::Tensor& cg_ijk,
                  const at::Tensor& cg_val, int64_t dim1, int64_t dim2, int64_t dim_out,
                  int64_t num_weights, bool weighted_only) {
  check_plan_tensor(paths, "paths", tp::kPathFields, at::kLong);
  check_plan_tensor(blocks, "blocks", tp::kBlockFields, at::kLong);
  check_plan_tensor(cg_ijk, "cg_ijk", 3, at::kInt);
  check_plan_tensor(cg_val, "cg_val", -1, at::kDouble);
  TORCH_CHECK(cg_val.size(0) == cg_ijk.size(0), "tensor_product: cg_val and cg_ijk lengths differ");
  Plan<T> plan;
  plan.dim1 = dim1;
  plan.dim2 = dim2;
  plan.dim_out = dim_out;
  plan.num_weights = num_weights;
  const int64_t dims[3] = {dim1, dim2, dim_out};
  auto pc = paths.contiguous();
  auto bc = blocks.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const int64_t* bp = bc.data_ptr<int64_t>();
  for (int64_t r = 0; r < bc.size(0); ++r) {
    const int64_t* q = bp + r * tp::kBlockFields;
    Block b{q[0], q[1], q[2], q[3]};
    TORCH_CHECK(b.operand >= 0 && b.operand < 3 && b.off >= 0 && b.mul >= 0 && b.dim >= 0 &&
                    b.off + b.mul * b.dim <= dims[b.operand],
                "tensor_product: block ", r, " is out of range of its operand");
    plan.blocks.push_back(b);
  }
  const int64_t nnz = cg_ijk.size(0);
  for (int64_t r = 0; r < pc.size(0); ++r) {
    const int64_t* q = pp + r * tp::kPathFields;
    Path p{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11], q[12]};
    TORCH_CHECK(p.mode >= 0 && p.mode < tp::kNumModes, "tensor_product: path ", r,
                " has an unknown mode ", p.mode);
    TORCH_CHECK(p.m1 >= 0 && p.m2 >= 0 && p.mo >= 0 && p.d1 > 0 && p.d2 > 0 && p.d3 > 0 &&
                    p.off1 >= 0 && p.off2 >= 0 && p.offo >= 0 && p.off1 + p.m1 * p.d1 <= dim1 &&
                    p.off2 + p.m2 * p.d2 <= dim2 && p.offo + p.mo * p.d3 <= dim_out,
                "tensor_product: path ", r, " is out of range of the operands");
    bool block_ok[3] = {false, false, false};
    for (const Block& b : plan.blocks) {
      block_ok[0] |= b.operand == 0 && b.off == p.off1 && b.mul == p.m1 && b.dim == p.d1;
      block_ok[1] |= b.operand == 1 && b.off == p.off2 && b.mul == p.m2 && b.dim == p.d2;
      block_ok[2] |= b.operand == 2 && b.off == p.offo && b.mul == p.mo && b.dim == p.d3;
    }
    TORCH_CHECK(block_ok[0] && block_ok[1] && block_ok[2], "tensor_product: path ", r,
                " refers to a block missing from `blocks`");
    int64_t wsize = 0;
    bool shape_ok = true;
    switch (p.mode) {
      case tp::kUVW:
        wsize = p.m1 * p.m2 * p.mo;
        break;
      case tp::kUVU:
        wsize = p.m1 * p.m2, shape_ok = p.mo == p.m1;
        break;
      case tp::kUVV:
        wsize = p.m1 * p.m2, shape_ok = p.mo == p.m2;
        break;
      case tp::kUUW:
        wsize = p.m1 * p.mo, shape_ok = p.m1 == p.m2 && (p.woff >= 0 || p.mo == 1);
        break;
      case tp::kUUU:
        wsize = p.m1, shape_ok = p.m1 == p.m2 && p.m1 == p.mo;
        break;
      case tp::kUVUV:
        wsize = p.m1 * p.m2, shape_ok = p.mo == p.m1 * p.m2;
        break;
    }
    TORCH_CHECK(shape_ok, "tensor_product: path ", r, " multiplicities do not fit its mode");
    TORCH_CHECK(p.mode != tp::kUVW || p.woff >= 0, "tensor_product: uvw path ", r,
                " needs weights");
    TORCH_CHECK(p.woff < 0 || p.woff + wsize <= num_weights, "tensor_product: path ", r,
                " weights are out of range of the weight tensor (", num_weights, " weights)");
    TORCH_CHECK(p.cg_begin >= 0 && p.cg_begin <= p.cg_end && p.cg_end <= nnz,
                "tensor_product: path ", r, " coefficient range is out of range");
    if (p.woff >= 0 || !weighted_only) plan.paths.push_back(p);
  }
  auto ic = cg_ijk.contiguous();
  auto vc = cg_val.contiguous();
  const int32_t* ip = ic.data_ptr<int32_t>();
  const double* vp = vc.data_ptr<double>();
  plan.ijk.assign(ip, ip + 3 * nnz);
  plan.val.resize(nnz);
  for (int64_t n = 0; n < nnz; ++n) plan.val[n] = static_cast<T>(vp[n]);
  for (const Path& p : plan.paths)
    for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
      const int32_t* q = &plan.ijk[3 * n];
      TORCH_CHECK(q[0] >= 0 && q[0] < p.d1 && q[1] >= 0 && q[1] < p.d2 && q[2] >= 0 && q[2] < p.d3,
                  "tensor_product: coefficient ", n, " index is out of range of its path");
    }
  plan.finalize();
  return plan;
}

// Batch sizes: every operand has leading size Z or 1 (broadcast).
int64_t check_operands(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& w,
                       const at::Tensor* gout) {
  const at::Tensor* ts[3] = {&x1, &x2, &w};
  const char* names[3] = {"x1", "x2", "weight"};
  int64_t z = 1;
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ts[i]->dim() == 2, "tensor_product: ", names[i], " must be 2-D [batch, dim], got ",
                ts[i]->sizes());
    TORCH_CHECK(ts[i]->device().is_cpu(), "tensor_product: ", names[i], " must be on the CPU");
    TORCH_CHECK(ts[i]->scalar_type() == x1.scalar_type(), "tensor_product: ", names[i],
                " has dtype ", ts[i]->scalar_type(), " but x1 has ", x1.scalar_type());
    if (ts[i]->size(0) != 1) {
      TORCH_CHECK(z == 1 || z == ts[i]->size(0), "tensor_product: batch sizes differ (", x1.size(0),
                  ", ", x2.size(0), ", ", w.size(0), ")");
      z = ts[i]->size(0);
    }
  }
  if (x1.size(0) == 0 || x2.size(0) == 0 || w.size(0) == 0) z = 0;
  TORCH_CHECK(x1.scalar_type() == at::kFloat || x1.scalar_type() == at::kDouble,
              "tensor_product: dtype must be float32 or float64, got ", x1.scalar_type());
  if (gout) {
    TORCH_CHECK(gout->dim() == 2 && gout->size(0) == z, "tensor_product: grad_out has shape ",
                gout->sizes(), ", expected [", z, ", out_dim]");
    TORCH_CHECK(gout->scalar_type() == x1.scalar_type(), "tensor_product: grad_out dtype differs");
  }
  return z;
}

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
    const Plan<T> plan = make_plan<T>(paths, blocks, cg_ijk, cg_val, x1.size(1), x2.size(1),
                                      out_dim, w.size(1), weighted_only);
    const T* p1 = x1.data_ptr<T>();
    const T* p2 = x2.data_ptr<T>();
    const T* pw = w.data_ptr<T>();
    T* po = out.data_ptr<T>();
    const int64_t s1 = x1.size(0) == 1 ? 0 : x1.size(1);
    const int64_t s2 = x2.size(0) == 1 ? 0 : x2.size(1);
    const int64_t sw = w.size(0) == 1 ? 0 : w.size(1);
    at::parallel_for(0, z, 16, [&](int64_t begin, int64_t end) {
      tp::Scratch<T> scratch(plan);
      for (int64_t b = begin; b < end; ++b)
        tp::forward_sample(plan, p1 + b * s1, p2 + b * s2, pw + b * sw, po + b * out_dim, scratch);
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
  // Rows of batched gradients are zeroed right before their sample accumulates into them (while
  // they are in cache); broadcast operands are reduced from per-chunk partial sums below.
  auto g1 = at::empty_like(x1), g2 = at::empty_like(x2), gw = at::empty_like(w);
  if (z == 0) return {g1.zero_(), g2.zero_(), gw.zero_()};
  const int64_t out_dim = gout.size(1);
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "tensor_product_bwd", [&] {
    using T = scalar_t;
    const Plan<T> plan = make_plan<T>(paths, blocks, cg_ijk, cg_val, x1.size(1), x2.size(1),
                                      out_dim, w.size(1), weighted_only);
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
          if (!b1) std::fill(o1, o1 + d1, T(0));
          if (!b2) std::fill(o2, o2 + d2, T(0));
          if (!bw) std::fill(ow, ow + dw, T(0));
          tp::backward_sample(plan, pg + b * out_dim, p1 + (b1 ? 0 : b * d1),
                              p2 + (b2 ? 0 : b * d2), pw + (bw ? 0 : b * dw), o1, o2, ow, scratch);
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
