// CPU implementation and schemas of the permutation-orbit ops (torch.ops.equikern.orbit_*).
//
// Features are passed as [P, N, Q] (outer batch, orbit members, inner channels); the Python layer
// (equikern/ops/orbit.py) moves the member dimension into place. The CSR layout of `ids` is
// rebuilt on each call: a counting sort costs as much as validating a CSR handed in would, and
// validating is what keeps the kernels in bounds for any input.
#include "kernels/orbit.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <string>

namespace equikern {
namespace {

// Work per parallel task: enough that scheduling overhead stays small for tiny rows.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain(int64_t work_per_task) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_task));
}

void check_features(const at::Tensor& x, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
}

}  // namespace

// Shared with the CUDA build (csrc/cuda/orbit.cu), which validates its plans and generators on the
// host too, so that both backends reject bad input with the same message.
void check_ids_in_range(const int64_t* p, int64_t N, int64_t M, const char* op, const char* name) {
  for (int64_t e = 0; e < N; ++e)
    TORCH_CHECK(p[e] >= 0 && p[e] < M, op, ": ", name, "[", e, "] = ", p[e],
                " is out of range [0, ", M, ")");
}

void check_permutations(const int64_t* g, int64_t r, int64_t n) {
  const orbit::PermDefect d = orbit::find_perm_defect(g, r, n);
  if (d.row < 0) return;
  TORCH_CHECK(d.repeated, "orbits: generators[", d.row, ", ", d.col, "] = ", d.value,
              " is out of range [0, ", n, ")");
  TORCH_CHECK(false, "orbits: generators[", d.row, "] is not a permutation (", d.value,
              " appears twice)");
}

namespace {

// ids: int64 [N] with every value in [0, M).
at::Tensor checked_ids(const at::Tensor& ids, const char* op, const char* name, int64_t N,
                       int64_t M) {
  TORCH_CHECK(ids.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.numel() == N, op, ": ", name, " has ", ids.numel(), " entries, expected ", N);
  TORCH_CHECK(M >= 0, op, ": num_orbits must be >= 0, got ", M);
  auto c = ids.contiguous();
  check_ids_in_range(c.data_ptr<int64_t>(), N, M, op, name);
  return c;
}

at::Tensor orbit_ids_cpu(const at::Tensor& gens_, int64_t k) {
  TORCH_CHECK(gens_.device().is_cpu(), "orbits: generators must be a CPU tensor");
  TORCH_CHECK(gens_.scalar_type() == at::kLong, "orbits: generators must be int64, got ",
              gens_.scalar_type());
  TORCH_CHECK(gens_.dim() == 2, "orbits: generators must be 2-D [r, n], got shape ", gens_.sizes());
  TORCH_CHECK(k >= 1, "orbits: k must be >= 1, got ", k);
  const int64_t r = gens_.size(0), n = gens_.size(1);
  int64_t total = 1;
  for (int64_t d = 0; d < k; ++d) {
    TORCH_CHECK(n == 0 || total <= std::numeric_limits<int32_t>::max() / n, "orbits: n^k = ", n,
                "^", k, " tuples is too many (at most 2^31 - 1)");
    total *= n;
  }
  auto gens = gens_.contiguous();
  const int64_t* g = gens.data_ptr<int64_t>();
  check_permutations(g, r, n);
  auto ids = at::empty({total}, gens.options());
  orbit::orbit_ids(g, r, n, k, ids.data_ptr<int64_t>());
  return ids;
}

struct Csr {
  std::vector<int64_t> ptr, members;
};

Csr make_csr(const at::Tensor& ids, int64_t M) {
  Csr csr{std::vector<int64_t>(M + 1), std::vector<int64_t>(ids.numel())};
  orbit::build_csr(ids.data_ptr<int64_t>(), ids.numel(), M, csr.ptr.data(), csr.members.data());
  return csr;
}

at::Tensor orbit_pool_cpu(const at::Tensor& x_, const at::Tensor& ids_, int64_t M,
                          c10::string_view reduce) {
  check_features(x_, "orbit_pool", "x", 3);
  TORCH_CHECK(reduce == "sum" || reduce == "mean",
              "orbit_pool: reduce must be 'sum' or 'mean', got '", std::string(reduce), "'");
  const int64_t P = x_.size(0), N = x_.size(1), Q = x_.size(2);
  auto ids = checked_ids(ids_, "orbit_pool", "ids", N, M);
  auto x = x_.contiguous();
  auto out = at::empty({P, M, Q}, x.options());
  if (out.numel() == 0) return out;
  const Csr csr = make_csr(ids, M);
  const bool mean = reduce == "mean";
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "orbit_pool", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, P * M, grain(Q * std::max<int64_t>(1, N / M)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / M, o = t % M;
        const int64_t begin = csr.ptr[o];
        orbit::pool_row(px + p * N * Q, Q, csr.members.data() + begin, csr.ptr[o + 1] - begin, mean,
                        po + t * Q);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> orbit_pool_max_cpu(const at::Tensor& x_, const at::Tensor& ids_,
                                                      int64_t M) {
  check_features(x_, "orbit_pool_max", "x", 3);
  const int64_t P = x_.size(0), N = x_.size(1), Q = x_.size(2);
  auto ids = checked_ids(ids_, "orbit_pool_max", "ids", N, M);
  auto x = x_.contiguous();
  auto out = at::empty({P, M, Q}, x.options());
  auto arg = at::empty({P, M, Q}, ids.options());
  if (out.numel() == 0) return {out, arg};
  const Csr csr = make_csr(ids, M);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "orbit_pool_max", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    int64_t* pa = arg.data_ptr<int64_t>();
    at::parallel_for(0, P * M, grain(Q * std::max<int64_t>(1, N / M)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / M, o = t % M;
        const int64_t begin = csr.ptr[o];
        orbit::max_row(px + p * N * Q, Q, csr.members.data() + begin, csr.ptr[o + 1] - begin,
                       po + t * Q, pa + t * Q);
      }
    });
  });
  return {out, arg};
}

