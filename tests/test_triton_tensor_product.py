"""The Triton tensor product (channelwise uvu plans) against e3nn and the C++ op.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
sizes stay tiny; the tests marked cuda repeat the checks on the GPU at realistic sizes.
"""

import os
import random
import threading

import pytest
import torch
from e3nn import o3

import equikern
from equikern.nn.tensor_product import channelwise_instructions
from equikern.triton import tensor_product as ttp
from test_tensor_product import inputs, random_problem, rel_err

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("float64_default")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def uvu_problem(rng: random.Random, max_mul: int = 3, mode: str = "uvu"):
    """Random uvu (or uvw) instructions: several paths per output block, unweighted paths, mul2 > 1."""
    return random_problem(rng, mode, lmax=2, max_mul=max_mul)


def pair(rng, dtype=torch.float64, mode="uvu", **options):
    irreps1, irreps2, irreps_out, instr = uvu_problem(rng, mode=mode)
    ref = o3.TensorProduct(irreps1, irreps2, irreps_out, instr, **options).to(dtype)
    ours = equikern.TensorProduct(irreps1, irreps2, irreps_out, instr, backend="triton", **options)
    ours = ours.to(device=DEVICE, dtype=dtype)
    if ref.internal_weights:
        ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
@pytest.mark.parametrize("seed", range(4))
def test_forward_and_gradients_match_e3nn(seed, mode):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    options = {"shared_weights": rng.choice([True, False])}
    if not options["shared_weights"]:
        options["internal_weights"] = False
    ref, ours = pair(rng, mode=mode, **options)
    batch = rng.choice([(3,), (2, 2), (1,)])
    x, y, w = inputs(ref, batch, torch.float64, gen, requires_grad=True)
    args = [t for t in (x, y, w) if t is not None]
    expected = ref(x, y, w)
    got = ours(*(None if t is None else t.to(DEVICE) for t in (x, y, w)))
    assert rel_err(got.cpu(), expected) < 1e-12
    g = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, args, g.to(DEVICE)), torch.autograd.grad(expected, args, g)):
        assert rel_err(a.cpu(), b) < 1e-12


