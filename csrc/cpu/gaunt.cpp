// CPU implementation and schemas of the Gaunt grid ops (torch.ops.equikern.gaunt_*).
//
// Coefficients are rows of (L + 1)^2 in e3nn's order; the plan tensors (Legendre factors P per
// operand, with quadrature weights folded into the one that projects back, and the trig table)
// come from equikern/gaunt.py. The fused product never materialises the grid: a block of rows goes
// to one ring point, is multiplied and is projected back before the next point.
#include "kernels/gaunt.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>

namespace equikern {
namespace {

using gaunt::kBlock;

void check_float(const at::Tensor& x, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
}

void check_same_dtype(const at::Tensor& x, const at::Tensor& ref, const char* op,
                      const char* name) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(),
              ", expected ", ref.scalar_type());
}

// lmax of a Legendre table [n_theta, (L + 1)^2], checked against the grid.
int64_t side_lmax(const at::Tensor& p, const at::Tensor& trig, const char* op, const char* name) {
  check_float(p, op, name, 2);
  check_same_dtype(p, trig, op, name);
  const int64_t d = p.size(1);
  const auto L = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(d)))) - 1;
  TORCH_CHECK(L >= 0 && (L + 1) * (L + 1) == d, op, ": ", name,
              " must have (L + 1)^2 columns, got ", d);
  TORCH_CHECK(2 * L + 1 <= trig.size(1), op, ": ", name, " has degree ", L,
              " but trig only covers |m| <= ", (trig.size(1) - 1) / 2);
  return L;
}

template <class T>
gaunt::Grid<T> make_grid(const at::Tensor& trig, int64_t n_theta) {
  return {n_theta, trig.size(0), (trig.size(1) - 1) / 2, trig.data_ptr<T>()};
}

void check_trig(const at::Tensor& trig, const char* op) {
  check_float(trig, op, "trig", 2);
  TORCH_CHECK(trig.size(1) % 2 == 1, op, ": trig must have 2 mmax + 1 columns, got ", trig.size(1));
  TORCH_CHECK(trig.size(0) >= 1, op, ": trig must have at least one phi point");
}

void check_rings(const at::Tensor& p, int64_t n_theta, const char* op, const char* name) {
  TORCH_CHECK(p.size(0) == n_theta, op, ": ", name, " has ", p.size(0), " rings, expected ",
              n_theta);
}

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_row * kBlock));
}

at::Tensor grid_product_cpu(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& pa_,
                            const at::Tensor& pb_, const at::Tensor& pc_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_grid_product";
  check_trig(trig_, op);
  check_float(a_, op, "a", 3);
  check_float(b_, op, "b", 3);
  check_same_dtype(a_, trig_, op, "a");
  check_same_dtype(b_, trig_, op, "b");
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
  TORCH_CHECK(b_.size(0) == N, op, ": b has ", b_.size(0), " samples, a has ", N);
  TORCH_CHECK(Cb == C || Cb == 1, op, ": b must have ", C, " channels (as a) or 1, got ", Cb);
  auto a = a_.contiguous(), b = b_.contiguous(), pa = pa_.contiguous(), pb = pb_.contiguous(),
       pc = pc_.contiguous(), trig = trig_.contiguous();
  auto out = at::empty({N, C, pc.size(1)}, a.options());
  if (out.numel() == 0) return out;
  const int64_t rows = N * C, blocks = (rows + kBlock - 1) / kBlock;
  const int64_t da = a.size(2), db = b.size(2), dc = out.size(2);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    const auto g = make_grid<scalar_t>(trig, n_theta);
    const gaunt::Side<scalar_t> sa{La, pa.data_ptr<scalar_t>()}, sb{Lb, pb.data_ptr<scalar_t>()},
        sc{Lc, pc.data_ptr<scalar_t>()};
    const scalar_t* pa_x = a.data_ptr<scalar_t>();
    const scalar_t* pb_x = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t work = n_theta * g.n_phi * (La + Lb + Lc + 1);
    at::parallel_for(0, blocks, grain_rows(work), [&](int64_t begin, int64_t end) {
      gaunt::Workspace<scalar_t> w(sa, sb, sc);
      std::array<const scalar_t*, kBlock> ar, br;
      std::array<scalar_t*, kBlock> orow;
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t row = blk * kBlock + r;
          const bool valid = row < rows;
          // b is shared by the channels of a sample when it has one channel
          const int64_t brow = Cb == C ? row : row / C;
          ar[r] = valid ? pa_x + row * da : nullptr;
          br[r] = valid ? pb_x + brow * db : nullptr;
          orow[r] = valid ? po + row * dc : nullptr;
        }
        gaunt::product_block(g, sa, sb, sc, ar.data(), br.data(), orow.data(), w);
      }
    });
  });
  return out;
}

