"""SO(3) math in e3nn's real basis, where y is the polar axis and the l=1 irrep is the vector (x, y, z).

Everything is computed here (exact Clebsch-Gordan coefficients, then float64), so the package never needs
e3nn; the values match e3nn to float64 rounding, signs included.
"""

import functools
import importlib.util
import math
import operator
from fractions import Fraction

import numpy as np
import torch

__all__ = [
    "wigner_3j",
    "wigner_3j_sparse",
    "spherical_harmonics",
    "wigner_D",
    "rand_matrix",
    "sphere_quadrature",
]

_NORMALIZATIONS = ("integral", "component", "norm")
# CUDA tensors go to the generated Triton kernels when triton is installed (found here without importing it:
# `import equikern` must not need triton; a broken install then fails loudly at the first CUDA call).
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _nonneg_int(v, what: str) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {v!r}") from None
    if i < 0:
        raise ValueError(f"{what} must be >= 0, got {i}")
    return i


def _check_triangle(l1: int, l2: int, l3: int) -> tuple[int, int, int]:
    l1, l2, l3 = (_nonneg_int(v, name) for v, name in ((l1, "l1"), (l2, "l2"), (l3, "l3")))
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        raise ValueError(
            f"(l1, l2, l3) = ({l1}, {l2}, {l3}) violates the triangle rule |l1 - l2| <= l3 <= l1 + l2"
        )
    return l1, l2, l3


def _su2_cg(l1: int, m1: int, l2: int, m2: int, l3: int) -> float:
    """<l1 m1 l2 m2 | l3 m1+m2> (Condon-Shortley) by Racah's formula, exact up to the final square root."""
    f = math.factorial
    m3 = m1 + m2
    pref = Fraction((2 * l3 + 1) * f(l3 + l1 - l2) * f(l3 - l1 + l2) * f(l1 + l2 - l3), f(l1 + l2 + l3 + 1))
    pref *= f(l3 + m3) * f(l3 - m3) * f(l1 - m1) * f(l1 + m1) * f(l2 - m2) * f(l2 + m2)
    kmin = max(0, l2 - l3 - m1, l1 - l3 + m2)
    kmax = min(l1 + l2 - l3, l1 - m1, l2 + m2)
    s = Fraction(0)
    for k in range(kmin, kmax + 1):
        den = (
            f(k)
            * f(l1 + l2 - l3 - k)
            * f(l1 - m1 - k)
            * f(l2 + m2 - k)
            * f(l3 - l2 + m1 + k)
            * f(l3 - l1 - m2 + k)
        )
        s += Fraction((-1) ** k, den)
    # the coefficient is s * sqrt(pref); square it exactly so only one rounding (the sqrt) happens
    return math.copysign(math.sqrt(s * s * pref), s)


def _complex_from_real(l: int) -> np.ndarray:
    """e3nn's change of basis: Q[complex m, real m], including its (-i)^l factor that makes the 3j real."""
    q = np.zeros((2 * l + 1, 2 * l + 1), dtype=np.complex128)
    r = 1 / math.sqrt(2)
    for m in range(1, l + 1):
        q[l - m, l + m] = r
        q[l - m, l - m] = -1j * r
        q[l + m, l + m] = (-1) ** m * r
        q[l + m, l - m] = 1j * (-1) ** m * r
    q[l, l] = 1
    return (-1j) ** l * q


@functools.cache
def _wigner_3j_np(l1: int, l2: int, l3: int) -> np.ndarray:
    cg = np.zeros((2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1))
    for m1 in range(-l1, l1 + 1):
        for m2 in range(max(-l2, -l3 - m1), min(l2, l3 - m1) + 1):
            cg[l1 + m1, l2 + m2, l3 + m1 + m2] = _su2_cg(l1, m1, l2, m2, l3)
    q1, q2, q3 = _complex_from_real(l1), _complex_from_real(l2), _complex_from_real(l3).conj()
    c = np.einsum("ia,kb,nc,ikn->abc", q1, q2, q3, cg, optimize=True)
    assert np.abs(c.imag).max() < 1e-10
    c = np.ascontiguousarray(c.real)
    # Entries that vanish exactly come out as rounding residue of the complex->real sums; zero them so that
    # the sparsity pattern is exact. Cancellations are between equal-magnitude terms, hence the relative test.
    bound = np.einsum("ia,kb,nc,ikn->abc", abs(q1), abs(q2), abs(q3), abs(cg), optimize=True)
    c[np.abs(c) <= 1e-12 * bound] = 0.0
    c /= np.linalg.norm(c)
    c.flags.writeable = False
    return c


