"""``python -m equikern.bench``: check every implementation against the reference, then time it.

Writes ``results.json``, ``results.md`` and ``results.png`` to the output folder and prints the table.
Run with ``--help`` for the options and ``--list`` for the problems. Every row is one problem, dtype, mode
(fwd; fwdbwd: forward + gradients of every floating input; dblbwd: forward, first gradients with
create_graph, then the gradients of the sum of their squares, as when training on forces) and
implementation. On CUDA each timed row also gets the peak memory of one such call, compared for equikern's
rows with the least peak among the other implementations.
"""

import argparse
import ctypes
import datetime
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from equikern.bench import MODES, Case, Config, Impl, Unavailable, anchors, families

SUBJECT = "equikern"  # the implementation under test, and its variants "equikern_*"; the others are peers
IMPL_ORDER = (
    SUBJECT,
    "equikern_native",
    "equikern_deterministic",
    "e3nn",
    "e3nn_unfused",
    "cue",
    "cue_fused_indices",
    "oeq",
    "oeq_atomic",
    "oeq_deterministic",
)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}  # max |got - want| / max |want|
FLUSH_BYTES = 256 << 20  # larger than any GPU's L2: each timed call starts cold


def is_subject(impl: str) -> bool:
    """Whether ``impl`` is equikern or one of its variants (not a peer to compare against)."""
    return impl == SUBJECT or impl.startswith(SUBJECT + "_")


@dataclass
class Row:
    """One measurement: a problem, mode, dtype and implementation."""

    family: str
    problem: str
    batch: int
    dtype: str
    mode: str
    impl: str
    status: str  # "ref", "ok", "FAILED", "unchecked" or "error"
    max_rel_err: float | None = None
    median_ms: float | None = None
    iqr_ms: float | None = None
    runs: int = 0
    floor_ms: float | None = None
    GBps: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # reference impl -> its time / this time
    published_ms: float | None = None
    error: str | None = None
    params: dict = field(default_factory=dict)
    checked_against: str | None = None  # the implementation whose results this row matched (or not)
    note: str | None = None  # the implementation's own (e.g. which kernels it took)
    # CUDA only: GB allocated at the peak of one call of the mode, its inputs and output gradient included
    peak_GB: float | None = None
    best_peer: str | None = None  # equikern rows: the other implementation with the least peak_GB
    peak_vs_best_peer: float | None = None  # this peak_GB / best_peer's
    published_peak_GB: float | None = None


# ---------------------------------------------------------------- running an implementation


def output_gradient(out: Tensor) -> Tensor:
    """The same random output gradient for every implementation of a case."""
    gen = torch.Generator(out.device).manual_seed(1)
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)


def _differentiate(out: Tensor, diff: list[Tensor], grad: Tensor, mode: str) -> list[Tensor]:
    """Gradients that ``mode`` computes after the forward: first ones, and for dblbwd the second ones."""
    first = torch.autograd.grad(out, diff, grad, create_graph=mode == "dblbwd")
    if mode == "fwdbwd":
        return list(first)
    square = sum((g * g).sum() for g in first)
    return [*first, *torch.autograd.grad(square, diff, materialize_grads=True)]


def evaluate(impl: Impl, inputs: Sequence[Tensor], mode: str) -> list[Tensor]:
    """Output (and the mode's gradients) of ``impl`` in the reference layout, for checking."""
    xs = [x.detach().requires_grad_(mode != "fwd" and x.is_floating_point()) for x in inputs]
    out = impl.from_native(impl.fn(*impl.to_native(xs)))
    if mode == "fwd":
        return [out]
    diff = [x for x in xs if x.requires_grad]
    return [out.detach(), *(g.detach() for g in _differentiate(out, diff, output_gradient(out), mode))]


