"""equikern.TensorProductConv against the unfused e3nn convolution (gather, o3.TensorProduct, index_add_)."""

import random

import pytest
import torch
from e3nn import o3

import equikern
from equikern.nn.tensor_product import channelwise_instructions
from equikern.ops.tensor_product_conv import conv_graph, tensor_product_conv, tensor_product_conv_backward

pytestmark = pytest.mark.usefixtures("float64_default")
MODES = ["uvw", "uvu", "uvv", "uuw", "uuu", "uvuv"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def random_graph(rng: random.Random, gen: torch.Generator, num_nodes: int, num_edges: int):
    """Unsorted edges with repeats; some nodes receive or send nothing."""
    quiet = max(1, num_nodes // 4)  # the last nodes have no incoming edges
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst = torch.randint(0, max(1, num_nodes - quiet), (num_edges,), generator=gen)
    if num_edges > 2:
        src[-1], dst[-1] = src[0], dst[0]  # a repeated edge
    return src, dst


def edge_sh(irreps_sh: o3.Irreps, num_edges: int, dtype, gen) -> torch.Tensor:
    vec = torch.randn(num_edges, 3, dtype=dtype, generator=gen)
    return o3.spherical_harmonics(irreps_sh, vec, normalize=True, normalization="component")


def unfused(ref: o3.TensorProduct, x, attr, w, src, dst, num_nodes):
    msg = ref(x[src], attr, w)
    return torch.zeros(num_nodes, msg.shape[1], dtype=msg.dtype).index_add_(0, dst, msg)


def channelwise_pair(rng: random.Random, dtype, shared=False, **options):
    mul = rng.choice([1, 3, 8, 16])
    lmax = rng.randint(1, 3)
    irreps_in = o3.Irreps("+".join(f"{mul}x{l}{p}" for l in range(lmax + 1) for p in rng.sample("eo", 1)))
    irreps_sh = o3.Irreps.spherical_harmonics(rng.randint(1, 3))
    out, instr = channelwise_instructions(irreps_in, irreps_sh, irreps_in)
    kw = dict(shared_weights=shared, internal_weights=False, **options)
    ref = o3.TensorProduct(irreps_in, irreps_sh, out, instr, **kw).to(dtype)
    ours = equikern.TensorProductConv(irreps_in, irreps_sh, out, instr, **kw).to(dtype)
    return ref, ours


def uvw_pair(rng: random.Random, dtype, shared=False):
    irreps_in = o3.Irreps(f"{rng.randint(1, 4)}x0e+{rng.randint(1, 4)}x1o+{rng.randint(1, 3)}x2e")
    irreps_sh = o3.Irreps("0e+1o+2e")
    irreps_out = o3.Irreps(f"{rng.randint(1, 4)}x0e+{rng.randint(1, 4)}x1o+{rng.randint(1, 3)}x2e")
    instr = [
        (i, j, k, "uvw", True)
        for i, (_, ir1) in enumerate(irreps_in)
        for j, (_, ir2) in enumerate(irreps_sh)
        for k, (_, ir) in enumerate(irreps_out)
        if ir in ir1 * ir2
    ]
    kw = dict(shared_weights=shared, internal_weights=False)
    ref = o3.TensorProduct(irreps_in, irreps_sh, irreps_out, instr, **kw).to(dtype)
    ours = equikern.TensorProductConv(irreps_in, irreps_sh, irreps_out, instr, **kw).to(dtype)
    return ref, ours


def mode_pair(rng: random.Random, mode: str, dtype):
    """One to three random paths of one connection mode, per-edge weights where weighted."""
    irreps1 = o3.Irreps(f"{rng.randint(1, 3)}x{rng.randint(0, 2)}e+{rng.randint(1, 3)}x1o")
    if mode.startswith("uu"):
        irreps2 = o3.Irreps([(mul, (rng.randint(0, 2), 1)) for mul, _ in irreps1])
    else:
        irreps2 = o3.Irreps(f"{rng.randint(1, 2)}x0e+{rng.randint(1, 2)}x1o")
    out, instr = [], []
    for _ in range(rng.randint(1, 3)):
        i1 = rng.randrange(len(irreps1))
        i2 = i1 if mode.startswith("uu") else rng.randrange(len(irreps2))
        (m1, ir1), (m2, ir2) = irreps1[i1], irreps2[i2]
        has_weight = mode == "uvw" or rng.random() < 0.7
        mul = {"uvw": rng.randint(1, 3), "uvu": m1, "uvv": m2, "uuw": rng.randint(1, 3), "uuu": m1}.get(
            mode, m1 * m2
        )
        if mode == "uuw" and not has_weight:
            mul = 1
        instr.append((i1, i2, len(out), mode, has_weight))
        out.append((mul, rng.choice(list(ir1 * ir2))))
    kw = dict(shared_weights=False, internal_weights=False)
    ref = o3.TensorProduct(irreps1, irreps2, o3.Irreps(out), instr, **kw).to(dtype)
    ours = equikern.TensorProductConv(irreps1, irreps2, o3.Irreps(out), instr, **kw).to(dtype)
    return ref, ours


def graph_inputs(ref, num_nodes, num_edges, dtype, gen, sh=None):
    x = torch.randn(num_nodes, ref.irreps_in1.dim, dtype=dtype, generator=gen)
    attr = (
        edge_sh(sh, num_edges, dtype, gen)
        if sh is not None
        else torch.randn(num_edges, ref.irreps_in2.dim, dtype=dtype, generator=gen)
    )
    if ref.weight_numel == 0:
        w = None
    elif ref.shared_weights:
        w = torch.randn(ref.weight_numel, dtype=dtype, generator=gen)
    else:
        w = torch.randn(num_edges, ref.weight_numel, dtype=dtype, generator=gen)
    return x, attr, w


def check_against_e3nn(ref, ours, x, attr, w, src, dst, num_nodes, tol):
    """Output and the gradients of node features, edge attributes and weights."""
    leaves = [t.detach().requires_grad_() for t in (x, attr) + ((w,) if w is not None else ())]
    lw = leaves[2] if w is not None else None
    want = unfused(ref, leaves[0], leaves[1], lw, src, dst, num_nodes)
    got = ours(leaves[0], leaves[1], lw, src, dst, num_nodes)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) < tol
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True])
def test_channelwise_matches_unfused_e3nn(dtype, shared):
    rng = random.Random(11 + shared)
    gen = torch.Generator().manual_seed(3)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for _ in range(4):
        options = {"irrep_normalization": rng.choice(["component", "norm"])}
        ref, ours = channelwise_pair(rng, dtype, shared, **options)
        n, e = rng.randint(1, 30), rng.randint(0, 120)
        x, attr, w = graph_inputs(ref, n, e, dtype, gen, sh=ref.irreps_in2)
        src, dst = random_graph(rng, gen, n, e)
        check_against_e3nn(ref, ours, x, attr, w, src, dst, n, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True])
