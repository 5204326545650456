"""Compile the generated Triton kernels for a GPU target on any machine, GPU or not.

Triton compiles for a named target without a device (its own LLVM and ptxas): this is how CI proves that
every generated kernel builds for the H100 (sm_90) though CI has no GPU, and how the register use and
spills of each kernel are read before it ever runs. ``python -m equikern.triton.aot`` compiles every kernel
kind for the channelwise benchmark problems and prints a table (``--problems``, ``--dtypes``, ``--arch``).
"""

import argparse
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from equikern.triton import tensor_product as ttp
from equikern.triton import tensor_product_conv  # noqa: F401  (registers the convolution's kernel kinds)

# the kinds generated for a plan of each mode (uvw's deterministic convolution backward is two kernels)
MODE_KINDS = {
    "uvu": ("tp_fwd", "tp_bwd", "conv_fwd_atomic", "conv_bwd_atomic", "conv_fwd_csr", "conv_bwd_csr"),
    "uvw": (
        "tp_fwd",
        "tp_bwd",
        "conv_fwd_atomic",
        "conv_bwd_atomic",
        "conv_fwd_csr",
        "conv_bwd_edges",
        "conv_bwd_x1_csr",
    ),
}
KINDS = tuple(dict.fromkeys(MODE_KINDS["uvu"] + MODE_KINDS["uvw"]))
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_DATA = {"x1", "x2", "w", "g", "g2", "gw"}  # pointers to the inputs' dtype
_INDEX = {"src", "dst", "perm", "ptr"}  # int64 pointers


@dataclass
class Compiled:
    kind: str
    dtype: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    ptx_lines: int


def _signature(fn, kind: str, dtype: torch.dtype) -> dict[str, str]:
    data = "*" + _TRITON_DTYPE[dtype]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    atomic = kind.endswith("_atomic")
    sig = {}
    for name in fn.arg_names:
        if name in ("ACC", "BZ", "BU"):
            sig[name] = "constexpr"
        elif name in _DATA:
            sig[name] = data
        elif name in ("out", "g1"):  # atomic adds go to an accumulation buffer (see tensor_product_conv)
            sig[name] = acc if atomic else data
        elif name in _INDEX:
            sig[name] = "*i64"
        else:
            sig[name] = "i32"
    return sig


def _ptxas(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) that ptxas reports for a kernel."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    target = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={target}", "-v", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def compile_kind(
    key: str, kind: str, dtype: torch.dtype, dim2: int, arch: int = 90, part: int = 0
) -> Compiled:
    """Compiles one kernel kind (one part, see Plan.parts) of a registered plan for sm_<arch> (per-sample
    weights)."""
    import triton.language as tl

    fn = ttp.kernel(key, kind, False, dim2 if "bwd" in kind else 0, False, part)
    plan = ttp._PLANS[key]
    constexprs = {
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
        "BZ": ttp._block_z(plan, dtype, "bwd" if "bwd" in kind else "fwd"),
        "BU": plan.tile("bwd" if "bwd" in kind else "fwd")[0],
    }
    name = kind if part == 0 else f"{kind}#{part}"
    return _compile(name, fn, _signature(fn, kind, dtype), constexprs, dtype, arch)


def num_parts(key: str, kind: str) -> int:
    """How many kernels (parts) a kind of a registered plan is generated as."""
    return len(ttp._PLANS[key].parts("bwd" if "bwd" in kind else "fwd", False))


def _compile(name: str, fn, sig: dict, constexprs: dict, dtype: torch.dtype, arch: int, warps: int = 4):
    """Compiles one Triton function for sm_<arch> and reads its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    c = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps},
    )
    regs, spills = _ptxas(c.asm["ptx"], arch)
    return Compiled(name, _TRITON_DTYPE[dtype], regs, spills, c.metadata.shared, c.asm["ptx"].count("\n"))


def compile_cp(L: int, dtype: torch.dtype, direction: str, arch: int = 90) -> Compiled:
    """Compiles the CP bilinear kernel (equikern.triton.cp) for the anchors' shapes: d = (L+1)^2, R = 7 L^2,
    128 channels, with a weight and (backward) factor gradients."""

    from equikern.triton import _cp_kernels
    from equikern.triton import cp as tcp

    fn = _cp_kernels.fwd if direction == "fwd" else _cp_kernels.bwd
    d, R = (L + 1) ** 2, 7 * L * L
    x1 = torch.empty(1, d, 128, dtype=dtype, device="meta")
    x2 = torch.empty(1, d, dtype=dtype, device="meta")
    A = torch.empty(d, R, dtype=dtype, device="meta")
    if direction == "fwd":
        meta = tcp._meta(x1, x2, A, A, 1)
    else:
        meta = tcp._meta(x1, x2, A, A, tcp.SAMPLES_PER_PROGRAM, tcp.BACKWARD_CHANNELS)
    constexprs = {**meta, "HAS_W": True, "FACTORS": True}
    sig = {n: ("constexpr" if n in constexprs else "i32") for n in fn.arg_names}
    for n in fn.arg_names:
        if sig[n] == "i32" and n not in ("Z", "I", "J", "K", "R", "Cc", "s2"):
            sig[n] = "*" + _TRITON_DTYPE[dtype]
    constexprs = {n: v for n, v in constexprs.items() if n in fn.arg_names}
    return _compile(f"cp_{direction}", fn, sig, constexprs, dtype, arch)


SH_KINDS = {"sh_fwd": (0, True, False), "sh_bwd": (0, False, True), "sh_jet1": (1, True, True)}


def compile_sh(lmax: int, dtype: torch.dtype, kind: str, arch: int = 90) -> Compiled:
    """Compiles a spherical-harmonics kernel (equikern.triton.spherical_harmonics) for degrees 0..lmax
    (normalised vectors, component normalisation): forward, backward, or the first derivative jet."""

    from equikern.triton import spherical_harmonics as tsh

    fn, block, warps = tsh._kernel(tuple(range(lmax + 1)), True, "component", dtype, *SH_KINDS[kind])
    sig = {
        n: "constexpr" if n == "BLOCK" else ("i32" if n == "n_rows" else "*" + _TRITON_DTYPE[dtype])
        for n in fn.arg_names
    }
    return _compile(kind, fn, sig, {"BLOCK": block}, dtype, arch, warps)


def compile_segment_sum(dtype: torch.dtype, arch: int = 90) -> Compiled:
    """Compiles the unfused convolution's sum by destination (equikern.triton.tensor_product_conv)."""
    import triton.language as tl

    from equikern.triton.tensor_product_conv import _SEGMENT_SUM

    fn = ttp.load_kernel(_SEGMENT_SUM, "segment_sum")
    pointers = {
        "rows": "*" + _TRITON_DTYPE[dtype],
        "out": "*" + _TRITON_DTYPE[dtype],
        "perm": "*i64",
        "ptr": "*i64",
    }
    constexprs = {"ACC": tl.float64 if dtype == torch.float64 else tl.float32, "BN": 16, "BD": 128}
    sig = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in fn.arg_names}
    return _compile("segment_sum", fn, sig, constexprs, dtype, arch)


