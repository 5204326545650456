// CUDA implementation of the Gaunt ops (schemas and CPU kernels in csrc/cpu/gaunt.cpp).
//
// Every op maps a row (one channel of one sample) to a row, so each thread owns one row of a tile
// of consecutive rows, and the tile's operands, output and scratch live in shared memory with the
// rows interleaved (element i of row r at i * (rows + 1) + r: the threads of a warp touch
// consecutive words, and the odd stride keeps the transposing loads free of bank conflicts). A
// tile is loaded and stored by the whole block in memory order, so global traffic is coalesced in
// both layouts. The per-row math is gaunt::row in kernels/gaunt.h, the CPU algorithm for one row:
// every output element is summed by one thread in a fixed order, so there are no atomics and
// results are bitwise reproducible. The small grid tables go to shared memory when they fit; the
// threads of a warp always read the same table entry, so the reads are broadcasts.
//
// The dense method reads the Gaunt table grouped by output coefficient (forward) and by each input
// coefficient (backward), so that every gradient element is also one register sum. The grouping is
// built on the host once per (index, value) pair and cached on the device (one sync per new
// table, where the indices are also checked). The gradient of a second operand shared by all
// channels is computed per channel and then summed over the channels by at::sum.
//
// Targets for a GPU run (not yet measured: this file has only been compiled, never run): on one
// H100, N = 10000, C = 128, all degrees up to L, at least 10x faster than the best reference of
// the benchmark (anchors.json "gaunt") at every L from 2 to 8, i.e. forward under 0.40 / 1.06 /
// 2.08 / 4.21 ms at L = 2 / 4 / 6 / 8 (memory floor 0.05 / 0.13 / 0.25 / 0.42 ms).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "cache_version.h"
#include "gaunt_checks.h"
#include "kernels/gaunt.h"

namespace equikern {
namespace {

using namespace gaunt_checks;
using gaunt::row::GridScratch;
using gaunt::row::Grouped;
using gaunt::row::Lane;
using gaunt::row::RowMap;
using gaunt::row::Tables;

// Rows per tile at most; fewer when a tile's shared memory would exceed kTileBytes (then the
// block still fits several times on an SM), and fewer again, down to one, for degrees whose rows
// alone exceed that.
constexpr int kMaxRows = 128;
constexpr size_t kTileBytes = 64 * 1024;
// Grid tables are staged in shared memory up to this size, else read from global memory.
constexpr size_t kTableBytes = 16 * 1024;

// ---------------------------------------------------------------- device helpers

// Shared memory of a block: the tile, then (grid ops) the staged tables.
__device__ unsigned char* shared_base() {
  extern __shared__ __align__(16) unsigned char gaunt_smem[];
  return gaunt_smem;
}

// x[i * stride + r] = coefficient i of row row0 + r (zero for rows past the end).
template <class T>
__device__ void load_tile(const T* __restrict__ src, const RowMap& map, int64_t row0, int64_t rows,
                          int tile_rows, T* x) {
  const int stride = tile_rows + 1;
  const int64_t total = int64_t(tile_rows) * map.dim;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    int64_t r, i, l;
    map.element(e, tile_rows, r, i, l);
    const int64_t row = row0 + r;
    x[i * stride + r] = row < rows ? src[map.offset(row, i, l)] : T(0);
  }
}

template <class T>
__device__ void store_tile(const T* x, const RowMap& map, int64_t row0, int64_t rows, int tile_rows,
                           T* __restrict__ dst) {
  const int stride = tile_rows + 1;
  const int64_t total = int64_t(tile_rows) * map.dim;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    int64_t r, i, l;
    map.element(e, tile_rows, r, i, l);
    const int64_t row = row0 + r;
    if (row < rows) dst[map.offset(row, i, l)] = x[i * stride + r];
  }
}

template <class T>
__device__ void copy_to_shared(const T* __restrict__ src, int64_t n, T* dst) {
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) dst[e] = src[e];
}