def test_fully_connected_uvw_matches_unfused_e3nn(dtype, shared):
    rng = random.Random(5 + shared)
    gen = torch.Generator().manual_seed(4)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for _ in range(3):
        ref, ours = uvw_pair(rng, dtype, shared)
        n, e = rng.randint(1, 25), rng.randint(1, 90)
        x, attr, w = graph_inputs(ref, n, e, dtype, gen, sh=ref.irreps_in2)
        src, dst = random_graph(rng, gen, n, e)
        check_against_e3nn(ref, ours, x, attr, w, src, dst, n, tol)


@pytest.mark.parametrize("mode", MODES)
def test_every_connection_mode_matches_unfused_e3nn(mode):
    rng = random.Random(MODES.index(mode))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        ref, ours = mode_pair(rng, mode, torch.float64)
        n, e = rng.randint(1, 12), rng.randint(1, 40)
        x, attr, w = graph_inputs(ref, n, e, torch.float64, gen)
        src, dst = random_graph(rng, gen, n, e)
        check_against_e3nn(ref, ours, x, attr, w, src, dst, n, 1e-10)


def test_num_nodes_differs_from_source_rows_and_int32_indices():
    rng = random.Random(2)
    gen = torch.Generator().manual_seed(6)
    ref, ours = channelwise_pair(rng, torch.float64)
    x, attr, w = graph_inputs(ref, 9, 40, torch.float64, gen, sh=ref.irreps_in2)
    src = torch.randint(0, 9, (40,), generator=gen)
    for num_nodes in (4, 15):
        dst = torch.randint(0, num_nodes, (40,), generator=gen)
        check_against_e3nn(ref, ours, x, attr, w, src, dst, num_nodes, 1e-10)
        want = ours(x, attr, w, src, dst, num_nodes)
        assert torch.equal(ours(x, attr, w, src.int(), dst.int(), num_nodes), want)


