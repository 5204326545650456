"""The Triton convolution (uvu plans, atomic and deterministic modes) against unfused e3nn and the C++ op.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py), at tiny sizes; the tests marked
cuda repeat the checks on the GPU at realistic sizes.
"""

import copy
import random

import pytest
import torch
from e3nn import o3

import equikern
from equikern.nn.tensor_product import channelwise_instructions
from equikern.triton import tensor_product_conv as tconv
from test_tensor_product import random_problem
from test_tensor_product_conv import graph_inputs, random_graph, rel_err, unfused

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("float64_default")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def uvu_pair(rng: random.Random, dtype, shared: bool, deterministic: bool, max_mul: int = 3):
    """Random uvu instructions (several paths per output block, unweighted paths, mul2 > 1)."""
    irreps1 = o3.Irreps("+".join(f"{rng.randint(1, max_mul)}x{l}{rng.choice('eo')}" for l in range(3)))
    irreps2 = o3.Irreps(rng.choice(["0e+1o+2e", "2x0e+1o", "0e+1o"]))
    out, instr = [], []
    for i1, (m1, ir1) in enumerate(irreps1):
        for i2, (_, ir2) in enumerate(irreps2):
            for ir in ir1 * ir2:
                if not instr or rng.random() < 0.6:
                    reuse = [k for k, (mk, irk) in enumerate(out) if (mk, irk) == (m1, ir)]
                    k = rng.choice(reuse) if reuse and rng.random() < 0.5 else len(out)
                    if k == len(out):
                        out.append((m1, ir))
                    instr.append((i1, i2, k, "uvu", rng.random() < 0.8))
    kw = dict(shared_weights=shared, internal_weights=False)
    ref = o3.TensorProduct(irreps1, irreps2, o3.Irreps(out), instr, **kw).to(dtype)
    ours = equikern.TensorProductConv(
        irreps1, irreps2, o3.Irreps(out), instr, backend="triton", deterministic=deterministic, **kw
    ).to(device=DEVICE, dtype=dtype)
    return ref, ours


def uvw_pair(rng: random.Random, dtype, shared: bool, deterministic: bool):
    """Random uvw instructions (DiffDock's fully connected products; several paths per output block)."""
    irreps1, irreps2, irreps_out, instr = random_problem(rng, "uvw", lmax=2, max_mul=3)
    kw = dict(shared_weights=shared, internal_weights=False)
    ref = o3.TensorProduct(irreps1, irreps2, irreps_out, instr, **kw).to(dtype)
    ours = equikern.TensorProductConv(
        irreps1, irreps2, irreps_out, instr, backend="triton", deterministic=deterministic, **kw
    ).to(device=DEVICE, dtype=dtype)
    return ref, ours


PAIRS = {"uvu": uvu_pair, "uvw": uvw_pair}


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_unfused_e3nn(deterministic, shared, mode):
    rng = random.Random(7 + 2 * deterministic + shared + 4 * (mode == "uvw"))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        ref, ours = PAIRS[mode](rng, torch.float64, shared, deterministic)
        n, e = rng.randint(3, 7), rng.randint(5, 20)
        x, attr, w = graph_inputs(ref, n, e, torch.float64, gen)
        src, dst = random_graph(rng, gen, n, e)
        leaves = [t.detach().requires_grad_() for t in (x, attr, w) if t is not None]
        lw = leaves[2] if w is not None else None
        want = unfused(ref, leaves[0], leaves[1], lw, src, dst, n)
        got = ours(
            *(t.to(DEVICE) if t is not None else None for t in (leaves[0], leaves[1], lw, src, dst)), n
        )
        assert got.shape == want.shape
        assert rel_err(got.cpu(), want) < 1e-12
        g = torch.randn(want.shape, generator=gen)
        for a, b in zip(torch.autograd.grad(got, leaves, g.to(DEVICE)), torch.autograd.grad(want, leaves, g)):
            assert rel_err(a.cpu(), b) < 1e-12


