"""The benchmark harness: a quick CPU run end to end, the check that flags wrong results, the problems."""

import json
import math

import pytest
import torch
from e3nn import o3

from equikern.bench import Case, Config, Impl, Unavailable, anchors, conv, io_floor, tensor_product
from equikern.bench import __main__ as bench

CPU = torch.device("cpu")


def test_quick_run_end_to_end(tmp_path):
    # one problem per construction type (channelwise uvu, fully connected uvw with shared weights)
    argv = ["--quick", "--device", "cpu", "--problems", "mace-medium,tetris-poly-1", "--out", str(tmp_path)]
    assert bench.main(argv + ["--modes", "fwd,fwdbwd", "--dtype", "float32,float64"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["torch"] == torch.__version__ and report["bandwidth_GBps"] > 0
    rows = {(r["problem"], r["dtype"], r["mode"], r["impl"]): r for r in report["rows"]}
    for problem in ("mace-medium", "tetris-poly-1"):
        for dtype in ("float32", "float64"):
            for mode in ("fwd", "fwdbwd"):
                ours, ref = rows[problem, dtype, mode, "equikern"], rows[problem, dtype, mode, "e3nn"]
                assert ours["status"] == "ok", ours
                assert ours["max_rel_err"] <= bench.TOLERANCE[getattr(torch, dtype)]
                assert ref["status"] == "ref"
                for row in (ours, ref):
                    assert row["median_ms"] > 0 and row["GBps"] > 0 and row["floor_ms"] > 0
                assert ours["speedup"]["e3nn"] == pytest.approx(ref["median_ms"] / ours["median_ms"])
    md = (tmp_path / "results.md").read_text()
    assert "mace-medium" in md and "tetris-poly-1" in md and "| equikern |" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_wrong_results():
    want = [torch.randn(50, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    assert bench.compare([w.clone() for w in want], want, torch.float64)[0]
    close = [want[0] * (1 + 1e-12), want[1]]
    assert bench.compare(close, want, torch.float64)[0]
    off = [want[0], want[1] * (1 + 1e-8)]
    ok, err = bench.compare(off, want, torch.float64)
    assert not ok and err == pytest.approx(1e-8, rel=1e-3)
    want32 = [w.float() for w in want]
    assert bench.compare([want32[0] * (1 + 1e-6), want32[1]], want32, torch.float32)[0]
    assert not bench.compare([want32[0] * (1 + 1e-3), want32[1]], want32, torch.float32)[0]
    nan = want[0].clone()
    nan[3, 4] = math.nan
    assert not bench.compare([nan, want[1]], want, torch.float64)[0]
    assert not bench.compare([want[0][:, :6], want[1]], want, torch.float64)[0]
    assert not bench.compare(want[:1], want, torch.float64)[0]


def _toy_case(impls) -> Case:
    def inputs():
        return torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 5, dtype=torch.float64)

    return Case("toy", "toy", {}, inputs, impls, io_floor(2 * 64 * 5 * 8, 64 * 5 * 8))


def test_wrong_implementation_is_flagged_and_not_timed():
    def missing():
        raise Unavailable("not installed")

    def broken():
        raise RuntimeError("cannot build")

    case = _toy_case(
        {
            "e3nn": lambda: Impl(torch.mul),
            "equikern": lambda: Impl(lambda x, y: x * y * (1 + 1e-7)),
            "cue": lambda: Impl(lambda x, y: (y * x).T.contiguous(), lambda xs: xs, lambda out: out.T),
            "oeq": missing,
            "other": broken,
        }
    )
    args = bench.parse_args(["--quick", "--device", "cpu", "--modes", "fwd,fwdbwd,dblbwd"])
    notes = {}
    with bench.tqdm(disable=True) as bar:
        rows = bench.run_case(case, Config(CPU, torch.float64, 64, "cpu"), args, 1e9, notes, bar)
    status = {(r.mode, r.impl): r for r in rows}
    assert notes == {"oeq": "not installed"}
    for mode in ("fwd", "fwdbwd", "dblbwd"):
        assert status[mode, "equikern"].status == "FAILED" and status[mode, "equikern"].median_ms is None
        assert status[mode, "e3nn"].status == "ref" and status[mode, "e3nn"].median_ms > 0
        # a peer in another layout is compared after mapping its output back
        assert status[mode, "cue"].status == "ok" and status[mode, "cue"].median_ms > 0
        assert status[mode, "other"].status == "error" and "cannot build" in status[mode, "other"].error


def test_missing_equikern_module_is_an_error_row(tmp_path, monkeypatch):
    import equikern

    monkeypatch.delattr(equikern, "TensorProduct")
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--problems",
        "tetris-poly-1",
        "--modes",
        "fwd",
        "--dtype",
        "float32",
    ]
    argv += ["--impls", "equikern,e3nn", "--out", str(tmp_path)]
    assert bench.main(argv) == 1  # the run goes on, but says it failed
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["impl"], r["status"]) for r in rows] == [("equikern", "error"), ("e3nn", "ref")]
    assert "AttributeError" in rows[0]["error"] and rows[1]["median_ms"] > 0


