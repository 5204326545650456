"""The CUDA CP bilinear ops against the CPU ops and a float64 brute force (skipped without a GPU)."""

import pytest
import torch

from equikern.ops import cp as ops
from test_cp import brute_force, op_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CUDA = torch.device("cuda")
F64 = torch.float64


def close(got, want, dtype):
    """GPU against CPU: the same map, different summation orders (relative to the largest entry)."""
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    assert got.device.type == "cuda" and got.shape == want.shape and got.dtype == want.dtype
    if want.numel():
        scale = max(want.abs().max().item(), 1.0)
        assert (got.cpu().double() - want.double()).abs().max().item() <= tol * scale


def cuda(ts):
    return [None if t is None else t.to(CUDA) for t in ts]


@pytest.mark.parametrize("route", ops.ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ops_match_cpu_and_brute_force(route, dtype):
    """Random shapes (channel counts around the tile of 128 threads, J below and above R), x2 per sample
    or shared, with and without weights: forward and all six gradients; repeated runs are bitwise equal."""
    gen = torch.Generator().manual_seed(21)
    for trial in range(10):
        Z, I, J, K, R = (int(n) for n in torch.randint(1, 12, (5,), generator=gen))
        Cc = (1, 3, 31, 33, 128, 129, 300)[trial % 7]
        for shared in (False, True):
            x1, x2, A, B, C, w = (t.detach().to(dtype) for t in op_inputs(shared, gen, Z, I, J, K, R, Cc))
            for weight in (w, None):
                args = [x1, x2, A, B, C, weight]
                want = ops.cp_bilinear(*args, route)
                got = ops.cp_bilinear(*cuda(args), route)
                close(got, want, dtype)
                close(got, brute_force(*args).to(dtype), dtype)
                grad = torch.randn(want.shape, dtype=dtype, generator=gen)
                for factors in (True, False):
                    want_g = ops.cp_bilinear_backward(grad, *args, factors, route)
                    got_g = ops.cp_bilinear_backward(*cuda([grad, *args]), factors, route)
                    again = ops.cp_bilinear_backward(*cuda([grad, *args]), factors, route)
                    for x, y, z in zip(got_g, want_g, again):
                        close(x, y, dtype)
                        assert torch.equal(x, z)  # deterministic: no atomics


def test_large_batch_uses_grid_stride_and_matches_cpu():
    """More samples than blocks (grid-stride loops, per-block partial sums of the factor gradients)."""
    gen = torch.Generator().manual_seed(22)
    for route in ("factors", "matrix"):
        for shared in (False, True):
            args = [t.detach() for t in op_inputs(shared, gen, Z=5000, I=9, J=9, K=9, R=28, Cc=40)]
            grad = torch.randn(5000, 9, 40, dtype=F64, generator=gen)
            close(ops.cp_bilinear(*cuda(args), route), ops.cp_bilinear(*args, route), F64)
            want = ops.cp_bilinear_backward(grad, *args, True, route)
            got = ops.cp_bilinear_backward(*cuda([grad, *args]), True, route)
            for x, y in zip(got, want):
                close(x, y, F64)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("route", ["factors", "matrix"])
def test_gradcheck_and_gradgradcheck_on_gpu(shared, route):
    args = [t.detach().to(CUDA).requires_grad_() for t in op_inputs(shared, torch.Generator().manual_seed(2))]
    fn = lambda *a: ops.cp_bilinear(*a, route=route)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args[:5])  # no weight


def test_opcheck_on_cuda():
    gen = torch.Generator().manual_seed(3)
    lib = torch.ops.equikern
    for shared in (False, True):
        for weight in (True, False):
            args = [t.detach().to(CUDA).requires_grad_() for t in op_inputs(shared, gen, weight=weight)]
            if not weight:
                args.append(None)
            for route in ops.ROUTES:
                torch.library.opcheck(lib.cp_bilinear.default, (*args, route))
            grad = torch.randn(2, 4, 3, dtype=F64, generator=gen).to(CUDA).requires_grad_()
            for factors in (True, False):
                for route in ("factors", "matrix"):
                    torch.library.opcheck(lib.cp_bilinear_backward.default, (grad, *args, factors, route))


def test_empty_inputs_on_gpu():
    A, B, C = (torch.randn(n, 3, device=CUDA) for n in (4, 2, 5))
    for Z, Cc in ((0, 8), (3, 0)):
        x1, x2, w = (torch.randn(*s, device=CUDA) for s in ((Z, 4, Cc), (Z, 2), (Z, Cc)))
        for route in ops.ROUTES:
            assert ops.cp_bilinear(x1, x2, A, B, C, w, route).shape == (Z, 5, Cc)
            g = torch.randn(Z, 5, Cc, device=CUDA)
            grads = ops.cp_bilinear_backward(g, x1, x2, A, B, C, w, True, route)
            assert [t.shape for t in grads] == [t.shape for t in (x1, x2, A, B, C, w)]
            assert all(not t.any() for t in grads)


def test_bad_inputs_on_gpu():
    gen = torch.Generator().manual_seed(4)
    x1, x2, A, B, C, w = cuda([t.detach() for t in op_inputs(False, gen)])
    with pytest.raises(RuntimeError, match="cp_bilinear: x2 must be a CUDA tensor"):
        ops.cp_bilinear(x1, x2.cpu(), A, B, C)
    with pytest.raises(RuntimeError, match="cp_bilinear: x1 must be a CUDA tensor"):
        ops.cp_bilinear(x1.cpu(), x2, A, B, C)
    with pytest.raises(RuntimeError, match="cp_bilinear: weight must be a CUDA tensor"):
        ops.cp_bilinear(x1, x2, A, B, C, w.cpu())
    with pytest.raises(RuntimeError, match="cp_bilinear_backward: grad must be a CUDA tensor"):
        ops.cp_bilinear_backward(torch.zeros(2, 4, 3, dtype=F64), x1, x2, A, B, C)
    with pytest.raises(RuntimeError, match="x2 has 3 rows, expected 2"):
        ops.cp_bilinear(x1, torch.cat([x2, x2[:1]]), A, B, C)
    with pytest.raises(RuntimeError, match=r"A has shape \[5, 3\], expected \[3, R\]"):
        ops.cp_bilinear(x1, x2, torch.randn(5, 3, dtype=F64, device=CUDA), B, C)
    with pytest.raises(RuntimeError, match="B has dtype Float"):
        ops.cp_bilinear(x1, x2, A, B.float(), C)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.cp_bilinear(x1.half(), x2.half(), A.half(), B.half(), C.half())
    with pytest.raises(RuntimeError, match=r"weight has shape \[2, 2\], expected \[2, 3\]"):
        ops.cp_bilinear(x1, x2, A, B, C, w[:, :2])
    with pytest.raises(RuntimeError, match="route must be 'auto', 'factors' or 'matrix', got 'fast'"):
        ops.cp_bilinear(x1, x2, A, B, C, w, "fast")
    with pytest.raises(RuntimeError, match="grad has shape"):
        ops.cp_bilinear_backward(torch.zeros(2, 4, 4, dtype=F64, device=CUDA), x1, x2, A, B, C)
