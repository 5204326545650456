"""The CUDA orbit ops against the CPU ops and brute force (skipped without a GPU)."""

import random

import pytest
import torch

from equikern.nn.orbit import OrbitLinear
from equikern.ops import orbit as ops
from equikern.orbit import orbit_average, orbit_broadcast, orbit_pool, orbitals, orbits
from test_orbit import GROUPS, cycle, gens_tensor, random_ids, reference_pool, reflection

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CUDA = torch.device("cuda")
# orbit sizes around the kernel's segment length (256 members), so that long orbits are split
SIZES = [1, 3, 255, 256, 257, 700]


def random_layout(rng, gen):
    """ids [N] with one empty orbit at the end, orbits of very different sizes, some longer than a segment."""
    sizes = [rng.choice(SIZES) for _ in range(rng.randint(1, 5))] + [rng.randint(1, 4) for _ in range(3)]
    ids = torch.cat([torch.full((s,), o) for o, s in enumerate(sizes)])
    return ids[torch.randperm(ids.numel(), generator=gen)], len(sizes) + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_pool_matches_cpu(dtype, reduce):
    rng, gen = random.Random(f"{dtype}{reduce}"), torch.Generator().manual_seed(0)
    for _ in range(6):
        ids, num = random_layout(rng, gen)
        P, Q = rng.randint(1, 3), rng.choice([1, 3, 4, 8, 130])  # vector and scalar channel widths
        x = torch.randn(P, ids.numel(), Q, dtype=dtype, generator=gen)
        want = orbit_pool(x, ids, num, reduce, dim=1)
        got = orbit_pool(x.to(CUDA), ids.to(CUDA), num, reduce, dim=1)
        tol = 1e-12 if dtype == torch.float64 else 1e-4  # sums of up to 700 members in another order
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
        if reduce == "max":  # max is exact, and so is its arg-max
            _, arg_cpu = ops.orbit_pool_max(x, ids, num)
            _, arg_gpu = ops.orbit_pool_max(x.to(CUDA), ids.to(CUDA), num)
            assert torch.equal(arg_gpu.cpu(), arg_cpu)
        again = orbit_pool(x.to(CUDA), ids.to(CUDA), num, reduce, dim=1)
        assert torch.equal(again, got)  # deterministic: no atomics


