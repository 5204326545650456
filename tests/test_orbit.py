"""Permutation orbits, orbit pooling and OrbitLinear against brute force over enumerated groups."""

import itertools
import random
from fractions import Fraction

import pytest
import torch

from equikern.nn.orbit import OrbitLinear
from equikern.ops import orbit as ops
from equikern.orbit import (
    group_average,
    orbit_average,
    orbit_broadcast,
    orbit_pool,
    orbital_embedding,
    orbitals,
    orbits,
    permute,
)

# ---- groups, as generator lists and enumerated by closure (plain Python ints) --------------------


def cycle(n, shift=1):
    return [(i + shift) % n for i in range(n)]


def reflection(n):
    return [(-i) % n for i in range(n)]


def transposition(n, a=0, b=1):
    p = list(range(n))
    p[a], p[b] = b, a
    return p


def torus(a, b):
    """Translations of the a x b torus, points numbered row-major."""
    return [
        [((i + 1) % a) * b + j for i in range(a) for j in range(b)],
        [i * b + (j + 1) % b for i in range(a) for j in range(b)],
    ]


def young(sizes):
    """S_a x S_b x ...: a transposition and a cycle inside each block."""
    n, gens, start = sum(sizes), [], 0
    for s in sizes:
        if s > 1:
            gens.append([start + (i - start + 1) % s if start <= i < start + s else i for i in range(n)])
            gens.append(transposition(n, start, start + 1))
        start += s
    return gens or [list(range(n))]


