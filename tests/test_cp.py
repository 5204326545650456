"""CP decomposition, the cp_bilinear op and CPTensorProduct against einsum, TensorProduct and e3nn."""

import json

import pytest
import torch
from e3nn import o3

import equikern
from equikern.bench import Config, anchors
from equikern.bench import cp as bench_cp
from equikern.cp import cp_bilinear, cp_decompose, exact_factors, from_tensor_product
from equikern.irreps import Irreps
from equikern.nn import cp as nn_cp
from equikern.nn.cp import CPTensorProduct, coupling_tensor
from equikern.ops import cp as ops


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(nn_cp, "_FITS", {})
    return tmp_path


def channels_irreps(C, L):
    return Irreps("+".join(f"{C}x{l}{'eo'[l % 2]}" for l in range(L + 1)))


def sh_irreps(L):
    return Irreps.spherical_harmonics(L)


def tied_reference(module, x, y, w):
    """The channelwise TensorProduct of the same paths, every path weight set to the channel weight."""
    instr = [(i.i_in1, i.i_in2, i.i_out, "uvu", True) for i in module.instructions]
    tp = equikern.TensorProduct(
        module.irreps_in1, module.irreps_in2, module.irreps_out, instr, shared_weights=False
    )
    return tp(x, y, w.repeat(1, len(instr)))


# ---- cp_decompose ---------------------------------------------------------------------------------


def test_cp_decompose_recovers_known_low_rank():
    gen = torch.Generator().manual_seed(0)
    for shape, rank in (((6, 5, 4), 3), ((9, 9, 16), 7)):
        factors = [torch.randn(n, rank, dtype=torch.float64, generator=gen) for n in shape]
        T = torch.einsum("ir,jr,kr->ijk", *factors)
        A, B, C, err = cp_decompose(T, rank, seed=3)
        assert err < 1e-6
        approx = torch.einsum("ir,jr,kr->ijk", A, B, C)
        assert (approx - T).norm() / T.norm() == pytest.approx(err, rel=1e-6, abs=1e-12)
        again = cp_decompose(T, rank, seed=3)
        assert all(torch.equal(a, b) for a, b in zip((A, B, C), again[:3])) and again[3] == err
    assert cp_decompose(torch.zeros(2, 3, 4), 2)[3] == 0.0


def test_exact_factors_reproduce_the_tensor():
    T = torch.zeros(4, 5, 6, dtype=torch.float64)
    T[1, 2] = torch.randn(6, dtype=torch.float64)
    T[3, :, 2] = torch.randn(5, dtype=torch.float64)
    A, B, C = exact_factors(T)
    torch.testing.assert_close(torch.einsum("ir,jr,kr->ijk", A, B, C), T, rtol=0, atol=0)
    assert A.shape[1] == 6  # one term per nonzero k-fibre (the sparsest mode)


