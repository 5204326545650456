"""The Triton spherical harmonics (equikern.triton.spherical_harmonics) against e3nn and the torch path.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
so sizes stay tiny; with a GPU the same tests run on CUDA tensors, and the `cuda` tests below compare the
GPU to the CPU and run the ops under torch.compile.
"""

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from e3nn import o3  # noqa: E402

import equikern  # noqa: E402
from equikern import so3  # noqa: E402
from equikern.triton import spherical_harmonics as tsh  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
F64 = torch.float64
NORMALIZATIONS = ("integral", "component", "norm")
ops = torch.ops.equikern


def random_shape(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 3)))


def random_vectors(shape, dtype=F64, seed=0, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 3, generator=g, dtype=F64)
    # spread the lengths (normalize=False is a polynomial of x, not of the direction)
    x = x * torch.exp(torch.randn(*shape, 1, generator=g, dtype=F64) * 0.5)
    return x.to(dtype=dtype, device=device)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over the scale of the values (Y_l of an unnormalised x grows like |x|^l)."""
    if want.numel() == 0:
        return 0.0
    got, want = got.detach().to("cpu", F64), want.detach().to("cpu", F64)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def e3nn_ref(ls, x, normalize, normalization):
    """e3nn in float64 on the CPU (the oracle)."""
    return o3.spherical_harmonics(ls, x.detach().to("cpu", F64), normalize, normalization=normalization)


# --------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("lmax", range(7))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_values_match_e3nn(lmax, normalize, normalization, float64_default):
    rng = random.Random(1000 * lmax + 10 * normalize + NORMALIZATIONS.index(normalization))
    ls = list(range(lmax + 1))
    for dtype, tol in ((F64, 1e-13), (torch.float32, 2e-6)):
        shape = random_shape(rng)
        x = random_vectors(shape, dtype, seed=rng.randrange(1 << 30))
        ours = tsh.spherical_harmonics(ls, x, normalize, normalization)
        ref = e3nn_ref(ls, x, normalize, normalization)
        assert ours.shape == (*shape, (lmax + 1) ** 2) and ours.dtype == dtype and ours.device == x.device
        assert rel_err(ours, ref) < tol, (dtype, shape, rel_err(ours, ref))


@pytest.mark.parametrize(
    "ls",
    [
        3,
        [2],
        [4, 0, 2, 2],
        [1, 1, 6],
        (5, 3),
        "0e+1o+2e",
        "2x1o+3x2e+0e",
        "0e+1e+2e+3e",
        o3.Irreps("1o+1x3o"),
    ],
)
def test_every_form_of_ls_matches_e3nn(ls, float64_default):
    rng = random.Random(str(ls))
    for normalize in (True, False):
        normalization = rng.choice(NORMALIZATIONS)
        x = random_vectors(random_shape(rng), seed=rng.randrange(1 << 30))
        ours = tsh.spherical_harmonics(ls, x, normalize, normalization)
        ref = e3nn_ref(ls, x, normalize, normalization)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-13


def test_zero_and_tiny_vectors_like_e3nn(float64_default):
    """normalize=True at |x| < 1e-12: e3nn (F.normalize) gives x / 1e-12; zero x gives Y_0 and zeros."""
    ls = [0, 1, 2, 3]
    x = random_vectors((5,), seed=3)
    x[0] = 0.0
    x[1] *= 1e-13  # below the clamp
    x[2] *= 1e-11  # above it
    for normalize in (True, False):
        ours = tsh.spherical_harmonics(ls, x, normalize, "component")
        assert rel_err(ours, e3nn_ref(ls, x, normalize, "component")) < 1e-13
    # first derivatives agree with the torch path even inside the clamp (where they are ~1e12)
    xr = x.clone().requires_grad_()
    g = torch.randn(5, 16, dtype=F64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (ours,) = torch.autograd.grad(tsh.spherical_harmonics(ls, xr, True, "component"), xr, g)
    (ref,) = torch.autograd.grad(so3.spherical_harmonics(ls, xr, True, "component"), xr, g)
    assert torch.isfinite(ours).all()
    assert ((ours - ref).abs() / ref.abs().clamp_min(1.0)).max() < 1e-12


def test_empty_batch():
    x = torch.empty(0, 2, 3, dtype=F64, device=DEVICE, requires_grad=True)
    y = tsh.spherical_harmonics([0, 1, 2], x, True)
    assert y.shape == (0, 2, 9)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape


def test_non_contiguous_input(float64_default):
    base = random_vectors((4, 5), seed=8)
    x = base.transpose(0, 1)[:, ::2]  # [5, 2, 3], not contiguous
    assert not x.is_contiguous()
    ours = tsh.spherical_harmonics([1, 2, 3], x, True, "norm")
    assert rel_err(ours, e3nn_ref([1, 2, 3], x, True, "norm")) < 1e-13


# ------------------------------------------------------------------------------------------ derivatives


@pytest.mark.parametrize(
    "ls, normalize, normalization",
    [
        ([0, 1, 2, 3], True, "integral"),
        ([3, 1], False, "component"),
        ([2, 4], True, "norm"),
        (5, False, "norm"),
        (0, True, "integral"),
    ],
)
def test_gradcheck_and_gradgradcheck(ls, normalize, normalization):
    rng = random.Random(str((ls, normalize)))
    x = random_vectors(random_shape(rng) or (2,), seed=rng.randrange(1 << 30)).requires_grad_()

    def f(x):
        return tsh.spherical_harmonics(ls, x, normalize, normalization)

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=True)


def _derivatives(fn, ls, x, normalize, normalization, seed):
    """Value, first, second and third derivatives of scalar functionals of fn, as a force-training loop."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = fn(ls, x, normalize, normalization)
    w = torch.randn(y.shape, generator=gen, dtype=F64).to(x.device)
    (d1,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)  # "forces"
    (d2,) = torch.autograd.grad((d1 * d1).sum(), x, create_graph=True)
    (d3,) = torch.autograd.grad(d2.sin().sum(), x)
    return y, d1, d2, d3


