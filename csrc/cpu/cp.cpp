// CPU implementation and schemas of the CP bilinear ops (torch.ops.equikern.cp_bilinear*).
//
// Operands: x1 [Z, I, Cc] (samples, components, channels: channels last, the layout x[e, i, c] of
// TDN), x2 [Z2, J] with Z2 = Z or 1 (one second operand per sample, shared by its channels, or
// one for all), factors A [I, R], B [J, R], C [K, R], optional channel weights w [Z, Cc]:
//   out[z, k, c] = w[z, c] sum_r C[k, r] (A^T x1[z])[r, c] (B^T x2[z])[r].
//
// Routes (kernels/cp.h): "factors" contracts every channel through the rank, "matrix" builds the
// per-sample matrix M_z = C diag(B^T x2[z]) A^T [K, I] once and applies it to the channels. The
// matrix is a combination of S = min(J, R) planned matrices P [S, K, I]:
//   J <= R: P[j] = sum_r B[j, r] C[:, r] A[:, r]^T (the CP tensor itself), weights p = x2;
//   J >  R: P[r] = C[:, r] A[:, r]^T, weights p = B^T x2.
// "auto" takes the route with fewer multiply-adds: the matrix one whenever there are channels to
// share M, the factors one for per-channel second operands (Cc = 1) with R < K I / (I + K).
#include "kernels/cp.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "cp_checks.h"

namespace equikern {
namespace {

// Gradients of operands shared by many samples are summed over fixed chunks of samples, then the
// chunks in order: the result depends on Z only, never on the number of threads.
constexpr int64_t kChunks = 64;

using namespace cp_checks;
const at::Device kCpu(at::kCPU);

// Samples per parallel task: enough multiply-adds to pay for a task.
int64_t grain(int64_t work_per_sample) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_sample));
}

// The planned matrices of the matrix route (see the top of the file), in x1's dtype; P is built in
// float64 so that float32 only rounds the final values.
struct MatrixPlan {
  at::Tensor P, Pt, p;  // P [S, K, I], Pt [S, I, K], p [Z2, S]
  bool through_x2;      // S = J and p = x2 (else S = R and p = B^T x2)
  int64_t S;
};

std::pair<at::Tensor, at::Tensor> planned_matrices(const at::Tensor& A, const at::Tensor& B,
                                                   const at::Tensor& C, bool through_x2) {
  const auto A64 = A.to(at::kDouble), C64 = C.to(at::kDouble);
  const auto P64 = through_x2 ? at::einsum("jr,kr,ir->jki", {B.to(at::kDouble), C64, A64})
                              : at::einsum("kr,ir->rki", {C64, A64});
  return {P64.to(A.scalar_type()).contiguous(),
          P64.transpose(1, 2).to(A.scalar_type()).contiguous()};
}

// The planned matrices depend on the factors only, which a layer passes unchanged call after call:
// they are kept with a copy of the factors they came from and reused when the factors are bitwise
// the same. Comparing (I + J + K) R values costs far less than rebuilding J K I R, and unlike a
// key of identity and version counter it cannot be fooled by edits through .data.
struct PlannedEntry {
  at::Tensor A, B, C;  // contiguous copies
  std::pair<at::Tensor, at::Tensor> matrices;
};

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0;
}

std::pair<at::Tensor, at::Tensor> cached_matrices(const at::Tensor& A_, const at::Tensor& B_,
                                                  const at::Tensor& C_, bool through_x2) {
  const auto A = A_.contiguous(), B = B_.contiguous(), C = C_.contiguous();
  static std::mutex mutex;
  static std::vector<std::pair<bool, PlannedEntry>> cache;  // most recent last
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.rbegin(); it != cache.rend(); ++it)
      if (it->first == through_x2 && same_bits(it->second.A, A) && same_bits(it->second.B, B) &&
          same_bits(it->second.C, C))
        return it->second.matrices;
  }
  PlannedEntry entry{A.clone(), B.clone(), C.clone(), planned_matrices(A, B, C, through_x2)};
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 16) cache.erase(cache.begin());
  cache.emplace_back(through_x2, entry);
  return entry.matrices;
}

MatrixPlan matrix_plan(const Dims& d, const at::Tensor& x2, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C) {
  MatrixPlan plan;
  plan.through_x2 = d.J <= d.R;
  plan.S = plan.through_x2 ? d.J : d.R;
  plan.p = plan.through_x2 ? x2.contiguous() : at::matmul(x2, B).contiguous();
  std::tie(plan.P, plan.Pt) = cached_matrices(A, B, C, plan.through_x2);
  return plan;
}

