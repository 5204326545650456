"""Permutation orbits and orbit aggregation: the functional API.

A permutation group G on points 0..n-1 is given by generators [r, n] (row g maps i to g[i]). It acts
on features by moving the point axis: (g.x)[g[i]] = x[i]. Orbits of G on k-tuples are numbered
canonically, in order of first appearance in the row-major order of the tuples, so ids depend on
the group only; for the cyclic group C_n on pairs, ids[i, j] = (j - i) mod n.

Pooling and broadcasting are deterministic (no atomics): the same input gives the same bits.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from equikern.ops import orbit as _ops  # also registers the fake kernels and autograd

REDUCTIONS = ("sum", "mean", "max")


def as_generators(generators) -> Tensor:
    """Generators as a CPU int64 tensor [r, n] (planning runs on the CPU)."""
    if not isinstance(generators, Tensor):
        try:
            generators = torch.as_tensor(generators)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"generators: expected an integer tensor [r, n], got {generators!r}") from e
    if generators.is_floating_point() or generators.is_complex() or generators.dtype == torch.bool:
        raise ValueError(f"generators: expected an integer tensor, got dtype {generators.dtype}")
    if generators.dim() != 2:
        raise ValueError(f"generators: expected shape [r, n], got {tuple(generators.shape)}")
    return generators.detach().to("cpu", torch.int64)


def orbits(generators, k: int = 1) -> tuple[Tensor, int]:
    """Orbits of the group on k-tuples: ``(ids, num_orbits)`` with ids int64 of shape [n] * k.

    Computed on the CPU, or on the GPU (returning CUDA ids) when ``generators`` is a CUDA tensor.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    gens = as_generators(generators)
    if isinstance(generators, Tensor) and generators.is_cuda:
        gens = gens.to(generators.device)
    n = gens.shape[1]
    ids = _ops.orbit_ids(gens, k)
    num = int(ids.max()) + 1 if ids.numel() else 0
    return ids.reshape((n,) * k), num


def orbitals(generators) -> tuple[Tensor, int, Tensor]:
    """Orbits on pairs (orbitals): ``(ids [n, n], num_orbitals, tau)`` with ``ids.T == tau[ids]``.

    tau maps each orbital to its paired orbital (the orbit of the reversed pairs).
    """
    ids, num = orbits(generators, 2)
    tau = torch.empty(num, dtype=torch.int64, device=ids.device)
    tau[ids.reshape(-1)] = ids.T.reshape(-1)  # every write to one slot carries the same value
    return ids, num, tau


def _check_ids(ids, name: str = "ids") -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name}: expected an int64 tensor, got {got}")
    return ids


def _tuple_dims(x: Tensor, ids: Tensor, dim: int, name: str = "x") -> int:
    """First of the ids.dim() dims of x that hold the tuple, as a non-negative index."""
    k = ids.dim()
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a float32 or float64 tensor, got {got}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: {dim} is out of range for {name} of shape {tuple(x.shape)}")
    d = dim % x.dim()
    if tuple(x.shape[d : d + k]) != tuple(ids.shape):
        raise ValueError(
            f"{name}: dims {d}..{d + k - 1} of shape {tuple(x.shape)} must match ids of shape "
            f"{tuple(ids.shape)} (for pair features [..., n, n, C] use dim=-3)"
        )
    return d


def orbit_pool(x: Tensor, ids: Tensor, num_orbits: int, reduce: str = "sum", dim: int = -2) -> Tensor:
    """Reduce x over orbits: the ids.dim() dims of x starting at ``dim`` become one dim of num_orbits.

    reduce is "sum", "mean" or "max" (empty orbits give 0). The gradient of "max" goes to one
    arg-max per orbit and channel: the first member in row-major order reaching the maximum.
    """
    ids = _check_ids(ids)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    d = _tuple_dims(x, ids, dim)
    k = ids.dim()
    lead, tail = x.shape[:d], x.shape[d + k :]
    x3 = x.reshape(lead.numel(), ids.numel(), tail.numel())
    flat = ids.reshape(-1)
    if reduce == "max":
        out = _ops.orbit_pool_max(x3, flat, num_orbits)[0]
    else:
        out = _ops.orbit_pool(x3, flat, num_orbits, reduce)
    return out.reshape(lead + (num_orbits,) + tail)


