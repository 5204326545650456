// Gaunt products: the math, free of torch. Two methods share the row-block machinery below.
//
// Sphere grid (Gauss-Legendre x uniform phi). A real spherical harmonic of e3nn factorises on a
// ring of fixed theta: Y_lm(theta_t, phi_k) = P[t, lm] * trig[k, m] with trig[k, m] = cos(m phi_k)
// for m >= 0 and sin(|m| phi_k) for m < 0. Going to the grid is therefore a Legendre step per ring
// (coefficients -> one value per m) and a phi step (m -> phi_k); back is the transpose, with the
// quadrature weights folded into P. Because phi_k = 2 pi k / n_phi, cos is even and sin is odd
// under k -> n_phi - k, so the phi step only visits k <= n_phi / 2 and gets the mirrored ring point
// from the same sums.
//
// Dense: the sparse Gaunt tensor itself, a list of nonzero entries (i, j, k, G_ijk); at small
// degrees it has fewer entries than the grid has work per row (83 at L = 2).
//
// Rows (one channel of one sample) are processed in blocks of kBlock, stored transposed
// ([index][row]) so that every step is a broadcast multiply-add over the block, which the compiler
// vectorises. Loading a block is also where the memory layout is resolved, so both methods read
// e3nn's flat layout directly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace equikern::gaunt {

constexpr int64_t kBlock = 32;

// Where the coefficients of one row lie inside its sample: coefficient i (lm) of channel c is at
// offset[i] + c * stride[i]. The channel layout [C, (L + 1)^2] has offset i and stride (L + 1)^2;
// e3nn's flat layout stores degree l as a block [C, 2l + 1] after the lower degrees (offset
// C l^2 + l + m, stride 2l + 1). With one channel the two coincide.
struct Layout {
  std::vector<int64_t> offset, stride;
  Layout(int64_t lmax, int64_t channels, bool flat) {
    const int64_t dim = (lmax + 1) * (lmax + 1);
    for (int64_t l = 0; l <= lmax; ++l)
      for (int64_t m = -l; m <= l; ++m) {
        offset.push_back(flat ? channels * l * l + l + m : l * l + l + m);
        stride.push_back(flat ? 2 * l + 1 : dim);
      }
  }
  int64_t dim() const { return static_cast<int64_t>(offset.size()); }
  int64_t sample_size(int64_t channels) const { return channels * dim(); }
};

// The rows of one block: sample[r] points at the sample holding row r (nullptr: a padding row,
// read as zeros and never written), channel[r] is the row's channel in it.
template <class P>
struct BlockRows {
  P sample[kBlock];
  int64_t channel[kBlock];
};

// How a block's rows sit in memory. Rows enumerate (sample, channel) pairs in order, so a block
// whose first and last rows share a sample is either kBlock consecutive channels of it or, for an
// operand shared by all channels, one row repeated; those cases get plain strided loops.
enum class Shape { kGeneral, kConsecutive, kRepeated };

template <class P>
inline Shape shape_of(const BlockRows<P>& rows) {
  if (!rows.sample[0] || rows.sample[kBlock - 1] != rows.sample[0]) return Shape::kGeneral;
  const int64_t span = rows.channel[kBlock - 1] - rows.channel[0];
  return span == kBlock - 1 ? Shape::kConsecutive : span == 0 ? Shape::kRepeated : Shape::kGeneral;
}

// x is [dim][kBlock].
template <class T>
inline void load_block(const Layout& lay, const BlockRows<const T*>& rows, T* x) {
  const Shape shape = shape_of(rows);
  for (int64_t i = 0; i < lay.dim(); ++i) {
    const int64_t off = lay.offset[i], st = lay.stride[i];
    T* xi = x + i * kBlock;
    if (shape == Shape::kConsecutive) {
      const T* src = rows.sample[0] + off + rows.channel[0] * st;
      for (int64_t r = 0; r < kBlock; ++r) xi[r] = src[r * st];
    } else if (shape == Shape::kRepeated) {
      std::fill(xi, xi + kBlock, rows.sample[0][off + rows.channel[0] * st]);
    } else {
      for (int64_t r = 0; r < kBlock; ++r)
        xi[r] = rows.sample[r] ? rows.sample[r][off + rows.channel[r] * st] : T(0);
    }
  }
}

