"""Redraw the bar chart of a results.json written by ``python -m equikern.bench``.

python benchmarks/plot.py benchmarks/results/<device>-<date>/results.json [--out chart.png] [--mode fwd]
"""

import argparse
import json
from pathlib import Path

from equikern.bench.__main__ import Row, plot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results.json")
    p.add_argument("--out", type=Path, help="PNG to write (default: results.png beside the JSON)")
    p.add_argument("--mode", action="append", help="only these modes (repeatable)")
    p.add_argument("--problem", action="append", help="only these problems (repeatable)")
    args = p.parse_args()
    report = json.loads(args.results.read_text())
    rows = [
        Row(**r)
        for r in report["rows"]
        if (not args.mode or r["mode"] in args.mode) and (not args.problem or r["problem"] in args.problem)
    ]
    out = args.out or args.results.with_name("results.png")
    plot(rows, out, f"equikern bench: {report['device']}, {report['date']}")
    print(out)


if __name__ == "__main__":
    main()
