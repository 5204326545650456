// Clebsch-Gordan tensor products in e3nn's semantics: the math for one sample, free of torch.
//
// A plan is a list of paths (one per e3nn instruction) and the sparse, already normalised
// Clebsch-Gordan coefficients of each path. Inputs and outputs use e3nn's flat "mul_ir" layout
// (block of mul x (2l+1), channel-major). Per sample the kernels first transpose every block to
// "ir_mul" (component-major) scratch, so that all inner loops run over contiguous channels and
// vectorise; results are transposed back at the end.
//
// The channelwise products of MACE and NequIP (every path uvu, weighted, mul2 = 1) take a direct
// route instead: there a path is, per channel u, the small product out[u,:] = W[u] x1[u,:] t with
// t[i,k] = sum_j C[i,j,k] x2[j], which runs in mul_ir layout as it is, with no transposes (these
// cost more than the arithmetic). See "channelwise" below.
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
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <utility>
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

// ---- small vector helpers ----------------------------------------------------------------------

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

// ---- channelwise kernels (uvu, weighted, mul2 = 1), in mul_ir layout ----------------------------
//
// One path over all m channels of a sample; x: [m][d1], w: [m], g, out: [m][d3], t: [d1][d3].
//   forward:  out[u,k] (+)= w[u] sum_i x[u,i] t[i,k]            (= if overwrite, else +=)
//   backward: with H[u,i] = sum_k t[i,k] g[u,k]:  g1[u,i] += w[u] H[u,i],
//             gw[u] += sum_i x[u,i] H[u,i],  r[i,k] = sum_u w[u] x[u,i] g[u,k]
// The dimensions are template arguments for the common ones (l <= 3), so that the loops over i
// and k unroll and a channel stays in registers; D1 = D3 = 0 is the generic version.

// Smallest power of two >= d (and >= 2): the lanes of a vector that holds d values.
constexpr int padded(int d) { return d <= 2 ? 2 : 2 * padded((d + 1) / 2); }

template <class T>
using ChannelwiseForward = void (*)(int64_t m, int64_t d1, int64_t d3, const T* x, const T* w,
                                    const T* t, T* out, bool overwrite);
template <class T>
using ChannelwiseBackward = void (*)(int64_t m, int64_t d1, int64_t d3, const T* x, const T* w,
                                     const T* g, const T* t, T* g1, T* gw, T* r);

template <class T, int D1, int D3>
void channelwise_forward(int64_t m, int64_t d1_, int64_t d3_, const T* __restrict x,
                         const T* __restrict w, const T* __restrict t, T* __restrict out,
                         bool overwrite) {
  if constexpr (D1 == 0) {
    const int64_t d1 = d1_, d3 = d3_;
    for (int64_t u = 0; u < m; ++u) {
      T* o = out + u * d3;
      if (overwrite) std::fill(o, o + d3, T(0));
      for (int64_t i = 0; i < d1; ++i) {
        const T a = w[u] * x[u * d1 + i];
        for (int64_t k = 0; k < d3; ++k) o[k] += a * t[i * d3 + k];
      }
    }
  } else {
    // Output rows as vectors padded to a power of two (see channelwise_backward): when
    // overwriting, the lanes past d3 land on the next channel, which overwrites them in turn.
    constexpr int P3 = padded(D3);
    typedef T V3 __attribute__((vector_size(P3 * sizeof(T))));
    V3 ti[D1];  // ti[i][k] = t[i,k]
    for (int i = 0; i < D1; ++i) {
      ti[i] = V3{};
      for (int k = 0; k < D3; ++k) ti[i][k] = t[i * D3 + k];
    }
    const int64_t m_vec = overwrite && D3 > 1 ? m - (P3 - D3 + D3 - 1) / D3 : 0;
    for (int64_t u = 0; u < m; ++u) {
      V3 o = x[u * D1] * ti[0];
      for (int i = 1; i < D1; ++i) o += x[u * D1 + i] * ti[i];
      o *= w[u];
      T* dst = out + u * D3;
      if (u < m_vec) {
        std::memcpy(dst, &o, sizeof o);
      } else if (overwrite) {
        for (int k = 0; k < D3; ++k) dst[k] = o[k];
      } else {
        for (int k = 0; k < D3; ++k) dst[k] += o[k];
      }
    }
  }
}