// Scratch of `count` elements per row of a tile, carved from shared memory in order.
template <class T>
struct Carver {
  T* next;
  int stride;
  __device__ T* take(int count) {
    T* p = next;
    next += int64_t(count) * stride;
    return p;
  }
  __device__ Lane<T> lane(T* base) const { return {base + threadIdx.x, stride}; }
  __device__ Lane<const T> clane(const T* base) const { return {base + threadIdx.x, stride}; }
};

// ---------------------------------------------------------------- dense kernels

template <class T>
struct DenseArgs {
  const T* a;
  const T* b;
  const T* g;  // output gradient (backward)
  T* out;      // product (forward) or grad a (backward)
  T* out_b;    // grad b (backward)
  RowMap ma, mb, mc, mgb;
  Grouped<T> by_k, by_i, by_j;
  int64_t rows;
  int tile_rows;
};

template <class T>
__global__ void dense_product_kernel(const DenseArgs<T> p) {
  const int da = p.ma.dim, db = p.mb.dim, dc = p.mc.dim, R = p.tile_rows;
  Carver<T> c{reinterpret_cast<T*>(shared_base()), R + 1};
  T* xa = c.take(da);
  T* xb = c.take(db);
  T* xo = c.take(dc);
  const int64_t tiles = (p.rows + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    load_tile(p.a, p.ma, row0, p.rows, R, xa);
    load_tile(p.b, p.mb, row0, p.rows, R, xb);
    __syncthreads();
    if (row0 + threadIdx.x < p.rows)
      gaunt::row::dense_product(p.by_k, dc, c.clane(xa), c.clane(xb), c.lane(xo));
    __syncthreads();
    store_tile(xo, p.mc, row0, p.rows, R, p.out);
    __syncthreads();  // before the next tile overwrites the buffers
  }
}

template <class T>
__global__ void dense_backward_kernel(const DenseArgs<T> p) {
  const int da = p.ma.dim, db = p.mb.dim, dc = p.mc.dim, R = p.tile_rows;
  Carver<T> c{reinterpret_cast<T*>(shared_base()), R + 1};
  T* xg = c.take(dc);
  T* xa = c.take(da);
  T* xb = c.take(db);
  T* ga = c.take(da);
  T* gb = c.take(db);
  const int64_t tiles = (p.rows + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    load_tile(p.g, p.mc, row0, p.rows, R, xg);
    load_tile(p.a, p.ma, row0, p.rows, R, xa);
    load_tile(p.b, p.mb, row0, p.rows, R, xb);
    __syncthreads();
    if (row0 + threadIdx.x < p.rows)
      gaunt::row::dense_backward(p.by_i, p.by_j, da, db, c.clane(xg), c.clane(xa), c.clane(xb),
                                 c.lane(ga), c.lane(gb));
    __syncthreads();
    store_tile(ga, p.ma, row0, p.rows, R, p.out);
    store_tile(gb, p.mgb, row0, p.rows, R, p.out_b);
    __syncthreads();
  }
}

// ---------------------------------------------------------------- grid kernels

// A Legendre table [n_theta, (L + 1)^2] of one side.
template <class T>
struct SideTable {
  const T* p;
  int lmax;
  __host__ __device__ int64_t size(int n_theta) const {
    return int64_t(n_theta) * (lmax + 1) * (lmax + 1);
  }
};

template <class T>
struct GridArgs {
  const T* a;
  const T* b;
  T* out;
  RowMap ma, mb, mc;
  SideTable<T> sa, sb, sc;  // to_grid / from_grid use sa only
  Tables<T> tables;         // trig points at global memory
  int64_t rows;
  int tile_rows;
  bool stage;  // copy the tables to shared memory (after the tile)
};

