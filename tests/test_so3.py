"""so3 (wigner_3j, spherical_harmonics, wigner_D, quadrature) against e3nn (the oracle) and identities."""

import itertools
import math
import random

import numpy as np
import pytest
import torch
from e3nn import o3

from equikern import so3
from equikern.irreps import Irreps


def _triples(lmax):
    return [
        t for t in itertools.product(range(lmax + 1), repeat=3) if abs(t[0] - t[1]) <= t[2] <= t[0] + t[1]
    ]


def test_wigner_3j_matches_e3nn_exhaustive():
    for l1, l2, l3 in _triples(6):
        ours = so3.wigner_3j(l1, l2, l3)
        ref = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        assert ours.dtype == torch.float64 and ours.shape == ref.shape
        assert (ours - ref).abs().max() < 1e-12, (l1, l2, l3)
        # rounding residue is cleaned up: exact zeros where e3nn has (numerically) zeros
        assert torch.equal(ours != 0, ref.abs() > 1e-12), (l1, l2, l3)


@pytest.mark.parametrize(
    "l1, l2, l3", [(8, 8, 8), (10, 10, 10), (10, 3, 9), (7, 10, 4), (1, 10, 10), (10, 10, 0)]
)
def test_wigner_3j_matches_e3nn_large(l1, l2, l3):
    ours = so3.wigner_3j(l1, l2, l3)
    ref = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
    assert (ours - ref).abs().max() < 1e-12


def test_wigner_3j_dtype_and_copy():
    c = so3.wigner_3j(2, 1, 1, dtype=torch.float32)
    assert c.dtype == torch.float32 and c.is_contiguous()
    c.zero_()
    assert so3.wigner_3j(2, 1, 1).abs().sum() > 0
    assert so3.wigner_3j(2, 2, 2).norm().item() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("l1, l2, l3", _triples(4))
def test_wigner_3j_sparse(l1, l2, l3):
    dense = so3.wigner_3j(l1, l2, l3).numpy()
    ijk, val = so3.wigner_3j_sparse(l1, l2, l3)
    assert ijk.dtype == np.int64 and val.dtype == np.float64 and ijk.shape == (len(val), 3)
    np.testing.assert_array_equal(ijk, np.argwhere(np.abs(dense) > 1e-14))  # row-major
    np.testing.assert_array_equal(val, dense[tuple(ijk.T)])


@pytest.mark.parametrize("args", [(1, 1, 3), (0, 2, 1), (-1, 1, 0), (1.0, 1, 1), (5, 2, 2)])
def test_wigner_3j_rejects_bad_l(args):
    with pytest.raises(ValueError):
        so3.wigner_3j(*args)
    with pytest.raises(ValueError):
        so3.wigner_3j_sparse(*args)


@pytest.mark.parametrize("l1, l2, l3", _triples(4))
def test_wigner_3j_equivariance_and_orthogonality(l1, l2, l3):
    R = so3.rand_matrix(2, generator=torch.Generator().manual_seed(l1 * 25 + l2 * 5 + l3))
    D1, D2, D3 = so3.wigner_D(l1, R), so3.wigner_D(l2, R), so3.wigner_D(l3, R)
    C = so3.wigner_3j(l1, l2, l3)
    rotated = torch.einsum("ijk,zil,zjm,zkn->zlmn", C, D1, D2, D3)
    torch.testing.assert_close(rotated, C.expand_as(rotated), rtol=0, atol=1e-12)
    # sum_ij C_ijk C_ijn = delta_kn / (2 l3 + 1)
    gram = torch.einsum("ijk,ijn->kn", C, C)
    torch.testing.assert_close(gram, torch.eye(2 * l3 + 1, dtype=C.dtype) / (2 * l3 + 1), rtol=0, atol=1e-13)


def _random_ls(rng):
    return [rng.randint(0, 12) for _ in range(rng.randint(1, 5))]