template <class T, int D1, int D3>
void channelwise_backward(int64_t m, int64_t d1_, int64_t d3_, const T* __restrict x,
                          const T* __restrict w, const T* __restrict g, const T* __restrict t,
                          T* __restrict g1, T* __restrict gw, T* __restrict r) {
  if constexpr (D1 == 0) {
    const int64_t d1 = d1_, d3 = d3_;
    std::fill(r, r + d1 * d3, T(0));
    for (int64_t u = 0; u < m; ++u) {
      const T* gu = g + u * d3;
      T s = 0;
      for (int64_t i = 0; i < d1; ++i) {
        const T h = dot(d3, t + i * d3, gu);
        g1[u * d1 + i] += w[u] * h;
        s += x[u * d1 + i] * h;
        axpy(d3, w[u] * x[u * d1 + i], gu, r + i * d3);
      }
      gw[u] += s;
    }
  } else {
    // GCC/Clang vector types, padded to a power of two: H [d1] is a sum of d3 columns of t, and
    // r's rows accumulate g[u, :] read as one vector (its lanes past d3 are the next channel's, so
    // the last channels, whose vector would run past the block, take scalar code).
    constexpr int P1 = padded(D1), P3 = padded(D3);
    typedef T V1 __attribute__((vector_size(P1 * sizeof(T))));
    typedef T V3 __attribute__((vector_size(P3 * sizeof(T))));
    V1 tk[D3];  // tk[k][i] = t[i,k]
    V3 R[D1];
    for (int k = 0; k < D3; ++k) {
      tk[k] = V1{};
      for (int i = 0; i < D1; ++i) tk[k][i] = t[i * D3 + k];
    }
    for (int i = 0; i < D1; ++i) R[i] = V3{};
    const int64_t m_vec = m - (P3 - D3 + D3 - 1) / D3;
    for (int64_t u = 0; u < m; ++u) {
      const T* gu = g + u * D3;
      V1 h = gu[0] * tk[0];
      for (int k = 1; k < D3; ++k) h += gu[k] * tk[k];
      T s = 0;
      for (int i = 0; i < D1; ++i) {
        g1[u * D1 + i] += w[u] * h[i];
        s += x[u * D1 + i] * h[i];
      }
      gw[u] += s;
      if (u < m_vec) {
        V3 gv;
        std::memcpy(&gv, gu, sizeof gv);
        for (int i = 0; i < D1; ++i) R[i] += (w[u] * x[u * D1 + i]) * gv;
      } else {
        for (int i = 0; i < D1; ++i)
          for (int k = 0; k < D3; ++k) R[i][k] += w[u] * x[u * D1 + i] * gu[k];
      }
    }
    for (int i = 0; i < D1; ++i)
      for (int k = 0; k < D3; ++k) r[i * D3 + k] = R[i][k];
  }
}

template <class T>
struct ChannelwiseKernels {
  ChannelwiseForward<T> forward;
  ChannelwiseBackward<T> backward;
};

template <class T, int D1, int D3>
constexpr ChannelwiseKernels<T> channelwise_kernels() {
  return {&channelwise_forward<T, D1, D3>, &channelwise_backward<T, D1, D3>};
}

template <class T, int D1>
ChannelwiseKernels<T> channelwise_kernels(int64_t d3) {
  switch (d3) {
    case 1:
      return channelwise_kernels<T, D1, 1>();
    case 3:
      return channelwise_kernels<T, D1, 3>();
    case 5:
      return channelwise_kernels<T, D1, 5>();
    case 7:
      return channelwise_kernels<T, D1, 7>();
    default:
      return channelwise_kernels<T, 0, 0>();
  }
}

template <class T>
ChannelwiseKernels<T> channelwise_kernels(int64_t d1, int64_t d3) {
  switch (d1) {
    case 1:
      return channelwise_kernels<T, 1>(d3);
    case 3:
      return channelwise_kernels<T, 3>(d3);
    case 5:
      return channelwise_kernels<T, 5>(d3);
    case 7:
      return channelwise_kernels<T, 7>(d3);
    default:
      return channelwise_kernels<T, 0, 0>();
  }
}

// ---- plan ---------------------------------------------------------------------------------------