@pytest.mark.parametrize("ls, normalize", [([0, 1, 2, 3], True), ([2, 1], False)])
def test_higher_derivatives_match_torch_path(ls, normalize):
    """Up to third order (the jet op differentiated twice) against autograd through so3's torch code."""
    x = random_vectors((3,), seed=11)
    ours = _derivatives(tsh.spherical_harmonics, ls, x, normalize, "integral", seed=12)
    ref = _derivatives(so3.spherical_harmonics, ls, x.cpu(), normalize, "integral", seed=12)
    for order, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a, b) < 1e-11, (order, rel_err(a, b))


def test_forces_training_step_matches_torch_path():
    """Energy -> forces (create_graph) -> loss on forces -> gradients of parameters and positions."""
    ls = [0, 1, 2]
    results = []
    for fn in (tsh.spherical_harmonics, so3.spherical_harmonics):
        torch.manual_seed(5)
        pos = random_vectors((4,), seed=6).cpu().requires_grad_()
        weight = torch.randn(9, dtype=F64, requires_grad=True)
        energy = (fn(ls, pos.to(DEVICE), True, "component") @ weight.to(DEVICE)).tanh().sum()
        (forces,) = torch.autograd.grad(-energy, pos, create_graph=True)
        loss = (forces**2).sum()
        results.append(torch.autograd.grad(loss, (weight, pos)))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("m", [1, 2])
def test_jet_gradcheck(m):
    """The jet op is differentiable in all three inputs (its backward: jets of order m - 1, m, m + 1)."""
    gen = torch.Generator().manual_seed(m)
    n, ls = 2, [1, 2]
    grad = torch.randn(n, 8, generator=gen, dtype=F64).to(DEVICE).requires_grad_()
    x = random_vectors((n,), seed=m).requires_grad_()
    dirs = torch.randn(m, n, 3, generator=gen, dtype=F64).to(DEVICE).requires_grad_()

    def f(grad, x, dirs):
        return ops.triton_spherical_harmonics_jet(grad, x, dirs, ls, True, "norm")

    assert torch.autograd.gradcheck(f, (grad, x, dirs), fast_mode=True)


def test_jet_is_the_directional_derivative():
    """jet(g, x, [v]) = (d/de f(x + e v), grad_x g . d/de f(x + e v)) by finite differences / torch."""
    ls = [0, 2, 3]
    x = random_vectors((3,), seed=21)
    v = random_vectors((3,), seed=22)
    g = torch.randn(3, 13, dtype=F64, generator=torch.Generator().manual_seed(23)).to(DEVICE)
    value, grad_x = ops.triton_spherical_harmonics_jet(g, x, v.unsqueeze(0), ls, False, "integral")
    xr = x.cpu().requires_grad_()
    ref_value = torch.func.jvp(lambda x: so3.spherical_harmonics(ls, x, False), (xr,), (v.cpu(),))[1]
    (ref_grad,) = torch.autograd.grad((ref_value * g.cpu()).sum(), xr)
    assert rel_err(value, ref_value) < 1e-12
    assert rel_err(grad_x, ref_grad) < 1e-12


