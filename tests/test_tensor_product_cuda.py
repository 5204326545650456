"""The CUDA tensor product against e3nn and the CPU path (skipped without a GPU)."""

import random

import pytest
import torch
from e3nn import o3

import equikern
from test_tensor_product import MODES, inputs, random_problem, rel_err

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["native", "auto"])
def test_cuda_matches_e3nn_forward_backward(mode, dtype, backend):
    rng = random.Random(hash((mode, "cuda")) % 1000)
    gen = torch.Generator().manual_seed(0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for _ in range(4):
        shared = rng.choice([True, False])
        options = {"shared_weights": shared, "internal_weights": False}
        irreps1, irreps2, irreps_out, instr = random_problem(rng, mode)
        ref = o3.TensorProduct(irreps1, irreps2, irreps_out, instr, **options).to(dtype)
        ours = equikern.TensorProduct(irreps1, irreps2, irreps_out, instr, backend=backend, **options).cuda()
        x, y, w = inputs(ref, (37,), dtype, gen, requires_grad=True)
        args = [t for t in (x, y, w) if t is not None]
        expected = ref(x, y, w)
        g = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, args, g)
        cuda_args = [t.detach().cuda().requires_grad_() for t in args]
        got = ours(*cuda_args[:2], cuda_args[2] if w is not None else None)
        assert rel_err(got.cpu(), expected) < tol
        for a, b in zip(torch.autograd.grad(got, cuda_args, g.cuda()), expected_grads):
            assert rel_err(a.cpu(), b) < tol


@pytest.mark.parametrize("mode", MODES)
def test_cuda_double_backward_matches_cpu(mode):
    rng = random.Random(3)
    irreps1, irreps2, irreps_out, instr = random_problem(rng, mode, weighted=True)
    tp = equikern.TensorProduct(
        irreps1, irreps2, irreps_out, instr, shared_weights=False, internal_weights=False
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, irreps1.dim, generator=gen)
    y = torch.randn(1, irreps2.dim, generator=gen)  # broadcast operand
    w = torch.randn(9, tp.weight_numel, generator=gen)

    def second(tp, device):
        a, b, c = (t.to(device).requires_grad_() for t in (x, y, w))
        out = tp.to(device)(a, b, c)
        grads = torch.autograd.grad(out.pow(2).sum(), (a, b, c), create_graph=True)
        return torch.autograd.grad(sum(gr.pow(2).sum() for gr in grads), (a, b, c))

    for a, b in zip(second(tp, "cuda"), second(tp, "cpu")):
        assert rel_err(a.cpu(), b) < 1e-10


def test_cuda_is_deterministic_and_compiles():
    tp = equikern.ChannelwiseTensorProduct(
        "32x0e+32x1o+32x2e", "0e+1o+2e+3o", "32x0e+32x1o+32x2e+32x3o"
    ).cuda()
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1000, tp.irreps_in1.dim, device="cuda", generator=gen, dtype=torch.float32)
    y = torch.randn(1000, tp.irreps_in2.dim, device="cuda", generator=gen, dtype=torch.float32)
    w = torch.randn(
        1000, tp.weight_numel, device="cuda", generator=gen, dtype=torch.float32, requires_grad=True
    )
    first, second = tp(x, y, w), tp(x, y, w)
    assert torch.equal(first, second)
    (g1,) = torch.autograd.grad(first.sum(), w)
    (g2,) = torch.autograd.grad(second.sum(), w)
    assert torch.equal(g1, g2)
    compiled = torch.compile(tp, fullgraph=True)
    assert torch.allclose(compiled(x, y, w), first, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(tp, (x, y, w.detach()))
    assert torch.allclose(exported.module()(x, y, w.detach()), first.detach(), rtol=1e-5, atol=1e-5)


def test_cuda_bad_input():
    tp = equikern.ChannelwiseTensorProduct("2x0e+2x1o", "0e+1o", "2x0e+2x1o").cuda()
    x, y, w = torch.randn(4, 8), torch.randn(4, 4), torch.randn(4, tp.weight_numel)
    with pytest.raises(ValueError, match="devices differ"):
        tp(x.cuda(), y, w.cuda())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_channelwise_route_matches_cpu(dtype, broadcast, backend):
    """The channelwise routes (uvu, mul2 = 1, one path per output block), up to l = 4."""
    irreps = ("40x0e+40x1o+40x2e+3x4e", "0e+1o+2e+3o+4e", "0e+1o+2e+3o+4e")
    tp = equikern.ChannelwiseTensorProduct(*irreps, backend=backend).cuda()
    ref = equikern.ChannelwiseTensorProduct(*irreps, backend="native")
    gen = torch.Generator().manual_seed(4)
    z = 57
    x = torch.randn(z, tp.irreps_in1.dim, dtype=dtype, generator=gen)
    y = torch.randn(1 if broadcast else z, tp.irreps_in2.dim, dtype=dtype, generator=gen)
    w = torch.randn(z, tp.weight_numel, dtype=dtype, generator=gen)
    tol = 1e-10 if dtype == torch.float64 else 1e-5

    def run(device):
        a, b, c = (t.to(device).requires_grad_() for t in (x, y, w))
        out = (tp if device == "cuda" else ref)(a, b, c)
        grads = torch.autograd.grad(out.pow(2).sum(), (a, b, c), create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (a, b, c))
        return (out, *grads, *second)

    for got, expected in zip(run("cuda"), run("cpu")):
        assert rel_err(got.detach().cpu(), expected.detach()) < tol
