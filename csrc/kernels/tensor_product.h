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
// t[i,k] = sum_j C[i,j,k] x2[j], computed on whole SIMD vectors of channels with the block moves
// done in registers. See "channelwise" below.
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

// ---- channelwise kernels (uvu, weighted, mul2 = 1), in lane layout -----------------------------
//
// A block of m channels x d components is moved from e3nn's mul_ir layout [m][d] to "lanes"
// [d][mp], mp = m rounded up to whole SIMD vectors (padding zeroed), so that one vector holds one
// component of consecutive channels. The moves run in chunks of one vector of channels: in-register
// 8 x 8 transposes with AVX2 (float, d <= 8), else through a small buffer with d a template
// argument for l <= 3 (the compiler turns a chunk into shuffles). The per-path arithmetic then
// runs on whole vectors with nothing left over, and the float forward writes mul_ir directly
// through lane permutations (see channelwise_forward). Per sample this is a few hundred vector
// operations against the 4-5 KB of operands and 13 KB of output of a MACE layer: what remains is
// the memory traffic.
//
// One path over all channels of a sample; X: [d1][mp], w: [mp] (zero padded), t: [d1][d3],
// G: [d3][mp], G1: [d1][mp], out: [m][d3] (mul_ir), scratch: [d3][mp]:
//   forward:  out[u,k] (+)= w[u] sum_i t[i,k] X[i,u]            (= if set, else +=)
//   backward: with H[i] = sum_k t[i,k] G[k]:  G1[i] += w H[i],  gw[u] (+)= sum_i X[i,u] H[i,u]
//             (u < m; = if set),  r[i,k] = sum_u w[u] X[i,u] G[k,u]

constexpr int kVectorBytes = 32;
template <class T>
constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));
template <class T>
struct VecOf;  // GCC/Clang vector types: the attribute cannot apply to a dependent type directly
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};
template <class T>
using Vec = typename VecOf<T>::type;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

template <class T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

#if defined(__AVX2__)
// In-register transpose of 8 x 8 floats: r[u][k] -> r[k][u].
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

template <class T>
using ToLanes = void (*)(const T* src, int64_t m, int64_t d, T* dst);
template <class T>
using FromLanes = void (*)(const T* src, int64_t m, int64_t d, T* dst, bool add);

// mul_ir [m][d] -> lanes [d][mp]
template <class T, int D>
void to_lanes(const T* __restrict src, int64_t m, int64_t d_, T* __restrict dst) {
  constexpr int L = kLanes<T>;
  const int64_t d = D ? D : d_, mp = round_up(m, L);
  int64_t u0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && D > 1 && D <= 8) {
    // Each channel's row read as a whole vector (its lanes past D are the next channels'), so the
    // last chunk, whose reads would run past the block, is left to the loop below.
    for (; u0 + L < m; u0 += L) {
      __m256 r[8];
      for (int u = 0; u < 8; ++u) r[u] = _mm256_loadu_ps(src + (u0 + u) * D);
      transpose8(r);
      for (int k = 0; k < D; ++k) _mm256_storeu_ps(dst + k * mp + u0, r[k]);
    }
  }
#endif
  if constexpr (D > 0) {
    for (; u0 + L <= m; u0 += L) {
      T buf[D][L];
      for (int u = 0; u < L; ++u)
        for (int k = 0; k < D; ++k) buf[k][u] = src[(u0 + u) * D + k];
      for (int k = 0; k < D; ++k) std::memcpy(dst + k * mp + u0, buf[k], sizeof buf[k]);
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t u = u0; u < m; ++u) dst[k * mp + u] = src[u * d + k];
    for (int64_t u = m; u < mp; ++u) dst[k * mp + u] = T(0);
  }
}

// lanes [d][mp] -> mul_ir [m][d], overwriting or adding
template <class T, int D>
void from_lanes(const T* __restrict src, int64_t m, int64_t d_, T* __restrict dst, bool add) {
  constexpr int L = kLanes<T>;
  const int64_t d = D ? D : d_, mp = round_up(m, L);
  int64_t u0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && D > 1 && D <= 8) {
    // Each channel's row written as a whole vector whose lanes past D (zeros) land on the next
    // channels, which are written after it; the last chunk, whose writes would run past the block,
    // is left to the loop below, as is adding.
    for (; !add && u0 + L < m; u0 += L) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k)
        r[k] = k < D ? _mm256_loadu_ps(src + k * mp + u0) : _mm256_setzero_ps();
      transpose8(r);
      for (int u = 0; u < 8; ++u) _mm256_storeu_ps(dst + (u0 + u) * D, r[u]);
    }
  }
