"""Fused message passing (anchors.json "conv"): equikern.TensorProductConv against e3nn unfused and the peers.

The problem: out[dst] += TP(x[src], sh(edge_vec), w_edge) over the edges of a periodic diamond carbon lattice
(conventional cubic cell a = 3.567 A, 8 atoms, n x n x n cells) with every pair of atoms within 3.0 A an edge
in both directions (28 neighbours per atom: 163296 edges at the anchors' 9 x 9 x 9 cells). TP is the
channelwise product of the mace-large and nequip-lips rows of anchors.json "tensor_product" (construction of
bench/tensor_product.py), and the fully connected (uvw) product of its DiffDock-L=2 row (no published
figures: equikern and e3nn only, the peers' adapters here being written for channelwise products), with
per-edge weights; edge attributes are the real spherical harmonics of the
edge vectors (e3nn's "component" normalisation). Inputs: node features, edge attributes and weights (all
differentiated in fwdbwd and dblbwd), edge_src and edge_dst.

Implementations (the anchors' names, so that their published figures line up):

- e3nn_unfused, the reference: gather x[src], e3nn o3.TensorProduct, index_add_.
- equikern: TensorProductConv (backend "auto"), which never stores the [E, dim_out] messages; on CUDA it runs
  Triton kernels adding messages with atomics. equikern_deterministic (CUDA only): deterministic=True, the
  kernels that walk the edges grouped by destination (on a CPU both modes are the same code).
- cue_fused_indices (CUDA only): cuEquivariance's ChannelWiseTensorProduct called with indices_1=edge_src
  (gathers x), indices_out=edge_dst and size_out (scatters the output), ir_mul layout, its default method.
- oeq_atomic, oeq_deterministic (CUDA only): OpenEquivariance's TensorProductConv(problem, deterministic=...)
  with rows = edge_dst (receivers) and cols = edge_src (senders); the deterministic kernel gets the edges
  sorted by (row, col), edge attributes and weights permuted alike, and the permutation that lists the sorted
  edges by (col, row) (OpenEquivariance's "transpose permutation").

The peers' adapters convert the inputs (layouts, weight order, edge order) once, outside the timed region;
their outputs and gradients are compared with the reference's (or, where e3nn_unfused cannot run, e.g. out of
memory, with equikern's) before they are timed.

Size: ``--cells n`` (default 9, the anchors' lattice, on a GPU; 3 on a CPU, 216 atoms and 6048 edges, since
e3nn's unfused mace-large product takes seconds on the full lattice; 2 with --quick). ``--batch`` does not
change the lattice.
"""

import torch
from e3nn import o3
from torch import Tensor

from equikern.bench import Case, Config, Impl, Unavailable, anchors, io_floor
from equikern.bench.tensor_product import (
    cue_module,
    equikern_route,
    from_ir_mul,
    import_oeq,
    oeq_problem,
    oeq_weight_perm,
    tensor_product_arguments,
    to_ir_mul,
)

FAMILY = "conv"
LATTICE_CONSTANT = 3.567  # diamond carbon, A
CUTOFF = 3.0  # A
_CELLS, _CPU_CELLS = 9, 3
_BASIS = (
    torch.tensor(
        [[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0], [1, 1, 1], [1, 3, 3], [3, 1, 3], [3, 3, 1]],
        dtype=torch.float64,
    )
    / 4
)


def diamond_lattice(cells: int) -> tuple[Tensor, Tensor, Tensor]:
    """(edge_src, edge_dst, edge_vec) of the periodic cells^3 diamond lattice, edges within CUTOFF."""
    if cells * LATTICE_CONSTANT < 2 * CUTOFF:
        raise ValueError(f"cells: the box of {cells} cells is smaller than twice the cutoff")
    grid = torch.stack(torch.meshgrid(*[torch.arange(cells, dtype=torch.float64)] * 3, indexing="ij"), -1)
    pos = ((grid.reshape(-1, 1, 3) + _BASIS) * LATTICE_CONSTANT).reshape(-1, 3)
    box = cells * LATTICE_CONSTANT
    src, dst, vec = [], [], []
    for start in range(0, len(pos), 512):  # chunks of rows: the full distance matrix is 34 M pairs at n = 9
        d = pos[None, :] - pos[start : start + 512, None]
        d -= box * torch.round(d / box)
        i, j = torch.nonzero((d.norm(dim=-1) < CUTOFF) & (d.abs().sum(-1) > 0), as_tuple=True)
        src.append(i + start)
        dst.append(j)
        vec.append(d[i, j])
    return torch.cat(src), torch.cat(dst), torch.cat(vec)