at::Tensor cp_bilinear_cpu(const at::Tensor& x1_, const at::Tensor& x2, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& C_,
                           const std::optional<at::Tensor>& weight, c10::string_view route_) {
  const char* op = "cp_bilinear";
  const Dims d = check_operands(op, x1_, x2, A, B, C_, weight, kCpu);
  const Route route = choose_route(op, d, route_);
  auto out = at::empty({d.Z, d.K, d.Cc}, x1_.options());
  if (out.numel() == 0) return out;
  auto x1 = x1_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "cp_bilinear", [&] {
    using T = scalar_t;
    const T* px = x1.data_ptr<T>();
    const T* pw = w.defined() ? w.data_ptr<T>() : nullptr;
    T* po = out.data_ptr<T>();
    const int64_t I = d.I, K = d.K, Cc = d.Cc, KI = d.K * d.I;
    auto weight_of = [&](int64_t z) { return pw ? pw + z * Cc : nullptr; };
    if (route == Route::kMatrix) {
      const MatrixPlan plan = matrix_plan(d, x2, A, B, C_);
      const T* pP = plan.P.data_ptr<T>();
      const T* pp = plan.p.data_ptr<T>();
      const int64_t S = plan.S;
      const bool shared = d.Z2 == 1;
      std::vector<T> M(shared ? KI : 0);
      if (shared) cp::combine(pp, S, pP, KI, M.data());
      at::parallel_for(0, d.Z, grain(Cc * KI + (shared ? 0 : S * KI)), [&](int64_t b, int64_t e) {
        std::vector<T> own(shared ? 0 : KI);
        for (int64_t z = b; z < e; ++z) {
          if (!shared) cp::combine(pp + z * S, S, pP, KI, own.data());
          cp::matrix_forward<true>(shared ? M.data() : own.data(), px + z * I * Cc, weight_of(z), K,
                                   I, Cc, po + z * K * Cc);
        }
        cp::stream_fence();
      });
    } else {
      auto v = at::matmul(x2, B).contiguous();
      auto At = A.t().contiguous();
      auto C = C_.contiguous();
      const T* pv = v.data_ptr<T>();
      const T* pAt = At.data_ptr<T>();
      const T* pC = C.data_ptr<T>();
      const int64_t R = d.R, vstride = d.Z2 == 1 ? 0 : d.R;
      at::parallel_for(0, d.Z, grain((I + K) * R * Cc), [&](int64_t b, int64_t e) {
        std::vector<T> u(R * Cc);
        for (int64_t z = b; z < e; ++z)
          cp::factors_forward(px + z * I * Cc, pv + z * vstride, weight_of(z), pAt, pC, I, R, K, Cc,
                              u.data(), po + z * K * Cc);
      });
    }
  });
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The matrix route's backward: returns the gradient of p [Z2, S] and, with factor_grads, of P
// [S, K, I] (float64); writes gx1 and gw.
std::pair<at::Tensor, at::Tensor> matrix_backward(const Dims& d, const MatrixPlan& plan,
                                                  const at::Tensor& grad, const at::Tensor& x1,
                                                  const at::Tensor& w, bool factor_grads,
                                                  at::Tensor& gx1, at::Tensor& gw) {
  const int64_t KI = d.K * d.I, S = plan.S, Cc = d.Cc, I = d.I, K = d.K;
  const bool shared = d.Z2 == 1;
  const int64_t chunks = std::min(d.Z, kChunks);
  // Per chunk: sum_z G_z when p is shared (every gradient follows from it), else p_z (x) G_z.
  const int64_t part = shared ? KI : (factor_grads ? S * KI : 0);
  std::vector<double> partial(chunks * part);
  auto gp = at::empty({d.Z2, S}, x1.options());
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "cp_bilinear_backward", [&] {
    using T = scalar_t;
    const T* pg = grad.data_ptr<T>();
    const T* px = x1.data_ptr<T>();
    const T* pw = w.defined() ? w.data_ptr<T>() : nullptr;
    const T* pP = plan.P.data_ptr<T>();
    const T* pPt = plan.Pt.data_ptr<T>();
    const T* pp = plan.p.data_ptr<T>();
    T* pgx = gx1.data_ptr<T>();
    T* pgw = pw ? gw.data_ptr<T>() : nullptr;
    T* pgp = gp.data_ptr<T>();
    std::vector<T> Mt(shared ? KI : 0);
    if (shared) cp::combine(pp, S, pPt, KI, Mt.data());
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> own(shared ? 0 : KI), G(KI), acc(part);
      for (int64_t t = b; t < e; ++t) {
        std::fill(acc.begin(), acc.end(), T(0));
        const int64_t end = d.Z * (t + 1) / chunks;
        for (int64_t z = d.Z * t / chunks; z < end; ++z) {
          if (z + 1 < end) {
            cp::prefetch(pg + (z + 1) * K * Cc, K * Cc * sizeof(T));
            cp::prefetch(px + (z + 1) * I * Cc, I * Cc * sizeof(T));
          }
          if (!shared) cp::combine(pp + z * S, S, pPt, KI, own.data());
          cp::matrix_backward(shared ? Mt.data() : own.data(), pg + z * K * Cc, px + z * I * Cc,
                              pw ? pw + z * Cc : nullptr, K, I, Cc, pgx + z * I * Cc,
                              pgw ? pgw + z * Cc : nullptr, G.data());
          if (shared) {
            for (int64_t n = 0; n < KI; ++n) acc[n] += G[n];
          } else {
            cp::dots(pP, S, KI, G.data(), pgp + z * S);
            for (int64_t s = 0; s < part / std::max<int64_t>(1, KI); ++s)
              for (int64_t n = 0; n < KI; ++n) acc[s * KI + n] += pp[z * S + s] * G[n];
          }
        }
        std::copy(acc.begin(), acc.end(), partial.begin() + t * part);
      }
      cp::stream_fence();
    });
  });
  auto total = at::zeros({part}, x1.options().dtype(at::kDouble));
  double* ptotal = total.data_ptr<double>();
  for (int64_t t = 0; t < chunks; ++t)
    for (int64_t n = 0; n < part; ++n) ptotal[n] += partial[t * part + n];
  if (!shared) return {gp, factor_grads ? total.view({S, d.K, d.I}) : at::Tensor()};
  // Every sample shares p: its gradient is <P_s, sum_z G_z>, that of P is p (x) sum_z G_z.
  auto P64 = plan.P.to(at::kDouble).view({S, KI});
  auto gp_shared = at::matmul(P64, total).view({1, S}).to(x1.scalar_type());
  at::Tensor gP;
  if (factor_grads) gP = at::outer(plan.p.to(at::kDouble).view({S}), total).view({S, d.K, d.I});
  return {gp_shared, gP};
}