template <class T>
struct Plan {
  std::vector<Path> paths;
  std::vector<Block> blocks;
  std::vector<int32_t> ijk;  // 3 per coefficient
  std::vector<T> val;        // coefficient times the path's normalisation
  int64_t dim1 = 0, dim2 = 0, dim_out = 0, num_weights = 0;
  int64_t max_dd = 1, max_chan = 1;  // scratch sizes

  // The channelwise route (every path uvu, weighted, mul2 = 1): per path its kernels and whether
  // it is the first to touch its output range (then it overwrites instead of accumulating); the
  // output ranges [begin, end) that no such path overwrites are zeroed first.
  bool channelwise = false;
  std::vector<ChannelwiseKernels<T>> kernels;
  std::vector<char> overwrites;
  std::vector<std::pair<int64_t, int64_t>> zero_runs;

  void finalize() {
    for (const Path& p : paths) {
      max_dd = std::max({max_dd, p.d1 * p.d3, p.d2 * p.d3, p.d1 * p.d2});
      max_chan = std::max({max_chan, p.m1 * std::max(p.d1, p.d3), p.m2 * std::max(p.d2, p.d3),
                           p.mo * p.d3, p.m1 * p.d3});
    }
    channelwise = std::all_of(paths.begin(), paths.end(), [](const Path& p) {
      return p.mode == kUVU && p.m2 == 1 && p.woff >= 0;
    });
    if (!channelwise) return;
    max_chan = std::max(max_chan, max_dd);  // backward_sample keeps r [d1][d3] in Scratch::b
    std::vector<char> touched(dim_out, 0), written(dim_out, 0);
    for (const Path& p : paths) {
      kernels.push_back(channelwise_kernels<T>(p.d1, p.d3));
      const int64_t begin = p.offo, end = p.offo + p.mo * p.d3;
      const auto touched_begin = touched.begin() + begin, touched_end = touched.begin() + end;
      const bool first = std::none_of(touched_begin, touched_end, [](char c) { return c; });
      overwrites.push_back(first);
      std::fill(touched_begin, touched_end, 1);
      if (first) std::fill(written.begin() + begin, written.begin() + end, 1);
    }
    for (int64_t n = 0; n < dim_out;) {
      if (written[n]) {
        ++n;
        continue;
      }
      const int64_t begin = n;
      while (n < dim_out && !written[n]) ++n;
      zero_runs.emplace_back(begin, n);
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

// Copies n values to dst with non-temporal stores where the CPU has them; callers issue
// stream_fence() before other threads read dst.
template <class T>
inline void stream_store(const T* __restrict src, T* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0) dst[i] = src[i], ++i;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  } else if constexpr (std::is_same_v<T, double>) {
    for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
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
  if (plan.channelwise) {
    // The row is built in cache-resident scratch, then streamed out: writing the output
    // directly would first read every line of it from memory (write-allocate).
    T* row = s.out.data();
    for (const auto& [begin, end] : plan.zero_runs) std::fill(row + begin, row + end, T(0));
    T* t = s.a.data();
    for (size_t n = 0; n < plan.paths.size(); ++n) {
      const Path& p = plan.paths[n];
      contract_second(plan, p, x2 + p.off2, 1, t);
      plan.kernels[n].forward(p.m1, p.d1, p.d3, x1 + p.off1, w + p.woff, t, row + p.offo,
                              plan.overwrites[n]);
    }
    stream_store(row, out, plan.dim_out);
    return;
  }
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
  if (plan.channelwise) {
    T* t = s.a.data();
    T* r = s.b.data();
    for (size_t n = 0; n < plan.paths.size(); ++n) {
      const Path& p = plan.paths[n];
      contract_second(plan, p, x2 + p.off2, 1, t);
      plan.kernels[n].backward(p.m1, p.d1, p.d3, x1 + p.off1, w + p.woff, gout + p.offo, t,
                               g1 + p.off1, gw + p.woff, r);
      // d x2[j] = sum C[i,j,k] r[i,k]
      for (int64_t c = p.cg_begin; c < p.cg_end; ++c) {
        const int32_t* q = &plan.ijk[3 * c];
        g2[p.off2 + q[1]] += plan.val[c] * r[q[0] * p.d3 + q[2]];
      }
    }
    return;
  }
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