// Where the kernels read the tables: shared memory after the tile if staged, else global.
template <class T>
__device__ void place_tables(const GridArgs<T>& p, T* smem, int sides, Tables<T>& g,
                             const T* (&legendre)[3]) {
  const SideTable<T> s[3] = {p.sa, p.sb, p.sc};
  g = p.tables;
  for (int k = 0; k < sides; ++k) legendre[k] = s[k].p;
  if (!p.stage) return;
  T* dst = smem;
  for (int k = 0; k < sides; ++k) {
    const int64_t n = s[k].size(g.n_theta);
    copy_to_shared(s[k].p, n, dst);
    legendre[k] = dst;
    dst += n;
  }
  copy_to_shared(p.tables.trig, int64_t(g.half()) * g.trig_width, dst);
  g.trig = dst;
  __syncthreads();
}

template <class T>
__global__ void grid_product_kernel(const GridArgs<T> p) {
  const int La = p.sa.lmax, Lb = p.sb.lmax, Lc = p.sc.lmax, R = p.tile_rows;
  Carver<T> c{reinterpret_cast<T*>(shared_base()), R + 1};
  T* xa = c.take(p.ma.dim);
  T* xb = c.take(p.mb.dim);
  T* xo = c.take(p.mc.dim);
  T* ra = c.take(2 * La + 1);
  T* rb = c.take(2 * Lb + 1);
  T* hs = c.take(p.tables.half());
  T* hd = c.take(p.tables.half());
  T* rc = c.take(2 * Lc + 1);
  Tables<T> g;
  const T* leg[3];
  place_tables(p, c.next, 3, g, leg);
  const GridScratch<T> w{c.lane(ra), c.lane(rb), c.lane(hs), c.lane(hd), c.lane(rc)};
  const int64_t tiles = (p.rows + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    load_tile(p.a, p.ma, row0, p.rows, R, xa);
    load_tile(p.b, p.mb, row0, p.rows, R, xb);
    __syncthreads();
    if (row0 + threadIdx.x < p.rows)
      gaunt::row::grid_product(g, leg[0], La, leg[1], Lb, leg[2], Lc, c.clane(xa), c.clane(xb),
                               c.lane(xo), w);
    __syncthreads();
    store_tile(xo, p.mc, row0, p.rows, R, p.out);
    __syncthreads();
  }
}

// a: coefficients [rows, d] -> out: grid [rows, n_theta, n_phi], written by each row's thread.
template <class T>
__global__ void to_grid_kernel(const GridArgs<T> p) {
  const int L = p.sa.lmax, R = p.tile_rows;
  Carver<T> c{reinterpret_cast<T*>(shared_base()), R + 1};
  T* x = c.take(p.ma.dim);
  T* ra = c.take(2 * L + 1);
  Tables<T> g;
  const T* leg[3];
  place_tables(p, c.next, 1, g, leg);
  const int64_t q = int64_t(g.n_theta) * g.n_phi;
  const int64_t tiles = (p.rows + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R, row = row0 + threadIdx.x;
    load_tile(p.a, p.ma, row0, p.rows, R, x);
    __syncthreads();
    if (row < p.rows) gaunt::row::to_grid(g, leg[0], L, c.clane(x), p.out + row * q, c.lane(ra));
    __syncthreads();
  }
}

// a: grid [rows, n_theta, n_phi], read by each row's thread -> out: coefficients [rows, d].
template <class T>
__global__ void from_grid_kernel(const GridArgs<T> p) {
  const int L = p.sa.lmax, R = p.tile_rows;
  Carver<T> c{reinterpret_cast<T*>(shared_base()), R + 1};
  T* xo = c.take(p.mc.dim);
  T* hs = c.take(p.tables.half());
  T* hd = c.take(p.tables.half());
  T* rc = c.take(2 * L + 1);
  Tables<T> g;
  const T* leg[3];
  place_tables(p, c.next, 1, g, leg);
  const GridScratch<T> w{{nullptr, 0}, {nullptr, 0}, c.lane(hs), c.lane(hd), c.lane(rc)};
  const int64_t q = int64_t(g.n_theta) * g.n_phi;
  const int64_t tiles = (p.rows + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R, row = row0 + threadIdx.x;
    if (row < p.rows) gaunt::row::from_grid(g, leg[0], L, p.a + row * q, c.lane(xo), w);
    __syncthreads();
    store_tile(xo, p.mc, row0, p.rows, R, p.out);
    __syncthreads();
  }
}

