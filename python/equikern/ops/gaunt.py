"""Python face of the Gaunt ops ``torch.ops.equikern.gaunt_*``: fake kernels and autograd.

Products take operands [N, C, (L+1)^2] (the second may have one channel, shared by all) stored in the
channel layout, or with ``flat=True`` in e3nn's flat layout (per-degree blocks [C, 2l+1]); every tensor of
one call, gradients included, is in the same layout.

Grid ops: the plan tensors (Legendre factors ``p*`` [n_theta, (L+1)^2] and the trig table
[n_phi, 2 mmax + 1]) come from :mod:`equikern.gaunt`. With S_p the map from coefficients to grid values
built from p, the ops are out = S_pc^T (S_pa a * S_pb b), grid = S_p x and x = S_p^T grid. The product is
bilinear, so its gradients are the same op with the plan tensors exchanged
(grad a = S_pa^T (S_pb b * S_pc g)), and the grid maps are each other's adjoints: derivatives of any order
follow.

Dense ops: ``index`` [nnz, 3] and ``value`` [nnz] list the nonzero Gaunt coefficients G[i, j, k]
(grouped by k for speed); out[k] = sum G a[i] b[j]. Its backward is one fused op returning both input
gradients, and that op's own derivatives are the two ops again (see ``_dense_backward_backward``).
"""

import torch
from torch import Tensor


def gaunt_grid_product(
    a: Tensor, b: Tensor, pa: Tensor, pb: Tensor, pc: Tensor, trig: Tensor, flat: bool = False
) -> Tensor:
    """[N, C, da] x [N, C or 1, db] -> [N, C, dc]: S_pc^T (S_pa a * S_pb b), fused (no grid in memory)."""
    return torch.ops.equikern.gaunt_grid_product.default(a, b, pa, pb, pc, trig, flat)


def gaunt_dense_product(
    a: Tensor, b: Tensor, index: Tensor, value: Tensor, lmax_out: int, flat: bool = False
) -> Tensor:
    """[N, C, da] x [N, C or 1, db] -> [N, C, (lmax_out+1)^2]: out[k] = sum G[i, j, k] a[i] b[j]."""
    return torch.ops.equikern.gaunt_dense_product.default(a, b, index, value, lmax_out, flat)


