"""equikern.TensorProduct against e3nn.o3.TensorProduct (the reference semantics)."""

import random

import pytest
import torch
from e3nn import o3

import equikern
from equikern.ops.tensor_product import tensor_product, tensor_product_backward

MODES = ["uvw", "uvu", "uvv", "uuw", "uuu", "uvuv"]
pytestmark = pytest.mark.usefixtures("float64_default")


def random_irreps(rng: random.Random, n: int, lmax: int = 3, max_mul: int = 4) -> str:
    return "+".join(f"{rng.randint(1, max_mul)}x{rng.randint(0, lmax)}{rng.choice('eo')}" for _ in range(n))


def random_problem(rng: random.Random, mode: str, weighted=None, lmax=3, max_mul=4):
    """Random irreps and instructions of one mode; several paths may share an output block."""
    irreps1 = o3.Irreps(random_irreps(rng, rng.randint(1, 3), lmax, max_mul))
    if mode.startswith("uu"):  # same multiplicities on both inputs
        irreps2 = o3.Irreps([(mul, (rng.randint(0, lmax), rng.choice((1, -1)))) for mul, _ in irreps1])
    else:
        irreps2 = o3.Irreps(random_irreps(rng, rng.randint(1, 3), lmax, max_mul))
    out, instr = [], []
    for _ in range(rng.randint(1, 5)):
        i1 = rng.randrange(len(irreps1))
        i2 = i1 if mode.startswith("uu") else rng.randrange(len(irreps2))
        (m1, ir1), (m2, ir2) = irreps1[i1], irreps2[i2]
        ir = rng.choice(list(ir1 * ir2))
        has_weight = (rng.random() < 0.7) if weighted is None else weighted
        if mode == "uvw":
            has_weight = True
        mul = {
            "uvw": rng.randint(1, max_mul),
            "uvu": m1,
            "uvv": m2,
            "uuw": rng.randint(1, max_mul),
            "uuu": m1,
            "uvuv": m1 * m2,
        }[mode]
        if mode == "uuw" and not has_weight:
            mul = 1
        reuse = [k for k, (mk, irk) in enumerate(out) if (mk, irk) == (mul, ir)]
        if reuse and rng.random() < 0.5:
            k = rng.choice(reuse)
        else:
            k = len(out)
            out.append((mul, ir))
        path_weight = rng.choice([1.0, 0.5 + rng.random()])
        instr.append((i1, i2, k, mode, has_weight, path_weight))
    return irreps1, irreps2, o3.Irreps(out), instr


