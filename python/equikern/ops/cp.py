"""Python face of the CP bilinear ops ``torch.ops.equikern.cp_bilinear*``: fake kernels and autograd.

Native layout: x1 [Z, I, Cc] (channels last), x2 [Z2, J] with Z2 = Z or 1, factors A [I, R], B [J, R],
C [K, R]; out [Z, K, Cc] with out[z, k, c] = sum_r C[k, r] (A^T x1[z])[r, c] (B^T x2[z])[r].

The op is linear in each of its five operands, so with f(X -> t) the forward with operand X replaced by
t, the double backward is exact in terms of the op and its backward: for S = sum_X <t_X, grad_X f>,
dS/dgrad = sum_X f(X -> t_X) and dS/dY = sum_{X != Y} grad_Y <grad, f(X -> t_X)>. Every order of
derivative follows.
"""

import torch
from torch import Tensor


def cp_bilinear(x1: Tensor, x2: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """[Z, I, Cc] x [Z or 1, J] -> [Z, K, Cc] through the rank-R factors A [I, R], B [J, R], C [K, R]."""
    return torch.ops.equikern.cp_bilinear.default(x1, x2, A, B, C)


def cp_bilinear_backward(
    grad: Tensor, x1: Tensor, x2: Tensor, A: Tensor, B: Tensor, C: Tensor, factor_grads: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x1, x2, A, B, C) of <grad, cp_bilinear(x1, x2, A, B, C)>; factor ones zero unless asked."""
    return torch.ops.equikern.cp_bilinear_backward.default(grad, x1, x2, A, B, C, factor_grads)


@torch.library.register_fake("equikern::cp_bilinear")
def _(x1, x2, A, B, C):
    torch._check(x1.dim() == 3 and x2.dim() == 2 and A.dim() == 2 and B.dim() == 2 and C.dim() == 2)
    return x1.new_empty((x1.shape[0], C.shape[0], x1.shape[2]))


@torch.library.register_fake("equikern::cp_bilinear_backward")
def _(grad, x1, x2, A, B, C, factor_grads=True):
    torch._check(grad.dim() == 3 and x1.dim() == 3 and x2.dim() == 2)
    return (
        x1.new_empty(x1.shape),
        x2.new_empty(x2.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
    )


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    need = ctx.needs_input_grad
    grads = cp_bilinear_backward(grad, *ctx.saved_tensors, any(need[2:]))
    return tuple(g if n else None for g, n in zip(grads, need))


torch.library.register_autograd("equikern::cp_bilinear", _backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.factor_grads = inputs[6]


def _bwd_backward(ctx, *tangents):
    grad, *args = ctx.saved_tensors
    need_grad, *need = ctx.needs_input_grad[:6]
    if not ctx.factor_grads:  # the factor outputs were constant zeros
        tangents = tangents[:2] + (None, None, None)
    d_grad, d_args = None, [None] * 5
    for x, t in enumerate(tangents):
        if t is None:
            continue
        swapped = list(args)
        swapped[x] = t
        if need_grad:
            f = cp_bilinear(*swapped)
            d_grad = f if d_grad is None else d_grad + f
        others = [y for y in range(5) if y != x and need[y]]
        if others:
            parts = cp_bilinear_backward(grad, *swapped, any(y >= 2 for y in others))
            for y in others:
                d_args[y] = parts[y] if d_args[y] is None else d_args[y] + parts[y]
    return (d_grad, *d_args, None)


torch.library.register_autograd("equikern::cp_bilinear_backward", _bwd_backward, setup_context=_bwd_setup)