def timed_call(
    impl: Impl, inputs: Sequence[Tensor], mode: str, held: list[Tensor] | None = None
) -> Callable[[], object]:
    """A call of ``impl`` in its native layout doing what ``mode`` times (inputs converted once, here).

    ``held``, when given, receives the tensors that the call keeps between calls (native inputs, output
    gradient).
    """
    with torch.no_grad():
        native = [x.detach() for x in impl.to_native(inputs)]
    if held is not None:
        held += native
    if mode == "fwd":
        return lambda: impl.fn(*native)
    diff = [x.requires_grad_() for x in native if x.is_floating_point()]
    grad = output_gradient(impl.fn(*native))
    if held is not None:
        held.append(grad)
    return lambda: _differentiate(impl.fn(*native), diff, grad, mode)


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def peak_memory(impl: Impl, inputs: Sequence[Tensor], mode: str, device: torch.device) -> float:
    """GB allocated at the peak of one CUDA call doing what ``mode`` times, inputs included.

    The peak over what was allocated before the call, plus the storages of its native inputs and output
    gradient; memory that the implementation's module holds between calls (weights, workspaces) and tensors
    of the other implementations are not counted.
    """
    held: list[Tensor] = []
    fn = timed_call(impl, inputs, mode, held)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before + storage_bytes(held)) / 1e9


def compare(got: Sequence[Tensor], want: Sequence[Tensor], dtype: torch.dtype) -> tuple[bool, float]:
    """Whether every tensor matches within the dtype's tolerance, and the largest relative error."""
    if len(got) != len(want):
        return False, math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return False, math.inf
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (g - w).abs().max().item() / (scale or 1.0) if w.numel() else 0.0
        if not math.isfinite(err):
            return False, math.inf
        worst = max(worst, err)
    return worst <= TOLERANCE[dtype], worst


# ---------------------------------------------------------------- timing


def time_call(
    fn: Callable[[], object], device: torch.device, min_time: float, reps: int
) -> tuple[float, float, int]:
    """Median and interquartile range (seconds) and number of timed calls, after warm-up."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # flush buffer, events and synchronisation on that GPU
            return _time_cuda(fn, min_time, reps)
    from torch.utils.benchmark import Timer

    start = time.perf_counter()
    fn()  # warm-up, and an estimate to give blocked_autorange enough time for `reps` calls
    estimate = time.perf_counter() - start
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=max(min_time, reps * estimate))
    return m.median, m.iqr, len(m.times) * m.number_per_run


def _time_cuda(fn: Callable[[], object], min_time: float, reps: int) -> tuple[float, float, int]:
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = time.perf_counter() - start
    for _ in range(min(25, int(0.1 / estimate))):
        fn()
    n = max(2, reps, min(1000, int(min_time / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for begin, end in events:
        flush.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    q1, median, q3 = statistics.quantiles(times, n=4)
    return median, q3 - q1, n


def copy_bandwidth(device: torch.device, hardware: str, quick: bool) -> tuple[float, str]:
    """Bytes per second of a large device copy (read + write), and where the figure comes from."""
    if hardware == "h100":
        return anchors()["h100_copy_bandwidth_TBps"] * 1e12, "anchors.json h100_copy_bandwidth_TBps"
    n = (16 << 20) if quick else (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _, _ = time_call(lambda: dst.copy_(src), device, min_time=0.05 if quick else 0.3, reps=5)
    return 2 * n / seconds, f"measured: copy of {n >> 20} MiB"


# ---------------------------------------------------------------- the run


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build under ``dtype`` as torch's default dtype, as a user of that dtype would.

    e3nn (and cuEquivariance's e3nn irreps) compute constants in the default dtype: a module built in float32
    and moved to float64 keeps float32-rounded coefficients (relative error ~1e-8).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER), n))


def run_case(
    case: Case, cfg: Config, args: argparse.Namespace, bandwidth: float, notes: dict, bar: tqdm
) -> list[Row]:
    """Build, check and time every selected implementation of one case in every selected mode."""
    torch.manual_seed(0)
    inputs = case.inputs()
    impls: dict[str, Impl | Exception] = {}
    for name in _ordered(case.impls):
        if args.impls and name not in args.impls and name not in (case.reference, case.fallback_reference):
            continue
        try:
            with default_dtype(cfg.dtype):
                impls[name] = case.impls[name]()
        except Unavailable as err:
            notes.setdefault(name, str(err))
        except Exception as err:
            impls[name] = err
    rows = []
    for mode in args.modes:
        reference, want, truth = _reference_results(case, impls, inputs, mode)
        for name, impl in impls.items():
            if args.impls and name not in args.impls:
                continue  # built only to check the others
            bar.set_postfix_str(f"{case.label} {_dtype_name(cfg.dtype)} {mode} {name}", refresh=True)
            rows.append(
                _measure(case, cfg, mode, name, impl, inputs, (want, truth), reference, args, bandwidth)
            )
        del want
        bar.update()
    _add_speedups(rows)
    del impls, inputs
    _free_memory()
    return rows


def _light(err: Exception) -> Exception:
    """``err`` without its traceback and context, which hold the failed call's tensors (out of memory)."""
    err.__context__ = err.__cause__ = None
    return err.with_traceback(None)


