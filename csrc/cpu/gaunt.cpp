// CPU implementation and schemas of the Gaunt ops (torch.ops.equikern.gaunt_*).
//
// Coefficients are rows of (L + 1)^2 in e3nn's order; a product's operands are [N, C, (L + 1)^2],
// stored either in that channel layout or (flat = true) in e3nn's flat layout, per-degree blocks
// [C, 2l + 1], which the kernels read directly. The plan tensors (Legendre factors P per operand,
// with quadrature weights folded into the one that projects back, and the trig table; or the
// nonzero Gaunt coefficients) come from equikern/gaunt.py. The fused grid product never
// materialises the grid: a block of rows goes to one ring point, is multiplied and is projected
// back before the next point.
#include "kernels/gaunt.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "gaunt_checks.h"

namespace equikern {
namespace {

using gaunt::kBlock;
using namespace gaunt_checks;

const at::Device kCpu(at::kCPU);

template <class T>
gaunt::Grid<T> make_grid(const at::Tensor& trig, int64_t n_theta) {
  return {n_theta, trig.size(0), (trig.size(1) - 1) / 2, trig.data_ptr<T>()};
}

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_row * kBlock));
}

// The rows of block blk of an operand, where rows enumerate (sample n, channel c) as n * channels +
// c and an operand with one channel is shared by every channel of its sample.
template <class P>
gaunt::BlockRows<P> block_rows(int64_t blk, int64_t n_rows, int64_t channels, P base,
                               int64_t operand_channels, int64_t sample_size) {
  gaunt::BlockRows<P> rows;
  for (int64_t r = 0; r < kBlock; ++r) {
    const int64_t row = blk * kBlock + r;
    const bool valid = row < n_rows;
    rows.sample[r] = valid ? base + row / channels * sample_size : nullptr;
    rows.channel[r] = valid && operand_channels != 1 ? row % channels : 0;
  }
  return rows;
}

at::Tensor grid_product_cpu(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& pa_,
                            const at::Tensor& pb_, const at::Tensor& pc_, const at::Tensor& trig_,
                            bool flat) {
  constexpr const char* op = "gaunt_grid_product";
  check_trig(trig_, op, kCpu);
  check_operands(a_, b_, op, kCpu);
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
  auto a = a_.contiguous(), b = b_.contiguous(), pa = pa_.contiguous(), pb = pb_.contiguous(),
       pc = pc_.contiguous(), trig = trig_.contiguous();
  auto out = at::empty({N, C, pc.size(1)}, a.options());
  if (out.numel() == 0) return out;
  const int64_t rows = N * C, blocks = (rows + kBlock - 1) / kBlock;
  const gaunt::Layout la(La, C, flat), lb(Lb, Cb, flat), lc(Lc, C, flat);
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
      for (int64_t blk = begin; blk < end; ++blk) {
        const auto ar = block_rows(blk, rows, C, pa_x, C, la.sample_size(C));
        const auto br = block_rows(blk, rows, C, pb_x, Cb, lb.sample_size(Cb));
        const auto orow = block_rows(blk, rows, C, po, C, lc.sample_size(C));
        gaunt::product_block(g, sa, sb, sc, la, lb, lc, ar, br, orow, w);
      }
    });
  });
  return out;
}

at::Tensor to_grid_cpu(const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_to_grid";
  check_trig(trig_, op, kCpu);
  check_float(x_, op, "x", 2, kCpu);
  check_same_dtype(x_, trig_, op, "x");
  const int64_t L = side_lmax(p_, trig_, op, "p");
  TORCH_CHECK(x_.size(1) == p_.size(1), op, ": x has ", x_.size(1), " coefficients, p has ",
              p_.size(1));
  auto x = x_.contiguous(), p = p_.contiguous(), trig = trig_.contiguous();
  const int64_t rows = x.size(0), n_theta = p.size(0), n_phi = trig.size(0), d = x.size(1);
  auto out = at::empty({rows, n_theta, n_phi}, x.options());
  if (out.numel() == 0) return out;
  const gaunt::Layout lay(L, 1, false);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const auto g = make_grid<scalar_t>(trig, n_theta);
    const gaunt::Side<scalar_t> s{L, p.data_ptr<scalar_t>()};
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t q = n_theta * n_phi, blocks = (rows + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, grain_rows(q * (L + 1)), [&](int64_t begin, int64_t end) {
      gaunt::Workspace<scalar_t> w(s, s, s);
      std::array<scalar_t*, kBlock> gr;
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t row = blk * kBlock + r;
          gr[r] = row < rows ? po + row * q : nullptr;
        }
        const auto xr = block_rows(blk, rows, 1, px, 1, d);
        gaunt::to_grid_block(g, s, lay, xr, gr.data(), w);
      }
    });
  });
  return out;
}

