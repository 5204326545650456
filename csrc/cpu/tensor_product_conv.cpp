// CPU implementation and schemas of the fused tensor-product convolution
// (torch.ops.equikern.tensor_product_conv*): out[n] = sum_{e: dst[e] = n} TP(x[src[e]], attr[e],
// w[e]).
//
// tensor_product_conv_csr groups the edges by one endpoint (a stable counting sort: edges keep
// their order within a group), which the forward needs by destination and the backward by source.
// Both CSR views are passed to the product ops and validated there in full (indices in range,
// permutations consistent with their row pointers), so no input can make a kernel index out of
// bounds. Every output row is summed by one thread in the order of the CSR view, and gradients of
// shared weights are reduced from a fixed number of per-chunk partial sums in chunk order: results
// are bitwise reproducible on every run, whatever the number of threads.
#include "kernels/tensor_product_conv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "tensor_product_plan.h"

namespace equikern {
namespace {

constexpr int64_t kMaxChunks = 64;  // fixed, not the thread count: see above

void check_index(const at::Tensor& index, const char* name) {
  TORCH_CHECK(index.device().is_cpu(), "tensor_product_conv: ", name, " must be a CPU tensor, got ",
              index.device());
  TORCH_CHECK(index.scalar_type() == at::kLong, "tensor_product_conv: ", name,
              " must have dtype int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1, "tensor_product_conv: ", name, " must be 1-D, got shape ",
              index.sizes());
}

std::tuple<at::Tensor, at::Tensor> conv_csr_cpu(const at::Tensor& index_, int64_t size,
                                                c10::string_view name_) {
  const std::string name(name_);
  check_index(index_, name.c_str());
  TORCH_CHECK(size >= 0, "tensor_product_conv: the number of nodes for ", name,
              " must be >= 0, got ", size);
  auto index = index_.contiguous();
  const int64_t n = index.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  auto ptr = at::zeros({size + 1}, index.options());
  auto perm = at::empty({n}, index.options());
  int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* q = perm.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e) {
    TORCH_CHECK(idx[e] >= 0 && idx[e] < size, "tensor_product_conv: ", name, "[", e, "] = ", idx[e],
                " is out of range [0, ", size, ")");
    ++p[idx[e] + 1];
  }
  for (int64_t v = 0; v < size; ++v) p[v + 1] += p[v];
  std::vector<int64_t> next(p, p + std::max<int64_t>(size, 0));
  for (int64_t e = 0; e < n; ++e) q[next[idx[e]]++] = e;
  return {perm, ptr};
}

// The edge list against the operand sizes: indices in range, each perm a permutation of the edges
// grouping them by `key` as its ptr says.
void check_grouping(const at::Tensor& perm, const at::Tensor& ptr, const int64_t* key,
                    int64_t num_edges, int64_t num_nodes, const char* perm_name,
                    const char* ptr_name, const char* key_name) {
  TORCH_CHECK(perm.size(0) == num_edges, "tensor_product_conv: ", perm_name, " has ", perm.size(0),
              " entries, expected one per edge (", num_edges, ")");
  TORCH_CHECK(ptr.size(0) == num_nodes + 1, "tensor_product_conv: ", ptr_name, " has ", ptr.size(0),
              " entries, expected number of nodes + 1 = ", num_nodes + 1);
  const int64_t* q = perm.data_ptr<int64_t>();
  const int64_t* p = ptr.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[num_nodes] == num_edges, "tensor_product_conv: ", ptr_name,
              " must run from 0 to the number of edges");
  std::vector<char> seen(num_edges, 0);
  for (int64_t v = 0; v < num_nodes; ++v) {
    TORCH_CHECK(p[v] <= p[v + 1], "tensor_product_conv: ", ptr_name, " must be non-decreasing");
    for (int64_t i = p[v]; i < p[v + 1]; ++i) {
      const int64_t e = q[i];
      TORCH_CHECK(e >= 0 && e < num_edges && !seen[e], "tensor_product_conv: ", perm_name,
                  " is not a permutation of the edges");
      TORCH_CHECK(key[e] == v, "tensor_product_conv: ", perm_name, " and ", ptr_name,
                  " do not group the edges by ", key_name, " (edge ", e, ")");
      seen[e] = 1;
    }
  }
}

