// Validation of the tensor-product plan tables and operands, shared by the CPU and CUDA ops.
//
// make_plan checks every row of the tables against the operand sizes, so a validated plan can
// never make a kernel index out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "cache_version.h"
#include "kernels/tensor_product.h"

namespace equikern {

using tp::Block;
using tp::Path;
using tp::Plan;

inline void check_plan_tensor(const at::Tensor& t, const char* name, int64_t cols,
                              at::ScalarType dt) {
  TORCH_CHECK(t.device().is_cpu(), "tensor_product: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "tensor_product: ", name, " must have dtype ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(cols < 0 ? t.dim() == 1 : (t.dim() == 2 && t.size(1) == cols),
              "tensor_product: ", name, " has shape ", t.sizes(), ", expected [n, ", cols, "]");
}

template <class T>
inline Plan<T> make_plan(const at::Tensor& paths, const at::Tensor& blocks,
                         const at::Tensor& cg_ijk, const at::Tensor& cg_val, int64_t dim1,
                         int64_t dim2, int64_t dim_out, int64_t num_weights, bool weighted_only) {
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
inline int64_t check_operands(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& w,
                              const at::Tensor* gout) {
  const at::Tensor* ts[3] = {&x1, &x2, &w};
  const char* names[3] = {"x1", "x2", "weight"};
  int64_t z = 1;
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ts[i]->dim() == 2, "tensor_product: ", names[i], " must be 2-D [batch, dim], got ",
                ts[i]->sizes());
    TORCH_CHECK(ts[i]->device() == x1.device(), "tensor_product: ", names[i], " is on ",
                ts[i]->device(), " but x1 is on ", x1.device());
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

// Plans are validated and built once per plan: keyed by the identity and version counter of the
// plan tensors (an in-place edit bumps the version) and the operand sizes. A cache entry keeps
// the tensors alive (`keep`), so their memory cannot be reused by other tables under the same key.
struct PlanKey {
  std::tuple<const void*, int64_t, const void*, int64_t, const void*, int64_t, const void*, int64_t,
             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool>
      k;
  PlanKey(const at::Tensor& paths, const at::Tensor& blocks, const at::Tensor& cg_ijk,
          const at::Tensor& cg_val, int64_t dim1, int64_t dim2, int64_t dim_out,
          int64_t num_weights, bool weighted_only)
      : k{paths.data_ptr(),
          cache_version(paths),
          blocks.data_ptr(),
          cache_version(blocks),
          cg_ijk.data_ptr(),
          cache_version(cg_ijk),
          cg_val.data_ptr(),
          cache_version(cg_val),
          dim1,
          dim2,
          dim_out,
          num_weights,
          paths.size(0),
          cg_ijk.size(0),
          weighted_only} {}
  bool operator<(const PlanKey& o) const { return k < o.k; }
};

inline std::vector<at::Tensor> keep(const at::Tensor& paths, const at::Tensor& blocks,
                                    const at::Tensor& cg_ijk, const at::Tensor& cg_val) {
  return {paths, blocks, cg_ijk, cg_val};
}

// The validated plan for these tables, built on first use.
template <class T>
std::shared_ptr<const Plan<T>> cached_plan(const at::Tensor& paths, const at::Tensor& blocks,
                                           const at::Tensor& cg_ijk, const at::Tensor& cg_val,
                                           int64_t dim1, int64_t dim2, int64_t dim_out,
                                           int64_t num_weights, bool weighted_only) {
  static std::mutex mutex;
  static std::map<PlanKey, std::pair<std::shared_ptr<const Plan<T>>, std::vector<at::Tensor>>>
      cache;
  const PlanKey key(paths, blocks, cg_ijk, cg_val, dim1, dim2, dim_out, num_weights, weighted_only);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.first;
  auto plan = std::make_shared<const Plan<T>>(
      make_plan<T>(paths, blocks, cg_ijk, cg_val, dim1, dim2, dim_out, num_weights, weighted_only));
  if (cache.size() > 256) cache.clear();
  cache.emplace(key, std::make_pair(plan, keep(paths, blocks, cg_ijk, cg_val)));
  return plan;
}

}  // namespace equikern
