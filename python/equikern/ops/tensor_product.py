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


def register_trilinear_autograd(fwd_op, bwd_op, fwd, bwd) -> None:
    """Registers the derivatives of a trilinear product op and of its backward op.

    fwd_op(x1, x2, w, *plan, out_dim, weighted_only) -> out and bwd_op(grad_out, x1, x2, w, *plan,
    weighted_only) -> (g1, g2, gw) are the ops (``fwd``/``bwd`` call them); ``plan`` is any number of
    tensors and constants describing the product, passed through unchanged.
    """

    def split(plan):
        tensors = [p for p in plan if isinstance(p, Tensor)]
        consts = [None if isinstance(p, Tensor) else p for p in plan]
        return tensors, consts

    def join(tensors, consts):
        it = iter(tensors)
        return [next(it) if c is None else c for c in consts]

    def fwd_setup(ctx, inputs, output):
        x1, x2, weight, *plan, _, weighted_only = inputs
        tensors, ctx.consts = split(plan)
        ctx.save_for_backward(x1, x2, weight, *tensors)
        ctx.weighted_only = weighted_only

    def fwd_backward(ctx, grad):
        x1, x2, weight, *tensors = ctx.saved_tensors
        plan = join(tensors, ctx.consts)
        g1, g2, gw = bwd(grad, x1, x2, weight, *plan, ctx.weighted_only)
        return (g1, g2, gw) + (None,) * (len(plan) + 2)

    def bwd_setup(ctx, inputs, output):
        grad_out, x1, x2, weight, *plan, weighted_only = inputs
        tensors, ctx.consts = split(plan)
        ctx.save_for_backward(grad_out, x1, x2, weight, *tensors)
        ctx.weighted_only = weighted_only

    def bwd_backward(ctx, a1, a2, aw):
        """Derivative of (g1, g2, gw) = d<grad_out, TP(x1, x2, w)> in the direction (a1, a2, aw).

        With F(x1, x2, w, g) = <g, TP(x1, x2, w)>, the cotangents pair to
        S = F(a1, x2, w, g) + F(x1, a2, w, g) + F_w(x1, x2, aw, g), whose gradients are again forward
        products (for g) and backward products (for x1, x2, w). F_w keeps only the weighted paths:
        unweighted paths do not depend on w.
        """
        grad_out, x1, x2, w, *tensors = ctx.saved_tensors
        plan = join(tensors, ctx.consts)
        wo = ctx.weighted_only
        out_dim = grad_out.shape[1]
        d_gout = d_x1 = d_x2 = d_w = None
        if a1 is not None:  # F(a1, x2, w, g)
            d_gout = fwd(a1, x2, w, *plan, out_dim, wo)
            _, d_x2, d_w = bwd(grad_out, a1, x2, w, *plan, wo)
        if a2 is not None:  # F(x1, a2, w, g)
            t = fwd(x1, a2, w, *plan, out_dim, wo)
            d_gout = t if d_gout is None else d_gout + t
            d_x1, _, ew = bwd(grad_out, x1, a2, w, *plan, wo)
            d_w = ew if d_w is None else d_w + ew
        if aw is not None and w.numel() > 0:  # F_w(x1, x2, aw, g)
            t = fwd(x1, x2, aw, *plan, out_dim, True)
            d_gout = t if d_gout is None else d_gout + t
            e1, e2, _ = bwd(grad_out, x1, x2, aw, *plan, True)
            d_x1 = e1 if d_x1 is None else d_x1 + e1
            d_x2 = e2 if d_x2 is None else d_x2 + e2
        return (d_gout, d_x1, d_x2, d_w) + (None,) * (len(plan) + 1)

    torch.library.register_autograd(fwd_op, fwd_backward, setup_context=fwd_setup)
    torch.library.register_autograd(bwd_op, bwd_backward, setup_context=bwd_setup)


register_trilinear_autograd(
    "equikern::tensor_product", "equikern::tensor_product_backward", tensor_product, tensor_product_backward
)