// ---------------------------------------------------------------- launching

struct Launch {
  int rows;      // rows per tile = threads per block
  size_t bytes;  // dynamic shared memory
};

// The largest tile (a power of two <= kMaxRows) whose shared memory, per_row elements of each
// row plus `fixed` bytes, fits kTileBytes, or failing that the device's limit.
Launch plan_launch(int64_t per_row, size_t elem, size_t fixed, const char* op) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        c10::cuda::current_device()));
  auto bytes = [&](int rows) { return size_t(rows + 1) * size_t(per_row) * elem + fixed; };
  int rows = kMaxRows;
  while (rows > 32 && bytes(rows) > kTileBytes) rows /= 2;
  while (rows > 1 && bytes(rows) > size_t(optin)) rows /= 2;
  TORCH_CHECK(bytes(rows) <= size_t(optin), op, ": degrees too large for the CUDA kernel (",
              bytes(rows), " bytes of shared memory for one row, the device allows ", optin, ")");
  return {rows, bytes(rows)};
}

template <class K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

int grid_blocks(int64_t rows, int tile_rows) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(sms) * 32)));
}

// ---------------------------------------------------------------- checks (shared with the CPU:
// gaunt_checks.h)

// The device of a product: that of its first operand, which must be a CUDA tensor.
at::Device device_of(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", x.device());
  return x.device();
}

// The kernels index rows and tables with int: refuse sizes they cannot address.
void check_int_range(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int32_t>::max() / 4, op, ": ", what, " (", v,
              ") is too large for the CUDA kernel");
}

RowMap row_map(int64_t L, int64_t channels, int64_t rows_per_sample, bool flat) {
  return {(L + 1) * (L + 1), channels, std::max<int64_t>(rows_per_sample, 1), flat};
}

// ---------------------------------------------------------------- grid ops

template <class T>
Tables<T> tables_of(const at::Tensor& trig, int64_t n_theta) {
  return {trig.data_ptr<T>(), static_cast<int>(trig.size(1)), static_cast<int>(n_theta),
          static_cast<int>(trig.size(0))};
}