// Output rows are never repeated (every row has its own channel).
template <class T>
inline void store_block(const Layout& lay, const T* x, const BlockRows<T*>& rows) {
  const bool consecutive = shape_of(rows) == Shape::kConsecutive;
  for (int64_t i = 0; i < lay.dim(); ++i) {
    const int64_t off = lay.offset[i], st = lay.stride[i];
    const T* xi = x + i * kBlock;
    if (consecutive) {
      T* dst = rows.sample[0] + off + rows.channel[0] * st;
      for (int64_t r = 0; r < kBlock; ++r) dst[r * st] = xi[r];
    } else {
      for (int64_t r = 0; r < kBlock; ++r)
        if (rows.sample[r]) rows.sample[r][off + rows.channel[r] * st] = xi[r];
    }
  }
}

// The grid shared by every operand: trig is [n_phi, 2 * mmax + 1], column m + mmax.
template <class T>
struct Grid {
  int64_t n_theta, n_phi, mmax;
  const T* trig;
};

// One operand: degrees 0..lmax, P [n_theta, (lmax + 1)^2].
template <class T>
struct Side {
  int64_t lmax;
  const T* legendre;
  int64_t dim() const { return (lmax + 1) * (lmax + 1); }
};

// a[m + L][:] = sum_l P[t, lm] x[lm][:], for ring t.
template <class T>
inline void legendre_to_ring(const Side<T>& s, int64_t t, const T* x, T* a) {
  const int64_t L = s.lmax;
  const T* p = s.legendre + t * s.dim();
  std::fill(a, a + (2 * L + 1) * kBlock, T(0));
  for (int64_t l = 0; l <= L; ++l)
    for (int64_t m = -l; m <= l; ++m) {
      const int64_t i = l * l + l + m;
      const T c = p[i];
      const T* xi = x + i * kBlock;
      T* ai = a + (m + L) * kBlock;
#pragma omp simd
      for (int64_t r = 0; r < kBlock; ++r) ai[r] += c * xi[r];
    }
}

// The transpose: out[lm][:] += P[t, lm] a[m + L][:].
template <class T>
inline void ring_to_legendre(const Side<T>& s, int64_t t, const T* a, T* out) {
  const int64_t L = s.lmax;
  const T* p = s.legendre + t * s.dim();
  for (int64_t l = 0; l <= L; ++l)
    for (int64_t m = -l; m <= l; ++m) {
      const int64_t i = l * l + l + m;
      const T c = p[i];
      const T* ai = a + (m + L) * kBlock;
      T* oi = out + i * kBlock;
#pragma omp simd
      for (int64_t r = 0; r < kBlock; ++r) oi[r] += c * ai[r];
    }
}

// Values at phi_k and phi_{n-k} of the ring function with per-m coefficients a (degree L):
// even = the cos part, odd = the sin part; f(phi_k) = even + odd, f(phi_{n-k}) = even - odd.
template <class T>
inline void ring_point(const Grid<T>& g, int64_t k, int64_t L, const T* a, T* even, T* odd) {
  const T* tk = g.trig + k * (2 * g.mmax + 1) + g.mmax;
  std::copy(a + L * kBlock, a + (L + 1) * kBlock, even);
  std::fill(odd, odd + kBlock, T(0));
  for (int64_t m = 1; m <= L; ++m) {
    const T c = tk[m], s = tk[-m];
    const T* ac = a + (L + m) * kBlock;
    const T* as = a + (L - m) * kBlock;
#pragma omp simd
    for (int64_t r = 0; r < kBlock; ++r) {
      even[r] += c * ac[r];
      odd[r] += s * as[r];
    }
  }
}

// The transpose of ring_point: a[m] += trig * (h_k + h_{n-k}) for cos, trig * (h_k - h_{n-k}) for
// sin; `sum` and `diff` hold those two combinations.
template <class T>
inline void ring_point_adjoint(const Grid<T>& g, int64_t k, int64_t L, const T* sum, const T* diff,
                               T* a) {
  const T* tk = g.trig + k * (2 * g.mmax + 1) + g.mmax;
  T* a0 = a + L * kBlock;
#pragma omp simd
  for (int64_t r = 0; r < kBlock; ++r) a0[r] += sum[r];
  for (int64_t m = 1; m <= L; ++m) {
    const T c = tk[m], s = tk[-m];
    T* ac = a + (L + m) * kBlock;
    T* as = a + (L - m) * kBlock;
#pragma omp simd
    for (int64_t r = 0; r < kBlock; ++r) {
      ac[r] += c * sum[r];
      as[r] += s * diff[r];
    }
  }
}