@pytest.mark.parametrize("problem", anchors()["tensor_product"], ids=lambda p: p["label"])
def test_problem_construction(problem):
    """The construction gives the dims of anchors.json, and the floors its H100 figures."""
    case = tensor_product._case(problem, Config(CPU, torch.float32, 1, "cpu"))
    case.impls["e3nn"]()  # raises if the e3nn module's dims differ from anchors.json
    bandwidth = anchors()["h100_copy_bandwidth_TBps"] * 1e12
    # h100_copy_bandwidth_TBps is the float32 batch-50000 run's; the other runs measured within 3% of it
    for dtype, batch, key, rel in [
        (torch.float32, 50000, "h100_memory_floor_fwd_ms", 1e-4),
        (torch.float64, 50000, "h100_fp64_memory_floor_fwd_ms", 0.03),
        (torch.float32, 20000, "h100_fp32_batch20000_memory_floor_fwd_ms", 0.03),
    ]:
        case = tensor_product._case(problem, Config(CPU, dtype, batch, "h100"))
        assert case.floor_bytes["fwd"] / bandwidth * 1e3 == pytest.approx(problem[key], rel=rel, abs=6e-5)


def test_published_figures_follow_device_dtype_and_batch():
    problem = anchors()["tensor_product"][0]
    h100 = tensor_product._case(problem, Config(CPU, torch.float32, 50000, "h100")).published
    assert h100["cue"]["fwdbwd"] == problem["h100_fp32_batch50000_ms"]["cue"]["fwdbwd_ms"]
    dbl = tensor_product._case(problem, Config(CPU, torch.float32, 20000, "h100")).published
    assert dbl["oeq"]["dblbwd"] == problem["h100_fp32_batch20000_with_double_backward_ms"]["oeq"]["dblbwd_ms"]
    cpu = tensor_product._case(problem, Config(CPU, torch.float32, 2000, "cpu")).published
    assert cpu == {"e3nn": anchors()["cpu_e3nn_2cores_batch2000_ms"][problem["label"]]}
    assert tensor_product._case(problem, Config(CPU, torch.float64, 2000, "cpu")).published == {}
    assert tensor_product._case(problem, Config(CPU, torch.float32, 50000, "cuda")).published == {}


def test_cue_adapter_matches_e3nn():
    """cuEquivariance's layout and weight order, checked on the CPU with its torch fallback when installed."""
    pytest.importorskip("cuequivariance_torch")
    args = bench.parse_args(["--quick", "--device", "cpu", "--impls", "cue", "--modes", "fwd,fwdbwd"])
    cfg = Config(CPU, torch.float64, 4, "cpu")
    for problem in anchors()["tensor_product"]:
        if problem["label"] not in ("nequip-lips", "DiffDock-L=2", "tetris-poly-1"):
            continue  # one of each kind: channelwise with many parities, fully connected, shared weights
        with bench.tqdm(disable=True) as bar:
            rows = bench.run_case(tensor_product._case(problem, cfg), cfg, args, 1e9, {}, bar)
        assert [r.status for r in rows] == ["ok", "ok"], rows


# ---------------------------------------------------------------- CUDA variants, peers' convolutions, memory