def test_channelwise_plan_with_broadcast_operands_matches_native():
    """The MACE-shaped plan (one path per output block, per-sample weights), x2 and x1 broadcast."""
    irreps_out, instr = channelwise_instructions("3x0e+2x1o+2x2e", "0e+1o+2e+3o", "0e+1o+2e+3o")
    kw = dict(shared_weights=False, internal_weights=False)
    tri = equikern.TensorProduct("3x0e+2x1o+2x2e", "0e+1o+2e+3o", irreps_out, instr, backend="triton", **kw)
    nat = equikern.TensorProduct("3x0e+2x1o+2x2e", "0e+1o+2e+3o", irreps_out, instr, backend="native", **kw)
    gen = torch.Generator().manual_seed(3)
    for zx, zy in ((4, 1), (1, 4), (4, 4)):
        x = torch.randn(zx, tri.irreps_in1.dim, dtype=torch.float64, generator=gen, requires_grad=True)
        y = torch.randn(zy, tri.irreps_in2.dim, dtype=torch.float64, generator=gen, requires_grad=True)
        w = torch.randn(4, tri.weight_numel, dtype=torch.float64, generator=gen, requires_grad=True)
        a, b = tri(x, y, w), nat(x, y, w)
        assert rel_err(a, b) < 1e-12
        g = torch.randn(a.shape, dtype=torch.float64, generator=gen)
        for u, v in zip(torch.autograd.grad(a, (x, y, w), g), torch.autograd.grad(b, (x, y, w), g)):
            assert u.shape == v.shape and rel_err(u, v) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    rng = random.Random(11)
    irreps1, irreps2, irreps_out, instr = uvu_problem(rng)
    tp = equikern.TensorProduct(
        irreps1, irreps2, irreps_out, instr, backend="triton", shared_weights=False, internal_weights=False
    )
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, tp.irreps_in1.dim, generator=gen)
    y = torch.randn(3, tp.irreps_in2.dim, generator=gen)
    w = torch.randn(3, tp.weight_numel, generator=gen)
    expected = tp(x.double(), y.double(), w.double())
    got = tp(x.to(dtype), y.to(dtype), w.to(dtype))
    assert got.dtype == dtype
    # float16 inputs are rounded (2^-11 relative) before the float32 arithmetic
    assert rel_err(got.double(), expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_gradcheck_and_gradgradcheck(mode):
    rng = random.Random(2)
    irreps1, irreps2, irreps_out, instr = uvu_problem(rng, max_mul=2, mode=mode)
    tp = equikern.TensorProduct(
        irreps1, irreps2, irreps_out, instr, backend="triton", shared_weights=False, internal_weights=False
    )
    gen = torch.Generator().manual_seed(2)
    args = [
        torch.randn(2, d, dtype=torch.float64, generator=gen, requires_grad=True)
        for d in (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)
    ]
    assert torch.autograd.gradcheck(tp, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(tp, args, fast_mode=True)


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_opcheck(mode):
    rng = random.Random(4)
    irreps1, irreps2, irreps_out, instr = uvu_problem(rng, max_mul=2, mode=mode)
    tp = equikern.TensorProduct(
        irreps1, irreps2, irreps_out, instr, backend="triton", shared_weights=False, internal_weights=False
    )
    gen = torch.Generator().manual_seed(4)
    x, y, w = (
        torch.randn(3, d, dtype=torch.float64, generator=gen, requires_grad=True)
        for d in (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)
    )
    plan = (tp._paths, tp._cg_ijk, tp._cg_bits.view(torch.float64), tp._triton_key)
    g = torch.randn(3, tp.irreps_out.dim, dtype=torch.float64, generator=gen)
    torch.library.opcheck(ttp._tp_op, (x, y, w, *plan, tp.irreps_out.dim, False))
    torch.library.opcheck(ttp._tp_bwd_op, (g, x, y, w, *plan, False))


def test_plan_is_rebuilt_from_tables_and_cached_on_disk(tmp_path, monkeypatch):
    """A fresh process (an exported program, an unpickled module) knows only the tables."""
    monkeypatch.setenv("EQUIKERN_CACHE_DIR", str(tmp_path))
    tp = equikern.ChannelwiseTensorProduct(
        "2x0e+1x1o", "0e+1o", "0e+1o", shared_weights=True, internal_weights=True, backend="triton"
    ).double()
    key = tp._triton_key
    x = torch.randn(2, tp.irreps_in1.dim, dtype=torch.float64)
    y = torch.randn(2, tp.irreps_in2.dim, dtype=torch.float64)
    expected = tp(x, y)
    monkeypatch.delitem(ttp._PLANS, key)
    ttp.kernel.cache_clear()
    assert torch.equal(tp(x, y), expected)
    assert key in ttp._PLANS
    assert any(name.endswith(".py") for name in os.listdir(tmp_path / "triton"))
    with pytest.raises(ValueError, match="key does not match"):
        ttp.tensor_product(
            x, y, tp.weight.reshape(1, -1), tp._paths, tp._cg_ijk, tp._cg_ijk[:0, 0].double(), key, 8
        )


def test_bad_input():
    with pytest.raises(ValueError, match="every instruction 'uvu'"):
        equikern.ElementwiseTensorProduct("2x0e", "2x0e", backend="triton")  # uuu
    with pytest.raises(ValueError, match="backend"):
        equikern.FullyConnectedTensorProduct("2x0e", "0e", "2x0e", backend="cuda")
    tp = equikern.ChannelwiseTensorProduct("2x0e+1x1o", "0e+1o", "0e+1o", backend="triton")
    plan = (tp._paths, tp._cg_ijk, tp._cg_bits.view(torch.float64), tp._triton_key)
    x, y, w = (torch.randn(*s, dtype=torch.float32) for s in ((3, 5), (3, 4), (1, tp.weight_numel)))
    with pytest.raises(ValueError, match="x2 must be 2-D"):
        ttp.tensor_product(x, y[0], w, *plan, tp.irreps_out.dim)
    with pytest.raises(ValueError, match="x2 is torch.float64"):
        ttp.tensor_product(x, y.double(), w, *plan, tp.irreps_out.dim)
    with pytest.raises(ValueError, match="batch sizes"):
        ttp.tensor_product(x, y[:2], w, *plan, tp.irreps_out.dim)
    with pytest.raises(ValueError, match="narrower"):
        ttp.tensor_product(x[:, :4], y, w, *plan, tp.irreps_out.dim)
    with pytest.raises(ValueError, match="dtype must be"):
        ttp.tensor_product(x.int(), y.int(), w.int(), *plan, tp.irreps_out.dim)
    with pytest.raises(ValueError, match="grad_out"):
        ttp.tensor_product_backward(torch.randn(2, 7), x, y, w, *plan)


def test_torch_compile_fullgraph():
    tp = equikern.ChannelwiseTensorProduct(
        "2x0e+1x1o", "0e+1o", "0e+1o", shared_weights=True, internal_weights=True, backend="triton"
    ).double()
    x = torch.randn(3, tp.irreps_in1.dim, dtype=torch.float64)
    y = torch.randn(3, tp.irreps_in2.dim, dtype=torch.float64)
    compiled = torch.compile(tp, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, y), tp(x, y), rtol=1e-12, atol=1e-12)


# -- on the GPU, compiled kernels at realistic sizes ----------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("problem", ["mace-medium", "nequip-like"])
def test_cuda_matches_cpu_native(dtype, problem):
    irreps1, irreps2 = {
        "mace-medium": ("64x0e+64x1o", "0e+1o+2e+3o"),
        "nequip-like": ("32x0e+16x1o+8x2e+3x3o", "2x0e+1o+2e"),
    }[problem]
    tp = equikern.ChannelwiseTensorProduct(irreps1, irreps2, "0e+1o+2e+3o", backend="auto")
    gen = torch.Generator().manual_seed(9)
    z = 1001
    x, y, w = (
        torch.randn(z, d, generator=gen) for d in (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)
    )
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]

    def run(device, dt):
        a, b, c = (t.to(device, dt).requires_grad_() for t in (x, y, w))
        out = tp.to(device)(a, b, c)
        grads = torch.autograd.grad(out.float().pow(2).sum(), (a, b, c), create_graph=True)
        second = torch.autograd.grad(sum(g.float().pow(2).sum() for g in grads), (a, b, c))
        return (out, *grads, *second)

    first = run("cuda", dtype)
    for got, expected in zip(first, run("cpu", torch.float64)):
        assert got.dtype == dtype
        assert rel_err(got.detach().double().cpu(), expected.detach()) < tol * (10 if got is first[-1] else 1)
    for a, b in zip(first, run("cuda", dtype)):  # no atomics: bitwise reproducible
        assert torch.equal(a, b)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("problem", ["DiffDock-L=2", "tetris-poly-1"])
