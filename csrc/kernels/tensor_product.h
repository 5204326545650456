// Clebsch-Gordan tensor products in e3nn's semantics: the math for one sample, free of torch.
//
// A plan is a list of paths (one per e3nn instruction) and the sparse, already normalised
// Clebsch-Gordan coefficients of each path. Inputs and outputs use e3nn's flat "mul_ir" layout
// (block of mul x (2l+1), channel-major). Per sample the kernels first transpose every block to
// "ir_mul" (component-major) scratch, so that all inner loops run over contiguous channels and
// vectorise; results are transposed back at the end.
//
// Connection modes (u: channel of in1, v: channel of in2, w: channel of out; C: CG coefficients):
//   uvw  out[w,k] += sum_uv W[u,v,w] sum_ij C[i,j,k] x1[u,i] x2[v,j]
//   uvu  out[u,k] += sum_v  W[u,v]   ...                            (W = 1 if unweighted)
//   uvv  out[v,k] += sum_u  W[u,v]   ...
//   uuw  out[w,k] += sum_u  W[u,w]   sum_ij C x1[u,i] x2[u,j]       (unweighted: w = 0 only)
//   uuu  out[u,k] +=        W[u]     sum_ij C x1[u,i] x2[u,j]
//   uvuv out[u*m2+v,k] +=   W[u,v]   sum_ij C x1[u,i] x2[v,j]
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace equikern::tp {

enum Mode : int64_t { kUVW = 0, kUVU = 1, kUVV = 2, kUUW = 3, kUUU = 4, kUVUV = 5 };
constexpr int kNumModes = 6;

// One row of the `paths` table built by the Python planner (equikern/nn/tensor_product.py).
struct Path {
  int64_t mode, off1, m1, d1, off2, m2, d2, offo, mo, d3, woff, cg_begin, cg_end;
};
constexpr int kPathFields = 13;

// A block of one operand: operand (0: in1, 1: in2, 2: out), offset, multiplicity, dimension.
struct Block {
  int64_t operand, off, mul, dim;
};
constexpr int kBlockFields = 4;

template <class T>
struct Plan {
  std::vector<Path> paths;
  std::vector<Block> blocks;
  std::vector<int32_t> ijk;  // 3 per coefficient
  std::vector<T> val;        // coefficient times the path's normalisation
  int64_t dim1 = 0, dim2 = 0, dim_out = 0, num_weights = 0;
  int64_t max_dd = 1, max_chan = 1;  // scratch sizes

  void finalize() {
    for (const Path& p : paths) {
      max_dd = std::max({max_dd, p.d1 * p.d3, p.d2 * p.d3, p.d1 * p.d2});
      max_chan = std::max({max_chan, p.m1 * std::max(p.d1, p.d3), p.m2 * std::max(p.d2, p.d3),
                           p.mo * p.d3, p.m1 * p.d3});
    }
  }
};

// Per-thread scratch: transposed operands and small temporaries.
template <class T>
struct Scratch {
  std::vector<T> x1, x2, out, g1, g2, a, b, c;
  explicit Scratch(const Plan<T>& plan)
      : x1(plan.dim1),
        x2(plan.dim2),
        out(plan.dim_out),
        g1(plan.dim1),
        g2(plan.dim2),
        a(plan.max_dd),
        b(plan.max_chan),
        c(plan.max_chan) {}
};

// ---- layout -------------------------------------------------------------------------------------

template <class T>
inline void to_ir_mul(const Plan<T>& plan, int64_t operand, const T* src, T* dst) {
  for (const Block& b : plan.blocks) {
    if (b.operand != operand) continue;
    for (int64_t u = 0; u < b.mul; ++u)
      for (int64_t i = 0; i < b.dim; ++i) dst[b.off + i * b.mul + u] = src[b.off + u * b.dim + i];
  }
}

template <class T>
inline void to_mul_ir(const Plan<T>& plan, int64_t operand, const T* src, T* dst) {
  for (const Block& b : plan.blocks) {
    if (b.operand != operand) continue;
    for (int64_t u = 0; u < b.mul; ++u)
      for (int64_t i = 0; i < b.dim; ++i) dst[b.off + u * b.dim + i] = src[b.off + i * b.mul + u];
  }
}

template <class T>
inline void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t u = 0; u < n; ++u) y[u] += a * x[u];
}

