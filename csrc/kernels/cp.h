// CP (rank-R) bilinear map of the TDN tensor product: the math, free of torch.
//
// One sample: x [I, Cc] (channels last), second operand y [J] shared by all Cc channels, channel
// weights w [Cc] (optional), factors A [I, R], B [J, R], C [K, R]:
//   out[k, c] = w[c] sum_r C[k, r] v[r] u[r, c],  v = B^T y,  u = A^T x.
// Two routes compute it:
//   factors: u = A^T x, then C (v * u) per channel: 2 (I + K) R multiply-adds per channel.
//   matrix:  the per-sample matrix M = C diag(v) A^T [K, I] = sum_s p[s] P[s] (built from S small
//            planned matrices P, see cpu/cp.cpp), then out = M x: K I multiply-adds per channel,
//            the cost of M (S K I) paid once per sample and shared by its channels.
// Channels are the innermost, contiguous dimension: every kernel below is a small matrix product
// whose tiles keep Rows x NV vector accumulators in registers while they sweep a contraction
// index, so that each loaded vector of channels feeds Rows multiply-adds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace equikern::cp {

// One SIMD register of T (GCC/Clang vector extension: 32 bytes, an AVX2 register). The scalar T
// itself serves as the one-lane "vector" of channel tails, so every kernel is written once.
template <class T>
struct Simd {
  typedef T type __attribute__((vector_size(32)));
};

template <class T, class V>
constexpr int64_t kLanesOf = static_cast<int64_t>(sizeof(V) / sizeof(T));

// Unaligned loads and stores (memcpy compiles to one vmovups).
template <class V, class T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <class V, class T>
inline V splat(T a) {
  return a - V{};  // folds to one broadcast (a + V{} cannot: -0.0 + 0.0 is +0.0)
}

// Stores that bypass the cache (no read of the destination line first, and the output does not
// evict the inputs) for whole aligned vectors; plain stores otherwise. Callers end with
// stream_fence() before the output is read by another thread.
template <class T, class V>
inline void stream(T* p, const V& v) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32 && std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, (__m256)v);
  } else if constexpr (sizeof(V) == 32 && std::is_same_v<T, double>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_pd(p, (__m256d)v);
  }
#endif
  store(p, v);
}