# ------------------------------------------------------------------------------------------ ops, compile


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x = random_vectors((3,), seed=30).requires_grad_()
    grad = torch.randn(3, 9, generator=gen, dtype=F64).to(DEVICE).requires_grad_()
    for m in (1, 2):
        dirs = torch.randn(m, 3, 3, generator=gen, dtype=F64).to(DEVICE).requires_grad_()
        torch.library.opcheck(
            ops.triton_spherical_harmonics_jet.default, (grad, x, dirs, [2, 0, 1], True, "norm")
        )
    torch.library.opcheck(ops.triton_spherical_harmonics.default, (x, [0, 1, 2], True, "integral"))
    torch.library.opcheck(ops.triton_spherical_harmonics.default, (x.float(), [2, 1, 0], False, "component"))
    torch.library.opcheck(
        ops.triton_spherical_harmonics_backward.default, (grad, x, [1, 2, 0], False, "norm")
    )


def _compile_check(device):
    ls = [0, 1, 2, 3]

    def f(x):
        return (
            equikern.spherical_harmonics(ls, x, True) if x.is_cuda else tsh.spherical_harmonics(ls, x, True)
        )

    compiled = torch.compile(f, fullgraph=True)
    x = random_vectors((5, 2), seed=40, device=device).requires_grad_()
    y = compiled(x)
    assert rel_err(y, e3nn_ref(ls, x, True, "integral")) < 1e-13
    w = torch.randn_like(y)
    (gc,) = torch.autograd.grad(y, x, w)
    (ge,) = torch.autograd.grad(f(x), x, w)
    assert rel_err(gc, ge) < 1e-13
    # the backward and double-backward ops on their own, compiled
    g = torch.randn(10, 16, dtype=F64, device=device)
    v = torch.randn(1, 10, 3, dtype=F64, device=device)
    xf = x.detach().reshape(10, 3)
    bwd = torch.compile(
        lambda g, x: ops.triton_spherical_harmonics_backward(g, x, ls, True, "integral"), fullgraph=True
    )
    jet = torch.compile(
        lambda g, x, v: ops.triton_spherical_harmonics_jet(g, x, v, ls, True, "integral"), fullgraph=True
    )
    assert rel_err(bwd(g, xf), ops.triton_spherical_harmonics_backward(g, xf, ls, True, "integral")) < 1e-13
    for a, b in zip(jet(g, xf, v), ops.triton_spherical_harmonics_jet(g, xf, v, ls, True, "integral")):
        assert rel_err(a, b) < 1e-13


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter variant; the GPU runs test_compile_fullgraph_cuda")
def test_compile_fullgraph_interpreter():
    torch._dynamo.reset()
    _compile_check(torch.device("cpu"))


def test_export_keeps_the_op():
    class M(torch.nn.Module):
        def forward(self, x):
            return tsh.spherical_harmonics([0, 1, 2], x, True, "norm")

    x = random_vectors((4,), seed=50)
    ep = torch.export.export(M(), (x,))
    assert "triton_spherical_harmonics" in str(ep.graph)
    assert rel_err(ep.module()(x), e3nn_ref([0, 1, 2], x, True, "norm")) < 1e-13


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "ls, x, normalization, match",
    [
        ([0, 1], torch.zeros(4, 2), "integral", r"shape \[\.\.\., 3\]"),
        ([0, 1], torch.zeros(3, 4), "integral", r"shape \[\.\.\., 3\]"),
        ([0, 1], torch.zeros(4, 3, dtype=torch.int64), "integral", "floating dtype"),
        ([0, -1], torch.zeros(4, 3), "integral", "l must be >= 0"),
        (-2, torch.zeros(4, 3), "integral", "l must be >= 0"),
        ([], torch.zeros(4, 3), "integral", "at least one l"),
        ([0, 1], torch.zeros(4, 3), "unit", "normalization must be one of"),
        ("0e+1e+2o", torch.zeros(4, 3), "integral", "p = \\(-1\\)\\^l"),
    ],
)
def test_bad_input(ls, x, normalization, match):
    with pytest.raises(ValueError, match=match):
        tsh.spherical_harmonics(ls, x.to(DEVICE) + 1, True, normalization)


