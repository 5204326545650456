"""The Python code that only runs for CUDA tensors, run on the CPU.

Route decisions that look at the tensor they are given (``x.is_cuda``) are taken with ``cuda_like(x)``: a CPU
tensor whose ``is_cuda`` says True (its device stays the CPU, ops on it return plain tensors). The route
then runs its Triton kernels under Triton's interpreter (tests/conftest.py) and is compared with the CPU route
or an independent reference; ``torch.cuda.device(...)`` contexts, which refuse a CPU device, are replaced by
no-ops where a route enters one. Decisions taken on a derived tensor (``TensorProduct.forward``'s x1,
CPTensorProduct) are reached through the module-level function that makes them. The benchmark harness's
CUDA-only code (event timing, the GPU cases) runs against fakes of the torch.cuda calls it makes.
"""

import contextlib
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import equikern
import equikern.cp as ecp
import equikern.gaunt as egaunt
import equikern.nn.cp as ncp
import equikern.nn.tensor_product_conv as nconv
from equikern.bench import Config, Unavailable, anchors
from equikern.nn.tensor_product import channelwise_instructions
from equikern.ops.tensor_product_conv import conv_csr, conv_gather, conv_segment_sum

triton = pytest.importorskip("triton")

from equikern.triton import spherical_harmonics as tsh  # noqa: E402  (needs triton)
from equikern.triton import tensor_product as ttp  # noqa: E402
from equikern.triton import tensor_product_conv as tconv  # noqa: E402

F64 = torch.float64
CUDA = torch.device("cuda")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="runs Triton kernels on CPU tensors: needs Triton's interpreter (TRITON_INTERPRET=1)",
)