def _assert_sh_close(ours, ref, ls, rtol):
    """Compare block by block, relative to the norm of each block of each sample (Y_l scales as |x|^l)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    start = 0
    for l in ls:
        a, b = ours[..., start : start + 2 * l + 1], ref[..., start : start + 2 * l + 1]
        scale = b.double().norm(dim=-1, keepdim=True)
        err = (a.double() - b.double()).abs()
        assert (err <= rtol * scale + 1e-30).all(), (l, (err / scale).max().item())
        start += 2 * l + 1
    assert start == ours.shape[-1]


SH_CASES = [
    (_random_ls(random.Random(seed)), normalization, normalize, shape, dtype)
    for seed, (normalization, normalize, (shape, dtype)) in enumerate(
        itertools.product(
            ["integral", "component", "norm"],
            [True, False],
            [((7,), torch.float64), ((2, 3, 4), torch.float64), ((), torch.float32), ((5, 6), torch.float32)],
        )
    )
]


@pytest.mark.parametrize("ls, normalization, normalize, shape, dtype", SH_CASES)
def test_spherical_harmonics_match_e3nn(ls, normalization, normalize, shape, dtype):
    gen = torch.Generator().manual_seed(len(ls) * 100 + sum(ls))
    x = torch.randn(*shape, 3, dtype=torch.float64, generator=gen) * 1.5
    x = x.to(dtype)
    ours = so3.spherical_harmonics(ls, x, normalize, normalization)
    ref = o3.spherical_harmonics(ls, x, normalize, normalization=normalization)
    _assert_sh_close(ours, ref, ls, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize(
    "irreps", ["0e+1o+2e+3o", "1o", "1e", "1e+2e+3e", "2x1o+0x3o+5o+0e", Irreps("12e+7o")]
)
def test_spherical_harmonics_irreps_like_e3nn(irreps):
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = so3.spherical_harmonics(irreps, x, True)
    ref = o3.spherical_harmonics(o3.Irreps(str(irreps)), x, True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(so3.spherical_harmonics(o3.Irreps(str(irreps)), x, True), ours, rtol=0, atol=0)


@pytest.mark.parametrize("irreps", ["2o", "0o", "1o+1e", "2x1o+0x3e", "1e+2o"])
def test_spherical_harmonics_rejects_irreps_like_e3nn(irreps):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError):
        o3.spherical_harmonics(irreps, x, True)
    with pytest.raises(ValueError, match=r"p = \(-1\)\^l for every l"):
        so3.spherical_harmonics(irreps, x, True)


def test_spherical_harmonics_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="normalization"):
        so3.spherical_harmonics(2, x, True, "unit")
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        so3.spherical_harmonics(2, torch.randn(4, 2), True)
    with pytest.raises(ValueError, match="at least one l"):
        so3.spherical_harmonics([], x, True)
    with pytest.raises(ValueError, match=">= 0"):
        so3.spherical_harmonics([1, -1], x, True)


def test_spherical_harmonics_zero_vector():
    x = torch.zeros(2, 3, dtype=torch.float64)
    for normalize in (True, False):
        ours = so3.spherical_harmonics([0, 1, 2, 3], x, normalize)
        ref = o3.spherical_harmonics([0, 1, 2, 3], x, normalize)
        assert not ours.isnan().any()
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_spherical_harmonics_accepts_numpy_ints_and_irreps_string():
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = so3.spherical_harmonics(np.arange(3), x, False)
    b = so3.spherical_harmonics("0e+1o+2e", x, False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_gradcheck(normalize):
    ls = [0, 1, 2, 5, 12] if normalize else [3, 7]
    x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    fn = lambda x: so3.spherical_harmonics(ls, x, normalize, "component")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_spherical_harmonics_third_derivative_matches_e3nn():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(4, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def d3(sh):
        (g,) = torch.autograd.grad((w * sh(x)).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g[:, 0].sum(), x, create_graph=True)
        (t,) = torch.autograd.grad(h[:, 1].sum(), x)
        return t

    ours = d3(lambda x: so3.spherical_harmonics(5, x, True))
    ref = d3(lambda x: o3.spherical_harmonics(5, x, True))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_spherical_harmonics_torch_compile():
    so3._SH_MATRICES.clear()  # the matrices must also be built while tracing, not only looked up

    def fn(x):
        a = so3.spherical_harmonics([0, 3, 12, 1, 1], x, True, "norm")
        b = so3.spherical_harmonics(Irreps("0e+2x1o+5o"), x, False, "integral")
        return torch.cat([a, b], dim=-1)

    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("l", [0, 1, 2, 5, 12])
def test_spherical_harmonics_equivariance(l):
    gen = torch.Generator().manual_seed(l)
    R = so3.rand_matrix(3, generator=gen)
    x = torch.randn(3, 4, 3, dtype=torch.float64, generator=gen)
    rx = torch.einsum("zij,znj->zni", R, x)
    D = so3.wigner_D(l, R)
    lhs = so3.spherical_harmonics(l, rx, False)
    rhs = torch.einsum("zij,znj->zni", D, so3.spherical_harmonics(l, x, False))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10 * lhs.abs().max().item())


@pytest.mark.parametrize("l", [0, 1, 2, 3, 6, 8])
def test_wigner_D_matches_e3nn(l, float64_default):
    R = so3.rand_matrix(4, generator=torch.Generator().manual_seed(10 + l))
    torch.testing.assert_close(so3.wigner_D(l, R), o3.Irrep(l, 1).D_from_matrix(R), rtol=0, atol=1e-10)


@pytest.mark.parametrize("l", [0, 1, 3, 4])
def test_wigner_D_properties(l):
    gen = torch.Generator().manual_seed(20 + l)
    R1, R2 = so3.rand_matrix(2, 5, generator=gen)
    D1, D2 = so3.wigner_D(l, R1), so3.wigner_D(l, R2)
    eye = torch.eye(2 * l + 1, dtype=torch.float64)
    torch.testing.assert_close(so3.wigner_D(l, R1 @ R2), D1 @ D2, rtol=0, atol=1e-12)
    torch.testing.assert_close(D1 @ D1.transpose(-1, -2), eye.expand_as(D1), rtol=0, atol=1e-12)
    torch.testing.assert_close(so3.wigner_D(l, torch.eye(3, dtype=torch.float64)), eye, rtol=0, atol=1e-13)
    # improper: Y_l(-x) = (-1)^l Y_l(x)
    torch.testing.assert_close(so3.wigner_D(l, -R1), (-1) ** l * D1, rtol=0, atol=1e-12)
    assert so3.wigner_D(l, R1.float()).dtype == torch.float32


def test_rand_matrix():
    R = so3.rand_matrix(4, 3, generator=torch.Generator().manual_seed(0))
    assert R.shape == (4, 3, 3, 3) and R.dtype == torch.float64
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(R))
    torch.testing.assert_close(torch.det(R), torch.ones(4, 3, dtype=torch.float64))
    again = so3.rand_matrix(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(R, again)
    assert so3.rand_matrix(2, dtype=torch.float32).dtype == torch.float32


def _monomial_integral(a, b, c):
    if a % 2 or b % 2 or c % 2:
        return 0.0
    g = math.gamma
    return 2 * g((a + 1) / 2) * g((b + 1) / 2) * g((c + 1) / 2) / g((a + b + c + 3) / 2)


@pytest.mark.parametrize("lmax", [0, 1, 2, 5, 8, 11])
def test_sphere_quadrature_monomials(lmax):
    points, weights = so3.sphere_quadrature(lmax)
    assert points.dtype == weights.dtype == torch.float64 and points.shape == (len(weights), 3)
    assert weights.sum().item() == pytest.approx(4 * math.pi, rel=1e-14)
    torch.testing.assert_close(points.norm(dim=-1), torch.ones(len(weights), dtype=torch.float64))
    x, y, z = points.unbind(-1)
    for a, b, c in itertools.product(range(lmax + 1), repeat=3):
        if a + b + c <= lmax:
            got = (weights * x**a * y**b * z**c).sum().item()
            assert got == pytest.approx(_monomial_integral(a, b, c), abs=1e-13), (a, b, c)


@pytest.mark.parametrize("lmax", [3, 6])
def test_sphere_quadrature_orthonormal_harmonics(lmax):
    points, weights = so3.sphere_quadrature(2 * lmax)
    Y = so3.spherical_harmonics(list(range(lmax + 1)), points, False, "integral")
    gram = Y.T @ (weights[:, None] * Y)
    torch.testing.assert_close(gram, torch.eye(Y.shape[1], dtype=torch.float64), rtol=0, atol=1e-12)
