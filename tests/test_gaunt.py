"""Gaunt products against the product of functions, e3nn's restricted CG product, rotations and each other."""

import pytest
import torch
from e3nn import o3

import equikern.gaunt as gaunt_module
from equikern.gaunt import (
    choose_method,
    dense_plan,
    flat_index,
    gaunt_coefficients,
    gaunt_power,
    gaunt_product,
    grid_plan,
)
from equikern.nn.gaunt import GauntTensorProduct
from equikern.ops import gaunt as ops
from equikern.so3 import rand_matrix, spherical_harmonics, wigner_3j, wigner_D

F64 = torch.float64


def sh(lmax, points):
    return spherical_harmonics(list(range(lmax + 1)), points, False)


def random_points(n, dtype=F64):
    return torch.nn.functional.normalize(torch.randn(n, 3, dtype=dtype), dim=-1)


def feature(*shape, lmax, dtype=F64):
    return torch.randn(*shape, (lmax + 1) ** 2, dtype=dtype)


def block_wigner_D(lmax, R):
    return torch.block_diag(*[wigner_D(l, R) for l in range(lmax + 1)])


METHODS = ("grid", "dense", "fourier", "auto")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("l1, l2", [(0, 0), (1, 2), (3, 3), (4, 1), (0, 5)])
def test_product_of_functions_at_random_points(l1, l2, method):
    x1, x2 = feature(3, 4, lmax=l1), feature(3, 4, lmax=l2)
    r = random_points(20)
    out = gaunt_product(x1, x2, method=method)
    assert out.shape == (3, 4, (l1 + l2 + 1) ** 2)
    torch.testing.assert_close(out @ sh(l1 + l2, r).T, (x1 @ sh(l1, r).T) * (x2 @ sh(l2, r).T))


def test_truncation_and_shared_channel():
    x1, x2 = feature(2, 5, lmax=3), feature(2, 1, lmax=2)
    full = gaunt_product(x1, x2)
    for lout in (0, 2, 4):
        torch.testing.assert_close(gaunt_product(x1, x2, lout), full[..., : (lout + 1) ** 2])
    torch.testing.assert_close(gaunt_product(x1, x2), gaunt_product(x1, x2.expand(2, 5, 9)))
    torch.testing.assert_close(gaunt_product(x2, x1), full)  # commutes, one channel on either side
    broadcast = gaunt_product(x1[None], x2[:1])  # leading dims broadcast: x2[0] for both samples
    torch.testing.assert_close(broadcast, gaunt_product(x1, x2[:1].expand(2, 1, 9))[None])


def test_power_is_repeated_product():
    x = feature(2, 3, lmax=2)
    torch.testing.assert_close(gaunt_power(x, 3), gaunt_product(gaunt_product(x, x), x))
    torch.testing.assert_close(gaunt_power(x, 2, 3), gaunt_product(x, x, 3))
    torch.testing.assert_close(gaunt_power(x, 1), x)


def test_gaunt_coefficients_are_scaled_wigner_3j():
    for l1, l2, l3 in [(1, 1, 2), (2, 3, 3), (2, 2, 2), (1, 2, 2)]:
        g = gaunt_coefficients(l1, l2, l3)
        if (l1 + l2 + l3) % 2:
            assert g.abs().max() == 0  # odd paths vanish: the product has parity (-1)^(l1+l2)
        else:
            w = wigner_3j(l1, l2, l3)
            ratio = (g * w).sum()
            torch.testing.assert_close(g, ratio * w)


def restricted_e3nn(lmax1, lmax2, lmax_out, channels):
    """e3nn's uuu tensor product on the even paths, weighted by the Gaunt/Wigner-3j ratio of each path."""
    irreps = [o3.Irreps([(channels, (l, (-1) ** l)) for l in range(L + 1)]) for L in (lmax1, lmax2, lmax_out)]
    instructions, ratios = [], []
    for i in range(lmax1 + 1):
        for j in range(lmax2 + 1):
            for k in range(abs(i - j), min(i + j, lmax_out) + 1):
                if (i + j + k) % 2 == 0:
                    instructions.append((i, j, k, "uuu", True))
                    ratios.append((gaunt_coefficients(i, j, k) * wigner_3j(i, j, k)).sum())
    tp = o3.TensorProduct(
        *irreps,
        instructions,
        irrep_normalization="none",
        path_normalization="none",
        internal_weights=False,
        shared_weights=True,
    ).to(F64)
    weight = torch.stack(ratios).repeat_interleave(channels)
    return irreps, lambda a, b: tp(a, b, weight)