def test_empty_graphs():
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(7)
    ref, ours = channelwise_pair(rng, torch.float64)
    x, attr, w = graph_inputs(ref, 5, 0, torch.float64, gen, sh=ref.irreps_in2)
    none = torch.zeros(0, dtype=torch.long)
    x.requires_grad_()
    w.requires_grad_()
    out = ours(x, attr, w, none, none)
    assert out.shape == (5, ref.irreps_out.dim) and not out.any()
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert not gx.any() and gw.shape == w.shape
    x0 = torch.zeros(0, ref.irreps_in1.dim)
    assert ours(x0, attr, w, none, none).shape == (0, ref.irreps_out.dim)


@pytest.mark.parametrize("kind", ["channelwise", "uvw-shared", "mixed"])
def test_gradcheck_and_gradgradcheck(kind):
    gen = torch.Generator().manual_seed(8)
    irreps_in, irreps_sh = o3.Irreps("2x0e+2x1o"), o3.Irreps("0e+1o")
    if kind == "channelwise":
        out, instr = channelwise_instructions(irreps_in, irreps_sh, irreps_in)
        conv = equikern.TensorProductConv(irreps_in, irreps_sh, out, instr, shared_weights=False)
    elif kind == "uvw-shared":
        instr = [
            (0, 0, 0, "uvw", True),
            (1, 1, 0, "uvw", True),
            (1, 0, 1, "uvw", True),
            (0, 1, 1, "uvw", True),
        ]
        conv = equikern.TensorProductConv(irreps_in, irreps_sh, "2x0e+1x1o", instr, internal_weights=False)
    else:  # weighted and unweighted paths together (the double backward's weighted_only ops)
        instr = [
            (0, 0, 0, "uvu", True),
            (1, 1, 0, "uvu", False),
            (1, 0, 1, "uvu", True),
            (0, 1, 1, "uvu", False),
        ]
        conv = equikern.TensorProductConv(irreps_in, irreps_sh, irreps_in, instr, shared_weights=False)
    n, e = 4, 7
    src = torch.tensor([0, 3, 1, 0, 2, 3, 0])
    dst = torch.tensor([1, 1, 0, 2, 1, 0, 1])  # node 3 receives nothing, repeats (0 -> 1)
    x = torch.randn(n, irreps_in.dim, generator=gen, requires_grad=True)
    attr = torch.randn(e, irreps_sh.dim, generator=gen, requires_grad=True)
    wshape = (conv.weight_numel,) if conv.shared_weights else (e, conv.weight_numel)
    w = torch.randn(*wshape, generator=gen, requires_grad=True)

    def f(x, attr, w):
        return conv(x, attr, w, src, dst)

    assert torch.autograd.gradcheck(f, (x, attr, w))
    assert torch.autograd.gradgradcheck(f, (x, attr, w))


def plan_args(conv):
    return (conv._paths, conv._blocks, conv._cg_ijk, conv._cg_bits.view(torch.float64))


