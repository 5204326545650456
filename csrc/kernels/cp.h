// CP (rank-R) bilinear map of the TDN tensor product: the math, free of torch.
//
// One sample: x [I, Cc] (channels last), v [R] = B^T y (the second operand, shared by all
// channels, projected once by the caller), factors At = A^T [R, I], C [K, R], Ct = C^T [R, K]:
//   u[r, c] = sum_i A[i, r] x[i, c],   out[k, c] = sum_r C[k, r] v[r] u[r, c].
// Channels are the innermost, contiguous dimension, so every inner loop is a vector sweep over
// channels; blocks of kLanes channels are accumulated in registers across the contraction.
#pragma once

#include <algorithm>
#include <cstdint>

namespace equikern::cp {

// Channels per register block: 2 AVX2 registers of float32, times kRows rows: 8 accumulators.
constexpr int64_t kLanes = 16;

// dst[m, c] = scale[m] * sum_n W[m, n] src[n, c] for c in [c0, c0 + width); W is [M, N] row-major,
// src [N, Cc] and dst [M, Cc] with row stride Cc. scale may be null (all ones). Rows m are taken
// kRows at a time so that every src load feeds kRows FMAs (loads, not FMAs, bound a single row).
constexpr int64_t kRows = 4;

template <class T, int64_t Width, int64_t Rows>
inline void contract_rows(const T* W, const T* scale, const T* src, int64_t m0, int64_t N,
                          int64_t Cc, int64_t c0, T* dst) {
  T acc[Rows][Width] = {};
  for (int64_t n = 0; n < N; ++n) {
    const T* s = src + n * Cc + c0;
    for (int64_t m = 0; m < Rows; ++m) {
      const T a = W[(m0 + m) * N + n];
#pragma omp simd
      for (int64_t c = 0; c < Width; ++c) acc[m][c] += a * s[c];
    }
  }
  for (int64_t m = 0; m < Rows; ++m) {
    const T f = scale ? scale[m0 + m] : T(1);
    T* d = dst + (m0 + m) * Cc + c0;
#pragma omp simd
    for (int64_t c = 0; c < Width; ++c) d[c] = f * acc[m][c];
  }
}

template <class T, int64_t Width>
inline void contract_block(const T* W, const T* scale, const T* src, int64_t M, int64_t N,
                           int64_t Cc, int64_t c0, T* dst) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows)
    contract_rows<T, Width, kRows>(W, scale, src, m, N, Cc, c0, dst);
  for (; m < M; ++m) contract_rows<T, Width, 1>(W, scale, src, m, N, Cc, c0, dst);
}

// The same over all Cc channels: full register blocks, then the remainder one channel at a time.
template <class T>
inline void contract(const T* W, const T* scale, const T* src, int64_t M, int64_t N, int64_t Cc,
                     T* dst) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= Cc; c0 += kLanes)
    contract_block<T, kLanes>(W, scale, src, M, N, Cc, c0, dst);
  for (; c0 < Cc; ++c0) contract_block<T, 1>(W, scale, src, M, N, Cc, c0, dst);
}

// Forward of one sample; u is scratch [R, Cc].
template <class T>
inline void forward_sample(const T* x, const T* v, const T* At, const T* C, int64_t I, int64_t R,
                           int64_t K, int64_t Cc, T* u, T* out) {
  contract(At, v, x, R, I, Cc, u);
  contract(C, static_cast<const T*>(nullptr), u, K, R, Cc, out);
}

// Backward of one sample for the output gradient g [K, Cc]. Writes gx [I, Cc] and
// q[r] = sum_c h[r, c] u[r, c] with h = C^T g (from which the caller forms the gradients of y and
// B). With gA [I, R] and gC [K, R] non-null it adds this sample's share of the factor gradients:
// gA[i, r] += sum_c x[i, c] v[r] h[r, c] and gC[k, r] += sum_c g[k, c] v[r] u[r, c].
// u and h are scratch [R, Cc].
template <class T>
inline void backward_sample(const T* g, const T* x, const T* v, const T* A, const T* At,
                            const T* Ct, int64_t I, int64_t R, int64_t K, int64_t Cc, T* u, T* h,
                            T* gx, T* q, T* gA, T* gC) {
  contract(At, static_cast<const T*>(nullptr), x, R, I, Cc, u);
  contract(Ct, static_cast<const T*>(nullptr), g, R, K, Cc, h);
  for (int64_t r = 0; r < R; ++r) {
    const T* hr = h + r * Cc;
    const T* ur = u + r * Cc;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < Cc; ++c) s += hr[c] * ur[c];
    q[r] = s;
  }
  // v enters gx and gA through h only after q, which does not involve it.
  for (int64_t r = 0; r < R; ++r) {
    T* hr = h + r * Cc;
    const T vr = v[r];
#pragma omp simd
    for (int64_t c = 0; c < Cc; ++c) hr[c] *= vr;
  }
  contract(A, static_cast<const T*>(nullptr), h, I, R, Cc, gx);
  if (gA == nullptr) return;
  for (int64_t i = 0; i < I; ++i)
    for (int64_t r = 0; r < R; ++r) {
      const T* xi = x + i * Cc;
      const T* hr = h + r * Cc;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < Cc; ++c) s += xi[c] * hr[c];
      gA[i * R + r] += s;
    }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) {
      const T* gk = g + k * Cc;
      const T* ur = u + r * Cc;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < Cc; ++c) s += gk[c] * ur[c];
      gC[k * R + r] += v[r] * s;
    }
}

}  // namespace equikern::cp