def test_cuda_uvw_problems_match_cpu_native(dtype, problem):
    from equikern.bench import anchors

    p = next(q for q in anchors()["tensor_product"] if q["label"] == problem)
    shared = p["weights"].startswith("shared")
    kw = dict(shared_weights=shared, internal_weights=shared)
    gpu = equikern.FullyConnectedTensorProduct(p["irreps_in1"], p["irreps_in2"], p["irreps_out_target"], **kw)
    cpu = equikern.FullyConnectedTensorProduct(
        p["irreps_in1"], p["irreps_in2"], p["irreps_out_target"], backend="native", **kw
    )
    assert gpu._triton_key is not None
    if shared:
        cpu.load_state_dict(gpu.state_dict())
    gpu = gpu.cuda().to(dtype)
    gen = torch.Generator().manual_seed(3)
    z = 777
    x, y = (torch.randn(z, d, generator=gen) for d in (gpu.irreps_in1.dim, gpu.irreps_in2.dim))
    w = None if shared else torch.randn(z, gpu.weight_numel, generator=gen)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]

    def run(tp, device, dt):
        ins = [t.to(device, dt).requires_grad_() for t in (x, y, w) if t is not None]
        out = tp(*ins[:2], ins[2] if w is not None else None)
        params = ins + ([tp.weight] if shared else [])
        grads = torch.autograd.grad(out.float().pow(2).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.float().pow(2).sum() for g in grads), ins)
        return (out, *grads, *second)

    for got, want in zip(run(gpu, "cuda", dtype), run(cpu.double(), "cpu", torch.float64)):
        assert rel_err(got.detach().double().cpu(), want.detach()) < tol * 10