#endif
  if constexpr (D > 0) {
    for (; u0 + L <= m; u0 += L) {
      T buf[D][L];
      for (int k = 0; k < D; ++k) std::memcpy(buf[k], src + k * mp + u0, sizeof buf[k]);
      T* o = dst + u0 * D;
      if (add) {
        for (int u = 0; u < L; ++u)
          for (int k = 0; k < D; ++k) o[u * D + k] += buf[k][u];
      } else {
        for (int u = 0; u < L; ++u)
          for (int k = 0; k < D; ++k) o[u * D + k] = buf[k][u];
      }
    }
  }
  for (int64_t u = u0; u < m; ++u)
    for (int64_t k = 0; k < d; ++k) {
      T& o = dst[u * d + k];
      o = add ? o + src[k * mp + u] : src[k * mp + u];
    }
}

template <class T>
struct LaneMoves {
  ToLanes<T> to;
  FromLanes<T> from;
};

template <class T>
LaneMoves<T> lane_moves(int64_t d) {
  switch (d) {
    case 1:
      return {&to_lanes<T, 1>, &from_lanes<T, 1>};
    case 3:
      return {&to_lanes<T, 3>, &from_lanes<T, 3>};
    case 5:
      return {&to_lanes<T, 5>, &from_lanes<T, 5>};
    case 7:
      return {&to_lanes<T, 7>, &from_lanes<T, 7>};
    default:
      return {&to_lanes<T, 0>, &from_lanes<T, 0>};
  }
}

template <class T>
using ChannelwiseForward = void (*)(int64_t m, int64_t d1, int64_t d3, const T* X, const T* w,
                                    const T* t, T* out, bool set, T* scratch);
template <class T>
using ChannelwiseBackward = void (*)(int64_t m, int64_t d1, int64_t d3, const T* X, const T* w,
                                     const T* G, const T* t, T* G1, T* gw, T* r, bool set);

template <class T, int D1, int D3>
void channelwise_forward(int64_t m, int64_t d1_, int64_t d3_, const T* __restrict X,
                         const T* __restrict w, const T* __restrict t, T* __restrict out, bool set,
                         T* __restrict scratch) {
  constexpr int L = kLanes<T>;
  const int64_t d1 = D1 ? D1 : d1_, d3 = D3 ? D3 : d3_, mp = round_up(m, L);
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && D1 > 0 && D3 > 0 && D3 <= 8) {
    // Straight into mul_ir: a vector of channels holds D3 output vectors, whose lane l of vector q
    // is channel (8q + l) / D3, component (8q + l) % D3 of the chunk; so output vector q is
    // sum_i perm_q(w x_i) * T[i][q], with perm_q a lane permutation and T[i][q] the row t[i, :]
    // spread the same way (built once per sample).
    __m256i chan[D3];
    __m256 tq[D1][D3];
    for (int q = 0; q < D3; ++q) {
      alignas(32) int32_t c[8], k[8];
      for (int l = 0; l < 8; ++l) c[l] = (8 * q + l) / D3, k[l] = (8 * q + l) % D3;
      chan[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
      const __m256i comp = _mm256_load_si256(reinterpret_cast<const __m256i*>(k));
      // t has 8 readable values past each row (see Scratch::a); lanes past D3 are not picked.
      for (int i = 0; i < D1; ++i)
        tq[i][q] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + i * D3), comp);
    }
    int64_t u = 0;
    for (; u + 8 <= m; u += 8) {
      __m256 wx[D1];
      const __m256 wv = _mm256_loadu_ps(w + u);
      for (int i = 0; i < D1; ++i) wx[i] = _mm256_mul_ps(wv, _mm256_loadu_ps(X + i * mp + u));
      float* o = out + u * D3;
      for (int q = 0; q < D3; ++q) {
        __m256 s = _mm256_mul_ps(_mm256_permutevar8x32_ps(wx[0], chan[q]), tq[0][q]);
        for (int i = 1; i < D1; ++i)
          s = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(wx[i], chan[q]), tq[i][q], s);
        if (!set) s = _mm256_add_ps(s, _mm256_loadu_ps(o + 8 * q));
        _mm256_storeu_ps(o + 8 * q, s);
      }
    }
    for (; u < m; ++u)
      for (int k = 0; k < D3; ++k) {
        float s = 0;
        for (int i = 0; i < D1; ++i) s += t[i * D3 + k] * X[i * mp + u];
        float& o = out[u * D3 + k];
        o = set ? w[u] * s : o + w[u] * s;
      }
    return;
  }