def test_cp_decompose_bad_inputs():
    T = torch.randn(3, 3, 3)
    with pytest.raises(ValueError, match="rank"):
        cp_decompose(T, 0)
    with pytest.raises(ValueError, match="rank"):
        cp_decompose(T, 2.0)
    with pytest.raises(ValueError, match="3-way"):
        cp_decompose(torch.randn(3, 3), 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cp_decompose(torch.tensor([[[float("nan")]]]), 1)
    with pytest.raises(ValueError, match="tol"):
        cp_decompose(T, 2, tol=-1.0)
    with pytest.raises(ValueError, match="every dimension"):
        cp_decompose(torch.zeros(0, 2, 2), 1)


# ---- cp_bilinear ------------------------------------------------------------------------------------


def random_factors(I, J, K, R, dtype, gen):
    return [torch.randn(n, R, dtype=dtype, generator=gen) for n in (I, J, K)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cp_bilinear_matches_einsum(dtype):
    """The public broadcasting function (x2 shared by trailing dims, or per element) against einsum."""
    gen = torch.Generator().manual_seed(1)
    A, B, C = random_factors(5, 4, 7, 6, dtype, gen)
    cases = [
        ((3, 40, 5), (3, 1, 4)),
        ((2, 3, 5), (2, 3, 4)),
        ((6, 5), (4,)),
        ((5,), (2, 3, 4)),
        ((35, 5), (35, 4)),
    ]
    for s1, s2 in cases:
        x1 = torch.randn(s1, dtype=dtype, generator=gen)
        x2 = torch.randn(s2, dtype=dtype, generator=gen)
        ref = torch.einsum(
            "kr,ir,...i,jr,...j->...k", C.double(), A.double(), x1.double(), B.double(), x2.double()
        )
        tol = 1e-4 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(cp_bilinear(x1, x2, A, B, C), ref.to(dtype), rtol=tol, atol=tol)


def op_inputs(shared, gen, Z=2, I=3, J=2, K=4, R=3, Cc=3, weight=True):
    x1 = torch.randn(Z, I, Cc, dtype=torch.float64, generator=gen)
    x2 = torch.randn(1 if shared else Z, J, dtype=torch.float64, generator=gen)
    w = [torch.randn(Z, Cc, dtype=torch.float64, generator=gen)] if weight else []
    return [t.requires_grad_() for t in [x1, x2, *random_factors(I, J, K, R, torch.float64, gen), *w]]


def brute_force(x1, x2, A, B, C, w=None):
    """The op's map from the dense CP tensor T[i, j, k] = sum_r A B C, in float64."""
    T = torch.einsum("ir,jr,kr->ijk", A.double(), B.double(), C.double())
    out = torch.einsum("ijk,zic,zj->zkc", T, x1.double(), x2.double().expand(x1.shape[0], -1))
    return out if w is None else out * w.double()[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("route", ops.ROUTES)
def test_cp_bilinear_routes_match_brute_force(dtype, route):
    """Every route, on random shapes (J below and above R, channel counts off the vector width), with the
    second operand per sample or shared, with and without weights: forward and all six gradients."""
    gen = torch.Generator().manual_seed(11)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    for trial in range(12):
        Z, I, J, K, R = (int(n) for n in torch.randint(1, 12, (5,), generator=gen))
        Cc = (1, 3, 8, 13, 40, 128)[trial % 6]
        for shared in (False, True):
            x1, x2, A, B, C, w = (t.detach().to(dtype) for t in op_inputs(shared, gen, Z, I, J, K, R, Cc))
            for weight in (w, None):
                want = brute_force(x1, x2, A, B, C, weight)
                got = ops.cp_bilinear(x1, x2, A, B, C, weight, route)
                scale = want.abs().max()
                assert got.dtype == dtype and (got.double() - want).abs().max() <= tol * scale
                grad = torch.randn(want.shape, dtype=dtype, generator=gen)
                leaves = [t.double().requires_grad_() for t in (x1, x2, A, B, C)]
                if weight is not None:
                    leaves.append(weight.double().requires_grad_())
                ref = torch.autograd.grad(brute_force(*leaves), leaves, grad.double())
                got = ops.cp_bilinear_backward(grad, x1, x2, A, B, C, weight, True, route)
                assert got[5].shape == ((0,) if weight is None else weight.shape)
                for g, r in zip(got, ref):
                    assert g.shape == r.shape and (g.double() - r).abs().max() <= tol * r.abs().max()
                no_factors = ops.cp_bilinear_backward(grad, x1, x2, A, B, C, weight, False, route)
                assert all(not g.any() for g in no_factors[2:5])
                torch.testing.assert_close(no_factors[0], got[0], rtol=0, atol=0)


def test_cp_bilinear_shared_gradients_are_deterministic():
    """Gradients summed over samples (x2 shared, the factors) do not depend on the number of threads."""
    gen = torch.Generator().manual_seed(12)
    threads = torch.get_num_threads()
    for route in ("factors", "matrix"):
        for shared in (False, True):
            args = [t.detach().float() for t in op_inputs(shared, gen, Z=300, I=9, J=9, K=9, R=28, Cc=40)]
            grad = torch.randn(300, 9, 40, generator=gen)
            try:
                results = []
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    results.append(ops.cp_bilinear_backward(grad, *args, True, route))
            finally:
                torch.set_num_threads(threads)
            for other in results[1:]:
                assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("route", ["factors", "matrix"])
def test_cp_bilinear_gradcheck_and_gradgradcheck(shared, route):
    args = op_inputs(shared, torch.Generator().manual_seed(2))
    fn = lambda *a: ops.cp_bilinear(*a, route=route)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args[:5])  # no weight
    # derivatives of x1, x2 and the weight only (the factors fixed, as in CPTensorProduct)
    x1, x2, A, B, C, w = args
    fn = lambda a, b, c: ops.cp_bilinear(a, b, A.detach(), B.detach(), C.detach(), c, route)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x1, x2, w))


def test_cp_bilinear_opcheck():
    gen = torch.Generator().manual_seed(3)
    lib = torch.ops.equikern
    for shared in (False, True):
        for weight in (True, False):
            args = op_inputs(shared, gen, weight=weight)
            if not weight:
                args.append(None)
            for route in ops.ROUTES:
                torch.library.opcheck(lib.cp_bilinear.default, (*args, route))
            grad = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
            for factors in (True, False):
                for route in ("factors", "matrix"):
                    torch.library.opcheck(lib.cp_bilinear_backward.default, (grad, *args, factors, route))


