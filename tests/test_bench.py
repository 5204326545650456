"""The benchmark harness: a quick CPU run end to end, the check that flags wrong results, the problems."""

import json
import math

import pytest
import torch

from equikern.bench import Case, Config, Impl, Unavailable, anchors, io_floor, tensor_product
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
