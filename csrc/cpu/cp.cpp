// CPU implementation and schemas of the CP bilinear ops (torch.ops.equikern.cp_bilinear*).
//
// Operands: x1 [Z, I, Cc] (samples, components, channels: channels last), x2 [Z2, J] with Z2 = Z
// or 1 (one second operand for all samples), factors A [I, R], B [J, R], C [K, R]; out
// [Z, K, Cc]. The projection v = x2 B is a small matrix product done once here, not per channel.
#include "kernels/cp.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace equikern {
namespace {

// Factor gradients are summed over fixed chunks of samples, then the chunks in order: the result
// depends on Z only, never on the number of threads.
constexpr int64_t kChunks = 64;

void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                 at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype, " (the dtype of x1)");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

struct Dims {
  int64_t Z, Z2, I, J, R, K, Cc;
};

Dims check_operands(const char* op, const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C) {
  const auto dtype = x1.scalar_type();
  check_float(x1, op, "x1", 3, dtype);
  check_float(x2, op, "x2", 2, dtype);
  check_float(A, op, "A", 2, dtype);
  check_float(B, op, "B", 2, dtype);
  check_float(C, op, "C", 2, dtype);
  const Dims d{x1.size(0), x2.size(0), x1.size(1), x2.size(1), A.size(1), C.size(0), x1.size(2)};
  TORCH_CHECK(d.Z2 == d.Z || d.Z2 == 1, op, ": x2 has ", d.Z2, " rows, expected ", d.Z,
              " (as x1) or 1");
  TORCH_CHECK(A.size(0) == d.I, op, ": A has shape ", A.sizes(), ", expected [", d.I, ", R]");
  TORCH_CHECK(B.size(0) == d.J && B.size(1) == d.R, op, ": B has shape ", B.sizes(), ", expected [",
              d.J, ", ", d.R, "]");
  TORCH_CHECK(C.size(1) == d.R, op, ": C has shape ", C.sizes(), ", expected [K, ", d.R, "]");
  return d;
}

