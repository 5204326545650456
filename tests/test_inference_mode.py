"""Every op and module under torch.inference_mode: built and run there, and run there first then trained
outside it. Inference tensors have no version counter (the C++ plan caches key tables by it) and cannot
be saved for backward (a cached table made in inference mode must not leak into a later training step)."""

import pytest
import torch

import equikern
from equikern import gaunt
from equikern.nn.tensor_product import channelwise_instructions

pytestmark = pytest.mark.usefixtures("float64_default")


def _gen():
    return torch.Generator().manual_seed(11)


def tensor_product():
    irreps_out, instr = channelwise_instructions("3x0e+2x1o", "0e+1o+2e", "0e+1o+2e")
    kw = dict(shared_weights=False, internal_weights=False, backend="native")
    tp = equikern.TensorProduct("3x0e+2x1o", "0e+1o+2e", irreps_out, instr, **kw)
    g = _gen()
    return tp, (
        torch.randn(4, 9, generator=g),
        torch.randn(4, 9, generator=g),
        torch.randn(4, tp.weight_numel, generator=g),
    )


def convolution():
    irreps_out, instr = channelwise_instructions("2x0e+1x1o", "0e+1o", "0e+1o")
    kw = dict(shared_weights=False, internal_weights=False, backend="native")
    conv = equikern.TensorProductConv("2x0e+1x1o", "0e+1o", irreps_out, instr, **kw)
    g = _gen()
    src, dst = torch.tensor([0, 1, 2, 2, 1]), torch.tensor([1, 0, 0, 2, 2])
    x, a, w = (
        torch.randn(3, 5, generator=g),
        torch.randn(5, 4, generator=g),
        torch.randn(5, conv.weight_numel, generator=g),
    )
    return (lambda x, a, w: conv(x, a, w, src, dst)), (x, a, w)


def gaunt_method(method):
    def build():
        g = _gen()
        return (lambda a, b: equikern.gaunt_product(a, b, 3, method=method)), (
            torch.randn(2, 3, 9, generator=g),
            torch.randn(2, 3, 4, generator=g),
        )

    return build


def gaunt_power():
    g = _gen()
    return (lambda x: equikern.gaunt_power(x, 3, 2)), (torch.randn(2, 3, 4, generator=g),)


def orbit_linear():
    gens = torch.tensor([[1, 2, 3, 4, 0]])
    torch.manual_seed(3)  # the same initial weights in every build
    layer = equikern.OrbitLinear(gens, 3, 2)
    return layer, (torch.randn(2, 5, 3, generator=_gen()),)


def orbit_pool():
    ids, m = equikern.orbits(torch.tensor([[1, 2, 3, 0], [3, 2, 1, 0]]), k=2)
    return (lambda x: equikern.orbit_pool(x, ids.reshape(-1), m, reduce="mean")), (
        torch.randn(2, 16, 3, generator=_gen()),
    )


def cp_layer():
    layer = equikern.CPTensorProduct("4x0e+4x1o", "0e+1o", "4x0e+4x1o", rank=6)
    g = _gen()
    return layer, (
        torch.randn(3, 16, generator=g),
        torch.randn(3, 4, generator=g),
        torch.randn(3, 4, generator=g),
    )


def harmonics():
    return (lambda v: equikern.spherical_harmonics([0, 1, 2, 3], v, True)), (
        torch.randn(5, 3, generator=_gen()),
    )


CASES = {
    "tensor_product": tensor_product,
    "convolution": convolution,
    "gaunt_grid": gaunt_method("grid"),
    "gaunt_fourier": gaunt_method("fourier"),
    "gaunt_dense": gaunt_method("dense"),
    "gaunt_power": gaunt_power,
    "orbit_linear": orbit_linear,
    "orbit_pool": orbit_pool,
    "cp_layer": cp_layer,
    "spherical_harmonics": harmonics,
}


@pytest.fixture(autouse=True)
def _fresh_table_caches(monkeypatch):
    """Python-side caches start empty, so that inference mode is where their tables are made."""
    monkeypatch.setattr(gaunt, "_PLANS", {})


@pytest.mark.parametrize("case", CASES)
def test_built_and_run_in_inference_mode(case):
    with torch.inference_mode():
        fn, inputs = CASES[case]()
        first = fn(*inputs)
        again = fn(*inputs)  # cached plans
    fn2, inputs2 = CASES[case]()
    want = fn2(*inputs2)
    assert torch.allclose(first, want) and torch.equal(first, again)


@pytest.mark.parametrize("case", CASES)
def test_run_in_inference_mode_first_then_trained(case):
    fn, inputs = CASES[case]()
    with torch.inference_mode():
        first = fn(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    assert torch.allclose(out.detach(), first)
    assert all(g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, leaves))


@pytest.mark.parametrize("method", ["dense", "grid", "fourier"])
def test_gaunt_with_no_channels_beside_a_shared_operand(method):
    """C = 0 with a shared second operand: an empty product, and zero gradients (not uninitialised memory)."""
    g = _gen()
    a = torch.randn(4, 0, 9, generator=g, requires_grad=True)
    b = torch.randn(4, 1, 9, generator=g, requires_grad=True)
    out = equikern.gaunt_product(a, b, 2, method=method)
    assert out.shape == (4, 0, 9)
    ga, gb = torch.autograd.grad(out, (a, b), torch.randn(out.shape, generator=g))
    assert ga.shape == a.shape and torch.equal(gb, torch.zeros_like(b))