def wreath(m, k):
    """S_m wr S_k on k blocks of m points: S_m inside block 0, and S_k permuting the blocks."""
    n = m * k
    inner = [[(i // m) * m + p[i % m] if i < m else i for i in range(n)] for p in young([m])]
    outer = [[p[i // m] * m + i % m for i in range(n)] for p in young([k])]
    return inner + outer


GROUPS = {
    "trivial": (5, [list(range(5))]),
    "trivial-empty": (4, []),
    "C6": (6, [cycle(6)]),
    "D5": (5, [cycle(5), reflection(5)]),
    "S5": (5, [cycle(5), transposition(5)]),
    "S2xS3": (5, young([2, 3])),
    "S1xS2xS2": (5, young([1, 2, 2])),
    "torus3x4": (12, torus(3, 4)),
    "S2wrS3": (6, wreath(2, 3)),
}


def enumerate_group(n, gens):
    identity = tuple(range(n))
    seen, frontier = {identity}, [identity]
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                gh = tuple(h[g[i]] for i in range(n))
                if gh not in seen:
                    seen.add(gh)
                    new.append(gh)
        frontier = new
    return sorted(seen)


def burnside(elements, k):
    total = sum(sum(1 for i, gi in enumerate(g) if gi == i) ** k for g in elements)
    count = Fraction(total, len(elements))
    assert count.denominator == 1
    return int(count)


def brute_ids(n, elements, k):
    """Canonical numbering from the enumerated group: first appearance in row-major order."""
    label, ids, num = {}, [], 0
    for t in itertools.product(range(n), repeat=k):
        if t not in label:
            for g in elements:
                label[tuple(g[i] for i in t)] = num
            num += 1
        ids.append(label[t])
    return torch.tensor(ids).reshape((n,) * k)


def gens_tensor(n, gens):
    return torch.tensor(gens, dtype=torch.int64).reshape(len(gens), n)


# ---- orbits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
def test_orbit_counts_match_burnside_and_brute_force(name):
    n, gens = GROUPS[name]
    elements = enumerate_group(n, gens)
    for k in (1, 2, 3):
        ids, num = orbits(gens_tensor(n, gens), k)
        assert ids.shape == (n,) * k and ids.dtype == torch.int64
        assert num == burnside(elements, k), (name, k)
        if k < 3 or n <= 6:
            assert torch.equal(ids, brute_ids(n, elements, k)), (name, k)


def test_known_orbit_counts_and_generator_independence():
    assert orbits(gens_tensor(2, wreath(2, 1)), 1)[1] == 1
    assert orbits(torch.tensor(wreath(3, 2)), 2)[1] == burnside(enumerate_group(6, wreath(3, 2)), 2)
    n = 7
    by_transpositions = torch.tensor([transposition(n, i, i + 1) for i in range(n - 1)])
    by_cycle = torch.tensor([cycle(n), transposition(n)])
    a, b = orbits(by_transpositions, 3), orbits(by_cycle, 3)
    assert a[1] == b[1] == 5 and torch.equal(a[0], b[0])
    # D_n on pairs: floor(n / 2) + 1 orbitals
    assert orbits(torch.tensor([cycle(9), reflection(9)]), 2)[1] == 5


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_cyclic_pairs_are_differences(n):
    ids, num = orbits(torch.tensor([cycle(n, 1)]), 2)
    i = torch.arange(n)
    assert num == n and torch.equal(ids, (i[None, :] - i[:, None]) % n)
    # another generator of the same group numbers the orbits the same way
    if n == 7:
        assert torch.equal(orbits(torch.tensor([cycle(7, 3)]), 2)[0], ids)


@pytest.mark.parametrize("name", ["C6", "D5", "S2xS3", "torus3x4", "trivial"])
def test_orbitals_pairing(name):
    n, gens = GROUPS[name]
    ids, num, tau = orbitals(gens_tensor(n, gens))
    assert tau.shape == (num,)
    assert torch.equal(ids.T, tau[ids])
    assert torch.equal(tau[tau], torch.arange(num))


def test_bad_generators():
    with pytest.raises(RuntimeError, match=r"generators\[0\] is not a permutation"):
        orbits(torch.tensor([[0, 0, 1]]))
    with pytest.raises(RuntimeError, match=r"generators\[1, 2\] = 3 is out of range"):
        orbits(torch.tensor([[0, 1, 2], [1, 0, 3]]))
    with pytest.raises(RuntimeError, match="out of range"):
        orbits(torch.tensor([[0, -1, 2]]))
    with pytest.raises(ValueError, match="generators: expected shape"):
        orbits(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="generators: expected an integer"):
        orbits(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="k: expected"):
        orbits(torch.tensor([[0, 1]]), 0)
    with pytest.raises(RuntimeError, match="too many"):
        orbits(torch.tensor([list(range(2000))]), 3)
    with pytest.raises(RuntimeError, match="generators must be 2-D"):
        ops.orbit_ids(torch.zeros(2, 2, 2, dtype=torch.int64))


# ---- pooling ------------------------------------------------------------------------------------


def random_ids(gen, shape, num):
    """Random ids in which every orbit appears (as canonical ids do), plus some empty orbits."""
    n = torch.Size(shape).numel()
    ids = torch.cat([torch.arange(num), torch.randint(0, num, (n - num,), generator=gen)])
    return ids[torch.randperm(n, generator=gen)].reshape(shape)


def reference_pool(x3, ids, num, reduce):
    out = torch.zeros(x3.shape[0], num, x3.shape[2], dtype=x3.dtype)
    for o in range(num):
        members = x3[:, ids == o]
        if members.shape[1]:
            out[:, o] = {"sum": members.sum(1), "mean": members.mean(1), "max": members.amax(1)}[reduce]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_pool_and_broadcast_match_reference(dtype, reduce):
    rng, gen = random.Random(str(dtype) + reduce), torch.Generator().manual_seed(1)
    for _ in range(4):
        k = rng.choice([1, 2])
        n = rng.randint(2, 7)
        num = rng.randint(1, n**k)
        ids = random_ids(gen, (n,) * k, num)
        lead = tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 2)))
        tail = tuple(rng.randint(1, 4) for _ in range(rng.randint(0, 2)))
        x = torch.randn(lead + (n,) * k + tail, dtype=dtype, generator=gen)
        dim = len(lead) - len(lead + (n,) * k + tail) if rng.random() < 0.5 else len(lead)
        got = orbit_pool(x, ids, num + 1, reduce, dim=dim)  # one empty orbit at the end
        x3 = x.reshape(max(1, torch.Size(lead).numel()), n**k, -1)
        ref = reference_pool(x3, ids.reshape(-1), num + 1, reduce)
        assert got.shape == lead + (num + 1,) + tail
        torch.testing.assert_close(got.reshape(ref.shape), ref)
        assert torch.equal(got, orbit_pool(x, ids, num + 1, reduce, dim=dim))  # deterministic
        s = torch.randn(lead + (num,) + tail, dtype=dtype, generator=gen)
        b = orbit_broadcast(s, ids, dim=len(lead))
        assert b.shape == x.shape
        assert torch.equal(b.reshape(x3.shape), s.reshape(x3.shape[0], num, -1)[:, ids.reshape(-1)])


@pytest.mark.parametrize("name", ["C6", "D5", "S2xS3", "S2wrS3"])
def test_orbit_average_is_the_group_average(name):
    n, gens = GROUPS[name]
    elements = torch.tensor(enumerate_group(n, gens))
    gen = torch.Generator().manual_seed(2)
    for k, dim in ((1, -2), (2, -3)):
        ids, num = orbits(gens_tensor(n, gens), k)
        x = torch.randn(3, *(n,) * k, 4, dtype=torch.float64, generator=gen)
        expected = permute(x, elements, dim=dim, k=k).mean(0)
        torch.testing.assert_close(orbit_average(x, ids, num, dim=dim), expected)


def test_max_gradient_goes_to_one_argmax():
    ids = torch.tensor([0, 1, 0, 1, 0])
    x = torch.tensor([[[1.0], [2.0], [3.0], [2.0], [3.0]]], requires_grad=True)
    out = orbit_pool(x, ids, 3, "max", dim=1)
    assert out.flatten().tolist() == [3.0, 2.0, 0.0]
    out.sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # the first arg-max of each orbit


def test_orbital_embedding():
    ids, num, _ = orbitals(torch.tensor([cycle(5), reflection(5)]))
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(num, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    emb = orbital_embedding(ids, table)
    assert emb.shape == (5, 5, 2, 3) and torch.equal(emb, table[ids])
    assert torch.autograd.gradcheck(lambda t: orbital_embedding(ids, t), (table,))
    assert torch.autograd.gradgradcheck(lambda t: orbital_embedding(ids, t), (table,))


def test_pool_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(4)
    ids = random_ids(gen, (4, 4), 6)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    s = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    for reduce in ("sum", "mean", "max"):
        fn = lambda t, r=reduce: orbit_pool(t, ids, 7, r, dim=1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
    assert torch.autograd.gradcheck(lambda t: orbit_broadcast(t, ids, dim=1), (s,))
    assert torch.autograd.gradgradcheck(lambda t: orbit_broadcast(t, ids, dim=1), (s,))
    assert torch.autograd.gradcheck(lambda t: orbit_average(t, ids, 6, dim=1), (x,))
    slots = torch.randint(0, 3, (4, 4), generator=gen)
    y = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    for fn, arg in (
        (lambda t: ops.orbital_pool(t, slots, 3), y),
        (lambda t: ops.orbital_pool_backward(t, slots), g),
    ):
        assert torch.autograd.gradcheck(fn, (arg,))
        assert torch.autograd.gradgradcheck(fn, (arg,))


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    ids = random_ids(gen, (9,), 4)
    x = torch.randn(3, 9, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    s = torch.randn(3, 4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    slots = torch.randint(0, 3, (5, 5), generator=gen)
    y = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    g = torch.randn(2, 5, 3, 4, generator=gen, requires_grad=True)
    lib = torch.ops.equikern
    torch.library.opcheck(lib.orbit_ids.default, (torch.tensor([cycle(4), reflection(4)]), 2))
    for reduce in ("sum", "mean"):
        torch.library.opcheck(lib.orbit_pool.default, (x, ids, 5, reduce))
    torch.library.opcheck(lib.orbit_pool_max.default, (x, ids, 5))
    torch.library.opcheck(lib.orbit_broadcast.default, (s, ids))
    torch.library.opcheck(lib.orbital_pool.default, (y, slots, 3))
    torch.library.opcheck(lib.orbital_pool_backward.default, (g, slots))


def test_bad_pool_inputs():
    ids = torch.tensor([0, 1, 1, 2])
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match=r"ids\[3\] = 2 is out of range \[0, 2\)"):
        orbit_pool(x, ids, 2)
    with pytest.raises(ValueError, match="x: dims"):
        orbit_pool(torch.randn(2, 5, 3), ids, 3)
    with pytest.raises(ValueError, match="reduce"):
        orbit_pool(x, ids, 3, "prod")
    with pytest.raises(ValueError, match="ids: expected an int64"):
        orbit_pool(x, ids.int(), 3)
    with pytest.raises(ValueError, match="x: expected a float"):
        orbit_pool(x.long(), ids, 3)
    with pytest.raises(ValueError, match="dim"):
        orbit_pool(x, ids, 3, dim=3)
    with pytest.raises(RuntimeError, match="ids.*out of range"):
        orbit_broadcast(torch.randn(2, 2, 3), ids, dim=1)
    with pytest.raises(RuntimeError, match="slots.*out of range"):
        ops.orbital_pool(torch.randn(1, 2, 1), torch.tensor([[0, 1], [2, 0]]), 2)
    with pytest.raises(RuntimeError, match="slots must have shape"):
        ops.orbital_pool(torch.randn(1, 2, 1), torch.zeros(3, 3, dtype=torch.int64), 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.orbit_pool(torch.ones(1, 4, 1, dtype=torch.int32), ids, 3)
    with pytest.raises(ValueError, match="perms"):
        permute(x, torch.tensor([0, 0, 1, 2]), dim=1)


# ---- OrbitLinear --------------------------------------------------------------------------------


def dense_reference(layer, x):
    w = layer.weight.detach().double()[layer.orbital_ids]
    y = torch.einsum("bjc,ijcd->bid", x.double(), w)
    if layer.bias is not None:
        y = y + layer.bias.detach().double()[layer.point_ids]
    return y


LINEAR_CASES = [
    ("C6", "fft"),
    ("C6", "orbital"),
    ("S5", "deepsets"),
    ("S5", "orbital"),
    ("D5", "orbital"),
    ("D5", "dense"),
    ("S2xS3", "orbital"),
    ("S1xS2xS2", "orbital"),
    ("torus3x4", "orbital"),
    ("trivial", "orbital"),
    ("S2wrS3", "auto"),
]


@pytest.mark.parametrize(("name", "route"), LINEAR_CASES)
def test_orbit_linear_matches_dense_and_is_equivariant(name, route):
    n, gens = GROUPS[name]
    rng, gen = random.Random(name + route), torch.Generator().manual_seed(6)
    torch.manual_seed(rng.randint(0, 1000))
    cin, cout = rng.randint(1, 4), rng.randint(1, 4)
    layer = OrbitLinear(gens_tensor(n, gens), cin, cout, route=route).double()
    with torch.no_grad():
        layer.bias.normal_()
    batch = rng.choice([(3,), (2, 2), ()])
    x = torch.randn(*batch, n, cin, dtype=torch.float64, generator=gen)
    y = layer(x)
    ref = dense_reference(layer, x.reshape(-1, n, cin)).reshape(y.shape)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    dim = len(batch)
    for g in gens:
        g = torch.tensor(g)
        torch.testing.assert_close(layer(permute(x, g, dim=dim)), permute(y, g, dim=dim))
    x32 = x.float()
    torch.testing.assert_close(layer.float()(x32), ref.float(), rtol=1e-4, atol=1e-4)


def test_orbit_linear_breaks_outside_the_two_closure():
    torch.manual_seed(7)
    layer = OrbitLinear(torch.tensor([cycle(6)]), 2, 3).double()
    x = torch.randn(4, 6, 2, dtype=torch.float64)
    g = torch.tensor(reflection(6))  # not in C_6's 2-closure (which is C_6)
    assert (layer(permute(x, g)) - permute(layer(x), g)).abs().max() > 1e-3
    # the same map over D_6 is equivariant under the reflection
    dihedral = OrbitLinear(torch.tensor([cycle(6), reflection(6)]), 2, 3).double()
    torch.testing.assert_close(dihedral(permute(x, g)), permute(dihedral(x), g))


@pytest.mark.parametrize("route", ["fft", "orbital", "dense"])
def test_orbit_linear_gradcheck(route):
    torch.manual_seed(8)
    layer = OrbitLinear(torch.tensor([cycle(4)]) if route == "fft" else torch.tensor(young([1, 3])), 2, 2)
    layer = OrbitLinear(layer.generators, 2, 2, route=route).double()
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    w = layer.weight
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(layer, {"weight": w}, (x,)), (x, w)
    )
    if route != "fft":
        assert torch.autograd.gradgradcheck(layer, (x,))


def test_orbit_linear_routes_and_bad_inputs():
    assert OrbitLinear(torch.tensor([cycle(8), transposition(8)]), 2, 2).route == "deepsets"
    assert OrbitLinear(torch.tensor([cycle(8)]), 2, 2).route == "fft"
    assert OrbitLinear(torch.tensor([cycle(8), reflection(8)]), 2, 2).route == "auto"
    layer = OrbitLinear(torch.tensor(young([2, 3])), 3, 2, bias=False)
    assert layer.bias is None and layer.weight.shape == (layer.num_orbitals, 3, 2)
    assert OrbitLinear(torch.tensor([[0]]), 2, 3)(torch.randn(4, 1, 2)).shape == (4, 1, 3)
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(2, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="route"):
        OrbitLinear(torch.tensor(young([2, 3])), 3, 2, route="fft")
    with pytest.raises(ValueError, match="in_channels"):
        OrbitLinear(torch.tensor([cycle(3)]), 0, 2)
    with pytest.raises(RuntimeError, match="not a permutation"):
        OrbitLinear(torch.tensor([[0, 0, 1]]), 1, 1)


# ---- explicit group averaging ---------------------------------------------------------------------


def test_group_average_makes_any_function_equivariant():
    n, gens = GROUPS["D5"]
    elements = torch.tensor(enumerate_group(n, gens))
    torch.manual_seed(9)
    net = torch.nn.Sequential(
        torch.nn.Flatten(-2), torch.nn.Linear(n * 2, n * 3), torch.nn.Unflatten(-1, (n, 3))
    )
    net = net.double()
    x = torch.randn(4, n, 2, dtype=torch.float64)
    avg = group_average(net, x, elements)
    g = torch.tensor(gens[1])
    torch.testing.assert_close(group_average(net, permute(x, g), elements), permute(avg, g))
    inv = group_average(lambda t: net(t).sum(-2), x, elements, invariant=True)
    torch.testing.assert_close(
        group_average(lambda t: net(t).sum(-2), permute(x, g), elements, invariant=True), inv
    )
    assert permute(x, elements).shape == (len(elements), 4, n, 2)


# ---- torch.compile -------------------------------------------------------------------------------


def test_ops_under_torch_compile_fullgraph():
    """Every orbit op traces into one graph (fake kernels, autograd) and matches eager, with gradients."""
    gen = torch.Generator().manual_seed(10)
    ids, num = orbits(torch.tensor([cycle(6), reflection(6)]), 2)
    slots = torch.randint(0, 3, (6, 6), generator=gen)
    table = torch.randn(num, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 6, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x, y, table):
        pooled = orbit_pool(x, ids, num, "sum", dim=1) + orbit_pool(x, ids, num, "max", dim=1)
        spread = orbit_broadcast(pooled * orbit_pool(x, ids, num, "mean", dim=1), ids, dim=1)
        edge = orbital_embedding(ids, table)  # [6, 6, 3]
        a = ops.orbital_pool(y, slots, 3)  # [2, 6, 3, 3]
        return (spread + edge).sum() + (a * a).sum() + orbit_average(x, ids, num, dim=1).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)  # inductor: the ops stay opaque calls in its code
    want, got = fn(x, y, table), compiled(x, y, table)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        torch.autograd.grad(got, (x, y, table)), torch.autograd.grad(want, (x, y, table))
    )


def test_orbit_linear_under_torch_compile_fullgraph():
    torch.manual_seed(11)
    for gens, route in (
        ([cycle(6)], "fft"),
        (young([2, 3]), "orbital"),
        ([cycle(5), transposition(5)], "auto"),
    ):
        gens = torch.tensor(gens)
        layer = OrbitLinear(gens, 3, 2, route=route).double()
        x = torch.randn(4, gens.shape[1], 3, dtype=torch.float64, requires_grad=True)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        want, got = layer(x), compiled(x)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(got, x, g), torch.autograd.grad(want, x, g))


# ---- the benchmark family ------------------------------------------------------------------------


def test_bench_family_quick_run(tmp_path):
    import json

    from equikern.bench import __main__ as bench

    problems = "orbit-pool-S_n,orbit-pool-D_n-max,orbit-pool-pairs-C_n,orbit-linear-C_n"
    argv = ["--quick", "--batch", "1", "--device", "cpu", "--problems", problems, "--out", str(tmp_path)]
    assert bench.main(argv + ["--modes", "fwd,fwdbwd", "--dtype", "float64"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {(r["problem"], r["mode"], r["impl"]): r for r in rows}
    refs = {"orbit-pool-D_n-max": "scatter_reduce", "orbit-linear-C_n": "dense"}
    for problem in problems.split(","):
        for mode in ("fwd", "fwdbwd"):
            assert by[problem, mode, refs.get(problem, "index_add")]["status"] == "ref"
            ours = by[problem, mode, "equikern"]
            assert ours["status"] == "ok" and ours["max_rel_err"] <= 1e-10, ours
            assert ours["median_ms"] > 0 and ours["floor_ms"] > 0 and ours["speedup"]
    assert by["orbit-pool-S_n", "fwd", "equikern"]["params"]["M"] == 1
    assert by["orbit-linear-C_n", "fwd", "equikern_orbital"]["status"] == "ok"


def test_bench_family_ids_and_planning_targets():
    from equikern.bench import Config, anchors
    from equikern.bench import orbit as family

    rows = [r for r in anchors()["orbit"]["rows"] if r["op"] == "orbit_pool_points"]
    for row in rows:
        ids, _ = family.point_ids(
            row["group"], 24, {"S_n": 1, "D_n": 13, "C_n": 24, "trivial": 24}[row["group"]]
        )
        assert ids.shape == (24,)
    # the D_n ids pair j with -j: the orbits of the reflection fixing point 0
    ids, _ = family.point_ids("D_n", 24, 13)
    assert torch.equal(ids, ids[torch.tensor(reflection(24))])
    with pytest.raises(ValueError, match="M=5"):
        family.point_ids("C_n", 24, 5)
    cfg = Config(torch.device("cpu"), torch.float32, 2000, "cpu", batch_given=False)
    cases = {c.label: c for c in family.cases(cfg)}
    assert cases["orbit-pool-C_n"].batch == 2 and cases["orbit-pool-pairs-C_n"].batch == 8
    for row in rows:
        assert cases[f"orbit-pool-{row['group']}"].params["M"] == row["M"]
    for result in family.planning(reps=2):  # checks the ids against their closed forms first
        assert result["median_s"] > 0
