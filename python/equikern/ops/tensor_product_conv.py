"""Python face of ``torch.ops.equikern.tensor_product_conv`` and its backward: fake kernels and autograd.

out[n] = sum over edges e with edge_dst[e] = n of TP(x[edge_src[e]], edge_attr[e], weight[e]), TP the
tensor product of ``equikern.ops.tensor_product`` (same plan tables). The ops take the edge list with its
two groupings (``conv_graph``): by destination for the forward, by source for the backward. Like the
tensor product, the convolution is linear in each of (x, edge_attr, weight), so its backward is one fused op
and the backward of the backward is built from the same two ops.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from equikern.ops.tensor_product import register_trilinear_autograd


class ConvGraph(NamedTuple):
    """An edge list grouped by destination and by source (stable: edges keep their order in a group)."""

    edge_src: Tensor
    edge_dst: Tensor
    dst_perm: Tensor
    dst_ptr: Tensor
    src_perm: Tensor
    src_ptr: Tensor


def conv_csr(index: Tensor, size: int, name: str) -> tuple[Tensor, Tensor]:
    """(perm, ptr): index[perm] sorted stably, ptr[v]:ptr[v + 1] the edges of node v; checks the range."""
    return torch.ops.equikern.tensor_product_conv_csr.default(index, size, name)


def conv_graph(edge_src: Tensor, edge_dst: Tensor, num_src: int, num_dst: int) -> ConvGraph:
    """Both groupings of the edge list, built once per call (two O(E) counting sorts)."""
    dst_perm, dst_ptr = conv_csr(edge_dst, num_dst, "edge_dst")
    src_perm, src_ptr = conv_csr(edge_src, num_src, "edge_src")
    return ConvGraph(edge_src, edge_dst, dst_perm, dst_ptr, src_perm, src_ptr)


def tensor_product_conv(
    x: Tensor,
    edge_attr: Tensor,
    weight: Tensor,
    graph: ConvGraph,
    paths: Tensor,
    blocks: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    out_dim: int,
    weighted_only: bool = False,
) -> Tensor:
    """[num_dst, out_dim]: the messages TP(x[src], edge_attr, weight) summed by destination.

    weight is [E, num_weights] (per edge) or [1, num_weights] (shared).
    """
    return torch.ops.equikern.tensor_product_conv.default(
        x, edge_attr, weight, *graph, paths, blocks, cg_ijk, cg_val, out_dim, weighted_only
    )


def tensor_product_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    edge_attr: Tensor,
    weight: Tensor,
    graph: ConvGraph,
    paths: Tensor,
    blocks: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    weighted_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.equikern.tensor_product_conv_backward.default(
        grad_out, x, edge_attr, weight, *graph, paths, blocks, cg_ijk, cg_val, weighted_only
    )


@torch.library.register_fake("equikern::tensor_product_conv_csr")
def _(index, size, name):
    torch._check(index.dim() == 1, lambda: f"tensor_product_conv: {name} must be 1-D")
    return index.new_empty(index.shape), index.new_empty((size + 1,))


@torch.library.register_fake("equikern::tensor_product_conv")
def _(x, edge_attr, weight, src, dst, dst_perm, dst_ptr, src_perm, src_ptr, *plan_and_flags):
    out_dim = plan_and_flags[4]
    torch._check(x.dim() == 2 and edge_attr.dim() == 2 and weight.dim() == 2)
    return x.new_empty((dst_ptr.shape[0] - 1, out_dim))


@torch.library.register_fake("equikern::tensor_product_conv_backward")
def _(grad_out, x, edge_attr, weight, *rest):
    torch._check(grad_out.dim() == 2)
    return torch.empty_like(x), torch.empty_like(edge_attr), torch.empty_like(weight)


def _conv_csr_cuda(index: Tensor, size: int, name: str) -> tuple[Tensor, Tensor]:
    """The grouping on the GPU: a stable sort and a histogram (the CPU op is a counting sort in C++)."""
    if index.dim() != 1 or index.dtype != torch.int64:
        raise RuntimeError(
            f"tensor_product_conv: {name} must be a 1-D int64 tensor, got {index.dtype} {tuple(index.shape)}"
        )
    if size < 0:
        raise RuntimeError(f"tensor_product_conv: the number of nodes for {name} must be >= 0, got {size}")
    if index.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            e = int(torch.nonzero(index == bad)[0, 0])
            raise RuntimeError(f"tensor_product_conv: {name}[{e}] = {bad} is out of range [0, {size})")
    perm = torch.sort(index, stable=True).indices
    ptr = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    ptr[1:] = torch.cumsum(torch.bincount(index, minlength=size), 0)
    return perm, ptr


# (registered by a call: the decorator form returns None, and the tests call the function on CPU tensors)
torch.library.impl("equikern::tensor_product_conv_csr", "CUDA")(_conv_csr_cuda)


# Linear in each of (x, edge_attr, weight): the derivatives of the tensor product's ops, with the graph
# passed through like the plan.
register_trilinear_autograd(
    "equikern::tensor_product_conv",
    "equikern::tensor_product_conv_backward",
    lambda x, a, w, *rest: torch.ops.equikern.tensor_product_conv.default(x, a, w, *rest),
    lambda g, x, a, w, *rest: torch.ops.equikern.tensor_product_conv_backward.default(g, x, a, w, *rest),
)


# -- the unfused route's gather and reproducible sum ---------------------------------------------------
# Where no fused kernel covers a plan on a GPU, ``TensorProductConv`` gathers x[src], runs the tensor product
# on the per-edge rows and sums the messages by destination. ``index_add_`` is not reproducible on CUDA (float
# atomics), and neither is the backward of ``index_select`` (it is an ``index_add_``), so the route uses two
# ops that are each other's derivative: a gather whose backward is a sum over a grouping, and a sum over a
# grouping (in edge order, one thread per output element) whose backward is a gather.


def _check_grouping(op: str, rows: Tensor, index: Tensor, perm: Tensor, ptr: Tensor) -> None:
    if rows.dim() != 2:
        raise ValueError(f"{op}: rows must be 2-D [rows, columns], got shape {tuple(rows.shape)}")
    for t, name in ((index, "index"), (perm, "perm"), (ptr, "ptr")):
        if t.dim() != 1 or t.dtype != torch.int64 or t.device != rows.device:
            raise ValueError(
                f"{op}: {name} must be a 1-D int64 tensor on {rows.device}, got {t.dtype} "
                f"{tuple(t.shape)} on {t.device}"
            )
    if perm.shape[0] != index.shape[0] or ptr.shape[0] < 1:
        raise ValueError(f"{op}: perm must have one entry per index ({index.shape[0]}) and ptr at least one")


@torch.library.custom_op("equikern::conv_segment_sum", mutates_args=())
def conv_segment_sum(rows: Tensor, index: Tensor, perm: Tensor, ptr: Tensor) -> Tensor:
    """out[n] = sum of rows[e] over the e with index[e] = n ([ptr.shape[0] - 1, columns]), summed in the
    order of e: (perm, ptr) is ``conv_csr(index, ...)``. Bitwise reproducible: on a GPU a Triton kernel
    walks each node's group in order (no atomics), on the CPU ``index_add_`` is sequential."""
    _check_grouping("conv_segment_sum", rows, index, perm, ptr)
    if rows.shape[0] != index.shape[0]:
        raise ValueError(f"conv_segment_sum: rows has {rows.shape[0]} rows, index {index.shape[0]} entries")
    if rows.is_cuda:
        from equikern.triton.tensor_product_conv import segment_sum

        return segment_sum(rows, perm, ptr)
    return rows.new_zeros((ptr.shape[0] - 1, rows.shape[1])).index_add_(0, index, rows)


