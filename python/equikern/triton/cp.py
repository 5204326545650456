"""Triton CP bilinear op (TDN): out[z, k, c] = w[z, c] sum_r C[k, r] (A^T x1[z])[r, c] (B^T x2[z])[r].

Same layout and semantics as ``equikern.ops.cp`` (x1 [Z, I, Cc] channels last, x2 [Z or 1, J], factors
A [I, R], B [J, R], C [K, R], optional weight [Z, Cc]). A program owns a run of ZB samples and a tile of
BC channels. Per sample it builds the [K, I] matrix M = C diag(B^T x2[z]) A^T (one small matrix product)
and applies it to the tile with one matrix product (``tl.dot``): x1 and the output are read and written
once, in rows of contiguous channels. The backward applies M^T to the output gradient and contracts
over the tile's channels for x2 and the factors; factor gradients are summed per program over its samples
and the programs' partial sums reduced afterwards in a fixed order (no atomics: bitwise reproducible).
Products run in full precision ("ieee": no TF32). Dimensions are padded to powers of two >= 16 for
``tl.dot``, with masks.
"""

import contextlib

import torch
from torch import Tensor

from equikern.ops.cp import register_cp_autograd


def _pad(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def _kernels():
    """The two kernels (triton is imported on first use)."""
    from equikern.triton import _cp_kernels

    return _cp_kernels.fwd, _cp_kernels.bwd


def _meta(
    x1: Tensor, x2: Tensor, A: Tensor, C: Tensor, samples_per_program: int, channels: int = 128
) -> dict:
    import triton.language as tl

    I, Cc = x1.shape[1], x1.shape[2]
    return dict(
        ZB=samples_per_program,
        IP=_pad(I),
        JP=_pad(x2.shape[1]),
        KP=_pad(C.shape[0]),
        RP=_pad(A.shape[1]),
        BC=min(channels, _pad(Cc)),
        ACC=tl.float64 if x1.dtype == torch.float64 else tl.float32,
        PREC="ieee",
    )


def _check(x1, x2, A, B, C, weight, grad=None) -> None:
    for t, name in ((x1, "x1"), (x2, "x2"), (A, "A"), (B, "B"), (C, "C"), (weight, "weight"), (grad, "grad")):
        if t is not None and (t.dtype != x1.dtype or t.device != x1.device):
            raise ValueError(
                f"cp_bilinear_triton: {name} is {t.dtype} on {t.device}, x1 is {x1.dtype} on {x1.device}"
            )
    if x1.dim() != 3 or x2.dim() != 2 or x2.shape[0] not in (1, x1.shape[0]):
        raise ValueError(
            "cp_bilinear_triton: x1 must be [Z, I, Cc] and x2 [Z or 1, J], "
            f"got {tuple(x1.shape)}, {tuple(x2.shape)}"
        )
    if A.shape[0] != x1.shape[1] or B.shape[0] != x2.shape[1] or not A.shape[1] == B.shape[1] == C.shape[1]:
        raise ValueError(
            f"cp_bilinear_triton: factors {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)} do not fit"
        )
    if weight is not None and tuple(weight.shape) != (x1.shape[0], x1.shape[2]):
        raise ValueError(f"cp_bilinear_triton: weight must be [Z, Cc], got {tuple(weight.shape)}")
    if grad is not None and tuple(grad.shape) != (x1.shape[0], C.shape[0], x1.shape[2]):
        raise ValueError(f"cp_bilinear_triton: grad must be [Z, K, Cc], got {tuple(grad.shape)}")


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("equikern::cp_bilinear_triton", mutates_args=())
def _cp_op(x1: Tensor, x2: Tensor, A: Tensor, B: Tensor, C: Tensor, weight: Tensor | None) -> Tensor:
    _check(x1, x2, A, B, C, weight)
    Z, I, Cc = x1.shape
    K = C.shape[0]
    out = torch.empty((Z, K, Cc), dtype=x1.dtype, device=x1.device)
    if out.numel() == 0:
        return out.zero_()
    fwd, _ = _kernels()
    x1, x2, A, B, C = (t.contiguous() for t in (x1, x2, A, B, C))
    w = weight.contiguous() if weight is not None else x1
    meta = _meta(x1, x2, A, C, 1)
    with _device(x1):
        fwd[(Z, -(-Cc // meta["BC"]))](
            x1, x2, A, B, C, w, out, Z, I, x2.shape[1], K, A.shape[1], Cc,
            0 if x2.shape[0] == 1 else x2.shape[1],
            HAS_W=weight is not None, **meta,
        )  # fmt: skip
    return out


@_cp_op.register_fake
def _(x1, x2, A, B, C, weight):
    _check(x1, x2, A, B, C, weight)
    return x1.new_empty((x1.shape[0], C.shape[0], x1.shape[2]))


SAMPLES_PER_PROGRAM = 16  # the backward's run of samples per program (factor gradients summed over it)
BACKWARD_CHANNELS = 64  # the backward's channel tile (128 spilled: python -m equikern.triton.aot)


@torch.library.custom_op("equikern::cp_bilinear_triton_backward", mutates_args=())
def _cp_bwd_op(
    grad: Tensor,
    x1: Tensor,
    x2: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    weight: Tensor | None,
    factor_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(x1, x2, A, B, C, weight, grad)
    Z, I, Cc = x1.shape
    J, K, R = x2.shape[1], C.shape[0], A.shape[1]
    opts = dict(dtype=x1.dtype, device=x1.device)
    gx1 = torch.zeros(x1.shape, **opts)  # contiguous, as the kernel writes them (not x1's strides)
    gw = torch.zeros((0,) if weight is None else weight.shape, **opts)
    zb = max(1, min(SAMPLES_PER_PROGRAM, Z))
    meta = _meta(x1, x2, A, C, zb, BACKWARD_CHANNELS)
    progs, nch = -(-Z // zb), -(-Cc // meta["BC"])
    gx2 = torch.zeros((nch, Z, J), **opts)
    parts = progs * nch if factor_grads else 1
    gA, gB, gC = (torch.zeros((parts, d, R), **opts) for d in (I, J, K))
    if Z > 0 and Cc > 0:
        _, bwd = _kernels()
        grad, x1c, x2c, A, B, C = (t.contiguous() for t in (grad, x1, x2, A, B, C))
        w = weight.contiguous() if weight is not None else x1c
        with _device(x1):
            bwd[(progs, nch)](
                grad, x1c, x2c, A, B, C, w, gx1, gx2, gw if weight is not None else x1c, gA, gB, gC,
                Z, I, J, K, R, Cc, 0 if x2.shape[0] == 1 else J,
                HAS_W=weight is not None, FACTORS=factor_grads, **meta,
            )  # fmt: skip
    gx2 = gx2.sum(0)
    if x2.shape[0] == 1:
        gx2 = gx2.sum(0, keepdim=True)
    return gx1, gx2, gA.sum(0), gB.sum(0), gC.sum(0), gw


@_cp_bwd_op.register_fake
def _(grad, x1, x2, A, B, C, weight, factor_grads):
    _check(x1, x2, A, B, C, weight, grad)
    return (
        x1.new_empty(x1.shape),
        x2.new_empty(x2.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        x1.new_empty((0,) if weight is None else weight.shape),
    )


def cp_bilinear(x1, x2, A, B, C, weight=None) -> Tensor:
    """``equikern.ops.cp.cp_bilinear`` on the Triton kernels."""
    return torch.ops.equikern.cp_bilinear_triton.default(x1, x2, A, B, C, weight)


def cp_bilinear_backward(grad, x1, x2, A, B, C, weight=None, factor_grads=True):
    return torch.ops.equikern.cp_bilinear_triton_backward.default(grad, x1, x2, A, B, C, weight, factor_grads)


register_cp_autograd(
    _cp_op,
    _cp_bwd_op,
    lambda args, extra: cp_bilinear(*args),
    lambda grad, args, fg, extra: cp_bilinear_backward(grad, *args, fg),
)