def test_gaunt_coefficients_analytic():
    # Y_00 = 1 / sqrt(4 pi) and the Y_lm are orthonormal, so G[00, lm, l'm'] = delta / sqrt(4 pi)
    for l in range(5):
        torch.testing.assert_close(
            gaunt_coefficients(0, l, l)[0], torch.eye(2 * l + 1, dtype=F64) / (4 * torch.pi) ** 0.5
        )
    # Y_1m = sqrt(3 / 4 pi) x_m: integral x_m^2 Y_00 = 1/3 * sqrt(4 pi)
    torch.testing.assert_close(
        gaunt_coefficients(1, 1, 0)[:, :, 0], torch.eye(3, dtype=F64) / (4 * torch.pi) ** 0.5
    )


def test_dense_table_is_brute_force_contraction():
    l1, l2, lout = 3, 2, 4
    index, value = dense_plan(l1, l2, lout, F64, "cpu")
    assert bool((index[1:, 2] >= index[:-1, 2]).all())  # grouped by output coefficient
    g = torch.zeros((l1 + 1) ** 2, (l2 + 1) ** 2, (lout + 1) ** 2, dtype=F64)
    g[tuple(index.T)] = value
    # the table is the per-degree Gaunt blocks, nothing left out
    for i in range(l1 + 1):
        for j in range(l2 + 1):
            for k in range(lout + 1):
                block = g[i * i : (i + 1) ** 2, j * j : (j + 1) ** 2, k * k : (k + 1) ** 2]
                torch.testing.assert_close(block, gaunt_coefficients(i, j, k))
    a, b = feature(5, 3, lmax=l1), feature(5, 3, lmax=l2)
    expected = torch.einsum("nci,ncj,ijk->nck", a, b, g)
    torch.testing.assert_close(gaunt_product(a, b, lout, method="dense"), expected)


@pytest.mark.parametrize("method", METHODS)
def test_module_equals_restricted_cg_product_of_e3nn(method):
    irreps, reference = restricted_e3nn(2, 3, 3, 4)
    module = GauntTensorProduct(*irreps, method=method, weights=False)
    x1, x2 = torch.randn(6, irreps[0].dim, dtype=F64), torch.randn(6, irreps[1].dim, dtype=F64)
    torch.testing.assert_close(module(x1, x2), reference(x1, x2))


def to_flat(x):
    """[N, C, (L+1)^2] channel layout -> [N, C, (L+1)^2] holding e3nn's flat layout."""
    n, c, d = x.shape
    flat = torch.empty(n, c * d, dtype=x.dtype)
    flat[:, flat_index(c, int(round(d**0.5)) - 1).reshape(-1)] = x.reshape(n, c * d)
    return flat.reshape(n, c, d)


