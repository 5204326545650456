// Input checks and route rule of the CP ops, shared by the CPU and CUDA implementations so that
// bad input gets the same error on both and both pick the same route.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace equikern::cp_checks {

struct Dims {
  int64_t Z, Z2, I, J, R, K, Cc;
};

// Every tensor of a call lives on `device` and has x1's dtype (float32 or float64).
inline void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                        const at::Tensor& x1, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be a ",
              device.is_cuda() ? "CUDA" : "CPU", " tensor on ", device, ", got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == x1.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", x1.scalar_type(), " (the dtype of x1)");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline Dims check_operands(const char* op, const at::Tensor& x1, const at::Tensor& x2,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                           const std::optional<at::Tensor>& weight, const at::Device& device) {
  check_float(x1, op, "x1", 3, x1, device);
  check_float(x2, op, "x2", 2, x1, device);
  check_float(A, op, "A", 2, x1, device);
  check_float(B, op, "B", 2, x1, device);
  check_float(C, op, "C", 2, x1, device);
  const Dims d{x1.size(0), x2.size(0), x1.size(1), x2.size(1), A.size(1), C.size(0), x1.size(2)};
  TORCH_CHECK(d.Z2 == d.Z || d.Z2 == 1, op, ": x2 has ", d.Z2, " rows, expected ", d.Z,
              " (as x1) or 1");
  TORCH_CHECK(A.size(0) == d.I, op, ": A has shape ", A.sizes(), ", expected [", d.I, ", R]");
  TORCH_CHECK(B.size(0) == d.J && B.size(1) == d.R, op, ": B has shape ", B.sizes(), ", expected [",
              d.J, ", ", d.R, "]");
  TORCH_CHECK(C.size(1) == d.R, op, ": C has shape ", C.sizes(), ", expected [K, ", d.R, "]");
  if (weight.has_value()) {
    check_float(*weight, op, "weight", 2, x1, device);
    TORCH_CHECK(weight->size(0) == d.Z && weight->size(1) == d.Cc, op, ": weight has shape ",
                weight->sizes(), ", expected [", d.Z, ", ", d.Cc, "] (samples, channels of x1)");
  }
  return d;
}

enum class Route { kFactors, kMatrix };

// The route a call names, or for "auto" the one with fewer multiply-adds.
inline Route choose_route(const char* op, const Dims& d, c10::string_view route) {
  if (route == "factors") return Route::kFactors;
  if (route == "matrix") return Route::kMatrix;
  TORCH_CHECK(route == "auto", op, ": route must be 'auto', 'factors' or 'matrix', got '", route,
              "'");
  const double Z = static_cast<double>(d.Z), seconds = d.Z2 == 1 ? 1.0 : Z;
  const double S = static_cast<double>(std::min(d.J, d.R)), KI = static_cast<double>(d.K * d.I);
  const double factors = seconds * d.J * d.R + Z * d.Cc * (d.I + d.K) * d.R;
  const double matrix = KI * d.J * d.R + seconds * S * KI + Z * d.Cc * KI;
  return matrix <= factors ? Route::kMatrix : Route::kFactors;
}

}  // namespace equikern::cp_checks