def test_opcheck():
    rng = random.Random(9)
    gen = torch.Generator().manual_seed(9)
    for ref, conv in (channelwise_pair(rng, torch.float64), uvw_pair(rng, torch.float64)):
        n, e = 6, 17
        x, attr, w = graph_inputs(ref, n, e, torch.float64, gen, sh=ref.irreps_in2)
        src, dst = random_graph(rng, gen, n, e)
        graph = conv_graph(src, dst, n, n)
        plan = plan_args(conv)
        xs = [t.requires_grad_() for t in (x, attr, w)]
        torch.library.opcheck(
            torch.ops.equikern.tensor_product_conv.default, (*xs, *graph, *plan, conv.irreps_out.dim, False)
        )
        g = torch.randn(n, conv.irreps_out.dim, generator=gen, requires_grad=True)
        torch.library.opcheck(
            torch.ops.equikern.tensor_product_conv_backward.default, (g, *xs, *graph, *plan, False)
        )
        torch.library.opcheck(torch.ops.equikern.tensor_product_conv_csr.default, (dst, n, "edge_dst"))


def test_csr_is_a_stable_grouping():
    gen = torch.Generator().manual_seed(10)
    index = torch.randint(0, 7, (50,), generator=gen)
    perm, ptr = torch.ops.equikern.tensor_product_conv_csr(index, 9, "edge_dst")
    assert torch.equal(perm, torch.sort(index, stable=True).indices)
    assert torch.equal(
        ptr, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(index, minlength=9).cumsum(0)])
    )