struct Checked {
  at::Tensor x, attr, w, src, dst, dst_perm, dst_ptr, src_perm, src_ptr;
  int64_t num_edges, num_nodes;
};

Checked check_conv(const at::Tensor& x, const at::Tensor& attr, const at::Tensor& w,
                   const at::Tensor& src, const at::Tensor& dst, const at::Tensor& dst_perm,
                   const at::Tensor& dst_ptr, const at::Tensor& src_perm,
                   const at::Tensor& src_ptr) {
  const at::Tensor* ts[3] = {&x, &attr, &w};
  const char* names[3] = {"node_features", "edge_attr", "edge_weight"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ts[i]->dim() == 2, "tensor_product_conv: ", names[i],
                " must be 2-D [rows, dim], got shape ", ts[i]->sizes());
    TORCH_CHECK(ts[i]->device().is_cpu(), "tensor_product_conv: ", names[i],
                " must be a CPU tensor here, got ", ts[i]->device());
    TORCH_CHECK(ts[i]->scalar_type() == x.scalar_type(), "tensor_product_conv: ", names[i],
                " has dtype ", ts[i]->scalar_type(), " but node_features has ", x.scalar_type());
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "tensor_product_conv: dtype must be float32 or float64, got ", x.scalar_type());
  const at::Tensor* idx[6] = {&src, &dst, &dst_perm, &dst_ptr, &src_perm, &src_ptr};
  const char* idx_names[6] = {"edge_src", "edge_dst", "dst_perm", "dst_ptr", "src_perm", "src_ptr"};
  for (int i = 0; i < 6; ++i) check_index(*idx[i], idx_names[i]);
  Checked c;
  c.num_edges = attr.size(0);
  c.num_nodes = dst_ptr.size(0) - 1;
  TORCH_CHECK(c.num_nodes >= 0, "tensor_product_conv: dst_ptr must not be empty");
  TORCH_CHECK(src.size(0) == c.num_edges && dst.size(0) == c.num_edges,
              "tensor_product_conv: edge_src (", src.size(0), ") and edge_dst (", dst.size(0),
              ") must have one entry per row of edge_attr (", c.num_edges, ")");
  TORCH_CHECK(w.size(0) == 1 || w.size(0) == c.num_edges, "tensor_product_conv: edge_weight has ",
              w.size(0), " rows, expected 1 (shared) or one per edge (", c.num_edges, ")");
  c.x = x.contiguous(), c.attr = attr.contiguous(), c.w = w.contiguous();
  c.src = src.contiguous(), c.dst = dst.contiguous();
  c.dst_perm = dst_perm.contiguous(), c.dst_ptr = dst_ptr.contiguous();
  c.src_perm = src_perm.contiguous(), c.src_ptr = src_ptr.contiguous();
  const int64_t num_src = x.size(0);
  const int64_t* s = c.src.data_ptr<int64_t>();
  const int64_t* d = c.dst.data_ptr<int64_t>();
  for (int64_t e = 0; e < c.num_edges; ++e) {
    TORCH_CHECK(s[e] >= 0 && s[e] < num_src, "tensor_product_conv: edge_src[", e, "] = ", s[e],
                " is out of range [0, ", num_src, ") (rows of node_features)");
    TORCH_CHECK(d[e] >= 0 && d[e] < c.num_nodes, "tensor_product_conv: edge_dst[", e, "] = ", d[e],
                " is out of range [0, ", c.num_nodes, ") (num_nodes)");
  }
  check_grouping(c.dst_perm, c.dst_ptr, d, c.num_edges, c.num_nodes, "dst_perm", "dst_ptr",
                 "destination");
  check_grouping(c.src_perm, c.src_ptr, s, c.num_edges, num_src, "src_perm", "src_ptr", "source");
  return c;
}