def _cells(cfg: Config) -> int:
    if cfg.cells is not None:
        return cfg.cells
    if cfg.quick:
        return 2
    return _CPU_CELLS if cfg.hardware == "cpu" else _CELLS


def oeq_edges(
    src: Tensor, dst: Tensor, num_nodes: int, deterministic: bool
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """(order, rows, cols, transpose_perm): the edge list as OpenEquivariance's TensorProductConv takes it.

    rows are the receivers (dst), cols the senders (src). For the atomic kernel the edges keep their order
    (order and transpose_perm None). For the deterministic one they are sorted by (row, col): edge k of the
    sorted list is edge order[k] of the input; transpose_perm lists the sorted edges by (col, row), so that
    cols[transpose_perm] is sorted (what OpenEquivariance's CoordGraph computes).
    """
    if not deterministic:
        return None, dst, src, None
    order = torch.argsort(dst * num_nodes + src, stable=True)
    rows, cols = dst[order], src[order]
    return order, rows, cols, torch.argsort(cols * num_nodes + rows, stable=True)


def oeq_conv_adapter(module, weight_perm: Tensor, deterministic: bool, num_nodes: int) -> Impl:
    """An Impl calling ``module(X, Y, W, rows, cols[, transpose_perm])``, OpenEquivariance's forward.

    Edge attributes and weights follow the edges into the kernel's order (a differentiable gather, so their
    gradients come back in the reference's edge order), weights into the module's order (``weight_perm``).
    """

    def to_native(xs):
        x, attr, w, src, dst = xs
        order, rows, cols, transpose_perm = oeq_edges(src, dst, num_nodes, deterministic)
        if order is not None:
            attr, w = attr[order], w[order]
        native = (x, attr, w[..., weight_perm], rows, cols)
        return (*native, transpose_perm) if deterministic else native

    return Impl(lambda *xs: module(*xs), to_native)


# Cases beyond the anchors' rows (no published figures): the messages of DiffDock's fully connected (uvw)
# product, as its TensorProductConvLayer computes them, per-edge weights.
EXTRA_ROWS = [{"label": "DiffDock-L=2", "atoms": 8 * _CELLS**3}]


def cases(cfg: Config) -> list[Case]:
    """One case per row of anchors.json "conv" (the messages of that row's tensor-product problem), and
    per EXTRA_ROWS."""
    problems = {p["label"]: p for p in anchors()["tensor_product"]}
    return [_case(row, problems[row["label"]], cfg) for row in anchors()["conv"]["rows"] + EXTRA_ROWS]


def _case(row: dict, problem: dict, cfg: Config, cue_method: str | None = None) -> Case:
    """The case of one anchors row; ``cue_method`` runs cuEquivariance with that method, on a CPU too."""
    args = tensor_product_arguments(problem)
    if problem["mode"] not in ("uvu", "uvw") or args["shared_weights"]:
        raise ValueError(f"{row['label']}: the convolution benchmark takes uvu or uvw per-edge products")
    n1, n2, n_out, n_w = problem["dims_in1_in2_out_weights"]
    cells = _cells(cfg)
    atoms = 8 * cells**3
    like = {"device": cfg.device, "dtype": cfg.dtype}
    lattice = {}

    def graph() -> tuple[Tensor, Tensor, Tensor]:
        if not lattice:
            src, dst, vec = diamond_lattice(cells)
            sh = o3.spherical_harmonics(args["irreps_in2"], vec, normalize=True, normalization="component")
            lattice.update(src=src.to(cfg.device), dst=dst.to(cfg.device), sh=sh.to(**like))
        return lattice["src"], lattice["dst"], lattice["sh"]

    def inputs() -> tuple[Tensor, ...]:
        src, dst, sh = graph()
        edges = len(src)
        x, w = torch.randn(atoms, n1, **like), torch.randn(edges, n_w, **like)
        return x, sh.clone(), w, src, dst

    def e3nn_unfused() -> Impl:
        tp = o3.TensorProduct(**args).to(**like)

        def conv(x, attr, w, src, dst):
            messages = tp(x[src], attr, w)
            return torch.zeros(atoms, n_out, **like).index_add_(0, dst, messages)

        return Impl(conv)

    def equikern_impl(deterministic: bool = False) -> Impl:
        import equikern

        module = equikern.TensorProductConv(**args, deterministic=deterministic).to(**like)
        note = f"route={equikern_route(module, cfg)}, deterministic={deterministic}"
        return Impl(lambda x, attr, w, src, dst: module(x, attr, w, src, dst, atoms), note=note)

    def cue_impl() -> Impl:
        if cfg.device.type != "cuda" and cue_method is None:
            raise Unavailable("needs CUDA: cuEquivariance's fused convolution runs its kernels only on a GPU")
        module, perm = cue_module(problem, args, cfg, method=cue_method)

        def to_native(xs):
            x, attr, w, src, dst = xs
            return (
                to_ir_mul(x, args["irreps_in1"]),
                to_ir_mul(attr, args["irreps_in2"]),
                w[..., perm],
                src,
                dst,
            )

        def conv(x, attr, w, src, dst):
            return module(x, attr, w, indices_1=src, indices_out=dst, size_out=atoms)

        return Impl(conv, to_native, lambda out: from_ir_mul(out, args["irreps_out"]))

    def oeq_impl(deterministic: bool) -> Impl:
        if cfg.device.type != "cuda":
            raise Unavailable("needs CUDA: OpenEquivariance's TensorProductConv runs only on a GPU")
        oeq = import_oeq()
        module = oeq.TensorProductConv(oeq_problem(args, cfg), deterministic=deterministic, torch_op=True)
        return oeq_conv_adapter(module, oeq_weight_perm(module, n_w, False, cfg.device), deterministic, atoms)

    impls = {
        "equikern": equikern_impl,
        "e3nn_unfused": e3nn_unfused,
        "cue_fused_indices": cue_impl,
        "oeq_atomic": lambda: oeq_impl(False),
        "oeq_deterministic": lambda: oeq_impl(True),
    }
    if problem["mode"] != "uvu":  # the peers' adapters here are written for their channelwise convolutions
        for name in ("cue_fused_indices", "oeq_atomic", "oeq_deterministic"):
            del impls[name]
    if cfg.device.type == "cuda":
        impls["equikern_deterministic"] = lambda: equikern_impl(True)

    # the diamond lattice's neighbours within 3.0 A (asserted in tests/test_tensor_product_conv.py)
    edges = 28 * atoms
    itemsize = cfg.dtype.itemsize
    in_bytes = (atoms * n1 + edges * (n2 + n_w)) * itemsize
    published = {}
    if cfg.hardware == "h100" and cfg.dtype == torch.float32 and atoms == row["atoms"]:
        # impl -> mode -> ms, and the anchors' peak memory of forward+backward as "fwdbwd_peak_GB"
        for impl, figs in row.items():
            if isinstance(figs, dict):
                published[impl] = {mode: figs[f"{mode}_ms"] for mode in ("fwd", "fwdbwd")}
                if "peak_GB" in figs:
                    published[impl]["fwdbwd_peak_GB"] = figs["peak_GB"]
    return Case(
        family=FAMILY,
        label=f"conv-{row['label']}",
        params={
            "messages": row["label"],
            "cells": cells,
            "atoms": atoms,
            "edges": edges,
            "irreps_in1": args["irreps_in1"],
            "irreps_in2": args["irreps_in2"],
            "irreps_out": args["irreps_out"],
            "weights": "per-edge",
            "dims_in1_in2_out_weights": problem["dims_in1_in2_out_weights"],
            "avg_neighbours": edges / atoms,
            "floor_note": "bytes of features, attributes, weights and output once (indices not counted)",
        },
        inputs=inputs,
        impls=impls,
        floor_bytes=io_floor(in_bytes, atoms * n_out * itemsize),
        reference="e3nn_unfused",
        fallback_reference="equikern",
        published=published,
        batch=atoms,
    )
