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


_PLAN = slice(9, 13)  # paths, blocks, cg_ijk, cg_val in the forward's inputs


def _fwd_setup(ctx, inputs, output):
    x, attr, weight = inputs[:3]
    ctx.save_for_backward(x, attr, weight, *inputs[3:9], *inputs[_PLAN])
    ctx.weighted_only = inputs[14]


def _fwd_backward(ctx, grad):
    x, attr, weight, *rest = ctx.saved_tensors
    graph, plan = ConvGraph(*rest[:6]), rest[6:]
    gx, ga, gw = tensor_product_conv_backward(grad, x, attr, weight, graph, *plan, ctx.weighted_only)
    return (gx, ga, gw) + (None,) * 12


torch.library.register_autograd("equikern::tensor_product_conv", _fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.weighted_only = inputs[-1]


def _bwd_backward(ctx, a_x, a_attr, a_w):
    """Derivative of (gx, gattr, gw) = d<grad_out, conv(x, attr, w)> in the direction (a_x, a_attr, a_w).

    As for the tensor product: with F(x, attr, w, g) = <g, conv(x, attr, w)>, the cotangents pair to
    F(a_x, attr, w, g) + F(x, a_attr, w, g) + F_w(x, attr, a_w, g), whose gradients are convolutions (for g)
    and convolution backwards (for x, attr, w); F_w keeps only the weighted paths.
    """
    grad_out, x, attr, w, *rest = ctx.saved_tensors
    graph, plan = ConvGraph(*rest[:6]), rest[6:]
    wo = ctx.weighted_only
    out_dim = grad_out.shape[1]
    d_gout = d_x = d_attr = d_w = None
    if a_x is not None:  # F(a_x, attr, w, g)
        d_gout = tensor_product_conv(a_x, attr, w, graph, *plan, out_dim, wo)
        _, d_attr, d_w = tensor_product_conv_backward(grad_out, a_x, attr, w, graph, *plan, wo)
    if a_attr is not None:  # F(x, a_attr, w, g)
        t = tensor_product_conv(x, a_attr, w, graph, *plan, out_dim, wo)
        d_gout = t if d_gout is None else d_gout + t
        d_x, _, e_w = tensor_product_conv_backward(grad_out, x, a_attr, w, graph, *plan, wo)
        d_w = e_w if d_w is None else d_w + e_w
    if a_w is not None and w.numel() > 0:  # F_w(x, attr, a_w, g)
        t = tensor_product_conv(x, attr, a_w, graph, *plan, out_dim, True)
        d_gout = t if d_gout is None else d_gout + t
        e_x, e_attr, _ = tensor_product_conv_backward(grad_out, x, attr, a_w, graph, *plan, True)
        d_x = e_x if d_x is None else d_x + e_x
        d_attr = e_attr if d_attr is None else d_attr + e_attr
    return (d_gout, d_x, d_attr, d_w) + (None,) * 11


torch.library.register_autograd(
    "equikern::tensor_product_conv_backward", _bwd_backward, setup_context=_bwd_setup
)
