// CUDA implementation of the tensor-product ops (schemas in csrc/cpu/tensor_product.cpp).
//
// One thread block per sample (grid-stride over the batch). The sample's operands and its output
// (or, in the backward, its gradients) live in shared memory, so paths that share an output block
// simply run one after the other; inside a path every output element is owned by one thread, so
// there are no atomics and results are bitwise reproducible. Per path, the second operand is
// contracted into the Clebsch-Gordan table once and shared by all channels, as on the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "tensor_product_plan.h"

namespace equikern {
namespace {

constexpr int kThreads = 128;

struct DevPath {
  int mode, off1, m1, d1, off2, m2, d2, offo, mo, d3, woff, cg_begin, cg_end;
};

// Shared-memory scratch per block (elements): the contracted table, two channel buffers, and
// the reduction table of the backward.
struct Sizes {
  int dd, chan;
};

template <class T>
__device__ void zero(T* p, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) p[e] = T(0);
}

template <class T>
__device__ void load_row(const T* __restrict src, T* dst, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = src[e];
}

// tab[i*d3+k] = sum_j C[i,j,k] x2v[j]   (x2v: one channel of the second operand, mul_ir layout)
template <class T>
__device__ void table_second(const DevPath& p, const int* ijk, const T* val, const T* x2v, T* tab) {
  for (int e = threadIdx.x; e < p.d1 * p.d3; e += blockDim.x) {
    const int i = e / p.d3, k = e % p.d3;
    T s = 0;
    for (int n = p.cg_begin; n < p.cg_end; ++n)
      if (ijk[3 * n] == i && ijk[3 * n + 2] == k) s += val[n] * x2v[ijk[3 * n + 1]];
    tab[e] = s;
  }
}

// tab[j*d3+k] = sum_i C[i,j,k] x1u[i]
template <class T>
__device__ void table_first(const DevPath& p, const int* ijk, const T* val, const T* x1u, T* tab) {
  for (int e = threadIdx.x; e < p.d2 * p.d3; e += blockDim.x) {
    const int j = e / p.d3, k = e % p.d3;
    T s = 0;
    for (int n = p.cg_begin; n < p.cg_end; ++n)
      if (ijk[3 * n + 1] == j && ijk[3 * n + 2] == k) s += val[n] * x1u[ijk[3 * n]];
    tab[e] = s;
  }
}

template <class T>
__device__ void forward_path(const DevPath& p, const int* ijk, const T* val, const T* x1,
                             const T* x2, const T* W, T* acc, T* tab, T* sa) {
  const int m1 = p.m1, m2 = p.m2, mo = p.mo, d1 = p.d1, d2 = p.d2, d3 = p.d3;
  const T* X1 = x1 + p.off1;
  const T* X2 = x2 + p.off2;
  T* O = acc + p.offo;
  switch (p.mode) {
    case tp::kUVU:
    case tp::kUVUV:
      for (int v = 0; v < m2; ++v) {
        table_second(p, ijk, val, X2 + v * d2, tab);
        __syncthreads();
        for (int u = threadIdx.x; u < m1; u += blockDim.x) {
          const T wu = W ? W[u * m2 + v] : T(1);
          T* o = O + (p.mode == tp::kUVU ? u : u * m2 + v) * d3;
          for (int k = 0; k < d3; ++k) {
            T s = 0;
            for (int i = 0; i < d1; ++i) s += X1[u * d1 + i] * tab[i * d3 + k];
            o[k] += wu * s;
          }
        }
        __syncthreads();
      }
      break;
    case tp::kUVV:
      for (int u = 0; u < m1; ++u) {
        table_first(p, ijk, val, X1 + u * d1, tab);
        __syncthreads();
        for (int v = threadIdx.x; v < m2; v += blockDim.x) {
          const T wv = W ? W[u * m2 + v] : T(1);
          for (int k = 0; k < d3; ++k) {
            T s = 0;
            for (int j = 0; j < d2; ++j) s += X2[v * d2 + j] * tab[j * d3 + k];
            O[v * d3 + k] += wv * s;
          }
        }
        __syncthreads();
      }
      break;
    case tp::kUUU:
      for (int u = threadIdx.x; u < m1; u += blockDim.x) {
        const T wu = W ? W[u] : T(1);
        for (int n = p.cg_begin; n < p.cg_end; ++n)
          O[u * d3 + ijk[3 * n + 2]] +=
              wu * val[n] * X1[u * d1 + ijk[3 * n]] * X2[u * d2 + ijk[3 * n + 1]];
      }
      __syncthreads();
      break;
    case tp::kUUW:
      zero(sa, m1 * d3);
      __syncthreads();
      for (int u = threadIdx.x; u < m1; u += blockDim.x)
        for (int n = p.cg_begin; n < p.cg_end; ++n)
          sa[u * d3 + ijk[3 * n + 2]] +=
              val[n] * X1[u * d1 + ijk[3 * n]] * X2[u * d2 + ijk[3 * n + 1]];
      __syncthreads();
      for (int w = threadIdx.x; w < mo; w += blockDim.x)
        for (int k = 0; k < d3; ++k) {
          T s = 0;
          for (int u = 0; u < m1; ++u) s += (W ? W[u * mo + w] : T(1)) * sa[u * d3 + k];
          O[w * d3 + k] += s;
        }
      __syncthreads();
      break;
    case tp::kUVW:
      for (int v = 0; v < m2; ++v) {
        table_second(p, ijk, val, X2 + v * d2, tab);
        __syncthreads();
        for (int u = threadIdx.x; u < m1; u += blockDim.x)
          for (int k = 0; k < d3; ++k) {
            T s = 0;
            for (int i = 0; i < d1; ++i) s += X1[u * d1 + i] * tab[i * d3 + k];
            sa[u * d3 + k] = s;
          }
        __syncthreads();
        for (int w = threadIdx.x; w < mo; w += blockDim.x)
          for (int k = 0; k < d3; ++k) {
            T s = 0;
            for (int u = 0; u < m1; ++u) s += W[(u * m2 + v) * mo + w] * sa[u * d3 + k];
            O[w * d3 + k] += s;
          }
        __syncthreads();
      }
      break;
  }
}

template <class T>
__global__ void forward_kernel(const T* __restrict x1, int64_t s1, const T* __restrict x2,
                               int64_t s2, const T* __restrict w, int64_t sw, T* __restrict out,
                               int64_t z, const DevPath* __restrict paths, int num_paths,
                               const int* __restrict ijk, const T* __restrict val, int dim1,
                               int dim2, int dim_out, Sizes sz, bool weighted_only) {
  extern __shared__ unsigned char smem_raw[];
  T* sx1 = reinterpret_cast<T*>(smem_raw);
  T* sx2 = sx1 + dim1;
  T* acc = sx2 + dim2;
  T* tab = acc + dim_out;
  T* sa = tab + sz.dd;
  for (int64_t b = blockIdx.x; b < z; b += gridDim.x) {
    load_row(x1 + b * s1, sx1, dim1);
    load_row(x2 + b * s2, sx2, dim2);
    zero(acc, dim_out);
    __syncthreads();
    const T* wrow = w + b * sw;
    for (int q = 0; q < num_paths; ++q) {
      const DevPath p = paths[q];
      if (weighted_only && p.woff < 0) continue;
      forward_path(p, ijk, val, sx1, sx2, p.woff >= 0 ? wrow + p.woff : nullptr, acc, tab, sa);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < dim_out; e += blockDim.x) out[b * dim_out + e] = acc[e];
    __syncthreads();
  }
}

template <class T>
__device__ void backward_path(const DevPath& p, const int* ijk, const T* val, const T* x1,
                              const T* x2, const T* g, const T* W, T* g1, T* g2, T* GW, T* tab,
                              T* sa, T* sb, T* red) {
  const int m1 = p.m1, m2 = p.m2, mo = p.mo, d1 = p.d1, d2 = p.d2, d3 = p.d3;
  const T* X1 = x1 + p.off1;
  const T* X2 = x2 + p.off2;
  const T* G = g + p.offo;
  T* G1 = g1 + p.off1;
  T* G2 = g2 + p.off2;
  switch (p.mode) {
    case tp::kUVU:
    case tp::kUVUV:
      for (int v = 0; v < m2; ++v) {
        table_second(p, ijk, val, X2 + v * d2, tab);
        __syncthreads();
        for (int u = threadIdx.x; u < m1; u += blockDim.x) {
          const T wu = W ? W[u * m2 + v] : T(1);
          const T* gu = G + (p.mode == tp::kUVU ? u : u * m2 + v) * d3;
          T gw = 0;
          for (int i = 0; i < d1; ++i) {
            T h = 0;
            for (int k = 0; k < d3; ++k) h += tab[i * d3 + k] * gu[k];
            G1[u * d1 + i] += wu * h;
            gw += X1[u * d1 + i] * h;
          }
          if (GW) GW[u * m2 + v] += gw;
        }
        // red[i,k] = sum_u W[u,v] x1(u,i) g(u,k)
        for (int e = threadIdx.x; e < d1 * d3; e += blockDim.x) {
          const int i = e / d3, k = e % d3;
          T s = 0;
          for (int u = 0; u < m1; ++u)
            s += (W ? W[u * m2 + v] : T(1)) * X1[u * d1 + i] *
                 G[(p.mode == tp::kUVU ? u : u * m2 + v) * d3 + k];
          red[e] = s;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < d2; j += blockDim.x) {
          T s = 0;
          for (int n = p.cg_begin; n < p.cg_end; ++n)
            if (ijk[3 * n + 1] == j) s += val[n] * red[ijk[3 * n] * d3 + ijk[3 * n + 2]];
          G2[v * d2 + j] += s;
        }
        __syncthreads();
      }
      break;
    case tp::kUVV:
      for (int u = 0; u < m1; ++u) {
        table_first(p, ijk, val, X1 + u * d1, tab);
        __syncthreads();
        for (int v = threadIdx.x; v < m2; v += blockDim.x) {
          const T wv = W ? W[u * m2 + v] : T(1);
          T gw = 0;
          for (int j = 0; j < d2; ++j) {
            T h = 0;
            for (int k = 0; k < d3; ++k) h += tab[j * d3 + k] * G[v * d3 + k];
            G2[v * d2 + j] += wv * h;
            gw += X2[v * d2 + j] * h;
          }
          if (GW) GW[u * m2 + v] += gw;
        }
        for (int e = threadIdx.x; e < d2 * d3; e += blockDim.x) {
          const int j = e / d3, k = e % d3;
          T s = 0;
          for (int v = 0; v < m2; ++v)
            s += (W ? W[u * m2 + v] : T(1)) * X2[v * d2 + j] * G[v * d3 + k];
          red[e] = s;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < d1; i += blockDim.x) {
          T s = 0;
          for (int n = p.cg_begin; n < p.cg_end; ++n)
            if (ijk[3 * n] == i) s += val[n] * red[ijk[3 * n + 1] * d3 + ijk[3 * n + 2]];
          G1[u * d1 + i] += s;
        }
        __syncthreads();
      }
      break;
    case tp::kUUU:
    case tp::kUUW:
      // sa(u,k): output gradient pulled back through the channel map; sb(u,k) = sum C x1 x2
      for (int u = threadIdx.x; u < m1; u += blockDim.x) {
        for (int k = 0; k < d3; ++k) {
          T q;
          if (p.mode == tp::kUUU) {
            q = (W ? W[u] : T(1)) * G[u * d3 + k];
          } else if (W) {
            q = 0;
            for (int w = 0; w < mo; ++w) q += W[u * mo + w] * G[w * d3 + k];
          } else {
            q = G[k];
          }
          sa[u * d3 + k] = q;
          sb[u * d3 + k] = 0;
        }
        T gw = 0;
        for (int n = p.cg_begin; n < p.cg_end; ++n) {
          const int i = ijk[3 * n], j = ijk[3 * n + 1], k = ijk[3 * n + 2];
          const T c = val[n], a = X1[u * d1 + i], b = X2[u * d2 + j], q = sa[u * d3 + k];
          G1[u * d1 + i] += c * b * q;
          G2[u * d2 + j] += c * a * q;
          if (p.mode == tp::kUUU)
            gw += c * a * b * G[u * d3 + k];
          else
            sb[u * d3 + k] += c * a * b;
        }
        if (p.mode == tp::kUUU && GW) GW[u] += gw;
      }
      __syncthreads();
      if (p.mode == tp::kUUW && GW) {
        for (int w = threadIdx.x; w < mo; w += blockDim.x)
          for (int u = 0; u < m1; ++u) {
            T s = 0;
            for (int k = 0; k < d3; ++k) s += sb[u * d3 + k] * G[w * d3 + k];
            GW[u * mo + w] += s;
          }
      }
      __syncthreads();
      break;
    case tp::kUVW:
      for (int v = 0; v < m2; ++v) {
        table_second(p, ijk, val, X2 + v * d2, tab);
        __syncthreads();
        for (int u = threadIdx.x; u < m1; u += blockDim.x) {
          for (int k = 0; k < d3; ++k) {
            T q = 0, s = 0;
            for (int w = 0; w < mo; ++w) q += W[(u * m2 + v) * mo + w] * G[w * d3 + k];
            for (int i = 0; i < d1; ++i) s += tab[i * d3 + k] * X1[u * d1 + i];
            sa[u * d3 + k] = q;
            sb[u * d3 + k] = s;
          }
          for (int i = 0; i < d1; ++i) {
            T s = 0;
            for (int k = 0; k < d3; ++k) s += tab[i * d3 + k] * sa[u * d3 + k];
            G1[u * d1 + i] += s;
          }
        }
        __syncthreads();
        for (int w = threadIdx.x; w < mo; w += blockDim.x)
          for (int u = 0; u < m1; ++u) {
            T s = 0;
            for (int k = 0; k < d3; ++k) s += sb[u * d3 + k] * G[w * d3 + k];
            GW[(u * m2 + v) * mo + w] += s;
          }
        for (int e = threadIdx.x; e < d1 * d3; e += blockDim.x) {
          const int i = e / d3, k = e % d3;
          T s = 0;
          for (int u = 0; u < m1; ++u) s += X1[u * d1 + i] * sa[u * d3 + k];
          red[e] = s;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < d2; j += blockDim.x) {
          T s = 0;
          for (int n = p.cg_begin; n < p.cg_end; ++n)
            if (ijk[3 * n + 1] == j) s += val[n] * red[ijk[3 * n] * d3 + ijk[3 * n + 2]];
          G2[v * d2 + j] += s;
        }
        __syncthreads();
      }
      break;
  }
}

// Gradients are written per sample ([Z, dim] each); broadcast operands are summed afterwards.
template <class T>
__global__ void backward_kernel(const T* __restrict gout, const T* __restrict x1, int64_t s1,
                                const T* __restrict x2, int64_t s2, const T* __restrict w,
                                int64_t sw, T* __restrict g1, T* __restrict g2, T* __restrict gw,
                                int64_t z, const DevPath* __restrict paths, int num_paths,
                                const int* __restrict ijk, const T* __restrict val, int dim1,
                                int dim2, int dim_out, int num_weights, Sizes sz,
                                bool weighted_only) {
  extern __shared__ unsigned char smem_raw[];
  T* sx1 = reinterpret_cast<T*>(smem_raw);
  T* sx2 = sx1 + dim1;
  T* sg = sx2 + dim2;
  T* sg1 = sg + dim_out;
  T* sg2 = sg1 + dim1;
  T* tab = sg2 + dim2;
  T* sa = tab + sz.dd;
  T* sb = sa + sz.chan;
  T* red = sb + sz.chan;
  for (int64_t b = blockIdx.x; b < z; b += gridDim.x) {
    load_row(x1 + b * s1, sx1, dim1);
    load_row(x2 + b * s2, sx2, dim2);
    load_row(gout + b * dim_out, sg, dim_out);
    zero(sg1, dim1);
    zero(sg2, dim2);
    T* gwrow = gw + b * num_weights;
    zero(gwrow, num_weights);  // each weight is then owned by one thread of one path
    __syncthreads();
    const T* wrow = w + b * sw;
    for (int q = 0; q < num_paths; ++q) {
      const DevPath p = paths[q];
      if (weighted_only && p.woff < 0) continue;
      const bool weighted = p.woff >= 0;
      backward_path(p, ijk, val, sx1, sx2, sg, weighted ? wrow + p.woff : nullptr, sg1, sg2,
                    weighted ? gwrow + p.woff : nullptr, tab, sa, sb, red);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < dim1; e += blockDim.x) g1[b * dim1 + e] = sg1[e];
    for (int e = threadIdx.x; e < dim2; e += blockDim.x) g2[b * dim2 + e] = sg2[e];
    __syncthreads();
  }
}

// ---- channelwise route
// --------------------------------------------------------------------------- Every path uvu,
// weighted, mul(in2) = 1, and each path owns its output block (the products of MACE and NequIP
// convolutions). Per sample, all paths' tables t[i,k] = sum_j C[i,j,k] x2[j] are built at once in
// shared memory (each entry from its own presorted list of coefficients); then thread u runs
// through every path for channel u, with the inputs read and the output written straight from and
// to global memory: one synchronisation per sample instead of two per path.

struct Channelwise {
  const DevPath* paths;
  int num_paths;
  const int* tab_off;  // [num_paths] offset of each path's table
  const int* seg;      // [tab_total + 1] range of each table entry in ent
  const int* ent_n;    // coefficient index (into cg_val) of each entry
  const int* ent_x2;   // position in the x2 row it multiplies
  int tab_total;
};

template <class T>
__device__ void build_tables(const Channelwise& cw, const T* __restrict val, const T* sx2, T* tab) {
  for (int e = threadIdx.x; e < cw.tab_total; e += blockDim.x) {
    T s = 0;
    for (int q = cw.seg[e]; q < cw.seg[e + 1]; ++q) s += val[cw.ent_n[q]] * sx2[cw.ent_x2[q]];
    tab[e] = s;
  }
}

template <class T>
__global__ void channelwise_forward_kernel(const T* __restrict x1, int64_t s1,
                                           const T* __restrict x2, int64_t s2,
                                           const T* __restrict w, int64_t sw, T* __restrict out,
                                           int64_t z, Channelwise cw, const T* __restrict val,
                                           int dim2, int dim_out) {
  extern __shared__ unsigned char smem_raw[];
  T* sx2 = reinterpret_cast<T*>(smem_raw);
  T* tab = sx2 + dim2;
  for (int64_t b = blockIdx.x; b < z; b += gridDim.x) {
    load_row(x2 + b * s2, sx2, dim2);
    __syncthreads();
    build_tables(cw, val, sx2, tab);
    __syncthreads();
    const T* xrow = x1 + b * s1;
    const T* wrow = w + b * sw;
    T* orow = out + b * dim_out;
    for (int q = 0; q < cw.num_paths; ++q) {
      const DevPath p = cw.paths[q];
      const T* t = tab + cw.tab_off[q];
      for (int u = threadIdx.x; u < p.m1; u += blockDim.x) {
        const T wu = wrow[p.woff + u];
        const T* xu = xrow + p.off1 + u * p.d1;
        T* o = orow + p.offo + u * p.d3;
        for (int k = 0; k < p.d3; ++k) {
          T acc = 0;
          for (int i = 0; i < p.d1; ++i) acc += xu[i] * t[i * p.d3 + k];
          o[k] = wu * acc;
        }
      }
    }
    __syncthreads();
  }
}

// Gradients per sample; x1's gradient accumulates over the paths of an input block in shared
// memory (channel u is always handled by the same thread, so no two threads touch one entry);
// x2's gradient is a per-thread partial sum, reduced over the threads at the end of the sample.
template <class T>
__global__ void channelwise_backward_kernel(const T* __restrict gout, const T* __restrict x1,
                                            int64_t s1, const T* __restrict x2, int64_t s2,
                                            const T* __restrict w, int64_t sw, T* __restrict g1,
                                            T* __restrict g2, T* __restrict gw, int64_t z,
                                            Channelwise cw, const T* __restrict val,
                                            const int* __restrict ijk, int dim1, int dim2,
                                            int dim_out, int num_weights) {
  extern __shared__ unsigned char smem_raw[];
  T* sx2 = reinterpret_cast<T*>(smem_raw);
  T* tab = sx2 + dim2;
  T* sg1 = tab + cw.tab_total;
  T* part = sg1 + dim1;  // [blockDim][dim2]
  T* mine = part + threadIdx.x * dim2;
  for (int64_t b = blockIdx.x; b < z; b += gridDim.x) {
    load_row(x2 + b * s2, sx2, dim2);
    zero(sg1, dim1);
    for (int j = 0; j < dim2; ++j) mine[j] = 0;
    __syncthreads();
    build_tables(cw, val, sx2, tab);
    __syncthreads();
    const T* xrow = x1 + b * s1;
    const T* wrow = w + b * sw;
    const T* grow = gout + b * dim_out;
    T* gwrow = gw + b * num_weights;
    for (int q = 0; q < cw.num_paths; ++q) {
      const DevPath p = cw.paths[q];
      const T* t = tab + cw.tab_off[q];
      for (int u = threadIdx.x; u < p.m1; u += blockDim.x) {
        const T wu = wrow[p.woff + u];
        const T* xu = xrow + p.off1 + u * p.d1;
        const T* gu = grow + p.offo + u * p.d3;
        T* g1u = sg1 + p.off1 + u * p.d1;
        T dw = 0;
        for (int i = 0; i < p.d1; ++i) {
          T h = 0;
          for (int k = 0; k < p.d3; ++k) h += t[i * p.d3 + k] * gu[k];
          g1u[i] += wu * h;
          dw += xu[i] * h;
        }
        gwrow[p.woff + u] = dw;
        for (int n = p.cg_begin; n < p.cg_end; ++n)
          mine[p.off2 + ijk[3 * n + 1]] += wu * val[n] * xu[ijk[3 * n]] * gu[ijk[3 * n + 2]];
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < dim1; e += blockDim.x) g1[b * dim1 + e] = sg1[e];
    for (int j = threadIdx.x; j < dim2; j += blockDim.x) {
      T s = 0;
      for (int t2 = 0; t2 < blockDim.x; ++t2) s += part[t2 * dim2 + j];
      g2[b * dim2 + j] = s;
    }
    __syncthreads();
  }
}

// The device form of a validated plan (see PlanKey in tensor_product_plan.h).
struct DevicePlan {
  at::Tensor paths;  // DevPath rows (int32) on the device
  at::Tensor ijk;
  int num_paths = 0;
  Sizes sizes{1, 1};
  // channelwise route (see above); `cw_tables` holds tab_off, seg, ent_n, ent_x2 back to back
  bool channelwise = false;
  at::Tensor cw_tables;
  int tab_total = 0, max_m = 1;
  std::vector<at::Tensor> keep;  // the plan tensors of the key (see PlanKey)
  Channelwise view() const {
    const int* base = cw_tables.data_ptr<int32_t>();
    const int ents = static_cast<int>((cw_tables.numel() - num_paths - tab_total - 1) / 2);
    return Channelwise{reinterpret_cast<const DevPath*>(paths.data_ptr<int32_t>()),
                       num_paths,
                       base,
                       base + num_paths,
                       base + num_paths + tab_total + 1,
                       base + num_paths + tab_total + 1 + ents,
                       tab_total};
  }
};

// The channelwise route's tables: per path a d1 x d3 table whose entry (i, k) sums the
// coefficients C[i, j, k] x2[off2 + j], listed entry by entry.
void plan_channelwise(const Plan<double>& plan, DevicePlan& dp, const at::Device& device) {
  // The kernels write every output and every weight gradient exactly once: check that they can.
  std::vector<char> owned(plan.dim_out, 0), weights(plan.num_weights, 0);
  for (const Path& p : plan.paths) {
    if (p.mode != tp::kUVU || p.m2 != 1 || p.woff < 0) return;
    for (int64_t e = p.offo; e < p.offo + p.mo * p.d3; ++e) {
      if (owned[e]) return;  // two paths write one output block: generic route
      owned[e] = 1;
    }
    for (int64_t e = p.woff; e < p.woff + p.m1; ++e) {
      if (weights[e]) return;
      weights[e] = 1;
    }
  }
  auto all_set = [](const std::vector<char>& v) {
    return std::find(v.begin(), v.end(), 0) == v.end();
  };
  if (!all_set(owned) || !all_set(weights)) return;
  std::vector<int32_t> tab_off, seg{0}, ent_n, ent_x2;
  int64_t total = 0;
  for (const Path& p : plan.paths) {
    tab_off.push_back(static_cast<int32_t>(total));
    for (int64_t i = 0; i < p.d1; ++i)
      for (int64_t k = 0; k < p.d3; ++k) {
        for (int64_t n = p.cg_begin; n < p.cg_end; ++n) {
          const int32_t* q = &plan.ijk[3 * n];
          if (q[0] == i && q[2] == k) {
            ent_n.push_back(static_cast<int32_t>(n));
            ent_x2.push_back(static_cast<int32_t>(p.off2 + q[1]));
          }
        }
        seg.push_back(static_cast<int32_t>(ent_n.size()));
      }
    total += p.d1 * p.d3;
    dp.max_m = std::max<int>(dp.max_m, static_cast<int>(p.m1));
  }
  std::vector<int32_t> all(tab_off);
  all.insert(all.end(), seg.begin(), seg.end());
  all.insert(all.end(), ent_n.begin(), ent_n.end());
  all.insert(all.end(), ent_x2.begin(), ent_x2.end());
  dp.cw_tables = at::tensor(all, at::kInt).to(device);
  dp.tab_total = static_cast<int>(total);
  dp.channelwise = true;
}

const DevicePlan& device_plan(const at::Tensor& paths, const at::Tensor& blocks,
                              const at::Tensor& cg_ijk, const at::Tensor& cg_val, int64_t dim1,
                              int64_t dim2, int64_t dim_out, int64_t num_weights,
                              const at::Device& device) {
  static std::mutex mutex;
  static std::map<PlanKey, DevicePlan> cache;
  const PlanKey key(paths, blocks, cg_ijk, cg_val, dim1, dim2, dim_out, num_weights, false);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const Plan<double> plan = make_plan<double>(paths.cpu(), blocks.cpu(), cg_ijk.cpu(), cg_val.cpu(),
                                              dim1, dim2, dim_out, num_weights, false);
  std::vector<int32_t> rows;
  int64_t dd = 1, chan = 1;
  for (const Path& p : plan.paths) {
    const int64_t f[13] = {p.mode, p.off1, p.m1, p.d1,   p.off2,     p.m2,    p.d2,
                           p.offo, p.mo,   p.d3, p.woff, p.cg_begin, p.cg_end};
    for (int64_t v : f) {
      TORCH_CHECK(v < (int64_t(1) << 31), "tensor_product: plan too large for the CUDA kernel");
      rows.push_back(static_cast<int32_t>(v));
    }
    dd = std::max({dd, p.d1 * p.d3, p.d2 * p.d3});
    chan = std::max({chan, p.m1 * p.d3});
  }
  DevicePlan dp;
  dp.num_paths = static_cast<int>(plan.paths.size());
  dp.paths = at::tensor(rows.empty() ? std::vector<int32_t>{0} : rows, at::kInt).to(device);
  dp.ijk = cg_ijk.to(device).contiguous();
  dp.sizes = Sizes{static_cast<int>(dd), static_cast<int>(chan)};
  if (!plan.paths.empty()) plan_channelwise(plan, dp, device);
  dp.keep = keep(paths, blocks, cg_ijk, cg_val);
  if (cache.size() > 256) cache.clear();
  return cache.emplace(key, std::move(dp)).first->second;
}

int grid_size(int64_t z) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(z, int64_t(sms) * 16)));
}