at::Tensor orbit_broadcast_cpu(const at::Tensor& s_, const at::Tensor& ids_) {
  check_features(s_, "orbit_broadcast", "s", 3);
  TORCH_CHECK(ids_.dim() == 1, "orbit_broadcast: ids must be 1-D, got shape ", ids_.sizes());
  const int64_t P = s_.size(0), M = s_.size(1), Q = s_.size(2), N = ids_.numel();
  auto ids = checked_ids(ids_, "orbit_broadcast", "ids", N, M);
  auto s = s_.contiguous();
  auto out = at::empty({P, N, Q}, s.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "orbit_broadcast", [&] {
    const scalar_t* ps = s.data_ptr<scalar_t>();
    const int64_t* pi = ids.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, P * N, grain(Q), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / N, m = t % N;
        const scalar_t* src = ps + (p * M + pi[m]) * Q;
        std::copy(src, src + Q, po + t * Q);
      }
    });
  });
  return out;
}

at::Tensor checked_slots(const at::Tensor& slots, const char* op, int64_t n, int64_t R) {
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == n && slots.size(1) == n, op,
              ": slots must have shape [", n, ", ", n, "], got ", slots.sizes());
  return checked_ids(slots, op, "slots", n * n, R);
}

at::Tensor orbital_pool_cpu(const at::Tensor& x_, const at::Tensor& slots_, int64_t R) {
  check_features(x_, "orbital_pool", "x", 3);
  const int64_t P = x_.size(0), n = x_.size(1), Q = x_.size(2);
  TORCH_CHECK(R >= 0, "orbital_pool: num_slots must be >= 0, got ", R);
  auto slots = checked_slots(slots_, "orbital_pool", n, R);
  auto x = x_.contiguous();
  auto out = at::empty({P, n, R, Q}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "orbital_pool", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const int64_t* ps = slots.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, P * n, grain(n * Q), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / n, i = t % n;
        orbit::orbital_pool_row(px + p * n * Q, n, Q, ps + i * n, R, po + t * R * Q);
      }
    });
  });
  return out;
}

// The adjoint of orbital_pool: gx[p, j, :] = sum_i grad[p, i, slots[i, j], :], one (p, j) per task.
at::Tensor orbital_pool_backward_cpu(const at::Tensor& g_, const at::Tensor& slots_) {
  check_features(g_, "orbital_pool_backward", "grad", 4);
  const int64_t P = g_.size(0), n = g_.size(1), R = g_.size(2), Q = g_.size(3);
  auto slots_t = checked_slots(slots_, "orbital_pool_backward", n, R).t().contiguous();
  auto g = g_.contiguous();
  auto out = at::empty({P, n, Q}, g.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "orbital_pool_backward", [&] {
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const int64_t* ps = slots_t.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, P * n, grain(n * Q), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / n, j = t % n;
        orbit::orbital_pool_backward_col(pg + p * n * R * Q, n, R, Q, ps + j * n, po + t * Q);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def("orbit_ids(Tensor generators, int k=1) -> Tensor");
  m.def("orbit_pool(Tensor x, Tensor ids, int num_orbits, str reduce=\"sum\") -> Tensor");
  m.def("orbit_pool_max(Tensor x, Tensor ids, int num_orbits) -> (Tensor, Tensor)");
  m.def("orbit_broadcast(Tensor s, Tensor ids) -> Tensor");
  m.def("orbital_pool(Tensor x, Tensor slots, int num_slots) -> Tensor");
  m.def("orbital_pool_backward(Tensor grad, Tensor slots) -> Tensor");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("orbit_ids", &orbit_ids_cpu);
  m.impl("orbit_pool", &orbit_pool_cpu);
  m.impl("orbit_pool_max", &orbit_pool_max_cpu);
  m.impl("orbit_broadcast", &orbit_broadcast_cpu);
  m.impl("orbital_pool", &orbital_pool_cpu);
  m.impl("orbital_pool_backward", &orbital_pool_backward_cpu);
}

}  // namespace equikern
