"""Markdown summary of a results.json of ``python -m equikern.bench``: one table per family.

Per (problem, dtype, mode): equikern's median, the fastest other implementation measured in the same
run, the speedup over it, the memory floor, and (tensor products) e3nn's published figure for the
device with the speedup over that.

    python benchmarks/summary.py benchmarks/results/<run>/results.json [--dtype float32]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def summary(results: dict, dtypes: set[str] | None = None) -> str:
    groups: dict[str, dict[tuple, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in results["rows"]:
        if row["status"] not in ("ok", "ref", "unchecked") or row["median_ms"] is None:
            continue
        if dtypes and row["dtype"] not in dtypes:
            continue
        groups[row["family"]][(row["problem"], row["batch"], row["dtype"], row["mode"])][row["impl"]] = row
    lines = [
        f"{results['device']}, {results['date']}; floor at {results['bandwidth_GBps']:.0f} GB/s "
        f"({results['bandwidth_source']}); median ms."
    ]
    for family, cases in groups.items():
        lines += [
            "",
            f"**{family}**",
            "",
            "| problem | batch | dtype | mode | equikern | best other (same run) | speedup | published "
            "| floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (problem, batch, dtype, mode), impls in cases.items():
            ours = impls.get("equikern")
            if ours is None:
                continue
            others = [r for name, r in impls.items() if not name.startswith("equikern")]
            best = min(others, key=lambda r: r["median_ms"], default=None)
            best_text = f"{_ms(best['median_ms'])} ({best['impl']})" if best else "-"
            speedup = f"{best['median_ms'] / ours['median_ms']:.1f}x" if best else "-"
            published = [(name, r["published_ms"]) for name, r in impls.items() if r.get("published_ms")]
            pub_text = "; ".join(
                f"{name} {_ms(ms)} ({ms / ours['median_ms']:.1f}x)" for name, ms in published
            )
            lines.append(
                f"| {problem} | {batch} | {dtype} | {mode} | {_ms(ours['median_ms'])} | {best_text} | "
                f"{speedup} | {pub_text or '-'} | {_ms(ours['floor_ms'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dtype", help="comma-separated dtypes to keep (default: all)")
    args = parser.parse_args()
    dtypes = set(args.dtype.split(",")) if args.dtype else None
    print(summary(json.loads(args.results.read_text()), dtypes))


if __name__ == "__main__":
    main()