@pytest.mark.cuda
@needs_gpu
def test_cuda_compile_and_export():
    tp = equikern.ChannelwiseTensorProduct("32x0e+32x1o", "0e+1o+2e", "0e+1o+2e").cuda()
    assert tp._triton_key is not None
    x = torch.randn(100, tp.irreps_in1.dim, device="cuda")
    y = torch.randn(100, tp.irreps_in2.dim, device="cuda")
    w = torch.randn(100, tp.weight_numel, device="cuda")
    expected = tp(x, y, w)
    assert torch.allclose(torch.compile(tp, fullgraph=True)(x, y, w), expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(tp, (x, y, w))
    assert torch.allclose(exported.module()(x, y, w), expected, rtol=1e-5, atol=1e-5)


def test_tuner_runs_every_configuration(tmp_path):
    """python -m equikern.triton.tune (timings mean nothing under the interpreter: this checks the loop)."""
    import json

    from equikern.triton import tune

    out = tmp_path / "tune.json"
    args = ["--irreps", "2x0e+2x1o;0e+1o;0e+1o", "--batch", "3", "--configs", "quick", "--reps", "1"]
    assert tune.main(args + ["--dtype", "float64", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["direction"], r["tile"], r["warps"]) for r in rows} == {("fwd", 512, 4), ("bwd", 128, 4)}
    assert ttp.CONFIG == {"fwd": [512, 4], "bwd": [128, 4]}  # restored


def test_long_plans_split_into_several_kernels(monkeypatch):
    """Plan.parts: with a small budget every kind runs as several kernels, with the same results."""
    monkeypatch.setattr(ttp, "PART_BUDGET", 12)
    ttp.kernel.cache_clear()
    try:
        out, uvu = channelwise_instructions("2x0e+2x1o+1x2e", "0e+1o+2e", "0e+1o+2e")
        uvw = [(i, j, k, "uvw", True) for i, j, k in ((0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 2))]
        problems = (("2x0e+2x1o+1x2e", "0e+1o+2e", out, uvu), ("2x0e+2x1o", "0e+1o", "3x0e+2x1o+1x1e", uvw))
        for irreps1, irreps2, irreps_out, instr in problems:
            kw = dict(shared_weights=False, internal_weights=False)
            tri = equikern.TensorProduct(irreps1, irreps2, irreps_out, instr, backend="triton", **kw)
            nat = equikern.TensorProduct(irreps1, irreps2, irreps_out, instr, backend="native", **kw)
            plan = ttp._PLANS[tri._triton_key]
            assert len(plan.parts("fwd", False)) > 1 and len(plan.parts("bwd", False)) > 1
            gen = torch.Generator().manual_seed(5)
            x, y, w = (
                torch.randn(3, d, dtype=torch.float64, generator=gen, requires_grad=True)
                for d in (tri.irreps_in1.dim, tri.irreps_in2.dim, tri.weight_numel)
            )
            a, b = tri(x, y, w), nat(x, y, w)
            assert rel_err(a, b) < 1e-12
            g = torch.randn(a.shape, dtype=torch.float64, generator=gen)
            for u, v in zip(torch.autograd.grad(a, (x, y, w), g), torch.autograd.grad(b, (x, y, w), g)):
                assert rel_err(u, v) < 1e-12
    finally:
        ttp.kernel.cache_clear()


class _FakeKernel:
    """Stands in for a Triton JITFunction: warmup submits a compile job to the active AsyncCompileMode
    (as Triton's does), launching records the order."""

    def __init__(self, name: str, log: list, fail: bool = False):
        self.name, self.log, self.fail = name, log, fail

    def warmup(self, *args, grid, **kw):
        import time

        from triton.runtime import _async_compile

        if self.fail:
            raise RuntimeError("no driver")

        def compile_job():
            time.sleep(0.3)
            return threading.get_ident()

        mode = _async_compile.active_mode.get()
        assert mode is not None, "warmup must run inside an AsyncCompileMode"
        mode.submit(self.name, compile_job, lambda ident: self.log.append(("compiled", self.name, ident)))

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append(("launched", self.name))


def test_cold_kernel_parts_compile_in_parallel_then_launch_in_order(monkeypatch):
    import time

    monkeypatch.setattr(ttp, "_compiles_async", lambda fn: True)
    monkeypatch.setattr(ttp, "_PARALLEL_FAILED", [])
    monkeypatch.setattr(ttp.os, "cpu_count", lambda: 4)
    log: list = []
    kernels = [_FakeKernel(f"part{i}", log) for i in range(4)]
    start = time.perf_counter()
    ttp.launch([(k, (1,), (torch.ones(1),), {"BZ": 4}) for k in kernels])
    assert time.perf_counter() - start < 4 * 0.3  # the compile jobs overlapped
    compiled = [e for e in log if e[0] == "compiled"]
    assert sorted(e[1] for e in compiled) == [k.name for k in kernels]
    assert len({e[2] for e in compiled}) > 1  # on several threads
    assert [e[1] for e in log if e[0] == "launched"] == [k.name for k in kernels]
    log.clear()  # warm now: launched without compiling again
    ttp.launch([(k, (1,), (torch.ones(1),), {"BZ": 4}) for k in kernels])
    assert log == [("launched", k.name) for k in kernels]
    broken = [_FakeKernel(f"broken{i}", log, fail=True) for i in range(2)]
    with pytest.warns(RuntimeWarning, match="compiling kernel parts in parallel failed"):
        ttp.launch([(k, (1,), (torch.ones(1),), {}) for k in broken])
    assert log[-2:] == [("launched", "broken0"), ("launched", "broken1")]


def test_interpreted_kernels_are_not_compiled_ahead():
    irreps_out, instr = channelwise_instructions("2x0e+1x1o", "0e+1o", "0e+1o")
    tp = equikern.TensorProduct("2x0e+1x1o", "0e+1o", irreps_out, instr, backend="triton")
    fn = ttp.kernel(tp._triton_key, "tp_fwd", False)
    assert ttp._compiles_async(fn) == (os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
