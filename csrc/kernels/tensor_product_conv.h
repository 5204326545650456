// Fused message passing: out[n] = sum over edges e with dst[e] = n of TP(x[src[e]], attr[e], w[e]),
// with TP the tensor product of kernels/tensor_product.h; the math for one node, free of torch.
//
// The per-edge messages are never stored. Edges are visited through two CSR views of the edge
// list, each a stable grouping of the edges (a permutation `perm` and row pointers `ptr`):
//   by destination, for the forward: a node's messages are summed in a cache-resident row, in the
//     order of the permutation, then streamed out once;
//   by source, for the backward: the gradient of x[n] is summed over the edges leaving n in that
//     order, and every edge's gradients of attr and w (its own rows) are written on the way.
// Each output row is summed by one thread in a fixed order, so results are bitwise reproducible
// for any number of threads and any partition of the nodes.
//
// Channelwise plans (see "channelwise kernels" in tensor_product.h) run on operands in lane
// layout. A node's row is used by all of its ~30 edges, so the rows of x (forward) and of the
// output gradient (backward) are moved to lanes once per node, into [nodes][lanes] buffers, rather
// than once per edge; in the backward the gradient of x[n] stays in lanes across n's edges and is
// moved back once.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/tensor_product.h"

namespace equikern::tpconv {

// The edge list and its two groupings, all validated by the caller (indices in range, each perm
// a permutation of the edges consistent with its ptr).
struct Graph {
  const int64_t* src;
  const int64_t* dst;
  const int64_t* dst_perm;
  const int64_t* dst_ptr;
  const int64_t* src_perm;
  const int64_t* src_ptr;
};

// Rows of the operands: x [num_src, dim1], attr [E, dim2], w [E, num_weights] or one shared row
// (w_stride 0).
template <class T>
struct Operands {
  const T* x;
  const T* attr;
  const T* w;
  int64_t w_stride;
};

// One sample of a plan on the generic route (not channelwise) added into acc [dim_out], or
// written there when `first`: the row stays in the caller's cache across a node's edges.
template <class T>
void forward_sample_add(const tp::Plan<T>& plan, const T* x1, const T* x2, const T* w, T* acc,
                        tp::Scratch<T>& s, bool first) {
  tp::to_ir_mul(plan, 0, x1, s.x1.data());
  tp::to_ir_mul(plan, 1, x2, s.x2.data());
  std::fill(s.out.begin(), s.out.end(), T(0));
  for (const tp::Path& p : plan.paths) tp::forward_path(plan, p, w, s);
  if (first) std::fill(acc, acc + plan.dim_out, T(0));
  const T* src = s.out.data();
  for (const tp::Block& b : plan.blocks) {
    if (b.operand != 2) continue;
    for (int64_t u = 0; u < b.mul; ++u)
      for (int64_t i = 0; i < b.dim; ++i) acc[b.off + u * b.dim + i] += src[b.off + i * b.mul + u];
  }
}

// out_row = sum of the messages into node n (generic route); acc is a dim_out scratch row.
template <class T>
void forward_node(const tp::Plan<T>& plan, const Graph& g, const Operands<T>& op, int64_t n,
                  T* out_row, T* acc, tp::Scratch<T>& s) {
  const int64_t begin = g.dst_ptr[n], end = g.dst_ptr[n + 1];
  const int64_t d1 = plan.dim1, d2 = plan.dim2;
  if (begin == end) {
    std::fill(out_row, out_row + plan.dim_out, T(0));
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = g.dst_perm[i];
    if (i + 1 < end) {
      const int64_t next = g.dst_perm[i + 1];
      tp::prefetch(op.x + g.src[next] * d1, d1);
      tp::prefetch(op.attr + next * d2, d2);
      tp::prefetch(op.w + next * op.w_stride, op.w_stride);
    }
    forward_sample_add(plan, op.x + g.src[e] * d1, op.attr + e * d2, op.w + e * op.w_stride, acc, s,
                       i == begin);
  }
  tp::stream_store(acc, out_row, plan.dim_out);
}

// Gradients from the edges leaving node n (generic route): gx_row = sum of their x-gradients; for
// each such edge e, gattr[e] and (per-edge weights) gw[e] are written in full. With shared weights
// gw is one row that the weight gradients are added into (the caller zeroes and reduces it).
template <class T>
void backward_node(const tp::Plan<T>& plan, const Graph& g, const Operands<T>& op, const T* gout,
                   int64_t n, T* gx_row, T* gattr, T* gw, tp::Scratch<T>& s) {
  const int64_t begin = g.src_ptr[n], end = g.src_ptr[n + 1];
  const int64_t d1 = plan.dim1, d2 = plan.dim2, dout = plan.dim_out, dw = op.w_stride;
  const bool shared = op.w_stride == 0;
  if (begin == end) {
    std::fill(gx_row, gx_row + d1, T(0));
    return;
  }
  const T* x = op.x + n * d1;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = g.src_perm[i];
    if (i + 1 < end) {
      const int64_t next = g.src_perm[i + 1];
      tp::prefetch(gout + g.dst[next] * dout, dout);
      tp::prefetch(op.attr + next * d2, d2);
      tp::prefetch(op.w + next * dw, dw);
    }
    T* ga = gattr + e * d2;
    std::fill(ga, ga + d2, T(0));
    tp::backward_sample(plan, gout + g.dst[e] * dout, x, op.attr + e * d2, op.w + e * dw, gx_row,
                        ga, shared ? gw : gw + e * dw, s, i == begin, !shared);
  }
}

