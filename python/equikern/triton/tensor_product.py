"""Triton tensor products generated for the instruction list at hand (channelwise ``uvu`` plans).

The products of MACE, NequIP and Allegro convolutions are ``uvu``: every channel u of the first operand
meets the second operand (spherical harmonics, one channel or a few) and writes channel u of the output.
For such a plan this module writes the Triton source of a forward and a backward kernel with every
Clebsch-Gordan coefficient unrolled as a constant, caches the source on disk (``triton.jit`` reads
source files) and the compiled kernels in memory, and exposes them as the torch ops
``equikern::tensor_product_triton`` and ``equikern::tensor_product_triton_backward`` (same arguments and
semantics as ``equikern::tensor_product``, plus the plan's key).

Kernel shape: a program owns a tile of BZ samples x BU channels. Per sample, the second operand is
first contracted into the coefficient table t[i, k] = sum_j C[i, j, k] x2[j] (a few scalars, shared
by every channel); then each channel costs one multiply-add per nonzero (i, k) of the table. The
forward runs output block by output block (summing every path that writes the block, in plan order)
and writes each output element once; the backward runs input block by input block, so the gradient of
x1 is written once, each weight gradient is owned by one program, and the gradient of x2 (a sum over
channels) is summed per program and reduced over the channel tiles afterwards in a fixed order. There
are no atomics: results are bitwise reproducible. Inputs may be float16/bfloat16/float32 (computed in
float32) or float64 (computed in float64).

The second derivative is built from the same two ops (see ``equikern.ops.tensor_product``).
"""

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from equikern.ops.tensor_product import register_trilinear_autograd

__all__ = ["register_plan", "supports", "tensor_product", "tensor_product_backward"]

UVW, UVU = 0, 1  # tp::kUVW, tp::kUVU in csrc/kernels/tensor_product.h
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Path:
    off1: int
    m1: int
    d1: int
    off2: int
    m2: int
    d2: int
    offo: int
    mo: int
    d3: int
    woff: int  # -1: unweighted
    cg: tuple  # ((i, j, k, value), ...)


