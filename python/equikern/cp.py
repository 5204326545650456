"""CP (canonical polyadic) decompositions and the CP bilinear map of Tensor Decomposition Networks.

A 3-way tensor T [I, J, K] is approximated by sum_r A[:, r] (x) B[:, r] (x) C[:, r]; the bilinear map
x1, x2 -> T(x1, x2) then costs (I + J + K) R per product instead of the nonzeros of T.
"""

import importlib.util
import math

import torch
from torch import Tensor

from equikern.ops import cp as _ops  # also registers the fake kernels and autograd
from equikern.triton.cp import cp_bilinear as triton_cp_bilinear  # triton itself loads lazily

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _as_tensor3(tensor) -> Tensor:
    if not isinstance(tensor, Tensor):
        try:
            tensor = torch.as_tensor(tensor, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"tensor: expected a 3-way float tensor, got {type(tensor).__name__}") from e
    if tensor.dim() != 3:
        raise ValueError(f"tensor: expected a 3-way tensor, got shape {tuple(tensor.shape)}")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"tensor: expected a real tensor, got dtype {tensor.dtype}")
    if 0 in tensor.shape:
        raise ValueError(f"tensor: every dimension must be >= 1, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().to("cpu", torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError("tensor: contains NaN or infinite values")
    return tensor


def _unfold(T: Tensor, mode: int) -> Tensor:
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def _khatri_rao(U: Tensor, V: Tensor) -> Tensor:
    """Column-wise Kronecker product [len(U) * len(V), R], U's index major (matches _unfold)."""
    return (U[:, None, :] * V[None, :, :]).reshape(-1, U.shape[1])


def _balance(factors: list[Tensor]) -> list[Tensor]:
    """Give the three columns of every rank-one term the same norm (the tensor is unchanged)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])
    target = norms.prod(0).pow(1 / 3)
    return [f * torch.where(n > 0, target / n, 0.0) for f, n in zip(factors, norms)]


def _solve(mttkrp: Tensor, gram: Tensor) -> Tensor:
    """mttkrp @ gram^-1, with a relative ridge so that a rank-deficient Gram stays solvable."""
    ridge = 1e-12 * gram.diagonal().sum() / gram.shape[0] + 1e-300
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, mttkrp.T).T


class _ALS:
    """Alternating least squares on the three unfoldings of T; errors from Grams, never reconstructions."""

    def __init__(self, T: Tensor):
        self.unfolded = [_unfold(T, m) for m in range(3)]
        self.norm2 = float(T.norm() ** 2)

    def error(self, factors: list[Tensor]) -> float:
        A, B, C = factors
        inner = (C * (self.unfolded[2] @ _khatri_rao(A, B))).sum()
        model = ((A.T @ A) * (B.T @ B) * (C.T @ C)).sum()
        return math.sqrt(max(0.0, float(self.norm2 - 2 * inner + model)) / self.norm2)

    def sweep(self, factors: list[Tensor]) -> list[Tensor]:
        A, B, C = factors
        A = _solve(self.unfolded[0] @ _khatri_rao(B, C), (B.T @ B) * (C.T @ C))
        B = _solve(self.unfolded[1] @ _khatri_rao(A, C), (A.T @ A) * (C.T @ C))
        C = _solve(self.unfolded[2] @ _khatri_rao(A, B), (A.T @ A) * (B.T @ B))
        return _balance([A, B, C])


def cp_decompose(
    tensor, rank: int, tol: float = 1e-6, max_iter: int = 1000, seed: int | None = None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Rank-``rank`` CP decomposition of a 3-way tensor by alternating least squares.

    Initialised from the leading singular vectors of the unfoldings (HOSVD; columns beyond a mode's size
    are Gaussian from ``seed``), with Bro's extrapolation line search after every sweep. Stops when the
    relative Frobenius error reaches ``tol``, stalls (under 0.01% progress in 20 sweeps), or after
    ``max_iter`` sweeps. Returns float64 factors A [I, rank], B [J, rank], C [K, rank] and the relative
    error ||T - [[A, B, C]]|| / ||T||. Deterministic for a given seed (None means 0).
    """
    T = _as_tensor3(tensor)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite float >= 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter: expected an int >= 0, got {max_iter!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected an int or None, got {seed!r}")
    norm = T.norm()
    if norm == 0:
        return (*(T.new_zeros(n, rank) for n in T.shape), 0.0)
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    factors = []
    for mode in range(3):
        u = torch.linalg.svd(_unfold(T, mode), full_matrices=False)[0][:, :rank]
        extra = torch.randn(T.shape[mode], rank - u.shape[1], dtype=torch.float64, generator=gen)
        factors.append(torch.cat([u, extra / math.sqrt(T.shape[mode])], 1))
    als = _ALS(T)
    history = []
    for it in range(1, max_iter + 1):
        new = als.sweep(factors)
        new_err = als.error(new)
        # Bro's extrapolation along the last step; kept only if it improves on the plain sweep.
        step = it ** (1 / 3)
        jump = _balance([f + step * (n - f) for f, n in zip(factors, new)])
        jump_err = als.error(jump)
        factors, err = (jump, jump_err) if jump_err < new_err else (new, new_err)
        history.append(err)
        if err <= tol or (len(history) > 20 and history[-21] - err < 1e-4 * err):
            break
    # The Gram formula loses digits near zero error: report the error of the reconstruction.
    err = float((T - torch.einsum("ir,jr,kr->ijk", *factors)).norm() / norm)
    return (*factors, err)


def exact_factors(tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An exact CP decomposition: one rank-one term per nonzero fibre of the best of the three modes.

    Its rank is at most min(IJ, IK, JK) and much less for sparse tensors (such as Clebsch-Gordan ones).
    """
    T = _as_tensor3(tensor)
    best = None
    for mode in range(3):
        moved = T.movedim(mode, 2)  # fibres along `mode`, indexed by the other two
        nz = (moved != 0).any(-1).nonzero()
        if best is None or len(nz) < len(best[1]):
            best = (mode, nz, moved)
    mode, nz, moved = best
    rank = len(nz)
    others = [m for m in range(3) if m != mode]
    factors = [None, None, None]
    for m, idx in zip(others, nz.T):
        f = T.new_zeros(T.shape[m], rank)
        f[idx, torch.arange(rank)] = 1.0
        factors[m] = f
    factors[mode] = moved[nz[:, 0], nz[:, 1]].T.contiguous()
    return tuple(factors)


def cp_bilinear(
    x1: Tensor,
    x2: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    weight: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """out[..., k] = weight[...] sum_r C[k, r] (sum_i A[i, r] x1[..., i]) (sum_j B[j, r] x2[..., j]).

    x1 [..., I] and x2 [..., J] broadcast against each other; ``weight`` (optional, TDN's per-channel
    weight) broadcasts to their batch shape. The trailing batch dims over which x2 is broadcast
    (channels, e.g. features against one set of edge spherical harmonics) share the second operand: the
    kernel builds one [K, I] matrix per sample from it and applies it to every channel. Those dims are
    moved innermost for the kernel, which copies x1 and the output unless there are no such dims; the
    copy-free layout is x1 [samples, I, channels] (``equikern.ops.cp.cp_bilinear``).

    ``backend``: "native" (the C++ / CUDA op), "triton" (:mod:`equikern.triton.cp`; on a CPU only under
    Triton's interpreter) or "auto": Triton for CUDA tensors when triton is installed, native otherwise.
    """
    if backend not in ("auto", "native", "triton"):
        raise ValueError(f"backend: expected 'auto', 'native' or 'triton', got {backend!r}")
    for t, name in ((x1, "x1"), (x2, "x2"), (A, "A"), (B, "B"), (C, "C"), (weight, "weight")):
        if t is None and name == "weight":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a float32 or float64 tensor, got {got}")
        if t.dtype != x1.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from x1's {x1.dtype}")
    for t, name in ((A, "A"), (B, "B"), (C, "C")):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a matrix [dim, rank], got shape {tuple(t.shape)}")
    if x1.dim() < 1 or x2.dim() < 1:
        raise ValueError(f"x1, x2: expected at least 1-D, got shapes {tuple(x1.shape)}, {tuple(x2.shape)}")
    if A.shape[0] != x1.shape[-1] or B.shape[0] != x2.shape[-1] or not A.shape[1] == B.shape[1] == C.shape[1]:
        raise ValueError(
            f"A, B, C: shapes {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)} do not fit x1 [..., "
            f"{x1.shape[-1]}] and x2 [..., {x2.shape[-1]}] with one rank"
        )
    try:
        batch = torch.broadcast_shapes(x1.shape[:-1], x2.shape[:-1])
    except RuntimeError as e:
        raise ValueError(
            f"x1, x2: batch shapes {tuple(x1.shape[:-1])} and {tuple(x2.shape[:-1])} differ"
        ) from e
    if weight is not None:
        try:
            fits = torch.broadcast_shapes(batch, weight.shape) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"weight: shape {tuple(weight.shape)} does not broadcast to the batch shape {tuple(batch)}"
            )
    s2 = (1,) * (len(batch) - x2.dim() + 1) + tuple(x2.shape[:-1])
    split = len(batch)
    while split > 0 and s2[split - 1] == 1:
        split -= 1
    samples, channels = batch[:split], batch[split:]
    Z, Cc = math.prod(samples), math.prod(channels)
    I, J = x1.shape[-1], x2.shape[-1]
    x1n = x1.expand(batch + (I,)).reshape(Z, Cc, I).transpose(1, 2)
    x2n = x2.reshape(s2[:split] + (J,))  # drop the broadcast channel dims
    x2n = x2n.reshape(1, J) if math.prod(s2) == 1 else x2n.expand(samples + (J,)).reshape(Z, J)
    wn = None if weight is None else weight.expand(batch).reshape(Z, Cc)
    out = op_for(x1, backend)(x1n, x2n, A, B, C, wn)
    return out.transpose(1, 2).reshape(batch + (C.shape[0],))


def op_for(x: Tensor, backend: str = "auto"):
    """The CP bilinear op (native layout) that runs tensors like x: Triton for CUDA tensors when triton is
    installed ("auto"), else the C++/CUDA op."""
    if backend == "triton" or (backend == "auto" and x.is_cuda and _HAVE_TRITON):
        return triton_cp_bilinear
    return _ops.cp_bilinear


def from_tensor_product(tp, rank: int | None = None, tol: float = 1e-3):
    """The CP approximation (a CPTensorProduct) of a channelwise ``TensorProduct`` with tied weights."""
    from equikern.nn.cp import CPTensorProduct  # the module builds on this file

    return CPTensorProduct.from_tensor_product(tp, rank=rank, tol=tol)
