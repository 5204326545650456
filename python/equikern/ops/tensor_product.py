"""Python face of ``torch.ops.equikern.tensor_product`` and its backward: fake kernels and autograd.

The forward is trilinear in (x1, x2, weight), so its backward is a fused op computing the three
gradients, and the backward of the backward is built from the same two ops: that is what makes
second derivatives (forces in training) work through any number of levels.
"""

import torch
from torch import Tensor


def tensor_product(
    x1: Tensor,
    x2: Tensor,
    weight: Tensor,
    paths: Tensor,
    blocks: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    out_dim: int,
    weighted_only: bool = False,
) -> Tensor:
    """out[z] = sum over paths of the CG product of x1[z], x2[z] and weight[z] ([Z or 1, dim] each).

    weighted_only=True keeps only the weighted paths (the derivative in the direction of weight).
    """
    return torch.ops.equikern.tensor_product.default(
        x1, x2, weight, paths, blocks, cg_ijk, cg_val, out_dim, weighted_only
    )


def tensor_product_backward(
    grad_out: Tensor,
    x1: Tensor,
    x2: Tensor,
    weight: Tensor,
    paths: Tensor,
    blocks: Tensor,
    cg_ijk: Tensor,
    cg_val: Tensor,
    weighted_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.equikern.tensor_product_backward.default(
        grad_out, x1, x2, weight, paths, blocks, cg_ijk, cg_val, weighted_only
    )


def _batch(*ts: Tensor):
    """Common leading size of operands of leading size Z or 1 (0 if any is empty)."""
    z = 1
    for t in ts:
        if t.shape[0] != 1:
            z = t.shape[0]
    for t in ts:
        if t.shape[0] == 0:
            z = 0
    return z


@torch.library.register_fake("equikern::tensor_product")
def _(x1, x2, weight, paths, blocks, cg_ijk, cg_val, out_dim, weighted_only=False):
    torch._check(x1.dim() == 2 and x2.dim() == 2 and weight.dim() == 2)
    return x1.new_empty((_batch(x1, x2, weight), out_dim))


@torch.library.register_fake("equikern::tensor_product_backward")
def _(grad_out, x1, x2, weight, paths, blocks, cg_ijk, cg_val, weighted_only=False):
    torch._check(grad_out.dim() == 2)
    return torch.empty_like(x1), torch.empty_like(x2), torch.empty_like(weight)


def _fwd_setup(ctx, inputs, output):
    x1, x2, weight, paths, blocks, cg_ijk, cg_val, _, weighted_only = inputs
    ctx.save_for_backward(x1, x2, weight, paths, blocks, cg_ijk, cg_val)
    ctx.weighted_only = weighted_only


def _fwd_backward(ctx, grad):
    x1, x2, weight, paths, blocks, cg_ijk, cg_val = ctx.saved_tensors
    g1, g2, gw = tensor_product_backward(
        grad, x1, x2, weight, paths, blocks, cg_ijk, cg_val, ctx.weighted_only
    )
    return g1, g2, gw, None, None, None, None, None, None


torch.library.register_autograd("equikern::tensor_product", _fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.weighted_only = inputs[-1]


def _bwd_backward(ctx, a1, a2, aw):
    """Derivative of (g1, g2, gw) = d<grad_out, TP(x1, x2, w)> in the direction (a1, a2, aw).

    With F(x1, x2, w, g) = <g, TP(x1, x2, w)>, the cotangents pair to
    S = F(a1, x2, w, g) + F(x1, a2, w, g) + F_w(x1, x2, aw, g), whose gradients are again forward
    products (for g) and backward products (for x1, x2, w). F_w keeps only the weighted paths:
    unweighted paths do not depend on w.
    """
    grad_out, x1, x2, w, paths, blocks, cg_ijk, cg_val = ctx.saved_tensors
    plan = (paths, blocks, cg_ijk, cg_val)
    wo = ctx.weighted_only
    out_dim = grad_out.shape[1]
    d_gout = d_x1 = d_x2 = d_w = None
    if a1 is not None:  # F(a1, x2, w, g)
        d_gout = tensor_product(a1, x2, w, *plan, out_dim, wo)
        _, e2, ew = tensor_product_backward(grad_out, a1, x2, w, *plan, wo)
        d_x2, d_w = e2, ew
    if a2 is not None:  # F(x1, a2, w, g)
        t = tensor_product(x1, a2, w, *plan, out_dim, wo)
        d_gout = t if d_gout is None else d_gout + t
        e1, _, ew = tensor_product_backward(grad_out, x1, a2, w, *plan, wo)
        d_x1 = e1
        d_w = ew if d_w is None else d_w + ew
    if aw is not None and w.numel() > 0:  # F_w(x1, x2, aw, g)
        t = tensor_product(x1, x2, aw, *plan, out_dim, True)
        d_gout = t if d_gout is None else d_gout + t
        e1, e2, _ = tensor_product_backward(grad_out, x1, x2, aw, *plan, True)
        d_x1 = e1 if d_x1 is None else d_x1 + e1
        d_x2 = e2 if d_x2 is None else d_x2 + e2
    return d_gout, d_x1, d_x2, d_w, None, None, None, None, None


torch.library.register_autograd("equikern::tensor_product_backward", _bwd_backward, setup_context=_bwd_setup)
