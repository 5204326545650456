// CUDA implementation of the CP bilinear ops (schemas, CPU kernels and the math in csrc/cpu/cp.cpp
// and kernels/cp.h):
//   out[z, k, c] = w[z, c] sum_r C[k, r] (A^T x1[z])[r, c] v[z, r],  v[z] = B^T x2[z].
//
// Routes (same map, rounding differs):
//   matrix:  one block per sample builds M_z = C diag(v_z) A^T [K, I] in shared memory (once per
//            block when x2 is shared by all samples), then its threads sweep the channels, which
//            are the contiguous axis, so every load and store of a warp is coalesced.
//   factors: one block per (sample, tile of channels), one thread per channel: u = A^T x,
//            out = C (v * u), the per-thread u in shared memory (element r of thread t at
//            r * threads + t: conflict-free).
// "auto" takes the route the CPU would take, unless its shared memory does not fit a block; an
// explicit route whose shared memory does not fit runs the other one (the same map).
//
// Backward without atomics: every sum over channels is a warp's (lanes over channels, then a
// shuffle tree), owned by one warp; sums over samples are kept per block (grid-stride loops over a
// grid that depends on the device and the sizes only) in float64 in the block's row of a
// [blocks, ...] buffer in global memory (each element updated by one thread; in shared memory they
// capped the rank, e.g. R < 171 at I = K = 16), reduced by at::sum; the per-sample gradient of v
// is written to a [Z, ...] buffer and contracted by matmuls (float64). Results are reproducible
// bit for bit on a given GPU model (the grid follows the number of SMs).
//
// Status: compiled against a CUDA torch (make cuda-check), never run on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cp_checks.h"