def orbit_broadcast(s: Tensor, ids: Tensor, dim: int = -2) -> Tensor:
    """The adjoint of pooling: dim ``dim`` of s (one entry per orbit) becomes the dims ids.shape."""
    ids = _check_ids(ids)
    if not isinstance(s, Tensor) or not s.is_floating_point():
        raise ValueError(f"s: expected a float32 or float64 tensor, got {type(s).__name__}")
    if not -s.dim() <= dim < s.dim():
        raise ValueError(f"dim: {dim} is out of range for s of shape {tuple(s.shape)}")
    d = dim % s.dim()
    lead, tail = s.shape[:d], s.shape[d + 1 :]
    out = _ops.orbit_broadcast(s.reshape(lead.numel(), s.shape[d], tail.numel()), ids.reshape(-1))
    return out.reshape(lead + ids.shape + tail)


def orbit_average(x: Tensor, ids: Tensor, num_orbits: int, dim: int = -2) -> Tensor:
    """The Reynolds projection: each entry replaced by the mean over its orbit."""
    ids = _check_ids(ids)
    d = _tuple_dims(x, ids, dim)
    return orbit_broadcast(orbit_pool(x, ids, num_orbits, "mean", d), ids, d)


def orbital_embedding(ids: Tensor, table: Tensor) -> Tensor:
    """ASEN edge features ``table[ids]``: [*ids.shape, *table.shape[1:]], with a gradient into table."""
    ids = _check_ids(ids)
    if not isinstance(table, Tensor) or not table.is_floating_point() or table.dim() < 1:
        raise ValueError("table: expected a float tensor [num_orbits, ...]")
    flat = table.reshape(1, table.shape[0], -1)
    return _ops.orbit_broadcast(flat, ids.reshape(-1)).reshape(ids.shape + table.shape[1:])


def _check_perms(perms) -> Tensor:
    perms = as_generators(perms.unsqueeze(0) if isinstance(perms, Tensor) and perms.dim() == 1 else perms)
    n = perms.shape[1]
    if not torch.equal(perms.sort(dim=1).values, torch.arange(n).expand_as(perms)):
        raise ValueError(f"perms: every row must be a permutation of 0..{n - 1}")
    return perms


def permute(x: Tensor, perms, dim: int = -2, k: int = 1) -> Tensor:
    """g.x for each permutation g: (g.x)[g[i]] = x[i] on the k dims of x starting at ``dim``.

    perms [E, n] gives [E, *x.shape]; a single permutation [n] gives x's shape.
    """
    single = isinstance(perms, Tensor) and perms.dim() == 1
    p = _check_perms(perms)
    if not -x.dim() <= dim < x.dim() or dim % x.dim() + k > x.dim():
        raise ValueError(f"dim: {dim} (with k={k}) is out of range for x of shape {tuple(x.shape)}")
    d = dim % x.dim()
    inv = p.argsort(dim=1).to(x.device)
    outs = []
    for g in inv:
        y = x
        for a in range(d, d + k):
            if y.shape[a] != g.shape[0]:
                raise ValueError(f"x: dim {a} has size {y.shape[a]}, the permutations act on {g.shape[0]}")
            y = y.index_select(a, g)
        outs.append(y)
    return outs[0] if single else torch.stack(outs)


def group_average(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    elements: Sequence | Tensor,
    dim: int = -2,
    invariant: bool = False,
) -> Tensor:
    """Frame averaging: mean over g in ``elements`` of g^-1.fn(g.x) (or of fn(g.x) if ``invariant``).

    Over a whole group (or a frame) the result is equivariant (invariant) whatever fn is.
    """
    p = _check_perms(torch.as_tensor(elements) if not isinstance(elements, Tensor) else elements)
    total = None
    for g in p:
        y = fn(permute(x, g, dim))
        if not invariant:
            y = y.index_select(dim % y.dim(), g.to(y.device))  # (g^-1.y)[j] = y[g[j]]
        total = y if total is None else total + y
    return total / p.shape[0]