@torch.library.custom_op("equikern::conv_gather", mutates_args=())
def conv_gather(x: Tensor, index: Tensor, perm: Tensor, ptr: Tensor) -> Tensor:
    """x[index] ([index.shape[0], columns]); its derivative sums by ``conv_segment_sum`` over the grouping
    (perm, ptr) of index, so that it too is reproducible."""
    _check_grouping("conv_gather", x, index, perm, ptr)
    if ptr.shape[0] != x.shape[0] + 1:
        raise ValueError(f"conv_gather: ptr must have x.shape[0] + 1 = {x.shape[0] + 1} entries")
    return x.index_select(0, index)


@conv_segment_sum.register_fake
def _(rows, index, perm, ptr):
    return rows.new_empty((ptr.shape[0] - 1, rows.shape[1]))


@conv_gather.register_fake
def _(x, index, perm, ptr):
    return x.new_empty((index.shape[0], x.shape[1]))


def _grouping_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


def _segment_sum_backward(ctx, grad):
    index, perm, ptr = ctx.saved_tensors
    return conv_gather(grad, index, perm, ptr), None, None, None


def _gather_backward(ctx, grad):
    index, perm, ptr = ctx.saved_tensors
    return conv_segment_sum(grad, index, perm, ptr), None, None, None


conv_segment_sum.register_autograd(_segment_sum_backward, setup_context=_grouping_context)
conv_gather.register_autograd(_gather_backward, setup_context=_grouping_context)