CUDA = torch.device("cuda")  # cases are cheap to build: nothing touches the device until inputs are made
_PROBLEMS = {p["label"]: p for p in anchors()["tensor_product"]}
_CONV_ROWS = {r["label"]: r for r in anchors()["conv"]["rows"]}


def test_tensor_product_impls_per_device():
    """On CUDA every problem is timed on both equikern routes (Triton, native); on a CPU only one."""
    for problem in anchors()["tensor_product"]:
        cpu = tensor_product._case(problem, Config(CPU, torch.float32, 8, "cpu"))
        gpu = tensor_product._case(problem, Config(CUDA, torch.float64, 8, "h100"))
        assert set(cpu.impls) == {"equikern", "e3nn", "cue", "oeq"}
        assert set(gpu.impls) == {"equikern", "e3nn", "cue", "oeq", "equikern_native"}
        assert cpu.fallback_reference == gpu.fallback_reference == "equikern"


def test_conv_impls_per_device_and_size():
    peers = {"cue_fused_indices", "oeq_atomic", "oeq_deterministic"}
    for row in anchors()["conv"]["rows"]:
        problem = _PROBLEMS[row["label"]]
        cpu = conv._case(row, problem, Config(CPU, torch.float32, 50000, "cpu", batch_given=False))
        assert set(cpu.impls) == {"equikern", "e3nn_unfused"} | peers
        assert cpu.params["cells"] == 3 and cpu.reference == "e3nn_unfused"
        gpu = conv._case(row, problem, Config(CUDA, torch.float32, 50000, "h100", batch_given=False))
        assert set(gpu.impls) == {"equikern", "equikern_deterministic", "e3nn_unfused"} | peers
        # the anchors' lattice whatever the batch; --cells and --quick choose another
        assert gpu.params["cells"] == 9 and gpu.batch == row["atoms"] == 5832
        assert gpu.published["oeq_deterministic"]["fwdbwd"] == row["oeq_deterministic"]["fwdbwd_ms"]
        assert gpu.published["cue_fused_indices"]["fwdbwd_peak_GB"] == row["cue_fused_indices"]["peak_GB"]
        for cfg, cells, published in [
            (Config(CUDA, torch.float32, 20000, "h100"), 9, True),
            (Config(CUDA, torch.float64, 20000, "h100"), 9, False),  # the anchors are float32
            (Config(CUDA, torch.float32, 20000, "h100", cells=4), 4, False),
            (Config(CPU, torch.float32, 16, "cpu", quick=True), 2, False),
        ]:
            case = conv._case(row, problem, cfg)
            assert case.params["cells"] == cells and case.batch == 8 * cells**3
            assert bool(case.published) == published
    with pytest.raises(SystemExit):
        bench.parse_args(["--cells", "1"])


def test_conv_has_diffdock_uvw_messages_without_peers():
    """DiffDock's fully connected product as a convolution: equikern (both modes on CUDA) against e3nn
    unfused, no published figures."""
    (cpu,) = [c for c in conv.cases(Config(CPU, torch.float32, 8, "cpu", cells=2)) if "DiffDock" in c.label]
    (gpu,) = [c for c in conv.cases(Config(CUDA, torch.float32, 8, "h100")) if "DiffDock" in c.label]
    assert cpu.label == "conv-DiffDock-L=2" and set(cpu.impls) == {"equikern", "e3nn_unfused"}
    assert set(gpu.impls) == {"equikern", "equikern_deterministic", "e3nn_unfused"}
    assert gpu.params["cells"] == 9 and not gpu.published


@pytest.mark.parametrize(
    "family, case",
    [(tensor_product, lambda cfg: tensor_product._case(_PROBLEMS["nequip-lips"], cfg))]
    + [(conv, lambda cfg, r=r: conv._case(_CONV_ROWS[r], _PROBLEMS[r], cfg)) for r in _CONV_ROWS],
    ids=["tensor_product", *(f"conv-{r}" for r in _CONV_ROWS)],
)
def test_gpu_only_peers_say_so_on_cpu(family, case):
    case = case(Config(CPU, torch.float32, 8, "cpu", cells=2))
    gpu_only = (
        ["oeq"] if family is tensor_product else ["cue_fused_indices", "oeq_atomic", "oeq_deterministic"]
    )
    for name in gpu_only:
        with pytest.raises(Unavailable, match="needs CUDA"):
            case.impls[name]()