at::Tensor to_grid_cpu(const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_to_grid";
  check_trig(trig_, op);
  check_float(x_, op, "x", 2);
  check_same_dtype(x_, trig_, op, "x");
  const int64_t L = side_lmax(p_, trig_, op, "p");
  TORCH_CHECK(x_.size(1) == p_.size(1), op, ": x has ", x_.size(1), " coefficients, p has ",
              p_.size(1));
  auto x = x_.contiguous(), p = p_.contiguous(), trig = trig_.contiguous();
  const int64_t rows = x.size(0), n_theta = p.size(0), n_phi = trig.size(0), d = x.size(1);
  auto out = at::empty({rows, n_theta, n_phi}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const auto g = make_grid<scalar_t>(trig, n_theta);
    const gaunt::Side<scalar_t> s{L, p.data_ptr<scalar_t>()};
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t q = n_theta * n_phi, blocks = (rows + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, grain_rows(q * (L + 1)), [&](int64_t begin, int64_t end) {
      gaunt::Workspace<scalar_t> w(s, s, s);
      std::array<const scalar_t*, kBlock> xr;
      std::array<scalar_t*, kBlock> gr;
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t row = blk * kBlock + r;
          xr[r] = row < rows ? px + row * d : nullptr;
          gr[r] = row < rows ? po + row * q : nullptr;
        }
        gaunt::to_grid_block(g, s, xr.data(), gr.data(), w);
      }
    });
  });
  return out;
}

at::Tensor from_grid_cpu(const at::Tensor& grid_, const at::Tensor& p_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_from_grid";
  check_trig(trig_, op);
  check_float(grid_, op, "grid", 3);
  check_same_dtype(grid_, trig_, op, "grid");
  const int64_t L = side_lmax(p_, trig_, op, "p");
  const int64_t n_theta = p_.size(0), n_phi = trig_.size(0);
  TORCH_CHECK(grid_.size(1) == n_theta && grid_.size(2) == n_phi, op, ": grid must be [rows, ",
              n_theta, ", ", n_phi, "], got ", grid_.sizes());
  auto grid = grid_.contiguous(), p = p_.contiguous(), trig = trig_.contiguous();
  const int64_t rows = grid.size(0), d = p.size(1);
  auto out = at::empty({rows, d}, grid.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), op, [&] {
    const auto g = make_grid<scalar_t>(trig, n_theta);
    const gaunt::Side<scalar_t> s{L, p.data_ptr<scalar_t>()};
    const scalar_t* pg = grid.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t q = n_theta * n_phi, blocks = (rows + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, grain_rows(q * (L + 1)), [&](int64_t begin, int64_t end) {
      gaunt::Workspace<scalar_t> w(s, s, s);
      std::array<const scalar_t*, kBlock> gr;
      std::array<scalar_t*, kBlock> xr;
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t row = blk * kBlock + r;
          gr[r] = row < rows ? pg + row * q : nullptr;
          xr[r] = row < rows ? po + row * d : nullptr;
        }
        gaunt::from_grid_block(g, s, gr.data(), xr.data(), w);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def(
      "gaunt_grid_product(Tensor a, Tensor b, Tensor pa, Tensor pb, Tensor pc, Tensor trig) -> "
      "Tensor");
  m.def("gaunt_to_grid(Tensor x, Tensor p, Tensor trig) -> Tensor");
  m.def("gaunt_from_grid(Tensor grid, Tensor p, Tensor trig) -> Tensor");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("gaunt_grid_product", &grid_product_cpu);
  m.impl("gaunt_to_grid", &to_grid_cpu);
  m.impl("gaunt_from_grid", &from_grid_cpu);
}

}  // namespace equikern