def fully_connected(irreps1, irreps2, irreps_out):
    """DiffDock's uvw instructions: every allowed (in1, in2, out) triple."""
    irreps1, irreps2, irreps_out = (o3.Irreps(i) for i in (irreps1, irreps2, irreps_out))
    instr = [
        (i1, i2, k, "uvw", True)
        for i1, (_, a) in enumerate(irreps1)
        for i2, (_, b) in enumerate(irreps2)
        for k, (_, c) in enumerate(irreps_out)
        if c in a * b
    ]
    return irreps_out, instr


def instructions(mode: str, irreps1, irreps2, out_uvu, out_uvw):
    """(irreps_out, instructions): channelwise into out_uvu's degrees, or fully connected into out_uvw."""
    if mode == "uvu":
        return channelwise_instructions(irreps1, irreps2, out_uvu)
    return fully_connected(irreps1, irreps2, out_uvw)


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_second_derivatives_match_native(deterministic, mode):
    """Forces-style double backward, against the C++ convolution."""
    irreps_out, instr = instructions(mode, "2x0e+2x1o", "0e+1o+2e", "0e+1o+2e", "3x0e+2x1o+1x1e+2x2e")
    kw = dict(shared_weights=False, internal_weights=False)
    tri = equikern.TensorProductConv(
        "2x0e+2x1o", "0e+1o+2e", irreps_out, instr, backend="triton", deterministic=deterministic, **kw
    )
    nat = equikern.TensorProductConv("2x0e+2x1o", "0e+1o+2e", irreps_out, instr, backend="native", **kw)
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    src, dst = random_graph(rng, gen, 5, 12)
    x, attr, w = (
        torch.randn(r, d, generator=gen)
        for r, d in ((5, tri.irreps_in1.dim), (12, 9), (12, tri.weight_numel))
    )

    def run(conv):
        a, b, c = (t.clone().requires_grad_() for t in (x, attr, w))
        out = conv(a, b, c, src, dst)
        grads = torch.autograd.grad(out.pow(2).sum(), (a, b, c), create_graph=True)
        return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (a, b, c)))

    for got, want in zip(run(tri), run(nat)):
        assert rel_err(got.detach(), want.detach()) < 1e-12


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_gradcheck_and_gradgradcheck(mode):
    irreps_out, instr = instructions(mode, "1x0e+1x1o", "0e+1o", "0e+1o", "2x0e+1x1o")
    conv = equikern.TensorProductConv(
        "1x0e+1x1o",
        "0e+1o",
        irreps_out,
        instr,
        backend="triton",
        shared_weights=False,
        internal_weights=False,
    )
    gen = torch.Generator().manual_seed(1)
    src, dst = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    args = [
        torch.randn(r, d, generator=gen, requires_grad=True)
        for r, d in ((3, conv.irreps_in1.dim), (4, 4), (4, conv.weight_numel))
    ]
    for det in (False, True):
        conv.deterministic = det

        def fn(x, a, w):
            return conv(x, a, w, src, dst)

        assert torch.autograd.gradcheck(fn, args, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_opcheck(mode):
    irreps_out, instr = instructions(mode, "2x0e+1x1o", "0e+1o", "0e+1o", "1x0e+2x1o")
    conv = equikern.TensorProductConv(
        "2x0e+1x1o",
        "0e+1o",
        irreps_out,
        instr,
        backend="triton",
        shared_weights=False,
        internal_weights=False,
    )
    gen = torch.Generator().manual_seed(2)
    src, dst = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([1, 1, 0, 2, 2])
    graph = tuple(equikern.ops.tensor_product_conv.conv_graph(src, dst, 3, 3))
    x, a, w = (
        torch.randn(r, d, generator=gen, requires_grad=True)
        for r, d in ((3, conv.irreps_in1.dim), (5, 4), (5, conv.weight_numel))
    )
    g = torch.randn(3, conv.irreps_out.dim, generator=gen)
    plan = (conv._paths, conv._cg_ijk, conv._cg_bits.view(torch.float64), conv._triton_key)
    for det in (False, True):
        torch.library.opcheck(tconv._conv_op, (x, a, w, *graph, *plan, det, conv.irreps_out.dim, False))
        torch.library.opcheck(tconv._conv_bwd_op, (g, x, a, w, *graph, *plan, det, False))


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_float16_inputs_accumulate_in_float32(mode):
    irreps_out, instr = instructions(mode, "2x0e+2x1o", "0e+1o", "0e+1o", "2x0e+1x1o")
    kw = dict(shared_weights=False, internal_weights=False)
    gen = torch.Generator().manual_seed(4)
    src, dst = random_graph(random.Random(4), gen, 5, 12)
    for det in (False, True):
        conv = equikern.TensorProductConv(
            "2x0e+2x1o", "0e+1o", irreps_out, instr, backend="triton", deterministic=det, **kw
        )
        x, attr, w = (
            torch.randn(r, d, generator=gen, dtype=torch.float32, requires_grad=True)
            for r, d in ((5, 8), (12, 4), (12, conv.weight_numel))
        )
        want = conv(x, attr, w, src, dst)
        half = [t.detach().half().requires_grad_() for t in (x, attr, w)]
        got = conv(*half, src, dst)
        assert got.dtype == torch.float16 and rel_err(got.double(), want) < 1e-2
        g = torch.randn(want.shape, generator=gen)
        for a, b in zip(torch.autograd.grad(got, half, g.half()), torch.autograd.grad(want, (x, attr, w), g)):
            assert a.dtype == torch.float16 and rel_err(a.double(), b) < 1e-2


def test_bad_input_and_deterministic_mode_is_reproducible():
    irreps_out, instr = channelwise_instructions("2x0e+1x1o", "0e+1o", "0e+1o")
    conv = equikern.TensorProductConv(
        "2x0e+1x1o",
        "0e+1o",
        irreps_out,
        instr,
        backend="triton",
        shared_weights=False,
        internal_weights=False,
    )
    x, a, w = (torch.randn(*s, dtype=torch.float32) for s in ((3, 5), (4, 4), (4, conv.weight_numel)))
    with pytest.raises(RuntimeError, match=r"edge_src\[1\] = 3 is out of range"):
        conv(x, a, w, torch.tensor([0, 3, 1, 1]), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(RuntimeError, match=r"edge_dst\[2\] = -1 is out of range"):
        conv(x, a, w, torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, -1, 0]))
    graph = tuple(
        equikern.ops.tensor_product_conv.conv_graph(
            torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2]), 3, 3
        )
    )
    plan = (conv._paths, conv._cg_ijk, conv._cg_bits.view(torch.float64), conv._triton_key)
    with pytest.raises(ValueError, match="edge_weight has 3 rows"):
        tconv.tensor_product_conv(x, a, w[:3], graph, *plan, True, conv.irreps_out.dim)
    with pytest.raises(ValueError, match="edge_attr is torch.float32"):
        tconv.tensor_product_conv(x.double(), a, w.double(), graph, *plan, True, conv.irreps_out.dim)
    with pytest.raises(ValueError, match="dst_perm must be a 1-D int64"):
        bad = graph[:2] + (graph[2].int(),) + graph[3:]
        tconv.tensor_product_conv(x, a, w, bad, *plan, True, conv.irreps_out.dim)
    conv.deterministic = True
    runs = [conv(x, a, w, *graph[:2]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    irreps_out, instr = fully_connected("2x0e+1x1o", "0e+1o", "1x0e+2x1o")
    uvw = equikern.TensorProductConv(
        "2x0e+1x1o", "0e+1o", irreps_out, instr, backend="triton", deterministic=True, shared_weights=False
    )
    w = torch.randn(4, uvw.weight_numel, dtype=torch.float32, requires_grad=True)
    runs = [torch.autograd.grad(uvw(x, a, w, *graph[:2]).square().sum(), w)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# -- on the GPU, compiled kernels on the benchmark's lattice ------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("mode", ["uvu", "uvw"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_lattice_matches_cpu(deterministic, dtype, mode):
    from equikern.bench.conv import diamond_lattice

    src, dst, vec = diamond_lattice(3)
    if mode == "uvu":
        irreps_in, irreps_sh = "32x0e+32x1o+32x2e", o3.Irreps.spherical_harmonics(3)
        irreps_out, instr = channelwise_instructions(irreps_in, irreps_sh, "0e+1o+2e+3o")
    else:  # DiffDock-shaped
        irreps_in, irreps_sh = "16x0e+8x1o+8x1e", o3.Irreps.spherical_harmonics(2)
        irreps_out, instr = fully_connected(irreps_in, irreps_sh, "16x0e+8x1o+8x1e")
    kw = dict(shared_weights=False, internal_weights=False)
    gpu = equikern.TensorProductConv(
        irreps_in, irreps_sh, irreps_out, instr, deterministic=deterministic, **kw
    ).cuda()
    cpu = equikern.TensorProductConv(irreps_in, irreps_sh, irreps_out, instr, **kw)
    gen = torch.Generator().manual_seed(8)
    n, e = int(src.max()) + 1, src.shape[0]
    x = torch.randn(n, gpu.irreps_in1.dim, generator=gen, dtype=dtype)
    attr = o3.spherical_harmonics(irreps_sh, vec.to(dtype), True)
    w = torch.randn(e, gpu.weight_numel, generator=gen, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def run(conv, device):
        a, b, c = (t.to(device).requires_grad_() for t in (x, attr, w))
        out = conv(a, b, c, src.to(device), dst.to(device))
        grads = torch.autograd.grad(out.pow(2).sum(), (a, b, c), create_graph=True)
        return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (a, b, c)))

    first = run(gpu, "cuda")
    for got, want in zip(first, run(cpu, "cpu")):
        assert rel_err(got.detach().cpu(), want.detach()) < tol
    if deterministic:  # no floating-point atomics: bitwise equal from run to run
        for a, b in zip(first, run(gpu, "cuda")):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_edge_vectors_option_takes_spherical_harmonics_itself(backend):
    """edge_vectors=True equals the convolution of e3nn's spherical harmonics, gradients into the vectors
    included (forces)."""
    irreps_sh = o3.Irreps.spherical_harmonics(2)
    irreps_out, instr = channelwise_instructions("2x0e+2x1o", irreps_sh, "0e+1o+2e")
    kw = dict(shared_weights=False, internal_weights=False, backend=backend)
    conv = equikern.TensorProductConv("2x0e+2x1o", irreps_sh, irreps_out, instr, edge_vectors=True, **kw)
    plain = equikern.TensorProductConv("2x0e+2x1o", irreps_sh, irreps_out, instr, **kw)
    gen = torch.Generator().manual_seed(6)
    src, dst = random_graph(random.Random(6), gen, 5, 11)
    x = torch.randn(5, conv.irreps_in1.dim, generator=gen)
    w = torch.randn(11, conv.weight_numel, generator=gen)
    vec = torch.randn(11, 3, generator=gen, requires_grad=True)
    got = conv(x, vec, w, src, dst)
    want = plain(x, o3.spherical_harmonics(irreps_sh, vec, True, normalization="component"), w, src, dst)
    assert rel_err(got, want) < 1e-12
    g = torch.randn(want.shape, generator=gen)
    (a,) = torch.autograd.grad(got, vec, g)
    (b,) = torch.autograd.grad(want, vec, g)
    assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="edge vectors of shape"):
        conv(x, torch.randn(11, 9), w, src, dst)
    with pytest.raises(ValueError, match="must be spherical harmonics"):
        equikern.TensorProductConv("2x0e", "2x0e", "2x0e", [(0, 0, 0, "uvu", True)], edge_vectors=True)


@pytest.mark.parametrize(
    ("mode", "deterministic"), [("uvu", False), ("uvu", True), ("uvw", False), ("uvw", True)]
)
def test_plans_split_into_several_kernels(monkeypatch, mode, deterministic):
    """Every kernel of the convolution (both modes) split into parts, with shared and per-edge weights."""
    from equikern.triton import tensor_product as ttp

    monkeypatch.setattr(ttp, "PART_BUDGET", 12)
    ttp.kernel.cache_clear()
    try:
        irreps_out, instr = instructions(mode, "2x0e+2x1o+1x2e", "0e+1o+2e", "0e+1o+2e", "2x0e+1x1o+2x2e")
        for shared in (False, True):
            kw = dict(shared_weights=shared, internal_weights=False)
            tri = equikern.TensorProductConv(
                "2x0e+2x1o+1x2e", "0e+1o+2e", irreps_out, instr, backend="triton", **kw
            )
            tri.deterministic = deterministic
            nat = equikern.TensorProductConv(
                "2x0e+2x1o+1x2e", "0e+1o+2e", irreps_out, instr, backend="native", **kw
            )
            assert len(ttp._PLANS[tri._triton_key].parts("bwd", False)) > 1
            assert len(ttp._PLANS[tri._triton_key].parts("fwd", False)) > 1
            gen = torch.Generator().manual_seed(9)
            src, dst = random_graph(random.Random(9), gen, 4, 9)
            x, attr = (torch.randn(r, d, generator=gen, requires_grad=True) for r, d in ((4, 13), (9, 9)))
            w = torch.randn(*(() if shared else (9,)), tri.weight_numel, generator=gen, requires_grad=True)
            a, b = tri(x, attr, w, src, dst), nat(x, attr, w, src, dst)
            assert rel_err(a, b) < 1e-12
            g = torch.randn(a.shape, generator=gen)
            for u, v in zip(torch.autograd.grad(a, (x, attr, w), g), torch.autograd.grad(b, (x, attr, w), g)):
                assert rel_err(u, v) < 1e-12
    finally:
        ttp.kernel.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_segment_sum_kernel(dtype):
    """The kernel of equikern::conv_segment_sum on CUDA: each node's rows summed in edge order (nodes
    without edges, no edges at all, columns over one tile); equal to a float64 sum to the dtype's rounding,
    and bitwise equal to the CPU op's sequential sum where that sums in the same precision."""
    from equikern.ops.tensor_product_conv import conv_csr, conv_segment_sum

    gen = torch.Generator().manual_seed(22)
    for n, e, d in ((5, 40, 7), (3, 0, 4), (20, 90, 130), (1, 3, 1)):
        index = torch.randint(0, max(1, n - 1), (e,), generator=gen)
        rows = torch.randn(e, d, generator=gen).to(dtype)
        perm, ptr = conv_csr(index, n, "index")
        got = tconv.segment_sum(rows.to(DEVICE), perm.to(DEVICE), ptr.to(DEVICE)).cpu()
        want = torch.zeros(n, d, dtype=torch.float64).index_add_(0, index, rows.double())
        assert got.dtype == dtype and got.shape == (n, d)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}.get(dtype, 1e-14)
        assert (got.double() - want).abs().max() <= tol * want.abs().max().clamp_min(1)
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(got, conv_segment_sum(rows, index, perm, ptr))