// Launches kernel over `rows` rows with the given per-row scratch (elements) and tables.
template <class T>
void launch_grid(void (*kernel)(GridArgs<T>), GridArgs<T> args, int64_t per_row,
                 int64_t table_elems, const char* op) {
  args.stage = size_t(table_elems) * sizeof(T) <= kTableBytes;
  const size_t fixed = args.stage ? size_t(table_elems) * sizeof(T) : 0;
  const Launch launch = plan_launch(per_row, sizeof(T), fixed, op);
  args.tile_rows = launch.rows;
  allow_smem(kernel, launch.bytes);
  kernel<<<grid_blocks(args.rows, launch.rows), launch.rows, launch.bytes,
           c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t half_of(const at::Tensor& trig) { return trig.size(0) / 2 + 1; }

at::Tensor grid_product_cuda(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& pa_,
                             const at::Tensor& pb_, const at::Tensor& pc_, const at::Tensor& trig_,
                             bool flat) {
  constexpr const char* op = "gaunt_grid_product";
  const auto device = device_of(a_, op, "a");
  check_trig(trig_, op, device);
  check_operands(a_, b_, op, device);
  check_same_dtype(a_, trig_, op, "a");
  const int64_t La = side_lmax(pa_, trig_, op, "pa"), Lb = side_lmax(pb_, trig_, op, "pb"),
                Lc = side_lmax(pc_, trig_, op, "pc");
  const int64_t n_theta = pa_.size(0);
  check_rings(pb_, n_theta, op, "pb");
  check_rings(pc_, n_theta, op, "pc");
  const int64_t N = a_.size(0), C = a_.size(1), Cb = b_.size(1);
  TORCH_CHECK(a_.size(2) == pa_.size(1), op, ": a has ", a_.size(2), " coefficients, pa has ",
              pa_.size(1));
  TORCH_CHECK(b_.size(2) == pb_.size(1), op, ": b has ", b_.size(2), " coefficients, pb has ",
              pb_.size(1));
  const c10::cuda::CUDAGuard guard(device);
  auto a = a_.contiguous(), b = b_.contiguous(), pa = pa_.contiguous(), pb = pb_.contiguous(),
       pc = pc_.contiguous(), trig = trig_.contiguous();
  auto out = at::empty({N, C, pc.size(1)}, a.options());
  if (out.numel() == 0) return out;
  check_int_range(trig.numel() + n_theta * (pa.size(1) + pb.size(1) + pc.size(1)), op,
                  "the grid tables");
  const int64_t half = half_of(trig);
  const int64_t per_row = a.size(2) + b.size(2) + pc.size(1) + 2 * (La + Lb + Lc) + 3 + 2 * half;
  const int64_t tables = n_theta * (pa.size(1) + pb.size(1) + pc.size(1)) + half * trig.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    using T = scalar_t;
    GridArgs<T> args{a.data_ptr<T>(),
                     b.data_ptr<T>(),
                     out.data_ptr<T>(),
                     row_map(La, C, C, flat),
                     row_map(Lb, Cb, C, flat),
                     row_map(Lc, C, C, flat),
                     {pa.data_ptr<T>(), static_cast<int>(La)},
                     {pb.data_ptr<T>(), static_cast<int>(Lb)},
                     {pc.data_ptr<T>(), static_cast<int>(Lc)},
                     tables_of<T>(trig, n_theta),
                     N * C,
                     0,
                     false};
    launch_grid<T>(grid_product_kernel<T>, args, per_row, tables, op);
  });
  return out;
}

at::Tensor to_grid_cuda(const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_to_grid";
  const auto device = device_of(x_, op, "x");
  check_trig(trig_, op, device);
  check_float(x_, op, "x", 2, device);
  check_same_dtype(x_, trig_, op, "x");
  const int64_t L = side_lmax(p_, trig_, op, "p");
  TORCH_CHECK(x_.size(1) == p_.size(1), op, ": x has ", x_.size(1), " coefficients, p has ",
              p_.size(1));
  const c10::cuda::CUDAGuard guard(device);
  auto x = x_.contiguous(), p = p_.contiguous(), trig = trig_.contiguous();
  const int64_t rows = x.size(0), n_theta = p.size(0), n_phi = trig.size(0);
  auto out = at::empty({rows, n_theta, n_phi}, x.options());
  if (out.numel() == 0) return out;
  check_int_range(n_theta * n_phi + trig.numel() + p.numel(), op, "the grid");
  const int64_t half = half_of(trig);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    using T = scalar_t;
    const SideTable<T> s{p.data_ptr<T>(), static_cast<int>(L)};
    const RowMap m = row_map(L, 1, 1, false);
    GridArgs<T> args{x.data_ptr<T>(),
                     nullptr,
                     out.data_ptr<T>(),
                     m,
                     m,
                     m,
                     s,
                     s,
                     s,
                     tables_of<T>(trig, n_theta),
                     rows,
                     0,
                     false};
    launch_grid<T>(to_grid_kernel<T>, args, x.size(1) + 2 * L + 1, p.numel() + half * trig.size(1),
                   op);
  });
  return out;
}