def test_conv_quick_run_all_modes(tmp_path):
    """The conv family on the CPU: equikern checked in every mode; the peers skipped, saying why; --batch
    does not multiply the (batch-independent) lattice cases."""
    argv = ["--quick", "--device", "cpu", "--problems", "conv-nequip-lips", "--dtype", "float64"]
    argv += ["--batch", "16,32", "--modes", "fwd,fwdbwd,dblbwd", "--out", str(tmp_path)]
    argv += ["--impls", "equikern,cue_fused_indices,oeq_atomic,oeq_deterministic"]  # e3nn_unfused: untimed
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert [r["impl"] for r in report["rows"]] == ["equikern"] * 3  # one lattice, though two batches
    for mode in bench.MODES:
        ours = rows[mode]
        assert ours["status"] == "ok" and ours["max_rel_err"] <= 1e-10 and ours["median_ms"] > 0
        assert (
            ours["checked_against"] == "e3nn_unfused" and ours["note"] == "route=native, deterministic=False"
        )
        assert ours["peak_GB"] is None  # measured on CUDA only
    for peer in ("cue_fused_indices", "oeq_atomic", "oeq_deterministic"):
        assert report["not_run"][peer].startswith("needs CUDA")
    assert "oeq_atomic skipped: needs CUDA" in (tmp_path / "results.md").read_text()


class _FakeOeqConv:
    """OpenEquivariance's TensorProductConv contract, computed with e3nn on the CPU.

    forward(X, Y, W, rows, cols[, transpose_perm]) = sum over edges i of TP(X[cols[i]], Y[i], W[i]) into
    row rows[i], W in this module's own weight order (w_own[:, k] = w_e3nn[:, perm[k]]); the deterministic
    one insists on edges sorted by (row, col) and on the transpose permutation.
    """

    def __init__(self, tp, perm, deterministic, num_nodes):
        self.tp = tp  # an e3nn.o3.TensorProduct
        self.inverse = torch.argsort(perm)
        self.deterministic, self.num_nodes = deterministic, num_nodes

    def __call__(self, x, y, w, rows, cols, transpose_perm=None):
        assert rows.dtype == cols.dtype == torch.int64
        if self.deterministic:
            key = rows * self.num_nodes + cols
            assert bool((key[1:] >= key[:-1]).all()), "edges not sorted by (row, col)"
            assert sorted(transpose_perm.tolist()) == list(range(len(rows)))
            key = cols[transpose_perm] * self.num_nodes + rows[transpose_perm]
            assert bool((key[1:] >= key[:-1]).all()), "transpose_perm does not sort by (col, row)"
        else:
            assert transpose_perm is None
        messages = self.tp(x[cols], y, w[:, self.inverse])
        return torch.zeros(x.shape[0], messages.shape[1], dtype=x.dtype).index_add_(0, rows, messages)