tpconv::Graph graph_of(const Checked& c) {
  return {c.src.data_ptr<int64_t>(),      c.dst.data_ptr<int64_t>(),
          c.dst_perm.data_ptr<int64_t>(), c.dst_ptr.data_ptr<int64_t>(),
          c.src_perm.data_ptr<int64_t>(), c.src_ptr.data_ptr<int64_t>()};
}

at::Tensor conv_forward_cpu(const at::Tensor& x_, const at::Tensor& attr_, const at::Tensor& w_,
                            const at::Tensor& src, const at::Tensor& dst,
                            const at::Tensor& dst_perm, const at::Tensor& dst_ptr,
                            const at::Tensor& src_perm, const at::Tensor& src_ptr,
                            const at::Tensor& paths, const at::Tensor& blocks,
                            const at::Tensor& cg_ijk, const at::Tensor& cg_val, int64_t out_dim,
                            bool weighted_only) {
  TORCH_CHECK(out_dim >= 0, "tensor_product_conv: out_dim must be >= 0");
  const Checked c = check_conv(x_, attr_, w_, src, dst, dst_perm, dst_ptr, src_perm, src_ptr);
  auto out = at::empty({c.num_nodes, out_dim}, c.x.options());  // every row is written in full
  if (c.num_nodes == 0 || out_dim == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "tensor_product_conv_fwd", [&] {
    using T = scalar_t;
    const auto plan_ptr = cached_plan<T>(paths, blocks, cg_ijk, cg_val, c.x.size(1), c.attr.size(1),
                                         out_dim, c.w.size(1), weighted_only);
    const Plan<T>& plan = *plan_ptr;
    const tpconv::Graph g = graph_of(c);
    const tpconv::Operands<T> op{c.x.data_ptr<T>(), c.attr.data_ptr<T>(), c.w.data_ptr<T>(),
                                 c.w.size(0) == 1 ? 0 : c.w.size(1)};
    T* po = out.data_ptr<T>();
    const int64_t num_src = c.x.size(0);
    // uninitialised: every row is written before it is read
    const at::Tensor xl_rows =
        at::empty({plan.channelwise ? num_src * plan.dim1_lanes : 0}, c.x.options());
    T* xl = xl_rows.data_ptr<T>();
    if (plan.channelwise && c.num_edges > 0)
      at::parallel_for(0, num_src, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          tpconv::row_to_lanes(plan.in1_lanes, op.x + n * plan.dim1, xl + n * plan.dim1_lanes);
      });
    at::parallel_for(0, c.num_nodes, 4, [&](int64_t begin, int64_t end) {
      tp::Scratch<T> scratch(plan);
      std::vector<T> acc(out_dim);
      for (int64_t n = begin; n < end; ++n) {
        if (plan.channelwise)
          tpconv::forward_node_lanes(plan, g, op, xl, n, po + n * out_dim, acc.data(), scratch);
        else
          tpconv::forward_node(plan, g, op, n, po + n * out_dim, acc.data(), scratch);
      }
      tp::stream_fence();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cpu(
    const at::Tensor& gout_, const at::Tensor& x_, const at::Tensor& attr_, const at::Tensor& w_,
    const at::Tensor& src, const at::Tensor& dst, const at::Tensor& dst_perm,
    const at::Tensor& dst_ptr, const at::Tensor& src_perm, const at::Tensor& src_ptr,
    const at::Tensor& paths, const at::Tensor& blocks, const at::Tensor& cg_ijk,
    const at::Tensor& cg_val, bool weighted_only) {
  const Checked c = check_conv(x_, attr_, w_, src, dst, dst_perm, dst_ptr, src_perm, src_ptr);
  TORCH_CHECK(gout_.dim() == 2 && gout_.size(0) == c.num_nodes,
              "tensor_product_conv: grad_out has shape ", gout_.sizes(), ", expected [",
              c.num_nodes, ", out_dim]");
  TORCH_CHECK(gout_.scalar_type() == c.x.scalar_type() && gout_.device().is_cpu(),
              "tensor_product_conv: grad_out must be a CPU tensor of dtype ", c.x.scalar_type());
  auto gout = gout_.contiguous();
  // Rows of x and of per-edge operands are written in full by the kernels.
  auto gx = at::empty_like(c.x), gattr = at::empty_like(c.attr), gw = at::empty_like(c.w);
  const int64_t num_src = c.x.size(0);
  if (c.num_edges == 0) return {gx.zero_(), gattr.zero_(), gw.zero_()};
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "tensor_product_conv_bwd", [&] {
    using T = scalar_t;
    const auto plan_ptr = cached_plan<T>(paths, blocks, cg_ijk, cg_val, c.x.size(1), c.attr.size(1),
                                         gout.size(1), c.w.size(1), weighted_only);
    const Plan<T>& plan = *plan_ptr;
    const tpconv::Graph g = graph_of(c);
    const bool shared = c.w.size(0) == 1;
    const int64_t dw = c.w.size(1), d1 = c.x.size(1);
    const tpconv::Operands<T> op{c.x.data_ptr<T>(), c.attr.data_ptr<T>(), c.w.data_ptr<T>(),
                                 shared ? 0 : dw};
    const int64_t chunks = std::min(num_src, kMaxChunks);
    // Shared weights: one partial gradient per chunk of source nodes, reduced in chunk order.
    std::vector<T> part(shared ? chunks * dw : 0, T(0));
    const T* pg = gout.data_ptr<T>();
    T* qx = gx.data_ptr<T>();
    T* qa = gattr.data_ptr<T>();
    T* qw = gw.data_ptr<T>();
    const at::Tensor gl_rows =
        at::empty({plan.channelwise ? c.num_nodes * plan.dim_out_lanes : 0}, c.x.options());
    T* gl = gl_rows.data_ptr<T>();
    if (plan.channelwise)
      at::parallel_for(0, c.num_nodes, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          tpconv::row_to_lanes(plan.out_lanes, pg + n * plan.dim_out, gl + n * plan.dim_out_lanes);
      });
    at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
      tp::Scratch<T> scratch(plan);
      for (int64_t ch = cbegin; ch < cend; ++ch) {
        const int64_t begin = num_src * ch / chunks, end = num_src * (ch + 1) / chunks;
        T* w_out = shared ? part.data() + ch * dw : qw;
        for (int64_t n = begin; n < end; ++n) {
          if (plan.channelwise)
            tpconv::backward_node_lanes(plan, g, op, gl, n, qx + n * d1, qa, w_out, scratch);
          else
            tpconv::backward_node(plan, g, op, pg, n, qx + n * d1, qa, w_out, scratch);
        }
      }
    });
    if (shared) {
      std::fill(qw, qw + dw, T(0));
      for (int64_t ch = 0; ch < chunks; ++ch)
        for (int64_t i = 0; i < dw; ++i) qw[i] += part[ch * dw + i];
    }
  });
  return {gx, gattr, gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def("tensor_product_conv_csr(Tensor index, int size, str name) -> (Tensor, Tensor)");
  m.def(
      "tensor_product_conv(Tensor x, Tensor edge_attr, Tensor weight, Tensor edge_src, "
      "Tensor edge_dst, Tensor dst_perm, Tensor dst_ptr, Tensor src_perm, Tensor src_ptr, "
      "Tensor paths, Tensor blocks, Tensor cg_ijk, Tensor cg_val, int out_dim, "
      "bool weighted_only=False) -> Tensor");
  m.def(
      "tensor_product_conv_backward(Tensor grad_out, Tensor x, Tensor edge_attr, Tensor weight, "
      "Tensor edge_src, Tensor edge_dst, Tensor dst_perm, Tensor dst_ptr, Tensor src_perm, "
      "Tensor src_ptr, Tensor paths, Tensor blocks, Tensor cg_ijk, Tensor cg_val, "
      "bool weighted_only=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("tensor_product_conv_csr", &conv_csr_cpu);
  m.impl("tensor_product_conv", &conv_forward_cpu);
  m.impl("tensor_product_conv_backward", &conv_backward_cpu);
}

}  // namespace equikern