def _reference_results(
    case: Case, impls: dict, inputs: Sequence[Tensor], mode: str
) -> tuple[Impl | Exception | None, list[Tensor] | None, str | None]:
    """(the reference's impl or its failure, the results that check the others, whose results they are).

    Where the reference fails in this mode (e.g. out of memory) the case's fallback reference checks the
    others, when it runs; where neither gives results, the others' rows are "unchecked".
    """
    reference = impls.get(case.reference)
    try:
        if isinstance(reference, Impl):
            return reference, evaluate(reference, inputs, mode), case.reference
    except Exception as err:
        reference = _light(err)
    _free_memory()  # outside the handler: the failed call's tensors are unreachable now
    fallback = impls.get(case.fallback_reference)
    if isinstance(fallback, Impl):
        try:
            return reference, evaluate(fallback, inputs, mode), case.fallback_reference
        except Exception as err:
            _light(err)
        _free_memory()
    return reference, None, None


def _measure(case, cfg, mode, name, impl, inputs, expected, reference, args, bandwidth) -> Row:
    want, truth = expected
    row = Row(
        case.family,
        case.label,
        case.batch or cfg.batch,
        _dtype_name(cfg.dtype),
        mode,
        name,
        "error",
        params=case.params,
    )
    row.published_ms = case.published.get(name, {}).get(mode)
    row.published_peak_GB = case.published.get(name, {}).get(f"{mode}_peak_GB")
    row.floor_ms = case.floor_bytes[mode] / bandwidth * 1e3
    if isinstance(impl, Exception):
        row.error = f"build: {_error_text(impl)}"
        return row
    row.note = impl.note
    try:
        if name == case.reference:
            if isinstance(reference, Exception):
                raise reference
            row.status = "ref"
        elif want is None or impl.from_native is None or name == truth:
            row.status = "unchecked"
            if isinstance(reference, Exception):
                row.error = f"reference {case.reference}: {_error_text(reference)}"
                if name == truth:
                    row.error += "; this implementation checked the others"
        else:
            ok, row.max_rel_err = compare(evaluate(impl, inputs, mode), want, cfg.dtype)
            row.status, row.checked_against = ("ok" if ok else "FAILED"), truth
            if not ok:
                tqdm.write(
                    f"!!! FAILED: {name} {case.label} {row.dtype} {mode}: max relative error "
                    f"{row.max_rel_err:.3g} > {TOLERANCE[cfg.dtype]:g} against {truth}; not timed",
                    file=sys.stderr,
                )
                return row
        seconds, iqr, row.runs = time_call(
            timed_call(impl, inputs, mode), cfg.device, args.min_time, args.reps
        )
    except Exception as err:  # an implementation that breaks (or runs out of memory) must not stop the run
        row.status, row.error = "error", _error_text(err)
        del err  # its traceback holds the failed call's tensors
        _free_memory()
        tqdm.write(f"error: {name} {case.label} {row.dtype} {mode}: {row.error}", file=sys.stderr)
        return row
    row.median_ms, row.iqr_ms = seconds * 1e3, iqr * 1e3
    row.GBps = case.floor_bytes[mode] / seconds / 1e9
    if cfg.device.type == "cuda":
        try:
            row.peak_GB = peak_memory(impl, inputs, mode, cfg.device)
        except Exception as err:  # the time stands; say why the memory is missing
            row.error = f"peak memory: {_error_text(err)}"
            del err
            _free_memory()
    return row


