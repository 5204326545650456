"""Python face of the Gaunt grid ops ``torch.ops.equikern.gaunt_*``: fake kernels and autograd.

The plan tensors (Legendre factors ``p*`` [n_theta, (L+1)^2] and the trig table [n_phi, 2 mmax + 1])
come from :mod:`equikern.gaunt`. With S_p the map from coefficients to grid values built from p, the
ops are out = S_pc^T (S_pa a * S_pb b), grid = S_p x and x = S_p^T grid. The product is bilinear, so
its gradients are the same op with the plan tensors exchanged (grad a = S_pa^T (S_pb b * S_pc g)),
and the grid maps are each other's adjoints: derivatives of any order follow.
"""

import torch
from torch import Tensor


def gaunt_grid_product(a: Tensor, b: Tensor, pa: Tensor, pb: Tensor, pc: Tensor, trig: Tensor) -> Tensor:
    """[N, C, da] x [N, C or 1, db] -> [N, C, dc]: S_pc^T (S_pa a * S_pb b), fused (no grid in memory)."""
    return torch.ops.equikern.gaunt_grid_product.default(a, b, pa, pb, pc, trig)


def gaunt_to_grid(x: Tensor, p: Tensor, trig: Tensor) -> Tensor:
    """[R, d] -> [R, n_theta, n_phi]: grid values S_p x."""
    return torch.ops.equikern.gaunt_to_grid.default(x, p, trig)


def gaunt_from_grid(grid: Tensor, p: Tensor, trig: Tensor) -> Tensor:
    """[R, n_theta, n_phi] -> [R, d]: the adjoint S_p^T grid (a projection when p carries the weights)."""
    return torch.ops.equikern.gaunt_from_grid.default(grid, p, trig)


@torch.library.register_fake("equikern::gaunt_grid_product")
def _(a, b, pa, pb, pc, trig):
    torch._check(a.dim() == 3 and b.dim() == 3 and pc.dim() == 2)
    return a.new_empty((a.shape[0], a.shape[1], pc.shape[1]))


@torch.library.register_fake("equikern::gaunt_to_grid")
def _(x, p, trig):
    torch._check(x.dim() == 2 and p.dim() == 2 and trig.dim() == 2)
    return x.new_empty((x.shape[0], p.shape[0], trig.shape[0]))


@torch.library.register_fake("equikern::gaunt_from_grid")
def _(grid, p, trig):
    torch._check(grid.dim() == 3 and p.dim() == 2)
    return grid.new_empty((grid.shape[0], p.shape[1]))


def _product_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _product_backward(ctx, grad):
    a, b, pa, pb, pc, trig = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = gaunt_grid_product(grad, b, pc, pb, pa, trig)
    if ctx.needs_input_grad[1]:
        grad_b = gaunt_grid_product(grad, a, pc, pa, pb, trig)
        if b.shape[1] != a.shape[1]:  # b shared by all channels
            grad_b = grad_b.sum(1, keepdim=True)
    return grad_a, grad_b, None, None, None, None


torch.library.register_autograd(
    "equikern::gaunt_grid_product", _product_backward, setup_context=_product_setup
)


def _grid_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _to_grid_backward(ctx, grad):
    p, trig = ctx.saved_tensors
    return gaunt_from_grid(grad, p, trig), None, None


def _from_grid_backward(ctx, grad):
    p, trig = ctx.saved_tensors
    return gaunt_to_grid(grad, p, trig), None, None


torch.library.register_autograd("equikern::gaunt_to_grid", _to_grid_backward, setup_context=_grid_setup)
torch.library.register_autograd("equikern::gaunt_from_grid", _from_grid_backward, setup_context=_grid_setup)