// Threads per block of the channelwise route: the channels, rounded up to whole warps.
int channel_threads(const DevicePlan& dp) { return std::min(256, (dp.max_m + 31) / 32 * 32); }

template <class K>
void set_smem(K kernel, size_t bytes) {
  TORCH_CHECK(bytes <= 227 * 1024, "tensor_product: irreps too large for the CUDA kernel (", bytes,
              " bytes of shared memory per sample)");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

at::Tensor tp_forward_cuda(const at::Tensor& x1_, const at::Tensor& x2_, const at::Tensor& w_,
                           const at::Tensor& paths, const at::Tensor& blocks,
                           const at::Tensor& cg_ijk, const at::Tensor& cg_val, int64_t out_dim,
                           bool weighted_only) {
  const int64_t z = check_operands(x1_, x2_, w_, nullptr);
  TORCH_CHECK(out_dim >= 0, "tensor_product: out_dim must be >= 0");
  const c10::cuda::CUDAGuard guard(x1_.device());
  auto x1 = x1_.contiguous(), x2 = x2_.contiguous(), w = w_.contiguous();
  auto out = at::empty({z, out_dim}, x1.options());
  if (z == 0 || out_dim == 0) return out;
  const DevicePlan& dp = device_plan(paths, blocks, cg_ijk, cg_val, x1.size(1), x2.size(1), out_dim,
                                     w.size(1), x1.device());
  auto val = cg_val.to(x1.device(), x1.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "tensor_product_fwd_cuda", [&] {
    using T = scalar_t;
    if (dp.channelwise) {
      const size_t smem = sizeof(T) * (x2.size(1) + dp.tab_total);
      set_smem(channelwise_forward_kernel<T>, smem);
      channelwise_forward_kernel<T>
          <<<grid_size(z), channel_threads(dp), smem, c10::cuda::getCurrentCUDAStream()>>>(
              x1.data_ptr<T>(), x1.size(0) == 1 ? 0 : x1.size(1), x2.data_ptr<T>(),
              x2.size(0) == 1 ? 0 : x2.size(1), w.data_ptr<T>(), w.size(0) == 1 ? 0 : w.size(1),
              out.data_ptr<T>(), z, dp.view(), val.data_ptr<T>(), x2.size(1), out_dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const size_t smem =
        sizeof(T) * (x1.size(1) + x2.size(1) + out_dim + dp.sizes.dd + dp.sizes.chan);
    set_smem(forward_kernel<T>, smem);
    forward_kernel<T><<<grid_size(z), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        x1.data_ptr<T>(), x1.size(0) == 1 ? 0 : x1.size(1), x2.data_ptr<T>(),
        x2.size(0) == 1 ? 0 : x2.size(1), w.data_ptr<T>(), w.size(0) == 1 ? 0 : w.size(1),
        out.data_ptr<T>(), z, reinterpret_cast<const DevPath*>(dp.paths.data_ptr<int32_t>()),
        dp.num_paths, dp.ijk.data_ptr<int32_t>(), val.data_ptr<T>(), x1.size(1), x2.size(1),
        out_dim, dp.sizes, weighted_only);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tp_backward_cuda(
    const at::Tensor& gout_, const at::Tensor& x1_, const at::Tensor& x2_, const at::Tensor& w_,
    const at::Tensor& paths, const at::Tensor& blocks, const at::Tensor& cg_ijk,
    const at::Tensor& cg_val, bool weighted_only) {
  const int64_t z = check_operands(x1_, x2_, w_, &gout_);
  const c10::cuda::CUDAGuard guard(x1_.device());
  auto x1 = x1_.contiguous(), x2 = x2_.contiguous(), w = w_.contiguous(), gout = gout_.contiguous();
  const int64_t d1 = x1.size(1), d2 = x2.size(1), dw = w.size(1), out_dim = gout.size(1);
  auto g1 = at::empty({z, d1}, x1.options());
  auto g2 = at::empty({z, d2}, x1.options());
  auto gw = at::empty({z, dw}, x1.options());
  if (z > 0) {
    const DevicePlan& dp =
        device_plan(paths, blocks, cg_ijk, cg_val, d1, d2, out_dim, dw, x1.device());
    auto val = cg_val.to(x1.device(), x1.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "tensor_product_bwd_cuda", [&] {
      using T = scalar_t;
      if (dp.channelwise) {
        const int threads = channel_threads(dp);
        const size_t smem = sizeof(T) * (d2 + dp.tab_total + d1 + size_t(threads) * d2);
        set_smem(channelwise_backward_kernel<T>, smem);
        channelwise_backward_kernel<T>
            <<<grid_size(z), threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
                gout.data_ptr<T>(), x1.data_ptr<T>(), x1.size(0) == 1 ? 0 : d1, x2.data_ptr<T>(),
                x2.size(0) == 1 ? 0 : d2, w.data_ptr<T>(), w.size(0) == 1 ? 0 : dw,
                g1.data_ptr<T>(), g2.data_ptr<T>(), gw.data_ptr<T>(), z, dp.view(),
                val.data_ptr<T>(), dp.ijk.data_ptr<int32_t>(), d1, d2, out_dim, dw);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const size_t smem =
          sizeof(T) * (2 * d1 + 2 * d2 + out_dim + 2 * dp.sizes.dd + 2 * dp.sizes.chan);
      set_smem(backward_kernel<T>, smem);
      backward_kernel<T><<<grid_size(z), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
          gout.data_ptr<T>(), x1.data_ptr<T>(), x1.size(0) == 1 ? 0 : d1, x2.data_ptr<T>(),
          x2.size(0) == 1 ? 0 : d2, w.data_ptr<T>(), w.size(0) == 1 ? 0 : dw, g1.data_ptr<T>(),
          g2.data_ptr<T>(), gw.data_ptr<T>(), z,
          reinterpret_cast<const DevPath*>(dp.paths.data_ptr<int32_t>()), dp.num_paths,
          dp.ijk.data_ptr<int32_t>(), val.data_ptr<T>(), d1, d2, out_dim, dw, dp.sizes,
          weighted_only);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Broadcast operands: their gradient is the (deterministic) sum over the batch.
  auto reduce = [&](at::Tensor g, const at::Tensor& x) {
    return x.size(0) == 1 && z != 1 ? g.sum(0, /*keepdim=*/true) : g;
  };
  return {reduce(g1, x1), reduce(g2, x2), reduce(gw, w)};
}

}  // namespace

TORCH_LIBRARY_IMPL(equikern, CUDA, m) {
  m.impl("tensor_product", &tp_forward_cuda);
  m.impl("tensor_product_backward", &tp_backward_cuda);
}

}  // namespace equikern