def test_torch_compile_fullgraph():
    rng = random.Random(12)
    gen = torch.Generator().manual_seed(12)
    ref, conv = channelwise_pair(rng, torch.float64)
    x, attr, w = graph_inputs(ref, 8, 30, torch.float64, gen, sh=ref.irreps_in2)
    src, dst = random_graph(rng, gen, 8, 30)
    x.requires_grad_()
    compiled = torch.compile(conv, fullgraph=True)
    out = compiled(x, attr, w, src, dst)
    want = conv(x, attr, w, src, dst)
    assert torch.equal(out, want)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (h,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.equal(g, h)


def _output_and_gradients(conv, x, attr, w, src, dst):
    leaves = [t.detach().requires_grad_() for t in (x, attr, w)]
    y = conv(*leaves, src, dst)
    return [y.detach(), *torch.autograd.grad(y.square().sum(), leaves)]


@pytest.mark.parametrize("deterministic", [False, True])
def test_bitwise_reproducible_across_runs_and_thread_counts(deterministic):
    rng = random.Random(13)
    gen = torch.Generator().manual_seed(13)
    irreps_in, irreps_sh = o3.Irreps("16x0e+16x1o+16x2e"), o3.Irreps("0e+1o+2e")
    out, instr = channelwise_instructions(irreps_in, irreps_sh, irreps_in)
    for shared in (False, True):
        conv = equikern.TensorProductConv(
            irreps_in,
            irreps_sh,
            out,
            instr,
            shared_weights=shared,
            internal_weights=False,
            deterministic=deterministic,
        ).float()
        x, attr, w = graph_inputs(conv, 60, 900, torch.float32, gen, sh=irreps_sh)
        src, dst = random_graph(rng, gen, 60, 900)

        args = (conv, x, attr, w, src, dst)
        threads = torch.get_num_threads()
        first = _output_and_gradients(*args)
        try:
            torch.set_num_threads(1)
            single = _output_and_gradients(*args)
        finally:
            torch.set_num_threads(threads)
        for a, b, c in zip(first, _output_and_gradients(*args), single, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_bad_inputs():
    rng = random.Random(14)
    gen = torch.Generator().manual_seed(14)
    ref, conv = channelwise_pair(rng, torch.float64)
    x, attr, w = graph_inputs(ref, 5, 8, torch.float64, gen, sh=ref.irreps_in2)
    src, dst = random_graph(rng, gen, 5, 8)
    bad_src = src.clone()
    bad_src[3] = 5
    with pytest.raises(RuntimeError, match=r"edge_src\[3\] = 5 is out of range"):
        conv(x, attr, w, bad_src, dst)
    bad_dst = dst.clone()
    bad_dst[2] = -1
    with pytest.raises(RuntimeError, match=r"edge_dst\[2\] = -1 is out of range"):
        conv(x, attr, w, src, bad_dst)
    with pytest.raises(RuntimeError, match=r"edge_dst\[.\] = \d is out of range \[0, 2\)"):
        conv(x, attr, w, src, dst.clamp_min(2), num_nodes=2)
    with pytest.raises(ValueError, match="node_features"):
        conv(x[:, :-1], attr, w, src, dst)
    with pytest.raises(ValueError, match="edge_attr"):
        conv(x, attr[:, :-1], w, src, dst)
    with pytest.raises(ValueError, match="edge_src"):
        conv(x, attr, w, src[:-1], dst)
    with pytest.raises(ValueError, match="edge_dst"):
        conv(x, attr, w, src, dst.double())
    with pytest.raises(ValueError, match="edge_weight"):
        conv(x, attr, w[:-1], src, dst)
    with pytest.raises(ValueError, match="weight"):
        conv(x, attr, None, src, dst)
    with pytest.raises(ValueError, match="dtypes differ"):
        conv(x, attr.float(), w, src, dst)
    with pytest.raises(ValueError, match="devices differ"):
        conv(x, attr.to("meta"), w, src, dst)
    # the op checks its own arguments: groupings that disagree with the edges, and shapes
    graph = conv_graph(src, dst, 5, 5)
    plan = plan_args(conv)
    op = torch.ops.equikern.tensor_product_conv.default
    shuffled = graph._replace(dst_perm=graph.dst_perm.flip(0))
    with pytest.raises(RuntimeError, match="do not group the edges by destination"):
        op(x, attr, w, *shuffled, *plan, conv.irreps_out.dim, False)
    twice = graph._replace(src_perm=torch.zeros_like(graph.src_perm))
    with pytest.raises(RuntimeError, match="src_perm is not a permutation"):
        op(x, attr, w, *twice, *plan, conv.irreps_out.dim, False)
    short_ptr = graph.dst_ptr.clone()
    short_ptr[-1] -= 1
    with pytest.raises(RuntimeError, match="dst_ptr must run from 0"):
        op(x, attr, w, *graph._replace(dst_ptr=short_ptr), *plan, conv.irreps_out.dim, False)
    with pytest.raises(RuntimeError, match="edge_weight has 7 rows"):
        op(x, attr, w[:-1], *graph, *plan, conv.irreps_out.dim, False)
    with pytest.raises(RuntimeError, match="edge_src must have dtype int64"):
        op(x, attr, w, src.int(), *graph[1:], *plan, conv.irreps_out.dim, False)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        tensor_product_conv_backward(torch.zeros(4, conv.irreps_out.dim), x, attr, w, graph, *plan)
    assert tensor_product_conv(x, attr, w, graph, *plan, conv.irreps_out.dim).shape == (
        5,
        conv.irreps_out.dim,
    )


def test_diamond_lattice_of_the_benchmark():
    from equikern.bench.conv import LATTICE_CONSTANT, diamond_lattice

    for cells in (2, 3, 9):
        src, dst, vec = diamond_lattice(cells)
        atoms = 8 * cells**3
        assert len(src) == 28 * atoms  # 4 + 12 + 12 neighbours within 3.0 A; 163296 edges at 9 cells
        assert torch.equal(torch.bincount(dst, minlength=atoms), torch.full((atoms,), 28))
        bond = vec.norm(dim=1).min().item()
        assert bond == pytest.approx(LATTICE_CONSTANT * 3**0.5 / 4)
        # every edge has its reverse
        forward = set(zip(src.tolist(), dst.tolist()))
        assert forward == set(zip(dst.tolist(), src.tolist()))


def test_benchmark_family_runs(tmp_path):
    import json

    from equikern.bench import __main__ as bench

    argv = ["--quick", "--device", "cpu", "--problems", "conv-nequip-lips", "--dtype", "float64"]
    assert bench.main(argv + ["--modes", "fwd,fwdbwd", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "equikern"]
    assert len(ours) == 2 and all(r["status"] == "ok" and r["max_rel_err"] < 1e-10 for r in ours)
    assert all(r["params"]["cells"] == 2 and r["batch"] == 64 for r in ours)  # --quick: batch 16 atoms


def _largest_allocation(fn) -> int:
    """Bytes of the largest tensor that an aten op allocated (and returned) while fn runs.

    Inside the fused ops, allocations are aten::empty calls of their own, so a temporary buffer of
    messages would show too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))


def test_messages_are_never_materialised():
    irreps_in, irreps_sh = o3.Irreps("16x0e+16x1o+16x2e"), o3.Irreps("0e+1o+2e+3o")
    out, instr = channelwise_instructions(irreps_in, irreps_sh, irreps_in)
    kw = dict(shared_weights=False, internal_weights=False)
    conv = equikern.TensorProductConv(irreps_in, irreps_sh, out, instr, **kw)
    ref = o3.TensorProduct(irreps_in, irreps_sh, out, instr, **kw)
    gen = torch.Generator().manual_seed(15)
    n, e = 20, 600
    x, attr, w = (t.requires_grad_() for t in graph_inputs(ref, n, e, torch.float64, gen))
    src, dst = random_graph(random.Random(15), gen, n, e)
    messages = e * out.dim * 8
    assert conv.weight_numel < out.dim  # so that the per-edge weight gradient is smaller than the messages

    def fused():
        torch.autograd.grad(conv(x, attr, w, src, dst).square().sum(), (x, attr, w))

    def unfused_run():  # the control: the same measurement sees e3nn's messages
        torch.autograd.grad(unfused(ref, x, attr, w, src, dst, n).square().sum(), (x, attr, w))

    assert _largest_allocation(unfused_run) >= messages
    assert _largest_allocation(fused) < messages


@pytest.mark.parametrize("kind", ["channelwise", "uvw"])
def test_second_derivatives_match_unfused_e3nn(kind):
    """The cost of training on forces: gradients of the squared first gradients, as the benchmark's dblbwd."""
    rng = random.Random(16)
    gen = torch.Generator().manual_seed(16)
    ref, conv = (
        channelwise_pair(rng, torch.float64) if kind == "channelwise" else uvw_pair(rng, torch.float64)
    )
    n, e = 9, 40
    x, attr, w = graph_inputs(ref, n, e, torch.float64, gen, sh=ref.irreps_in2)
    src, dst = random_graph(rng, gen, n, e)
    results = []
    for fn in (lambda *a: conv(*a, src, dst), lambda *a: unfused(ref, *a, src, dst, n)):
        leaves = [t.detach().requires_grad_() for t in (x, attr, w)]
        out = fn(*leaves)
        first = torch.autograd.grad(out, leaves, torch.ones_like(out) + out.detach(), create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), leaves)
        results.append([*first, *second])
    for a, b in zip(*results, strict=True):
        assert rel_err(a.detach(), b) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_unfused_route_equals_the_fused_op(mode):
    """The GPU route for plans without a fused kernel (gather, tensor product, sum by destination), run here
    on the CPU: equal to the fused op, first and second derivatives included."""
    rng = random.Random(20 + MODES.index(mode))
    gen = torch.Generator().manual_seed(20)
    ref, conv = mode_pair(rng, mode, torch.float64)
    n, e = rng.randint(2, 9), rng.randint(5, 30)
    x, attr, w = graph_inputs(ref, n, e, torch.float64, gen)
    src, dst = random_graph(rng, gen, n, e)
    graph = conv_graph(src, dst, n, n)
    leaves = [t.detach().requires_grad_() for t in (x, attr) + ((w,) if w is not None else ())]
    lw = leaves[2] if w is not None else None

    def derivatives(out):
        grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
        return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves))

    got = derivatives(conv._unfused(leaves[0], leaves[1], lw, graph))
    want = derivatives(conv(leaves[0], leaves[1], lw, src, dst))
    for a, b in zip(got, want, strict=True):
        assert rel_err(a.detach(), b.detach()) < 1e-12