def test_bad_input_raw_ops():
    x = random_vectors((4,), seed=60)
    g = torch.randn(4, 9, dtype=F64, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3\]"):
        ops.triton_spherical_harmonics(x.reshape(2, 2, 3), [0, 1, 2], True, "integral")
    with pytest.raises(ValueError, match="degrees must be >= 0"):
        ops.triton_spherical_harmonics(x, [0, -1], True, "integral")
    with pytest.raises(ValueError, match="normalization must be one of"):
        ops.triton_spherical_harmonics(x, [0, 1], True, "Integral")
    with pytest.raises(ValueError, match=r"grad must have shape \[4, 9\]"):
        ops.triton_spherical_harmonics_backward(g[:, :8], x, [0, 1, 2], True, "integral")
    with pytest.raises(ValueError, match="grad must have x's dtype"):
        ops.triton_spherical_harmonics_backward(g.float(), x, [0, 1, 2], True, "integral")
    with pytest.raises(ValueError, match=r"directions must have shape \[m >= 1, N, 3\]"):
        ops.triton_spherical_harmonics_jet(g, x, x, [0, 1, 2], True, "integral")
    with pytest.raises(ValueError, match=r"directions must have shape \[1, 4, 3\]"):
        ops.triton_spherical_harmonics_jet(g, x, x[:3].unsqueeze(0), [0, 1, 2], True, "integral")


@pytest.mark.skipif(HAS_CUDA, reason="float16 is accepted on the GPU")
def test_half_precision_needs_a_gpu():
    with pytest.raises(ValueError, match="floating dtype in"):
        tsh.spherical_harmonics([0, 1], torch.ones(2, 3, dtype=torch.float16), True)


# ------------------------------------------------------------------------------------------ plumbing


def test_kernel_source_and_disk_cache(tmp_path, monkeypatch):
    src = tsh.spherical_harmonics_kernel_source([1, 4], True, "norm", "float64", m=1, value=True, grad=True)
    assert "@triton.jit" in src and "tl.float64" in src and "tl.sqrt(" in src
    assert "tl.float32" in tsh.spherical_harmonics_kernel_source([1], False, compute="float32")
    # every constant is written at float64 precision: sqrt(3) / sqrt(4 pi) (Y_1's factor) appears exactly
    assert repr((1 / math.sqrt(4 * math.pi)) * math.sqrt(3)) in tsh.spherical_harmonics_kernel_source(
        [1], False
    )
    monkeypatch.setenv("EQUIKERN_CACHE_DIR", str(tmp_path))
    unique = src + "# test_kernel_source_and_disk_cache\n"
    mod = tsh._import_source(unique)
    files = list((tmp_path / "triton").glob("sh_*.py"))
    assert len(files) == 1 and files[0].read_text() == unique
    assert tsh._import_source(unique) is mod  # in memory afterwards


def test_cpu_tensors_stay_on_the_torch_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("CPU tensors must not be routed to Triton")

    monkeypatch.setattr(tsh, "spherical_harmonics", fail)
    x = random_vectors((3,), device="cpu")
    torch.testing.assert_close(
        equikern.spherical_harmonics([0, 1], x, True), e3nn_ref([0, 1], x, True, "integral")
    )


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.parametrize(
    "dtype, tol", [(F64, 1e-13), (torch.float32, 2e-6), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)]
)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lmax", [2, 6])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu(dtype, tol, normalize, lmax):
    ls = list(range(lmax + 1))
    x_cpu = random_vectors((1000,), seed=70, device="cpu")
    if not normalize:
        x_cpu = x_cpu / x_cpu.norm(dim=-1, keepdim=True).clamp_min(0.5)  # keep |x|^6 in half range
    x = x_cpu.to("cuda", dtype)
    routed = equikern.spherical_harmonics(ls, x, normalize)  # CUDA -> Triton
    direct = tsh.spherical_harmonics(ls, x, normalize)
    ref = so3.spherical_harmonics(ls, x.to("cpu", F64), normalize)
    assert routed.device.type == "cuda" and routed.dtype == dtype
    assert torch.equal(routed, direct)
    assert rel_err(routed, ref) < tol
    if dtype == F64:  # derivatives, GPU against CPU
        for a, b in zip(
            _derivatives(tsh.spherical_harmonics, ls, x[:50], normalize, "norm", seed=71),
            _derivatives(so3.spherical_harmonics, ls, x_cpu[:50], normalize, "norm", seed=71),
        ):
            assert rel_err(a, b) < 1e-11


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_cuda_is_routed_to_triton(monkeypatch):
    called = []
    real = tsh.spherical_harmonics

    def spy(*args, **kwargs):
        called.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(tsh, "spherical_harmonics", spy)
    equikern.spherical_harmonics([0, 1, 2], torch.randn(8, 3, device="cuda"), True)
    assert called


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_compile_fullgraph_cuda():
    torch._dynamo.reset()
    _compile_check(torch.device("cuda"))