@pytest.mark.parametrize("seed", range(6))
def test_flat_layout_ops_match_channel_layout(seed):
    """Random sizes (C around the block of 32 rows, shared second operand, empty and odd batches)."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 7, (), generator=gen))
    c = int(torch.tensor([1, 3, 32, 33, 70])[torch.randint(0, 5, (), generator=gen)])
    l1, l2, lout = (int(v) for v in torch.randint(0, 5, (3,), generator=gen))
    cb = 1 if seed % 2 else c
    dtype = F64 if seed % 3 else torch.float32
    a = torch.randn(n, c, (l1 + 1) ** 2, generator=gen, dtype=dtype)
    b = torch.randn(n, cb, (l2 + 1) ** 2, generator=gen, dtype=dtype)
    g = torch.randn(n, c, (lout + 1) ** 2, generator=gen, dtype=dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    index, value = dense_plan(l1, l2, lout, dtype, "cpu")
    pa, pb, pc, trig = grid_plan((l1, l2), lout, l1 + l2 + lout, dtype, "cpu")
    runs = {
        "dense": lambda a, b, flat: ops.gaunt_dense_product(a, b, index, value, lout, flat),
        "grid": lambda a, b, flat: ops.gaunt_grid_product(a, b, pa, pb, pc, trig, flat),
    }
    outs = []
    for run in runs.values():
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        af, bf = to_flat(a).requires_grad_(), to_flat(b).requires_grad_()
        out = run(ar, br, False)
        out_flat = run(af, bf, True)
        torch.testing.assert_close(out_flat, to_flat(out), **tol)
        grads = torch.autograd.grad(out, (ar, br), g)
        grads_flat = torch.autograd.grad(out_flat, (af, bf), to_flat(g))
        for got, want in zip(grads_flat, grads):
            torch.testing.assert_close(got, to_flat(want), **tol)
        outs.append((out, *grads))
    for got, want in zip(*outs):  # and the two methods agree
        torch.testing.assert_close(got, want, **tol)


def test_auto_follows_the_cost_rule(monkeypatch):
    for dtype in (torch.float32, F64):
        assert choose_method(2, 2, 2, dtype) == "dense"  # 83 entries
        assert choose_method(8, 8, 8, dtype) == "grid"
    assert choose_method(6, 6, 6, torch.float32) == "dense" and choose_method(6, 6, 6, F64) == "grid"
    calls = []
    for method in ("grid", "dense"):
        monkeypatch.setattr(gaunt_module, "choose_method", lambda *args, m=method: calls.append(args) or m)
        module = GauntTensorProduct("4x0e+4x1o+4x2e", "4x0e+4x1o", "4x0e+4x1o+4x2e+4x3o").to(F64)
        x1, x2 = torch.randn(3, 36, dtype=F64), torch.randn(3, 16, dtype=F64)
        assert torch.equal(
            module(x1, x2), GauntTensorProduct(*module_irreps(module), method=method).to(F64)(x1, x2)
        )
    assert calls == [(2, 1, 3, F64)] * 2


def module_irreps(module):
    return module.irreps_in1, module.irreps_in2, module.irreps_out


def test_module_weights_and_layout():
    module = GauntTensorProduct("3x0e+3x1o+3x2e", "1x0e+1x1o", "3x0e+3x1o").to(F64)
    with torch.no_grad():
        for w in (module.weight1, module.weight2, module.weight_out):
            w.copy_(torch.randn_like(w))
    x1, x2 = torch.randn(5, 27, dtype=F64), torch.randn(5, 4, dtype=F64)
    a = torch.cat([x1[:, :3].reshape(5, 3, 1), x1[:, 3:12].reshape(5, 3, 3), x1[:, 12:].reshape(5, 3, 5)], -1)
    deg = [0, 1, 1, 1, 2, 2, 2, 2, 2]
    out = gaunt_product(a * module.weight1[:, deg], x2[:, None] * module.weight2[:, deg[:4]], 1)
    out = out * module.weight_out[:, deg[:4]]
    expected = torch.cat([out[..., :1].flatten(1), out[..., 1:4].flatten(1)], -1)
    torch.testing.assert_close(module(x1, x2), expected)
    module(x1, x2).square().sum().backward()
    assert all(w.grad is not None for w in (module.weight1, module.weight2, module.weight_out))


def test_equivariance_under_rotations():
    R = rand_matrix(dtype=F64)
    x1, x2 = feature(4, 3, lmax=3), feature(4, 1, lmax=2)
    for lout in (2, 5):
        out = gaunt_product(x1 @ block_wigner_D(3, R).T, x2 @ block_wigner_D(2, R).T, lout)
        torch.testing.assert_close(out, gaunt_product(x1, x2, lout) @ block_wigner_D(lout, R).T)
    out = gaunt_power(x2 @ block_wigner_D(2, R).T, 3, 4)
    torch.testing.assert_close(out, gaunt_power(x2, 3, 4) @ block_wigner_D(4, R).T)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("l1, l2, lout", [(2, 2, 2), (3, 1, 4), (4, 4, 8), (1, 3, 0)])
def test_grid_fourier_dense_agree(dtype, l1, l2, lout):
    x1, x2 = feature(7, 5, lmax=l1, dtype=dtype), feature(7, 1, lmax=l2, dtype=dtype)
    grid = gaunt_product(x1, x2, lout, method="grid")
    assert grid.dtype == dtype
    tol = {"atol": 2e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    for method in ("fourier", "dense", "auto"):
        torch.testing.assert_close(gaunt_product(x1, x2, lout, method=method), grid, **tol)
    module = GauntTensorProduct("5x0e+5x1o+5x2e", "1x0e+1x1o", "5x0e", method="fourier").to(dtype)
    assert module(torch.randn(3, 45, dtype=dtype), torch.randn(3, 4, dtype=dtype)).shape == (3, 5)


@pytest.mark.parametrize("method", ["grid", "dense"])
def test_gradcheck_and_gradgradcheck(method):
    a = feature(2, 3, lmax=2).requires_grad_()
    b = feature(2, 1, lmax=1).requires_grad_()
    x = feature(2, 2, lmax=1).requires_grad_()
    for fn, args in [
        (lambda a, b: gaunt_product(a, b, 2, method=method), (a, b)),
        (lambda a, b: gaunt_product(a, b[:, :1].expand(2, 3, 4).contiguous(), 3, method=method), (a, b)),
        (lambda x: gaunt_power(x, 3, 2), (x,)),
    ]:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("method", ["grid", "dense"])
def test_module_gradcheck_flat_layout(method):
    """Through the module: flat layout, weights, a shared second operand with C = 33 (> one row block)."""
    module = GauntTensorProduct("33x0e+33x1o", "1x0e+1x1o+1x2e", "33x0e+33x1o+33x2e", method=method).to(F64)
    with torch.no_grad():
        for w in (module.weight1, module.weight2, module.weight_out):
            w.copy_(torch.randn_like(w))
    x1 = torch.randn(2, 132, dtype=F64, requires_grad=True)
    x2 = torch.randn(2, 9, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x1, x2))
    assert torch.autograd.gradgradcheck(module, (x1, x2))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opcheck(dtype):
    pa, pb, pc, trig = grid_plan((2, 1), 2, 5, dtype, "cpu")
    a = feature(3, 4, lmax=2, dtype=dtype).requires_grad_()
    for b in (feature(3, 4, lmax=1, dtype=dtype), feature(3, 1, lmax=1, dtype=dtype)):
        torch.library.opcheck(
            torch.ops.equikern.gaunt_grid_product.default, (a, b.requires_grad_(), pa, pb, pc, trig)
        )
    x = feature(5, lmax=2, dtype=dtype).requires_grad_()
    torch.library.opcheck(
        torch.ops.equikern.gaunt_grid_product.default,
        (a, feature(3, 4, lmax=2, dtype=dtype).requires_grad_(), pa, pa, pc, trig, True),
    )
    index, value = dense_plan(2, 1, 3, dtype, "cpu")
    for flat in (False, True):
        for b in (feature(3, 4, lmax=1, dtype=dtype), feature(3, 1, lmax=1, dtype=dtype)):
            b.requires_grad_()
            torch.library.opcheck(
                torch.ops.equikern.gaunt_dense_product.default, (a, b, index, value, 3, flat)
            )
            g = feature(3, 4, lmax=3, dtype=dtype).requires_grad_()
            torch.library.opcheck(
                torch.ops.equikern.gaunt_dense_backward.default, (g, a, b, index, value, flat)
            )
    torch.library.opcheck(torch.ops.equikern.gaunt_to_grid.default, (x, pa, trig))
    grid = ops.gaunt_to_grid(x.detach(), pa, trig).requires_grad_()
    torch.library.opcheck(torch.ops.equikern.gaunt_from_grid.default, (grid, pc, trig))


def test_empty_batch():
    out = gaunt_product(feature(0, 3, lmax=2), feature(0, 3, lmax=2), 2)
    assert out.shape == (0, 3, 9)


def test_bad_inputs():
    x = feature(2, 3, lmax=2)
    with pytest.raises(ValueError, match="x1: the last dimension"):
        gaunt_product(torch.randn(2, 3, 8, dtype=F64), x)
    with pytest.raises(ValueError, match="channel counts 3 and 2"):
        gaunt_product(x, feature(2, 2, lmax=1))
    with pytest.raises(ValueError, match="dtype"):
        gaunt_product(x, x.float())
    with pytest.raises(ValueError, match="method"):
        gaunt_product(x, x, method="fast")
    with pytest.raises(ValueError, match="lmax_out"):
        gaunt_product(x, x, -1)
    with pytest.raises(ValueError, match="nu"):
        gaunt_power(x, 0)
    with pytest.raises(ValueError, match="x1: expected a float32 or float64"):
        gaunt_product(x.long(), x)
    with pytest.raises(ValueError, match="irreps_in1: .*parity"):
        GauntTensorProduct("2x0e+2x1e", "2x0e", "2x0e")
    with pytest.raises(ValueError, match="irreps_in2: .*entry 1"):
        GauntTensorProduct("2x0e+2x1o", "2x0e+2x2e", "2x0e")
    with pytest.raises(ValueError, match="irreps_in1: .*same channel count"):
        GauntTensorProduct("2x0e+3x1o", "2x0e", "2x0e")
    with pytest.raises(ValueError, match="channel counts 2 and 3"):
        GauntTensorProduct("2x0e", "3x0e", "3x0e")
    with pytest.raises(ValueError, match="irreps_out: expected 2 channels"):
        GauntTensorProduct("2x0e", "1x0e", "1x0e")
    with pytest.raises(ValueError, match=r"x1: expected shape \[..., 2\]"):
        GauntTensorProduct("2x0e", "1x0e", "2x0e")(torch.randn(3, 5), torch.randn(3, 1))
    pa, pb, pc, trig = grid_plan((2, 2), 2, 6, F64, "cpu")
    with pytest.raises(RuntimeError, match="gaunt_grid_product: b must have 3 channels"):
        ops.gaunt_grid_product(x, feature(2, 2, lmax=2), pa, pb, pc, trig)
    with pytest.raises(RuntimeError, match="gaunt_grid_product: pb has 3 rings"):
        ops.gaunt_grid_product(x, x, pa, pb[:3], pc, trig)
    with pytest.raises(RuntimeError, match="gaunt_grid_product: pc must have"):
        ops.gaunt_grid_product(x, x, pa, pb, pc[:, :8], trig)
    with pytest.raises(RuntimeError, match="trig only covers"):
        ops.gaunt_grid_product(x, x, pa, pb, pc, trig[:, 1:-1])
    index, value = dense_plan(2, 2, 2, F64, "cpu")
    with pytest.raises(RuntimeError, match="gaunt_dense_product: lmax_out must be >= 0"):
        ops.gaunt_dense_product(x, x, index, value, -1)
    with pytest.raises(
        RuntimeError, match=r"gaunt_dense_product: index\[\d+, 0\] = \d+ is out of range for a"
    ):
        ops.gaunt_dense_product(feature(2, 3, lmax=1), x, index, value, 2)
    with pytest.raises(RuntimeError, match=r"is out of range for the output"):
        ops.gaunt_dense_product(x, x, index, value, 1)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: value has dtype"):
        ops.gaunt_dense_product(x, x, index, value.float(), 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: index must be a CPU int64"):
        ops.gaunt_dense_product(x, x, index.int(), value, 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: value has 3 entries"):
        ops.gaunt_dense_product(x, x, index, value[:3], 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_product: a must have"):
        ops.gaunt_dense_product(torch.randn(2, 3, 8, dtype=F64), x, index, value, 2)
    with pytest.raises(RuntimeError, match="gaunt_dense_backward: grad must be"):
        ops.gaunt_dense_backward(x[:, :2], x, x, index, value)
    with pytest.raises(RuntimeError, match="gaunt_to_grid: x has 4 coefficients"):
        ops.gaunt_to_grid(torch.randn(2, 4, dtype=F64), pa, trig)
    with pytest.raises(RuntimeError, match="gaunt_from_grid: grid must be"):
        ops.gaunt_from_grid(torch.randn(2, 3, 3, dtype=F64), pa, trig)
    with pytest.raises(RuntimeError, match="gaunt_to_grid: x has dtype"):
        ops.gaunt_to_grid(torch.randn(2, 9), pa, trig)