at::Tensor from_grid_cuda(const at::Tensor& grid_, const at::Tensor& p_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_from_grid";
  const auto device = device_of(grid_, op, "grid");
  check_trig(trig_, op, device);
  check_float(grid_, op, "grid", 3, device);
  check_same_dtype(grid_, trig_, op, "grid");
  const int64_t L = side_lmax(p_, trig_, op, "p");
  const int64_t n_theta = p_.size(0), n_phi = trig_.size(0);
  TORCH_CHECK(grid_.size(1) == n_theta && grid_.size(2) == n_phi, op, ": grid must be [rows, ",
              n_theta, ", ", n_phi, "], got ", grid_.sizes());
  const c10::cuda::CUDAGuard guard(device);
  auto grid = grid_.contiguous(), p = p_.contiguous(), trig = trig_.contiguous();
  const int64_t rows = grid.size(0), d = p.size(1);
  auto out = at::empty({rows, d}, grid.options());
  if (out.numel() == 0) return out;
  check_int_range(n_theta * n_phi + trig.numel() + p.numel(), op, "the grid");
  const int64_t half = half_of(trig);
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), op, [&] {
    using T = scalar_t;
    const SideTable<T> s{p.data_ptr<T>(), static_cast<int>(L)};
    const RowMap m = row_map(L, 1, 1, false);
    GridArgs<T> args{grid.data_ptr<T>(),
                     nullptr,
                     out.data_ptr<T>(),
                     m,
                     m,
                     m,
                     s,
                     s,
                     s,
                     tables_of<T>(trig, n_theta),
                     rows,
                     0,
                     false};
    launch_grid<T>(from_grid_kernel<T>, args, d + 2 * half + 2 * L + 1,
                   p.numel() + half * trig.size(1), op);
  });
  return out;
}

// ---------------------------------------------------------------- dense plans

// The Gaunt table grouped three ways, on the device: ints = [ptr_k (dc + 1), ptr_i (da + 1),
// ptr_j (db + 1), pairs by k, by i, by j (nnz each)], values = [by k, by i, by j] in the table's
// dtype. keep: the index and value tensors of the key, held so that their memory cannot be reused
// by other tensors under the same key.
struct DensePlan {
  at::Tensor ints, values;
  int64_t nnz = 0;
  std::array<int64_t, 3> dims{};
  at::Tensor keep_index, keep_value;

  template <class T>
  std::array<Grouped<T>, 3> grouped() const {
    const int32_t* base = ints.data_ptr<int32_t>();
    const T* val = values.data_ptr<T>();
    const int32_t* ptr_k = base;
    const int32_t* ptr_i = ptr_k + dims[2] + 1;
    const int32_t* ptr_j = ptr_i + dims[0] + 1;
    const int32_t* pairs = ptr_j + dims[1] + 1;
    return {Grouped<T>{ptr_k, pairs, val}, Grouped<T>{ptr_i, pairs + nnz, val + nnz},
            Grouped<T>{ptr_j, pairs + 2 * nnz, val + 2 * nnz}};
  }
};

using DensePlanPtr = std::shared_ptr<const DensePlan>;

std::vector<int64_t> tensor_key(const at::Tensor& t) {
  std::vector<int64_t> key{reinterpret_cast<int64_t>(t.data_ptr()), cache_version(t),
                           t.device().index(), static_cast<int64_t>(t.scalar_type()), t.dim()};
  for (int64_t d = 0; d < t.dim(); ++d) {
    key.push_back(t.size(d));
    key.push_back(t.stride(d));
  }
  return key;
}

