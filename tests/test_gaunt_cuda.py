"""The CUDA Gaunt ops against the CPU ops and the product of functions (skipped without a GPU)."""

import random

import pytest
import torch

from equikern.gaunt import choose_method, dense_plan, gaunt_power, gaunt_product, grid_plan
from equikern.nn.gaunt import GauntTensorProduct
from equikern.ops import gaunt as ops
from test_gaunt import feature, random_points, sh, to_flat

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CUDA = torch.device("cuda")
F64 = torch.float64


def close(got, want, dtype):
    """GPU against CPU: the same sums in the same order, up to fused multiply-adds."""
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def run_ops(a, b, g, l1, l2, lout, flat, device):
    """Every Gaunt op (products, both backward passes, grid maps) on one random problem, on one device."""
    a, b, g = a.to(device), b.to(device), g.to(device)
    dtype = a.dtype
    index, value = dense_plan(l1, l2, lout, dtype, device)
    pa, pb, pc, trig = grid_plan((l1, l2), lout, l1 + l2 + lout, dtype, device)
    results = {
        "dense": ops.gaunt_dense_product(a, b, index, value, lout, flat),
        "dense_backward": ops.gaunt_dense_backward(g, a, b, index, value, flat),
        "grid": ops.gaunt_grid_product(a, b, pa, pb, pc, trig, flat),
        "grid_grad_a": ops.gaunt_grid_product(g, b, pc, pb, pa, trig, flat),
    }
    if not flat:  # the grid maps take rows of coefficients
        x = a.reshape(-1, a.shape[-1])
        grid = ops.gaunt_to_grid(x, pa, trig)
        results["to_grid"] = grid
        results["from_grid"] = ops.gaunt_from_grid(grid, pc, trig)
    return results


def leaves(v):
    return list(v) if isinstance(v, tuple) else [v]