at::Tensor from_grid_cpu(const at::Tensor& grid_, const at::Tensor& p_, const at::Tensor& trig_) {
  constexpr const char* op = "gaunt_from_grid";
  check_trig(trig_, op, kCpu);
  check_float(grid_, op, "grid", 3, kCpu);
  check_same_dtype(grid_, trig_, op, "grid");
  const int64_t L = side_lmax(p_, trig_, op, "p");
  const int64_t n_theta = p_.size(0), n_phi = trig_.size(0);
  TORCH_CHECK(grid_.size(1) == n_theta && grid_.size(2) == n_phi, op, ": grid must be [rows, ",
              n_theta, ", ", n_phi, "], got ", grid_.sizes());
  auto grid = grid_.contiguous(), p = p_.contiguous(), trig = trig_.contiguous();
  const int64_t rows = grid.size(0), d = p.size(1);
  auto out = at::empty({rows, d}, grid.options());
  if (out.numel() == 0) return out;
  const gaunt::Layout lay(L, 1, false);
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), op, [&] {
    const auto g = make_grid<scalar_t>(trig, n_theta);
    const gaunt::Side<scalar_t> s{L, p.data_ptr<scalar_t>()};
    const scalar_t* pg = grid.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t q = n_theta * n_phi, blocks = (rows + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, grain_rows(q * (L + 1)), [&](int64_t begin, int64_t end) {
      gaunt::Workspace<scalar_t> w(s, s, s);
      std::array<const scalar_t*, kBlock> gr;
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t row = blk * kBlock + r;
          gr[r] = row < rows ? pg + row * q : nullptr;
        }
        const auto xr = block_rows(blk, rows, 1, po, 1, d);
        gaunt::from_grid_block(g, s, lay, gr.data(), xr, w);
      }
    });
  });
  return out;
}

// The entries of a Gaunt table, checked against the dimensions they index (a bad table must not
// make the kernels read or write out of bounds).
void check_entries(const at::Tensor& index, const at::Tensor& value, const at::Tensor& a,
                   std::array<int64_t, 3> dims, const char* op) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong, op,
              ": index must be a CPU int64 tensor, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 2 && index.size(1) == 3, op, ": index must be [nnz, 3], got shape ",
              index.sizes());
  check_float(value, op, "value", 1, kCpu);
  check_same_dtype(value, a, op, "value");
  TORCH_CHECK(value.size(0) == index.size(0), op, ": value has ", value.size(0),
              " entries, index has ", index.size(0));
  const auto idx = index.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  constexpr const char* names[3] = {"a", "b", "the output"};
  for (int64_t n = 0; n < idx.size(0); ++n)
    for (int c = 0; c < 3; ++c)
      TORCH_CHECK(p[3 * n + c] >= 0 && p[3 * n + c] < dims[c], op, ": index[", n, ", ", c,
                  "] = ", p[3 * n + c], " is out of range for ", names[c], " (", dims[c],
                  " coefficients)");
}

