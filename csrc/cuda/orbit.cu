// CUDA implementation of the permutation-orbit ops (schemas in csrc/cpu/orbit.cpp).
//
// Every pooling op is a gather-reduction: output row o of batch p reduces input rows members[e]
// for e in the CSR range of o. The CSR (and its cut into segments, see plan_segments in
// kernels/orbit.h) depends on ids alone, so it is validated and built once per ids tensor on the
// host and cached on the device: no atomics, no per-call sort, no per-call sync. Each task (one
// segment of one batch row) is a group of lanes over the channels, loading 16 bytes per lane
// where the layout allows it. Orbits longer than one segment are combined in a second pass in
// segment order, so results are reproducible bit for bit (but may differ in the last bits from
// the CPU's single sequential sum).
//
// orbit_ids runs a concurrent union-find (compare-and-swap hooking of the larger root under the
// smaller), then numbers each set by its smallest tuple with a prefix sum: the same canonical ids
// as the CPU.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "cache_version.h"
#include "kernels/orbit.h"

namespace equikern {

// Host validation shared with the CPU backend (csrc/cpu/orbit.cpp): same checks, same messages.
void check_ids_in_range(const int64_t* p, int64_t N, int64_t M, const char* op, const char* name);
void check_permutations(const int64_t* g, int64_t r, int64_t n);

namespace {

using orbit::Gather;
using orbit::Segment;
using orbit::Split;

constexpr int kThreads = 256;
// Members per segment: long enough that a task streams many rows, short enough that an orbit of
// all 65536 points still feeds every SM (256 segments per batch row).
constexpr int64_t kChunk = 256;

// ---------------------------------------------------------------- kernels

// Lanes per task: a power of two covering the channels V at a time, at most a warp.
struct Lanes {
  int log2;
  __host__ __device__ int64_t per_block() const { return kThreads >> log2; }
};

template <int V, class T, class Acc, bool Max>
__global__ void __launch_bounds__(kThreads)
    segment_kernel(const Gather<T, Acc> a, int64_t tasks, Lanes lanes) {
  const int n = 1 << lanes.log2;
  const int lane = threadIdx.x & (n - 1);
  const int64_t stride = int64_t(gridDim.x) * lanes.per_block();
  for (int64_t t = int64_t(blockIdx.x) * lanes.per_block() + (threadIdx.x >> lanes.log2); t < tasks;
       t += stride) {
    if constexpr (Max)
      orbit::max_segment<V>(a, t, lane, n);
    else
      orbit::sum_segment<V>(a, t, lane, n);
  }
}

template <int V, class T, class Acc, bool Max>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const Gather<T, Acc> a, int64_t tasks, Lanes lanes) {
  const int n = 1 << lanes.log2;
  const int lane = threadIdx.x & (n - 1);
  const int64_t stride = int64_t(gridDim.x) * lanes.per_block();
  for (int64_t t = int64_t(blockIdx.x) * lanes.per_block() + (threadIdx.x >> lanes.log2); t < tasks;
       t += stride) {
    if constexpr (Max)
      orbit::max_combine<V>(a, t, lane, n);
    else
      orbit::sum_combine<V>(a, t, lane, n);
  }
}

template <int V, class T>
__global__ void __launch_bounds__(kThreads)
    broadcast_kernel(const T* __restrict__ s, const int64_t* __restrict__ ids, int64_t N, int64_t M,
                     int64_t Q, T* __restrict__ out, int64_t tasks, Lanes lanes) {
  const int n = 1 << lanes.log2;
  const int lane = threadIdx.x & (n - 1);
  const int64_t stride = int64_t(gridDim.x) * lanes.per_block();
  for (int64_t t = int64_t(blockIdx.x) * lanes.per_block() + (threadIdx.x >> lanes.log2); t < tasks;
       t += stride)
    orbit::broadcast_row<V>(s, ids, N, M, Q, out, t, lane, n);
}

// ---- union-find. parent[v] <= v always, so a root is the smallest tuple of its set.

__device__ int32_t root_of(volatile int32_t* parent, int32_t v) {
  while (true) {
    const int32_t up = parent[v];
    if (up == v) return v;
    const int32_t upup = parent[up];
    if (upup == up) return up;
    // Path halving. A racing thread may store another ancestor here: any ancestor is a correct
    // parent, since sets only ever merge.
    parent[v] = upup;
    v = upup;
  }
}

__device__ void unite(int32_t* parent, int32_t a, int32_t b) {
  volatile int32_t* vp = parent;
  a = root_of(vp, a);
  b = root_of(vp, b);
  while (a != b) {
    if (a < b) {
      const int32_t swap = a;
      a = b;
      b = swap;
    }
    // Hook the larger root under the smaller, if it is still a root; else retry from the root it
    // was hooked under (smaller than a, so this ends).
    const int32_t seen = atomicCAS(parent + a, a, b);
    if (seen == a) return;
    a = root_of(vp, seen);
    b = root_of(vp, b);
  }
}

__global__ void iota_kernel(int32_t* parent, int64_t total) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x)
    parent[t] = static_cast<int32_t>(t);
}