def test_pool_against_float64_brute_force_at_scale():
    gen = torch.Generator().manual_seed(1)
    n = 65536
    for ids, num in (
        (torch.zeros(n, dtype=torch.int64), 1),
        ((torch.arange(n) >= 1).long(), 2),
        orbits(torch.tensor([reflection(n)])),  # n/2 + 1 orbits {j, -j}
        (torch.arange(n), n),
    ):
        x = torch.randn(2, n, 128, generator=gen)
        want = torch.zeros(2, num, 128, dtype=torch.float64).index_add_(1, ids, x.double())
        got = orbit_pool(x.to(CUDA), ids.to(CUDA), num, dim=1)
        assert (got.cpu().double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_max_nan_and_ties_follow_the_cpu_rule():
    ids = torch.zeros(600, dtype=torch.int64)  # one orbit of three segments
    x = torch.zeros(1, 600, 4)
    x[0, 300] = float("nan")  # not the first member: ignored, as on the CPU
    x[0, 400, 1] = 5.0
    x[0, 450, 1] = 5.0  # a tie: the first member wins
    x[0, 0, 2] = float("nan")  # the first member: the result
    x[0, 512, 3] = float("nan")  # the first member of the third segment: ignored too
    for dev in ("cpu", CUDA):
        out, arg = ops.orbit_pool_max(x.to(dev), ids.to(dev), 2)
        out, arg = out.cpu(), arg.cpu()
        assert out[0, 0, 0] == 0 and arg[0, 0, 0] == 0
        assert out[0, 0, 1] == 5 and arg[0, 0, 1] == 400
        assert out[0, 0, 2].isnan() and arg[0, 0, 2] == 0
        assert torch.equal(arg[0, 1], torch.full((4,), -1)) and torch.equal(out[0, 1], torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(2)
    ids, num = random_layout(random.Random(3), gen)
    x = torch.randn(2, ids.numel(), 16, generator=gen).to(dtype)
    want = reference_pool(x.double(), ids, num, "sum")
    got = orbit_pool(x.to(CUDA), ids.to(CUDA), num, dim=1).cpu()
    assert got.dtype == dtype
    # one rounding of the float32 sum to the half type, not one per member
    eps = torch.finfo(dtype).eps
    assert ((got.double() - want).abs() <= eps * want.abs() + 1e-3).all()
    s = torch.randn(2, num, 16, generator=gen).to(dtype)
    assert torch.equal(orbit_broadcast(s.to(CUDA), ids.to(CUDA), dim=1).cpu(), s[:, ids])


def test_broadcast_and_unaligned_inputs():
    gen = torch.Generator().manual_seed(4)
    ids = random_ids(gen, (37,), 9)
    base = torch.randn(3 * 9 * 8 + 1, dtype=torch.float32, generator=gen)
    s = base[1:].reshape(3, 9, 8)  # a storage offset of 4 bytes: the kernels must not load 16 bytes
    want = s[:, ids]
    assert torch.equal(orbit_broadcast(s.to(CUDA).clone(), ids.to(CUDA), dim=1).cpu(), want)
    s_gpu = base.to(CUDA)[1:].reshape(3, 9, 8)
    assert torch.equal(orbit_broadcast(s_gpu, ids.to(CUDA), dim=1).cpu(), want)
    x = torch.randn(3 * 37 * 8 + 1, generator=gen)
    x_gpu = x.to(CUDA)[1:].reshape(3, 37, 8)
    torch.testing.assert_close(
        orbit_pool(x_gpu, ids.to(CUDA), 9, dim=1).cpu(), orbit_pool(x[1:].reshape(3, 37, 8), ids, 9, dim=1)
    )


def test_orbital_pool_and_adjoint_match_cpu():
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    for _ in range(5):
        n, R, Q, P = rng.randint(1, 40), rng.randint(1, 5), rng.choice([1, 4, 6]), rng.randint(1, 3)
        slots = torch.randint(0, R, (n, n), generator=gen)
        x = torch.randn(P, n, Q, dtype=torch.float64, generator=gen)
        g = torch.randn(P, n, R, Q, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(
            ops.orbital_pool(x.to(CUDA), slots.to(CUDA), R).cpu(), ops.orbital_pool(x, slots, R)
        )
        torch.testing.assert_close(
            ops.orbital_pool_backward(g.to(CUDA), slots.to(CUDA)).cpu(), ops.orbital_pool_backward(g, slots)
        )


@pytest.mark.parametrize("name", GROUPS)
def test_orbit_ids_on_the_gpu_match_the_cpu(name):
    n, gens = GROUPS[name]
    g = gens_tensor(n, gens)
    for k in (1, 2, 3):
        ids, num = orbits(g, k)
        ids_gpu, num_gpu = orbits(g.to(CUDA), k)
        assert ids_gpu.is_cuda and num_gpu == num
        assert torch.equal(ids_gpu.cpu(), ids)
    ids, num, tau = orbitals(g.to(CUDA))
    assert torch.equal(ids.T, tau[ids])


def test_orbit_ids_on_the_gpu_at_scale():
    n = 1000
    ids, num = orbits(torch.tensor([cycle(n)], device=CUDA), 2)
    i = torch.arange(n, device=CUDA)
    assert num == n and torch.equal(ids, (i[None] - i[:, None]) % n)
    rng = random.Random(6)
    perm = list(range(3000))
    rng.shuffle(perm)
    perms = torch.tensor([perm, reflection(3000)])
    assert torch.equal(orbits(perms.to(CUDA), 2)[0].cpu(), orbits(perms, 2)[0])


def test_gradcheck_on_the_gpu():
    gen = torch.Generator().manual_seed(7)
    ids = random_ids(gen, (4, 4), 6).to(CUDA)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, generator=gen).to(CUDA).requires_grad_()
    s = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen).to(CUDA).requires_grad_()
    for reduce in ("sum", "mean", "max"):
        fn = lambda t, r=reduce: orbit_pool(t, ids, 7, r, dim=1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
    assert torch.autograd.gradcheck(lambda t: orbit_broadcast(t, ids, dim=1), (s,))
    assert torch.autograd.gradgradcheck(lambda t: orbit_broadcast(t, ids, dim=1), (s,))
    assert torch.autograd.gradcheck(lambda t: orbit_average(t, ids, 6, dim=1), (x,))
    slots = torch.randint(0, 3, (4, 4), generator=gen).to(CUDA)
    y = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen).to(CUDA).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.orbital_pool(t, slots, 3), (y,))
    assert torch.autograd.gradgradcheck(lambda t: ops.orbital_pool(t, slots, 3), (y,))