template <class T>
inline T dot(int64_t n, const T* __restrict x, const T* __restrict y) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t u = 0; u < n; ++u) s += x[u] * y[u];
  return s;
}

// t[i*d3+k] = sum_j C[i,j,k] x2[j*stride]  (contract the second operand into the CG table)
template <class T>
inline void contract_second(const Plan<T>& plan, const Path& p, const T* x2, int64_t stride, T* t) {
  std::fill(t, t + p.d1 * p.d3, T(0));
  for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
    const int32_t* q = &plan.ijk[3 * n];
    t[q[0] * p.d3 + q[2]] += plan.val[n] * x2[q[1] * stride];
  }
}

// s[j*d3+k] = sum_i C[i,j,k] x1[i*stride]
template <class T>
inline void contract_first(const Plan<T>& plan, const Path& p, const T* x1, int64_t stride, T* s) {
  std::fill(s, s + p.d2 * p.d3, T(0));
  for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
    const int32_t* q = &plan.ijk[3 * n];
    s[q[1] * p.d3 + q[2]] += plan.val[n] * x1[q[0] * stride];
  }
}

// ---- forward ------------------------------------------------------------------------------------

// out(k, o) += sum_i t[i,k] y(i, o) for all i, k; y is [d1][n], out rows have stride ld.
template <class T>
inline void apply_table(int64_t d1, int64_t d3, int64_t n, const T* t, const T* y, T* out,
                        int64_t ld) {
  for (int64_t i = 0; i < d1; ++i)
    for (int64_t k = 0; k < d3; ++k) {
      const T a = t[i * d3 + k];
      if (a != T(0)) axpy(n, a, y + i * n, out + k * ld);
    }
}

