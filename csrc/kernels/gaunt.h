// Gaunt products on a Gauss-Legendre x uniform-phi sphere grid: the math, free of torch.
//
// A real spherical harmonic of e3nn factorises on a ring of fixed theta: Y_lm(theta_t, phi_k) =
// P[t, lm] * trig[k, m] with trig[k, m] = cos(m phi_k) for m >= 0 and sin(|m| phi_k) for m < 0.
// Going to the grid is therefore a Legendre step per ring (coefficients -> one value per m) and a
// phi step (m -> phi_k); back is the transpose, with the quadrature weights folded into P. Because
// phi_k = 2 pi k / n_phi, cos is even and sin is odd under k -> n_phi - k, so the phi step only
// visits k <= n_phi / 2 and gets the mirrored ring point from the same sums.
//
// Rows (one channel of one sample) are processed in blocks of kBlock, stored transposed
// ([index][row]) so that every step is a broadcast multiply-add over the block, which the compiler
// vectorises.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace equikern::gaunt {

constexpr int64_t kBlock = 32;

// The ring grid shared by every operand: trig is [n_phi, 2 * mmax + 1], column m + mmax.
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

// rows[r] points at row r's coefficients (nullptr: a padding row, read as zeros); x is
// [dim][kBlock].
template <class T>
inline void load_block(const T* const* rows, int64_t dim, T* x) {
  for (int64_t r = 0; r < kBlock; ++r)
    for (int64_t i = 0; i < dim; ++i) x[i * kBlock + r] = rows[r] ? rows[r][i] : T(0);
}

template <class T>
inline void store_block(const T* x, int64_t dim, T* const* rows) {
  for (int64_t r = 0; r < kBlock; ++r)
    if (rows[r])
      for (int64_t i = 0; i < dim; ++i) rows[r][i] = x[i * kBlock + r];
}

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
                   const T* const* a_rows, const T* const* b_rows, T* const* out_rows,
                   Workspace<T>& w) {
  load_block(a_rows, sa.dim(), w.xa.data());
  load_block(b_rows, sb.dim(), w.xb.data());
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
  store_block(w.out.data(), sc.dim(), out_rows);
}

// Grid values of one block: grid rows are [n_theta, n_phi].
template <class T>
void to_grid_block(const Grid<T>& g, const Side<T>& s, const T* const* rows, T* const* grid_rows,
                   Workspace<T>& w) {
  load_block(rows, s.dim(), w.xa.data());
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
void from_grid_block(const Grid<T>& g, const Side<T>& s, const T* const* grid_rows, T* const* rows,
                     Workspace<T>& w) {
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
  store_block(w.out.data(), s.dim(), rows);
}

}  // namespace equikern::gaunt
