"""Permutation-orbit pooling and OrbitLinear (anchors.json "orbit") against what users write today.

Pooling x [B, n, C] over orbits: equikern.orbit_pool beside torch ``index_add`` (the reference) and
``scatter_reduce``. The anchors give each row's number of orbits M, which fixes the ids: the orbits on
points of the group itself where that is M (S_n: M = 1; trivial: M = n), else the orbits of the
stabiliser of point 0 (D_n: the reflection i -> -i, M = n/2 + 1; C_n: trivial, M = n), i.e. pooling one
row of ASEN's orbital-coloured pair features. ``orbit-pool-pairs`` pools pair features [B, n, n, C] of
C_n over its n orbitals. OrbitLinear (C_n, bias-free) is timed against the dense layer (its weights
W[O(i, j)] materialised, then one einsum), which is also the reference; inputs are x and the weights.

On a CPU, unless --batch is given, the n = 65536 pooling runs at B = 2 (the anchors' 32 is 1 GiB of
float32) and OrbitLinear at n = 64 whatever the batch (the dense reference's W[O] at n = 256 is 4 GiB).

Orbit computation (planning) returns integer ids and has no backward, so it is no harness case: run
``python -m equikern.bench.orbit`` for the median times of the planning targets.
"""

import statistics
import time

import torch
from torch import Tensor

from equikern.bench import Case, Config, Impl, anchors, io_floor

FAMILY = "orbit"
_CPU_POINTS_BATCH = 2
_CPU_LINEAR_N = 64


def _cycle(n: int) -> list[int]:
    return [(i + 1) % n for i in range(n)]


def _reflection(n: int) -> list[int]:
    return [(-i) % n for i in range(n)]


def _transposition(n: int) -> list[int]:
    return [1, 0, *range(2, n)]


# group -> (generators of the group, generators of the stabiliser of point 0), as functions of n
_GROUPS = {
    "S_n": (lambda n: [_cycle(n), _transposition(n)], None),
    "D_n": (lambda n: [_cycle(n), _reflection(n)], lambda n: [_reflection(n)]),
    "C_n": (lambda n: [_cycle(n)], lambda n: [list(range(n))]),
    "trivial": (lambda n: [list(range(n))], lambda n: [list(range(n))]),
}


def point_ids(group: str, n: int, num_orbits: int) -> tuple[Tensor, str]:
    """Ids [n] of the row's M orbits: of the group on points if it has M, else of its point stabiliser."""
    from equikern.orbit import orbits

    whole, stabiliser = _GROUPS[group]
    ids, num = orbits(torch.tensor(whole(n)), 1)
    what = "points"
    if num != num_orbits and stabiliser is not None:
        ids, num = orbits(torch.tensor(stabiliser(n)), 1)
        what = "stabiliser of point 0"
    if num != num_orbits:
        raise ValueError(f"orbit bench: no orbits of {group} on n={n} points number M={num_orbits}")
    return ids, what


def cases(cfg: Config) -> list[Case]:
    """One case per row of anchors.json "orbit" (and a max-pooling variant of the D_n row)."""
    found = []
    for row in anchors()["orbit"]["rows"]:
        if row["op"] == "orbit_pool_points":
            found.append(_pool_case(row, cfg, "sum"))
            if row["group"] == "D_n":
                found.append(_pool_case(row, cfg, "max"))
        elif row["op"] == "orbit_pool_pairs":
            found.append(_pairs_case(row, cfg))
        elif row["op"] == "orbit_linear_dense":
            found.append(_linear_case(row, cfg))
    return found


def _batch(row: dict, cfg: Config, cpu_batch: int | None = None) -> int:
    if cfg.batch_given:
        return cfg.batch
    return cpu_batch if cfg.hardware == "cpu" and cpu_batch else row["B"]


def _published(row: dict, cfg: Config, batch: int, impl: str, key: str) -> dict:
    if cfg.hardware == "h100" and cfg.dtype == torch.float32 and batch == row["B"]:
        return {impl: {"fwd": row[key]}}
    return {}


def _pool_impls(ids: Tensor, num: int, dim: int, reduce: str) -> dict:
    """equikern, index_add (sum) and scatter_reduce on x [B, *ids.shape, C], pooled at ``dim``."""
    from equikern.orbit import orbit_pool

    flat = ids.reshape(-1)

    def members(x: Tensor) -> Tensor:  # [B, N, C]
        return x.reshape(x.shape[0], flat.numel(), x.shape[-1])

    def index_add(x: Tensor) -> Tensor:
        x3 = members(x)
        return x3.new_zeros(x3.shape[0], num, x3.shape[2]).index_add(1, flat, x3)

    def scatter_reduce(x: Tensor) -> Tensor:
        x3 = members(x)
        index = flat.view(1, -1, 1).expand_as(x3)
        zeros = x3.new_zeros(x3.shape[0], num, x3.shape[2])
        return zeros.scatter_reduce(1, index, x3, "sum" if reduce == "sum" else "amax", include_self=False)

    impls = {
        "equikern": lambda: Impl(lambda x: orbit_pool(x, ids, num, reduce, dim=dim)),
        "scatter_reduce": lambda: Impl(scatter_reduce),
    }
    if reduce == "sum":
        impls["index_add"] = lambda: Impl(index_add)
    return impls


