"""CPTensorProduct: the layer of Tensor Decomposition Networks (TDN).

The channelwise (uvu) tensor product with all path weights of a channel tied to one weight w[..., c] is
out[k, c] = w[c] sum_ij T[i, j, k] x[i, c] y[j], with T [d1, d2, d_out] the coupling tensor of one
channel: every path's Wigner 3j block times its e3nn path normalisation. TDN replaces T by a rank-R
CP decomposition, fitted once (alternating least squares) and cached in memory and on disk (under
$EQUIKERN_CACHE, default ~/.cache/equikern, keyed by a hash of T and the requested rank and tol).

Layouts: the module takes e3nn's flat mul_ir features (``layout="mul_ir"``, a gather in and out of the
op) or flat ir_mul (``layout="ir_mul"``: [d, C] per sample, TDN's x[e, i, c] and the op's native layout:
no copies, the fast path). The channel weights go into the op, which applies them as it writes.
"""

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from equikern.cp import cp_decompose, exact_factors, op_for
from equikern.irreps import as_irreps
from equikern.nn.tensor_product import TensorProduct
from equikern.so3 import rand_matrix, wigner_3j

LAYOUTS = ("mul_ir", "ir_mul")
_FITS: dict[str, tuple] = {}  # plan hash -> (A, B, C, error), for the life of the process


def _channel_mul(irreps, name: str, allowed: set) -> int:
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1 or not muls <= allowed:
        raise ValueError(
            f"{name}: every irrep must have the same multiplicity {sorted(allowed)}, got {irreps}"
        )
    return muls.pop()


def coupling_tensor(tp: TensorProduct) -> Tensor:
    """The coupling tensor T [d1, d2, d_out] (float64) of one channel of a channelwise TensorProduct.

    ``tp`` must use uvu paths only, all weighted, with one multiplicity C for in1 and out and 1 for in2;
    d1 and d_out count the components of one channel.
    """
    if not isinstance(tp, TensorProduct):
        raise ValueError(f"tp: expected an equikern TensorProduct, got {type(tp).__name__}")
    mul = _channel_mul(tp.irreps_in1, "tp.irreps_in1", {m for m, _ in tp.irreps_in1})
    _channel_mul(tp.irreps_in2, "tp.irreps_in2", {1})
    _channel_mul(tp.irreps_out, "tp.irreps_out", {mul})
    bad = [i for i in tp.instructions if i.connection_mode != "uvu" or not i.has_weight]
    if bad or not tp.instructions:
        raise ValueError(f"tp: needs weighted 'uvu' instructions only, got {bad or 'none'}")
    off1 = [0]
    for _, ir in tp.irreps_in1:
        off1.append(off1[-1] + ir.dim)
    off_out = [0]
    for _, ir in tp.irreps_out:
        off_out.append(off_out[-1] + ir.dim)
    s2 = tp.irreps_in2.slices()
    T = torch.zeros(off1[-1], tp.irreps_in2.dim, off_out[-1], dtype=torch.float64)
    for ins in tp.instructions:
        ir1, ir2, iro = tp.irreps_in1[ins.i_in1].ir, tp.irreps_in2[ins.i_in2].ir, tp.irreps_out[ins.i_out].ir
        a, b, c = off1[ins.i_in1], s2[ins.i_in2].start, off_out[ins.i_out]
        T[a : a + ir1.dim, b : b + ir2.dim, c : c + iro.dim] += ins.path_weight * wigner_3j(
            ir1.l, ir2.l, iro.l
        )
    return T


def _cache_dir() -> Path:
    return Path(os.environ.get("EQUIKERN_CACHE") or Path.home() / ".cache" / "equikern")


def _fit(T: Tensor, rank: int | None, tol: float) -> tuple[Tensor, Tensor, Tensor, float]:
    """CP factors of T: the given rank, or (rank None) the smallest whose ALS error is <= tol."""
    key = hashlib.sha256(
        b"equikern-cp-v1" + repr((tuple(T.shape), rank, float(tol))).encode() + T.numpy().tobytes()
    ).hexdigest()[:32]
    if key in _FITS:
        return _FITS[key]
    path = _cache_dir() / f"cp-{key}.pt"
    if path.is_file():
        A, B, C, err = torch.load(path, weights_only=True)
        _FITS[key] = (A, B, C, float(err))
        return _FITS[key]
    exact = (*exact_factors(T), 0.0)
    exact_rank = exact[0].shape[1]
    if rank is not None:
        found = exact if rank >= exact_rank else cp_decompose(T, rank, tol=1e-12)
    else:
        # Bisection on the rank: ALS error is (close to) monotone in it; the exact factors bound it.
        found, lo, hi = exact, 1, exact_rank
        while tol > 0 and lo < hi:
            mid = (lo + hi) // 2
            fit = cp_decompose(T, mid, tol=tol)
            if fit[3] <= tol:
                found, hi = fit, mid
            else:
                lo = mid + 1
    _FITS[key] = (*(f.contiguous() for f in found[:3]), float(found[3]))
    try:  # a cache: an unwritable directory only costs a refit next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(_FITS[key], tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return _FITS[key]