def _add_speedups(rows: list[Row]) -> None:
    """Each row's speedup over every peer timed in the same mode, and for equikern's rows the peak memory
    over the least peer's (``rows`` are of one case)."""
    for r in rows:
        for other in rows:
            if (
                r.median_ms
                and other.median_ms
                and other.mode == r.mode
                and other.impl != r.impl
                and not is_subject(other.impl)
            ):
                r.speedup[other.impl] = other.median_ms / r.median_ms
        peers = [o for o in rows if o.mode == r.mode and o.peak_GB and not is_subject(o.impl)]
        if is_subject(r.impl) and r.peak_GB and peers:
            best = min(peers, key=lambda o: o.peak_GB)
            r.best_peer, r.peak_vs_best_peer = best.impl, r.peak_GB / best.peak_GB


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- device and selection


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        model = found[1].strip() if found else model
    return f"{model}, {torch.get_num_threads()} threads"


def hardware_of(device: torch.device) -> str:
    """'h100' for the anchors' H100 SXM (whose published figures apply), 'cuda' for any other GPU (the
    PCIe and NVL H100s included: different clocks and bandwidth), else the device type."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "h100" if "H100" in name and not any(v in name for v in ("PCIe", "NVL")) else "cuda"
    return device.type


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def all_cases(cfg: Config, errors: dict) -> list[Case]:
    """Every family's cases for one config; a family that fails is recorded in ``errors``."""
    found = []
    for name, module in families().items():
        try:
            if isinstance(module, Exception):
                raise module
            found += module.cases(cfg)
        except Exception as err:
            errors[name] = _error_text(err)
    return found


def select(cases: list[Case], wanted: list[str] | None) -> list[Case]:
    if not wanted:
        return cases
    names = {c.label.lower() for c in cases} | {c.family.lower() for c in cases}
    unknown = [w for w in wanted if w.lower() not in names]
    if unknown:
        raise SystemExit(f"unknown problems {unknown}; see --list")
    wanted = {w.lower() for w in wanted}
    return [c for c in cases if c.label.lower() in wanted or c.family.lower() in wanted]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m equikern.bench",
        description="Check every implementation against its reference, then time it.",
    )
    p.add_argument(
        "--problems", type=_csv, help="comma-separated problem labels or family names (default: all)"
    )
    p.add_argument(
        "--batch",
        type=lambda s: [int(b) for b in _csv(s)],
        help="comma-separated batch sizes (default 50000 on a GPU, 2000 on a CPU; conv: see --cells)",
    )
    p.add_argument(
        "--dtype", type=_csv, default=["float32", "float64"], help="float32,float64 (default both)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--modes", type=_csv, help=f"of {','.join(MODES)} (default: all on a GPU, fwd,fwdbwd on a CPU)"
    )
    p.add_argument(
        "--impls",
        type=_csv,
        help=f"implementations to run (default: all importable of {','.join(IMPL_ORDER)})",
    )
    p.add_argument(
        "--cells",
        type=int,
        help="conv: cells per side of the diamond lattice (default 9 on a GPU, 3 on a CPU, 2 with --quick)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/<device>-<date>)")
    p.add_argument("--reps", type=int, help="least number of timed calls (default 10 on a GPU, 3 on a CPU)")
    p.add_argument(
        "--min-time",
        type=float,
        help="least seconds of timed calls per row (default 0.5 on a GPU, 0.3 on a CPU)",
    )
    p.add_argument("--list", action="store_true", help="list the problems and exit")
    p.add_argument("--quick", action="store_true", help="tiny batch and short timing, for tests")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.batch_given = bool(args.batch) or args.quick
    args.batch = args.batch or [16 if args.quick else 50000 if gpu else 2000]
    args.modes = args.modes or list(MODES if gpu else MODES[:2])
    if set(args.modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(args.modes) - set(MODES))}; choose from {MODES}")
    if args.cells is not None and args.cells < 2:
        p.error("--cells: at least 2 (the box must exceed twice the 3.0 A cutoff)")
    if set(args.dtype) - set(DTYPES):
        p.error(f"--dtype: unknown {sorted(set(args.dtype) - set(DTYPES))}; choose from {sorted(DTYPES)}")
    args.reps = args.reps or (2 if args.quick else 10 if gpu else 3)
    args.min_time = (
        args.min_time if args.min_time is not None else 0.01 if args.quick else 0.5 if gpu else 0.3
    )
    return args


