"""The Triton CP bilinear op against the C++ op (itself tested against float64 brute force in test_cp.py).

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py), at tiny sizes.
"""

import pytest
import torch

import equikern
from equikern.ops.cp import cp_bilinear, cp_bilinear_backward
from equikern.triton import cp as tcp

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def operands(gen, Z, I, J, K, R, Cc, shared, weighted, dtype=torch.float64):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return (
        rnd(Z, I, Cc),
        rnd(1 if shared else Z, J),
        rnd(I, R),
        rnd(J, R),
        rnd(K, R),
        rnd(Z, Cc) if weighted else None,
    )


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_the_cpp_op(shared, weighted):
    gen = torch.Generator().manual_seed(3 + 2 * shared + weighted)
    for Z, I, J, K, R, Cc in ((3, 4, 9, 9, 7, 5), (2, 9, 16, 16, 28, 3), (2, 4, 4, 9, 17, 130)):
        args = operands(gen, Z, I, J, K, R, Cc, shared, weighted)
        want = cp_bilinear(*args)
        got = tcp.cp_bilinear(*(None if a is None else a.to(DEVICE) for a in args))
        assert rel_err(got.cpu(), want) < 1e-12
        g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        for a, b in zip(
            tcp.cp_bilinear_backward(g.to(DEVICE), *(None if a is None else a.to(DEVICE) for a in args)),
            cp_bilinear_backward(g, *args),
        ):
            assert a.shape == b.shape and (a.numel() == 0 or rel_err(a.cpu(), b) < 1e-12)


def test_gradcheck_gradgradcheck_and_opcheck():
    gen = torch.Generator().manual_seed(1)
    args = [a.requires_grad_() for a in operands(gen, 2, 4, 4, 4, 3, 3, False, True)]
    assert torch.autograd.gradcheck(tcp.cp_bilinear, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(tcp.cp_bilinear, args, fast_mode=True)
    torch.library.opcheck(tcp._cp_op, tuple(args))
    g = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    torch.library.opcheck(tcp._cp_bwd_op, (g, *args, True))


def test_public_api_routes_and_bad_input():
    gen = torch.Generator().manual_seed(2)
    x1, x2, A, B, C, w = operands(gen, 3, 4, 9, 9, 7, 5, False, True)
    x = x1.transpose(1, 2)  # [Z, Cc, I]: the public layout, x2 shared by the channels
    want = equikern.cp_bilinear(x, x2[:, None, :], A, B, C, w, backend="native")
    got = equikern.cp_bilinear(x, x2[:, None, :], A, B, C, w, backend="triton")
    assert rel_err(got, want) < 1e-12
    with pytest.raises(ValueError, match="backend"):
        equikern.cp_bilinear(x, x2[:, None, :], A, B, C, w, backend="cuda")
    with pytest.raises(ValueError, match="x2 is torch.float32"):
        tcp.cp_bilinear(x1, x2.float(), A, B, C, w)
    with pytest.raises(ValueError, match="do not fit"):
        tcp.cp_bilinear(x1, x2, A[:3], B, C, w)
    with pytest.raises(ValueError, match="weight must be"):
        tcp.cp_bilinear(x1, x2, A, B, C, w[:, :2])


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_tdn_shapes_match_cpu(L, dtype):
    """The anchors' CP shapes (d = (L+1)^2, R = 7 L^2, C = 128): forward, backward, double backward."""
    d, R = (L + 1) ** 2, 7 * L * L
    gen = torch.Generator().manual_seed(L)
    args = operands(gen, 1000, d, d, d, R, 128, False, True, dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def run(fn, device):
        xs = [a.to(device).requires_grad_() for a in args]
        out = fn(*xs)
        grads = torch.autograd.grad(out.pow(2).sum(), xs, create_graph=True)
        return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), xs))

    for a, b in zip(run(tcp.cp_bilinear, "cuda"), run(cp_bilinear, "cpu")):
        assert rel_err(a.detach().cpu(), b.detach()) < tol