@needs_gpu
@pytest.mark.parametrize("mode", ["uvv", "uuu", "uvuv", "uuw"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_unfused_route_for_other_modes(mode, deterministic):
    """Plans without a fused kernel run on CUDA through per-edge messages, with a warning; equal to the CPU op
    with derivatives to second order, bitwise reproducible in both modes."""
    from test_tensor_product_conv import mode_pair

    rng = random.Random(23)
    gen = torch.Generator().manual_seed(23)
    ref, cpu = mode_pair(rng, mode, torch.float64)
    gpu = copy.deepcopy(cpu).cuda()
    gpu.deterministic = deterministic
    n, e = 50, 400
    x, attr, w = graph_inputs(ref, n, e, torch.float64, gen)
    src, dst = random_graph(rng, gen, n, e)

    def run(conv, device):
        leaves = [t.to(device).requires_grad_() for t in (x, attr) + ((w,) if w is not None else ())]
        lw = leaves[2] if w is not None else None
        out = conv(leaves[0], leaves[1], lw, src.to(device), dst.to(device))
        grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
        return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves))

    with pytest.warns(RuntimeWarning, match="no fused GPU kernel"):
        first = run(gpu, "cuda")
    for got, want in zip(first, run(cpu, "cpu"), strict=True):
        assert rel_err(got.detach().cpu(), want.detach()) < 1e-10
    for a, b in zip(first, run(gpu, "cuda"), strict=True):
        assert torch.equal(a, b)