# ---------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table."""
    peers = _ordered({impl for r in rows for impl in r.speedup})
    memory = any(r.peak_GB is not None for r in rows)
    published_memory = any(r.published_peak_GB is not None for r in rows)
    header = ["problem", "batch", "dtype", "mode", "impl", "ms", "±iqr", "GB/s", "floor ms"]
    header += [f"x {p}" for p in peers] + ["published ms"]
    header += ["peak GB", "peak / best peer's"] if memory else []
    header += ["published peak GB"] if published_memory else []
    cells = []
    for r in rows:
        check = r.status if r.max_rel_err is None else f"{r.status} ({r.max_rel_err:.1e})"
        if r.checked_against and is_subject(r.checked_against):  # the reference failed, equikern checked
            check += f" vs {r.checked_against}"
        if r.error:
            check += f": {r.error[:100]}"  # the whole message is in results.json
        line = [r.problem, str(r.batch), r.dtype, r.mode, r.impl, _fmt(r.median_ms), _fmt(r.iqr_ms, 2)]
        line += [_fmt(r.GBps), _fmt(r.floor_ms)] + [_fmt(r.speedup.get(p), 3) for p in peers]
        line += [_fmt(r.published_ms)]
        if memory:
            ratio = f"{r.peak_vs_best_peer:.2f} ({r.best_peer})" if r.peak_vs_best_peer else "-"
            line += [_fmt(r.peak_GB, 3), ratio]
        if published_memory:
            line += [_fmt(r.published_peak_GB, 3)]
        cells.append(line + [check])
    return header + ["check"], cells


def plain_table(rows: list[Row]) -> str:
    header, cells = table(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    widths[-1] = 0  # the check column goes last, unpadded: it may hold an error message
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *cells]]
    lines.insert(1, "-" * max(len(line) for line in lines[:1]))
    return "\n".join(lines)