// Whether phi_{n-k} is another grid point than phi_k (k = 0 and, for even n, k = n / 2 are not).
inline bool mirrored(int64_t k, int64_t n_phi) { return k != 0 && 2 * k != n_phi; }

// Scratch of one thread for a block of rows.
template <class T>
struct Workspace {
  std::vector<T> xa, xb, out, ra, rb, rc, ea, oa, eb, ob, sum, diff;
  Workspace(const Side<T>& a, const Side<T>& b, const Side<T>& c)
      : xa(a.dim() * kBlock),
        xb(b.dim() * kBlock),
        out(c.dim() * kBlock),
        ra((2 * a.lmax + 1) * kBlock),
        rb((2 * b.lmax + 1) * kBlock),
        rc((2 * c.lmax + 1) * kBlock),
        ea(kBlock),
        oa(kBlock),
        eb(kBlock),
        ob(kBlock),
        sum(kBlock),
        diff(kBlock) {}
};

// out rows = analysis_c(synthesis_a(a) * synthesis_b(b)) for one block, never holding more than
// one ring point of the grid.
template <class T>
void product_block(const Grid<T>& g, const Side<T>& sa, const Side<T>& sb, const Side<T>& sc,
                   const Layout& la, const Layout& lb, const Layout& lc,
                   const BlockRows<const T*>& a_rows, const BlockRows<const T*>& b_rows,
                   const BlockRows<T*>& out_rows, Workspace<T>& w) {
  load_block(la, a_rows, w.xa.data());
  load_block(lb, b_rows, w.xb.data());
  std::fill(w.out.begin(), w.out.end(), T(0));
  for (int64_t t = 0; t < g.n_theta; ++t) {
    legendre_to_ring(sa, t, w.xa.data(), w.ra.data());
    legendre_to_ring(sb, t, w.xb.data(), w.rb.data());
    std::fill(w.rc.begin(), w.rc.end(), T(0));
    for (int64_t k = 0; 2 * k <= g.n_phi; ++k) {
      ring_point(g, k, sa.lmax, w.ra.data(), w.ea.data(), w.oa.data());
      ring_point(g, k, sb.lmax, w.rb.data(), w.eb.data(), w.ob.data());
      T *ea = w.ea.data(), *oa = w.oa.data(), *eb = w.eb.data(), *ob = w.ob.data();
      T *sum = w.sum.data(), *diff = w.diff.data();
      if (mirrored(k, g.n_phi)) {
#pragma omp simd
        for (int64_t r = 0; r < kBlock; ++r) {
          const T h1 = (ea[r] + oa[r]) * (eb[r] + ob[r]);
          const T h2 = (ea[r] - oa[r]) * (eb[r] - ob[r]);
          sum[r] = h1 + h2;
          diff[r] = h1 - h2;
        }
      } else {
        // sin vanishes at phi = 0 and pi, so the odd parts are zero here.
#pragma omp simd
        for (int64_t r = 0; r < kBlock; ++r) {
          sum[r] = ea[r] * eb[r];
          diff[r] = T(0);
        }
      }
      ring_point_adjoint(g, k, sc.lmax, sum, diff, w.rc.data());
    }
    ring_to_legendre(sc, t, w.rc.data(), w.out.data());
  }
  store_block(lc, w.out.data(), out_rows);
}

// Grid values of one block: grid rows are [n_theta, n_phi].
template <class T>
void to_grid_block(const Grid<T>& g, const Side<T>& s, const Layout& lay,
                   const BlockRows<const T*>& rows, T* const* grid_rows, Workspace<T>& w) {
  load_block(lay, rows, w.xa.data());
  for (int64_t t = 0; t < g.n_theta; ++t) {
    legendre_to_ring(s, t, w.xa.data(), w.ra.data());
    for (int64_t k = 0; 2 * k <= g.n_phi; ++k) {
      ring_point(g, k, s.lmax, w.ra.data(), w.ea.data(), w.oa.data());
      const int64_t q = t * g.n_phi + k, q_mirror = t * g.n_phi + (g.n_phi - k) % g.n_phi;
      for (int64_t r = 0; r < kBlock; ++r)
        if (grid_rows[r]) {
          grid_rows[r][q] = w.ea[r] + w.oa[r];
          grid_rows[r][q_mirror] = w.ea[r] - w.oa[r];  // k = 0, n/2: same point, odd part 0
        }
    }
  }
}

