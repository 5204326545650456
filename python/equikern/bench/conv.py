"""Fused message passing (anchors.json "conv"): equikern.TensorProductConv against e3nn unfused.

The problem: out[dst] += TP(x[src], sh(edge_vec), w_edge) over the edges of a periodic diamond carbon lattice
(conventional cubic cell a = 3.567 A, 8 atoms, n x n x n cells) with every pair of atoms within 3.0 A an edge
in both directions (28 neighbours per atom: 163296 edges at the anchors' 9 x 9 x 9 cells). TP is the
channelwise product of the mace-large and nequip-lips rows of anchors.json "tensor_product" (construction of
bench/tensor_product.py), with per-edge weights; edge attributes are the real spherical harmonics of the
edge vectors (e3nn's "component" normalisation). Inputs: node features, edge attributes and weights (all
differentiated in fwdbwd), edge_src and edge_dst.

Implementations: e3nn_unfused (the reference: gather x[src], e3nn o3.TensorProduct, index_add_) and equikern
(TensorProductConv, which never stores the [E, dim_out] messages; on a CPU its default and deterministic modes
are the same code). Size: --batch B asks for about B atoms (n = round((B / 8)^(1/3)), at least 2 so that the
cutoff is below half the box); without it n = 9 (the anchors' lattice), or n = 3 on a CPU (216 atoms, 6048
edges: e3nn's unfused mace-large product takes seconds on the full lattice).
"""

import torch
from e3nn import o3
from torch import Tensor

from equikern.bench import Case, Config, Impl, anchors, io_floor
from equikern.bench.tensor_product import tensor_product_arguments

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
    if cfg.batch_given:
        return max(2, round((cfg.batch / 8) ** (1 / 3)))
    return _CPU_CELLS if cfg.hardware == "cpu" else _CELLS


def cases(cfg: Config) -> list[Case]:
    """One case per row of anchors.json "conv" (the messages of that row's tensor-product problem)."""
    problems = {p["label"]: p for p in anchors()["tensor_product"]}
    return [_case(row, problems[row["label"]], cfg) for row in anchors()["conv"]["rows"]]


def _case(row: dict, problem: dict, cfg: Config) -> Case:
    args = tensor_product_arguments(problem)
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

    def equikern_impl() -> Impl:
        import equikern

        module = equikern.TensorProductConv(**args).to(**like)
        return Impl(lambda x, attr, w, src, dst: module(x, attr, w, src, dst, atoms))

    edges = (
        28 * atoms
    )  # the diamond lattice's neighbours within 3.0 A (asserted in tests/test_tensor_product_conv.py)
    itemsize = cfg.dtype.itemsize
    in_bytes = (atoms * n1 + edges * (n2 + n_w)) * itemsize
    published = {}
    if cfg.hardware == "h100" and cfg.dtype == torch.float32 and atoms == row["atoms"]:
        published = {
            impl: {mode: figs[f"{mode}_ms"] for mode in ("fwd", "fwdbwd")}
            for impl, figs in row.items()
            if isinstance(figs, dict)
        }
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
        impls={"equikern": equikern_impl, "e3nn_unfused": e3nn_unfused},
        floor_bytes=io_floor(in_bytes, atoms * n_out * itemsize),
        reference="e3nn_unfused",
        published=published,
        batch=atoms,
    )