def test_opcheck_on_cuda_tensors():
    gen = torch.Generator().manual_seed(8)
    ids = random_ids(gen, (9,), 4).to(CUDA)
    x = torch.randn(3, 9, 2, dtype=torch.float64, generator=gen).to(CUDA).requires_grad_()
    s = torch.randn(3, 4, 2, dtype=torch.float64, generator=gen).to(CUDA).requires_grad_()
    slots = torch.randint(0, 3, (5, 5), generator=gen).to(CUDA)
    y = torch.randn(2, 5, 4, generator=gen).to(CUDA).requires_grad_()
    g = torch.randn(2, 5, 3, 4, generator=gen).to(CUDA).requires_grad_()
    lib = torch.ops.equikern
    torch.library.opcheck(lib.orbit_ids.default, (torch.tensor([cycle(4), reflection(4)], device=CUDA), 2))
    for reduce in ("sum", "mean"):
        torch.library.opcheck(lib.orbit_pool.default, (x, ids, 5, reduce))
    torch.library.opcheck(lib.orbit_pool_max.default, (x, ids, 5))
    torch.library.opcheck(lib.orbit_broadcast.default, (s, ids))
    torch.library.opcheck(lib.orbital_pool.default, (y, slots, 3))
    torch.library.opcheck(lib.orbital_pool_backward.default, (g, slots))


def test_bad_inputs_on_the_gpu():
    ids = torch.tensor([0, 1, 1, 2], device=CUDA)
    x = torch.randn(2, 4, 3, device=CUDA)
    with pytest.raises(RuntimeError, match=r"ids\[3\] = 2 is out of range \[0, 2\)"):
        ops.orbit_pool(x, ids, 2)
    with pytest.raises(RuntimeError, match="ids is on cpu"):
        ops.orbit_pool(x, ids.cpu(), 3)
    with pytest.raises(RuntimeError, match="ids has 4 entries, expected 5"):
        ops.orbit_pool(torch.randn(2, 5, 3, device=CUDA), ids, 3)
    with pytest.raises(RuntimeError, match="ids.*out of range"):
        ops.orbit_broadcast(torch.randn(2, 2, 3, device=CUDA), ids)
    with pytest.raises(RuntimeError, match="slots must have shape"):
        ops.orbital_pool(
            torch.randn(1, 2, 1, device=CUDA), torch.zeros(3, 3, dtype=torch.int64, device=CUDA), 2
        )
    with pytest.raises(RuntimeError, match=r"generators\[0\] is not a permutation"):
        orbits(torch.tensor([[0, 0, 1]], device=CUDA))
    with pytest.raises(RuntimeError, match=r"generators\[1, 2\] = 3 is out of range"):
        orbits(torch.tensor([[0, 1, 2], [1, 0, 3]], device=CUDA))
    with pytest.raises(RuntimeError, match="must be int64"):
        ops.orbit_pool(x, ids.int(), 3)


def test_plans_follow_in_place_edits_of_ids():
    ids = torch.tensor([0, 1, 1, 2], device=CUDA)
    x = torch.randn(1, 4, 2, device=CUDA)
    first = ops.orbit_pool(x, ids, 3)
    ids[3] = 0  # bumps the version: the cached plan must not be reused
    second = ops.orbit_pool(x, ids, 3)
    torch.testing.assert_close(second.cpu(), ops.orbit_pool(x.cpu(), ids.cpu(), 3))
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    ("name", "route"), [("C6", "fft"), ("D5", "orbital"), ("S2xS3", "orbital"), ("D5", "dense")]
)
def test_orbit_linear_on_the_gpu(name, route):
    n, gens = GROUPS[name]
    torch.manual_seed(9)
    layer = OrbitLinear(gens_tensor(n, gens), 3, 4, route=route).double()
    x = torch.randn(5, n, 3, dtype=torch.float64, requires_grad=True)
    want = layer(x)
    layer_gpu = OrbitLinear(gens_tensor(n, gens), 3, 4, route=route).double().to(CUDA)
    layer_gpu.load_state_dict(layer.state_dict())
    x_gpu = x.detach().to(CUDA).requires_grad_()
    got = layer_gpu(x_gpu)
    torch.testing.assert_close(got.cpu(), want)
    g = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, x_gpu, g.to(CUDA))[0].cpu(), torch.autograd.grad(want, x, g)[0]
    )