class CPTensorProduct(torch.nn.Module):
    """TDN tensor product: the tied-weight channelwise product through CP factors of its coupling tensor.

    ``irreps_in1`` and ``irreps_out`` have one multiplicity C (e.g. "C x (0e + 1o + 2e)"), ``irreps_in2``
    multiplicity 1 (e.g. spherical harmonics). Every (in1, in2, out) triple allowed by the selection rules
    is a uvu path normalised as e3nn's TensorProduct does (``irrep_normalization``,
    ``path_normalization``). ``forward(x, y, weight)`` takes weight [..., C] (one per sample and channel).
    ``rank=None`` picks the smallest rank whose fit has relative error <= ``tol``; a rank at or above the
    exact rank (see ``exact_rank``) gives exact factors. ``approximation_error`` is the relative
    Frobenius error of the coupling tensor, which is also the relative RMS output error for Gaussian
    inputs.
    """

    def __init__(
        self,
        irreps_in1,
        irreps_in2,
        irreps_out,
        rank: int | None = None,
        tol: float = 1e-3,
        layout: str = "mul_ir",
        irrep_normalization: str | None = None,
        path_normalization: str | None = None,
    ):
        super().__init__()
        irreps_in1, irreps_in2, irreps_out = (
            as_irreps(irreps_in1),
            as_irreps(irreps_in2),
            as_irreps(irreps_out),
        )
        mul = _channel_mul(irreps_in1, "irreps_in1", {m for m, _ in irreps_in1})
        _channel_mul(irreps_in2, "irreps_in2", {1})
        _channel_mul(irreps_out, "irreps_out", {mul})
        instructions = [
            (i1, i2, io, "uvu", True)
            for i1, (_, ir1) in enumerate(irreps_in1)
            for i2, (_, ir2) in enumerate(irreps_in2)
            for io, (_, iro) in enumerate(irreps_out)
            if iro in ir1 * ir2
        ]
        if not instructions:
            raise ValueError(f"irreps_out: no irrep of {irreps_out} is in {irreps_in1} x {irreps_in2}")
        tp = TensorProduct(
            irreps_in1,
            irreps_in2,
            irreps_out,
            instructions,
            irrep_normalization=irrep_normalization,
            path_normalization=path_normalization,
            shared_weights=False,
            internal_weights=False,
        )
        self._build(tp, rank, tol, layout)

    @classmethod
    def from_tensor_product(
        cls, tp: TensorProduct, rank: int | None = None, tol: float = 1e-3, layout: str = "mul_ir"
    ) -> "CPTensorProduct":
        """The CP approximation of a channelwise ``tp`` (weighted uvu paths) with its path weights tied."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._build(tp, rank, tol, layout)
        return module

    def _build(self, tp: TensorProduct, rank, tol, layout) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank: expected None or an int >= 1, got {rank!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol: expected a finite float >= 0, got {tol!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        T = coupling_tensor(tp)
        self.irreps_in1, self.irreps_in2, self.irreps_out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
        self.instructions = tp.instructions
        self.layout = layout
        self.channels = tp.irreps_in1[0].mul
        self.weight_numel = self.channels
        self._d1, self._d2, self._d_out = T.shape
        A, B, C, err = _fit(T, rank, tol)
        self.rank = A.shape[1]
        self.exact_rank = exact_factors(T)[0].shape[1]
        self.approximation_error = err
        # float64 factors kept as int64 bits so that module.float() never rounds them (cast per call).
        for name, f in (("_A", A), ("_B", B), ("_C", C)):
            self.register_buffer(name, f.view(torch.int64), persistent=False)
        self.register_buffer("_gather_in", self._ir_mul_index(self.irreps_in1), persistent=False)
        self.register_buffer("_gather_out", self._ir_mul_index(self.irreps_out).argsort(), persistent=False)

    def _ir_mul_index(self, irreps) -> Tensor:
        """Index into flat mul_ir features giving the flat [d, C] (ir_mul) order."""
        parts = [
            (s.start + torch.arange(ir.dim)[:, None] + ir.dim * torch.arange(mul)[None, :]).reshape(-1)
            for s, (mul, ir) in zip(irreps.slices(), irreps)
        ]
        return torch.cat(parts)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
        """The CP factors A [d1, R], B [d2, R], C [d_out, R]."""
        buffers = tuple(getattr(self, n) for n in ("_A", "_B", "_C"))
        if torch.compiler.is_compiling():
            return tuple(b.view(torch.float64).to(dtype) for b in buffers)
        # The same tensors call after call: the op plans its per-sample matrices from them once.
        # (inference tensors, of a module built under torch.inference_mode, count no versions)
        key = (dtype, *((b.data_ptr(), -1 if b.is_inference() else b._version) for b in buffers))
        if getattr(self, "_cast", (None,))[0] != key:
            with torch.inference_mode(
                torch.is_inference_mode_enabled() and any(b.is_inference() for b in buffers)
            ):
                # normal tensors unless the buffers themselves are inference tensors: a cast made under
                # inference mode is reused by later training steps
                self._cast = (key, tuple(b.view(torch.float64).to(dtype) for b in buffers))
        return self._cast[1]

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.irreps_in1.simplify()} x {self.irreps_in2.simplify()} -> "
            f"{self.irreps_out.simplify()} | rank {self.rank} of {self.exact_rank} exact | "
            f"error {self.approximation_error:.2e})"
        )

    def forward(self, x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
        C = self.channels
        for t, name, dim in ((x, "x", C * self._d1), (y, "y", self._d2), (weight, "weight", C)):
            if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[-1] != dim:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape (..., {dim}), got {got}")
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(
                    f"x, y, weight: dtypes or devices differ ({x.dtype}, {y.dtype}, {weight.dtype})"
                )
        shapes = [x.shape[:-1], y.shape[:-1], weight.shape[:-1]]
        try:
            batch = torch.broadcast_shapes(*shapes)
        except RuntimeError as e:
            raise ValueError(
                f"x, y, weight: batch shapes {[tuple(s) for s in shapes]} do not broadcast"
            ) from e
        Z = math.prod(batch)
        x = x.expand(batch + x.shape[-1:]).reshape(Z, -1)
        if self.layout == "mul_ir":
            x = x.index_select(1, self._gather_in)
        x = x.view(Z, self._d1, C)
        y = (
            y.reshape(1, -1)
            if math.prod(y.shape[:-1]) == 1
            else y.expand(batch + y.shape[-1:]).reshape(Z, -1)
        )
        weight = weight.expand(batch + (C,)).reshape(Z, C)
        out = op_for(x)(x, y, *self.factors(x.dtype), weight).reshape(Z, -1)
        if self.layout == "mul_ir":
            out = out.index_select(1, self._gather_out)
        return out.reshape(batch + (C * self._d_out,))

    @torch.no_grad()
    def equivariance_error(self, num_rotations: int = 8, batch: int = 32, seed: int = 0) -> float:
        """Relative RMS of f(D x, D y, w) - D f(x, y, w) over random rotations and Gaussian inputs (float64).

        For Gaussian inputs it is at most about 2 * approximation_error (the approximation error of the
        coupling tensor, once at the rotated and once at the original inputs).
        """
        gen = torch.Generator().manual_seed(seed)
        R = rand_matrix(num_rotations, generator=gen)[:, None]
        D1, D2, Do = (
            irreps.D_from_matrix(R) for irreps in (self.irreps_in1, self.irreps_in2, self.irreps_out)
        )
        if self.layout == "ir_mul":  # D acts on mul_ir; conjugate it into the flat [d, C] order
            D1 = D1[..., self._gather_in, :][..., self._gather_in]
            Do = Do[..., self._gather_out.argsort(), :][..., self._gather_out.argsort()]
        shape = (num_rotations, batch)
        x = torch.randn(shape + (self.channels * self._d1,), dtype=torch.float64, generator=gen)
        y = torch.randn(shape + (self._d2,), dtype=torch.float64, generator=gen)
        w = torch.randn(shape + (self.channels,), dtype=torch.float64, generator=gen)
        out = self(x, y, w)
        rotated = self((D1 @ x[..., None])[..., 0], (D2 @ y[..., None])[..., 0], w)
        diff = rotated - (Do @ out[..., None])[..., 0]
        return float(diff.norm() / out.norm())
