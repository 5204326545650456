"""Gaunt tensor products: products of functions on the sphere given by real spherical-harmonic coefficients.

A feature [..., C, (L+1)^2] holds per channel c the coefficients x[c, lm] (e3nn's order and real basis,
'integral' normalisation) of f_c = sum x[c, lm] Y_lm. The Gaunt product returns the coefficients of f_c g_c
up to lmax_out: the CG product restricted to the paths l1 + l2 + l3 even, weighted by the Gaunt coefficients
G = integral Y_l1m1 Y_l2m2 Y_l3m3 (see :func:`gaunt_coefficients`).

Methods:

- ``grid``: values on a Gauss-Legendre x uniform-phi grid exact for degree L1 + L2 + lmax_out, multiplied
  pointwise and projected back, in one fused op that never holds the grid (O(L^3) per channel).
- ``fourier``: the paper's method (Luo et al., ICLR 2024): coefficients in the 2D Fourier basis
  e^{i(u theta + v phi)}, product by FFT convolution, back by the exact projection. Plain torch.
- ``dense``: the direct contraction with the nonzero Gaunt coefficients (O(L^5) entries, but few at small
  L: 83 at L1 = L2 = Lout = 2), in one C++ op with a fused backward.
- ``auto``: whichever of ``grid`` and ``dense`` :func:`choose_method` predicts to be faster (a cost model
  calibrated on the CPU, see there).

The C++ ops read e3nn's flat layout directly (``flat=True``), which is how
:class:`equikern.nn.GauntTensorProduct` calls them: no gathers between layouts.

Plans (grid factors, conversion matrices, Gaunt tensors) are computed on first use and cached.
"""

import functools
import math

import numpy as np
import torch
from torch import Tensor

from equikern.ops import gaunt as _ops  # also registers the fake kernels and autograd
from equikern.so3 import sphere_quadrature, spherical_harmonics

METHODS = ("auto", "grid", "fourier", "dense")


def _sh(lmax: int, points: np.ndarray) -> np.ndarray:
    """Y_0..Y_lmax ('integral') at points [..., 3], float64, as polynomials (the points need not be unit)."""
    return spherical_harmonics(list(range(lmax + 1)), torch.tensor(points), False).numpy()


def _m_of(lmax: int) -> np.ndarray:
    """m of every coefficient lm in e3nn's order."""
    return np.concatenate([np.arange(-l, l + 1) for l in range(lmax + 1)])


def _trig(phi: np.ndarray, mmax: int) -> np.ndarray:
    """[len(phi), 2 mmax + 1]: cos(m phi) for m >= 0, sin(|m| phi) for m < 0 (column m + mmax)."""
    m = np.arange(-mmax, mmax + 1)
    return np.where(m >= 0, np.cos(np.outer(phi, m)), np.sin(np.outer(phi, -m)))