@pytest.mark.parametrize("seed", range(8))
def test_ops_match_cpu(seed):
    """Random sizes around the tile of 128 rows, both layouts, a shared second operand, an unsorted table."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(3):
        dtype = rng.choice([torch.float32, F64])
        n, c = rng.choice([0, 1, 3, 7]), rng.choice([1, 3, 32, 33, 127, 129, 200])
        cb = rng.choice([1, c])
        l1, l2, lout = (rng.randint(0, 6) for _ in range(3))
        flat = rng.random() < 0.5
        a = torch.randn(n, c, (l1 + 1) ** 2, generator=gen, dtype=dtype)
        b = torch.randn(n, cb, (l2 + 1) ** 2, generator=gen, dtype=dtype)
        g = torch.randn(n, c, (lout + 1) ** 2, generator=gen, dtype=dtype)
        if flat:
            a, b, g = to_flat(a), to_flat(b), to_flat(g)
        want = run_ops(a, b, g, l1, l2, lout, flat, "cpu")
        got = run_ops(a, b, g, l1, l2, lout, flat, CUDA)
        again = run_ops(a, b, g, l1, l2, lout, flat, CUDA)
        assert got.keys() == want.keys()
        for key in want:
            for x, y, z in zip(*(leaves(r[key]) for r in (got, want, again))):
                assert x.device.type == "cuda" and x.shape == y.shape, key
                close(x, y, dtype)
                assert torch.equal(x, z), key  # deterministic: no atomics


def test_unsorted_table_and_large_degrees():
    """A table in random order; degrees whose rows need smaller tiles (fewer rows per block)."""
    gen = torch.Generator().manual_seed(3)
    for l1, l2, lout, c in [(3, 2, 4, 40), (12, 12, 12, 3), (16, 2, 16, 2)]:
        a = torch.randn(2, c, (l1 + 1) ** 2, generator=gen, dtype=F64)
        b = torch.randn(2, 1, (l2 + 1) ** 2, generator=gen, dtype=F64)
        g = torch.randn(2, c, (lout + 1) ** 2, generator=gen, dtype=F64)
        index, value = dense_plan(l1, l2, lout, F64, "cpu")
        perm = torch.randperm(index.shape[0], generator=gen)
        index, value = index[perm], value[perm]
        want = (
            ops.gaunt_dense_product(a, b, index, value, lout),
            *ops.gaunt_dense_backward(g, a, b, index, value),
        )
        ic, vc = index.to(CUDA), value.to(CUDA)
        ac, bc, gc = a.to(CUDA), b.to(CUDA), g.to(CUDA)
        got = (ops.gaunt_dense_product(ac, bc, ic, vc, lout), *ops.gaunt_dense_backward(gc, ac, bc, ic, vc))
        for x, y in zip(got, want):
            close(x, y, F64)
        close(gaunt_product(ac, bc, lout, method="grid"), gaunt_product(a, b, lout, method="grid"), F64)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", ["grid", "dense", "fourier", "auto"])
def test_products_on_the_gpu(method, dtype):
    """The product of functions at random points (the outside truth), and the CPU result."""
    for l1, l2, shared in [(2, 2, False), (3, 1, True), (0, 4, False)]:
        x1 = feature(3, 33, lmax=l1, dtype=dtype)
        x2 = feature(3, 1 if shared else 33, lmax=l2, dtype=dtype)
        out = gaunt_product(x1.to(CUDA), x2.to(CUDA), method=method)
        r = random_points(20, F64)
        values = (x1.double() @ sh(l1, r).T) * (x2.double() @ sh(l2, r).T)
        tol = 1e-3 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out.cpu().double() @ sh(l1 + l2, r).T, values, rtol=tol, atol=tol)
        close(out, gaunt_product(x1, x2, method=method), dtype)
        truncated = gaunt_product(x1.to(CUDA), x2.to(CUDA), 1, method=method)
        close(truncated, out[..., :4].cpu(), dtype)
    x = feature(4, 5, lmax=2, dtype=dtype)
    close(gaunt_power(x.to(CUDA), 3, 4), gaunt_power(x, 3, 4), dtype)


def test_auto_uses_the_gpu_rule():
    for l1, l2, lout in [(2, 2, 2), (8, 8, 8), (5, 5, 5)]:
        x1, x2 = feature(2, 4, lmax=l1).to(CUDA), feature(2, 4, lmax=l2).to(CUDA)
        method = choose_method(l1, l2, lout, F64, "cuda")
        assert torch.equal(gaunt_product(x1, x2, lout), gaunt_product(x1, x2, lout, method=method))


@pytest.mark.parametrize("method", ["grid", "dense", "auto"])
def test_module_matches_cpu(method):
    for irreps in [
        ("33x0e+33x1o+33x2e", "1x0e+1x1o", "33x0e+33x1o+33x2e+33x3o"),
        ("5x0e+5x1o", "5x0e+5x1o+5x2e", "5x0e+5x1o"),
        ("1x0e+1x1o+1x2e", "7x0e+7x1o", "7x0e+7x1o+7x2e"),  # the shared operand comes first
    ]:
        module = GauntTensorProduct(*irreps, method=method).to(F64)
        with torch.no_grad():
            for w in (module.weight1, module.weight2, module.weight_out):
                w.copy_(torch.randn_like(w))
        x1 = torch.randn(4, module.irreps_in1.dim, dtype=F64, requires_grad=True)
        x2 = torch.randn(4, module.irreps_in2.dim, dtype=F64, requires_grad=True)
        want = module(x1, x2)
        want_grads = torch.autograd.grad(want.square().sum(), (x1, x2, module.weight1))
        gpu = module.to(CUDA)
        y1, y2 = x1.detach().to(CUDA).requires_grad_(), x2.detach().to(CUDA).requires_grad_()
        got = gpu(y1, y2)
        got_grads = torch.autograd.grad(got.square().sum(), (y1, y2, gpu.weight1))
        close(got, want.detach(), F64)
        for x, y in zip(got_grads, want_grads):
            close(x, y, F64)


@pytest.mark.parametrize("method", ["grid", "dense"])
def test_gradcheck_and_gradgradcheck_on_gpu(method):
    a = feature(2, 3, lmax=2).to(CUDA).requires_grad_()
    b = feature(2, 1, lmax=1).to(CUDA).requires_grad_()
    x = feature(2, 2, lmax=1).to(CUDA).requires_grad_()
    for fn, args in [
        (lambda a, b: gaunt_product(a, b, 2, method=method), (a, b)),
        (lambda a, b: gaunt_product(a, b.expand(2, 3, 4).contiguous(), 3, method=method), (a, b)),
        (lambda x: gaunt_power(x, 3, 2), (x,)),
    ]:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    module = GauntTensorProduct("33x0e+33x1o", "1x0e+1x1o+1x2e", "33x0e+33x1o+33x2e", method=method)
    module = module.to(device=CUDA, dtype=F64)
    x1 = torch.randn(2, 132, dtype=F64, device=CUDA, requires_grad=True)
    x2 = torch.randn(2, 9, dtype=F64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x1, x2))
    assert torch.autograd.gradgradcheck(module, (x1, x2))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opcheck_on_cuda(dtype):
    pa, pb, pc, trig = grid_plan((2, 1), 2, 5, dtype, CUDA)

    def feat(*shape, lmax):
        return feature(*shape, lmax=lmax, dtype=dtype).to(CUDA).requires_grad_()

    a = feat(3, 4, lmax=2)
    for flat in (False, True):
        for b in (feat(3, 4, lmax=1), feat(3, 1, lmax=1)):
            torch.library.opcheck(
                torch.ops.equikern.gaunt_grid_product.default, (a, b, pa, pb, pc, trig, flat)
            )
    index, value = dense_plan(2, 1, 3, dtype, CUDA)
    for flat in (False, True):
        for b in (feat(3, 4, lmax=1), feat(3, 1, lmax=1)):
            torch.library.opcheck(
                torch.ops.equikern.gaunt_dense_product.default, (a, b, index, value, 3, flat)
            )
            g = feat(3, 4, lmax=3)
            torch.library.opcheck(
                torch.ops.equikern.gaunt_dense_backward.default, (g, a, b, index, value, flat)
            )
    x = feat(5, lmax=2)
    torch.library.opcheck(torch.ops.equikern.gaunt_to_grid.default, (x, pa, trig))
    grid = ops.gaunt_to_grid(x.detach(), pa, trig).requires_grad_()
    torch.library.opcheck(torch.ops.equikern.gaunt_from_grid.default, (grid, pc, trig))


def test_empty_batch_on_gpu():
    x = feature(0, 3, lmax=2).to(CUDA)
    for method in ("grid", "dense"):
        assert gaunt_product(x, x, 2, method=method).shape == (0, 3, 9)
    assert gaunt_power(x, 2).shape == (0, 3, 25)


def test_bad_inputs_on_gpu():
    x = feature(2, 3, lmax=2).to(CUDA)
    with pytest.raises(ValueError, match="x2: device"):
        gaunt_product(x, x.cpu())
    index, value = dense_plan(2, 2, 2, F64, CUDA)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: b must be a CUDA tensor"):
        ops.gaunt_dense_product(x, x.cpu(), index, value, 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: index must be an int64 tensor on cuda"):
        ops.gaunt_dense_product(x, x, index.cpu(), value, 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: value must be a CUDA tensor"):
        ops.gaunt_dense_product(x, x, index, value.cpu(), 2)
    with pytest.raises(
        RuntimeError, match=r"gaunt_dense_product: index\[\d+, 2\] = \d+ is out of range for the output"
    ):
        ops.gaunt_dense_product(x, x, index, value, 1)
    bad = index.clone()
    bad[5, 0] = -1
    with pytest.raises(RuntimeError, match=r"index\[5, 0\] = -1 is out of range for a"):
        ops.gaunt_dense_product(x, x, bad, value, 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: value has dtype"):
        ops.gaunt_dense_product(x, x, index, value.float(), 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_backward: grad must be"):
        ops.gaunt_dense_backward(x[:, :2], x, x, index, value)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.gaunt_dense_product(x.half(), x.half(), index, value.half(), 2)
    pa, pb, pc, trig = grid_plan((2, 2), 2, 6, F64, CUDA)
    with pytest.raises(RuntimeError, match="gaunt_grid_product: trig must be a CUDA tensor"):
        ops.gaunt_grid_product(x, x, pa, pb, pc, trig.cpu())
    with pytest.raises(RuntimeError, match="gaunt_grid_product: pb has 3 rings"):
        ops.gaunt_grid_product(x, x, pa, pb[:3], pc, trig)
    with pytest.raises(RuntimeError, match="gaunt_grid_product: b must have 3 channels"):
        ops.gaunt_grid_product(x, feature(2, 2, lmax=2).to(CUDA), pa, pb, pc, trig)
    with pytest.raises(RuntimeError, match="trig only covers"):
        ops.gaunt_grid_product(x, x, pa, pb, pc, trig[:, 1:-1])
    with pytest.raises(RuntimeError, match="gaunt_to_grid: x must be a CUDA tensor"):
        ops.gaunt_to_grid(torch.randn(2, 9, dtype=F64), pa, trig)
    with pytest.raises(RuntimeError, match="gaunt_from_grid: grid must be"):
        ops.gaunt_from_grid(torch.randn(2, 3, 3, dtype=F64, device=CUDA), pa, trig)