def markdown(report: dict, rows: list[Row]) -> str:
    header, cells = table(rows)
    lines = [
        f"# equikern benchmark: {report['device']}",
        "",
        f"{report['date']}; torch {report['torch']}, e3nn {report['e3nn']}, equikern {report['equikern']}; "
        f"memory floor at {report['bandwidth_GBps']:.0f} GB/s ({report['bandwidth_source']}). "
        "ms: median; x impl: that implementation's time over this row's; published: anchors.json. "
        "peak GB (CUDA): memory allocated at the peak of one call of the mode, its inputs included; "
        "peak / best peer's: equikern's peak over the least of the other implementations' in that mode.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells),
    ]
    lines += [f"\n{name} skipped: {why}" for name, why in report["not_run"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Bar chart of time per problem and implementation, one panel per mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    impls = _ordered({r.impl for r in rows})
    groups = list(dict.fromkeys(f"{r.problem}\n{r.dtype} b{r.batch}" for r in rows))
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(7, 1.1 * len(groups)), 4.5 * len(modes)), squeeze=False
    )
    width = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes[:, 0], modes):
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for r in rows:
                if r.mode == mode and r.impl == impl and r.median_ms:
                    xs.append(
                        groups.index(f"{r.problem}\n{r.dtype} b{r.batch}")
                        + (k - (len(impls) - 1) / 2) * width
                    )
                    ys.append(r.median_ms)
            ax.bar(xs, ys, width, label=impl)
        floors = {f"{r.problem}\n{r.dtype} b{r.batch}": r.floor_ms for r in rows if r.mode == mode}
        for g, floor in floors.items():
            x = groups.index(g)
            ax.hlines(floor, x - 0.45, x + 0.45, colors="black", linestyles="dashed", label=None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("ms (median; dashed: memory floor)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def config(args: argparse.Namespace, dtype: torch.dtype, batch: int) -> Config:
    hardware = hardware_of(args.device)
    return Config(args.device, dtype, batch, hardware, args.batch_given, args.cells, args.quick)


def list_problems(args: argparse.Namespace) -> None:
    errors: dict = {}
    cfg = config(args, DTYPES[args.dtype[0]], args.batch[0])
    for case in all_cases(cfg, errors):
        detail = ", ".join(
            f"{k}={v if len(str(v)) <= 40 else str(v)[:37] + '...'}" for k, v in case.params.items()
        )
        print(f"{case.family:16} {case.label:26} {detail}")
    for name, err in errors.items():
        print(f"{name:16} (family failed to load: {err})")


def keep_freed_memory() -> str:
    """Let glibc keep freed blocks instead of unmapping them, for every implementation alike.

    By default glibc returns each large block to the OS when it is freed, so every fresh tensor
    page-faults in again: on the project's CPU machine that caps writing new memory at about 3-5
    GB/s and dominates any memory-bound op. Long-running training processes (and jemalloc or
    tcmalloc, which PyTorch recommends on CPUs) do not pay this; neither does this benchmark.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
        if libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 31):
            return "glibc, freed blocks kept (mallopt)"
    except OSError:
        pass
    return "default"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        list_problems(args)
        return 0
    hardware = hardware_of(args.device)
    allocator = keep_freed_memory() if hardware == "cpu" else "default"
    configs = [config(args, DTYPES[d], b) for b in args.batch for d in dict.fromkeys(args.dtype)]
    family_errors: dict = {}
    work, seen = [], set()
    for cfg in configs:
        for case in select(all_cases(cfg, family_errors), args.problems):
            # a family that sizes its problem without the batch (conv) gives the same case for every batch
            key = (
                case.family,
                case.label,
                cfg.dtype,
                case.batch or cfg.batch,
                json.dumps(case.params, default=str),
            )
            if key not in seen:
                seen.add(key)
                work.append((cfg, case))
    name = device_name(args.device)
    date = datetime.date.today().isoformat()
    out = args.out or Path("bench-out") / f"{slug(name)}-{date}"
    bandwidth, source = copy_bandwidth(args.device, hardware, args.quick)
    print(
        f"equikern bench on {name}: {len(work)} problems x {len(args.modes)} modes; "
        f"memory floor at {bandwidth / 1e9:.0f} GB/s ({source}); CPU allocator: {allocator}"
    )
    for family, err in family_errors.items():
        print(f"!!! family {family} failed to load: {err}", file=sys.stderr)
    import e3nn

    import equikern

    notes: dict = {}
    report = {
        "device": name,
        "hardware": hardware,
        "date": date,
        "torch": torch.__version__,
        "e3nn": e3nn.__version__,
        "equikern": equikern.__version__,
        "bandwidth_GBps": bandwidth / 1e9,
        "bandwidth_source": source,
        "allocator": allocator,
        "args": dict(vars(args)),
        "not_run": notes,
        "family_errors": family_errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tqdm(total=len(work) * len(args.modes), desc="bench", unit="row", file=sys.stderr) as bar:
        for cfg, case in work:
            rows += run_case(case, cfg, args, bandwidth, notes, bar)
            # rewritten after every case, so that a run cut short keeps what it measured
            (out / "results.json").write_text(
                json.dumps({**report, "rows": [asdict(r) for r in rows]}, indent=1, default=str)
            )
    (out / "results.md").write_text(markdown(report, rows))
    if rows:
        plot(rows, out / "results.png", f"equikern bench: {name}, {date}")
    print(plain_table(rows))
    for impl, why in notes.items():
        print(f"{impl} skipped: {why}")
    failed = [r for r in rows if r.status == "FAILED" or (is_subject(r.impl) and r.status == "error")]
    if failed:
        print(f"!!! {len(failed)} rows FAILED or broke for {SUBJECT}: see the check column", file=sys.stderr)
    print(f"results in {out}/results.json, results.md, results.png")
    return 1 if failed or family_errors else 0


if __name__ == "__main__":
    sys.exit(main())