def gaunt_dense_backward(
    grad: Tensor, a: Tensor, b: Tensor, index: Tensor, value: Tensor, flat: bool = False
) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_b) of gaunt_dense_product for the output gradient ``grad``, in one pass."""
    return torch.ops.equikern.gaunt_dense_backward.default(grad, a, b, index, value, flat)


def gaunt_to_grid(x: Tensor, p: Tensor, trig: Tensor) -> Tensor:
    """[R, d] -> [R, n_theta, n_phi]: grid values S_p x."""
    return torch.ops.equikern.gaunt_to_grid.default(x, p, trig)


def gaunt_from_grid(grid: Tensor, p: Tensor, trig: Tensor) -> Tensor:
    """[R, n_theta, n_phi] -> [R, d]: the adjoint S_p^T grid (a projection when p carries the weights)."""
    return torch.ops.equikern.gaunt_from_grid.default(grid, p, trig)


@torch.library.register_fake("equikern::gaunt_grid_product")
def _(a, b, pa, pb, pc, trig, flat=False):
    torch._check(a.dim() == 3 and b.dim() == 3 and pc.dim() == 2)
    return a.new_empty((a.shape[0], a.shape[1], pc.shape[1]))


@torch.library.register_fake("equikern::gaunt_dense_product")
def _(a, b, index, value, lmax_out, flat=False):
    torch._check(a.dim() == 3 and b.dim() == 3 and index.dim() == 2 and value.dim() == 1)
    return a.new_empty((a.shape[0], a.shape[1], (lmax_out + 1) ** 2))


@torch.library.register_fake("equikern::gaunt_dense_backward")
def _(grad, a, b, index, value, flat=False):
    torch._check(grad.dim() == 3 and a.dim() == 3 and b.dim() == 3)
    return a.new_empty(a.shape), b.new_empty(b.shape)


@torch.library.register_fake("equikern::gaunt_to_grid")
def _(x, p, trig):
    torch._check(x.dim() == 2 and p.dim() == 2 and trig.dim() == 2)
    return x.new_empty((x.shape[0], p.shape[0], trig.shape[0]))


@torch.library.register_fake("equikern::gaunt_from_grid")
def _(grid, p, trig):
    torch._check(grid.dim() == 3 and p.dim() == 2)
    return grid.new_empty((grid.shape[0], p.shape[1]))


def sum_channels(x: Tensor, flat: bool) -> Tensor:
    """[N, C, d] -> [N, 1, d]: the sum over channels in the layout of x (the gradient of a shared operand)."""
    if not flat:
        return x.sum(1, keepdim=True)
    n, c, d = x.shape
    # not cached: under torch.compile with dynamic shapes c is a SymInt, which cannot be hashed
    sizes = [c * (2 * l + 1) for l in range(int(round(d**0.5)))]
    blocks = x.reshape(n, c * d).split(sizes, dim=1)
    return torch.cat([blk.unflatten(1, (c, -1)).sum(1) for blk in blocks], dim=1).unsqueeze(1)


def _product_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.flat = inputs[6]


def _product_backward(ctx, grad):
    a, b, pa, pb, pc, trig = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = gaunt_grid_product(grad, b, pc, pb, pa, trig, ctx.flat)
    if ctx.needs_input_grad[1]:
        grad_b = gaunt_grid_product(grad, a, pc, pa, pb, trig, ctx.flat)
        if b.shape[1] != a.shape[1]:  # b shared by all channels
            grad_b = sum_channels(grad_b, ctx.flat)
    return grad_a, grad_b, None, None, None, None, None


torch.library.register_autograd(
    "equikern::gaunt_grid_product", _product_backward, setup_context=_product_setup
)


def _dense_setup(ctx, inputs, output):
    a, b, index, value, _, flat = inputs
    ctx.save_for_backward(a, b, index, value)
    ctx.flat = flat


def _dense_product_backward(ctx, grad):
    a, b, index, value = ctx.saved_tensors
    grad_a, grad_b = gaunt_dense_backward(grad, a, b, index, value, ctx.flat)
    return grad_a, grad_b, None, None, None, None


torch.library.register_autograd(
    "equikern::gaunt_dense_product", _dense_product_backward, setup_context=_dense_setup
)


def _dense_backward_setup(ctx, inputs, output):
    grad, a, b, index, value, flat = inputs
    ctx.save_for_backward(grad, a, b, index, value)
    ctx.flat = flat


def _dense_backward_backward(ctx, gga, ggb):
    # The backward is (ga, gb) = (sum G g b, sum G g a), bilinear in (g, b) and in (g, a). Against
    # cotangents (gga, ggb): d/dg = product(gga, b) + product(a, ggb); d/da = sum G g ggb and
    # d/db = sum G g gga, which are exactly the two outputs of the backward op at (g, gga, ggb).
    grad, a, b, index, value = ctx.saved_tensors
    gga = torch.zeros_like(a) if gga is None else gga
    ggb = torch.zeros_like(b) if ggb is None else ggb
    lmax_out = int(round(grad.shape[2] ** 0.5)) - 1
    d_grad = d_a = d_b = None
    if ctx.needs_input_grad[0]:
        d_grad = gaunt_dense_product(gga, b, index, value, lmax_out, ctx.flat)
        d_grad = d_grad + gaunt_dense_product(a, ggb, index, value, lmax_out, ctx.flat)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        d_a, d_b = gaunt_dense_backward(grad, gga, ggb, index, value, ctx.flat)
    return d_grad, d_a, d_b, None, None, None


torch.library.register_autograd(
    "equikern::gaunt_dense_backward", _dense_backward_backward, setup_context=_dense_backward_setup
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