#endif
  // Any size or type: the lanes of the output in scratch [d3][mp], then moved to mul_ir.
  for (int64_t k = 0; k < d3; ++k) {
    T* o = scratch + k * mp;
    for (int64_t u = 0; u < mp; u += L) {
      Vec<T> s = t[k] * load(X + u);
      for (int64_t i = 1; i < d1; ++i) s += t[i * d3 + k] * load(X + i * mp + u);
      store(o + u, s * load(w + u));
    }
  }
  lane_moves<T>(d3).from(scratch, m, d3, out, !set);
}

template <class T, int D1, int D3>
void channelwise_backward(int64_t m, int64_t d1_, int64_t d3_, const T* __restrict X,
                          const T* __restrict w, const T* __restrict G, const T* __restrict t,
                          T* __restrict G1, T* __restrict gw, T* __restrict r, bool set) {
  constexpr int L = kLanes<T>;
  const int64_t d1 = D1 ? D1 : d1_, d3 = D3 ? D3 : d3_, mp = round_up(m, L);
  if constexpr (D1 == 0 || D3 == 0) {
    // Any size: r accumulates in memory, one channel vector at a time.
    std::fill(r, r + d1 * d3, T(0));
    for (int64_t u = 0; u < mp; u += L) {
      const Vec<T> wv = load(w + u);
      Vec<T> a{};
      for (int64_t i = 0; i < d1; ++i) {
        const Vec<T> x = load(X + i * mp + u);
        Vec<T> h{};
        for (int64_t k = 0; k < d3; ++k) h += t[i * d3 + k] * load(G + k * mp + u);
        store(G1 + i * mp + u, load(G1 + i * mp + u) + wv * h);
        a += x * h;
        const Vec<T> wx = wv * x;
        for (int64_t k = 0; k < d3; ++k) {
          const Vec<T> p = wx * load(G + k * mp + u);
          for (int l = 0; l < L; ++l) r[i * d3 + k] += p[l];
        }
      }
      for (int64_t l = 0; l < L && u + l < m; ++l) gw[u + l] = set ? a[l] : gw[u + l] + a[l];
    }
  } else {
    // r as D1 x D3 vector accumulators, reduced across lanes at the end.
    Vec<T> acc[D1][D3] = {};
    for (int64_t u = 0; u < mp; u += L) {
      const Vec<T> wv = load(w + u);
      Vec<T> g[D3];
      for (int k = 0; k < D3; ++k) g[k] = load(G + k * mp + u);
      Vec<T> a{};
      for (int i = 0; i < D1; ++i) {
        const Vec<T> x = load(X + i * mp + u);
        Vec<T> h = t[i * D3] * g[0];
        for (int k = 1; k < D3; ++k) h += t[i * D3 + k] * g[k];
        store(G1 + i * mp + u, load(G1 + i * mp + u) + wv * h);
        a += x * h;
        const Vec<T> wx = wv * x;
        for (int k = 0; k < D3; ++k) acc[i][k] += wx * g[k];
      }
      if (u + L <= m) {
        store(gw + u, set ? a : load(gw + u) + a);
      } else {
        for (int64_t l = 0; u + l < m; ++l) gw[u + l] = set ? a[l] : gw[u + l] + a[l];
      }
    }
    for (int i = 0; i < D1; ++i)
      for (int k = 0; k < D3; ++k) {
        T sum = 0;
        for (int l = 0; l < L; ++l) sum += acc[i][k][l];
        r[i * D3 + k] = sum;
      }
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

// For ranges [begin, end) of one array written in order: whether each is the first to touch its
// range (then it may overwrite), and the runs of the array that no overwriting range covers.
struct FirstTouch {
  std::vector<char> first;
  std::vector<std::pair<int64_t, int64_t>> zero_runs;

  FirstTouch() = default;
  FirstTouch(const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t dim) {
    std::vector<char> touched(dim, 0), written(dim, 0);
    for (const auto& [begin, end] : ranges) {
      const bool fresh =
          std::none_of(touched.begin() + begin, touched.begin() + end, [](char c) { return c; });
      first.push_back(fresh);
      std::fill(touched.begin() + begin, touched.begin() + end, 1);
      if (fresh) std::fill(written.begin() + begin, written.begin() + end, 1);
    }
    for (int64_t n = 0; n < dim;) {
      if (written[n]) {
        ++n;
        continue;
      }
      const int64_t begin = n;
      while (n < dim && !written[n]) ++n;
      zero_runs.emplace_back(begin, n);
    }
  }

  template <class T>
  void zero_unwritten(T* data) const {
    for (const auto& [begin, end] : zero_runs) std::fill(data + begin, data + end, T(0));
  }
};

template <class T>
struct Plan {
  std::vector<Path> paths;
  std::vector<Block> blocks;
  std::vector<int32_t> ijk;  // 3 per coefficient
  std::vector<T> val;        // coefficient times the path's normalisation
  int64_t dim1 = 0, dim2 = 0, dim_out = 0, num_weights = 0;
  int64_t max_dd = 1, max_chan = 1;  // scratch sizes

  // The channelwise route (every path uvu, weighted, mul2 = 1, each path's operands whole
  // blocks): per path its kernels and its in1 and output blocks; per block its place in lane
  // layout (see "channelwise kernels"). The output and the weight gradient are written by the
  // paths in turn: the first path to touch a range overwrites it instead of accumulating, and the
  // ranges that no path overwrites are zeroed first.
  struct LaneBlock {
    int64_t off, mul, dim, lane_off;
    LaneMoves<T> moves;
  };
  bool channelwise = false;
  std::vector<ChannelwiseKernels<T>> kernels;
  std::vector<LaneBlock> in1_lanes, out_lanes;
  std::vector<int64_t> path_in1, path_out;  // per path: index into in1_lanes / out_lanes
  int64_t dim1_lanes = 0, dim_out_lanes = 0, max_lanes = 0, max_block_lanes = 0;
  FirstTouch out_writes, gw_writes;

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
    channelwise = false;
    plan_lanes();
  }

  // Lane layout of the in1 and output blocks; leaves `channelwise` false when a path does not
  // cover whole blocks (the generic route then takes it).
  void plan_lanes() {
    const int64_t L = kLanes<T>;
    auto lanes_of = [&](int64_t operand, std::vector<LaneBlock>& out, int64_t& total) {
      for (const Block& b : blocks) {
        if (b.operand != operand) continue;
        out.push_back({b.off, b.mul, b.dim, total, lane_moves<T>(b.dim)});
        total += b.dim * round_up(b.mul, L);
        max_block_lanes = std::max(max_block_lanes, b.dim * round_up(b.mul, L));
      }
    };
    lanes_of(0, in1_lanes, dim1_lanes);
    lanes_of(2, out_lanes, dim_out_lanes);
    auto find = [](const std::vector<LaneBlock>& lanes, int64_t off, int64_t mul, int64_t dim) {
      for (size_t n = 0; n < lanes.size(); ++n)
        if (lanes[n].off == off && lanes[n].mul == mul && lanes[n].dim == dim)
          return static_cast<int64_t>(n);
      return int64_t{-1};
    };
    std::vector<std::pair<int64_t, int64_t>> out_ranges, w_ranges;
    for (const Path& p : paths) {
      path_in1.push_back(find(in1_lanes, p.off1, p.m1, p.d1));
      path_out.push_back(find(out_lanes, p.offo, p.mo, p.d3));
      if (path_in1.back() < 0 || path_out.back() < 0 || p.mo != p.m1) return;
      kernels.push_back(channelwise_kernels<T>(p.d1, p.d3));
      out_ranges.emplace_back(p.offo, p.offo + p.mo * p.d3);
      w_ranges.emplace_back(p.woff, p.woff + p.m1);
      max_lanes = std::max(max_lanes, round_up(p.m1, L));
    }
    out_writes = FirstTouch(out_ranges, dim_out);
    gw_writes = FirstTouch(w_ranges, num_weights);
    channelwise = true;
  }
};

// Per-thread scratch: transposed operands and small temporaries.
template <class T>
struct Scratch {
  std::vector<T> x1, x2, out, g1, g2, a, b, c;
  // channelwise route: in1 and its gradient, one block and the weights in lanes
  std::vector<T> x1_lanes, g1_lanes, block_lanes, w_lanes;
  explicit Scratch(const Plan<T>& plan)
      : x1(plan.channelwise ? 0 : plan.dim1),
        x2(plan.channelwise ? 0 : plan.dim2),
        out(plan.dim_out),
        g1(plan.channelwise ? 0 : plan.dim1),
        g2(plan.channelwise ? 0 : plan.dim2),
        a(plan.max_dd + 8),  // + 8: the channelwise forward reads a row of t as one vector
        b(plan.channelwise ? plan.max_dd : plan.max_chan),
        c(plan.channelwise ? 0 : plan.max_chan),
        x1_lanes(plan.dim1_lanes),
        g1_lanes(plan.dim1_lanes),
        block_lanes(plan.max_block_lanes),
        w_lanes(plan.max_lanes) {}
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

// Asks for n values at p to be brought into cache ahead of use: the kernels are fast enough per
// sample that waiting for the next sample's rows (a few KB, read in short runs the hardware
// prefetcher does not follow far enough) costs more than the arithmetic.
template <class T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
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

// The path's weights as whole vectors: in place when its channels fill them, else copied into
// zero-padded scratch (a vector load would run past the path's weights).
template <class T>
inline const T* lane_weights(const Path& p, const T* w, Scratch<T>& s) {
  if (p.m1 % kLanes<T> == 0) return w + p.woff;
  T* dst = s.w_lanes.data();
  std::copy(w + p.woff, w + p.woff + p.m1, dst);
  std::fill(dst + p.m1, dst + round_up(p.m1, kLanes<T>), T(0));
  return dst;
}

// One sample: x1 [dim1], x2 [dim2], w [num_weights] (ignored when no path has weights) -> out.
template <class T>
void forward_sample(const Plan<T>& plan, const T* x1, const T* x2, const T* w, T* out,
                    Scratch<T>& s) {
  if (plan.channelwise) {
    // The row is built in cache-resident scratch, then streamed out: writing the output
    // directly would first read every line of it from memory (write-allocate).
    T* X = s.x1_lanes.data();
    T* row = s.out.data();
    T* t = s.a.data();
    for (const auto& b : plan.in1_lanes) b.moves.to(x1 + b.off, b.mul, b.dim, X + b.lane_off);
    plan.out_writes.zero_unwritten(row);
    for (size_t n = 0; n < plan.paths.size(); ++n) {
      const Path& p = plan.paths[n];
      contract_second(plan, p, x2 + p.off2, 1, t);
      plan.kernels[n].forward(p.m1, p.d1, p.d3, X + plan.in1_lanes[plan.path_in1[n]].lane_off,
                              lane_weights(p, w, s), t, row + p.offo, plan.out_writes.first[n],
                              s.block_lanes.data());
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
// own1 / ownw say that g1 / gw are this sample's own rows, to be written in full: the channelwise
// route then ignores their prior contents (overwriting where a path touches first, zeroing the
// rest), which spares a zeroing pass and the reads; the other route needs them zeroed.
template <class T>
void backward_sample(const Plan<T>& plan, const T* gout, const T* x1, const T* x2, const T* w,
                     T* g1, T* g2, T* gw, Scratch<T>& s, bool own1 = false, bool ownw = false) {
  if (plan.channelwise) {
    T* X = s.x1_lanes.data();
    T* G1 = s.g1_lanes.data();
    T* G = s.block_lanes.data();
    T* t = s.a.data();
    T* r = s.b.data();
    for (const auto& b : plan.in1_lanes) b.moves.to(x1 + b.off, b.mul, b.dim, X + b.lane_off);
    std::fill(G1, G1 + plan.dim1_lanes, T(0));
    if (ownw) plan.gw_writes.zero_unwritten(gw);
    for (size_t n = 0; n < plan.paths.size(); ++n) {
      const Path& p = plan.paths[n];
      const auto& bo = plan.out_lanes[plan.path_out[n]];
      bo.moves.to(gout + bo.off, bo.mul, bo.dim, G);
      contract_second(plan, p, x2 + p.off2, 1, t);
      const int64_t x_off = plan.in1_lanes[plan.path_in1[n]].lane_off;
      plan.kernels[n].backward(p.m1, p.d1, p.d3, X + x_off, lane_weights(p, w, s), G, t, G1 + x_off,
                               gw + p.woff, r, ownw && plan.gw_writes.first[n]);
      // d x2[j] = sum C[i,j,k] r[i,k]
      for (int64_t c = p.cg_begin; c < p.cg_end; ++c) {
        const int32_t* q = &plan.ijk[3 * c];
        g2[p.off2 + q[1]] += plan.val[c] * r[q[0] * p.d3 + q[2]];
      }
    }
    for (const auto& b : plan.in1_lanes)
      b.moves.from(G1 + b.lane_off, b.mul, b.dim, g1 + b.off, !own1);
    return;
  }
  if (own1) std::fill(g1, g1 + plan.dim1, T(0));
  if (ownw) std::fill(gw, gw + plan.num_weights, T(0));
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