def _pool_case(row: dict, cfg: Config, reduce: str) -> Case:
    n, C, M = row["n"], row["C"], row["M"]
    batch = _batch(row, cfg, _CPU_POINTS_BATCH)
    ids, what = point_ids(row["group"], n, M)
    ids = ids.to(cfg.device)
    like = {"device": cfg.device, "dtype": cfg.dtype}
    itemsize = cfg.dtype.itemsize
    return Case(
        family=FAMILY,
        label=f"orbit-pool-{row['group']}" + ("" if reduce == "sum" else f"-{reduce}"),
        params={"n": n, "C": C, "M": M, "reduce": reduce, "orbits_of": what},
        inputs=lambda: (torch.randn(batch, n, C, **like),),
        impls=_pool_impls(ids, M, -2, reduce),
        floor_bytes=io_floor(batch * n * C * itemsize, batch * M * C * itemsize),
        reference="index_add" if reduce == "sum" else "scatter_reduce",
        published=_published(row, cfg, batch, "index_add", "index_add_ms") if reduce == "sum" else {},
        batch=batch,
    )


def _pairs_case(row: dict, cfg: Config) -> Case:
    from equikern.orbit import orbits

    n, C = row["n"], row["C"]
    batch = _batch(row, cfg)
    ids, M = orbits(torch.tensor(_GROUPS[row["group"]][0](n)), 2)
    ids = ids.to(cfg.device)
    like = {"device": cfg.device, "dtype": cfg.dtype}
    itemsize = cfg.dtype.itemsize
    return Case(
        family=FAMILY,
        label=f"orbit-pool-pairs-{row['group']}",
        params={"n": n, "C": C, "M": M, "reduce": "sum", "orbits_of": "pairs"},
        inputs=lambda: (torch.randn(batch, n, n, C, **like),),
        impls=_pool_impls(ids, M, -3, "sum"),
        floor_bytes=io_floor(batch * n * n * C * itemsize, batch * M * C * itemsize),
        reference="index_add",
        published=_published(row, cfg, batch, "index_add", "index_add_ms"),
        batch=batch,
    )


def _linear_case(row: dict, cfg: Config) -> Case:
    from equikern.nn.orbit import OrbitLinear

    n = _CPU_LINEAR_N if cfg.hardware == "cpu" else row["n"]
    cin, cout = row["Cin"], row["Cout"]
    batch = _batch(row, cfg)
    gens = torch.tensor(_GROUPS[row["group"]][0](n))
    like = {"device": cfg.device, "dtype": cfg.dtype}
    probe = OrbitLinear(gens, cin, cout, bias=False)
    M = probe.num_orbitals

    def inputs() -> tuple[Tensor, ...]:
        return torch.randn(batch, n, cin, **like), torch.randn(M, cin, cout, **like) / (n * cin) ** 0.5

    def module(route: str):
        layer = OrbitLinear(gens, cin, cout, bias=False, route=route).to(**like)
        return lambda x, w: torch.func.functional_call(layer, {"weight": w}, (x,))

    def dense() -> Impl:
        ids = probe.orbital_ids.to(cfg.device)
        return Impl(lambda x, w: torch.einsum("bjc,ijcd->bid", x, w[ids]))

    itemsize = cfg.dtype.itemsize
    published = {}
    if cfg.hardware == "h100" and cfg.dtype == torch.float32 and batch == row["B"] and n == row["n"]:
        published = {"dense": {"fwd": row["ms"]}}
    return Case(
        family=FAMILY,
        label=f"orbit-linear-{row['group']}",
        params={"n": n, "Cin": cin, "Cout": cout, "orbitals": M, "route": probe.route},
        inputs=inputs,
        impls={
            "equikern": lambda: Impl(module("auto")),
            "equikern_orbital": lambda: Impl(module("orbital")),
            "dense": dense,
        },
        floor_bytes=io_floor((batch * n * cin + M * cin * cout) * itemsize, batch * n * cout * itemsize),
        reference="dense",
        published=published,
        batch=batch,
    )


# ---------------------------------------------------------------- planning targets (CPU)


def _torus(a: int, b: int) -> list[list[int]]:
    return [
        [((i + 1) % a) * b + j for i in range(a) for j in range(b)],
        [i * b + (j + 1) % b for i in range(a) for j in range(b)],
    ]


def planning(reps: int = 30) -> list[dict]:
    """Median seconds of equikern.orbits / orbitals on the issue's planning targets (CPU).

    Each result is checked against its closed form first: for C_n on pairs ids[i, j] = (j - i) mod n; for
    the translations of the a x b torus the orbital of (p, q) is the difference q - p, numbered row-major.
    """
    from equikern.orbit import orbitals, orbits

    n, (a, b) = 1000, (32, 32)
    i = torch.arange(n)
    points = torch.arange(a * b)
    row, col = points // b, points % b
    torus_ids = ((row[None] - row[:, None]) % a) * b + (col[None] - col[:, None]) % b
    targets = [
        (
            "orbits of C_1000 on pairs",
            lambda: orbits(torch.tensor([_cycle(n)]), 2)[0],
            (i[None] - i[:, None]) % n,
            0.010,
        ),
        ("orbitals of the 32x32 torus", lambda: orbitals(torch.tensor(_torus(a, b)))[0], torus_ids, 0.1),
    ]
    results = []
    for name, fn, truth, target in targets:
        if not torch.equal(fn(), truth):
            raise AssertionError(f"{name}: ids differ from the closed form")
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results.append({"target": name, "median_s": statistics.median(times), "goal_s": target, "reps": reps})
    return results


if __name__ == "__main__":
    print(f"torch threads: {torch.get_num_threads()}")
    for r in planning():
        ok = "meets" if r["median_s"] < r["goal_s"] else "MISSES"
        ms, goal = r["median_s"] * 1e3, r["goal_s"] * 1e3
        print(f"{r['target']}: {ms:.2f} ms median of {r['reps']} ({ok} the {goal:g} ms goal)")