namespace equikern {
namespace {

using namespace cp_checks;

constexpr int kThreads = 256;  // matrix route
constexpr int kWarp = 32;
// Dynamic shared memory per block, kept under the default limit so that no opt-in is needed and
// several blocks fit an SM.
constexpr size_t kSmemBytes = 48 * 1024;

// ---------------------------------------------------------------- device helpers

__device__ unsigned char* smem_base() {
  extern __shared__ __align__(16) unsigned char cp_smem[];
  return cp_smem;
}

// Carves shared memory in order; every piece is 8-byte aligned.
struct Carver {
  unsigned char* next;
  template <class U>
  __device__ U* take(int64_t n) {
    U* p = reinterpret_cast<U*>(next);
    next += ((n * int64_t(sizeof(U)) + 7) / 8) * 8;
    return p;
  }
};

template <class U>
__device__ U warp_sum(U s) {
  for (int o = kWarp / 2; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  return s;
}

// v[r] = sum_j B[j, r] y[j] for r < R, by the block.
template <class T>
__device__ void project_second(const T* __restrict__ B, const T* __restrict__ y, int64_t J,
                               int64_t R, T* v) {
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    T s = 0;
    for (int64_t j = 0; j < J; ++j) s += B[j * R + r] * y[j];
    v[r] = s;
  }
}

// M[k, i] = sum_r C[k, r] v[r] A[i, r], by the block.
template <class T>
__device__ void build_matrix(const T* __restrict__ A, const T* __restrict__ C, const T* v,
                             int64_t I, int64_t K, int64_t R, T* M) {
  for (int64_t e = threadIdx.x; e < K * I; e += blockDim.x) {
    const int64_t k = e / I, i = e % I;
    T s = 0;
    for (int64_t r = 0; r < R; ++r) s += C[k * R + r] * v[r] * A[i * R + r];
    M[e] = s;
  }
}

template <class T>
struct Args {
  const T* x1;   // [Z, I, Cc]
  const T* x2;   // [Z2, J]
  const T* A;    // [I, R]
  const T* B;    // [J, R]
  const T* C;    // [K, R]
  const T* w;    // [Z, Cc] or null
  const T* g;    // [Z, K, Cc] (backward)
  T* out;        // forward: [Z, K, Cc]; backward: gx1 [Z, I, Cc]
  T* gw;         // [Z, Cc] or null
  double* gv;    // per sample [Z, R] (matrix route, x2 per sample) or per tile [Z, tiles, R]
  double* part;  // per block partial sums (see the kernels)
  Dims d;
  bool factor_grads;
};

// ---------------------------------------------------------------- matrix route

template <class T>
__global__ void matrix_forward_kernel(const Args<T> p) {
  const Dims d = p.d;
  Carver sm{smem_base()};
  T* v = sm.take<T>(d.R);
  T* M = sm.take<T>(d.K * d.I);
  const bool shared = d.Z2 == 1;
  if (shared) {
    project_second(p.B, p.x2, d.J, d.R, v);
    __syncthreads();
    build_matrix(p.A, p.C, v, d.I, d.K, d.R, M);
    __syncthreads();
  }
  for (int64_t z = blockIdx.x; z < d.Z; z += gridDim.x) {
    if (!shared) {
      project_second(p.B, p.x2 + z * d.J, d.J, d.R, v);
      __syncthreads();
      build_matrix(p.A, p.C, v, d.I, d.K, d.R, M);
      __syncthreads();
    }
    const T* x = p.x1 + z * d.I * d.Cc;
    T* out = p.out + z * d.K * d.Cc;
    for (int64_t c = threadIdx.x; c < d.Cc; c += blockDim.x) {
      const T wc = p.w ? p.w[z * d.Cc + c] : T(1);
      for (int64_t k = 0; k < d.K; ++k) {
        T s = 0;
        for (int64_t i = 0; i < d.I; ++i) s += M[k * d.I + i] * x[i * d.Cc + c];
        out[k * d.Cc + c] = wc * s;
      }
    }
    __syncthreads();  // M is rebuilt for the next sample
  }
}

// Per sample z, with h = M^T g:  gx = w h,  gw = sum_i x h,  G[k, i] = sum_c g[k, c] w[c] x[i, c].
// x2 shared: the block sums G over its samples (part: [blocks, K, I]); the rest follows on the
// host. x2 per sample: gv[z, r] = sum_{k,i} C[k, r] A[i, r] G[k, i], and with factor_grads the
// block sums
//   gA[i, r] = v[r] sum_k C[k, r] G[k, i],  gC[k, r] = v[r] sum_i A[i, r] G[k, i]
// over its samples (part: [blocks, (I + K) R]).
template <class T>
__global__ void matrix_backward_kernel(const Args<T> p) {
  const Dims d = p.d;
  const int64_t KI = d.K * d.I, IR = d.I * d.R, KR = d.K * d.R;
  const bool shared = d.Z2 == 1;
  Carver sm{smem_base()};
  T* v = sm.take<T>(d.R);
  T* M = sm.take<T>(KI);
  double* G = sm.take<double>(KI);
  const int64_t acc_n = shared ? KI : (p.factor_grads ? IR + KR : 0);
  // The block's row of part, in global memory (shared memory would cap the sizes): zeroed here,
  // then element e is only ever updated by thread e % blockDim.x.
  double* acc = p.part + blockIdx.x * acc_n;
  for (int64_t e = threadIdx.x; e < acc_n; e += blockDim.x) acc[e] = 0;
  if (shared) {
    project_second(p.B, p.x2, d.J, d.R, v);
    __syncthreads();
    build_matrix(p.A, p.C, v, d.I, d.K, d.R, M);
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t z = blockIdx.x; z < d.Z; z += gridDim.x) {
    if (!shared) {
      project_second(p.B, p.x2 + z * d.J, d.J, d.R, v);
      __syncthreads();
      build_matrix(p.A, p.C, v, d.I, d.K, d.R, M);
      __syncthreads();
    }
    const T* x = p.x1 + z * d.I * d.Cc;
    const T* g = p.g + z * d.K * d.Cc;
    const T* w = p.w ? p.w + z * d.Cc : nullptr;
    T* gx = p.out + z * d.I * d.Cc;
    for (int64_t c = threadIdx.x; c < d.Cc; c += blockDim.x) {
      const T wc = w ? w[c] : T(1);
      T sw = 0;
      for (int64_t i = 0; i < d.I; ++i) {
        T h = 0;
        for (int64_t k = 0; k < d.K; ++k) h += M[k * d.I + i] * g[k * d.Cc + c];
        gx[i * d.Cc + c] = wc * h;
        sw += x[i * d.Cc + c] * h;
      }
      if (p.gw) p.gw[z * d.Cc + c] = sw;
    }
    for (int64_t e = warp; e < KI; e += warps) {
      const int64_t k = e / d.I, i = e % d.I;
      double s = 0;
      for (int64_t c = lane; c < d.Cc; c += kWarp)
        s += double(g[k * d.Cc + c]) * double(w ? w[c] : T(1)) * double(x[i * d.Cc + c]);
      s = warp_sum(s);
      if (lane == 0) G[e] = s;
    }
    __syncthreads();
    if (shared) {
      for (int64_t e = threadIdx.x; e < KI; e += blockDim.x) acc[e] += G[e];
    } else {
      for (int64_t r = threadIdx.x; r < d.R; r += blockDim.x) {
        double s = 0;
        for (int64_t k = 0; k < d.K; ++k) {
          double t = 0;
          for (int64_t i = 0; i < d.I; ++i) t += double(p.A[i * d.R + r]) * G[k * d.I + i];
          s += double(p.C[k * d.R + r]) * t;
        }
        p.gv[z * d.R + r] = s;
      }
      if (p.factor_grads) {
        for (int64_t e = threadIdx.x; e < IR + KR; e += blockDim.x) {
          double s = 0;
          if (e < IR) {
            const int64_t i = e / d.R, r = e % d.R;
            for (int64_t k = 0; k < d.K; ++k) s += double(p.C[k * d.R + r]) * G[k * d.I + i];
            acc[e] += double(v[r]) * s;
          } else {
            const int64_t k = (e - IR) / d.R, r = (e - IR) % d.R;
            for (int64_t i = 0; i < d.I; ++i) s += double(p.A[i * d.R + r]) * G[k * d.I + i];
            acc[e] += double(v[r]) * s;
          }
        }
      }
    }
    __syncthreads();  // G, v and M are rewritten for the next sample
  }
}

// ---------------------------------------------------------------- factors route

// Tiles: (sample z, channels [ct * threads, (ct + 1) * threads)), tile = z * tiles + ct.
template <class T>
__global__ void factors_forward_kernel(const Args<T> p, int64_t tiles) {
  const Dims d = p.d;
  const int64_t nt = blockDim.x;
  Carver sm{smem_base()};
  T* v = sm.take<T>(d.R);
  T* u = sm.take<T>(d.R * nt);
  for (int64_t tile = blockIdx.x; tile < d.Z * tiles; tile += gridDim.x) {
    const int64_t z = tile / tiles, c = (tile % tiles) * nt + threadIdx.x;
    project_second(p.B, p.x2 + (d.Z2 == 1 ? 0 : z * d.J), d.J, d.R, v);
    __syncthreads();
    if (c < d.Cc) {
      const T* x = p.x1 + z * d.I * d.Cc + c;
      for (int64_t r = 0; r < d.R; ++r) {
        T s = 0;
        for (int64_t i = 0; i < d.I; ++i) s += p.A[i * d.R + r] * x[i * d.Cc];
        u[r * nt + threadIdx.x] = v[r] * s;
      }
      const T wc = p.w ? p.w[z * d.Cc + c] : T(1);
      T* out = p.out + z * d.K * d.Cc + c;
      for (int64_t k = 0; k < d.K; ++k) {
        T s = 0;
        for (int64_t r = 0; r < d.R; ++r) s += p.C[k * d.R + r] * u[r * nt + threadIdx.x];
        out[k * d.Cc] = wc * s;
      }
    }
    __syncthreads();  // v is rewritten for the next tile
  }
}

// Per channel, with u = A^T x and h = C^T g:  gw = sum_r v h u,  gx = A (v w h).  Sums over the
// tile's channels, one warp per sum:  gv part[tile, r] = sum_c w h u;  with factor_grads the block
// sums gA[i, r] = sum_c x[i, c] v[r] w h[r, c] and gC[k, r] = sum_c g[k, c] w v[r] u[r, c] over its
// tiles (part: [blocks, (I + K) R]).
template <class T>
__global__ void factors_backward_kernel(const Args<T> p, int64_t tiles) {
  const Dims d = p.d;
  const int64_t nt = blockDim.x, IR = d.I * d.R, KR = d.K * d.R;
  Carver sm{smem_base()};
  T* v = sm.take<T>(d.R);
  T* u = sm.take<T>(d.R * nt);
  T* h = sm.take<T>(d.R * nt);  // becomes w h
  const int64_t acc_n = p.factor_grads ? IR + KR : 0;
  // The block's row of part, in global memory: zeroed here (visible to the block after the
  // __syncthreads below), then element e is only ever updated by lane 0 of warp (R + e) % warps.
  double* acc = p.part + blockIdx.x * acc_n;
  for (int64_t e = threadIdx.x; e < acc_n; e += blockDim.x) acc[e] = 0;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t tile = blockIdx.x; tile < d.Z * tiles; tile += gridDim.x) {
    const int64_t z = tile / tiles, c0 = (tile % tiles) * nt, c = c0 + threadIdx.x;
    project_second(p.B, p.x2 + (d.Z2 == 1 ? 0 : z * d.J), d.J, d.R, v);
    __syncthreads();
    const T* x = p.x1 + z * d.I * d.Cc;
    const T* g = p.g + z * d.K * d.Cc;
    const T* w = p.w ? p.w + z * d.Cc : nullptr;
    const int64_t t = threadIdx.x;
    if (c < d.Cc) {
      const T wc = w ? w[c] : T(1);
      T sw = 0;
      for (int64_t r = 0; r < d.R; ++r) {
        T su = 0, sh = 0;
        for (int64_t i = 0; i < d.I; ++i) su += p.A[i * d.R + r] * x[i * d.Cc + c];
        for (int64_t k = 0; k < d.K; ++k) sh += p.C[k * d.R + r] * g[k * d.Cc + c];
        sw += v[r] * sh * su;
        u[r * nt + t] = su;
        h[r * nt + t] = wc * sh;
      }
      if (p.gw) p.gw[z * d.Cc + c] = sw;
      for (int64_t i = 0; i < d.I; ++i) {
        T s = 0;
        for (int64_t r = 0; r < d.R; ++r) s += p.A[i * d.R + r] * v[r] * h[r * nt + t];
        p.out[z * d.I * d.Cc + i * d.Cc + c] = s;
      }
    } else {
      for (int64_t r = 0; r < d.R; ++r) u[r * nt + t] = h[r * nt + t] = T(0);
    }
    __syncthreads();
    const int64_t width = d.Cc - c0 < nt ? d.Cc - c0 : nt;  // the tile's channels
    for (int64_t e = warp; e < d.R + acc_n; e += warps) {
      double s = 0;
      if (e < d.R) {
        for (int64_t q = lane; q < width; q += kWarp)
          s += double(h[e * nt + q]) * double(u[e * nt + q]);
      } else if (e < d.R + IR) {
        const int64_t i = (e - d.R) / d.R, r = (e - d.R) % d.R;
        for (int64_t q = lane; q < width; q += kWarp)
          s += double(x[i * d.Cc + c0 + q]) * double(h[r * nt + q]);
        s *= double(v[r]);
      } else {
        const int64_t k = (e - d.R - IR) / d.R, r = (e - d.R - IR) % d.R;
        for (int64_t q = lane; q < width; q += kWarp)
          s += double(g[k * d.Cc + c0 + q]) * double(w ? w[c0 + q] : T(1)) * double(u[r * nt + q]);
        s *= double(v[r]);
      }
      s = warp_sum(s);
      if (lane == 0) {
        if (e < d.R)
          p.gv[tile * d.R + e] = s;
        else
          acc[e - d.R] += s;
      }
    }
    __syncthreads();  // v, u and h are rewritten for the next tile
  }
}

// ---------------------------------------------------------------- host side

// The device of a call: that of x1, which must be a CUDA tensor.
at::Device device_of(const at::Tensor& x1, const char* op) {
  TORCH_CHECK(x1.is_cuda(), op, ": x1 must be a CUDA tensor, got one on ", x1.device());
  return x1.device();
}

// Shared memory of each kernel: (T elements, double elements).
size_t matrix_bytes(const Dims& d, size_t elem, bool backward, bool factor_grads) {
  (void)factor_grads;  // its accumulators live in global memory (part)
  const int64_t KI = d.K * d.I;
  size_t n = size_t(d.R + KI) * elem + 16;
  if (backward) n += size_t(KI) * 8 + 16;  // G (the accumulators live in global memory)
  return n;
}

size_t factors_bytes(const Dims& d, int threads, size_t elem, bool backward, bool factor_grads) {
  (void)factor_grads;  // its accumulators live in global memory (part)
  size_t n = size_t(d.R) * (1 + threads * (backward ? 2 : 1)) * elem + 24;
  return n;
}

// Threads per block of the factors route: 128, or fewer (at least a warp) to fit shared memory.
int factors_threads(const Dims& d, size_t elem, bool backward, bool factor_grads) {
  int threads = 128;
  while (threads > kWarp && factors_bytes(d, threads, elem, backward, factor_grads) > kSmemBytes)
    threads /= 2;
  return threads;
}

// The CPU's rule (cpu/cp.cpp), then shared memory: a route that does not fit hands over to the
// other one.
Route choose_route(const char* op, const Dims& d, c10::string_view route, size_t elem,
                   bool backward, bool factor_grads) {
  const Route pick = cp_checks::choose_route(op, d, route);
  const bool matrix_fits = matrix_bytes(d, elem, backward, factor_grads) <= kSmemBytes;
  const bool factors_fit = factors_bytes(d, factors_threads(d, elem, backward, factor_grads), elem,
                                         backward, factor_grads) <= kSmemBytes;
  TORCH_CHECK(matrix_fits || factors_fit, op, ": sizes too large for the CUDA kernels (I = ", d.I,
              ", K = ", d.K, ", R = ", d.R, "): neither route's shared memory fits ", kSmemBytes,
              " bytes");
  if (pick == Route::kMatrix && !matrix_fits) return Route::kFactors;
  if (pick == Route::kFactors && !factors_fit) return Route::kMatrix;
  return pick;
}

int grid_for(int64_t tasks) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, int64_t(sms) * 8)));
}

