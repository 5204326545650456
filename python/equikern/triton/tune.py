"""Measure the Triton kernels' launch configurations (tile size, warps) on a GPU and print the best.

``python -m equikern.triton.tune`` times the forward and the backward op of every benchmark tensor-product
problem (anchors.json) for each configuration of ``--configs`` and prints one table per problem, with the
fastest configuration per direction; ``--json`` writes the rows. Put the winner into
``equikern.triton.tensor_product.CONFIG`` (or ``EQUIKERN_TRITON_CONFIG``). On a CPU it runs the same code
under Triton's interpreter (for tests; the times mean nothing there).
"""

import argparse
import itertools
import json
import statistics
import time

import torch

from equikern.triton import tensor_product as ttp

GRIDS = {
    "full": {
        "fwd": list(itertools.product((256, 512, 1024), (4, 8))),
        "bwd": list(itertools.product((64, 128, 256), (2, 4, 8))),
    },
    "quick": {"fwd": [(512, 4)], "bwd": [(128, 4)]},
}


def _time(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over reps calls, after two warm-up calls (compilation)."""
    fn(), fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            with torch.cuda.device(device):  # the events on that GPU's current stream
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _module(problem: dict):
    import equikern

    cls = (
        equikern.ChannelwiseTensorProduct
        if problem["mode"] == "uvu"
        else equikern.FullyConnectedTensorProduct
    )
    shared = problem.get("weights", "").startswith("shared")
    return cls(
        problem["irreps_in1"],
        problem["irreps_in2"],
        problem["irreps_out_target"],
        shared_weights=shared,
        internal_weights=False,
        backend="triton",
    )


def tune_problem(problem: dict, batch: int, dtype: torch.dtype, device: torch.device, grid: dict, reps: int):
    tp = _module(problem).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    shared = tp.shared_weights
    x1, x2 = (
        torch.randn(batch, d, device=device, dtype=dtype, generator=gen)
        for d in (tp.irreps_in1.dim, tp.irreps_in2.dim)
    )
    w = torch.randn(1 if shared else batch, tp.weight_numel, device=device, dtype=dtype, generator=gen)
    g = torch.randn(batch, tp.irreps_out.dim, device=device, dtype=dtype, generator=gen)
    plan = (tp._paths, tp._cg_ijk, tp._cg_bits.view(torch.float64), tp._triton_key)
    runs = {
        "fwd": lambda: ttp.tensor_product(x1, x2, w, *plan, tp.irreps_out.dim),
        "bwd": lambda: ttp.tensor_product_backward(g, x1, x2, w, *plan),
    }
    rows = []
    saved = {k: list(v) for k, v in ttp.CONFIG.items()}
    try:
        for direction, configs in grid.items():
            for tile, warps in configs:
                ttp.CONFIG[direction] = [tile, warps]
                ms = _time(runs[direction], device, reps)
                rows.append(
                    {
                        "problem": problem["label"],
                        "direction": direction,
                        "tile": tile,
                        "warps": warps,
                        "ms": ms,
                    }
                )
    finally:
        ttp.CONFIG.update(saved)
    return rows


def main(argv=None) -> int:
    from equikern.bench import anchors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", default="all", help="comma-separated labels of anchors.json (default all)"
    )
    parser.add_argument("--irreps", help="a problem instead: 'irreps_in1;irreps_in2;irreps_out[;uvw]'")
    parser.add_argument("--batch", type=int, default=50000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", choices=sorted(GRIDS), default="full")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    problems = anchors()["tensor_product"]
    if args.irreps:
        in1, in2, out, *mode = args.irreps.split(";")
        problems = [
            {
                "label": "custom",
                "irreps_in1": in1,
                "irreps_in2": in2,
                "irreps_out_target": out,
                "mode": (mode or ["uvu"])[0],
            }
        ]
    elif args.problems != "all":
        wanted = args.problems.split(",")
        problems = [p for p in problems if p["label"] in wanted]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for problem in problems:
        found = tune_problem(problem, args.batch, dtype, device, GRIDS[args.configs], args.reps)
        rows += found
        for direction in ("fwd", "bwd"):
            mine = [r for r in found if r["direction"] == direction]
            best = min(mine, key=lambda r: r["ms"])
            cells = "  ".join(f"{r['tile']}/{r['warps']}: {r['ms']:.3f}" for r in mine)
            print(
                f"{problem['label']:24} {direction}  best {best['tile']}/{best['warps']} "
                f"{best['ms']:.3f} ms   {cells}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "batch": args.batch, "dtype": args.dtype, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