@pytest.mark.parametrize("deterministic", [False, True])
def test_oeq_conv_adapter_with_the_peers_contract(deterministic):
    """The edge order, transpose permutation and weight order given to OpenEquivariance's convolution,
    checked against e3nn unfused in every mode with a stand-in that follows its documented contract (a small
    channelwise product on a random multigraph, edges in random order); with the weights in the wrong
    order the check fails."""
    problem = {
        "label": "small",
        "mode": "uvu",
        "irreps_in1": "3x0e+2x1o+2x2e",
        "irreps_in2": "0e+1o+2e",
        "irreps_out_target": "3x0e+2x1o+2x1e+2x2e",
        "weights": "per-sample",
    }
    args, dtype, nodes, edges = tensor_product.tensor_product_arguments(problem), torch.float64, 7, 60
    with bench.default_dtype(dtype):
        tp = o3.TensorProduct(**args)
    gen = torch.Generator().manual_seed(3)
    n_w = tp.weight_numel
    perm = torch.randperm(n_w, generator=gen)
    fake = _FakeOeqConv(tp, perm, deterministic, nodes)
    src, dst = torch.randint(nodes, (2, edges), generator=gen)
    inputs = (
        torch.randn(nodes, tp.irreps_in1.dim, generator=gen, dtype=dtype),
        torch.randn(edges, tp.irreps_in2.dim, generator=gen, dtype=dtype),
        torch.randn(edges, n_w, generator=gen, dtype=dtype),
        src,
        dst,
    )

    def unfused(x, attr, w, src, dst):
        return torch.zeros(nodes, tp.irreps_out.dim, dtype=dtype).index_add_(0, dst, tp(x[src], attr, w))

    ref, ours = Impl(unfused), conv.oeq_conv_adapter(fake, perm, deterministic, nodes)
    for mode in bench.MODES:
        ok, err = bench.compare(bench.evaluate(ours, inputs, mode), bench.evaluate(ref, inputs, mode), dtype)
        assert ok and err < 1e-12, (mode, err)
    wrong = conv.oeq_conv_adapter(fake, torch.arange(n_w), deterministic, nodes)
    assert not bench.compare(bench.evaluate(wrong, inputs, "fwd"), bench.evaluate(ref, inputs, "fwd"), dtype)[
        0
    ]


def test_oeq_edges_sorting():
    src, dst, _ = conv.diamond_lattice(2)
    gen = torch.Generator().manual_seed(5)
    shuffle = torch.randperm(len(src), generator=gen)
    src, dst = src[shuffle], dst[shuffle]
    order, rows, cols, transpose = conv.oeq_edges(src, dst, 64, deterministic=False)
    assert order is None and transpose is None and rows is dst and cols is src
    order, rows, cols, transpose = conv.oeq_edges(src, dst, 64, deterministic=True)
    assert torch.equal(rows, dst[order]) and torch.equal(cols, src[order])
    assert sorted(order.tolist()) == list(range(len(src)))
    pairs = list(zip(rows.tolist(), cols.tolist()))
    assert pairs == sorted(pairs)
    assert list(zip(cols[transpose].tolist(), rows[transpose].tolist())) == sorted((c, r) for r, c in pairs)


def test_cue_conv_adapter_matches_e3nn():
    """cuEquivariance's convolution (indices_1 / indices_out), checked on the CPU with its torch fallback
    (checked only: cue's naive method is too slow on a CPU to time here)."""
    pytest.importorskip("cuequivariance_torch")
    label = "nequip-lips"
    for dtype in (torch.float64, torch.float32):
        cfg = Config(CPU, dtype, 1, "cpu", cells=2)
        case = conv._case(_CONV_ROWS[label], _PROBLEMS[label], cfg, cue_method="naive")
        torch.manual_seed(0)
        inputs = case.inputs()
        with bench.default_dtype(dtype):
            cue, ref = case.impls["cue_fused_indices"](), case.impls[case.reference]()
        for mode in bench.MODES:
            want = bench.evaluate(ref, inputs, mode)
            ok, err = bench.compare(bench.evaluate(cue, inputs, mode), want, dtype)
            assert ok, (dtype, mode, err)