// Asks for bytes [p, p + n) ahead of use: the next sample's block, fetched while this one computes
// (hardware prefetchers track few of the row streams that a tile walks through at once).
inline void prefetch(const void* p, int64_t n) {
#if defined(__SSE__)
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < n; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
#endif
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

template <class T, class V>
inline T hsum(const V& v) {
  if constexpr (sizeof(V) == sizeof(T)) {
    return v;
  } else {
    T s = 0;
    for (int64_t l = 0; l < kLanesOf<T, V>; ++l) s += v[l];
    return s;
  }
}

// Tile sizes: kRows x kVecs accumulators (12 of the 16 AVX2 registers) leave room for the loaded
// operands. Measured on Zen 3 (in-cache forward, d = 4, 9, 16, 128 channels): 3 x 4 reached
// 42-64 GFLOP/s on one core against 31-53 for 4 x 2 and 36-60 for 4 x 3; 6 x 2 was close.
constexpr int64_t kRows = 3;
constexpr int64_t kVecs = 4;

// ---- dst[m, c] = epi(sum_n W[m, n] src[n, c])
// -----------------------------------------------------

// One tile: rows [0, Rows) of W (row stride ldw), NV vectors of channels of src (row stride lds).
// epi(m, c, value) receives each finished accumulator (c: channel offset within the tile).
template <class T, class V, int64_t Rows, int64_t NV, class Epi>
inline void gemm_tile(const T* W, int64_t ldw, const T* src, int64_t lds, int64_t N, Epi& epi) {
  constexpr int64_t L = kLanesOf<T, V>;
  V acc[Rows][NV];
  for (int64_t m = 0; m < Rows; ++m)
    for (int64_t n = 0; n < NV; ++n) acc[m][n] = V{};
  for (int64_t j = 0; j < N; ++j) {
    V s[NV];
    for (int64_t n = 0; n < NV; ++n) s[n] = load<V>(src + j * lds + n * L);
    for (int64_t m = 0; m < Rows; ++m) {
      const V a = splat<V>(W[m * ldw + j]);
      for (int64_t n = 0; n < NV; ++n) acc[m][n] += a * s[n];
    }
  }
  for (int64_t m = 0; m < Rows; ++m)
    for (int64_t n = 0; n < NV; ++n) epi(m, n * L, acc[m][n]);
}

// The last rows < kRows of a matrix, as one tile of exactly that many rows.
template <class T, class V, int64_t NV, int64_t Rows, class Epi>
inline void gemm_last(int64_t rows, const T* W, int64_t N, const T* src, int64_t lds, Epi& epi) {
  if constexpr (Rows > 0) {
    if (rows == Rows) return gemm_tile<T, V, Rows, NV>(W, N, src, lds, N, epi);
    gemm_last<T, V, NV, Rows - 1>(rows, W, N, src, lds, epi);
  }
}

// All M rows of W [M, N] against the channels [c0, c0 + NV lanes) of src [N, Cc].
template <class T, class V, int64_t NV, class Epi>
inline void gemm_rows(const T* W, int64_t M, int64_t N, const T* src, int64_t Cc, int64_t c0,
                      Epi& epi) {
  int64_t m0 = 0;
  auto at = [&](int64_t m, int64_t c, const V& v) { epi(m0 + m, c0 + c, v); };
  for (; m0 + kRows <= M; m0 += kRows)
    gemm_tile<T, V, kRows, NV>(W + m0 * N, N, src + c0, Cc, N, at);
  if (m0 < M) gemm_last<T, V, NV, kRows - 1>(M - m0, W + m0 * N, N, src + c0, Cc, at);
}

// epi(m, c, value) is called once for every m < M and channel c < Cc, with value a vector of the
// channels [c, c + lanes) or, in the tail, a scalar: a generic lambda handles both.
template <class T, class Epi>
inline void gemm(const T* W, int64_t M, int64_t N, const T* src, int64_t Cc, Epi&& epi) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = kLanesOf<T, V>;
  int64_t c0 = 0;
  for (; c0 + kVecs * L <= Cc; c0 += kVecs * L) gemm_rows<T, V, kVecs>(W, M, N, src, Cc, c0, epi);
  for (; c0 + L <= Cc; c0 += L) gemm_rows<T, V, 1>(W, M, N, src, Cc, c0, epi);
  for (; c0 < Cc; ++c0) gemm_rows<T, T, 1>(W, M, N, src, Cc, c0, epi);
}

// ---- G[k, i] = sum_c a[k, c] w[c] b[i, c]: contraction over the channels
// -------------------------

// Sums of the lanes of kLanesOf<T, V> vectors, as one vector (out[l] = sum of v[l]'s lanes): a
// transposing tree of pairwise adds, a few shuffles for all of them instead of a reduction each.
// Summation order is fixed, as for any other reduction here.
template <class T, class V>
inline V reduce_lanes(const V* v) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32 && std::is_same_v<T, float>) {
    auto h = [](const V& a, const V& b) { return (V)_mm256_hadd_ps((__m256)a, (__m256)b); };
    const V u0 = h(h(v[0], v[1]), h(v[2], v[3])), u1 = h(h(v[4], v[5]), h(v[6], v[7]));
    return (V)_mm256_add_ps(_mm256_permute2f128_ps((__m256)u0, (__m256)u1, 0x20),
                            _mm256_permute2f128_ps((__m256)u0, (__m256)u1, 0x31));
  } else if constexpr (sizeof(V) == 32 && std::is_same_v<T, double>) {
    const __m256d t0 = _mm256_hadd_pd((__m256d)v[0], (__m256d)v[1]);
    const __m256d t1 = _mm256_hadd_pd((__m256d)v[2], (__m256d)v[3]);
    return (V)_mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20),
                            _mm256_permute2f128_pd(t0, t1, 0x31));
  }
#endif
  V out;
  for (int64_t l = 0; l < kLanesOf<T, V>; ++l) out[l] = hsum<T>(v[l]);
  return out;
}