def wigner_3j(l1: int, l2: int, l3: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Real Wigner 3j tensor [2l1+1, 2l2+1, 2l3+1] in e3nn's basis with unit Frobenius norm, as e3nn's."""
    c = _wigner_3j_np(*_check_triangle(l1, l2, l3))
    return torch.tensor(c, dtype=dtype, device=device)


def wigner_3j_sparse(l1: int, l2: int, l3: int) -> tuple[np.ndarray, np.ndarray]:
    """Nonzeros of `wigner_3j`: (ijk int64 [nnz, 3], values float64 [nnz]) in row-major order."""
    c = _wigner_3j_np(*_check_triangle(l1, l2, l3))
    ijk = np.argwhere(np.abs(c) > 1e-14).astype(np.int64)
    return ijk, c[tuple(ijk.T)].copy()


@functools.cache
def _sh_step_np(l: int) -> tuple[np.ndarray, np.ndarray]:
    """(M_l, Y_{l+1}(e_y)) with Y_{l+1}(x) = (Y_l(x) outer x).flatten() @ M_l, 'component' normalisation.

    The scale of M_l is positive and makes |Y_{l+1}| = sqrt(2l+3) on the sphere, which is how e3nn generated
    its polynomials from wigner_3j(l+1, 1, l), so signs agree with e3nn.
    """
    y_axis = np.array([0.0, 1.0, 0.0])
    y_l = math.sqrt(3) * y_axis if l == 1 else _sh_step_np(l - 1)[1]
    m = _wigner_3j_np(l + 1, 1, l).transpose(2, 1, 0).reshape(3 * (2 * l + 1), 2 * l + 3)
    y_next = np.outer(y_l, y_axis).reshape(-1) @ m
    scale = math.sqrt(2 * l + 3) / np.linalg.norm(y_next)
    return m * scale, y_next * scale


_SH_MATRICES: dict = {}


@torch.compiler.assume_constant_result
def _sh_matrices(lmax: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    # assume_constant_result: under torch.compile the (possibly cold) cache is run at trace time and its
    # tensors become graph constants, instead of Dynamo tracing the exact-arithmetic build.
    key = (lmax, dtype, device)
    mats = _SH_MATRICES.get(key)
    if mats is None:
        with torch.inference_mode(False):  # cached for later calls, in inference mode or not
            mats = tuple(torch.tensor(_sh_step_np(l)[0], dtype=dtype, device=device) for l in range(1, lmax))
        _SH_MATRICES[key] = mats
    return mats


def _sh_blocks(lmax: int, x: torch.Tensor) -> list[torch.Tensor]:
    """[Y_0(x), ..., Y_lmax(x)], 'component' normalisation, homogeneous polynomials of x."""
    ys = [torch.ones_like(x[..., :1])]
    if lmax >= 1:
        ys.append(math.sqrt(3) * x)
    for m in _sh_matrices(lmax, x.dtype, x.device):
        ys.append((ys[-1].unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) @ m)
    return ys


def _sh_degrees(ls) -> tuple[int, ...]:
    """The list of l that e3nn's spherical_harmonics would produce for ``ls``, with e3nn's parity check."""
    if isinstance(ls, (int, np.integer)):
        return (_nonneg_int(ls, "l"),)
    if not isinstance(ls, str):
        ls = tuple(ls)
    if isinstance(ls, tuple) and ls and all(isinstance(l, (int, np.integer)) for l in ls):
        out = tuple(_nonneg_int(l, "l") for l in ls)
    else:
        from equikern.irreps import as_irreps

        irreps = as_irreps(ls)
        # as e3nn: an odd l with p = +1 (even with mul 0) means a pseudovector input, for which every p
        # must be +1; otherwise the input is a vector and p must be (-1)^l
        p_in = 1 if any(ir.l % 2 == 1 and ir.p == 1 for _, ir in irreps) else -1
        for _, ir in irreps:
            if ir.p != p_in**ir.l:
                raise ValueError(
                    f"spherical_harmonics: irreps {irreps} must have p = (-1)^l for every l (vector input, "
                    f"e.g. '0e+1o+2e') or p = +1 for every l (pseudovector input, e.g. '0e+1e+2e'); "
                    f"{ir} breaks this"
                )
        out = tuple(ir.l for mul, ir in irreps for _ in range(mul))
    if not out:
        raise ValueError(f"spherical_harmonics needs at least one l, got {ls!r}")
    return out


def spherical_harmonics(
    ls, x: torch.Tensor, normalize: bool, normalization: str = "integral"
) -> torch.Tensor:
    """Real spherical harmonics, same signature, values and layout as ``e3nn.o3.spherical_harmonics``.

    ``ls`` is an int, a list of ints (repeats allowed, in any order) or irreps ("0e+1o+2x2e", an Irreps) whose
    parities are all (-1)^l or all +1. Output [..., sum(2l+1)]. ``normalize=False`` gives the homogeneous
    polynomials of x, for any x; ``normalize=True`` projects x on the sphere first (zero x: Y_0 and zeros).

    CUDA tensors are computed by the Triton kernels of :mod:`equikern.triton.spherical_harmonics` when
    triton is installed (same values; derivatives of any order are Triton kernels too); CPU tensors by torch.
    """
    if _HAVE_TRITON and isinstance(x, torch.Tensor) and x.is_cuda:
        from equikern.triton.spherical_harmonics import spherical_harmonics as triton_spherical_harmonics

        return triton_spherical_harmonics(ls, x, normalize, normalization)
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if x.shape[-1:] != (3,):
        raise ValueError(f"spherical_harmonics expects x of shape [..., 3], got {tuple(x.shape)}")
    degrees = _sh_degrees(ls)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    ys = _sh_blocks(max(degrees), x)
    out = []
    for l in degrees:
        if normalization == "integral":
            out.append(ys[l] * (1 / math.sqrt(4 * math.pi)))
        elif normalization == "norm":
            out.append(ys[l] * (1 / math.sqrt(2 * l + 1)))
        else:
            out.append(ys[l])
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


@functools.cache
def _quadrature_np(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    # A polynomial of degree <= lmax on the sphere is a trigonometric polynomial of degree <= lmax in phi,
    # which lmax + 1 uniform phi samples integrate exactly; what is left is a polynomial of degree <= lmax in
    # cos(theta), which needs lmax // 2 + 1 Gauss-Legendre nodes.
    cos_t, w_t = np.polynomial.legendre.leggauss(lmax // 2 + 1)
    n_phi = lmax + 1
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    sin_t = np.sqrt(1 - cos_t**2)
    points = np.stack(
        [
            np.outer(sin_t, np.sin(phi)).ravel(),
            np.repeat(cos_t, n_phi),
            np.outer(sin_t, np.cos(phi)).ravel(),
        ],
        axis=-1,
    )
    weights = np.repeat(w_t * (2 * np.pi / n_phi), n_phi)
    points.flags.writeable = False
    weights.flags.writeable = False
    return points, weights


def sphere_quadrature(lmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [N, 3], weights [N]) float64 on the unit sphere, exact for polynomials of degree <= lmax.

    Gauss-Legendre in cos(theta) (theta from the y axis) times a uniform grid in phi; weights sum to 4 pi.
    """
    points, weights = _quadrature_np(_nonneg_int(lmax, "lmax"))
    return torch.tensor(points), torch.tensor(weights)


@functools.cache
def _wigner_D_basis_np(l: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature points P and B = w * Y_l(P) ('integral'), so that D = Y_l(R P)^T @ B by orthonormality."""
    points, weights = _quadrature_np(2 * l)
    y = spherical_harmonics(l, torch.tensor(points), False).numpy()
    return points, weights[:, None] * y


def wigner_D(l: int, R: torch.Tensor) -> torch.Tensor:
    """Wigner D [..., 2l+1, 2l+1] of rotation matrices R [..., 3, 3]: Y_l(R x) = D Y_l(x), in e3nn's basis.

    For an improper R it is still the matrix with Y_l(R x) = D Y_l(x), i.e. (-1)^l D(-R).
    """
    l = _nonneg_int(l, "l")
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"wigner_D expects R of shape [..., 3, 3], got {tuple(R.shape)}")
    points, basis = _wigner_D_basis_np(l)
    rp = torch.tensor(points, dtype=R.dtype, device=R.device) @ R.transpose(-1, -2)
    y = spherical_harmonics(l, rp, False)
    return y.transpose(-1, -2) @ torch.tensor(basis, dtype=R.dtype, device=R.device)


def rand_matrix(
    *shape: int, dtype: torch.dtype = torch.float64, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform (Haar) random rotation matrices [*shape, 3, 3], from normalised Gaussian quaternions."""
    q = torch.randn(*shape, 4, dtype=dtype, device=device, generator=generator)
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)
