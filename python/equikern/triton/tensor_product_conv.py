"""Triton fused convolution for uvu and uvw plans: out[n] = sum_{e: dst[e] = n} TP(x[src[e]], attr[e], w[e]).

The per-edge messages are never stored. Two modes, as ``equikern.TensorProductConv`` documents:

- atomic (default): a program owns a tile of edges x channels, gathers x[src] and adds its messages into
  out[dst] with atomic adds (the forward kernel of ``equikern.triton.tensor_product`` with gathered rows);
  the backward adds x's gradient into gx[src] the same way. Fast, not bitwise reproducible.
- deterministic: a program owns a tile of destination nodes and walks their edges (the grouping by
  destination, ``conv_graph``) in order, summing every message of a node in registers before one store;
  the backward owns tiles of source nodes and walks the edges leaving them, so x's gradient is summed in
  registers and every edge's gradients (attr, w) are written by exactly one program. For uvw plans the
  backward is two kernels instead: edge tiles write each edge's own gradients (attr, w; no sums across
  edges), then source-node tiles sum x's gradient over the edges leaving each node, channel by channel.
  No atomics anywhere: bitwise reproducible from run to run.

Kernels are generated per plan like the tensor product's (same code generator, same key); the ops are
``equikern::tensor_product_conv_triton`` and its backward, differentiated twice by the formula shared with
the other trilinear ops. Every gathered index is masked to its range inside the kernels, so no input makes
them touch memory out of bounds; the index ranges themselves are checked, with errors naming the argument,
by the grouping op that ``TensorProductConv`` calls first (``conv_graph``).
"""

import contextlib

import torch
from torch import Tensor

from equikern.ops.tensor_product import register_trilinear_autograd
from equikern.triton import tensor_product as ttp
from equikern.triton.tensor_product import (
    GENERATORS,
    UVW,
    Plan,
    _backward_paths,
    _Code,
    _forward_paths,
    _load_output_grad,
    _table,
    _uvw_forward_paths,
    _uvw_x1_terms,
)

__all__ = ["tensor_product_conv", "tensor_product_conv_backward"]


def _csr_prologue(code: _Code) -> None:
    """A tile of BZ nodes and their edge ranges in a grouping (perm, ptr); E edges. The edge loops run to
    the graph's largest degree DMAX (a host integer: Triton's interpreter cannot loop to a bound held in a
    tensor), masked per node."""
    code("zr = tl.program_id(0) * BZ + tl.arange(0, BZ)")
    code("zv = zr < Z")
    code("zm = zv[:, None]")
    code("z = zr.to(tl.int64)[:, None]")
    code("u0 = tl.program_id(1) * BU")
    code("u = u0 + tl.arange(0, BU)[None, :]")
    code("beg = tl.load(ptr + zr, mask=zv, other=0)")
    code("deg = tl.where(zv, tl.load(ptr + zr + 1, mask=zv, other=0) - beg, 0)")


def _csr_edge(code: _Code, other: str, bound: str) -> None:
    """In the edge loop: the t-th edge `ed` of each node and its other end `nd` (both masked to range)."""
    code("pos = beg + t")
    code("ev = zv & (t < deg) & (pos >= 0) & (pos < E)")
    code("ed = tl.load(perm + pos, mask=ev, other=0).to(tl.int64)")
    code("ev = ev & (ed >= 0) & (ed < E)")
    code(f"nd = tl.load({other} + ed, mask=ev, other=0).to(tl.int64)")
    code(f"ev = ev & (nd >= 0) & (nd < {bound})")
    code("zme = ev[:, None]")
    code("ed = ed[:, None]")
    code("nd = nd[:, None]")