at::Tensor dense_product_cpu(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& index_,
                             const at::Tensor& value_, int64_t lmax_out, bool flat) {
  constexpr const char* op = "gaunt_dense_product";
  const int64_t C = check_operands(a_, b_, op, kCpu), N = a_.size(0), Cb = b_.size(1);
  TORCH_CHECK(lmax_out >= 0, op, ": lmax_out must be >= 0, got ", lmax_out);
  const int64_t La = degree_of(a_.size(2), op, "a"), Lb = degree_of(b_.size(2), op, "b");
  const int64_t dc = (lmax_out + 1) * (lmax_out + 1);
  check_entries(index_, value_, a_, {a_.size(2), b_.size(2), dc}, op);
  auto a = a_.contiguous(), b = b_.contiguous(), index = index_.contiguous(),
       value = value_.contiguous();
  auto out = at::empty({N, C, dc}, a.options());
  if (out.numel() == 0) return out;
  const int64_t rows = N * C, blocks = (rows + kBlock - 1) / kBlock;
  const gaunt::Layout la(La, C, flat), lb(Lb, Cb, flat), lc(lmax_out, C, flat);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    const gaunt::Entries<scalar_t> e{index.size(0), index.data_ptr<int64_t>(),
                                     value.data_ptr<scalar_t>()};
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_rows(e.count + dc), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> xa(la.dim() * kBlock), xb(lb.dim() * kBlock), xo(dc * kBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        gaunt::load_block(la, block_rows(blk, rows, C, pa, C, la.sample_size(C)), xa.data());
        gaunt::load_block(lb, block_rows(blk, rows, C, pb, Cb, lb.sample_size(Cb)), xb.data());
        gaunt::dense_product_block(e, xa.data(), xb.data(), dc, xo.data());
        gaunt::store_block(lc, xo.data(), block_rows(blk, rows, C, po, C, lc.sample_size(C)));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dense_backward_cpu(const at::Tensor& grad_, const at::Tensor& a_,
                                                      const at::Tensor& b_,
                                                      const at::Tensor& index_,
                                                      const at::Tensor& value_, bool flat) {
  constexpr const char* op = "gaunt_dense_backward";
  const int64_t C = check_operands(a_, b_, op, kCpu), N = a_.size(0), Cb = b_.size(1);
  check_float(grad_, op, "grad", 3, kCpu);
  check_same_dtype(grad_, a_, op, "grad");
  TORCH_CHECK(grad_.size(0) == N && grad_.size(1) == C, op, ": grad must be [", N, ", ", C,
              ", (L + 1)^2], got shape ", grad_.sizes());
  const int64_t La = degree_of(a_.size(2), op, "a"), Lb = degree_of(b_.size(2), op, "b"),
                Lc = degree_of(grad_.size(2), op, "grad");
  check_entries(index_, value_, a_, {a_.size(2), b_.size(2), grad_.size(2)}, op);
  auto grad = grad_.contiguous(), a = a_.contiguous(), b = b_.contiguous(),
       index = index_.contiguous(), value = value_.contiguous();
  auto grad_a = at::empty_like(a);
  // A shared b gets one gradient row per channel first, summed over the channels at the end, so
  // that no two threads ever add into the same row.
  const bool shared = Cb == 1 && C > 1;
  auto grad_b = shared ? at::empty({N, C, b.size(2)}, b.options()) : at::empty_like(b);
  if (grad_a.numel() == 0) return {grad_a, at::zeros_like(b)};  // e.g. C = 0 beside a shared b
  const int64_t rows = N * C, blocks = (rows + kBlock - 1) / kBlock;
  const gaunt::Layout la(La, C, flat), lb(Lb, Cb, flat), lc(Lc, C, flat),
      lgb(Lb, shared ? C : Cb, flat && !shared);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    const gaunt::Entries<scalar_t> e{index.size(0), index.data_ptr<int64_t>(),
                                     value.data_ptr<scalar_t>()};
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* pga = grad_a.data_ptr<scalar_t>();
    scalar_t* pgb = grad_b.data_ptr<scalar_t>();
    const int64_t cgb = shared ? C : Cb;
    at::parallel_for(0, blocks, grain_rows(e.count + lc.dim()), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> xg(lc.dim() * kBlock), xa(la.dim() * kBlock), xb(lb.dim() * kBlock),
          ga(la.dim() * kBlock), gb(lb.dim() * kBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        gaunt::load_block(lc, block_rows(blk, rows, C, pg, C, lc.sample_size(C)), xg.data());
        gaunt::load_block(la, block_rows(blk, rows, C, pa, C, la.sample_size(C)), xa.data());
        gaunt::load_block(lb, block_rows(blk, rows, C, pb, Cb, lb.sample_size(Cb)), xb.data());
        gaunt::dense_backward_block(e, xg.data(), xa.data(), xb.data(), la.dim(), lb.dim(),
                                    ga.data(), gb.data());
        gaunt::store_block(la, ga.data(), block_rows(blk, rows, C, pga, C, la.sample_size(C)));
        gaunt::store_block(lgb, gb.data(),
                           block_rows(blk, rows, C, pgb, cgb, lgb.sample_size(cgb)));
      }
    });
  });
  return {grad_a, shared ? grad_b.sum(1, true) : grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equikern, m) {
  m.def(
      "gaunt_grid_product(Tensor a, Tensor b, Tensor pa, Tensor pb, Tensor pc, Tensor trig, "
      "bool flat=False) -> Tensor");
  m.def(
      "gaunt_dense_product(Tensor a, Tensor b, Tensor index, Tensor value, int lmax_out, "
      "bool flat=False) -> Tensor");
  m.def(
      "gaunt_dense_backward(Tensor grad, Tensor a, Tensor b, Tensor index, Tensor value, "
      "bool flat=False) -> (Tensor, Tensor)");
  m.def("gaunt_to_grid(Tensor x, Tensor p, Tensor trig) -> Tensor");
  m.def("gaunt_from_grid(Tensor grid, Tensor p, Tensor trig) -> Tensor");
}

TORCH_LIBRARY_IMPL(equikern, CPU, m) {
  m.impl("gaunt_grid_product", &grid_product_cpu);
  m.impl("gaunt_dense_product", &dense_product_cpu);
  m.impl("gaunt_dense_backward", &dense_backward_cpu);
  m.impl("gaunt_to_grid", &to_grid_cpu);
  m.impl("gaunt_from_grid", &from_grid_cpu);
}

}  // namespace equikern
