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

// Functions shared by host and device code (the per-row math at the end).
#if defined(__CUDACC__)
#define EQUIKERN_HD __host__ __device__ inline
#else
#define EQUIKERN_HD inline
#endif

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
EQUIKERN_HD bool mirrored(int64_t k, int64_t n_phi) { return k != 0 && 2 * k != n_phi; }

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

// ---------------------------------------------------------------- per-row math of the CUDA kernels
//
// The CUDA kernels give each thread one row (one channel of one sample) and keep that row's arrays
// in shared memory, interleaved with the other rows of its tile (element i of a row at
// p[i * stride]), so that the threads of a warp touch consecutive words. The functions below are
// the CPU algorithm above for one row, written once for host and device so that the host can
// check them against the CPU ops. Every loop accumulates in a register and writes each element
// once, with the sums in the same order as the block code above.
namespace row {

template <class T>
struct Lane {
  T* p;
  int stride;
  EQUIKERN_HD T& operator[](int i) const { return p[static_cast<int64_t>(i) * stride]; }
};

EQUIKERN_HD int64_t isqrt(int64_t v) {
  int64_t s = 0;
  while ((s + 1) * (s + 1) <= v) ++s;
  return s;
}

// Where coefficient i (degree l) of a row lies in an operand of `channels` channels (1: shared by
// every channel) when rows enumerate (sample, channel) as n * rows_per_sample + c; the layouts are
// those of gaunt::Layout.
struct RowMap {
  int64_t dim, channels, rows_per_sample;
  bool flat;
  EQUIKERN_HD int64_t offset(int64_t row, int64_t i, int64_t l) const {
    const int64_t n = row / rows_per_sample, c = channels == 1 ? 0 : row % rows_per_sample;
    const int64_t base = n * channels * dim;
    return flat ? base + channels * l * l + c * (2 * l + 1) + (i - l * l) : base + c * dim + i;
  }
  // The e-th element (0 <= e < rows * dim) of a tile of `rows` consecutive rows, in an order that
  // follows memory within a sample (the channel layout row by row, the flat layout degree by
  // degree), so that loads and stores of a tile are coalesced.
  EQUIKERN_HD void element(int64_t e, int64_t rows, int64_t& r, int64_t& i, int64_t& l) const {
    if (!flat) {
      r = e / dim;
      i = e - r * dim;
      l = isqrt(i);
    } else {
      l = isqrt(e / rows);
      const int64_t rest = e - rows * l * l;
      r = rest / (2 * l + 1);
      i = l * l + rest - r * (2 * l + 1);
    }
  }
};

// The grid tables as the kernels read them: Legendre rows P[t] of each operand, trig row k centred
// on m = 0 (only k <= n_phi / 2 is read).
template <class T>
struct Tables {
  const T* trig;
  int trig_width, n_theta, n_phi;
  EQUIKERN_HD const T* trig_row(int k) const { return trig + k * trig_width + trig_width / 2; }
  EQUIKERN_HD int half() const { return n_phi / 2 + 1; }
};

// r[m + L] = sum_{l >= |m|} p[lm] x[lm] (p: one ring of a Legendre table).
template <class T>
EQUIKERN_HD void legendre_to_ring(const T* p, int L, Lane<const T> x, Lane<T> r) {
  for (int m = -L; m <= L; ++m) {
    T acc = T(0);
    for (int l = m < 0 ? -m : m; l <= L; ++l) {
      const int i = l * l + l + m;
      acc += p[i] * x[i];
    }
    r[m + L] = acc;
  }
}

// The cos and sin parts of a ring function at phi_k (tk = trig row k).
template <class T>
EQUIKERN_HD void ring_point(const T* tk, int L, Lane<const T> r, T& even, T& odd) {
  T e = r[L], o = T(0);
  for (int m = 1; m <= L; ++m) {
    e += tk[m] * r[L + m];
    o += tk[-m] * r[L - m];
  }
  even = e;
  odd = o;
}

// The adjoint of the phi step over the whole half ring: rc[m + L] = sum_k trig[k, m] hs[k] for
// m >= 0 and sum_k trig[k, m] hd[k] for m < 0, then out[lm] += pc[lm] rc[m + L].
template <class T>
EQUIKERN_HD void ring_to_coefficients(const Tables<T>& g, const T* pc, int L, Lane<const T> hs,
                                      Lane<const T> hd, Lane<T> rc, Lane<T> out) {
  const int half = g.half();
  T acc = T(0);
  for (int k = 0; k < half; ++k) acc += hs[k];
  rc[L] = acc;
  for (int m = 1; m <= L; ++m) {
    T c = T(0), s = T(0);
    for (int k = 0; k < half; ++k) {
      const T* tk = g.trig_row(k);
      c += tk[m] * hs[k];
      s += tk[-m] * hd[k];
    }
    rc[L + m] = c;
    rc[L - m] = s;
  }
  for (int l = 0; l <= L; ++l)
    for (int m = -l; m <= l; ++m) {
      const int i = l * l + l + m;
      out[i] += pc[i] * rc[m + L];
    }
}

// Scratch of one row of the grid kernels.
template <class T>
struct GridScratch {
  Lane<T> ra, rb, hs, hd, rc;
};

// out = S_c^T (S_a xa * S_b xb) for one row; pa, pb, pc: Legendre tables [n_theta, (L + 1)^2].
template <class T>
EQUIKERN_HD void grid_product(const Tables<T>& g, const T* pa, int La, const T* pb, int Lb,
                              const T* pc, int Lc, Lane<const T> xa, Lane<const T> xb, Lane<T> out,
                              const GridScratch<T>& w) {
  const int da = (La + 1) * (La + 1), db = (Lb + 1) * (Lb + 1), dc = (Lc + 1) * (Lc + 1);
  for (int i = 0; i < dc; ++i) out[i] = T(0);
  const Lane<const T> ra{w.ra.p, w.ra.stride}, rb{w.rb.p, w.rb.stride};
  for (int t = 0; t < g.n_theta; ++t) {
    legendre_to_ring(pa + t * da, La, xa, w.ra);
    legendre_to_ring(pb + t * db, Lb, xb, w.rb);
    for (int k = 0; k < g.half(); ++k) {
      const T* tk = g.trig_row(k);
      T ea, oa, eb, ob;
      ring_point(tk, La, ra, ea, oa);
      ring_point(tk, Lb, rb, eb, ob);
      if (mirrored(k, g.n_phi)) {
        const T h1 = (ea + oa) * (eb + ob);
        const T h2 = (ea - oa) * (eb - ob);
        w.hs[k] = h1 + h2;
        w.hd[k] = h1 - h2;
      } else {  // sin vanishes at phi = 0 and pi
        w.hs[k] = ea * eb;
        w.hd[k] = T(0);
      }
    }
    ring_to_coefficients(g, pc + t * dc, Lc, Lane<const T>{w.hs.p, w.hs.stride},
                         Lane<const T>{w.hd.p, w.hd.stride}, w.rc, out);
  }
}

// Grid values [n_theta, n_phi] of one row.
template <class T>
EQUIKERN_HD void to_grid(const Tables<T>& g, const T* p, int L, Lane<const T> x, T* grid,
                         Lane<T> ra) {
  const int d = (L + 1) * (L + 1);
  const Lane<const T> rac{ra.p, ra.stride};
  for (int t = 0; t < g.n_theta; ++t) {
    legendre_to_ring(p + t * d, L, x, ra);
    for (int k = 0; k < g.half(); ++k) {
      T e, o;
      ring_point(g.trig_row(k), L, rac, e, o);
      grid[t * g.n_phi + k] = e + o;
      grid[t * g.n_phi + (g.n_phi - k) % g.n_phi] = e - o;  // k = 0, n/2: the same point, o = 0
    }
  }
}

// The adjoint of to_grid: coefficients of one row from its grid values.
template <class T>
EQUIKERN_HD void from_grid(const Tables<T>& g, const T* p, int L, const T* grid, Lane<T> out,
                           const GridScratch<T>& w) {
  const int d = (L + 1) * (L + 1);
  for (int i = 0; i < d; ++i) out[i] = T(0);
  for (int t = 0; t < g.n_theta; ++t) {
    for (int k = 0; k < g.half(); ++k) {
      const bool mirror = mirrored(k, g.n_phi);
      const T h1 = grid[t * g.n_phi + k];
      const T h2 = mirror ? grid[t * g.n_phi + g.n_phi - k] : T(0);
      w.hs[k] = h1 + h2;
      w.hd[k] = mirror ? h1 - h2 : T(0);
    }
    ring_to_coefficients(g, p + t * d, L, Lane<const T>{w.hs.p, w.hs.stride},
                         Lane<const T>{w.hd.p, w.hd.stride}, w.rc, out);
  }
}

// A Gaunt table grouped by one of its three indices: the entries of group q are
// ptr[q] <= e < ptr[q + 1], each with the other two indices packed as first | second << 16 (in
// the order (i, j) for k, (j, k) for i, (i, k) for j) and its coefficient.
template <class T>
struct Grouped {
  const int32_t* ptr;
  const int32_t* pair;
  const T* value;
};

EQUIKERN_HD int first_of(int32_t pair) { return pair & 0xffff; }
EQUIKERN_HD int second_of(int32_t pair) { return pair >> 16; }

// out[k] = sum G[i, j, k] xa[i] xb[j] (entries grouped by k).
template <class T>
EQUIKERN_HD void dense_product(const Grouped<T>& by_k, int dc, Lane<const T> xa, Lane<const T> xb,
                               Lane<T> out) {
  for (int k = 0; k < dc; ++k) {
    T acc = T(0);
    for (int e = by_k.ptr[k]; e < by_k.ptr[k + 1]; ++e) {
      const int32_t ij = by_k.pair[e];
      acc += by_k.value[e] * xa[first_of(ij)] * xb[second_of(ij)];
    }
    out[k] = acc;
  }
}

// ga[i] = sum G[i, j, k] go[k] xb[j] (grouped by i), gb[j] = sum G[i, j, k] go[k] xa[i] (by j).
template <class T>
EQUIKERN_HD void dense_backward(const Grouped<T>& by_i, const Grouped<T>& by_j, int da, int db,
                                Lane<const T> go, Lane<const T> xa, Lane<const T> xb, Lane<T> ga,
                                Lane<T> gb) {
  for (int i = 0; i < da; ++i) {
    T acc = T(0);
    for (int e = by_i.ptr[i]; e < by_i.ptr[i + 1]; ++e) {
      const int32_t jk = by_i.pair[e];
      acc += by_i.value[e] * go[second_of(jk)] * xb[first_of(jk)];
    }
    ga[i] = acc;
  }
  for (int j = 0; j < db; ++j) {
    T acc = T(0);
    for (int e = by_j.ptr[j]; e < by_j.ptr[j + 1]; ++e) {
      const int32_t ik = by_j.pair[e];
      acc += by_j.value[e] * go[second_of(ik)] * xa[first_of(ik)];
    }
    gb[j] = acc;
  }
}

}  // namespace row