def _ring_points(cos_t: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """[rings, len(phi), 3] points (theta from the y axis, as so3.sphere_quadrature)."""
    sin_t = np.sqrt(np.clip(1 - cos_t**2, 0, None))
    return np.stack(
        [np.outer(sin_t, np.sin(phi)), np.repeat(cos_t[:, None], len(phi), 1), np.outer(sin_t, np.cos(phi))],
        axis=-1,
    )


@functools.cache
def _grid_np(degree: int, lmaxes: tuple[int, ...]) -> tuple:
    """Grid exact for polynomials of ``degree``: (trig [n_phi, 2 mmax + 1], weights [n_theta], P per lmax).

    Y_lm(theta_t, phi) = P[t, lm] trig(phi, m): P is read off by projecting each ring onto cos/sin on an
    auxiliary ring fine enough for every m, then checked on the grid itself.
    """
    points, weights = (v.numpy() for v in sphere_quadrature(degree))
    n_phi = degree + 1
    n_theta = points.shape[0] // n_phi
    cos_t = points[::n_phi, 1]
    ring_weights = weights[::n_phi]  # per point; uniform in phi
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    mmax = max(lmaxes)
    trig = _trig(phi, mmax)
    # sin(m phi) at phi = 0 and pi is zero; make it exactly so (the kernel relies on it)
    trig[(np.arange(n_phi) == 0) | (2 * np.arange(n_phi) == n_phi), :mmax] = 0.0
    n_aux = 2 * mmax + 1
    psi = 2 * np.pi * np.arange(n_aux) / n_aux
    aux_trig = _trig(psi, mmax)
    norms = np.where(np.arange(-mmax, mmax + 1) == 0, 1 / n_aux, 2 / n_aux)
    legendre = {}
    for lmax in set(lmaxes):
        y = _sh(lmax, _ring_points(cos_t, psi))  # [n_theta, n_aux, d]
        cols = _m_of(lmax) + mmax
        p = np.einsum("tki,ki->ti", y, aux_trig[:, cols]) * norms[cols]
        check = _sh(lmax, points.reshape(n_theta, n_phi, 3))
        assert np.abs(p[:, None, :] * trig[None][:, :, cols] - check).max() < 1e-10
        legendre[lmax] = p
    return trig, ring_weights, legendre


_PLANS: dict = {}


def grid_plan(lmaxes: tuple[int, ...], lmax_out: int, degree: int, dtype: torch.dtype, device) -> tuple:
    """(P per input lmax, P_out with the quadrature weights folded in, trig) as tensors of dtype/device."""
    key = (lmaxes, lmax_out, degree, dtype, torch.device(device))
    plan = _PLANS.get(key)
    if plan is None:
        trig, weights, legendre = _grid_np(degree, (*lmaxes, lmax_out))

        def t(a):
            return torch.tensor(a, dtype=dtype, device=device)

        with torch.inference_mode(False):  # cached for later calls, in inference mode or not
            plan = tuple(t(legendre[l]) for l in lmaxes) + (t(weights[:, None] * legendre[lmax_out]), t(trig))
        _PLANS[key] = plan
    return plan


@functools.cache
def _gaunt_np(l1: int, l2: int, l3: int) -> np.ndarray:
    points, weights = (v.numpy() for v in sphere_quadrature(l1 + l2 + l3))
    y1, y2, y3 = _sh(l1, points), _sh(l2, points), _sh(l3, points)
    g = np.einsum("q,qi,qj,qk->ijk", weights, y1, y2, y3, optimize=True)
    g[np.abs(g) < 1e-13] = 0.0
    g.flags.writeable = False
    return g


def gaunt_coefficients(l1: int, l2: int, l3: int, lmax: bool = False) -> Tensor:
    """Gaunt coefficients integral(Y_l1m1 Y_l2m2 Y_l3m3) over the sphere, float64 [2l1+1, 2l2+1, 2l3+1].

    With ``lmax=True`` the degrees are maxima and the tensor covers all degrees 0..l:
    [(l1+1)^2, (l2+1)^2, (l3+1)^2].
    """
    g = _gaunt_np(l1, l2, l3)
    if not lmax:
        g = g[l1**2 :, l2**2 :, l3**2 :]
    return torch.tensor(g)


@functools.cache
def _dense_np(l1: int, l2: int, l3: int) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero Gaunt coefficients as (index [nnz, 3] = (i, j, k), value [nnz]), grouped by k."""
    g = _gaunt_np(l1, l2, l3)
    index = np.argwhere(g)
    index = index[np.lexsort((index[:, 1], index[:, 0], index[:, 2]))]
    return index, g[tuple(index.T)]


def dense_plan(l1: int, l2: int, lmax_out: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(index, value) of the nonzero Gaunt coefficients for degrees up to l1, l2 -> lmax_out, as tensors."""
    key = ("dense", l1, l2, lmax_out, dtype, torch.device(device))
    plan = _PLANS.get(key)
    if plan is None:
        index, value = _dense_np(l1, l2, lmax_out)
        with torch.inference_mode(False):  # cached for later calls, in inference mode or not
            plan = (
                torch.tensor(index, dtype=torch.int64, device=device),
                torch.tensor(value, dtype=dtype, device=device),
            )
        _PLANS[key] = plan
    return plan


def _grid_work(l1: int, l2: int, lout: int) -> int:
    """Multiply-adds per row of the fused grid product: Legendre steps on every ring, phi steps on half."""
    degree = l1 + l2 + lout
    n_phi, n_theta = degree + 1, degree // 2 + 1
    legendre = n_theta * ((l1 + 1) ** 2 + (l2 + 1) ** 2 + (lout + 1) ** 2)
    phi = n_theta * (n_phi // 2 + 1) * (2 * (l1 + l2 + lout) + 3)
    return legendre + phi


# Cost of a dense entry relative to a grid multiply-add on the CPU, per dtype (see choose_method).
DENSE_ENTRY_COST = {torch.float32: 0.7, torch.float64: 0.95}
# The same on a GPU: an estimate, not yet measured. Both CUDA kernels are bound by shared-memory loads;
# a dense entry makes four (two operands, the packed indices and the coefficient), a grid multiply-add
# two (the operand and a table entry).
DENSE_ENTRY_COST_CUDA = {torch.float32: 2.0, torch.float64: 2.0}


@functools.cache
def choose_method(
    l1: int, l2: int, lmax_out: int, dtype: torch.dtype = torch.float32, device_type: str = "cpu"
) -> str:
    """The method "auto" runs: "dense" when its entries cost less than the grid's multiply-adds.

    Both costs are per row (one channel of one sample) and both kernels run over the same blocks of rows,
    so the choice does not depend on N or C. Measured with both forward ops on the flat layout (N = 1000,
    C = 32, medians of interleaved runs, 2-core AMD EPYC, 2026-11-23) over 41 degree triples with l1 <= 8,
    l2 in {1, 2, l1}, lmax_out in {l1, l1 + l2}: dense is 0.3x to 0.8x the grid's time up to
    entries / multiply-adds = 0.93 ((5, 5, 8)) in both dtypes. Beyond, float32 dense stays ahead at 1.20
    ((6, 6, 6): 10.0 vs 11.8 ms through the module) and 1.32 ((6, 6, 8): 0.96x) and falls behind from 1.60
    ((7, 7, 7): 1.1x to 1.3x; (8, 8, 8): 1.5x); float64 dense falls behind already at 1.20 ((6, 6, 6):
    18.5 vs 16.0 ms). Each threshold sits between its last win and first loss. On a GPU
    (``device_type="cuda"``) the costs are DENSE_ENTRY_COST_CUDA, an estimate to be replaced by a measurement.
    """
    nnz = len(_dense_np(l1, l2, lmax_out)[1])
    costs = DENSE_ENTRY_COST_CUDA if device_type == "cuda" else DENSE_ENTRY_COST
    cost = costs.get(dtype, costs[torch.float32])
    return "dense" if cost * nnz <= _grid_work(l1, l2, lmax_out) else "grid"


@functools.cache
def _fourier_np(l1: int, l2: int, lmax_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F1 [d1, S1, S1], F2, B [Sh^2, d_out]) complex: Y = sum F[u, v] e^{i(u theta + v phi)} on the torus.

    The product of two such series is their 2D convolution; B projects a series onto Y_lm over the sphere
    (theta in [0, pi]), exactly: integral e^{i k theta} over [0, pi] is pi (k = 0) or 2i/k (k odd) or 0.
    """

    def series(lmax: int, extra: int) -> np.ndarray:
        s = 2 * (lmax + extra) + 1
        ang = 2 * np.pi * np.arange(s) / s
        theta, phi = np.meshgrid(ang, ang, indexing="ij")
        pts = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)
        y = _sh(lmax, pts) * (np.sin(theta)[..., None] if extra else 1.0)
        f = np.fft.fftshift(np.fft.fft2(y, axes=(0, 1)), axes=(0, 1)) / s**2
        return np.moveaxis(f, -1, 0)

    lh = l1 + l2
    g = series(lmax_out, 1)  # of Y sin(theta): |u| <= lmax_out + 1, |v| <= lmax_out + 1
    lg = lmax_out + 1
    k = np.arange(-lh, lh + 1)[:, None] + np.arange(-lg, lg + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        integral = np.where(k == 0, np.pi, np.where(k % 2 == 1, 2j / k, 0))
    b = np.zeros((2 * lh + 1, 2 * lh + 1, g.shape[0]), dtype=np.complex128)
    for v in range(-min(lh, lg), min(lh, lg) + 1):
        b[:, v + lh, :] = 2 * np.pi * integral @ g[:, :, -v + lg].T
    return series(l1, 0), series(l2, 0), b.reshape(-1, g.shape[0])


def _degree(d: int, name: str) -> int:
    l = math.isqrt(d) - 1
    if d < 1 or (l + 1) ** 2 != d:
        raise ValueError(f"{name}: the last dimension must be (L+1)^2 (degrees 0..L), got {d}")
    return l


def _check_feature(x, name: str) -> int:
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float64):
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a float32 or float64 tensor, got {got}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected shape [..., C, (L+1)^2], got {tuple(x.shape)}")
    return _degree(x.shape[-1], name)


def _check_lmax_out(lmax_out, default: int) -> int:
    if lmax_out is None:
        return default
    if not isinstance(lmax_out, int) or isinstance(lmax_out, bool) or lmax_out < 0:
        raise ValueError(f"lmax_out: expected an int >= 0, got {lmax_out!r}")
    return lmax_out


def gaunt_product(x1: Tensor, x2: Tensor, lmax_out: int | None = None, method: str = "auto") -> Tensor:
    """Coefficients up to lmax_out (default L1 + L2, exact) of f_c g_c for x1 [..., C, (L1+1)^2] and
    x2 [..., C or 1, (L2+1)^2] (one channel is shared by all); leading dims broadcast.
    """
    l1, l2 = _check_feature(x1, "x1"), _check_feature(x2, "x2")
    lout = _check_lmax_out(lmax_out, l1 + l2)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if x1.dtype != x2.dtype:
        raise ValueError(f"x2: dtype {x2.dtype} differs from x1's {x1.dtype}")
    if x1.device != x2.device:
        raise ValueError(f"x2: device {x2.device} differs from x1's {x1.device}")
    c1, c2 = x1.shape[-2], x2.shape[-2]
    if c1 != c2 and 1 not in (c1, c2):
        raise ValueError(f"x1, x2: channel counts {c1} and {c2} differ and neither is 1")
    if c1 == 1 and c2 != 1:  # the product commutes; the kernel shares its second operand
        x1, x2, l1, l2, c1, c2 = x2, x1, l2, l1, c2, c1
    try:
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    except RuntimeError as e:
        raise ValueError(
            f"x1, x2: leading dims {tuple(x1.shape)} and {tuple(x2.shape)} do not broadcast"
        ) from e
    rows = math.prod(batch)  # explicit: reshape(-1, ...) is ambiguous when C = 0
    a = x1.expand(batch + x1.shape[-2:]).reshape(rows, c1, x1.shape[-1])
    b = x2.expand(batch + x2.shape[-2:]).reshape(rows, c2, x2.shape[-1])
    out = product(a, b, l1, l2, lout, method)
    return out.reshape(batch + (c1, out.shape[-1]))


def product(a: Tensor, b: Tensor, l1: int, l2: int, lout: int, method: str, flat: bool = False) -> Tensor:
    """The Gaunt product of checked operands a [N, C, (l1+1)^2] and b [N, C or 1, (l2+1)^2], laid out as
    the C++ ops take them (see :mod:`equikern.ops.gaunt`); the output is in the same layout.
    """
    if method == "auto":
        device = () if a.device.type == "cpu" else (a.device.type,)  # the CPU rule is the default
        method = choose_method(l1, l2, lout, a.dtype, *device)
    if method == "grid":
        pa, pb, pc, trig = grid_plan((l1, l2), lout, l1 + l2 + lout, a.dtype, a.device)
        return _ops.gaunt_grid_product(a, b, pa, pb, pc, trig, flat)
    if method == "dense":
        index, value = dense_plan(l1, l2, lout, a.dtype, a.device)
        return _ops.gaunt_dense_product(a, b, index, value, lout, flat)
    if a.numel() == 0 or b.numel() == 0:  # the FFTs refuse empty inputs; zero gradients flow back
        return a.new_zeros(a.shape[0], a.shape[1], (lout + 1) ** 2) + 0 * (a.sum() + b.sum())
    if not flat:
        return _fourier_product(a, b, l1, l2, lout)
    n, c, cb = a.shape[0], a.shape[1], b.shape[1]
    a = a.reshape(n, math.prod(a.shape[1:]))[:, flat_index(c, l1, a.device)]
    b = b.reshape(n, math.prod(b.shape[1:]))[:, flat_index(cb, l2, b.device)]
    out = _fourier_product(a, b, l1, l2, lout)
    out = out.reshape(n, math.prod(out.shape[1:]))[:, channel_index(c, lout, out.device)]
    return out.reshape(n, c, (lout + 1) ** 2)


@functools.cache
def flat_index(channels: int, lmax: int, device=None) -> Tensor:
    """[C, (L+1)^2]: position in e3nn's flat layout (blocks [C, 2l+1] per degree) of coefficient (c, lm)."""
    blocks = [
        channels * l * l + torch.arange(channels)[:, None] * (2 * l + 1) + torch.arange(2 * l + 1)[None, :]
        for l in range(lmax + 1)
    ]
    return torch.cat(blocks, dim=1).to(device)


@functools.cache
def channel_index(channels: int, lmax: int, device=None) -> Tensor:
    """[C (L+1)^2]: the inverse of flat_index, position in the channel layout of each flat position."""
    return torch.argsort(flat_index(channels, lmax).reshape(-1)).to(device)


def _fourier_product(a: Tensor, b: Tensor, l1: int, l2: int, lout: int) -> Tensor:
    f1, f2, back = _fourier_np(l1, l2, lout)
    cdtype = torch.complex64 if a.dtype == torch.float32 else torch.complex128
    s = 2 * (l1 + l2) + 1

    def spectrum(x: Tensor, f: np.ndarray) -> Tensor:
        coef = x.to(cdtype) @ torch.tensor(f.reshape(f.shape[0], -1), dtype=cdtype, device=x.device)
        coef = coef.unflatten(-1, f.shape[1:])
        return torch.fft.fft2(coef, s=(s, s))  # zero padding: the circular convolution is the linear one

    h = torch.fft.ifft2(spectrum(a, f1) * spectrum(b, f2))
    return (h.flatten(-2) @ torch.tensor(back, dtype=cdtype, device=a.device)).real.contiguous()


def gaunt_power(x: Tensor, nu: int, lmax_out: int | None = None) -> Tensor:
    """Coefficients up to lmax_out (default nu L, exact) of f_c^nu, for x [..., C, (L+1)^2].

    The nu-fold product is taken on one grid (exact for degree nu L + lmax_out), never going back to
    coefficients between factors.
    """
    l = _check_feature(x, "x")
    if not isinstance(nu, int) or isinstance(nu, bool) or nu < 1:
        raise ValueError(f"nu: expected an int >= 1, got {nu!r}")
    lout = _check_lmax_out(lmax_out, nu * l)
    p, pc, trig = grid_plan((l,), lout, nu * l + lout, x.dtype, x.device)
    grid = _ops.gaunt_to_grid(x.reshape(-1, x.shape[-1]), p, trig)
    out = _ops.gaunt_from_grid(grid**nu, pc, trig)
    return out.reshape(x.shape[:-1] + (out.shape[-1],))
