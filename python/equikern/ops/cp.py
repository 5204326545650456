"""Python face of the CP bilinear ops ``torch.ops.equikern.cp_bilinear*``: fake kernels and autograd.

Native layout: x1 [Z, I, Cc] (channels last: TDN's x[e, i, c]), x2 [Z2, J] with Z2 = Z or 1 (shared by
the channels of a sample, e.g. edge spherical harmonics), factors A [I, R], B [J, R], C [K, R], optional
channel weights [Z, Cc]; out [Z, K, Cc] with
out[z, k, c] = weight[z, c] sum_r C[k, r] (A^T x1[z])[r, c] (B^T x2[z])[r].

``route`` picks the CPU kernel: "factors" (through the rank, per channel), "matrix" (the per-sample
matrix C diag(B^T x2[z]) A^T built once and applied to every channel) or "auto" (fewer multiply-adds).
All routes compute the same map; only rounding differs.

The op is linear in each of its operands, so with f(X -> t) the forward with operand X replaced by t, the
double backward is exact in terms of the op and its backward: for S = sum_X <t_X, grad_X f>,
dS/dgrad = sum_X f(X -> t_X) and dS/dY = sum_{X != Y} grad_Y <grad, f(X -> t_X)>. Every order of
derivative follows.
"""

import torch
from torch import Tensor

ROUTES = ("auto", "factors", "matrix")


def cp_bilinear(
    x1: Tensor,
    x2: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    weight: Tensor | None = None,
    route: str = "auto",
) -> Tensor:
    """[Z, I, Cc] x [Z or 1, J] -> [Z, K, Cc] through the rank-R factors A [I, R], B [J, R], C [K, R]."""
    return torch.ops.equikern.cp_bilinear.default(x1, x2, A, B, C, weight, route)


def cp_bilinear_backward(
    grad: Tensor,
    x1: Tensor,
    x2: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    weight: Tensor | None = None,
    factor_grads: bool = True,
    route: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x1, x2, A, B, C, weight) of <grad, cp_bilinear(x1, x2, A, B, C, weight)>.

    The factor ones are zero unless ``factor_grads``; the weight one is empty ([0]) without a weight.
    """
    return torch.ops.equikern.cp_bilinear_backward.default(grad, x1, x2, A, B, C, weight, factor_grads, route)


@torch.library.register_fake("equikern::cp_bilinear")
def _(x1, x2, A, B, C, weight=None, route="auto"):
    torch._check(x1.dim() == 3 and x2.dim() == 2 and A.dim() == 2 and B.dim() == 2 and C.dim() == 2)
    torch._check(weight is None or weight.dim() == 2)
    return x1.new_empty((x1.shape[0], C.shape[0], x1.shape[2]))


@torch.library.register_fake("equikern::cp_bilinear_backward")
def _(grad, x1, x2, A, B, C, weight=None, factor_grads=True, route="auto"):
    torch._check(grad.dim() == 3 and x1.dim() == 3 and x2.dim() == 2)
    return (
        x1.new_empty(x1.shape),
        x2.new_empty(x2.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        x1.new_empty((0,)) if weight is None else weight.new_empty(weight.shape),
    )


def register_cp_autograd(fwd_op, bwd_op, fwd, bwd) -> None:
    """Derivatives of a CP bilinear op pair: fwd_op(x1, x2, A, B, C, weight, *extra) and
    bwd_op(grad, x1, x2, A, B, C, weight, factor_grads, *extra), called through
    fwd(args, extra) and bwd(grad, args, factor_grads, extra) with args the six operands."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.extra = tuple(inputs[6:])

    def backward(ctx, grad):
        need = ctx.needs_input_grad[:6]
        grads = bwd(grad, ctx.saved_tensors, any(need[2:5]), ctx.extra)
        return (*(g if n else None for g, n in zip(grads, need)), *(None,) * len(ctx.extra))

    def bwd_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.factor_grads, ctx.extra = inputs[7], tuple(inputs[8:])

    def bwd_backward(ctx, *tangents):
        grad, *args = ctx.saved_tensors  # args: x1, x2, A, B, C, weight (None without one)
        need_grad, *need = ctx.needs_input_grad[:7]
        tangents = list(tangents)
        if not ctx.factor_grads:  # the factor outputs were constant zeros
            tangents[2:5] = [None] * 3
        if args[5] is None:  # the weight output was a constant empty tensor
            tangents[5] = None
        d_grad, d_args = None, [None] * 6
        for x, t in enumerate(tangents):
            if t is None:
                continue
            swapped = list(args)
            swapped[x] = t
            if need_grad:
                f = fwd(swapped, ctx.extra)
                d_grad = f if d_grad is None else d_grad + f
            others = [y for y in range(6) if y != x and need[y]]
            if others:
                parts = bwd(grad, swapped, any(2 <= y <= 4 for y in others), ctx.extra)
                for y in others:
                    d_args[y] = parts[y] if d_args[y] is None else d_args[y] + parts[y]
        return (d_grad, *d_args, None, *(None,) * len(ctx.extra))

    torch.library.register_autograd(fwd_op, backward, setup_context=setup)
    torch.library.register_autograd(bwd_op, bwd_backward, setup_context=bwd_setup)


register_cp_autograd(
    "equikern::cp_bilinear",
    "equikern::cp_bilinear_backward",
    lambda args, extra: cp_bilinear(*args, *extra),
    lambda grad, args, fg, extra: cp_bilinear_backward(grad, *args, fg, *extra),
)