def test_failed_reference_falls_back_to_equikern():
    """A reference that cannot run (e.g. out of memory) leaves the peers checked against equikern."""

    def out_of_memory(x, y):
        raise RuntimeError("CUDA out of memory")

    case = _toy_case(
        {
            "e3nn": lambda: Impl(out_of_memory),
            "equikern": lambda: Impl(torch.mul),
            "cue": lambda: Impl(lambda x, y: y * x),
            "oeq": lambda: Impl(lambda x, y: x * y * (1 + 1e-7)),
        }
    )
    case.fallback_reference = "equikern"
    args = bench.parse_args(
        ["--quick", "--device", "cpu", "--modes", "fwd,dblbwd", "--impls", "cue,oeq,e3nn"]
    )
    with bench.tqdm(disable=True) as bar:
        rows = bench.run_case(case, Config(CPU, torch.float64, 64, "cpu"), args, 1e9, {}, bar)
    status = {(r.mode, r.impl): r for r in rows}
    for mode in ("fwd", "dblbwd"):
        assert status[mode, "e3nn"].status == "error" and "out of memory" in status[mode, "e3nn"].error
        assert status[mode, "cue"].status == "ok" and status[mode, "cue"].checked_against == "equikern"
        assert status[mode, "oeq"].status == "FAILED"
        assert (mode, "equikern") not in status  # built to check the others, not asked for
    args = bench.parse_args(["--quick", "--device", "cpu", "--modes", "fwd"])
    with bench.tqdm(disable=True) as bar:
        rows = bench.run_case(case, Config(CPU, torch.float64, 64, "cpu"), args, 1e9, {}, bar)
    ours = next(r for r in rows if r.impl == "equikern")
    assert ours.status == "unchecked" and "checked the others" in ours.error and ours.median_ms > 0
    header, cells = bench.table(rows)
    assert "ok (" in cells[[r.impl for r in rows].index("cue")][-1]
    assert " vs equikern" in cells[[r.impl for r in rows].index("cue")][-1]


def _row(impl, mode, ms, peak):
    return bench.Row("f", "p", 8, "float32", mode, impl, "ok", median_ms=ms, peak_GB=peak)


def test_peak_memory_compared_with_best_peer():
    rows = [
        _row("equikern", "fwdbwd", 1.0, 2.0),
        _row("equikern_native", "fwdbwd", 2.0, 1.0),
        _row("e3nn", "fwdbwd", 10.0, 10.0),
        _row("oeq", "fwdbwd", 4.0, 4.0),
        _row("cue", "fwdbwd", 3.0, 5.0),
        _row("oeq", "fwd", 1.0, 0.5),  # another mode: not compared
    ]
    bench._add_speedups(rows)
    ours, native, e3nn, oeq = rows[:4]
    assert ours.best_peer == native.best_peer == "oeq"
    assert ours.peak_vs_best_peer == pytest.approx(0.5) and native.peak_vs_best_peer == pytest.approx(0.25)
    assert e3nn.best_peer is None and e3nn.peak_vs_best_peer is None  # peers are not compared
    # speedups over the peers only, never over an equikern variant
    assert ours.speedup == {"e3nn": 10.0, "oeq": 4.0, "cue": 3.0}
    assert set(e3nn.speedup) == {"oeq", "cue"} and set(native.speedup) == {"e3nn", "oeq", "cue"}
    header, cells = bench.table(rows)
    assert "peak GB" in header and cells[0][header.index("peak / best peer's")] == "0.50 (oeq)"
    header, _ = bench.table([_row("equikern", "fwd", 1.0, None)])
    assert "peak GB" not in header  # a CPU run's table is unchanged


def test_storage_bytes_counts_views_once():
    a = torch.randn(10, 4, dtype=torch.float64)
    b = torch.arange(7)
    assert bench.storage_bytes([a, a[:, 1], a.T, b, b[2:]]) == 10 * 4 * 8 + 7 * 8
    assert bench.storage_bytes([]) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_quick_cuda_run(tmp_path):
    """On a GPU: both equikern routes and the deterministic convolution are checked, with peak memory."""
    argv = [
        "--quick",
        "--device",
        "cuda",
        "--problems",
        "nequip-lips,conv-nequip-lips",
        "--out",
        str(tmp_path),
    ]
    bench.main(argv + ["--dtype", "float64", "--modes", "fwd,fwdbwd,dblbwd"])
    rows = {
        (r["problem"], r["mode"], r["impl"]): r
        for r in json.loads((tmp_path / "results.json").read_text())["rows"]
    }
    for mode in bench.MODES:
        for problem, impl in [
            ("nequip-lips", "equikern"),
            ("nequip-lips", "equikern_native"),
            ("conv-nequip-lips", "equikern"),
            ("conv-nequip-lips", "equikern_deterministic"),
        ]:
            row = rows[problem, mode, impl]
            assert row["status"] == "ok" and row["peak_GB"] > 0, row
        assert "route=triton" in rows["nequip-lips", mode, "equikern"]["note"]
        assert "route=native" in rows["nequip-lips", mode, "equikern_native"]["note"]