def _forward_csr_source(plan: Plan, weighted_only: bool, part: int = 0) -> str:
    """Deterministic forward: programs over destination nodes (perm, ptr: grouping by destination). A part
    (see Plan.parts) writes its output blocks' columns, walking the edges once per block."""
    code = _Code()
    code("@triton.jit")
    header = (
        "def kernel(x1, x2, w, out, src, perm, ptr, Z, E, N1, DMAX, s1, s2, sw, so, "
        "ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    )
    with code.block(header):
        _csr_prologue(code)
        code("po = out + z * so")
        groups = plan.by_output(weighted_only)
        for offo, mo, d3 in plan.parts("fwd", weighted_only)[part]:
            group = groups[offo, mo, d3]
            with code.block(f"if u0 < {mo}:"):
                ks = sorted({k for p in group for _, _, k, _ in p.cg})
                for k in ks:
                    code(f"o{k} = tl.zeros([BZ, BU], ACC)")
                with code.block("for t in range(0, DMAX):"):
                    _csr_edge(code, "src", "N1")
                    code("p1 = x1 + nd * s1")
                    code("p2 = x2 + ed * s2")
                    code("pw = w + ed * sw")
                    code(f"m = zme & (u < {mo})")
                    if plan.mode == UVW:
                        _uvw_forward_paths(code, group, offo, xmask="zme")
                    else:
                        _forward_paths(code, group, offo, d3, set(ks), xmask="zme")
                for k in range(d3):
                    value = f"o{k}" if k in ks else "tl.zeros([BZ, BU], ACC)"
                    code(
                        f"tl.store(po + ({offo} + u * {d3} + {k}), {value}.to(out.dtype.element_ty), "
                        f"mask=zm & (u < {mo}))"
                    )
    return "\n".join(code.lines)


def _backward_csr_source(plan: Plan, weighted_only: bool, dim2: int, shared_w: bool, part: int = 0) -> str:
    """Deterministic backward: programs over source nodes (perm, ptr: grouping by source). g1 [N1, dim1]
    written once per node; g2 partial sums per part and channel tile [parts * tiles, E, dim2]; gw [E, nw]
    per edge, or (shared_w) one row per tile of source nodes. A part (see Plan.parts) owns some x1 blocks:
    their columns of g1 and their paths' weights."""
    code = _Code()
    code("@triton.jit")
    header = (
        "def kernel(g, x1, x2, w, g1, g2, gw, dst, perm, ptr, Z, E, N2, DMAX, s2, sw, so, r1, r2, rw, "
        "ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    )
    groups = plan.by_input(weighted_only)
    blocks = plan.parts("bwd", weighted_only)[part]
    active = [p for b in blocks for p in groups[b]]
    groups = {b: groups[b] for b in blocks}
    with code.block(header):
        _csr_prologue(code)
        code("p1 = x1 + z * r1")
        code("q1 = g1 + z * r1")
        started: dict[int, set] = {}
        for b, (off1, m1, d1) in enumerate(groups):
            ins = sorted({i for p in groups[off1, m1, d1] for i, _, _, _ in p.cg})
            started[b] = set(ins)
            for i in range(d1):
                code(
                    f"a{b}_{i} = tl.load(p1 + ({off1} + u * {d1} + {i}), "
                    f"mask=zm & (u < {m1}), other=0.0).to(ACC)"
                )
            for i in ins:
                code(f"ga{b}_{i} = tl.zeros([BZ, BU], ACC)")
        weighted = [(p.woff, v, p.m1, p.m2) for p in active if p.woff >= 0 for v in range(p.m2)]
        if shared_w:
            for woff, v, _, _ in weighted:
                code(f"gs{woff}_{v} = tl.zeros([1, BU], ACC)")
        with code.block("for t in range(0, DMAX):"):
            _csr_edge(code, "dst", "N2")
            code("p2 = x2 + ed * s2")
            code("pw = w + ed * sw")
            code("pg = g + nd * so")
            code("qw = gw + ed * rw")
            for j in range(dim2):
                code(f"e{j} = tl.zeros([BZ], ACC)")
            for b, (off1, m1, d1) in enumerate(groups):
                code(f"m = zme & (u < {m1})")
                _backward_paths(
                    code,
                    groups[off1, m1, d1],
                    started[b],
                    shared_w,
                    loop_w=shared_w,
                    pre=f"{b}_",
                    xmask="zme",
                )
            code(f"q2 = g2 + (({part} * tl.num_programs(1) + tl.program_id(1)) * E + ed) * r2")
            for j in range(dim2):
                code(f"tl.store(q2 + {j}, e{j}[:, None].to(g2.dtype.element_ty), mask=zme)")
        for b, (off1, m1, d1) in enumerate(groups):
            for i in range(d1):
                value = f"ga{b}_{i}" if i in started[b] else "tl.zeros([BZ, BU], ACC)"
                code(
                    f"tl.store(q1 + ({off1} + u * {d1} + {i}), {value}.to(g1.dtype.element_ty), "
                    f"mask=zm & (u < {m1}))"
                )
        if shared_w:
            code("qs = gw + tl.program_id(0) * rw")
            for woff, v, m1, m2 in weighted:
                code(
                    f"tl.store(qs + ({woff} + u * {m2} + {v}), gs{woff}_{v}.to(gw.dtype.element_ty), "
                    f"mask=u < {m1})"
                )
    return "\n".join(code.lines)


def _uvw_backward_x1_csr_source(plan: Plan, weighted_only: bool, part: int = 0) -> str:
    """Deterministic backward of a uvw plan, x1's gradient: programs over source nodes (perm, ptr:
    grouping by source) x all output channels. For each x1 channel c of each block, the edges leaving the
    tile's nodes are walked in order and g1[n, c] = sum_e sum_(v, k) t[i, k] sum_w W[e, c, v, w] g[dst, w, k]
    is summed in registers and stored once. (x1 itself is not needed; the per-edge gradients come from
    the edge kernel "conv_bwd_edges".)"""
    code = _Code()
    code("@triton.jit")
    header = (
        "def kernel(g, x2, w, g1, dst, perm, ptr, Z, E, N2, DMAX, s2, sw, so, r1, "
        "ACC: tl.constexpr, BZ: tl.constexpr, BU: tl.constexpr):"
    )
    with code.block(header):
        _csr_prologue(code)
        code("q1 = g1 + z * r1")
        groups = plan.by_input(weighted_only)
        for off1, m1, d1 in plan.parts("bwd", weighted_only)[part]:  # parts write disjoint columns of g1
            group = groups[off1, m1, d1]
            with code.block(f"for c in range(0, {m1}):"):
                for i in range(d1):
                    code(f"ga{i} = tl.zeros([BZ, 1], ACC)")
                with code.block("for t in range(0, DMAX):"):
                    _csr_edge(code, "dst", "N2")
                    code("p2 = x2 + ed * s2")
                    code("pw = w + ed * sw")
                    code("pg = g + nd * so")
                    for q, p in enumerate(group):
                        code(f"m = zme & (u < {p.mo})")
                        ks = _load_output_grad(code, p)
                        for v in range(p.m2):
                            t = _table(code, p, v, f"{q}_{v}", "zme")
                            _uvw_x1_terms(code, p, t, v, ks)
                for i in range(d1):
                    code(f"tl.store(q1 + ({off1} + c * {d1} + {i}), ga{i}.to(g1.dtype.element_ty), mask=zm)")
    return "\n".join(code.lines)


GENERATORS["conv_fwd_csr"] = lambda plan, wo, dim2, shared_w, part: _forward_csr_source(plan, wo, part)
GENERATORS["conv_bwd_csr"] = lambda plan, wo, dim2, shared_w, part: _backward_csr_source(
    plan, wo, dim2, shared_w, part
)
GENERATORS["conv_bwd_x1_csr"] = lambda plan, wo, dim2, shared_w, part: _uvw_backward_x1_csr_source(
    plan, wo, part
)


# -- the ops ------------------------------------------------------------------------------------------


def _check(x: Tensor, attr: Tensor, w: Tensor, graph: tuple, grad: Tensor | None = None) -> tuple[int, int]:
    """(num_edges, num_nodes) after checking shapes, dtypes and devices (index ranges: see conv_graph)."""
    for t, name in ((x, "node_features"), (attr, "edge_attr"), (w, "edge_weight")):
        if t.dim() != 2:
            raise ValueError(
                f"tensor_product_conv: {name} must be 2-D [rows, dim], got shape {tuple(t.shape)}"
            )
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"tensor_product_conv: {name} is {t.dtype} on {t.device}, "
                f"node_features is {x.dtype} on {x.device}"
            )
    if x.dtype not in ttp.DTYPES:
        raise ValueError(f"tensor_product_conv: dtype must be one of {ttp.DTYPES}, got {x.dtype}")
    e = attr.shape[0]
    names = ("edge_src", "edge_dst", "dst_perm", "dst_ptr", "src_perm", "src_ptr")
    for t, name in zip(graph, names):
        if t.dim() != 1 or t.dtype != torch.int64 or t.device != x.device:
            raise ValueError(f"tensor_product_conv: {name} must be a 1-D int64 tensor on {x.device}")
    for t, name in zip(graph, names):
        if name in ("edge_src", "edge_dst", "dst_perm", "src_perm") and t.shape[0] != e:
            raise ValueError(f"tensor_product_conv: {name} has {t.shape[0]} entries, edge_attr has {e} rows")
    if graph[5].shape[0] != x.shape[0] + 1 or graph[3].shape[0] < 1:
        raise ValueError("tensor_product_conv: src_ptr must have num_src + 1 entries, dst_ptr num_nodes + 1")
    if w.shape[0] not in (1, e):
        raise ValueError(f"tensor_product_conv: edge_weight has {w.shape[0]} rows, expected 1 or {e}")
    n = graph[3].shape[0] - 1
    if grad is not None and (grad.dim() != 2 or grad.shape[0] != n or grad.dtype != x.dtype):
        raise ValueError(f"tensor_product_conv: grad_out must be [{n}, out_dim] of dtype {x.dtype}")
    return e, n


def _max_degree(ptr: Tensor) -> int:
    return int((ptr[1:] - ptr[:-1]).max()) if ptr.shape[0] > 1 else 0


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Atomic adds go to a float32 buffer for 16-bit inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("equikern::tensor_product_conv_triton", mutates_args=())
def _conv_op(
    x: Tensor,
    edge_attr: Tensor,
    weight: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
    dst_perm: Tensor,
    dst_ptr: Tensor,
    src_perm: Tensor,
    src_ptr: Tensor,
    paths: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    key: str,
    deterministic: bool,
    out_dim: int,
    weighted_only: bool = False,
) -> Tensor:
    graph = (edge_src, edge_dst, dst_perm, dst_ptr, src_perm, src_ptr)
    e, n = _check(x, edge_attr, weight, graph)
    # the kernels read the index arrays with stride 1 (e.g. edge_index[0] of a [E, 2] list is strided)
    edge_src, edge_dst, dst_perm, dst_ptr, src_perm, src_ptr = (t.contiguous() for t in graph)
    plan = ttp._plan(key, paths, cg_ijk, cg_val)
    ttp._check_dims(plan, x, edge_attr, weight, out_dim)
    if e == 0 or n == 0 or out_dim == 0 or not plan.active(weighted_only):
        return x.new_zeros((n, out_dim))
    x, attr, w = x.contiguous(), edge_attr.contiguous(), weight.contiguous()
    bz, (bu, nch) = ttp._block_z(plan, x.dtype), plan.tile("fwd")
    sw = 0 if w.shape[0] == 1 else w.shape[1]
    acc = ttp._acc(x.dtype)
    with _device(x):
        if deterministic:
            full, _, _ = ttp._coverage(plan, weighted_only, x.shape[1], out_dim, w.shape[1])
            out = (torch.empty if full else torch.zeros)((n, out_dim), dtype=x.dtype, device=x.device)
            args = (x, attr, w, out, edge_src, dst_perm, dst_ptr, n, e, x.shape[0], _max_degree(dst_ptr))
            args += (x.shape[1], attr.shape[1], sw, out_dim)
            kw = dict(ACC=acc, BZ=bz, BU=bu, num_warps=ttp.warps("fwd"))
            parts = range(len(plan.parts("fwd", weighted_only)))
            kernels = [ttp.kernel(key, "conv_fwd_csr", weighted_only, part=part) for part in parts]
            ttp.launch([(fwd, (-(-n // bz), nch), args, kw) for fwd in kernels])
            return out
        out = torch.zeros((n, out_dim), dtype=_acc_dtype(x.dtype), device=x.device)
        src, dst = edge_src.clamp(0, x.shape[0] - 1), edge_dst.clamp(0, n - 1)  # in range: see conv_graph
        args = (x, attr, w, out, src, dst, e, x.shape[1], attr.shape[1], sw, out_dim)
        kw = dict(ACC=acc, BZ=bz, BU=bu, num_warps=ttp.warps("fwd"))
        parts = range(len(plan.parts("fwd", weighted_only)))
        kernels = [ttp.kernel(key, "conv_fwd_atomic", weighted_only, part=part) for part in parts]
        ttp.launch([(fwd, (-(-e // bz), nch), args, kw) for fwd in kernels])
    return out.to(x.dtype)


@_conv_op.register_fake
def _(x, edge_attr, weight, src, dst, dst_perm, dst_ptr, src_perm, src_ptr, *rest):
    out_dim = rest[5]
    return x.new_empty((dst_ptr.shape[0] - 1, out_dim))


@torch.library.custom_op("equikern::tensor_product_conv_triton_backward", mutates_args=())
def _conv_bwd_op(
    grad_out: Tensor,
    x: Tensor,
    edge_attr: Tensor,
    weight: Tensor,
    edge_src: Tensor,
    edge_dst: Tensor,
    dst_perm: Tensor,
    dst_ptr: Tensor,
    src_perm: Tensor,
    src_ptr: Tensor,
    paths: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    key: str,
    deterministic: bool,
    weighted_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    graph = (edge_src, edge_dst, dst_perm, dst_ptr, src_perm, src_ptr)
    e, n = _check(x, edge_attr, weight, graph, grad_out)
    edge_src, edge_dst, dst_perm, dst_ptr, src_perm, src_ptr = (t.contiguous() for t in graph)
    plan = ttp._plan(key, paths, cg_ijk, cg_val)
    d1, d2, dw, out_dim = x.shape[1], edge_attr.shape[1], weight.shape[1], grad_out.shape[1]
    ttp._check_dims(plan, x, edge_attr, weight, out_dim)
    if e == 0 or not plan.active(weighted_only):
        return torch.zeros_like(x), torch.zeros_like(edge_attr), torch.zeros_like(weight)
    g, x, attr, w = grad_out.contiguous(), x.contiguous(), edge_attr.contiguous(), weight.contiguous()
    opts = dict(dtype=x.dtype, device=x.device)
    bz, (bu, nch) = ttp._block_z(plan, x.dtype, "bwd"), plan.tile("bwd")
    shared_w = w.shape[0] == 1
    sw = 0 if shared_w else dw
    _, full1, fullw = ttp._coverage(plan, weighted_only, d1, out_dim, dw)
    acc = ttp._acc(x.dtype)
    csr = deterministic and plan.mode != UVW  # node-parallel kernels for everything
    parts = len(plan.parts("bwd", weighted_only))
    g2 = torch.empty((parts * nch, e, d2), **opts)
    n1 = x.shape[0]
    with _device(x):
        if csr:
            tiles = -(-n1 // bz)
            g1 = (torch.empty if full1 else torch.zeros)((n1, d1), **opts)
            gw = (torch.empty if fullw else torch.zeros)((tiles if shared_w else e, dw), **opts)
            args = (g, x, attr, w, g1, g2, gw, edge_dst, src_perm, src_ptr, n1, e, n, _max_degree(src_ptr))
            args += (d2, sw, out_dim, d1, d2, dw)
            kw = dict(ACC=acc, BZ=bz, BU=bu, num_warps=ttp.warps("bwd"))
            kernels = [ttp.kernel(key, "conv_bwd_csr", weighted_only, d2, shared_w, p) for p in range(parts)]
            ttp.launch([(bwd, (tiles, nch), args, kw) for bwd in kernels])
        else:
            # edge tiles: x2's and the weights' gradients (each edge's own), and x1's gradient added
            # atomically into g1[src] or, deterministic (uvw plans), summed per source node afterwards
            tiles = -(-e // bz)
            if deterministic:
                g1 = (torch.empty if full1 else torch.zeros)((n1, d1), **opts)
            else:
                g1 = torch.zeros((n1, d1), dtype=_acc_dtype(x.dtype), device=x.device)
            gw = (torch.empty if fullw else torch.zeros)((tiles if shared_w else e, dw), **opts)
            src, dst = edge_src.clamp(0, n1 - 1), edge_dst.clamp(0, n - 1)
            kind = "conv_bwd_edges" if deterministic else "conv_bwd_atomic"
            kw = dict(ACC=acc, BZ=bz, BU=bu, num_warps=ttp.warps("bwd"))
            args = (g, x, attr, w, g1, g2, gw, src, dst, e, d1, d2, sw, out_dim, d1, d2, dw)
            launches = [
                (ttp.kernel(key, kind, weighted_only, d2, shared_w, part), (tiles, nch), args, kw)
                for part in range(parts)
            ]
            if deterministic:
                args = (g, attr, w, g1, edge_dst, src_perm, src_ptr, n1, e, n, _max_degree(src_ptr))
                args += (d2, sw, out_dim, d1)
                launches += [
                    (
                        ttp.kernel(key, "conv_bwd_x1_csr", weighted_only, part=part),
                        (-(-n1 // bz), nch),
                        args,
                        kw,
                    )
                    for part in range(parts)
                ]
            ttp.launch(launches)
            if not deterministic:
                g1 = g1.to(x.dtype)
    g2 = g2[0] if g2.shape[0] == 1 else g2.sum(0)
    if shared_w and gw.shape[0] != 1:
        gw = gw.sum(0, keepdim=True)
    return g1, g2, gw


@_conv_bwd_op.register_fake
def _(grad_out, x, edge_attr, weight, *rest):
    return torch.empty_like(x), torch.empty_like(edge_attr), torch.empty_like(weight)


def tensor_product_conv(
    x, edge_attr, weight, graph, paths, cg_ijk, cg_val, key, deterministic, out_dim, weighted_only=False
) -> Tensor:
    """``equikern.ops.tensor_product_conv`` on the Triton kernels of a registered plan."""
    return torch.ops.equikern.tensor_product_conv_triton.default(
        x, edge_attr, weight, *graph, paths, cg_ijk, cg_val, key, deterministic, out_dim, weighted_only
    )


def tensor_product_conv_backward(
    grad_out, x, edge_attr, weight, graph, paths, cg_ijk, cg_val, key, deterministic, weighted_only=False
):
    return torch.ops.equikern.tensor_product_conv_triton_backward.default(
        grad_out, x, edge_attr, weight, *graph, paths, cg_ijk, cg_val, key, deterministic, weighted_only
    )


def _fwd(x, attr, w, *plan_and_dims):
    *rest, out_dim, wo = plan_and_dims
    return torch.ops.equikern.tensor_product_conv_triton.default(x, attr, w, *rest, out_dim, wo)


def _bwd(g, x, attr, w, *plan_and_flag):
    return torch.ops.equikern.tensor_product_conv_triton_backward.default(g, x, attr, w, *plan_and_flag)


register_trilinear_autograd(_conv_op, _conv_bwd_op, _fwd, _bwd)


# -- the unfused route's reproducible sum (equikern::conv_segment_sum on CUDA) ------------------------------

_SEGMENT_SUM = """@triton.jit
def kernel(rows, perm, ptr, out, N, E, D, DMAX, ACC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nv = n < N
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = (c < D)[None, :]
    beg = tl.load(ptr + n, mask=nv, other=0)
    deg = tl.where(nv, tl.load(ptr + n + 1, mask=nv, other=0) - beg, 0)
    acc = tl.zeros([BN, BD], ACC)
    for t in range(0, DMAX):
        pos = beg + t
        ev = nv & (t < deg) & (pos >= 0) & (pos < E)
        e = tl.load(perm + pos, mask=ev, other=0).to(tl.int64)
        ev = ev & (e >= 0) & (e < E)
        acc += tl.load(rows + e[:, None] * D + c[None, :], mask=ev[:, None] & cm, other=0.0).to(ACC)
    om = nv[:, None] & cm
    tl.store(out + n.to(tl.int64)[:, None] * D + c[None, :], acc.to(out.dtype.element_ty), mask=om)
"""


def segment_sum(rows: Tensor, perm: Tensor, ptr: Tensor) -> Tensor:
    """out[n] = sum of rows[perm[t]] for t in [ptr[n], ptr[n + 1]), in that order, one program per tile of
    nodes x columns (float32 sums for 16-bit rows); every index is masked to its range. The kernel behind
    ``equikern::conv_segment_sum`` on CUDA (on the CPU under Triton's interpreter for the tests)."""
    n, (e, d) = ptr.shape[0] - 1, rows.shape
    out = torch.empty((n, d), dtype=rows.dtype, device=rows.device)
    if n == 0 or d == 0:
        return out
    bd = min(128, 1 << max(0, d - 1).bit_length())
    bn = 16
    kw = dict(ACC=ttp._acc(rows.dtype), BN=bn, BD=bd, num_warps=4)
    with _device(rows):
        kernel = ttp.load_kernel(_SEGMENT_SUM, "segment_sum")
        grid = (-(-n // bn), -(-d // bd))
        perm, ptr = perm.contiguous(), ptr.contiguous()
        kernel[grid](rows.contiguous(), perm, ptr, out, n, e, d, _max_degree(ptr), **kw)
    return out