// The adjoint of to_grid_block: coefficients rows from grid rows.
template <class T>
void from_grid_block(const Grid<T>& g, const Side<T>& s, const Layout& lay,
                     const T* const* grid_rows, const BlockRows<T*>& rows, Workspace<T>& w) {
  std::fill(w.out.begin(), w.out.end(), T(0));
  for (int64_t t = 0; t < g.n_theta; ++t) {
    std::fill(w.rc.begin(), w.rc.end(), T(0));
    for (int64_t k = 0; 2 * k <= g.n_phi; ++k) {
      const int64_t q = t * g.n_phi + k, q_mirror = t * g.n_phi + g.n_phi - k;
      const bool mirror = mirrored(k, g.n_phi);
      for (int64_t r = 0; r < kBlock; ++r) {
        const T h1 = grid_rows[r] ? grid_rows[r][q] : T(0);
        const T h2 = grid_rows[r] && mirror ? grid_rows[r][q_mirror] : T(0);
        w.sum[r] = h1 + h2;
        w.diff[r] = mirror ? h1 - h2 : T(0);
      }
      ring_point_adjoint(g, k, s.lmax, w.sum.data(), w.diff.data(), w.rc.data());
    }
    ring_to_legendre(s, t, w.rc.data(), w.out.data());
  }
  store_block(lay, w.out.data(), rows);
}

// The nonzero Gaunt coefficients G[i, j, k] as `count` entries: index [count, 3] = (i, j, k) into
// the coefficients of the first input, the second input and the output. Any order is correct; the
// product is fastest with the entries of one k consecutive (it sums them in registers).
template <class T>
struct Entries {
  int64_t count;
  const int64_t* index;
  const T* value;
};

// out[k][:] = sum G[i, j, k] xa[i][:] xb[j][:]; out is [dim_out][kBlock].
template <class T>
void dense_product_block(const Entries<T>& e, const T* xa, const T* xb, int64_t dim_out, T* out) {
  std::fill(out, out + dim_out * kBlock, T(0));
  int64_t n = 0;
  while (n < e.count) {
    const int64_t k = e.index[3 * n + 2];
    T acc[kBlock] = {};
    for (; n < e.count && e.index[3 * n + 2] == k; ++n) {
      const T g = e.value[n];
      const T* ai = xa + e.index[3 * n] * kBlock;
      const T* bj = xb + e.index[3 * n + 1] * kBlock;
#pragma omp simd
      for (int64_t r = 0; r < kBlock; ++r) acc[r] += g * ai[r] * bj[r];
    }
    T* ok = out + k * kBlock;
#pragma omp simd
    for (int64_t r = 0; r < kBlock; ++r) ok[r] += acc[r];
  }
}

// Both input gradients of dense_product_block at once, from the output gradient go:
// ga[i][:] = sum G[i, j, k] go[k][:] xb[j][:] and gb[j][:] = sum G[i, j, k] go[k][:] xa[i][:].
template <class T>
void dense_backward_block(const Entries<T>& e, const T* go, const T* xa, const T* xb, int64_t dim_a,
                          int64_t dim_b, T* ga, T* gb) {
  std::fill(ga, ga + dim_a * kBlock, T(0));
  std::fill(gb, gb + dim_b * kBlock, T(0));
  for (int64_t n = 0; n < e.count; ++n) {
    const T g = e.value[n];
    const int64_t i = e.index[3 * n], j = e.index[3 * n + 1], k = e.index[3 * n + 2];
    const T *gk = go + k * kBlock, *ai = xa + i * kBlock, *bj = xb + j * kBlock;
    T *gai = ga + i * kBlock, *gbj = gb + j * kBlock;
#pragma omp simd
    for (int64_t r = 0; r < kBlock; ++r) {
      const T t = g * gk[r];
      gai[r] += t * bj[r];
      gbj[r] += t * ai[r];
    }
  }
}

}  // namespace equikern::gaunt