__global__ void hook_kernel(const int64_t* __restrict__ gens, int64_t r, int64_t n, int64_t k,
                            int64_t total, int32_t* parent) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x)
    for (int64_t g = 0; g < r; ++g)
      unite(parent, static_cast<int32_t>(t),
            static_cast<int32_t>(orbit::tuple_image(gens + g * n, n, k, t)));
}

// After all hooks: the root (smallest tuple) of every tuple's set.
__global__ void root_kernel(int32_t* parent, int64_t total, int32_t* root) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x)
    root[t] = root_of(parent, static_cast<int32_t>(t));
}

// ---------------------------------------------------------------- plans

enum PlanKind : int64_t { kPool = 0, kOrbital = 1, kOrbitalAdjoint = 2 };

// A validated CSR on the device with its segments. keep: the index tensor of the key, held so that
// its memory cannot be reused by another tensor under the same key.
struct DevicePlan {
  at::Tensor ptr, members, segments, splits;
  at::Tensor
      ids;  // kPool: the validated ids on the device (kernels never read the caller's tensor)
  int64_t M = 0, num_segments = 0, num_splits = 0, slots = 0;
  at::Tensor keep;
};

using PlanPtr = std::shared_ptr<const DevicePlan>;

// Identity, version and layout of the index tensor, the plan kind and its range (M or R).
std::vector<int64_t> plan_key(PlanKind kind, const at::Tensor& index, int64_t range) {
  std::vector<int64_t> key{kind,
                           reinterpret_cast<int64_t>(index.data_ptr()),
                           cache_version(index),
                           index.device().index(),
                           range,
                           index.dim()};
  for (int64_t d = 0; d < index.dim(); ++d) {
    key.push_back(index.size(d));
    key.push_back(index.stride(d));
  }
  return key;
}

PlanPtr upload(std::vector<int64_t> ptr, std::vector<int64_t> members, int64_t M,
               const at::Tensor& index, const at::Tensor& validated_ids = {}) {
  std::vector<Segment> segments;
  std::vector<Split> splits;
  const int64_t slots = orbit::plan_segments(ptr.data(), M, kChunk, segments, splits);
  auto plan = std::make_shared<DevicePlan>();
  const auto device = index.device();
  auto to_device = [&](const int64_t* data, size_t count) {
    auto host = at::empty({static_cast<int64_t>(std::max<size_t>(count, 1))}, at::kLong);
    std::copy(data, data + count, host.data_ptr<int64_t>());
    return host.to(device);
  };
  static_assert(sizeof(Segment) == 4 * sizeof(int64_t) && sizeof(Split) == 3 * sizeof(int64_t));
  plan->ptr = to_device(ptr.data(), ptr.size());
  plan->members = to_device(members.data(), members.size());
  plan->segments =
      to_device(reinterpret_cast<const int64_t*>(segments.data()), 4 * segments.size());
  plan->splits = to_device(reinterpret_cast<const int64_t*>(splits.data()), 3 * splits.size());
  plan->M = M;
  plan->num_segments = static_cast<int64_t>(segments.size());
  plan->num_splits = static_cast<int64_t>(splits.size());
  plan->slots = slots;
  plan->keep = index;
  if (validated_ids.defined()) plan->ids = validated_ids.to(device);
  return plan;
}