def pair(rng, mode, dtype=torch.float64, **options):
    irreps1, irreps2, irreps_out, instr = random_problem(rng, mode)
    ref = o3.TensorProduct(irreps1, irreps2, irreps_out, instr, **options).to(dtype)
    ours = equikern.TensorProduct(irreps1, irreps2, irreps_out, instr, **options).to(dtype)
    if ref.internal_weights:
        ours.load_state_dict(ref.state_dict())
    return ref, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def inputs(ref, batch, dtype, gen, requires_grad=False):
    x = torch.randn(*batch, ref.irreps_in1.dim, dtype=dtype, generator=gen)
    y = torch.randn(*batch, ref.irreps_in2.dim, dtype=dtype, generator=gen)
    w = None
    if ref.weight_numel and not ref.internal_weights:
        wshape = (ref.weight_numel,) if ref.shared_weights else (*batch, ref.weight_numel)
        w = torch.randn(*wshape, dtype=dtype, generator=gen)
    if requires_grad:
        for t in (x, y, w):
            if t is not None:
                t.requires_grad_(True)
    return x, y, w


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_e3nn(mode, dtype):
    rng = random.Random(hash((mode, str(dtype))) % 1000)
    gen = torch.Generator().manual_seed(0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for trial in range(6):
        options = {
            "irrep_normalization": rng.choice(["component", "norm", "none", None]),
            "path_normalization": rng.choice(["element", "path", "none", None]),
            "shared_weights": rng.choice([True, False, None]),
        }
        if options["shared_weights"] is False:
            options["internal_weights"] = False
        ref, ours = pair(rng, mode, dtype, **options)
        assert ours.weight_numel == ref.weight_numel
        assert str(ours.irreps_out) == str(ref.irreps_out)
        for a, b in zip(ours.instructions, ref.instructions, strict=True):
            assert tuple(a)[:5] + tuple(a)[6:] == tuple(b)[:5] + tuple(b)[6:]
            assert a.path_weight == pytest.approx(b.path_weight, rel=1e-12)
        assert torch.equal(ours.output_mask, ref.output_mask)
        batch = rng.choice([(7,), (3, 5), (1,), (2, 1, 4)])
        x, y, w = inputs(ref, batch, dtype, gen)
        expected = ref(x, y, w)
        got = ours(x, y, w)
        assert got.shape == expected.shape
        assert rel_err(got, expected) < tol, (mode, trial, options)


@pytest.mark.parametrize("mode", MODES)
def test_variances_and_gradients_match_e3nn(mode):
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(1)
    irreps1, irreps2, irreps_out, instr = random_problem(rng, mode)
    options = {
        "in1_var": [0.5 + rng.random() for _ in irreps1],
        "in2_var": [0.5 + rng.random() for _ in irreps2],
        "out_var": [0.5 + rng.random() for _ in irreps_out],
        "shared_weights": False,
        "internal_weights": False,
    }
    ref = o3.TensorProduct(irreps1, irreps2, irreps_out, instr, **options).double()
    ours = equikern.TensorProduct(irreps1, irreps2, irreps_out, instr, **options)
    x, y, w = inputs(ref, (6,), torch.float64, gen, requires_grad=True)
    g = torch.randn(6, ref.irreps_out.dim, dtype=torch.float64, generator=gen)
    args = [t for t in (x, y, w) if t is not None]
    expected = torch.autograd.grad(ref(x, y, w), args, g)
    got = torch.autograd.grad(ours(x, y, w), args, g)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-10


def test_broadcasting_like_e3nn():
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(2)
    irreps1, irreps2, irreps_out, instr = random_problem(rng, "uvu", weighted=True)
    ref = o3.TensorProduct(
        irreps1, irreps2, irreps_out, instr, shared_weights=False, internal_weights=False
    ).double()
    ours = equikern.TensorProduct(
        irreps1, irreps2, irreps_out, instr, shared_weights=False, internal_weights=False
    )
    x = torch.randn(4, 1, irreps1.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(5, irreps2.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(1, 1, ref.weight_numel, dtype=torch.float64, generator=gen, requires_grad=True)
    expected, got = ref(x, y, w), ours(x, y, w)
    assert got.shape == expected.shape == (4, 5, irreps_out.dim)
    assert rel_err(got, expected) < 1e-12
    g = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, (x, y, w), g), torch.autograd.grad(expected, (x, y, w), g)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck(mode):
    rng = random.Random(11)
    irreps1, irreps2, irreps_out, instr = random_problem(rng, mode, lmax=2, max_mul=2)
    for shared in (False, True):
        tp = equikern.TensorProduct(
            irreps1, irreps2, irreps_out, instr, shared_weights=shared, internal_weights=False
        )
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(3, irreps1.dim, dtype=torch.float64, generator=gen, requires_grad=True)
        y = torch.randn(1, irreps2.dim, dtype=torch.float64, generator=gen, requires_grad=True)  # broadcast
        wshape = (tp.weight_numel,) if shared else (3, tp.weight_numel)
        w = torch.randn(*wshape, dtype=torch.float64, generator=gen, requires_grad=True)
        if tp.weight_numel == 0:
            fn, args = tp, (x, y)
        else:
            fn, args = tp, (x, y, w)
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def plan_args(tp):
    return (tp._paths, tp._blocks, tp._cg_ijk, tp._cg_bits.view(torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    rng = random.Random(5)
    irreps1, irreps2, irreps_out, instr = random_problem(rng, mode, weighted=True)
    tp = equikern.TensorProduct(
        irreps1, irreps2, irreps_out, instr, shared_weights=False, internal_weights=False
    )
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(5, irreps1.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    x2 = torch.randn(5, irreps2.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(1, tp.weight_numel, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(5, irreps_out.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.library.opcheck(
        torch.ops.equikern.tensor_product.default, (x1, x2, w, *plan_args(tp), irreps_out.dim)
    )
    torch.library.opcheck(torch.ops.equikern.tensor_product_backward.default, (g, x1, x2, w, *plan_args(tp)))


def test_forces_second_derivative_matches_e3nn():
    """Energy from a TP of spherical harmonics of positions: forces and their gradient (training)."""
    gen = torch.Generator().manual_seed(5)
    irreps_sh = o3.Irreps.spherical_harmonics(3)
    irreps_in = o3.Irreps("4x0e+3x1o+2x2e")
    out, instr = equikern.nn.channelwise_instructions(irreps_in, irreps_sh, "0e+1o+2e")
    ref = o3.TensorProduct(
        irreps_in, irreps_sh, out, instr, shared_weights=False, internal_weights=False
    ).double()
    ours = equikern.TensorProduct(
        irreps_in, irreps_sh, out, instr, shared_weights=False, internal_weights=False
    )
    feats = torch.randn(10, irreps_in.dim, dtype=torch.float64, generator=gen)
    w = torch.randn(10, ref.weight_numel, dtype=torch.float64, generator=gen, requires_grad=True)
    readout = torch.randn(out.dim, dtype=torch.float64, generator=gen)

    def loss(tp):
        pos = torch.randn(
            10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)
        ).requires_grad_()
        sh = o3.spherical_harmonics(irreps_sh, pos, normalize=True)
        energy = (tp(feats, sh, w) @ readout).pow(2).sum()
        (forces,) = torch.autograd.grad(energy, pos, create_graph=True)
        (gw,) = torch.autograd.grad(forces.pow(2).sum(), w)
        return forces, gw

    for a, b in zip(loss(ours), loss(ref)):
        assert rel_err(a, b) < 1e-10


def test_equivariance_under_rotations_and_parity():
    gen = torch.Generator().manual_seed(7)
    tp = equikern.FullyConnectedTensorProduct(
        "2x0e+2x1o+1x2e", "0e+1o+1e+2e", "3x0e+2x1o+2x1e+1x2o+1x2e"
    ).double()
    x = torch.randn(4, tp.irreps_in1.dim, dtype=torch.float64, generator=gen)
    y = torch.randn(4, tp.irreps_in2.dim, dtype=torch.float64, generator=gen)
    for sign in (1, -1):
        rot = sign * o3.rand_matrix(dtype=torch.float64)
        d1, d2, do = (
            o3.Irreps(str(i)).D_from_matrix(rot) for i in (tp.irreps_in1, tp.irreps_in2, tp.irreps_out)
        )
        assert rel_err(tp(x @ d1.T, y @ d2.T), tp(x, y) @ do.T) < 1e-12


def test_subclasses_match_e3nn():
    gen = torch.Generator().manual_seed(8)
    cases = [
        (
            o3.FullyConnectedTensorProduct,
            equikern.FullyConnectedTensorProduct,
            ("2x0e+1x1o", "1x1o+1x2e", "2x1o+1x2e"),
        ),
        (o3.ElementwiseTensorProduct, equikern.ElementwiseTensorProduct, ("3x0e+2x1o", "2x1e+3x2o")),
        (o3.FullTensorProduct, equikern.FullTensorProduct, ("2x0e+1x1o", "1x1o+2x2e")),
    ]
    for ref_cls, our_cls, args in cases:
        ref = ref_cls(*args).double()
        ours = our_cls(*args).double()
        assert str(ours.irreps_out) == str(ref.irreps_out)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(5, ref.irreps_in1.dim, dtype=torch.float64, generator=gen)
        y = torch.randn(5, ref.irreps_in2.dim, dtype=torch.float64, generator=gen)
        assert rel_err(ours(x, y), ref(x, y)) < 1e-12
    filt = ["0e", "1o"]
    ref = o3.FullTensorProduct("2x1o", "1x1o+1x2e", filter_ir_out=filt)
    assert str(equikern.FullTensorProduct("2x1o", "1x1o+1x2e", filter_ir_out=filt).irreps_out) == str(
        ref.irreps_out
    )


def test_channelwise_matches_anchor_dims():
    # dims of the anchors' mace-large problem: in1, in2, out, weights
    tp = equikern.ChannelwiseTensorProduct(
        "128x0e+128x1o+128x2e", "0e+1o+2e+3o", "128x0e+128x1o+128x2e+128x3o"
    )
    assert (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.irreps_out.dim, tp.weight_numel) == (
        1152,
        16,
        9088,
        2176,
    )


def test_from_e3nn_and_accelerate():
    gen = torch.Generator().manual_seed(9)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tp1 = o3.FullyConnectedTensorProduct("2x0e+2x1o", "0e+1o", "3x0e+2x1o")
            self.lin = o3.Linear("3x0e+2x1o", "2x0e+2x1o")
            self.blocks = torch.nn.ModuleList(
                [o3.FullyConnectedTensorProduct("2x0e+2x1o", "0e+1o", "1x0e") for _ in range(2)]
            )

        def forward(self, x, y):
            h = self.lin(self.tp1(x, y))
            return sum(b(h, y) for b in self.blocks)

    model = Model().double()
    x = torch.randn(6, 8, dtype=torch.float64, generator=gen)
    y = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    before = model(x, y)
    assert equikern.accelerate(model) == 3
    assert isinstance(model.tp1, equikern.TensorProduct)
    assert isinstance(model.blocks[1], equikern.TensorProduct)
    assert rel_err(model(x, y), before) < 1e-12
    assert equikern.accelerate(model) == 0

    ref = o3.FullyConnectedTensorProduct(
        "2x0e", "1o", "2x1o", irrep_normalization="norm", path_normalization="path"
    )
    conv = equikern.from_e3nn(ref)
    x2, y2 = torch.randn(3, 2, generator=gen), torch.randn(3, 3, generator=gen)
    assert rel_err(conv(x2, y2), ref(x2, y2)) < 1e-6
    with pytest.raises(ValueError, match="module"):
        equikern.from_e3nn(torch.nn.Linear(2, 2))


def test_state_dict_round_trip_with_e3nn():
    ref = o3.FullyConnectedTensorProduct("2x0e+1x1o", "0e+1o", "1x0e+1x1o")
    ours = equikern.FullyConnectedTensorProduct("2x0e+1x1o", "0e+1o", "1x0e+1x1o")
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.weight, ref.weight)
    assert set(ours.state_dict()) == {"weight", "output_mask"}


def test_float_cast_keeps_float64_coefficients():
    tp = equikern.FullyConnectedTensorProduct("1x1o", "1x1o", "1x0e").float().double()
    ref = o3.FullyConnectedTensorProduct("1x1o", "1x1o", "1x0e").double()
    tp.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert rel_err(tp(x, y), ref(x, y)) < 1e-14


def test_right_matches_forward():
    tp = equikern.FullyConnectedTensorProduct("2x0e+1x1o", "0e+1o", "1x0e+2x1o").double()
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert rel_err(torch.einsum("zi,zio->zo", x, tp.right(y)), tp(x, y)) < 1e-12


def test_empty_batch_and_no_paths():
    tp = equikern.FullyConnectedTensorProduct("2x0e+1x1o", "0e+1o", "1x0e+2x1o")
    assert tp(torch.randn(0, 5), torch.randn(0, 4)).shape == (0, 7)
    assert tp(torch.randn(2, 0, 5), torch.randn(4)).shape == (2, 0, 7)
    none = equikern.TensorProduct("1x0e", "1x0e", "1x1o", [])
    assert torch.equal(none(torch.randn(3, 1), torch.randn(3, 1)), torch.zeros(3, 3))


def test_torch_compile_fullgraph_and_export():
    gen = torch.Generator().manual_seed(10)
    tp = equikern.ChannelwiseTensorProduct("4x0e+4x1o", "0e+1o+2e", "4x0e+4x1o+4x2e")
    x = torch.randn(6, tp.irreps_in1.dim, generator=gen, requires_grad=True)
    y = torch.randn(6, tp.irreps_in2.dim, generator=gen, requires_grad=True)
    w = torch.randn(6, tp.weight_numel, generator=gen, requires_grad=True)
    compiled = torch.compile(tp, fullgraph=True)
    out = compiled(x, y, w)
    expected = tp(x, y, w)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, y, w), g), torch.autograd.grad(expected, (x, y, w), g)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    args = (x.detach(), y.detach(), w.detach())
    exported = torch.export.export(tp, args)
    assert torch.allclose(exported.module()(*args), tp(*args))


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    cases = [
        (("1x0e", "1x0e", "1x1o", [(0, 0, 0, "uvw", True)]), "parity|triangle"),
        (("1x1o", "1x1o", "1x0o", [(0, 0, 0, "uvw", True)]), "parity"),
        (("1x1o", "1x1o", "1x3e", [(0, 0, 0, "uvw", True)]), "triangle"),
        (("1x0e", "1x0e", "1x0e", [(0, 0, 0, "xyz", True)]), "connection mode"),
        (("1x0e", "1x0e", "1x0e", [(0, 0, 1, "uvw", True)]), "i_out"),
        (("1x0e", "1x0e", "1x0e", [(0, 0, 0, "uvw", False)]), "has_weight"),
        (("2x0e", "1x0e", "1x0e", [(0, 0, 0, "uvu", True)]), "mul"),
        (("1x0e", "1x0e", "1x0e", [(0, 0, 0, "uvw", True, float("nan"))]), "path_weight"),
        (("1x0e", "1x0e", "1x0e", [(0, 0, 0)]), "instructions"),
        (("1x0q", "1x0e", "1x0e", []), "irreps"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            equikern.TensorProduct(*args)
    with pytest.raises(ValueError, match="irrep_normalization"):
        equikern.TensorProduct("1x0e", "1x0e", "1x0e", [], irrep_normalization="bad")
    with pytest.raises(ValueError, match="path_normalization"):
        equikern.TensorProduct("1x0e", "1x0e", "1x0e", [], path_normalization="bad")
    with pytest.raises(ValueError, match="in1_var"):
        equikern.TensorProduct("1x0e", "1x0e", "1x0e", [], in1_var=[1.0, 2.0])
    with pytest.raises(ValueError, match="in2_var"):
        equikern.TensorProduct("1x0e", "1x0e", "1x0e", [], in2_var=[float("inf")])
    with pytest.raises(ValueError, match="internal_weights"):
        equikern.TensorProduct("1x0e", "1x0e", "1x0e", [], internal_weights=True, shared_weights=False)


def test_bad_forward_inputs():
    tp = equikern.ChannelwiseTensorProduct("2x0e+2x1o", "0e+1o", "2x0e+2x1o")
    x, y, w = torch.randn(4, 8), torch.randn(4, 4), torch.randn(4, tp.weight_numel)
    with pytest.raises(ValueError, match="x: expected shape"):
        tp(torch.randn(4, 7), y, w)
    with pytest.raises(ValueError, match="y: expected shape"):
        tp(x, torch.randn(4, 5), w)
    with pytest.raises(ValueError, match="weight: expected shape"):
        tp(x, y, torch.randn(4, 3))
    with pytest.raises(ValueError, match="weight: required"):
        tp(x, y)
    with pytest.raises(ValueError, match="dtypes differ"):
        tp(x, y.float(), w)
    with pytest.raises(ValueError, match="do not broadcast"):
        tp(x, torch.randn(3, 4), w)
    with pytest.raises(ValueError, match="do not broadcast"):
        tp(x, y, torch.randn(5, tp.weight_numel))
    shared = equikern.FullyConnectedTensorProduct(
        "1x0e", "1x0e", "1x0e", shared_weights=True, internal_weights=False
    )
    with pytest.raises(ValueError, match="shared weights"):
        shared(torch.randn(2, 1), torch.randn(2, 1), torch.randn(2, 1))


def test_op_rejects_inconsistent_plans():
    """The raw op validates its tables: nothing can make the kernel index out of bounds."""
    tp = equikern.ChannelwiseTensorProduct("2x0e+2x1o", "0e+1o", "2x0e+2x1o")
    paths, blocks, ijk, val = plan_args(tp)
    x1, x2, w = torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, tp.weight_numel)
    out_dim = tp.irreps_out.dim
    bad = paths.clone()
    bad[0, 1] = 100  # in1 offset past the end
    with pytest.raises(RuntimeError, match="out of range"):
        tensor_product(x1, x2, w, bad, blocks, ijk, val, out_dim)
    bad_ijk = ijk.clone()
    bad_ijk[-1, 2] = 50
    with pytest.raises(RuntimeError, match="out of range"):
        tensor_product(x1, x2, w, paths, blocks, bad_ijk, val, out_dim)
    with pytest.raises(RuntimeError, match="weights are out of range"):
        tensor_product(x1, x2, w[:, :-1], paths, blocks, ijk, val, out_dim)
    with pytest.raises(RuntimeError, match="out of range"):
        tensor_product(x1, x2, w, paths, blocks, ijk, val, out_dim - 1)
    with pytest.raises(RuntimeError, match="batch sizes differ"):
        tensor_product(x1, x2[:2], w, paths, blocks, ijk, val, out_dim)
    with pytest.raises(RuntimeError, match="dtype"):
        tensor_product(x1, x2.float(), w, paths, blocks, ijk, val, out_dim)
    with pytest.raises(RuntimeError, match="grad_out"):
        tensor_product_backward(torch.randn(2, out_dim), x1, x2, w, paths, blocks, ijk, val)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channelwise_high_degrees_match_e3nn(dtype):
    """The channelwise fast route specialises small degrees; l = 4..5 exercises its generic code."""
    gen = torch.Generator().manual_seed(12)
    irreps_in, irreps_sh = "3x0e+2x4e+2x5o", "0e+1o+4e+5o"
    out, instr = equikern.nn.channelwise_instructions(irreps_in, irreps_sh, "0e+1o+3o+4e+5o")
    ref = o3.TensorProduct(irreps_in, irreps_sh, out, instr, shared_weights=False, internal_weights=False).to(
        dtype
    )
    ours = equikern.TensorProduct(
        irreps_in, irreps_sh, out, instr, shared_weights=False, internal_weights=False
    )
    x, y, w = inputs(ref, (9,), dtype, gen, requires_grad=True)
    expected, got = ref(x, y, w), ours(x, y, w)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(got, expected) < tol
    g = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, (x, y, w), g), torch.autograd.grad(expected, (x, y, w), g)):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", ["none", "x", "y", "weight"])
@pytest.mark.parametrize("mul", [8, 13, 19, 33])
def test_channelwise_vector_paths_match_e3nn(dtype, shared, mul):
    """Channel counts around whole SIMD vectors (in-register block moves, lane permutations, padded
    tails) with l <= 3 and a generic l = 4 block, each operand in turn shared by the whole batch."""
    gen = torch.Generator().manual_seed(13 + mul)
    irreps_in = f"{mul}x0e+{mul + 3}x1o+{mul}x2e+{mul + 1}x3o+5x4e"
    irreps_sh = "0e+1o+2e+3o"
    out, instr = equikern.nn.channelwise_instructions(irreps_in, irreps_sh, "0e+1o+2e+3o+4e")
    ref = o3.TensorProduct(
        irreps_in, irreps_sh, out, instr, shared_weights=shared == "weight", internal_weights=False
    ).to(dtype)
    ours = equikern.TensorProduct(
        irreps_in, irreps_sh, out, instr, shared_weights=shared == "weight", internal_weights=False
    )
    x, y, w = inputs(ref, (7,), dtype, gen)
    if shared == "x":
        x = x[:1]
    if shared == "y":
        y = y[:1]
    for t in (x, y, w):
        t.requires_grad_(True)
    expected, got = ref(x, y, w), ours(x, y, w)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert got.shape == expected.shape
    assert rel_err(got, expected) < tol
    g = torch.randn(expected.shape, dtype=dtype, generator=gen)
    for a, b in zip(torch.autograd.grad(got, (x, y, w), g), torch.autograd.grad(expected, (x, y, w), g)):
        assert rel_err(a, b) < tol
