// Input checks of the Gaunt ops, shared by the CPU and CUDA implementations so that bad input
// gets the same error on both. `device` is where every tensor of the call must live.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace equikern::gaunt_checks {

inline void check_float(const at::Tensor& x, const char* op, const char* name, int64_t dim,
                        const at::Device& device) {
  TORCH_CHECK(x.device() == device, op, ": ", name, " must be a ",
              device.is_cuda() ? "CUDA" : "CPU", " tensor on ", device, ", got one on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
}

inline void check_same_dtype(const at::Tensor& x, const at::Tensor& ref, const char* op,
                             const char* name) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(),
              ", expected ", ref.scalar_type());
}

// L of a row of (L + 1)^2 coefficients.
inline int64_t degree_of(int64_t dim, const char* op, const char* name) {
  const auto L = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(dim)))) - 1;
  TORCH_CHECK(L >= 0 && (L + 1) * (L + 1) == dim, op, ": ", name,
              " must have (L + 1)^2 coefficients, got ", dim);
  return L;
}

inline void check_trig(const at::Tensor& trig, const char* op, const at::Device& device) {
  check_float(trig, op, "trig", 2, device);
  TORCH_CHECK(trig.size(1) % 2 == 1, op, ": trig must have 2 mmax + 1 columns, got ", trig.size(1));
  TORCH_CHECK(trig.size(0) >= 1, op, ": trig must have at least one phi point");
}

// lmax of a Legendre table [n_theta, (L + 1)^2], checked against the grid.
inline int64_t side_lmax(const at::Tensor& p, const at::Tensor& trig, const char* op,
                         const char* name) {
  check_float(p, op, name, 2, trig.device());
  check_same_dtype(p, trig, op, name);
  const int64_t L = degree_of(p.size(1), op, name);
  TORCH_CHECK(2 * L + 1 <= trig.size(1), op, ": ", name, " has degree ", L,
              " but trig only covers |m| <= ", (trig.size(1) - 1) / 2);
  return L;
}

inline void check_rings(const at::Tensor& p, int64_t n_theta, const char* op, const char* name) {
  TORCH_CHECK(p.size(0) == n_theta, op, ": ", name, " has ", p.size(0), " rings, expected ",
              n_theta);
}

// [N, C, d] operands a and b (b with C channels or 1); returns C.
inline int64_t check_operands(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const at::Device& device) {
  check_float(a, op, "a", 3, device);
  check_float(b, op, "b", 3, device);
  check_same_dtype(b, a, op, "b");
  TORCH_CHECK(b.size(0) == a.size(0), op, ": b has ", b.size(0), " samples, a has ", a.size(0));
  TORCH_CHECK(b.size(1) == a.size(1) || b.size(1) == 1, op, ": b must have ", a.size(1),
              " channels (as a) or 1, got ", b.size(1));
  return a.size(1);
}

}  // namespace equikern::gaunt_checks