// kPool: ids [N] in [0, M) -> CSR of the members of each orbit.
// kOrbital: slots [n, n] in [0, R) -> output row i*R + s gathers input rows j with slots[i, j] ==
// s. kOrbitalAdjoint: output row j gathers input rows i*R + slots[i, j], i = 0..n-1.
PlanPtr build_plan(PlanKind kind, const at::Tensor& index, int64_t range, const char* op,
                   const char* name) {
  // One sync per new plan: validating needs the values on the host.
  const auto host = index.to(at::kCPU).contiguous();
  const int64_t* v = host.data_ptr<int64_t>();
  const int64_t N = host.numel();
  check_ids_in_range(v, N, range, op, name);
  if (kind == kPool) {
    std::vector<int64_t> ptr(range + 1), members(N);
    orbit::build_csr(v, N, range, ptr.data(), members.data());
    return upload(std::move(ptr), std::move(members), range, index, host);
  }
  const int64_t n = index.size(0), R = range;
  const int64_t M = kind == kOrbital ? n * R : n;
  std::vector<int64_t> ptr(M + 1), members(N);
  if (kind == kOrbital)
    orbit::orbital_csr(v, n, R, ptr.data(), members.data());
  else
    orbit::orbital_adjoint_csr(v, n, R, ptr.data(), members.data());
  return upload(std::move(ptr), std::move(members), M, index);
}

PlanPtr cached_plan(PlanKind kind, const at::Tensor& index, int64_t range, const char* op,
                    const char* name) {
  static std::mutex mutex;
  // Never destroyed: device tensors must not be freed after the CUDA allocator at exit.
  static auto* cache = new std::map<std::vector<int64_t>, PlanPtr>();
  const auto key = plan_key(kind, index, range);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  PlanPtr plan = build_plan(kind, index, range, op, name);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache->size() >= 64) cache->clear();  // callers hold their own shared_ptr
  return cache->emplace(key, std::move(plan)).first->second;
}

// ---------------------------------------------------------------- launching

void check_features(const at::Tensor& x, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
}

void check_index(const at::Tensor& index, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(index.device() == x.device(), op, ": ", name, " is on ", index.device(),
              " but the features are on ", x.device());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              index.scalar_type());
}

int grid_for(int64_t tasks, int64_t per_block) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t blocks = (tasks + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 32)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Lanes lanes_for(int64_t Q, int V) {
  const int64_t packs = (Q + V - 1) / V;
  int log2 = 0;
  while (log2 < 5 && (int64_t(1) << log2) < packs) ++log2;
  return Lanes{log2};
}

// Runs fn.template operator()<V>() with V = 16 bytes of T where Q and every pointer allow it.
template <class T, class F>
void with_width(int64_t Q, std::initializer_list<const void*> pointers, F&& fn) {
  constexpr int kWide = 16 / sizeof(T);
  bool wide = Q % kWide == 0;
  for (const void* p : pointers) wide = wide && aligned16(p);
  if (wide)
    fn(std::integral_constant<int, kWide>{});
  else
    fn(std::integral_constant<int, 1>{});
}