template <class T>
void forward_path(const Plan<T>& plan, const Path& p, const T* w, Scratch<T>& s) {
  const T* X1 = s.x1.data() + p.off1;
  const T* X2 = s.x2.data() + p.off2;
  T* O = s.out.data() + p.offo;
  const T* W = p.woff >= 0 ? w + p.woff : nullptr;
  T* t = s.a.data();
  T* y = s.b.data();
  const int64_t m1 = p.m1, m2 = p.m2, mo = p.mo, d1 = p.d1, d2 = p.d2, d3 = p.d3;
  switch (p.mode) {
    case kUVU:
    case kUVUV:
      for (int64_t v = 0; v < m2; ++v) {
        contract_second(plan, p, X2 + v, m2, t);
        for (int64_t i = 0; i < d1; ++i)
          for (int64_t u = 0; u < m1; ++u)
            y[i * m1 + u] = (W ? W[u * m2 + v] : T(1)) * X1[i * m1 + u];
        if (p.mode == kUVU) {
          apply_table(d1, d3, m1, t, y, O, mo);
        } else {  // uvuv: output channel u*m2+v
          T* o = s.c.data();
          std::fill(o, o + d3 * m1, T(0));
          apply_table(d1, d3, m1, t, y, o, m1);
          for (int64_t k = 0; k < d3; ++k)
            for (int64_t u = 0; u < m1; ++u) O[k * mo + u * m2 + v] += o[k * m1 + u];
        }
      }
      break;
    case kUVV:
      for (int64_t u = 0; u < m1; ++u) {
        contract_first(plan, p, X1 + u, m1, t);
        for (int64_t j = 0; j < d2; ++j)
          for (int64_t v = 0; v < m2; ++v)
            y[j * m2 + v] = (W ? W[u * m2 + v] : T(1)) * X2[j * m2 + v];
        apply_table(d2, d3, m2, t, y, O, mo);
      }
      break;
    case kUUU:
      for (int64_t i = 0; i < d1; ++i)
        for (int64_t u = 0; u < m1; ++u) y[i * m1 + u] = (W ? W[u] : T(1)) * X1[i * m1 + u];
      for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
        const int32_t* q = &plan.ijk[3 * n];
        const T c = plan.val[n];
        const T* a = y + q[0] * m1;
        const T* b = X2 + q[1] * m1;
        T* o = O + q[2] * mo;
#pragma omp simd
        for (int64_t u = 0; u < m1; ++u) o[u] += c * a[u] * b[u];
      }
      break;
    case kUUW: {
      T* P = s.c.data();  // P(k,u) = sum C x1(i,u) x2(j,u)
      std::fill(P, P + d3 * m1, T(0));
      for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
        const int32_t* q = &plan.ijk[3 * n];
        const T c = plan.val[n];
        const T* a = X1 + q[0] * m1;
        const T* b = X2 + q[1] * m1;
        T* o = P + q[2] * m1;
#pragma omp simd
        for (int64_t u = 0; u < m1; ++u) o[u] += c * a[u] * b[u];
      }
      for (int64_t k = 0; k < d3; ++k) {
        if (W) {
          for (int64_t u = 0; u < m1; ++u) axpy(mo, P[k * m1 + u], W + u * mo, O + k * mo);
        } else {
          T acc = 0;
          for (int64_t u = 0; u < m1; ++u) acc += P[k * m1 + u];
          O[k * mo] += acc;
        }
      }
      break;
    }
    case kUVW: {
      T* S = s.c.data();  // S(k,u) = sum_i t[i,k] x1(i,u)
      for (int64_t v = 0; v < m2; ++v) {
        contract_second(plan, p, X2 + v, m2, t);
        std::fill(S, S + d3 * m1, T(0));
        apply_table(d1, d3, m1, t, X1, S, m1);
        for (int64_t k = 0; k < d3; ++k)
          for (int64_t u = 0; u < m1; ++u) {
            const T a = S[k * m1 + u];
            if (a != T(0)) axpy(mo, a, W + (u * m2 + v) * mo, O + k * mo);
          }
      }
      break;
    }
  }
}

// One sample: x1 [dim1], x2 [dim2], w [num_weights] (ignored when no path has weights) -> out.
template <class T>
void forward_sample(const Plan<T>& plan, const T* x1, const T* x2, const T* w, T* out,
                    Scratch<T>& s) {
  to_ir_mul(plan, 0, x1, s.x1.data());
  to_ir_mul(plan, 1, x2, s.x2.data());
  std::fill(s.out.begin(), s.out.end(), T(0));
  for (const Path& p : plan.paths) forward_path(plan, p, w, s);
  std::fill(out, out + plan.dim_out, T(0));
  to_mul_ir(plan, 2, s.out.data(), out);
}

// ---- backward -----------------------------------------------------------------------------------