// Rows [0, Rk) of a and [0, Ri) of b (row stride Cc); w may be null (all ones). Lanes of channels
// are summed in registers, then across lanes, then the scalar tail: a fixed order.
template <class T, int64_t Rk, int64_t Ri>
inline void gram_tile(const T* a, const T* b, const T* w, int64_t Cc, T* G, int64_t ldg) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = kLanesOf<T, V>;
  V acc[Rk * Ri];
  for (int64_t n = 0; n < Rk * Ri; ++n) acc[n] = V{};
  int64_t c = 0;
  for (; c + L <= Cc; c += L) {
    const V wv = w ? load<V>(w + c) : splat<V>(T(1));
    V bw[Ri];
    for (int64_t i = 0; i < Ri; ++i) bw[i] = load<V>(b + i * Cc + c) * wv;
    for (int64_t k = 0; k < Rk; ++k) {
      const V av = load<V>(a + k * Cc + c);
      for (int64_t i = 0; i < Ri; ++i) acc[k * Ri + i] += av * bw[i];
    }
  }
  T sums[Rk * Ri];
  if constexpr ((Rk * Ri) % L == 0) {
    for (int64_t n = 0; n < Rk * Ri; n += L) store(sums + n, reduce_lanes<T>(acc + n));
  } else {
    for (int64_t n = 0; n < Rk * Ri; ++n) sums[n] = hsum<T>(acc[n]);
  }
  for (int64_t k = 0; k < Rk; ++k)
    for (int64_t i = 0; i < Ri; ++i) {
      T s = sums[k * Ri + i];
      for (int64_t t = c; t < Cc; ++t) s += a[k * Cc + t] * (w ? w[t] : T(1)) * b[i * Cc + t];
      G[k * ldg + i] = s;
    }
}

template <class T>
inline void gram(const T* a, int64_t K, const T* b, int64_t I, const T* w, int64_t Cc, T* G) {
  constexpr int64_t Rk = 4, Ri = 2;
  int64_t k = 0;
  for (; k + Rk <= K; k += Rk) {
    int64_t i = 0;
    for (; i + Ri <= I; i += Ri)
      gram_tile<T, Rk, Ri>(a + k * Cc, b + i * Cc, w, Cc, G + k * I + i, I);
    for (; i < I; ++i) gram_tile<T, Rk, 1>(a + k * Cc, b + i * Cc, w, Cc, G + k * I + i, I);
  }
  for (; k < K; ++k)
    for (int64_t i = 0; i < I; ++i)
      gram_tile<T, 1, 1>(a + k * Cc, b + i * Cc, w, Cc, G + k * I + i, I);
}

// ---- small dense helpers for the per-sample matrices
// ----------------------------------------------

// dst[t] = sum_s p[s] P[s, t] for t < n: the per-sample matrix from the planned ones.
template <class T>
inline void combine(const T* p, int64_t S, const T* P, int64_t n, T* dst) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = kLanesOf<T, V>, Q = 8;  // 8 independent accumulators
  int64_t t = 0;
  for (; t + Q * L <= n; t += Q * L) {
    V acc[Q] = {};
    for (int64_t s = 0; s < S; ++s) {
      const V a = splat<V>(p[s]);
      for (int64_t q = 0; q < Q; ++q) acc[q] += a * load<V>(P + s * n + t + q * L);
    }
    for (int64_t q = 0; q < Q; ++q) store(dst + t + q * L, acc[q]);
  }
  for (; t < n; ++t) {
    T acc = 0;
    for (int64_t s = 0; s < S; ++s) acc += p[s] * P[s * n + t];
    dst[t] = acc;
  }
}

// out[s] = sum_t P[s, t] G[t]: the gradient of the combination weights p. Four rows at a time, so
// that four independent accumulators hide the latency of the multiply-adds.
template <class T>
inline void dots(const T* P, int64_t S, int64_t n, const T* G, T* out) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = kLanesOf<T, V>, Q = 4;
  int64_t s = 0;
  for (; s + Q <= S; s += Q) {
    V acc[Q] = {};
    int64_t t = 0;
    for (; t + L <= n; t += L) {
      const V g = load<V>(G + t);
      for (int64_t q = 0; q < Q; ++q) acc[q] += load<V>(P + (s + q) * n + t) * g;
    }
    for (int64_t q = 0; q < Q; ++q) {
      T r = hsum<T>(acc[q]);
      for (int64_t u = t; u < n; ++u) r += P[(s + q) * n + u] * G[u];
      out[s + q] = r;
    }
  }
  for (; s < S; ++s) {
    T r = 0;
    for (int64_t t = 0; t < n; ++t) r += P[s * n + t] * G[t];
    out[s] = r;
  }
}

// ---- the matrix route, one sample
// ------------------------------------------------------------------

// out [K, Cc] = (M x) scaled by w per channel (w may be null); M is [K, I]. With Stream the
// output goes out with non-temporal stores (see stream()).
template <bool Stream = false, class T>
inline void matrix_forward(const T* M, const T* x, const T* w, int64_t K, int64_t I, int64_t Cc,
                           T* out) {
  gemm(M, K, I, x, Cc, [&](int64_t k, int64_t c, const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    const V value = w ? v * load<V>(w + c) : v;
    if constexpr (Stream) {
      stream(out + k * Cc + c, value);
    } else {
      store(out + k * Cc + c, value);
    }
  });
}