// Reduces x [P, rows, Q] along the plan into out [P, M, Q] (and arg for the max).
template <bool Max>
void gather_reduce(const at::Tensor& x, const DevicePlan& plan, bool mean, at::Tensor& out,
                   at::Tensor* arg) {
  const int64_t P = x.size(0), Q = x.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // The cache may drop the plan while this launch still reads it on another stream than the
  // plan's own: tell the allocator, so that the memory is not reused before the launch ends.
  for (const at::Tensor* t : {&plan.ptr, &plan.members, &plan.segments, &plan.splits})
    t->record_stream(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "orbit_gather", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto acc_type = c10::CppTypeToScalarType<Acc>::value;
    auto work = at::empty({P * plan.slots * Q}, x.options().dtype(acc_type));
    auto work_arg = Max ? at::empty({P * plan.slots * Q}, x.options().dtype(at::kLong))
                        : at::empty({0}, x.options().dtype(at::kLong));
    Gather<T, Acc> a{x.data_ptr<T>(),
                     x.size(1),
                     Q,
                     plan.M,
                     plan.slots,
                     plan.ptr.data_ptr<int64_t>(),
                     plan.members.data_ptr<int64_t>(),
                     reinterpret_cast<const Segment*>(plan.segments.data_ptr<int64_t>()),
                     plan.num_segments,
                     reinterpret_cast<const Split*>(plan.splits.data_ptr<int64_t>()),
                     plan.num_splits,
                     out.data_ptr<T>(),
                     arg ? arg->data_ptr<int64_t>() : nullptr,
                     work.data_ptr<Acc>(),
                     work_arg.data_ptr<int64_t>(),
                     mean};
    with_width<T>(Q, {a.x, a.out}, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const Lanes lanes = lanes_for(Q, V);
      const int64_t tasks = P * plan.num_segments;
      segment_kernel<V, T, Acc, Max>
          <<<grid_for(tasks, lanes.per_block()), kThreads, 0, stream>>>(a, tasks, lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.num_splits > 0) {
        const int64_t combines = P * plan.num_splits;
        combine_kernel<V, T, Acc, Max>
            <<<grid_for(combines, lanes.per_block()), kThreads, 0, stream>>>(a, combines, lanes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// ---------------------------------------------------------------- ops

at::Tensor orbit_pool_cuda(const at::Tensor& x_, const at::Tensor& ids, int64_t M,
                           c10::string_view reduce) {
  check_features(x_, "orbit_pool", "x", 3);
  check_index(ids, x_, "orbit_pool", "ids");
  TORCH_CHECK(reduce == "sum" || reduce == "mean",
              "orbit_pool: reduce must be 'sum' or 'mean', got '", std::string(reduce), "'");
  TORCH_CHECK(M >= 0, "orbit_pool: num_orbits must be >= 0, got ", M);
  TORCH_CHECK(ids.numel() == x_.size(1), "orbit_pool: ids has ", ids.numel(), " entries, expected ",
              x_.size(1));
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto out = at::empty({x.size(0), M, x.size(2)}, x.options());
  const PlanPtr plan = cached_plan(kPool, ids, M, "orbit_pool", "ids");
  if (out.numel() > 0) gather_reduce<false>(x, *plan, reduce == "mean", out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> orbit_pool_max_cuda(const at::Tensor& x_, const at::Tensor& ids,
                                                       int64_t M) {
  check_features(x_, "orbit_pool_max", "x", 3);
  check_index(ids, x_, "orbit_pool_max", "ids");
  TORCH_CHECK(M >= 0, "orbit_pool_max: num_orbits must be >= 0, got ", M);
  TORCH_CHECK(ids.numel() == x_.size(1), "orbit_pool_max: ids has ", ids.numel(),
              " entries, expected ", x_.size(1));
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto out = at::empty({x.size(0), M, x.size(2)}, x.options());
  auto arg = at::empty({x.size(0), M, x.size(2)}, x.options().dtype(at::kLong));
  const PlanPtr plan = cached_plan(kPool, ids, M, "orbit_pool_max", "ids");
  if (out.numel() > 0) gather_reduce<true>(x, *plan, false, out, &arg);
  return {out, arg};
}

at::Tensor orbit_broadcast_cuda(const at::Tensor& s_, const at::Tensor& ids) {
  check_features(s_, "orbit_broadcast", "s", 3);
  check_index(ids, s_, "orbit_broadcast", "ids");
  TORCH_CHECK(ids.dim() == 1, "orbit_broadcast: ids must be 1-D, got shape ", ids.sizes());
  const c10::cuda::CUDAGuard guard(s_.device());
  const int64_t P = s_.size(0), M = s_.size(1), Q = s_.size(2), N = ids.numel();
  auto s = s_.contiguous();
  auto out = at::empty({P, N, Q}, s.options());
  // Validates ids against M (the same plan serves the pooling of the backward).
  const PlanPtr plan = cached_plan(kPool, ids, M, "orbit_broadcast", "ids");
  if (out.numel() == 0) return out;
  // the ids validated with the plan, not the caller's tensor (written since, e.g. through .data)
  const at::Tensor& idx = plan->ids;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  idx.record_stream(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, s.scalar_type(), "orbit_broadcast", [&] {
        using T = scalar_t;
        with_width<T>(Q, {s.data_ptr(), out.data_ptr()}, [&](auto width) {
          constexpr int V = decltype(width)::value;
          const Lanes lanes = lanes_for(Q, V);
          const int64_t tasks = P * N;
          broadcast_kernel<V, T><<<grid_for(tasks, lanes.per_block()), kThreads, 0, stream>>>(
              s.data_ptr<T>(), idx.data_ptr<int64_t>(), N, M, Q, out.data_ptr<T>(), tasks, lanes);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

void check_slots(const at::Tensor& slots, const at::Tensor& x, const char* op, int64_t n) {
  check_index(slots, x, op, "slots");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == n && slots.size(1) == n, op,
              ": slots must have shape [", n, ", ", n, "], got ", slots.sizes());
}

at::Tensor orbital_pool_cuda(const at::Tensor& x_, const at::Tensor& slots, int64_t R) {
  check_features(x_, "orbital_pool", "x", 3);
  const int64_t P = x_.size(0), n = x_.size(1), Q = x_.size(2);
  TORCH_CHECK(R >= 0, "orbital_pool: num_slots must be >= 0, got ", R);
  check_slots(slots, x_, "orbital_pool", n);
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto out = at::empty({P, n, R, Q}, x.options());
  const PlanPtr plan = cached_plan(kOrbital, slots, R, "orbital_pool", "slots");
  auto flat = out.view({P, n * R, Q});
  if (out.numel() > 0) gather_reduce<false>(x, *plan, false, flat, nullptr);
  return out;
}

at::Tensor orbital_pool_backward_cuda(const at::Tensor& g_, const at::Tensor& slots) {
  check_features(g_, "orbital_pool_backward", "grad", 4);
  const int64_t P = g_.size(0), n = g_.size(1), R = g_.size(2), Q = g_.size(3);
  check_slots(slots, g_, "orbital_pool_backward", n);
  const c10::cuda::CUDAGuard guard(g_.device());
  auto g = g_.contiguous().view({P, n * R, Q});
  auto out = at::empty({P, n, Q}, g.options());
  const PlanPtr plan = cached_plan(kOrbitalAdjoint, slots, R, "orbital_pool_backward", "slots");
  if (out.numel() > 0) gather_reduce<false>(g, *plan, false, out, nullptr);
  return out;
}

at::Tensor orbit_ids_cuda(const at::Tensor& gens, int64_t k) {
  TORCH_CHECK(gens.is_cuda(), "orbits: generators must be a CUDA tensor");
  TORCH_CHECK(gens.scalar_type() == at::kLong, "orbits: generators must be int64, got ",
              gens.scalar_type());
  TORCH_CHECK(gens.dim() == 2, "orbits: generators must be 2-D [r, n], got shape ", gens.sizes());
  TORCH_CHECK(k >= 1, "orbits: k must be >= 1, got ", k);
  const int64_t r = gens.size(0), n = gens.size(1);
  int64_t total = 1;
  for (int64_t d = 0; d < k; ++d) {
    TORCH_CHECK(n == 0 || total <= std::numeric_limits<int32_t>::max() / n, "orbits: n^k = ", n,
                "^", k, " tuples is too many (at most 2^31 - 1)");
    total *= n;
  }
  const auto host = gens.to(at::kCPU).contiguous();
  check_permutations(host.data_ptr<int64_t>(), r, n);
  const c10::cuda::CUDAGuard guard(gens.device());
  auto opts = gens.options();
  if (total == 0) return at::empty({0}, opts);
  auto g = gens.contiguous();
  auto parent = at::empty({total}, opts.dtype(at::kInt));
  auto root = at::empty({total}, opts.dtype(at::kInt));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int grid = grid_for(total, kThreads);
  iota_kernel<<<grid, kThreads, 0, stream>>>(parent.data_ptr<int32_t>(), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  hook_kernel<<<grid, kThreads, 0, stream>>>(g.data_ptr<int64_t>(), r, n, k, total,
                                             parent.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  root_kernel<<<grid, kThreads, 0, stream>>>(parent.data_ptr<int32_t>(), total,
                                             root.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Roots are the smallest tuples of their orbits, so numbering roots in index order is numbering
  // orbits by first appearance.
  auto is_root = root.eq(at::arange(total, opts.dtype(at::kInt)));
  auto rank = is_root.cumsum(0, at::kLong) - 1;
  return rank.index_select(0, root);
}

}  // namespace

TORCH_LIBRARY_IMPL(equikern, CUDA, m) {
  m.impl("orbit_ids", &orbit_ids_cuda);
  m.impl("orbit_pool", &orbit_pool_cuda);
  m.impl("orbit_pool_max", &orbit_pool_max_cuda);
  m.impl("orbit_broadcast", &orbit_broadcast_cuda);
  m.impl("orbital_pool", &orbital_pool_cuda);
  m.impl("orbital_pool_backward", &orbital_pool_backward_cuda);
}

}  // namespace equikern