def test_gather_and_segment_sum_ops():
    """The unfused route's ops: values against index_select / a float64 sum, each the other's derivative
    (gradcheck, gradgradcheck), opcheck, bad input."""
    from equikern.ops.tensor_product_conv import conv_csr, conv_gather, conv_segment_sum

    gen = torch.Generator().manual_seed(21)
    n, e, d = 6, 25, 5
    index = torch.randint(0, n - 1, (e,), generator=gen)  # node n - 1 receives nothing
    perm, ptr = conv_csr(index, n, "index")
    rows = torch.randn(e, d, generator=gen, requires_grad=True)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    want = torch.zeros(n, d).index_add_(0, index, rows.detach())
    assert torch.allclose(conv_segment_sum(rows, index, perm, ptr), want, rtol=0, atol=1e-12)
    assert torch.equal(conv_gather(x, index, perm, ptr), x.detach()[index])
    assert torch.autograd.gradcheck(lambda r: conv_segment_sum(r, index, perm, ptr), (rows,))
    assert torch.autograd.gradgradcheck(lambda r: conv_segment_sum(r, index, perm, ptr), (rows,))
    assert torch.autograd.gradcheck(lambda t: conv_gather(t, index, perm, ptr), (x,))
    assert torch.autograd.gradgradcheck(lambda t: conv_gather(t, index, perm, ptr), (x,))
    torch.library.opcheck(torch.ops.equikern.conv_segment_sum.default, (rows, index, perm, ptr))
    torch.library.opcheck(torch.ops.equikern.conv_gather.default, (x, index, perm, ptr))
    with pytest.raises(ValueError, match="rows must be 2-D"):
        conv_segment_sum(rows[0], index, perm, ptr)
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        conv_segment_sum(rows, index.int(), perm, ptr)
    with pytest.raises(ValueError, match="rows has 24 rows"):
        conv_segment_sum(rows[1:], index, perm, ptr)
    with pytest.raises(ValueError, match="perm must have one entry per index"):
        conv_gather(x, index, perm[1:], ptr)
    with pytest.raises(ValueError, match="ptr must have x.shape"):
        conv_gather(x[1:], index, perm, ptr)