def problem_key(irreps_in1: str, irreps_in2: str, irreps_out: str, mode: str = "uvu") -> tuple[str, int]:
    """(plan key, dim of irreps_in2) of a problem's product: channelwise (uvu) or fully connected (uvw)."""
    import equikern

    cls = equikern.ChannelwiseTensorProduct if mode == "uvu" else equikern.FullyConnectedTensorProduct
    tp = cls(irreps_in1, irreps_in2, irreps_out, backend="triton")
    return tp._triton_key, tp.irreps_in2.dim


def main(argv=None) -> int:
    import json

    from equikern.bench import anchors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="float32,float64,bfloat16")
    parser.add_argument(
        "--problems",
        default="mace-large,mace-medium,nequip-lips,nequip-revmd17-benzene,DiffDock-L=2,tetris-poly-1",
    )
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--irreps", help="a problem instead: 'irreps_in1;irreps_in2;irreps_out[;uvw]'")
    parser.add_argument("--cp", default="1,2,3", help="degrees L of the CP kernels to compile ('' for none)")
    parser.add_argument("--sh", default="3,6", help="lmax of the spherical-harmonics kernels ('' for none)")
    parser.add_argument(
        "--no-segment-sum", dest="segment_sum", action="store_false", help="skip the unfused route's kernel"
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="kernels compiled at once")
    args = parser.parse_args(argv)
    rows = []

    def report(label: str, r: Compiled) -> None:
        rows.append({"problem": label, **r.__dict__})
        print(
            f"{label:24} {r.kind:16} {r.dtype:5} {r.registers:5d} {r.spill_bytes:8d} {r.shared_bytes:7d} "
            f"{r.ptx_lines:9d}",
            flush=True,
        )

    problems = {p["label"]: p for p in anchors()["tensor_product"]}
    if args.irreps:
        in1, in2, out, *mode = args.irreps.split(";")
        problems = {
            "custom": {
                "irreps_in1": in1,
                "irreps_in2": in2,
                "irreps_out_target": out,
                "mode": (mode or ["uvu"])[0],
            }
        }
        args.problems = "custom"
    print(f"{'problem':24} {'kind':16} {'dtype':5} {'regs':>5} {'spill B':>8} {'smem B':>7} {'ptx lines':>9}")
    jobs = []  # (label, compile function, its arguments)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    for label in args.problems.split(","):
        p = problems[label]
        key, dim2 = problem_key(p["irreps_in1"], p["irreps_in2"], p["irreps_out_target"], p["mode"])
        for dtype in dtypes:
            for kind in args.kinds.split(","):
                if kind not in MODE_KINDS[p["mode"]]:
                    continue
                for part in range(num_parts(key, kind)):
                    ttp.kernel(key, kind, False, dim2 if "bwd" in kind else 0, False, part)  # generate here
                    jobs.append((label, compile_kind, (key, kind, dtype, dim2, args.arch, part)))
    for L in [int(v) for v in args.cp.split(",") if v]:
        for dtype in dtypes:
            for direction in ("fwd", "bwd"):
                jobs.append((f"cp-L{L}", compile_cp, (L, dtype, direction, args.arch)))
    if args.segment_sum:
        for dtype in dtypes:
            jobs.append(("conv-unfused", compile_segment_sum, (dtype, args.arch)))
    for lmax in [int(v) for v in args.sh.split(",") if v]:
        for dtype in dtypes:
            for kind in SH_KINDS:
                jobs.append((f"sh-l{lmax}", compile_sh, (lmax, dtype, kind, args.arch)))
    # Triton's compiler releases the GIL: the kernels compile in parallel threads, reported in order
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for (label, _, _), result in zip(jobs, pool.map(lambda job: job[1](*job[2]), jobs)):
            report(label, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": f"sm_{args.arch}", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