// A row of mul_ir blocks to lane layout (the lanes of `blocks`).
template <class T, class Blocks>
void row_to_lanes(const Blocks& blocks, const T* row, T* lanes) {
  for (const auto& b : blocks) b.moves.to(row + b.off, b.mul, b.dim, lanes + b.lane_off);
}

// forward_node for channelwise plans; xl: the rows of x in lanes, [num_src][plan.dim1_lanes].
template <class T>
void forward_node_lanes(const tp::Plan<T>& plan, const Graph& g, const Operands<T>& op, const T* xl,
                        int64_t n, T* out_row, T* acc, tp::Scratch<T>& s) {
  const int64_t begin = g.dst_ptr[n], end = g.dst_ptr[n + 1];
  const int64_t dl = plan.dim1_lanes, d2 = plan.dim2;
  if (begin == end) {
    std::fill(out_row, out_row + plan.dim_out, T(0));
    return;
  }
  T* t = s.a.data();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = g.dst_perm[i];
    if (i + 1 < end) {
      const int64_t next = g.dst_perm[i + 1];
      tp::prefetch(xl + g.src[next] * dl, dl);
      tp::prefetch(op.attr + next * d2, d2);
      tp::prefetch(op.w + next * op.w_stride, op.w_stride);
    }
    const T* X = xl + g.src[e] * dl;
    const T* x2 = op.attr + e * d2;
    const T* w = op.w + e * op.w_stride;
    const bool first = i == begin;
    if (first) plan.out_writes.zero_unwritten(acc);
    for (size_t k = 0; k < plan.paths.size(); ++k) {
      const tp::Path& p = plan.paths[k];
      tp::contract_second(plan, p, x2 + p.off2, 1, t);
      plan.kernels[k].forward(p.m1, p.d1, p.d3, X + plan.in1_lanes[plan.path_in1[k]].lane_off,
                              tp::lane_weights(p, w, s), t, acc + p.offo,
                              first && plan.out_writes.first[k], s.block_lanes.data());
    }
  }
  tp::stream_store(acc, out_row, plan.dim_out);
}

// backward_node for channelwise plans; gl: the rows of the output gradient in lanes,
// [num_dst][plan.dim_out_lanes].
template <class T>
void backward_node_lanes(const tp::Plan<T>& plan, const Graph& g, const Operands<T>& op,
                         const T* gl, int64_t n, T* gx_row, T* gattr, T* gw, tp::Scratch<T>& s) {
  const int64_t begin = g.src_ptr[n], end = g.src_ptr[n + 1];
  const int64_t d1 = plan.dim1, d2 = plan.dim2, gll = plan.dim_out_lanes, dw = op.w_stride;
  const bool shared = op.w_stride == 0;
  if (begin == end) {
    std::fill(gx_row, gx_row + d1, T(0));
    return;
  }
  T* X = s.x1_lanes.data();
  T* G1 = s.g1_lanes.data();
  T* t = s.a.data();
  T* r = s.b.data();
  row_to_lanes(plan.in1_lanes, op.x + n * d1, X);
  std::fill(G1, G1 + plan.dim1_lanes, T(0));
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = g.src_perm[i];
    if (i + 1 < end) {
      const int64_t next = g.src_perm[i + 1];
      tp::prefetch(gl + g.dst[next] * gll, gll);
      tp::prefetch(op.attr + next * d2, d2);
      tp::prefetch(op.w + next * dw, dw);
    }
    const T* G = gl + g.dst[e] * gll;
    const T* x2 = op.attr + e * d2;
    const T* w = op.w + e * dw;
    T* ga = gattr + e * d2;
    T* gwe = shared ? gw : gw + e * dw;
    std::fill(ga, ga + d2, T(0));
    if (!shared) plan.gw_writes.zero_unwritten(gwe);
    for (size_t k = 0; k < plan.paths.size(); ++k) {
      const tp::Path& p = plan.paths[k];
      const int64_t x_off = plan.in1_lanes[plan.path_in1[k]].lane_off;
      tp::contract_second(plan, p, x2 + p.off2, 1, t);
      plan.kernels[k].backward(p.m1, p.d1, p.d3, X + x_off, tp::lane_weights(p, w, s),
                               G + plan.out_lanes[plan.path_out[k]].lane_off, t, G1 + x_off,
                               gwe + p.woff, r, !shared && plan.gw_writes.first[k]);
      // d attr[j] = sum C[i,j,k] r[i,k]
      for (int64_t c = p.cg_begin; c < p.cg_end; ++c) {
        const int32_t* q = &plan.ijk[3 * c];
        ga[p.off2 + q[1]] += plan.val[c] * r[q[0] * p.d3 + q[2]];
      }
    }
  }
  for (const auto& b : plan.in1_lanes)
    b.moves.from(G1 + b.lane_off, b.mul, b.dim, gx_row + b.off, false);
}

}  // namespace equikern::tpconv