def test_cuda_grouping_function_equals_the_cpu_op():
    """The CUDA impl of the grouping op is plain torch: run here on CPU tensors against the C++ counting sort,
    values and range errors."""
    from equikern.ops.tensor_product_conv import _conv_csr_cuda

    gen = torch.Generator().manual_seed(24)
    for n, e in ((7, 50), (3, 0), (1, 5), (40, 30)):
        index = torch.randint(0, n, (e,), generator=gen)
        for a, b in zip(_conv_csr_cuda(index, n, "edge_dst"), conv_csr_op(index, n), strict=True):
            assert torch.equal(a, b)
    for bad, where in ((torch.tensor([0, 9]), r"edge_dst\[1\] = 9"), (torch.tensor([-1, 0]), r"\[0\] = -1")):
        for f in (_conv_csr_cuda, torch.ops.equikern.tensor_product_conv_csr):
            with pytest.raises(RuntimeError, match=where):
                f(bad, 5, "edge_dst")
    with pytest.raises(RuntimeError, match="1-D int64"):
        _conv_csr_cuda(torch.tensor([0, 1], dtype=torch.int32), 5, "edge_dst")


def conv_csr_op(index, n):
    return torch.ops.equikern.tensor_product_conv_csr(index, n, "edge_dst")


def test_unfused_route_under_torch_compile_fullgraph():
    """The unfused route (the GPU's for plans without a fused kernel) compiles without graph breaks: its
    gather and sum are custom ops with fake kernels; values and gradients equal the eager route."""
    rng = random.Random(25)
    gen = torch.Generator().manual_seed(25)
    ref, conv = mode_pair(rng, "uvuv", torch.float64)
    n, e = 7, 25
    x, attr, w = graph_inputs(ref, n, e, torch.float64, gen)
    src, dst = random_graph(rng, gen, n, e)
    graph = conv_graph(src, dst, n, n)
    x.requires_grad_()
    compiled = torch.compile(conv._unfused, fullgraph=True)
    out = compiled(x, attr, w, graph)
    want = conv._unfused(x, attr, w, graph)
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (h,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.allclose(g, h, rtol=0, atol=1e-12)