// For the output gradient g [K, Cc], with h = M^T g (Mt = M^T is [I, K]):
//   gx [I, Cc] = w * h,   gw [Cc] = sum_i x * h (when w is given),   G [K, I] = sum_c g w x^T,
// the sample's gradient of M. gx goes out with non-temporal stores (callers end with
// stream_fence()).
template <class T>
inline void matrix_backward(const T* Mt, const T* g, const T* x, const T* w, int64_t K, int64_t I,
                            int64_t Cc, T* gx, T* gw, T* G) {
  if (w) std::fill(gw, gw + Cc, T(0));
  gemm(Mt, I, K, g, Cc, [&](int64_t i, int64_t c, const auto& h) {
    using V = std::remove_cvref_t<decltype(h)>;
    if (w) {
      stream(gx + i * Cc + c, h * load<V>(w + c));
      store(gw + c, load<V>(gw + c) + h * load<V>(x + i * Cc + c));
    } else {
      stream(gx + i * Cc + c, h);
    }
  });
  gram(g, K, x, I, w, Cc, G);
}

// ---- the factors route, one sample
// -------------------------------------------------------------------

// At = A^T [R, I], C [K, R]; u is scratch [R, Cc].
template <class T>
inline void factors_forward(const T* x, const T* v, const T* w, const T* At, const T* C, int64_t I,
                            int64_t R, int64_t K, int64_t Cc, T* u, T* out) {
  gemm(At, R, I, x, Cc,
       [&](int64_t r, int64_t c, const auto& s) { store(u + r * Cc + c, v[r] * s); });
  matrix_forward(C, u, w, K, R, Cc, out);
}

// Backward for the output gradient g [K, Cc]: gx [I, Cc], gw [Cc] (when w is given) and
// q[r] = sum_c w[c] (C^T g)[r, c] u[r, c], the gradient of v. With gA [I, R] and gC [K, R]
// non-null it also writes (overwrites) this sample's shares of the factor gradients:
//   gA[i, r] = sum_c x[i, c] v[r] w[c] (C^T g)[r, c],  gC[k, r] = sum_c g[k, c] v[r] w[c] u[r, c].
// u and h are scratch [R, Cc].
template <class T>
inline void factors_backward(const T* g, const T* x, const T* v, const T* w, const T* A,
                             const T* At, const T* Ct, int64_t I, int64_t R, int64_t K, int64_t Cc,
                             T* u, T* h, T* gx, T* gw, T* q, T* gA, T* gC) {
  auto put = [](T* dst, int64_t Cc) {
    return [dst, Cc](int64_t m, int64_t c, const auto& s) { store(dst + m * Cc + c, s); };
  };
  gemm(At, R, I, x, Cc, put(u, Cc));
  gemm(Ct, R, K, g, Cc, put(h, Cc));
  if (w) {  // out = w * (C (v u)): the weight's gradient is sum_r v h u before h takes w
    std::fill(gw, gw + Cc, T(0));
    for (int64_t r = 0; r < R; ++r) {
      const T* hr = h + r * Cc;
      const T* ur = u + r * Cc;
      const T vr = v[r];
#pragma omp simd
      for (int64_t c = 0; c < Cc; ++c) gw[c] += vr * hr[c] * ur[c];
    }
    for (int64_t r = 0; r < R; ++r) {
      T* hr = h + r * Cc;
#pragma omp simd
      for (int64_t c = 0; c < Cc; ++c) hr[c] *= w[c];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    T* hr = h + r * Cc;
    const T* ur = u + r * Cc;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < Cc; ++c) s += hr[c] * ur[c];
    q[r] = s;
    const T vr = v[r];  // v enters gx and gA through h, after q (which does not involve it)
#pragma omp simd
    for (int64_t c = 0; c < Cc; ++c) hr[c] *= vr;
  }
  gemm(A, I, R, h, Cc, put(gx, Cc));
  if (gA == nullptr) return;
  gram(x, I, h, R, static_cast<const T*>(nullptr), Cc, gA);
  gram(g, K, u, R, w, Cc, gC);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) gC[k * R + r] *= v[r];
}

}  // namespace equikern::cp