// The layout of the grouped tables on the host: ints = [ptr by k (dims[2] + 1), ptr by i
// (dims[0] + 1), ptr by j (dims[1] + 1), pairs by k, by i, by j (count each)], and entry[x] the
// entry of the table at grouped position x (0 <= x < 3 count), whose value goes there. The sort
// is stable, so every group sums in the table's own order, as the block code does. The indices
// must be in range and below 2^15.
inline void group_entries(const int64_t* index, int64_t count, const int64_t dims[3],
                          std::vector<int32_t>& ints, std::vector<int64_t>& entry) {
  ints.clear();
  entry.clear();
  std::vector<int32_t> pairs;
  const int group_of[3] = {2, 0, 1};                      // k, i, j
  const int first[3] = {0, 1, 0}, second[3] = {1, 2, 2};  // (i, j), (j, k), (i, k)
  for (int g = 0; g < 3; ++g) {
    const int c = group_of[g];
    const int64_t dim = dims[c];
    std::vector<int64_t> order(count);
    for (int64_t n = 0; n < count; ++n) order[n] = n;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t y) { return index[3 * x + c] < index[3 * y + c]; });
    std::vector<int32_t> ptr(dim + 1, 0);
    for (int64_t n = 0; n < count; ++n) ++ptr[index[3 * n + c] + 1];
    for (int64_t q = 0; q < dim; ++q) ptr[q + 1] += ptr[q];
    ints.insert(ints.end(), ptr.begin(), ptr.end());
    for (int64_t n : order) {
      pairs.push_back(
          static_cast<int32_t>(index[3 * n + first[g]] | (index[3 * n + second[g]] << 16)));
      entry.push_back(n);
    }
  }
  ints.insert(ints.end(), pairs.begin(), pairs.end());
}

}  // namespace equikern::gaunt