def test_cp_bilinear_bad_inputs():
    gen = torch.Generator().manual_seed(4)
    x1, x2, A, B, C, w = [t.detach() for t in op_inputs(False, gen)]
    with pytest.raises(RuntimeError, match="x2 has 3 rows, expected 2"):
        ops.cp_bilinear(x1, torch.cat([x2, x2[:1]]), A, B, C)
    with pytest.raises(RuntimeError, match=r"A has shape \[5, 3\], expected \[3, R\]"):
        ops.cp_bilinear(x1, x2, torch.randn(5, 3, dtype=torch.float64), B, C)
    with pytest.raises(RuntimeError, match="B has dtype Float"):
        ops.cp_bilinear(x1, x2, A, B.float(), C)
    with pytest.raises(RuntimeError, match="x1 must be 3-D"):
        ops.cp_bilinear(x1[0], x2, A, B, C)
    with pytest.raises(RuntimeError, match=r"weight has shape \[2, 2\], expected \[2, 3\]"):
        ops.cp_bilinear(x1, x2, A, B, C, w[:, :2])
    with pytest.raises(RuntimeError, match="weight has dtype Float"):
        ops.cp_bilinear(x1, x2, A, B, C, w.float())
    with pytest.raises(RuntimeError, match="route must be 'auto', 'factors' or 'matrix', got 'fast'"):
        ops.cp_bilinear(x1, x2, A, B, C, w, "fast")
    with pytest.raises(RuntimeError, match="grad has shape"):
        ops.cp_bilinear_backward(torch.zeros(2, 4, 4, dtype=torch.float64), x1, x2, A, B, C)
    with pytest.raises(ValueError, match="A, B, C: shapes"):
        cp_bilinear(x1[..., 0], x2, B, B, C)
    with pytest.raises(ValueError, match="x1, x2: batch shapes"):
        cp_bilinear(torch.randn(3, 3, dtype=torch.float64), x2, A, B, C)
    with pytest.raises(ValueError, match="C: dtype"):
        cp_bilinear(x1[..., 0], x2, A, B, C.float())
    with pytest.raises(ValueError, match="weight: shape"):
        cp_bilinear(x1[..., 0], x2, A, B, C, torch.randn(3, dtype=torch.float64))


def test_cp_bilinear_weight_broadcasts_over_the_batch():
    gen = torch.Generator().manual_seed(13)
    A, B, C = random_factors(5, 4, 6, 7, torch.float64, gen)
    x1 = torch.randn(3, 40, 5, dtype=torch.float64, generator=gen)
    for x2 in (
        torch.randn(3, 1, 4, dtype=torch.float64, generator=gen),
        torch.randn(3, 40, 4, dtype=torch.float64, generator=gen),
    ):
        w = torch.randn(40, dtype=torch.float64, generator=gen)
        want = cp_bilinear(x1, x2, A, B, C) * w[:, None]
        torch.testing.assert_close(cp_bilinear(x1, x2, A, B, C, w), want, rtol=1e-12, atol=1e-12)


def test_cp_bilinear_empty_inputs():
    A, B, C = (torch.randn(n, 3) for n in (4, 2, 5))
    for Z, Cc in ((0, 8), (3, 0)):
        x1, x2, w = torch.randn(Z, 4, Cc), torch.randn(Z, 2), torch.randn(Z, Cc)
        for route in ops.ROUTES:
            assert ops.cp_bilinear(x1, x2, A, B, C, w, route).shape == (Z, 5, Cc)
            grads = ops.cp_bilinear_backward(torch.randn(Z, 5, Cc), x1, x2, A, B, C, w, True, route)
            assert [g.shape for g in grads] == [t.shape for t in (x1, x2, A, B, C, w)]
            assert all(not g.any() for g in grads)