template <class T>
Args<T> make_args(const Dims& d, const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const at::Tensor& w) {
  Args<T> a{};
  a.x1 = x1.data_ptr<T>();
  a.x2 = x2.data_ptr<T>();
  a.A = A.data_ptr<T>();
  a.B = B.data_ptr<T>();
  a.C = C.data_ptr<T>();
  a.w = w.defined() ? w.data_ptr<T>() : nullptr;
  a.d = d;
  return a;
}

at::Tensor cp_bilinear_cuda(const at::Tensor& x1_, const at::Tensor& x2_, const at::Tensor& A_,
                            const at::Tensor& B_, const at::Tensor& C_,
                            const std::optional<at::Tensor>& weight, c10::string_view route_) {
  constexpr const char* op = "cp_bilinear";
  const Dims d = check_operands(op, x1_, x2_, A_, B_, C_, weight, device_of(x1_, op));
  const size_t elem = x1_.element_size();
  const Route route = choose_route(op, d, route_, elem, false, false);
  const c10::cuda::CUDAGuard guard(x1_.device());
  auto out = at::empty({d.Z, d.K, d.Cc}, x1_.options());
  if (out.numel() == 0) return out;
  const auto x1 = x1_.contiguous(), x2 = x2_.contiguous(), A = A_.contiguous(), B = B_.contiguous(),
             C = C_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), op, [&] {
    auto args = make_args<scalar_t>(d, x1, x2, A, B, C, w);
    args.out = out.data_ptr<scalar_t>();
    if (route == Route::kMatrix) {
      matrix_forward_kernel<scalar_t>
          <<<grid_for(d.Z), kThreads, matrix_bytes(d, elem, false, false), stream>>>(args);
    } else {
      const int threads = factors_threads(d, elem, false, false);
      const int64_t tiles = (d.Cc + threads - 1) / threads;
      factors_forward_kernel<scalar_t>
          <<<grid_for(d.Z * tiles), threads, factors_bytes(d, threads, elem, false, false),
             stream>>>(args, tiles);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads cp_bilinear_backward_cuda(const at::Tensor& grad_, const at::Tensor& x1_,
                                const at::Tensor& x2_, const at::Tensor& A_, const at::Tensor& B_,
                                const at::Tensor& C_, const std::optional<at::Tensor>& weight,
                                bool factor_grads, c10::string_view route_) {
  constexpr const char* op = "cp_bilinear_backward";
  const Dims d = check_operands(op, x1_, x2_, A_, B_, C_, weight, device_of(x1_, op));
  check_float(grad_, op, "grad", 3, x1_, x1_.device());
  TORCH_CHECK(grad_.size(0) == d.Z && grad_.size(1) == d.K && grad_.size(2) == d.Cc, op,
              ": grad has shape ", grad_.sizes(), ", expected [", d.Z, ", ", d.K, ", ", d.Cc, "]");
  const size_t elem = x1_.element_size();
  const Route route = choose_route(op, d, route_, elem, true, factor_grads);
  const c10::cuda::CUDAGuard guard(x1_.device());
  const auto dtype = x1_.scalar_type();
  auto gx1 = at::empty({d.Z, d.I, d.Cc}, x1_.options());
  auto gw = weight.has_value() ? at::empty({d.Z, d.Cc}, x1_.options()) : x1_.new_empty({0});
  if (d.Z == 0 || d.Cc == 0)
    return {gx1.zero_(),        at::zeros_like(x2_), at::zeros_like(A_),
            at::zeros_like(B_), at::zeros_like(C_),  gw.zero_()};
  const auto grad = grad_.contiguous(), x1 = x1_.contiguous(), x2 = x2_.contiguous(),
             A = A_.contiguous(), B = B_.contiguous(), C = C_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = x1.options().dtype(at::kDouble);
  const int64_t IR = d.I * d.R, KR = d.K * d.R, KI = d.K * d.I;
  const bool shared = d.Z2 == 1;
  at::Tensor gv, part;  // gv [Z2, R] in float64 after the reductions below
  int64_t acc_n = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    auto args = make_args<scalar_t>(d, x1, x2, A, B, C, w);
    args.g = grad.data_ptr<scalar_t>();
    args.out = gx1.data_ptr<scalar_t>();
    args.gw = w.defined() ? gw.data_ptr<scalar_t>() : nullptr;
    args.factor_grads = factor_grads;
    if (route == Route::kMatrix) {
      const int blocks = grid_for(d.Z);
      acc_n = shared ? KI : (factor_grads ? IR + KR : 0);
      part = at::empty({blocks, std::max<int64_t>(acc_n, 1)}, f64);
      gv = at::empty({shared ? 1 : d.Z, d.R}, f64);
      args.part = part.data_ptr<double>();
      args.gv = gv.data_ptr<double>();
      matrix_backward_kernel<scalar_t>
          <<<blocks, kThreads, matrix_bytes(d, elem, true, factor_grads), stream>>>(args);
    } else {
      const int threads = factors_threads(d, elem, true, factor_grads);
      const int64_t tiles = (d.Cc + threads - 1) / threads;
      const int blocks = grid_for(d.Z * tiles);
      acc_n = factor_grads ? IR + KR : 0;
      part = at::empty({blocks, std::max<int64_t>(acc_n, 1)}, f64);
      gv = at::empty({d.Z, tiles, d.R}, f64);
      args.part = part.data_ptr<double>();
      args.gv = gv.data_ptr<double>();
      factors_backward_kernel<scalar_t>
          <<<blocks, threads, factors_bytes(d, threads, elem, true, factor_grads), stream>>>(args,
                                                                                             tiles);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto A64 = A.to(at::kDouble), B64 = B.to(at::kDouble), C64 = C.to(at::kDouble);
  at::Tensor gA, gC;
  if (route == Route::kMatrix && shared) {
    // Every sample shares v: all gradients follow from G summed over the samples.
    const auto Gs = part.narrow(1, 0, KI).sum(0).view({d.K, d.I});
    const auto v = at::matmul(x2.to(at::kDouble), B64).view({d.R});
    gv = (at::matmul(Gs.t(), C64) * A64).sum(0).view({1, d.R});  // sum_{k,i} G C[k,r] A[i,r]
    if (factor_grads) {
      gA = at::matmul(Gs.t(), C64) * v;
      gC = at::matmul(Gs, A64) * v;
    }
  } else {
    if (route == Route::kFactors) gv = gv.sum(1);  // over the channel tiles of each sample
    if (shared) gv = gv.sum(0, /*keepdim=*/true);
    if (factor_grads) {
      const auto total = part.narrow(1, 0, acc_n).sum(0);
      gA = total.narrow(0, 0, IR).view({d.I, d.R});
      gC = total.narrow(0, IR, KR).view({d.K, d.R});
    }
  }
  // gv [Z2, R] is the gradient of v = x2 B.
  const auto gx2 = at::matmul(gv, B64.t());
  at::Tensor gB;
  if (factor_grads) {
    gB = at::matmul(x2.to(at::kDouble).t(), gv);
  } else {
    gA = at::zeros_like(A_);
    gB = at::zeros_like(B_);
    gC = at::zeros_like(C_);
  }
  auto out = [&](const at::Tensor& t) { return t.to(dtype).contiguous(); };
  return {gx1, out(gx2), out(gA), out(gB), out(gC), gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(equikern, CUDA, m) {
  m.impl("cp_bilinear", &cp_bilinear_cuda);
  m.impl("cp_bilinear_backward", &cp_bilinear_backward_cuda);
}

}  // namespace equikern