@dataclass(frozen=True)
class Plan:
    paths: tuple[Path, ...]
    num_paths: int  # rows of the plan tensors (checked against the op's arguments)
    num_cg: int
    mode: int  # UVU or UVW: every path has it
    # what the ops derive from the plan on every call (parts, coverage, checked dims), computed once
    _memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def memo(self, key: tuple, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def tile(self, direction: str) -> tuple[int, int]:
        """(BU, tiles): the channels of a tile (a power of two) and the tiles that cover the widest block.
        A tile's channels are the x1 = output channels of uvu paths and the output channels of uvw paths;
        the uvw backward sums over them, so one tile covers them all."""
        widest = max(p.mo for p in self.paths)
        full = 1 << max(0, widest - 1).bit_length()
        bu = full if (self.mode == UVW and direction == "bwd") else min(32, full)
        return bu, -(-widest // bu)

    def active(self, weighted_only: bool) -> list[Path]:
        return [p for p in self.paths if p.woff >= 0 or not weighted_only]

    def by_output(self, weighted_only: bool) -> dict[tuple[int, int, int], list[Path]]:
        """The active paths grouped by output block (offo, mo, d3), in plan order."""
        groups: dict[tuple[int, int, int], list[Path]] = {}
        for p in self.active(weighted_only):
            groups.setdefault((p.offo, p.mo, p.d3), []).append(p)
        return groups

    def parts(self, direction: str, weighted_only: bool) -> list[list[tuple[int, int, int]]]:
        return self.memo(
            ("parts", direction, weighted_only, PART_BUDGET), lambda: self._parts(direction, weighted_only)
        )

    def _parts(self, direction: str, weighted_only: bool) -> list[list[tuple[int, int, int]]]:
        """The block groups (by output block forward, by x1 block backward) split into runs of about
        PART_BUDGET terms, one kernel each: compilation time grows faster than the kernel's length (a
        plan with 1846 terms took 110 s for one forward kernel), so long plans become several kernels."""
        groups = self.by_output(weighted_only) if direction == "fwd" else self.by_input(weighted_only)
        runs: list[list[tuple[int, int, int]]] = [[]]
        cost = 0
        for key, group in groups.items():
            c = sum((len(p.cg) + p.d1 + p.d3) * p.m2 for p in group)
            if runs[-1] and cost + c > PART_BUDGET:
                runs.append([])
                cost = 0
            runs[-1].append(key)
            cost += c
        return runs

    def by_input(self, weighted_only: bool) -> dict[tuple[int, int, int], list[Path]]:
        """The active paths grouped by x1 block (off1, m1, d1), in plan order."""
        groups: dict[tuple[int, int, int], list[Path]] = {}
        for p in self.active(weighted_only):
            groups.setdefault((p.off1, p.m1, p.d1), []).append(p)
        return groups


MAX_UVW_CHANNELS = 256  # the uvw backward holds a block's output channels in one tile
PART_BUDGET = 400  # terms per generated kernel (see Plan.parts)


def supports(paths: np.ndarray) -> bool:
    """Whether the Triton kernels cover a plan: every path ``uvu``, or every path ``uvw`` with at most
    MAX_UVW_CHANNELS output channels (any mul of the second operand)."""
    paths = np.asarray(paths).reshape(-1, 13)
    if len(paths) == 0:
        return False
    if np.all(paths[:, 0] == UVU):
        return True
    return bool(np.all(paths[:, 0] == UVW) and paths[:, 8].max() <= MAX_UVW_CHANNELS)


_PLANS: dict[str, Plan] = {}
_LOCK = threading.Lock()


def _key(paths: np.ndarray, ijk: np.ndarray, val: np.ndarray) -> str:
    h = hashlib.sha256()
    for a, dt in ((paths, np.int64), (ijk, np.int32), (val, np.float64)):
        a = np.ascontiguousarray(a, dtype=dt)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def register_plan(paths: np.ndarray, ijk: np.ndarray, val: np.ndarray) -> str:
    """Registers a plan (the tables of ``TensorProduct._register_plan``); returns its key."""
    paths = np.asarray(paths, dtype=np.int64).reshape(-1, 13)
    ijk = np.asarray(ijk, dtype=np.int32).reshape(-1, 3)
    val = np.asarray(val, dtype=np.float64).reshape(-1)
    if not supports(paths):
        raise ValueError(
            f"Triton tensor product: every path must be 'uvu' (got modes {sorted(set(paths[:, 0]))})"
        )
    key = _key(paths, ijk, val)
    with _LOCK:
        if key not in _PLANS:
            rows = []
            for r in paths.tolist():
                mode, off1, m1, d1, off2, m2, d2, offo, mo, d3, woff, b, e = r
                if mode == UVU and mo != m1 or mode == UVW and woff < 0:
                    raise ValueError(f"Triton tensor product: inconsistent path {r}")
                cg = tuple((int(i), int(j), int(k), float(c)) for (i, j, k), c in zip(ijk[b:e], val[b:e]))
                rows.append(Path(off1, m1, d1, off2, m2, d2, offo, mo, d3, woff, cg))
            _PLANS[key] = Plan(tuple(rows), len(rows), len(val), int(paths[0, 0]))
    return key


def _plan(key: str, paths: Tensor, ijk: Tensor, val: Tensor) -> Plan:
    plan = _PLANS.get(key)
    if plan is None:  # e.g. an exported program run in a fresh process: rebuild from the tables
        if register_plan(paths.cpu().numpy(), ijk.cpu().numpy(), val.cpu().numpy()) != key:
            raise ValueError("tensor_product_triton: key does not match the plan tables")
        plan = _PLANS[key]
    if plan.num_paths != paths.shape[0] or plan.num_cg != val.shape[0]:
        raise ValueError("tensor_product_triton: key does not match the plan tables")
    return plan


# -- code generation ----------------------------------------------------------------------------------


class _Code:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def block(self, header: str):
        code = self

        class _Block:
            def __enter__(self):
                code(header)
                code.depth += 1

            def __exit__(self, *exc):
                code.depth -= 1

        return _Block()


def _sum(terms: list[str]) -> str:
    return " + ".join(terms) if terms else "0.0"


def _table(code: _Code, p: Path, v: int, tag: str, xmask: str = "zm") -> dict[tuple[int, int], str]:
    """Emits t[i, k] = sum_j C[i, j, k] x2[v, j] ([BZ, 1] per sample); returns {(i, k): name}."""
    js = sorted({j for _, j, _, _ in p.cg})
    for j in js:
        code(f"b{j} = tl.load(p2 + {p.off2 + v * p.d2 + j}, mask={xmask}, other=0.0).to(ACC)")
    entries: dict[tuple[int, int], list[str]] = {}
    for i, j, k, c in p.cg:
        entries.setdefault((i, k), []).append(f"{c!r} * b{j}")
    names = {}
    for (i, k), terms in sorted(entries.items()):
        names[i, k] = f"t{tag}_{i}_{k}"
        code(f"{names[i, k]} = {_sum(terms)}")
    return names


def _load_output_grad(code: _Code, p: Path) -> list[int]:
    """Loads go{k}, the output gradient of path p's output block at row pointer pg (lanes masked by m);
    returns the k that its coefficients touch."""
    ks = sorted({k for _, _, k, _ in p.cg})
    for k in ks:
        code(f"go{k} = tl.load(pg + ({p.offo} + u * {p.d3} + {k}), mask=m, other=0.0).to(ACC)")
    return ks


def _prologue(code: _Code, gather: bool) -> None:
    """Rows of one tile of samples: z (the samples; for a convolution, its edges) and, gathering,
    the edges' source and destination nodes."""
    code("zr = tl.program_id(0) * BZ + tl.arange(0, BZ)")
    code("zv = zr < Z")
    code("zm = zv[:, None]")
    code("z = zr.to(tl.int64)[:, None]")
    code("u0 = tl.program_id(1) * BU")
    code("u = u0 + tl.arange(0, BU)[None, :]")
    if gather:
        code("n1 = tl.load(src + zr, mask=zv, other=0).to(tl.int64)[:, None]")
        code("no = tl.load(dst + zr, mask=zv, other=0).to(tl.int64)[:, None]")
    else:
        code("n1 = z")
        code("no = z")


def _forward_paths(code: _Code, group: list, offo: int, d3: int, started: set, xmask: str = "zm") -> None:
    """Adds into o{k} the paths of one output block (x1 rows at p1, x2 at p2, weights at pw, mask m;
    x2's rows are masked by xmask)."""
    for q, p in enumerate(group):
        for i in sorted({i for i, _, _, _ in p.cg}):
            code(f"a{i} = tl.load(p1 + ({p.off1} + u * {p.d1} + {i}), mask=m, other=0.0).to(ACC)")
        for v in range(p.m2):
            t = _table(code, p, v, f"{offo}_{q}_{v}", xmask)
            if p.woff >= 0:
                code(f"wt = tl.load(pw + ({p.woff} + u * {p.m2} + {v}), mask=m, other=0.0).to(ACC)")
            for k in range(d3):
                terms = [f"a{i} * {t[i, kk]}" for (i, kk) in t if kk == k]
                if not terms:
                    continue
                s = f"({_sum(terms)})"
                s = f"wt * {s}" if p.woff >= 0 else s
                code(f"o{k} = o{k} + {s}" if k in started else f"o{k} = {s}")
                started.add(k)


def _forward_source(plan: Plan, weighted_only: bool, gather: bool = False, part: int = 0) -> str:
    """out[z] = TP(x1[z], x2[z], w[z]); gathering (a convolution's edges, atomic mode):
    out[dst[z]] += TP(x1[src[z]], x2[z], w[z]) with atomic adds into a zeroed out."""
    code = _Code()
    code("@triton.jit")
    args = "x1, x2, w, out, src, dst" if gather else "x1, x2, w, out"
    header = f"def kernel({args}, Z, s1, s2, sw, so, ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    with code.block(header):
        _prologue(code, gather)
        code("p1 = x1 + n1 * s1")
        code("p2 = x2 + z * s2")
        code("pw = w + z * sw")
        code("po = out + no * so")
        groups = plan.by_output(weighted_only)
        for offo, mo, d3 in plan.parts("fwd", weighted_only)[part]:
            group = groups[offo, mo, d3]
            with code.block(f"if u0 < {mo}:"):
                code(f"m = zm & (u < {mo})")
                started: set[int] = set()
                _forward_paths(code, group, offo, d3, started)
                for k in sorted(started) if gather else range(d3):
                    ptr = f"po + ({offo} + u * {d3} + {k})"
                    if gather:
                        code(f"tl.atomic_add({ptr}, o{k}.to(out.dtype.element_ty), mask=m, sem='relaxed')")
                    elif k in started:
                        code(f"tl.store({ptr}, o{k}.to(out.dtype.element_ty), mask=m)")
                    else:
                        code(f"tl.store({ptr}, tl.zeros([BZ, BU], out.dtype.element_ty), mask=m)")
    return "\n".join(code.lines)


def _backward_paths(
    code: _Code,
    group: list,
    started: set,
    shared_w: bool,
    loop_w: bool = False,
    pre: str = "",
    xmask: str = "zm",
) -> None:
    """The gradients of the paths of one x1 block (x1 rows a{pre}{i} loaded, mask m): adds into
    ga{pre}{i} and e{j} (x2's gradient, summed over the tile's channels) and writes the weights'
    gradients at qw (shared_w: summed over the tile's samples; loop_w: added into gs{woff}_{v})."""
    a, ga, wa = f"a{pre}", f"ga{pre}", f"wa{pre}"
    for q, p in enumerate(group):
        _load_output_grad(code, p)
        for v in range(p.m2):
            t = _table(code, p, v, f"{pre}{q}_{v}", xmask)
            weighted = p.woff >= 0
            if weighted:
                code(f"wt = tl.load(pw + ({p.woff} + u * {p.m2} + {v}), mask=m, other=0.0).to(ACC)")
            hs = sorted({i for i, _ in t})
            for i in hs:
                code(f"h{i} = {_sum([f'{t[ii, k]} * go{k}' for (ii, k) in t if ii == i])}")
                s = f"wt * h{i}" if weighted else f"h{i}"
                code(f"{ga}{i} = {ga}{i} + {s}" if i in started else f"{ga}{i} = {s}")
                started.add(i)
            if weighted:
                code(f"gwt = {_sum([f'{a}{i} * h{i}' for i in hs])}")
                ptr = f"qw + ({p.woff} + u * {p.m2} + {v})"
                if loop_w:
                    code(f"gs{p.woff}_{v} = gs{p.woff}_{v} + tl.sum(gwt, axis=0)[None, :]")
                elif shared_w:
                    code(
                        f"tl.store({ptr}, tl.sum(gwt, axis=0)[None, :].to(gw.dtype.element_ty), "
                        f"mask=u < {p.m1})"
                    )
                else:
                    code(f"tl.store({ptr}, gwt.to(gw.dtype.element_ty), mask=m)")
                for i in sorted({i for i, _, _, _ in p.cg}):
                    code(f"{wa}{i} = wt * {a}{i}")
            src = wa if weighted else a
            by_j: dict[int, list[str]] = {}
            for i, j, k, c in p.cg:
                by_j.setdefault(j, []).append(f"{c!r} * {src}{i} * go{k}")
            for j, terms in sorted(by_j.items()):
                jj = p.off2 + v * p.d2 + j
                code(f"e{jj} = e{jj} + tl.sum({_sum(terms)}, axis=1)")


def _backward_rows(code: _Code, shared_w: bool, g2_row: str) -> None:
    """Row pointers of a backward tile: operands x1[n1], x2[z], w[z], output gradient g[no]; gradients
    g1[n1], g2[g2_row], gw[z] (shared_w: one row per tile of samples)."""
    code("p1 = x1 + n1 * s1")
    code("p2 = x2 + z * s2")
    code("pw = w + z * sw")
    code("pg = g + no * so")
    code("q1 = g1 + n1 * r1")
    code(f"q2 = g2 + {g2_row} * r2")
    code("qw = gw + " + ("tl.program_id(0) * rw" if shared_w else "z * rw"))


def _backward_source(
    plan: Plan, weighted_only: bool, dim2: int, gather: bool = False, shared_w: bool = False, part: int = 0
) -> str:
    """Gradients of out[z] = TP(x1[z], x2[z], w[z]) for one tile: g1 [Z, dim1] (gathering: atomic adds
    into g1[src[z]]), g2 partial sums per channel tile [num tiles, Z, dim2], gw [Z, nw] (shared_w: one
    row per tile of samples, summed over them)."""
    code = _Code()
    code("@triton.jit")
    args = "g, x1, x2, w, g1, g2, gw, src, dst" if gather else "g, x1, x2, w, g1, g2, gw"
    header = (
        f"def kernel({args}, Z, s1, s2, sw, so, r1, r2, rw, "
        "ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    )
    with code.block(header):
        _prologue(code, gather)
        _backward_rows(code, shared_w, f"(({part} * tl.num_programs(1) + tl.program_id(1)) * Z + z)")
        for j in range(dim2):
            code(f"e{j} = tl.zeros([BZ], ACC)")
        groups = plan.by_input(weighted_only)
        for off1, m1, d1 in plan.parts("bwd", weighted_only)[part]:
            group = groups[off1, m1, d1]
            with code.block(f"if u0 < {m1}:"):
                code(f"m = zm & (u < {m1})")
                for i in range(d1):
                    code(f"a{i} = tl.load(p1 + ({off1} + u * {d1} + {i}), mask=m, other=0.0).to(ACC)")
                started: set[int] = set()
                _backward_paths(code, group, started, shared_w)
                for i in sorted(started) if gather else range(d1):
                    ptr = f"q1 + ({off1} + u * {d1} + {i})"
                    if gather:
                        code(f"tl.atomic_add({ptr}, ga{i}.to(g1.dtype.element_ty), mask=m, sem='relaxed')")
                    elif i in started:
                        code(f"tl.store({ptr}, ga{i}.to(g1.dtype.element_ty), mask=m)")
                    else:
                        code(f"tl.store({ptr}, tl.zeros([BZ, BU], g1.dtype.element_ty), mask=m)")
        for j in range(dim2):
            code(f"tl.store(q2 + {j}, e{j}[:, None].to(g2.dtype.element_ty), mask=zm)")
    return "\n".join(code.lines)


def _uvw_forward_paths(code: _Code, group: list, offo: int, xmask: str = "zm") -> None:
    """Adds into o{k} (zeroed by the caller) the uvw paths of one output block: a tile of samples x
    output channels w, a runtime loop over the input channels c of each path (x1 rows at p1, x2 at p2,
    weights at pw; lanes masked by m, x1 and x2 rows by xmask)."""
    for q, p in enumerate(group):
        for v in range(p.m2):
            t = _table(code, p, v, f"{offo}_{q}_{v}", xmask)
            with code.block(f"for c in range(0, {p.m1}):"):
                for i in sorted({i for i, _ in t}):
                    code(
                        f"a{i} = tl.load(p1 + ({p.off1} + c * {p.d1} + {i}), mask={xmask}, other=0.0).to(ACC)"
                    )
                ptr = f"({p.woff} + (c * {p.m2} + {v}) * {p.mo} + u)"
                code(f"wt = tl.load(pw + {ptr}, mask=m, other=0.0).to(ACC)")
                for k in sorted({k for _, k in t}):
                    s = _sum([f"a{i} * {t[i, kk]}" for (i, kk) in t if kk == k])
                    code(f"o{k} = o{k} + wt * ({s})")


def _uvw_forward_source(plan: Plan, weighted_only: bool, gather: bool = False, part: int = 0) -> str:
    """out[z, w, k] = sum_(u, v) W[z, u, v, w] s[z, u, v, k], s = sum_ij C x1[u, i] x2[v, j]; gathering (a
    convolution's edges, atomic mode): out[dst[z]] += ... with x1[src[z]], atomic adds into a zeroed out."""
    code = _Code()
    code("@triton.jit")
    args = "x1, x2, w, out, src, dst" if gather else "x1, x2, w, out"
    header = f"def kernel({args}, Z, s1, s2, sw, so, ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    with code.block(header):
        _prologue(code, gather)
        code("p1 = x1 + n1 * s1")
        code("p2 = x2 + z * s2")
        code("pw = w + z * sw")
        code("po = out + no * so")
        groups = plan.by_output(weighted_only)
        for offo, mo, d3 in plan.parts("fwd", weighted_only)[part]:
            group = groups[offo, mo, d3]
            with code.block(f"if u0 < {mo}:"):
                code(f"m = zm & (u < {mo})")
                ks = sorted({k for p in group for _, _, k, _ in p.cg})
                for k in ks:
                    code(f"o{k} = tl.zeros([BZ, BU], ACC)")
                _uvw_forward_paths(code, group, offo)
                for k in ks if gather else range(d3):
                    ptr = f"po + ({offo} + u * {d3} + {k})"
                    if gather:
                        code(f"tl.atomic_add({ptr}, o{k}.to(out.dtype.element_ty), mask=m, sem='relaxed')")
                    else:
                        value = f"o{k}" if k in ks else "tl.zeros([BZ, BU], ACC)"
                        code(f"tl.store({ptr}, {value}.to(out.dtype.element_ty), mask=m)")
    return "\n".join(code.lines)


def _uvw_x1_terms(code: _Code, p: Path, t: dict, v: int, ks: list) -> None:
    """For one (path, v) in the runtime loop over x1's channels c: the weights wt = W[c, v, :] of the tile's
    output channels and q{k} = sum_w wt[w] g[w, k] (the output gradient go{k} contracted over w), added
    into x1's gradient ga{i} += sum_k t[i, k] q{k}."""
    ptr = f"({p.woff} + (c * {p.m2} + {v}) * {p.mo} + u)"
    code(f"wt = tl.load(pw + {ptr}, mask=m, other=0.0).to(ACC)")
    for k in ks:
        code(f"qk{k} = tl.sum(wt * go{k}, axis=1)[:, None]")
    for i in sorted({i for i, _ in t}):
        code(f"ga{i} = ga{i} + {_sum([f'{t[i, k]} * qk{k}' for (ii, k) in t if ii == i])}")


def _uvw_backward_source(
    plan: Plan,
    weighted_only: bool,
    dim2: int,
    shared_w: bool = False,
    part: int = 0,
    gather: bool = False,
    g1: str = "store",
) -> str:
    """Gradients of the uvw product for a tile of samples x all output channels: per input block, a runtime
    loop over its channels c contracts the output gradient over w (q[k] = sum_w W[c, v, w] g[w, k]) for
    x1's and x2's gradients, and writes W's gradient g[w, k] s[c, v, k] (shared_w: summed over the tile's
    samples, one row per tile). Gathering (a convolution's edges): x1[src[z]], g[dst[z]]; x1's gradient is
    then added atomically into g1[src[z]] (g1="atomic") or not computed here (g1="none": the
    deterministic convolution sums it per source node in another kernel)."""
    code = _Code()
    code("@triton.jit")
    args = "g, x1, x2, w, g1, g2, gw, src, dst" if gather else "g, x1, x2, w, g1, g2, gw"
    header = (
        f"def kernel({args}, Z, s1, s2, sw, so, r1, r2, rw, "
        "ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    )
    with code.block(header):
        _prologue(code, gather)
        _backward_rows(code, shared_w, f"({part} * Z + z)")
        for j in range(dim2):
            code(f"e{j} = tl.zeros([BZ, 1], ACC)")
        groups = plan.by_input(weighted_only)
        for off1, m1, d1 in plan.parts("bwd", weighted_only)[part]:
            group = groups[off1, m1, d1]
            with code.block(f"for c in range(0, {m1}):"):
                for i in range(d1):
                    code(f"a{i} = tl.load(p1 + ({off1} + c * {d1} + {i}), mask=zm, other=0.0).to(ACC)")
                    code(f"ga{i} = tl.zeros([BZ, 1], ACC)")
                for q, p in enumerate(group):
                    code(f"m = zm & (u < {p.mo})")
                    ks = _load_output_grad(code, p)
                    for v in range(p.m2):
                        t = _table(code, p, v, f"{q}_{v}")
                        _uvw_x1_terms(code, p, t, v, ks)
                        for k in ks:
                            code(f"sk{k} = {_sum([f'a{i} * {t[i, kk]}' for (i, kk) in t if kk == k])}")
                        code(f"gwt = {_sum([f'sk{k} * go{k}' for k in ks])}")
                        ptr = f"({p.woff} + (c * {p.m2} + {v}) * {p.mo} + u)"
                        if shared_w:
                            code(
                                f"tl.store(qw + {ptr}, tl.sum(gwt, axis=0)[None, :].to(gw.dtype.element_ty), "
                                f"mask=u < {p.mo})"
                            )
                        else:
                            code(f"tl.store(qw + {ptr}, gwt.to(gw.dtype.element_ty), mask=m)")
                        by_j: dict[int, list[str]] = {}
                        for i, j, k, cval in p.cg:
                            by_j.setdefault(j, []).append(f"{cval!r} * a{i} * qk{k}")
                        for j, terms in sorted(by_j.items()):
                            jj = p.off2 + v * p.d2 + j
                            code(f"e{jj} = e{jj} + {_sum(terms)}")
                for i in range(d1):
                    ptr = f"q1 + ({off1} + c * {d1} + {i})"
                    if g1 == "atomic":
                        code(f"tl.atomic_add({ptr}, ga{i}.to(g1.dtype.element_ty), mask=zm, sem='relaxed')")
                    elif g1 == "store":
                        code(f"tl.store({ptr}, ga{i}.to(g1.dtype.element_ty), mask=zm)")
        for j in range(dim2):
            code(f"tl.store(q2 + {j}, e{j}.to(g2.dtype.element_ty), mask=zm)")
    return "\n".join(code.lines)


def _cache_dir() -> str:
    root = os.environ.get("EQUIKERN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "equikern"
    )
    path = os.path.join(root, "triton")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        path = os.path.join(tempfile.gettempdir(), "equikern-triton")
        os.makedirs(path, exist_ok=True)
    return path


_PRELUDE = (
    '"""Generated by equikern.triton for one problem; do not edit."""\n\n'
    "import triton\nimport triton.language as tl\n\n\n"
)


def load_kernel(source: str, kind: str):
    """The ``kernel`` of a generated source: written once to the cache directory, imported once (per
    mode: ``triton.jit`` makes interpreted functions when TRITON_INTERPRET is set at import)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    name = f"equikern_{kind}_{digest}"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    module_name = name + ("_interpreted" if interpreted else "")
    module = sys.modules.get(module_name)
    if module is None:
        path = os.path.join(_cache_dir(), name + ".py")
        text = _PRELUDE + source + "\n"
        if not os.path.exists(path) or open(path).read() != text:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return module.kernel


# kind -> source generator(plan, weighted_only, dim2, shared_w, part); the convolution module adds its own
def _tp_fwd(plan, wo, dim2, shared_w, part):
    return (_uvw_forward_source if plan.mode == UVW else _forward_source)(plan, wo, part=part)


def _tp_bwd(plan, wo, dim2, shared_w, part):
    return (_uvw_backward_source if plan.mode == UVW else _backward_source)(
        plan, wo, dim2, shared_w=shared_w, part=part
    )


def _conv_fwd_atomic(plan, wo, dim2, shared_w, part):
    return (_uvw_forward_source if plan.mode == UVW else _forward_source)(plan, wo, True, part)


def _conv_bwd_atomic(plan, wo, dim2, shared_w, part):
    if plan.mode == UVW:
        return _uvw_backward_source(plan, wo, dim2, shared_w, part, gather=True, g1="atomic")
    return _backward_source(plan, wo, dim2, True, shared_w, part)


GENERATORS = {
    "tp_fwd": _tp_fwd,
    "tp_bwd": _tp_bwd,
    "conv_fwd_atomic": _conv_fwd_atomic,
    "conv_bwd_atomic": _conv_bwd_atomic,
    # uvw convolutions, deterministic mode: the per-edge gradients (x2, weights) without x1's
    "conv_bwd_edges": lambda plan, wo, dim2, shared_w, part: _uvw_backward_source(
        plan, wo, dim2, shared_w, part, gather=True, g1="none"
    ),
}


@functools.lru_cache(maxsize=512)
def kernel(key: str, kind: str, weighted_only: bool, dim2: int = 0, shared_w: bool = False, part: int = 0):
    """The compiled kernel of one kind (and part, see Plan.parts) for a registered plan."""
    return load_kernel(GENERATORS[kind](_PLANS[key], weighted_only, dim2, shared_w, part), kind)


def _launch_key(fn, args: tuple, kwargs: dict) -> tuple:
    """What a launch's compiled kernel depends on, roughly (Triton also specialises on integer values):
    enough to tell which kernels of a list have not run yet."""
    dtypes = tuple(str(a.dtype) if isinstance(a, Tensor) else None for a in args)
    return (id(fn), dtypes, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


_LAUNCHED: set = set()
_PARALLEL_FAILED: list[str] = []


def _compiles_async(fn) -> bool:
    import triton

    return hasattr(triton, "AsyncCompileMode") and isinstance(fn, triton.runtime.JITFunction)


def launch(launches: list[tuple]) -> None:
    """Runs kernels ``(fn, grid, args, kwargs)`` in order. When several of them have not run yet (a plan's
    parts, on its first call), they are first compiled in parallel threads (``triton.AsyncCompileMode``;
    Triton's compiler releases the GIL: benzene's five forward parts compiled for sm_90 in 30 s one after
    the other, 19 s on two threads of a 2-core CPU), then launched. If parallel compilation fails, a
    warning says so and the kernels compile one at a time as they launch. A single kernel (most plans)
    is launched without any bookkeeping: this runs on every call."""
    if len(launches) == 1:
        fn, grid, args, kw = launches[0]
        fn[grid](*args, **kw)
        return
    keys = [_launch_key(fn, args, kw) for fn, _, args, kw in launches]
    cold = [launch for launch, key in zip(launches, keys) if key not in _LAUNCHED]
    if len(cold) > 1 and not _PARALLEL_FAILED and _compiles_async(cold[0][0]):
        import triton
        from triton.runtime import _async_compile

        try:
            with ThreadPoolExecutor(min(len(cold), os.cpu_count() or 1)) as pool:
                mode = triton.AsyncCompileMode(pool)
                try:
                    with mode:
                        for fn, grid, args, kw in cold:
                            fn.warmup(*args, grid=grid, **kw)
                finally:  # its __exit__ re-raises a failed compile before leaving the mode: leave it here
                    if _async_compile.active_mode.get() is mode:
                        _async_compile.active_mode.set(None)
        except Exception as err:  # noqa: BLE001  (any failure: compile as usual, and say so once)
            _PARALLEL_FAILED.append(repr(err))
            warnings.warn(
                f"equikern.triton: compiling kernel parts in parallel failed ({err!r}); compiling them one "
                "at a time instead",
                RuntimeWarning,
                stacklevel=2,
            )
    for (fn, grid, args, kw), key in zip(launches, keys):
        fn[grid](*args, **kw)
        _LAUNCHED.add(key)


# -- the ops ------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(x1: Tensor, x2: Tensor, w: Tensor, grad: Tensor | None = None) -> int:
    names = ("x1", "x2", "weight")
    for t, name in zip((x1, x2, w), names):
        if t.dim() != 2:
            raise ValueError(
                f"tensor_product_triton: {name} must be 2-D [rows, dim], got shape {tuple(t.shape)}"
            )
        if t.dtype != x1.dtype or t.device != x1.device:
            raise ValueError(
                f"tensor_product_triton: {name} is {t.dtype} on {t.device}, x1 is {x1.dtype} on {x1.device}"
            )
    if x1.dtype not in DTYPES:
        raise ValueError(f"tensor_product_triton: dtype must be one of {DTYPES}, got {x1.dtype}")
    z = 1
    for t in (x1, x2, w):
        if t.shape[0] != 1:
            if z != 1 and t.shape[0] != z:
                raise ValueError(
                    "tensor_product_triton: batch sizes (x1, x2, weight) "
                    f"{[x1.shape[0], x2.shape[0], w.shape[0]]} "
                    "must be equal or 1"
                )
            z = t.shape[0]
    if any(t.shape[0] == 0 for t in (x1, x2, w)):
        z = 0
    if grad is not None and (grad.dim() != 2 or grad.shape[0] != z or grad.dtype != x1.dtype):
        raise ValueError(f"tensor_product_triton: grad_out must be [{z}, out_dim] of dtype {x1.dtype}")
    return z


def _num_weights(plan: Plan, p: Path) -> int:
    return p.m1 * p.m2 * (p.mo if plan.mode == UVW else 1)


def _check_dims(plan: Plan, x1: Tensor, x2: Tensor, w: Tensor, out_dim: int) -> None:
    dims = (x1.shape[1], x2.shape[1], w.shape[1], out_dim)
    if plan.memo(("dims",) + dims, lambda: _dims_fit(plan, *dims)):
        return
    for p in plan.paths:
        if p.off1 + p.m1 * p.d1 > dims[0] or p.off2 + p.m2 * p.d2 > dims[1]:
            raise ValueError("tensor_product_triton: x1 or x2 is narrower than the plan's blocks")
    raise ValueError("tensor_product_triton: out_dim or weight is narrower than the plan's blocks")


def _dims_fit(plan: Plan, dim1: int, dim2: int, num_weights: int, out_dim: int) -> bool:
    return all(
        p.off1 + p.m1 * p.d1 <= dim1
        and p.off2 + p.m2 * p.d2 <= dim2
        and p.offo + p.mo * p.d3 <= out_dim
        and (p.woff < 0 or p.woff + _num_weights(plan, p) <= num_weights)
        for p in plan.paths
    )


def _coverage(plan: Plan, weighted_only: bool, dim1: int, out_dim: int, num_weights: int) -> tuple[bool, ...]:
    """Whether the kernels write every element of (out, g1, gw); where not, the buffer starts zeroed."""
    key = ("coverage", weighted_only, dim1, out_dim, num_weights)
    return plan.memo(key, lambda: _coverage_of(plan, weighted_only, dim1, out_dim, num_weights))


def _coverage_of(
    plan: Plan, weighted_only: bool, dim1: int, out_dim: int, num_weights: int
) -> tuple[bool, ...]:
    out, g1, gw = np.zeros(out_dim, bool), np.zeros(dim1, bool), np.zeros(num_weights, bool)
    for p in plan.active(weighted_only):
        out[p.offo : p.offo + p.mo * p.d3] = True
        g1[p.off1 : p.off1 + p.m1 * p.d1] = True
        if p.woff >= 0:
            gw[p.woff : p.woff + _num_weights(plan, p)] = True
    return bool(out.all()), bool(g1.all()), bool(gw.all())


# Launch configuration per direction: elements of a [BZ, BU] tile and warps per program. The backward
# keeps about three times as many tiles live (x1, the output gradient, x1's gradient), so it takes
# smaller tiles: at 512 elements it spilled up to 19 KB per thread (python -m equikern.triton.aot).
# EQUIKERN_TRITON_CONFIG="fwd_tile,fwd_warps,bwd_tile,bwd_warps" overrides; python -m
# equikern.triton.tune measures the choices on a GPU.
CONFIG = {"fwd": [512, 4], "bwd": [128, 4]}
if os.environ.get("EQUIKERN_TRITON_CONFIG"):
    _v = [int(v) for v in os.environ["EQUIKERN_TRITON_CONFIG"].split(",")]
    CONFIG = {"fwd": _v[0:2], "bwd": _v[2:4]}


def warps(direction: str) -> int:
    return CONFIG[direction][1]


def _block_z(plan: Plan, dtype: torch.dtype, direction: str = "fwd") -> int:
    """Samples per tile: the direction's tile size over the channels per tile (halved in float64)."""
    return max(1, CONFIG[direction][0] // (2 if dtype == torch.float64 else 1) // plan.tile(direction)[0])


@torch.library.custom_op("equikern::tensor_product_triton", mutates_args=())
def _tp_op(
    x1: Tensor,
    x2: Tensor,
    weight: Tensor,
    paths: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    key: str,
    out_dim: int,
    weighted_only: bool = False,
) -> Tensor:
    z = _check(x1, x2, weight)
    plan = _plan(key, paths, cg_ijk, cg_val)
    _check_dims(plan, x1, x2, weight, out_dim)
    full, _, _ = _coverage(plan, weighted_only, x1.shape[1], out_dim, weight.shape[1])
    out = (torch.empty if full else torch.zeros)((z, out_dim), dtype=x1.dtype, device=x1.device)
    if z == 0 or out_dim == 0 or not plan.active(weighted_only):
        return out.zero_()
    x1, x2, weight = x1.contiguous(), x2.contiguous(), weight.contiguous()
    bz, (bu, nch) = _block_z(plan, x1.dtype), plan.tile("fwd")
    grid = (-(-z // bz), nch)
    strides = [t.shape[1] if t.shape[0] != 1 else 0 for t in (x1, x2, weight)]
    args = (x1, x2, weight, out, z, *strides, out_dim)
    kw = dict(ACC=_acc(x1.dtype), BZ=bz, BU=bu, num_warps=warps("fwd"))
    with torch.cuda.device(x1.device) if x1.is_cuda else contextlib.nullcontext():
        parts = range(len(plan.parts("fwd", weighted_only)))
        launch([(kernel(key, "tp_fwd", weighted_only, part=part), grid, args, kw) for part in parts])
    return out


@_tp_op.register_fake
def _(x1, x2, weight, paths, cg_ijk, cg_val, key, out_dim, weighted_only=False):
    z = _check(x1, x2, weight)
    return x1.new_empty((z, out_dim))


@torch.library.custom_op("equikern::tensor_product_triton_backward", mutates_args=())
def _tp_bwd_op(
    grad_out: Tensor,
    x1: Tensor,
    x2: Tensor,
    weight: Tensor,
    paths: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    key: str,
    weighted_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    z = _check(x1, x2, weight, grad_out)
    plan = _plan(key, paths, cg_ijk, cg_val)
    d1, d2, dw, out_dim = x1.shape[1], x2.shape[1], weight.shape[1], grad_out.shape[1]
    _check_dims(plan, x1, x2, weight, out_dim)
    _, full1, fullw = _coverage(plan, weighted_only, d1, out_dim, dw)
    opts = dict(dtype=x1.dtype, device=x1.device)
    bz, (bu, nch) = _block_z(plan, x1.dtype, "bwd"), plan.tile("bwd")
    tiles = -(-z // bz)
    shared_w = weight.shape[0] == 1  # its gradient: one partial sum per tile of samples
    g1 = (torch.empty if full1 else torch.zeros)((z, d1), **opts)
    gw = (torch.empty if fullw else torch.zeros)((tiles if shared_w else z, dw), **opts)
    parts = len(plan.parts("bwd", weighted_only))
    g2 = torch.empty((parts * nch, z, d2), **opts)
    if z > 0 and plan.active(weighted_only):
        grad_out, x1c, x2c, wc = (t.contiguous() for t in (grad_out, x1, x2, weight))
        strides = [t.shape[1] if t.shape[0] != 1 else 0 for t in (x1c, x2c, wc)]
        args = (grad_out, x1c, x2c, wc, g1, g2, gw, z, *strides, out_dim, d1, d2, dw)
        kw = dict(ACC=_acc(x1.dtype), BZ=bz, BU=bu, num_warps=warps("bwd"))
        with torch.cuda.device(x1.device) if x1.is_cuda else contextlib.nullcontext():
            kernels = [kernel(key, "tp_bwd", weighted_only, d2, shared_w, part) for part in range(parts)]
            launch([(bwd, (tiles, nch), args, kw) for bwd in kernels])
    else:
        g1.zero_(), gw.zero_(), g2.zero_()
    # partial sums (kernel parts and channel tiles for g2, sample tiles for shared weights, the batch
    # for broadcast operands) are reduced in a fixed order
    g2 = g2[0] if g2.shape[0] == 1 else g2.sum(0)

    def reduce(g: Tensor, t: Tensor) -> Tensor:
        return g.sum(0, keepdim=True) if t.shape[0] == 1 and g.shape[0] != 1 else g

    return reduce(g1, x1), reduce(g2, x2), reduce(gw, weight)


@_tp_bwd_op.register_fake
def _(grad_out, x1, x2, weight, paths, cg_ijk, cg_val, key, weighted_only=False):
    _check(x1, x2, weight, grad_out)
    return torch.empty_like(x1), torch.empty_like(x2), torch.empty_like(weight)


def tensor_product(x1, x2, weight, paths, cg_ijk, cg_val, key, out_dim, weighted_only=False) -> Tensor:
    """``equikern.ops.tensor_product`` on the Triton kernels of a registered plan (see ``register_plan``)."""
    return torch.ops.equikern.tensor_product_triton.default(
        x1, x2, weight, paths, cg_ijk, cg_val, key, out_dim, weighted_only
    )


def tensor_product_backward(grad_out, x1, x2, weight, paths, cg_ijk, cg_val, key, weighted_only=False):
    return torch.ops.equikern.tensor_product_triton_backward.default(
        grad_out, x1, x2, weight, paths, cg_ijk, cg_val, key, weighted_only
    )


register_trilinear_autograd(_tp_op, _tp_bwd_op, tensor_product, tensor_product_backward)