class _CudaLike(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` with True; results of ops on it are plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self) -> bool:
        return True


def cuda_like(t: torch.Tensor) -> torch.Tensor:
    """t (same data, same autograd graph) as a tensor that takes the CUDA branches."""
    return t.as_subclass(_CudaLike)


@pytest.fixture
def cpu_device_context(monkeypatch):
    """The Triton convolution enters torch.cuda.device(x.device) for tensors that say is_cuda; a CPU device is
    refused there, so the context becomes a no-op (the kernels run under the interpreter)."""
    monkeypatch.setattr(tconv, "_device", lambda t: contextlib.nullcontext())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def test_cuda_like_takes_the_cuda_branch_only_where_asked():
    x = torch.ones(2, 3)
    y = cuda_like(x)
    assert y.is_cuda and not x.is_cuda and y.device.type == "cpu"
    assert not (y + 1).is_cuda and not y.reshape(3, 2).is_cuda  # derived tensors are plain again
    assert ecp.op_for(y) is ecp.triton_cp_bilinear and ecp.op_for(x) is not ecp.triton_cp_bilinear


# ---------------------------------------------------------------- the unfused convolution's sum on CUDA


@interpreted
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_segment_sum_on_cuda_runs_the_triton_kernel(dtype, monkeypatch, cpu_device_context):
    """equikern::conv_segment_sum for CUDA rows (ops/tensor_product_conv.py: `if rows.is_cuda`) calls the
    Triton kernel with the grouping: bitwise equal to the CPU branch (both sum each node's rows in edge
    order), and as the derivative of conv_gather (its backward) too."""
    calls = []
    real = tconv.segment_sum
    monkeypatch.setattr(tconv, "segment_sum", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(1)
    for n, e, d in ((6, 30, 5), (4, 0, 3), (3, 7, 140), (1, 4, 1)):
        index = torch.randint(0, max(1, n - 1), (e,), generator=gen)  # the last node receives nothing
        perm, ptr = conv_csr(index, n, "index")
        rows = randn(gen, e, d, dtype=dtype)
        got = conv_segment_sum(cuda_like(rows), index, perm, ptr)
        want = conv_segment_sum(rows, index, perm, ptr)
        assert got.dtype == dtype and torch.equal(got, want)
        exact = torch.zeros(n, d, dtype=F64).index_add_(0, index, rows.double())
        assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max().clamp_min(1)
        # the backward of the gather on CUDA: a segment sum of the (CUDA) output gradient
        x = randn(gen, n, d, dtype=dtype).requires_grad_()
        g = randn(gen, e, d, dtype=dtype)
        (gx,) = torch.autograd.grad(conv_gather(x, index, perm, ptr), x, cuda_like(g))
        assert torch.equal(gx, conv_segment_sum(g, index, perm, ptr))
    assert len(calls) == 8


# ---------------------------------------------------------------- TensorProductConv's CUDA routes

# Instruction lists without a fused kernel (the Triton kernels take all-uvu or all-uvw lists).
UNFUSED = {
    "uvv": (
        ("2x0e+1x1o", "3x0e+3x1o", "3x0e+3x1o"),
        [(0, 0, 0, "uvv", True), (1, 1, 0, "uvv", True), (0, 1, 1, "uvv", True), (1, 0, 1, "uvv", False)],
    ),
    "uuu": (
        ("2x0e+2x1o", "2x0e+2x1o", "2x0e+2x1o+2x1e"),
        [(0, 1, 1, "uuu", True), (1, 1, 0, "uuu", True), (1, 1, 2, "uuu", False)],
    ),
    "uvuv": (
        ("2x0e+1x1o", "2x0e+1x1o", "4x0e+2x1o+1x1e+1x0e"),
        [
            (0, 0, 0, "uvuv", False),
            (1, 0, 1, "uvuv", False),
            (1, 1, 2, "uvuv", False),
            (1, 1, 3, "uvuv", False),
        ],
    ),
    "uuw": (
        ("2x0e+2x1o", "2x0e+2x1o", "3x0e+1x1o"),
        [(0, 0, 0, "uuw", True), (1, 1, 0, "uuw", True), (0, 1, 1, "uuw", False)],
    ),
    "uvu+uvw": (("2x0e+1x1o", "0e+1o", "2x0e+2x1o"), [(0, 0, 0, "uvu", True), (0, 1, 1, "uvw", True)]),
}
UVU = ("2x0e+1x1o", "0e+1o", "0e+1o+1e")  # irreps_in1, irreps_in2, target irreps (channelwise_instructions)
UVW = (
    ("2x0e+1x1o", "0e+1o", "2x0e+2x1o"),
    [(0, 0, 0, "uvw", True), (0, 1, 1, "uvw", True), (1, 0, 1, "uvw", True)],
)


def _conv(irreps, instr, **kw):
    kw.setdefault("internal_weights", False)
    return equikern.TensorProductConv(*irreps, instr, **kw)


def _uvu_conv(**kw):
    out, instr = channelwise_instructions(*UVU)
    return _conv((UVU[0], UVU[1], out), instr, shared_weights=False, **kw)


def _conv_inputs(conv, gen, n_src, e):
    x = randn(gen, n_src, conv.irreps_in1.dim)
    attr = randn(gen, e, conv.irreps_in2.dim)
    if conv.weight_numel == 0:
        w = None
    else:
        w = randn(gen, conv.weight_numel) if conv.shared_weights else randn(gen, e, conv.weight_numel)
    src = torch.randint(0, n_src, (e,), generator=gen)
    dst = torch.randint(0, n_src, (e,), generator=gen)  # num_nodes = n_src + 2: two nodes receive nothing
    return x, attr, w, src, dst


def _derivatives(conv, inputs, num_nodes, cuda: bool, order: int = 2):
    """Output, gradients of its squares (and the gradients of the squared gradients) w.r.t. every input."""
    x, attr, w, src, dst = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, attr, w) if t is not None]
    xin = cuda_like(leaves[0]) if cuda else leaves[0]
    out = conv(xin, leaves[1], leaves[2] if w is not None else None, src, dst, num_nodes)
    grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=order > 1)
    if order == 1:
        return (out, *grads)
    return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves))


def _must_not_run(*args, **kwargs):
    raise AssertionError("the fused Triton convolution was called for a plan it does not cover")


@pytest.mark.parametrize(
    ("mode", "backend", "shared"),
    [(m, "auto", False) for m in UNFUSED] + [("uvv", "auto", True), ("uvu", "native", False)],
)
def test_conv_on_cuda_without_fused_kernel_takes_the_unfused_route(mode, backend, shared, monkeypatch):
    """CUDA node features with an instruction list that no fused kernel covers (or backend='native'): a
    warning, then gather / tensor product / sum by destination. Equal to the CPU route (the fused C++ op), to
    second derivatives, with more destinations than sources; no edges gives zeros."""
    monkeypatch.setattr(nconv, "triton_conv", _must_not_run)
    if mode == "uvu":
        conv = _uvu_conv(backend=backend)
    else:
        conv = _conv(*UNFUSED[mode], backend=backend, shared_weights=shared)
    assert conv._triton_key is None
    gen = torch.Generator().manual_seed(2)
    inputs = _conv_inputs(conv, gen, 5, 17)
    with pytest.warns(RuntimeWarning, match="no fused GPU kernel"):
        got = _derivatives(conv, inputs, 7, cuda=True)
    want = _derivatives(conv, inputs, 7, cuda=False)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-12
    x, attr, w, src, dst = inputs
    w0 = w if w is None or shared else w[:0]
    with pytest.warns(RuntimeWarning, match="no fused GPU kernel"):
        empty = conv(cuda_like(x), attr[:0], w0, src[:0], dst[:0], 7)
    assert torch.equal(empty, torch.zeros(7, conv.irreps_out.dim, dtype=F64))


def _fused_and_native(mode: str, deterministic: bool):
    """A uvu or uvw convolution (Triton route) and the same one on the native op."""
    if mode == "uvu":
        return _uvu_conv(deterministic=deterministic), _uvu_conv(backend="native")
    kw = dict(shared_weights=False)
    return _conv(*UVW, deterministic=deterministic, **kw), _conv(*UVW, backend="native", **kw)


@interpreted
@pytest.mark.parametrize("mode", ["uvu", "uvw"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_conv_on_cuda_with_fused_kernel_takes_triton(mode, deterministic, monkeypatch, cpu_device_context):
    """backend='auto' and CUDA node features: the Triton convolution (atomic or deterministic as asked), no
    warning; equal to the native op with first derivatives."""
    calls = []
    real = nconv.triton_conv

    def spy(*args):
        calls.append(args[8])  # the `deterministic` argument
        return real(*args)

    monkeypatch.setattr(nconv, "triton_conv", spy)
    conv, native = _fused_and_native(mode, deterministic)
    gen = torch.Generator().manual_seed(3)
    inputs = _conv_inputs(conv, gen, 4, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _derivatives(conv, inputs, 6, cuda=True, order=1)
    want = _derivatives(native, inputs, 6, cuda=False, order=1)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-12
    assert calls == [deterministic]


@interpreted
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_conv_on_cuda_with_strided_edge_indices(mode, deterministic, cpu_device_context):
    """Edge indices that are columns of an [E, 2] edge list (stride 2), CUDA route: as the native op."""
    conv, native = _fused_and_native(mode, deterministic)
    gen = torch.Generator().manual_seed(10)
    x, attr, w, src, dst = _conv_inputs(conv, gen, 5, 13)
    edges = torch.stack([src, dst], dim=1)
    assert not edges[:, 0].is_contiguous()
    got = _derivatives(conv, (x, attr, w, edges[:, 0], edges[:, 1]), 7, cuda=True, order=1)
    want = _derivatives(native, (x, attr, w, src, dst), 7, cuda=False, order=1)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-12


@interpreted
def test_conv_on_cuda_takes_edge_spherical_harmonics_from_triton(monkeypatch, cpu_device_context):
    """edge_vectors=True with CUDA tensors: the harmonics come from the Triton kernels
    (so3.spherical_harmonics' CUDA route), the product from the fused Triton convolution; equal to the CPU
    route, forces included."""
    calls = []
    real = tsh.spherical_harmonics
    monkeypatch.setattr(tsh, "spherical_harmonics", lambda *a: calls.append(a[0]) or real(*a))
    irreps_sh = "0e+1o+2e"
    out, instr = channelwise_instructions("2x0e+1x1o", irreps_sh, "0e+1o")
    kw = dict(shared_weights=False, internal_weights=False, edge_vectors=True)
    conv = equikern.TensorProductConv("2x0e+1x1o", irreps_sh, out, instr, sh_normalization="norm", **kw)
    gen = torch.Generator().manual_seed(4)
    n, e = 4, 9
    x, vec, w = randn(gen, n, conv.irreps_in1.dim), randn(gen, e, 3), randn(gen, e, conv.weight_numel)
    src, dst = torch.randint(0, n, (e,), generator=gen), torch.randint(0, n, (e,), generator=gen)

    def run(cuda):
        leaves = [t.detach().clone().requires_grad_() for t in (x, vec, w)]
        a, b = (cuda_like(t) if cuda else t for t in leaves[:2])
        result = conv(a, b, leaves[2], src, dst)
        return (result, *torch.autograd.grad(result.pow(2).sum(), leaves))

    got = run(True)
    assert calls == [[0, 1, 2]]
    for a, b in zip(got, run(False), strict=True):
        assert rel_err(a, b) < 1e-12


# ---------------------------------------------------------------- spherical harmonics, CP: CUDA routes


@interpreted
def test_spherical_harmonics_of_cuda_tensors_equal_the_cpu_route(monkeypatch):
    """so3.spherical_harmonics sends CUDA tensors to the Triton kernels: same values and layout for every form
    of ls and normalisation, the same errors for bad input."""
    calls = []
    real = tsh.spherical_harmonics
    monkeypatch.setattr(tsh, "spherical_harmonics", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(5)
    x = randn(gen, 2, 3, 3)
    cases = [(2, True, "integral"), ([0, 2, 1, 1], False, "component"), ("0e+1o+2e", True, "norm")]
    cases += [("1e+2e", False, "integral"), (equikern.Irreps("2x1o"), True, "component")]
    for ls, normalize, normalization in cases:
        got = equikern.spherical_harmonics(ls, cuda_like(x), normalize, normalization)
        want = equikern.spherical_harmonics(ls, x, normalize, normalization)
        assert got.dtype == want.dtype and rel_err(got, want) < 1e-13
    assert len(calls) == len(cases)
    for args in [([1], x, True, "bad"), ([1], x[..., :2], True, "integral"), ("1e+1o", x, True, "integral")]:
        with pytest.raises(ValueError) as on_cpu:
            equikern.spherical_harmonics(*args)
        with pytest.raises(ValueError) as on_cuda:
            equikern.spherical_harmonics(args[0], cuda_like(args[1]), *args[2:])
        assert str(on_cuda.value) == str(on_cpu.value)


CP_SHAPES = {  # x1, x2, weight shapes (I, J = 4, 3); the channel dims are those over which x2 broadcasts
    "no channels": ((3, 4), (3, 3), None),
    "channels": ((2, 7, 4), (2, 1, 3), (2, 7)),
    "x2 shared": ((2, 5, 4), (3,), (5,)),
    "weight broadcast": ((4, 2, 4), (4, 1, 3), (1, 2)),
}


def _cp_operands(gen, shapes):
    s1, s2, sw = shapes
    x1, x2 = randn(gen, *s1).requires_grad_(), randn(gen, *s2).requires_grad_()
    w = None if sw is None else randn(gen, *sw).requires_grad_()
    A, B, C = (randn(gen, d, 6).requires_grad_() for d in (4, 3, 5))
    return x1, x2, A, B, C, w


@interpreted
def test_cp_bilinear_auto_takes_triton_for_cuda_tensors(monkeypatch):
    """equikern.cp_bilinear(backend='auto') with CUDA x1 runs the Triton op on the native layout (channels
    moved innermost, x2 shared by broadcast channels, weights broadcast): equal to the C++ op; gradients too
    where no channel dims are moved (the test below has the others)."""
    calls = []
    real = ecp.triton_cp_bilinear
    monkeypatch.setattr(ecp, "triton_cp_bilinear", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(6)
    for name, shapes in CP_SHAPES.items():
        x1, x2, A, B, C, w = _cp_operands(gen, shapes)
        got = equikern.cp_bilinear(cuda_like(x1), x2, A, B, C, w)
        want = equikern.cp_bilinear(x1, x2, A, B, C, w, backend="native")
        assert rel_err(got, want) < 1e-13, name
        if name == "no channels":
            leaves = [t for t in (x1, x2, A, B, C, w) if t is not None]
            g = randn(gen, *want.shape)
            for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
                assert rel_err(a, b) < 1e-12
    assert len(calls) == len(CP_SHAPES)


@interpreted
@pytest.mark.parametrize("name", ["channels", "x2 shared", "weight broadcast"])
def test_cp_bilinear_gradients_on_cuda_with_channel_dims(name):
    gen = torch.Generator().manual_seed(8)
    x1, x2, A, B, C, w = _cp_operands(gen, CP_SHAPES[name])
    leaves = [t for t in (x1, x2, A, B, C, w) if t is not None]
    got = equikern.cp_bilinear(cuda_like(x1), x2, A, B, C, w)
    want = equikern.cp_bilinear(x1, x2, A, B, C, w, backend="native")
    g = randn(gen, *want.shape)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        assert rel_err(a, b) < 1e-12


@interpreted
def test_triton_cp_backward_of_non_contiguous_operands():
    """The raw Triton backward with a transposed x1 [Z, I, Cc] and weight [Z, Cc], against the C++ op."""
    from equikern.ops.cp import cp_bilinear_backward
    from equikern.triton.cp import cp_bilinear_backward as triton_backward

    gen = torch.Generator().manual_seed(9)
    Z, I, J, K, R, Cc = 2, 4, 3, 5, 6, 7
    x1 = randn(gen, Z, Cc, I).transpose(1, 2)
    w = randn(gen, Cc, Z).T
    x2, A, B, C = randn(gen, Z, J), randn(gen, I, R), randn(gen, J, R), randn(gen, K, R)
    g = randn(gen, Z, K, Cc)
    got = triton_backward(g, x1, x2, A, B, C, w)
    want = cp_bilinear_backward(g, x1, x2, A, B, C, w)
    for name, a, b in zip(("x1", "x2", "A", "B", "C", "weight"), got, want, strict=True):
        assert rel_err(a, b) < 1e-12, name


@interpreted
@pytest.mark.parametrize("layout", ncp.LAYOUTS)
def test_cp_tensor_product_on_cuda_takes_triton(layout, monkeypatch, tmp_path):
    """CPTensorProduct picks its op with op_for(x) on a reshaped x: with the decision made for a CUDA tensor
    it runs the Triton op with the module's factors and layout; equal to the CPU route to second derivatives,
    with per-sample and shared y."""
    monkeypatch.setenv("EQUIKERN_CACHE", str(tmp_path))
    real = ecp.op_for
    chosen = []

    def op_for_cuda(x, backend="auto"):
        chosen.append(real(cuda_like(x), backend))
        return chosen[-1]

    module = equikern.CPTensorProduct("3x0e+3x1o", "0e+1o", "3x0e+3x1o", rank=1000, layout=layout)
    assert module.approximation_error == 0.0
    gen = torch.Generator().manual_seed(7)
    x, w = randn(gen, 4, module.channels * module._d1), randn(gen, 4, module.channels)
    for y in (randn(gen, 4, module._d2), randn(gen, module._d2)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, w)]

        def run(leaves):
            out = module(*leaves)
            grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
            return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves))

        want = run(leaves)
        with monkeypatch.context() as m:
            m.setattr(ncp, "op_for", op_for_cuda)
            got = run(leaves)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) < 1e-12
    assert chosen and all(fn is ecp.triton_cp_bilinear for fn in chosen)


# ---------------------------------------------------------------- Triton launches: parallel compilation


class _JitLike:
    """Stands in for a Triton JITFunction as far as launch() and Triton's async compilation see it: warmup
    submits its compile to the active AsyncCompileMode; a launch compiles through the active mode if there is
    one (as JITFunction.run does: _do_compile submits to it), else on the spot. ``fails_in_parallel``: its
    compile fails in a worker thread and succeeds on the calling thread."""

    def __init__(self, name, log, fails_in_parallel=False):
        self.name, self.log, self.fails_in_parallel = name, log, fails_in_parallel

    def _compile(self, in_worker: bool):
        if in_worker and self.fails_in_parallel:
            raise RuntimeError(f"{self.name}: compilation failed in a worker thread")
        return self.name

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile

        _async_compile.active_mode.get().submit(self.name, lambda: self._compile(True), lambda kernel: None)

    def __getitem__(self, grid):
        from triton.runtime import _async_compile

        def run(*args, **kwargs):
            mode = _async_compile.active_mode.get()
            if mode is None:
                self._compile(False)
            else:
                mode.submit(self.name, lambda: self._compile(True), lambda kernel: None).result()
            self.log.append(self.name)

        return run


def test_launch_recovers_from_a_failed_parallel_compile(monkeypatch):
    """A plan's kernel parts on a GPU (JITFunctions) compile in parallel first; when that fails, launch()
    warns and compiles them one at a time, and later kernels compile as usual."""
    from triton.runtime import _async_compile

    monkeypatch.setattr(ttp, "_compiles_async", lambda fn: True)
    monkeypatch.setattr(ttp, "_PARALLEL_FAILED", [])
    log: list = []
    parts = [_JitLike("part0", log, fails_in_parallel=True), _JitLike("part1", log)]
    try:
        with pytest.warns(RuntimeWarning, match="compiling kernel parts in parallel failed"):
            ttp.launch([(k, (1,), (torch.ones(1),), {}) for k in parts])
        assert _async_compile.active_mode.get() is None
        ttp.launch([(_JitLike("later", log), (1,), (torch.ones(1),), {})])
        assert log == ["part0", "part1", "later"]
    finally:
        _async_compile.active_mode.set(None)


# ---------------------------------------------------------------- the benchmark harness on CUDA


def test_bench_cp_case_builds_for_cuda():
    """The cp family's GPU case builds without a GPU."""
    from equikern.bench import cp as bench_cp

    case = bench_cp._case(anchors()["cp"]["rows"][0], Config(CUDA, torch.float32, 8, "h100"))
    assert set(case.impls) == {"equikern", "tdn_einsum", "two_gemm_einsum", "equikern_tp"}


def test_bench_cp_times_equikern_on_cuda():
    from equikern.bench import cp as bench_cp

    case = bench_cp._case(anchors()["cp"]["rows"][0], Config(CUDA, torch.float32, 8, "h100"))
    try:
        case.impls["equikern"]()
    except Unavailable as err:
        pytest.fail(f"the equikern row is skipped on CUDA: {err}")
    except (AssertionError, RuntimeError) as err:  # no GPU here: it got as far as putting tensors on it
        if "CUDA" not in str(err):
            raise


class _StaysOnCpu(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl

    def to(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_bench_gaunt_reports_the_method_that_auto_runs_on_cuda(monkeypatch):
    from equikern.bench import gaunt as bench_gaunt

    # the case moves its index table to the device when built: keep it on the CPU here
    real = egaunt.flat_index
    monkeypatch.setattr(
        egaunt, "flat_index", lambda c, lmax, device=None: real(c, lmax).as_subclass(_StaysOnCpu)
    )
    for dtype in (torch.float32, torch.float64):
        for case in bench_gaunt.cases(Config(CUDA, dtype, 8, "h100")):
            L = case.params["L"]
            # what gaunt.product() (method="auto") runs for a CUDA tensor: gaunt.py, product()
            assert case.params["method"] == egaunt.choose_method(L, L, L, dtype, "cuda"), case.label


class _FakeCudaClock:
    """torch.cuda.Event / synchronize / device / current_stream and torch.empty(device='cuda') as the
    benchmark's CUDA timing calls them, recording on which device each happens (the current one unless
    given). Every timed call lasts ``ms`` by the events."""

    def __init__(self, monkeypatch, ms: float):
        self.current, self.seen, clock = 0, [], self
        real_empty = torch.empty

        class Event:
            def __init__(self, enable_timing=False):
                self.stamp = None

            def record(self, stream=None):
                clock.seen.append(("record", getattr(stream, "device_index", clock.current)))
                clock.count = getattr(clock, "count", 0) + 1
                self.stamp = clock.count

            def elapsed_time(self, end):
                assert end.stamp == self.stamp + 1
                return ms

            def synchronize(self):
                clock.seen.append(("synchronize", clock.current))

        class DeviceContext:
            def __init__(self, device):
                self.index = _index(device, clock.current)

            def __enter__(self):
                self.saved, clock.current = clock.current, self.index

            def __exit__(self, *exc):
                clock.current = self.saved

        def synchronize(device=None):
            clock.seen.append(("synchronize", _index(device, clock.current)))

        def empty(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                clock.seen.append(("allocate", _index(device, clock.current)))
                device = "cpu"
            return real_empty(*args, device=device, **kwargs)

        def current_stream(device=None):
            return SimpleNamespace(device_index=_index(device, clock.current))

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "device", DeviceContext)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch, "empty", empty)


def _index(device, current: int) -> int:
    if device is None:
        return current
    if isinstance(device, int):
        return device
    index = torch.device(device).index
    return current if index is None else index


def test_cuda_timing_returns_seconds_and_enough_runs(monkeypatch):
    """time_call on CUDA: CUDA-event milliseconds become seconds (the CPU timer's unit), at least `reps`
    timed runs."""
    from equikern.bench import __main__ as bench

    monkeypatch.setattr(bench, "FLUSH_BYTES", 1 << 10)
    _FakeCudaClock(monkeypatch, ms=2.5)
    calls = []
    median, iqr, runs = bench.time_call(lambda: calls.append(1), CUDA, min_time=0.0, reps=7)
    assert median == pytest.approx(2.5e-3) and iqr == pytest.approx(0.0)
    assert runs >= 7 and len(calls) >= runs + 2


def test_bench_timing_happens_on_the_requested_device(monkeypatch):
    from equikern.bench import __main__ as bench

    monkeypatch.setattr(bench, "FLUSH_BYTES", 1 << 10)
    clock = _FakeCudaClock(monkeypatch, ms=1.0)
    bench.time_call(lambda: None, torch.device("cuda", 1), min_time=0.0, reps=3)
    assert clock.seen and {index for _, index in clock.seen} == {1}, sorted(set(clock.seen))


def test_tuner_timing_happens_on_the_requested_device(monkeypatch):
    from equikern.triton import tune

    clock = _FakeCudaClock(monkeypatch, ms=1.5)
    assert tune._time(lambda: None, torch.device("cuda", 1), reps=3) == pytest.approx(1.5)
    assert clock.seen and {index for _, index in clock.seen} == {1}, sorted(set(clock.seen))


def test_bench_hardware_label_is_the_anchors_h100_only(monkeypatch):
    """The published H100 figures of anchors.json (SXM) are compared only on that part."""
    from equikern.bench import __main__ as bench

    for name, want in (
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "cuda"),
        ("NVIDIA H100 NVL", "cuda"),
        ("NVIDIA A100-SXM4-80GB", "cuda"),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.hardware_of(torch.device("cuda")) == want
    assert bench.hardware_of(torch.device("cpu")) == "cpu"