DensePlanPtr build_dense_plan(const at::Tensor& index, const at::Tensor& value,
                              std::array<int64_t, 3> dims, const char* op) {
  // One sync per new table: checking and grouping it needs the values on the host.
  const auto idx = index.to(at::kCPU).contiguous();
  const auto val = value.to(at::kCPU, at::kDouble).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  const double* v = val.data_ptr<double>();
  const int64_t nnz = idx.size(0);
  constexpr const char* names[3] = {"a", "b", "the output"};
  for (int64_t n = 0; n < nnz; ++n)
    for (int c = 0; c < 3; ++c)
      TORCH_CHECK(p[3 * n + c] >= 0 && p[3 * n + c] < dims[c], op, ": index[", n, ", ", c,
                  "] = ", p[3 * n + c], " is out of range for ", names[c], " (", dims[c],
                  " coefficients)");
  for (int c = 0; c < 3; ++c)
    TORCH_CHECK(dims[c] <= 0x7fff, op, ": ", names[c], " has ", dims[c],
                " coefficients, more than the CUDA kernel indexes (32767)");
  TORCH_CHECK(nnz <= std::numeric_limits<int32_t>::max() / 4, op, ": index has ", nnz,
              " entries, too many for the CUDA kernel");
  std::vector<int32_t> ints;
  std::vector<int64_t> entry;
  gaunt::group_entries(p, nnz, dims.data(), ints, entry);
  std::vector<double> values(entry.size());
  for (size_t x = 0; x < entry.size(); ++x) values[x] = v[entry[x]];
  if (ints.empty()) ints.push_back(0);
  auto plan = std::make_shared<DensePlan>();
  plan->ints = at::tensor(ints, at::kInt).to(index.device());
  plan->values = at::tensor(values.empty() ? std::vector<double>{0.0} : values, at::kDouble)
                     .to(index.device(), value.scalar_type());
  plan->nnz = nnz;
  plan->dims = dims;
  plan->keep_index = index;
  plan->keep_value = value;
  return plan;
}

DensePlanPtr dense_plan(const at::Tensor& index, const at::Tensor& value,
                        std::array<int64_t, 3> dims, const char* op) {
  static std::mutex mutex;
  // Never destroyed: device tensors must not be freed after the CUDA allocator at exit.
  static auto* cache = new std::map<std::vector<int64_t>, DensePlanPtr>();
  auto key = tensor_key(index);
  const auto vkey = tensor_key(value);
  key.insert(key.end(), vkey.begin(), vkey.end());
  key.insert(key.end(), dims.begin(), dims.end());
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  DensePlanPtr plan = build_dense_plan(index, value, dims, op);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache->size() >= 64) cache->clear();  // callers hold their own shared_ptr
  return cache->emplace(key, std::move(plan)).first->second;
}

void check_table(const at::Tensor& index, const at::Tensor& value, const at::Tensor& a,
                 const char* op) {
  TORCH_CHECK(index.device() == a.device() && index.scalar_type() == at::kLong, op,
              ": index must be an int64 tensor on ", a.device(), ", got ", index.scalar_type(),
              " on ", index.device());
  TORCH_CHECK(index.dim() == 2 && index.size(1) == 3, op, ": index must be [nnz, 3], got shape ",
              index.sizes());
  check_float(value, op, "value", 1, a.device());
  check_same_dtype(value, a, op, "value");
  TORCH_CHECK(value.size(0) == index.size(0), op, ": value has ", value.size(0),
              " entries, index has ", index.size(0));
}

// The cache may drop a plan while a launch on another stream still reads it: tell the allocator.
void record(const DensePlan& plan) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  plan.ints.record_stream(stream);
  plan.values.record_stream(stream);
}

// ---------------------------------------------------------------- dense ops