at::Tensor cp_bilinear_cpu(const at::Tensor& x1_, const at::Tensor& x2, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& C_) {
  const Dims d = check_operands("cp_bilinear", x1_, x2, A, B, C_);
  auto out = at::empty({d.Z, d.K, d.Cc}, x1_.options());
  if (out.numel() == 0) return out;
  auto x1 = x1_.contiguous();
  auto v = at::matmul(x2, B).contiguous();
  auto At = A.t().contiguous();
  auto C = C_.contiguous();
  const int64_t vstride = d.Z2 == 1 ? 0 : d.R;
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "cp_bilinear", [&] {
    const scalar_t* px = x1.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    const scalar_t* pAt = At.data_ptr<scalar_t>();
    const scalar_t* pC = C.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t work = (d.I + d.K) * d.R * d.Cc;
    at::parallel_for(0, d.Z, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work)),
                     [&](int64_t b, int64_t e) {
                       std::vector<scalar_t> u(d.R * d.Cc);
                       for (int64_t z = b; z < e; ++z)
                         cp::forward_sample(px + z * d.I * d.Cc, pv + z * vstride, pAt, pC, d.I,
                                            d.R, d.K, d.Cc, u.data(), po + z * d.K * d.Cc);
                     });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cp_bilinear_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& x1_, const at::Tensor& x2, const at::Tensor& A_,
    const at::Tensor& B, const at::Tensor& C_, bool factor_grads) {
  const char* op = "cp_bilinear_backward";
  const Dims d = check_operands(op, x1_, x2, A_, B, C_);
  check_float(grad_, op, "grad", 3, x1_.scalar_type());
  TORCH_CHECK(grad_.size(0) == d.Z && grad_.size(1) == d.K && grad_.size(2) == d.Cc, op,
              ": grad has shape ", grad_.sizes(), ", expected [", d.Z, ", ", d.K, ", ", d.Cc, "]");
  auto gx1 = at::zeros({d.Z, d.I, d.Cc}, x1_.options());
  auto q = at::zeros({d.Z, d.R}, x1_.options());
  auto gA = at::zeros({d.I, d.R}, x1_.options());
  auto gC = at::zeros({d.K, d.R}, x1_.options());
  if (d.Z > 0 && d.Cc > 0 && d.R > 0) {
    auto grad = grad_.contiguous();
    auto x1 = x1_.contiguous();
    auto v = at::matmul(x2, B).contiguous();
    auto A = A_.contiguous();
    auto At = A_.t().contiguous();
    auto Ct = C_.t().contiguous();
    const int64_t vstride = d.Z2 == 1 ? 0 : d.R;
    const int64_t chunks = std::min(d.Z, kChunks);
    const int64_t per = (d.Z + chunks - 1) / chunks;
    const int64_t fsize = (d.I + d.K) * d.R;
    // One [gA | gC] partial per chunk when the factor gradients are wanted.
    std::vector<double> partial(factor_grads ? chunks * fsize : 0);
    AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "cp_bilinear_backward", [&] {
      const scalar_t* pg = grad.data_ptr<scalar_t>();
      const scalar_t* px = x1.data_ptr<scalar_t>();
      const scalar_t* pv = v.data_ptr<scalar_t>();
      const scalar_t* pA = A.data_ptr<scalar_t>();
      const scalar_t* pAt = At.data_ptr<scalar_t>();
      const scalar_t* pCt = Ct.data_ptr<scalar_t>();
      scalar_t* pgx = gx1.data_ptr<scalar_t>();
      scalar_t* pq = q.data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        std::vector<scalar_t> u(d.R * d.Cc), h(d.R * d.Cc), f(factor_grads ? fsize : 0);
        for (int64_t t = b; t < e; ++t) {
          std::fill(f.begin(), f.end(), scalar_t(0));
          scalar_t* fA = factor_grads ? f.data() : nullptr;
          scalar_t* fC = factor_grads ? f.data() + d.I * d.R : nullptr;
          for (int64_t z = t * per; z < std::min(d.Z, (t + 1) * per); ++z)
            cp::backward_sample(pg + z * d.K * d.Cc, px + z * d.I * d.Cc, pv + z * vstride, pA, pAt,
                                pCt, d.I, d.R, d.K, d.Cc, u.data(), h.data(), pgx + z * d.I * d.Cc,
                                pq + z * d.R, fA, fC);
          std::copy(f.begin(), f.end(), partial.begin() + t * fsize);
        }
      });
    });
    if (factor_grads) {
      std::vector<double> total(fsize, 0.0);
      for (int64_t t = 0; t < chunks; ++t)
        for (int64_t n = 0; n < fsize; ++n) total[n] += partial[t * fsize + n];
      auto sum = at::from_blob(total.data(), {fsize}, at::kDouble).to(x1.scalar_type());
      gA.copy_(sum.narrow(0, 0, d.I * d.R).view({d.I, d.R}));
      gC.copy_(sum.narrow(0, d.I * d.R, d.K * d.R).view({d.K, d.R}));
    }
  }
  // q [Z, R] carries what is left of the gradients of x2 and B: small matrix products.
  auto qs = d.Z2 == 1 ? q.sum(0, true) : q;
  auto gx2 = at::matmul(qs, B.t());
  auto gB = factor_grads ? at::matmul(x2.t(), qs) : at::zeros_like(B);
  return {gx1, gx2, gA, gB, gC};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def("cp_bilinear(Tensor x1, Tensor x2, Tensor A, Tensor B, Tensor C) -> Tensor");
  m.def(
      "cp_bilinear_backward(Tensor grad, Tensor x1, Tensor x2, Tensor A, Tensor B, Tensor C, "
      "bool factor_grads=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("cp_bilinear", &cp_bilinear_cpu);
  m.impl("cp_bilinear_backward", &cp_bilinear_backward_cpu);
}

}  // namespace equikern