Grads cp_bilinear_backward_cpu(const at::Tensor& grad_, const at::Tensor& x1_, const at::Tensor& x2,
                               const at::Tensor& A_, const at::Tensor& B, const at::Tensor& C_,
                               const std::optional<at::Tensor>& weight, bool factor_grads,
                               c10::string_view route_) {
  const char* op = "cp_bilinear_backward";
  const Dims d = check_operands(op, x1_, x2, A_, B, C_, weight, kCpu);
  check_float(grad_, op, "grad", 3, x1_, kCpu);
  TORCH_CHECK(grad_.size(0) == d.Z && grad_.size(1) == d.K && grad_.size(2) == d.Cc, op,
              ": grad has shape ", grad_.sizes(), ", expected [", d.Z, ", ", d.K, ", ", d.Cc, "]");
  const Route route = choose_route(op, d, route_);
  // Every row of gx1 and gw is written by the kernels.
  auto gx1 = at::empty({d.Z, d.I, d.Cc}, x1_.options());
  auto gw = weight.has_value() ? at::empty({d.Z, d.Cc}, x1_.options()) : x1_.new_empty({0});
  auto zeros = [&] {
    return Grads{gx1.zero_(),       at::zeros_like(x2), at::zeros_like(A_),
                 at::zeros_like(B), at::zeros_like(C_), gw.zero_()};
  };
  if (d.Z == 0 || d.Cc == 0) return zeros();
  auto grad = grad_.contiguous();
  auto x1 = x1_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto dtype = x1.scalar_type();
  at::Tensor gx2, gA, gB, gC;  // the factor ones in float64 until the end
  if (route == Route::kMatrix) {
    const MatrixPlan plan = matrix_plan(d, x2, A_, B, C_);
    auto [gp, gP] = matrix_backward(d, plan, grad, x1, w, factor_grads, gx1, gw);
    if (plan.through_x2) {
      gx2 = gp;
      if (factor_grads) {
        auto A = A_.to(at::kDouble), B64 = B.to(at::kDouble), C = C_.to(at::kDouble);
        gA = at::einsum("jki,jr,kr->ir", {gP, B64, C});
        gB = at::einsum("jki,kr,ir->jr", {gP, C, A});
        gC = at::einsum("jki,jr,ir->kr", {gP, B64, A});
      }
    } else {
      gx2 = at::matmul(gp, B.t());
      if (factor_grads) {
        gA = at::einsum("rki,kr->ir", {gP, C_.to(at::kDouble)});
        gB = at::matmul(x2.t(), gp);
        gC = at::einsum("rki,ir->kr", {gP, A_.to(at::kDouble)});
      }
    }
  } else {
    auto v = at::matmul(x2, B).contiguous();
    auto A = A_.contiguous();
    auto At = A_.t().contiguous();
    auto Ct = C_.t().contiguous();
    auto q = at::empty({d.Z, d.R}, x1.options());
    const int64_t chunks = std::min(d.Z, kChunks);
    const int64_t fsize = (d.I + d.K) * d.R;
    std::vector<double> partial(factor_grads ? chunks * fsize : 0);  // [gA | gC] per chunk
    AT_DISPATCH_FLOATING_TYPES(dtype, "cp_bilinear_backward", [&] {
      using T = scalar_t;
      const T* pg = grad.data_ptr<T>();
      const T* px = x1.data_ptr<T>();
      const T* pw = w.defined() ? w.data_ptr<T>() : nullptr;
      const T* pv = v.data_ptr<T>();
      const T* pA = A.data_ptr<T>();
      const T* pAt = At.data_ptr<T>();
      const T* pCt = Ct.data_ptr<T>();
      T* pgx = gx1.data_ptr<T>();
      T* pgw = pw ? gw.data_ptr<T>() : nullptr;
      T* pq = q.data_ptr<T>();
      const int64_t I = d.I, K = d.K, R = d.R, Cc = d.Cc, vstride = d.Z2 == 1 ? 0 : d.R;
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        std::vector<T> u(R * Cc), h(R * Cc), f(factor_grads ? fsize : 0), fz(f.size());
        T* fA = factor_grads ? fz.data() : nullptr;
        T* fC = factor_grads ? fz.data() + I * R : nullptr;
        for (int64_t t = b; t < e; ++t) {
          std::fill(f.begin(), f.end(), T(0));
          for (int64_t z = d.Z * t / chunks; z < d.Z * (t + 1) / chunks; ++z) {
            cp::factors_backward(pg + z * K * Cc, px + z * I * Cc, pv + z * vstride,
                                 pw ? pw + z * Cc : nullptr, pA, pAt, pCt, I, R, K, Cc, u.data(),
                                 h.data(), pgx + z * I * Cc, pgw ? pgw + z * Cc : nullptr,
                                 pq + z * R, fA, fC);
            for (size_t n = 0; n < f.size(); ++n) f[n] += fz[n];
          }
          std::copy(f.begin(), f.end(), partial.begin() + t * fsize);
        }
      });
    });
    // q [Z, R] is the gradient of v = x2 B; a shared x2 sums it over the samples, in order.
    auto q64 = q.to(at::kDouble);
    if (d.Z2 == 1) {
      auto sum = at::zeros({1, d.R}, q64.options());
      const double* pq = q64.data_ptr<double>();
      double* ps = sum.data_ptr<double>();
      for (int64_t z = 0; z < d.Z; ++z)
        for (int64_t r = 0; r < d.R; ++r) ps[r] += pq[z * d.R + r];
      q64 = sum;
    }
    gx2 = at::matmul(q64, B.to(at::kDouble).t());
    if (factor_grads) {
      auto total = at::zeros({fsize}, q64.options());
      double* ptotal = total.data_ptr<double>();
      for (int64_t t = 0; t < chunks; ++t)
        for (int64_t n = 0; n < fsize; ++n) ptotal[n] += partial[t * fsize + n];
      gA = total.narrow(0, 0, d.I * d.R).view({d.I, d.R}).clone();
      gC = total.narrow(0, d.I * d.R, d.K * d.R).view({d.K, d.R}).clone();
      gB = at::matmul(x2.to(at::kDouble).t(), q64);
    }
  }
  if (!factor_grads) {
    gA = at::zeros_like(A_);
    gB = at::zeros_like(B);
    gC = at::zeros_like(C_);
  }
  // Contiguous, as the fake kernel states (einsum may return other strides).
  auto out = [&](const at::Tensor& t) { return t.to(dtype).contiguous(); };
  return {gx1, out(gx2), out(gA), out(gB), out(gC), gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def(
      "cp_bilinear(Tensor x1, Tensor x2, Tensor A, Tensor B, Tensor C, Tensor? weight=None, "
      "str route='auto') -> Tensor");
  m.def(
      "cp_bilinear_backward(Tensor grad, Tensor x1, Tensor x2, Tensor A, Tensor B, Tensor C, "
      "Tensor? weight=None, bool factor_grads=True, str route='auto') -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("cp_bilinear", &cp_bilinear_cpu);
  m.impl("cp_bilinear_backward", &cp_bilinear_backward_cpu);
}

}  // namespace equikern