at::Tensor dense_product_cuda(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& index,
                              const at::Tensor& value, int64_t lmax_out, bool flat) {
  constexpr const char* op = "gaunt_dense_product";
  const auto device = device_of(a_, op, "a");
  const int64_t C = check_operands(a_, b_, op, device), N = a_.size(0), Cb = b_.size(1);
  TORCH_CHECK(lmax_out >= 0, op, ": lmax_out must be >= 0, got ", lmax_out);
  const int64_t La = degree_of(a_.size(2), op, "a"), Lb = degree_of(b_.size(2), op, "b");
  const int64_t dc = (lmax_out + 1) * (lmax_out + 1);
  check_table(index, value, a_, op);
  const c10::cuda::CUDAGuard guard(device);
  const DensePlanPtr plan = dense_plan(index, value, {a_.size(2), b_.size(2), dc}, op);
  auto a = a_.contiguous(), b = b_.contiguous();
  auto out = at::empty({N, C, dc}, a.options());
  if (out.numel() == 0) return out;
  record(*plan);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    using T = scalar_t;
    const auto g = plan->grouped<T>();
    const RowMap mc = row_map(lmax_out, C, C, flat);
    DenseArgs<T> args{a.data_ptr<T>(),
                      b.data_ptr<T>(),
                      nullptr,
                      out.data_ptr<T>(),
                      nullptr,
                      row_map(La, C, C, flat),
                      row_map(Lb, Cb, C, flat),
                      mc,
                      mc,
                      g[0],
                      g[1],
                      g[2],
                      N * C,
                      0};
    const Launch launch = plan_launch(a.size(2) + b.size(2) + dc, sizeof(T), 0, op);
    args.tile_rows = launch.rows;
    allow_smem(dense_product_kernel<T>, launch.bytes);
    dense_product_kernel<T><<<grid_blocks(args.rows, launch.rows), launch.rows, launch.bytes,
                              c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dense_backward_cuda(const at::Tensor& grad_,
                                                       const at::Tensor& a_, const at::Tensor& b_,
                                                       const at::Tensor& index,
                                                       const at::Tensor& value, bool flat) {
  constexpr const char* op = "gaunt_dense_backward";
  const auto device = device_of(grad_, op, "grad");
  const int64_t C = check_operands(a_, b_, op, device), N = a_.size(0), Cb = b_.size(1);
  check_float(grad_, op, "grad", 3, device);
  check_same_dtype(grad_, a_, op, "grad");
  TORCH_CHECK(grad_.size(0) == N && grad_.size(1) == C, op, ": grad must be [", N, ", ", C,
              ", (L + 1)^2], got shape ", grad_.sizes());
  const int64_t La = degree_of(a_.size(2), op, "a"), Lb = degree_of(b_.size(2), op, "b"),
                Lc = degree_of(grad_.size(2), op, "grad");
  check_table(index, value, a_, op);
  const c10::cuda::CUDAGuard guard(device);
  const DensePlanPtr plan = dense_plan(index, value, {a_.size(2), b_.size(2), grad_.size(2)}, op);
  auto grad = grad_.contiguous(), a = a_.contiguous(), b = b_.contiguous();
  auto grad_a = at::empty_like(a);
  // A shared b gets one gradient row per channel (channel layout), summed over the channels
  // afterwards: no two threads ever write the same element.
  const bool shared = Cb == 1 && C > 1;
  auto grad_b = shared ? at::empty({N, C, b.size(2)}, b.options()) : at::empty_like(b);
  if (grad_a.numel() == 0) return {grad_a, at::zeros_like(b)};  // e.g. C = 0 beside a shared b
  record(*plan);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    using T = scalar_t;
    const auto g = plan->grouped<T>();
    DenseArgs<T> args{a.data_ptr<T>(),
                      b.data_ptr<T>(),
                      grad.data_ptr<T>(),
                      grad_a.data_ptr<T>(),
                      grad_b.data_ptr<T>(),
                      row_map(La, C, C, flat),
                      row_map(Lb, Cb, C, flat),
                      row_map(Lc, C, C, flat),
                      row_map(Lb, shared ? C : Cb, C, flat && !shared),
                      g[0],
                      g[1],
                      g[2],
                      N * C,
                      0};
    const Launch launch = plan_launch(grad.size(2) + 2 * (a.size(2) + b.size(2)), sizeof(T), 0, op);
    args.tile_rows = launch.rows;
    allow_smem(dense_backward_kernel<T>, launch.bytes);
    dense_backward_kernel<T><<<grid_blocks(args.rows, launch.rows), launch.rows, launch.bytes,
                               c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, shared ? grad_b.sum(1, true) : grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(equikern, CUDA, m) {
  m.impl("gaunt_grid_product", &grid_product_cuda);
  m.impl("gaunt_dense_product", &dense_product_cuda);
  m.impl("gaunt_dense_backward", &dense_backward_cuda);
  m.impl("gaunt_to_grid", &to_grid_cuda);
  m.impl("gaunt_from_grid", &from_grid_cuda);
}

}  // namespace equikern