// Accumulates the gradients of one path into s.g1, s.g2 (ir_mul) and gw (flat weight layout).
// s.out holds the output gradient in ir_mul layout.
template <class T>
void backward_path(const Plan<T>& plan, const Path& p, const T* w, T* gw, Scratch<T>& s) {
  const T* X1 = s.x1.data() + p.off1;
  const T* X2 = s.x2.data() + p.off2;
  const T* G = s.out.data() + p.offo;
  T* G1 = s.g1.data() + p.off1;
  T* G2 = s.g2.data() + p.off2;
  const T* W = p.woff >= 0 ? w + p.woff : nullptr;
  T* GW = p.woff >= 0 ? gw + p.woff : nullptr;
  T* t = s.a.data();
  T* H = s.b.data();
  T* Q = s.c.data();
  const int64_t m1 = p.m1, m2 = p.m2, mo = p.mo, d1 = p.d1, d2 = p.d2, d3 = p.d3;
  switch (p.mode) {
    case kUVU:
    case kUVUV:
      for (int64_t v = 0; v < m2; ++v) {
        contract_second(plan, p, X2 + v, m2, t);
        // Q(k,u): the output gradient seen by channel pair (u, v)
        for (int64_t k = 0; k < d3; ++k)
          for (int64_t u = 0; u < m1; ++u)
            Q[k * m1 + u] = p.mode == kUVU ? G[k * mo + u] : G[k * mo + u * m2 + v];
        // H(i,u) = sum_k t[i,k] Q(k,u)
        std::fill(H, H + d1 * m1, T(0));
        for (int64_t i = 0; i < d1; ++i)
          for (int64_t k = 0; k < d3; ++k) {
            const T a = t[i * d3 + k];
            if (a != T(0)) axpy(m1, a, Q + k * m1, H + i * m1);
          }
        for (int64_t i = 0; i < d1; ++i)
          for (int64_t u = 0; u < m1; ++u) {
            const T wu = W ? W[u * m2 + v] : T(1);
            G1[i * m1 + u] += wu * H[i * m1 + u];
            if (GW) GW[u * m2 + v] += X1[i * m1 + u] * H[i * m1 + u];
          }
        // d x2(j,v) = sum C[i,j,k] R(i,k), R(i,k) = sum_u W[u,v] x1(i,u) Q(k,u)
        for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
          const int32_t* q = &plan.ijk[3 * n];
          const T* a = X1 + q[0] * m1;
          const T* b = Q + q[2] * m1;
          T r = 0;
          if (W) {
#pragma omp simd reduction(+ : r)
            for (int64_t u = 0; u < m1; ++u) r += W[u * m2 + v] * a[u] * b[u];
          } else {
            r = dot(m1, a, b);
          }
          G2[q[1] * m2 + v] += plan.val[n] * r;
        }
      }
      break;
    case kUVV:
      for (int64_t u = 0; u < m1; ++u) {
        contract_first(plan, p, X1 + u, m1, t);  // t[j,k]
        std::fill(H, H + d2 * m2, T(0));
        for (int64_t j = 0; j < d2; ++j)
          for (int64_t k = 0; k < d3; ++k) {
            const T a = t[j * d3 + k];
            if (a != T(0)) axpy(m2, a, G + k * mo, H + j * m2);
          }
        for (int64_t j = 0; j < d2; ++j)
          for (int64_t v = 0; v < m2; ++v) {
            const T wv = W ? W[u * m2 + v] : T(1);
            G2[j * m2 + v] += wv * H[j * m2 + v];
            if (GW) GW[u * m2 + v] += X2[j * m2 + v] * H[j * m2 + v];
          }
        for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
          const int32_t* q = &plan.ijk[3 * n];
          const T* a = X2 + q[1] * m2;
          const T* b = G + q[2] * mo;
          T r = 0;
          if (W) {
#pragma omp simd reduction(+ : r)
            for (int64_t v = 0; v < m2; ++v) r += W[u * m2 + v] * a[v] * b[v];
          } else {
            r = dot(m2, a, b);
          }
          G1[q[0] * m1 + u] += plan.val[n] * r;
        }
      }
      break;
    case kUUU:
    case kUUW: {
      // Q(k,u): output gradient pulled back through the channel map
      for (int64_t k = 0; k < d3; ++k) {
        if (p.mode == kUUU) {
          for (int64_t u = 0; u < m1; ++u) Q[k * m1 + u] = (W ? W[u] : T(1)) * G[k * mo + u];
        } else if (W) {
          for (int64_t u = 0; u < m1; ++u) Q[k * m1 + u] = dot(mo, W + u * mo, G + k * mo);
        } else {
          for (int64_t u = 0; u < m1; ++u) Q[k * m1 + u] = G[k * mo];
        }
      }
      T* P = H;  // P(k,u) = sum C x1(i,u) x2(j,u), needed for the weight gradient
      if (GW) std::fill(P, P + d3 * m1, T(0));
      for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
        const int32_t* q = &plan.ijk[3 * n];
        const T c = plan.val[n];
        const T* a = X1 + q[0] * m1;
        const T* b = X2 + q[1] * m1;
        const T* g = Q + q[2] * m1;
        T* ga = G1 + q[0] * m1;
        T* gb = G2 + q[1] * m1;
#pragma omp simd
        for (int64_t u = 0; u < m1; ++u) {
          ga[u] += c * b[u] * g[u];
          gb[u] += c * a[u] * g[u];
        }
        if (GW) {
          T* o = P + q[2] * m1;
#pragma omp simd
          for (int64_t u = 0; u < m1; ++u) o[u] += c * a[u] * b[u];
        }
      }
      if (GW) {
        for (int64_t k = 0; k < d3; ++k)
          for (int64_t u = 0; u < m1; ++u) {
            if (p.mode == kUUU)
              GW[u] += P[k * m1 + u] * G[k * mo + u];
            else
              axpy(mo, P[k * m1 + u], G + k * mo, GW + u * mo);
          }
      }
      break;
    }
    case kUVW:
      for (int64_t v = 0; v < m2; ++v) {
        contract_second(plan, p, X2 + v, m2, t);
        // Q(k,u) = sum_w W[u,v,w] G(k,w)
        for (int64_t k = 0; k < d3; ++k)
          for (int64_t u = 0; u < m1; ++u)
            Q[k * m1 + u] = dot(mo, W + (u * m2 + v) * mo, G + k * mo);
        // d x1(i,u) += sum_k t[i,k] Q(k,u);  weight: S(k,u) = sum_i t[i,k] x1(i,u)
        T* S = H;
        std::fill(S, S + d3 * m1, T(0));
        for (int64_t i = 0; i < d1; ++i)
          for (int64_t k = 0; k < d3; ++k) {
            const T a = t[i * d3 + k];
            if (a == T(0)) continue;
            axpy(m1, a, Q + k * m1, G1 + i * m1);
            axpy(m1, a, X1 + i * m1, S + k * m1);
          }
        for (int64_t k = 0; k < d3; ++k)
          for (int64_t u = 0; u < m1; ++u) {
            const T a = S[k * m1 + u];
            if (a != T(0)) axpy(mo, a, G + k * mo, GW + (u * m2 + v) * mo);
          }
        for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
          const int32_t* q = &plan.ijk[3 * n];
          G2[q[1] * m2 + v] += plan.val[n] * dot(m1, X1 + q[0] * m1, Q + q[2] * m1);
        }
      }
      break;
  }
}

// One sample: accumulates into g1 [dim1], g2 [dim2] (mul_ir layout) and gw [num_weights].
template <class T>
void backward_sample(const Plan<T>& plan, const T* gout, const T* x1, const T* x2, const T* w,
                     T* g1, T* g2, T* gw, Scratch<T>& s) {
  to_ir_mul(plan, 0, x1, s.x1.data());
  to_ir_mul(plan, 1, x2, s.x2.data());
  to_ir_mul(plan, 2, gout, s.out.data());
  std::fill(s.g1.begin(), s.g1.end(), T(0));
  std::fill(s.g2.begin(), s.g2.end(), T(0));
  for (const Path& p : plan.paths) backward_path(plan, p, w, gw, s);
  for (const Block& b : plan.blocks) {
    if (b.operand == 2) continue;
    const T* src = (b.operand == 0 ? s.g1.data() : s.g2.data()) + b.off;
    T* dst = (b.operand == 0 ? g1 : g2) + b.off;
    for (int64_t u = 0; u < b.mul; ++u)
      for (int64_t i = 0; i < b.dim; ++i) dst[u * b.dim + i] += src[i * b.mul + u];
  }
}

}  // namespace equikern::tp