# ---- CPTensorProduct --------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_rank_reproduces_tied_channelwise_product(L, dtype):
    gen = torch.Generator().manual_seed(5)
    irreps = channels_irreps(3, L)
    module = CPTensorProduct(irreps, sh_irreps(L), irreps, rank=10**6)
    assert module.rank == module.exact_rank and module.approximation_error == 0.0
    x = torch.randn(2, 7, irreps.dim, dtype=dtype, generator=gen)
    y = torch.randn(7, sh_irreps(L).dim, dtype=dtype, generator=gen)
    w = torch.randn(2, 7, 3, dtype=dtype, generator=gen)
    out = module(x, y, w)
    ref = tied_reference(module, x.reshape(14, -1), y.repeat(2, 1), w.reshape(14, -1)).reshape(out.shape)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_matches_e3nn_with_tied_path_weights():
    gen = torch.Generator().manual_seed(6)
    irreps, sh = channels_irreps(4, 2), sh_irreps(2)
    module = CPTensorProduct(irreps, sh, irreps, rank=10**6)
    instr = [(i.i_in1, i.i_in2, i.i_out, "uvu", True) for i in module.instructions]
    tp = o3.TensorProduct(
        str(irreps), str(sh), str(irreps), instr, shared_weights=False, internal_weights=False
    )
    x = torch.randn(6, irreps.dim, dtype=torch.float64, generator=gen)
    y = torch.randn(6, sh.dim, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    ref = tp.double()(x, y, w.repeat(1, len(instr)))
    torch.testing.assert_close(module(x, y, w), ref, rtol=1e-5, atol=1e-6)  # e3nn rounds its CG to float32


def test_from_channelwise_tensor_product():
    gen = torch.Generator().manual_seed(7)
    irreps = channels_irreps(2, 2)
    tp = equikern.ChannelwiseTensorProduct(irreps, sh_irreps(2), "0e+1o+2e")
    module = from_tensor_product(tp, rank=10**6)
    assert module.irreps_out == tp.irreps_out and module.approximation_error == 0.0
    x = torch.randn(5, irreps.dim, dtype=torch.float64, generator=gen)
    y = torch.randn(5, sh_irreps(2).dim, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 2, dtype=torch.float64, generator=gen)
    ref = tp(x, y, w.repeat(1, len(tp.instructions)))
    torch.testing.assert_close(module(x, y, w), ref, rtol=1e-12, atol=1e-12)


def test_approximation_error_is_the_output_error_and_bounds_equivariance(cache_dir):
    gen = torch.Generator().manual_seed(8)
    irreps, sh = channels_irreps(4, 1), sh_irreps(1)
    module = CPTensorProduct(irreps, sh, irreps, tol=1e-2)
    eps = module.approximation_error
    assert 0 < eps <= 1e-2 and module.rank < module.exact_rank
    smaller = CPTensorProduct(irreps, sh, irreps, rank=module.rank - 1)
    assert smaller.approximation_error > 1e-2  # the smallest rank reaching tol was chosen
    x = torch.randn(4000, irreps.dim, dtype=torch.float64, generator=gen)
    y = torch.randn(4000, sh.dim, dtype=torch.float64, generator=gen)
    w = torch.randn(4000, 4, dtype=torch.float64, generator=gen)
    ref = tied_reference(module, x, y, w)
    measured = float((module(x, y, w) - ref).norm() / ref.norm())
    assert measured == pytest.approx(eps, rel=0.1)
    equi = module.equivariance_error(num_rotations=8, batch=64)
    assert 1e-2 * eps < equi < 2.2 * eps
    assert CPTensorProduct(irreps, sh, irreps, rank=10**6).equivariance_error() < 1e-12
    assert len(list(cache_dir.glob("cp-*.pt"))) == 3


def test_fit_is_cached_on_disk(cache_dir):
    irreps, sh = channels_irreps(2, 1), sh_irreps(1)
    first = CPTensorProduct(irreps, sh, irreps, rank=4)
    (path,) = cache_dir.glob("cp-*.pt")
    nn_cp._FITS.clear()
    second = CPTensorProduct(irreps, sh, irreps, rank=4)
    assert all(torch.equal(a, b) for a, b in zip(first.factors(), second.factors()))
    assert second.approximation_error == first.approximation_error
    torch.save(tuple(torch.zeros_like(f) for f in first.factors()) + (0.5,), path)
    nn_cp._FITS.clear()
    assert CPTensorProduct(irreps, sh, irreps, rank=4).approximation_error == 0.5  # read, not refitted


def test_layouts_and_gradients():
    gen = torch.Generator().manual_seed(9)
    irreps, sh = channels_irreps(3, 1), sh_irreps(1)
    mul_ir = CPTensorProduct(irreps, sh, irreps, rank=5)
    ir_mul = CPTensorProduct(irreps, sh, irreps, rank=5, layout="ir_mul")
    x = torch.randn(4, irreps.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(4, sh.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    out = ir_mul(x[:, mul_ir._gather_in], y, w)
    torch.testing.assert_close(out[:, mul_ir._gather_out], mul_ir(x, y, w))
    assert torch.autograd.gradcheck(mul_ir, (x, y, w))
    assert torch.autograd.gradgradcheck(mul_ir, (x, y, w))
    assert ir_mul.equivariance_error() == pytest.approx(mul_ir.equivariance_error(), rel=0.2)
    assert "rank 5" in repr(mul_ir)


def test_cp_tensor_product_bad_inputs():
    irreps, sh = channels_irreps(2, 1), sh_irreps(1)
    with pytest.raises(ValueError, match="irreps_in1"):
        CPTensorProduct("2x0e+3x1o", sh, irreps)
    with pytest.raises(ValueError, match="irreps_in2"):
        CPTensorProduct(irreps, "2x0e", irreps)
    with pytest.raises(ValueError, match="rank"):
        CPTensorProduct(irreps, sh, irreps, rank=0)
    with pytest.raises(ValueError, match="layout"):
        CPTensorProduct(irreps, sh, irreps, layout="mul")
    with pytest.raises(ValueError, match="irreps_out: no irrep"):
        CPTensorProduct(irreps, sh, "2x3o")
    with pytest.raises(ValueError, match="uvu"):
        coupling_tensor(equikern.FullyConnectedTensorProduct(irreps, sh, irreps))
    module = CPTensorProduct(irreps, sh, irreps, rank=3)
    with pytest.raises(ValueError, match="weight: expected shape"):
        module(torch.randn(2, irreps.dim), torch.randn(2, sh.dim), torch.randn(2, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        module(torch.randn(2, irreps.dim), torch.randn(3, sh.dim), torch.randn(2, 2))


# ---- benchmark family ---------------------------------------------------------------------------------

CPU = torch.device("cpu")


def test_bench_family_quick_run(tmp_path):
    from equikern.bench import __main__ as bench

    argv = ["--quick", "--device", "cpu", "--problems", "cp", "--modes", "fwd,fwdbwd", "--out", str(tmp_path)]
    assert bench.main(argv + ["--dtype", "float32,float64"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    rows = {(r["problem"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    for L in (1, 2, 3):
        for dtype in ("float32", "float64"):
            for mode in ("fwd", "fwdbwd"):
                row = {
                    impl: rows[f"cp-L{L}", dtype, mode, impl]
                    for impl in ("equikern", "tdn_einsum", "two_gemm_einsum", "equikern_tp")
                }
                assert row["tdn_einsum"]["status"] == "ref"
                for impl in ("equikern", "two_gemm_einsum"):
                    assert row[impl]["status"] == "ok", row[impl]
                    assert row[impl]["max_rel_err"] <= bench.TOLERANCE[getattr(torch, dtype)]
                assert row["equikern_tp"]["status"] == "unchecked"  # exact product, not the rank-R one
                assert all(r["median_ms"] > 0 and r["floor_ms"] > 0 for r in row.values())


def test_bench_family_floors_and_published_figures():
    """At the anchors' size on an H100 the floors are the anchors' ones; CPU runs default to E = 2000."""
    bandwidth = anchors()["h100_copy_bandwidth_TBps"] * 1e12
    rows = anchors()["cp"]["rows"]
    for row, case in zip(rows, bench_cp.cases(Config(CPU, torch.float32, 50000, "h100"))):
        assert case.floor_bytes["fwd"] / bandwidth * 1e3 == pytest.approx(row["floor_ms"], rel=0.01)
        assert case.published == {
            "tdn_einsum": {"fwd": row["tdn_einsum_ms"]},
            "two_gemm_einsum": {"fwd": row["two_gemm_einsum_ms"]},
        }
        assert case.params == {"L": row["L"], "d": row["d"], "R": row["R"], "C": row["C"]}
    cpu = bench_cp.cases(Config(CPU, torch.float32, 50000, "cpu", batch_given=False))
    assert [c.batch for c in cpu] == [2000] * 3 and all(c.published == {} for c in cpu)
    assert [c.batch for c in bench_cp.cases(Config(CPU, torch.float32, 300, "cpu"))] == [300] * 3


def test_bench_tp_context_row_is_the_exact_tied_product():
    """The unchecked equikern_tp row computes the exact product (CPTensorProduct at full rank)."""
    case = bench_cp.cases(Config(CPU, torch.float64, 3, "cpu"))[0]
    x, y, w = case.inputs()
    impl = case.impls["equikern_tp"]()
    got = impl.fn(*impl.to_native((x, y, w)))
    irreps = channels_irreps(case.params["C"], 1)
    module = CPTensorProduct(irreps, sh_irreps(1), irreps, rank=10**6, layout="ir_mul")
    want = module(x.reshape(3, -1), y, w).reshape(x.shape)
    torch.testing.assert_close(got, impl.to_native((want, y, w))[0], rtol=1e-12, atol=1e-12)
