"""GauntTensorProduct: the Gaunt tensor product as a module, in e3nn's flat layout.

Inputs and output are irreps ``C x 0e + C x 1o + C x 2e + ...`` (every degree 0..L once, one channel
count, parity (-1)^l): per channel, the coefficients of a function on the sphere. The output is the
per-channel product of the two functions, truncated at the output's degree (see :mod:`equikern.gaunt`),
with optional learnable weights per (channel, degree) on each input and on the output.

The C++ ops read and write the flat layout themselves, so a forward call is a reshape, the op and a
reshape (plus one elementwise multiply per weighted operand).
"""

import torch
from torch import Tensor

from equikern.gaunt import METHODS, product
from equikern.irreps import Irreps, as_irreps


def _channel_layout(irreps, name: str) -> tuple[Irreps, int, int]:
    """(irreps, C, L) for irreps C x 0e + C x 1o + ... + C x L; anything else is refused."""
    irreps = as_irreps(irreps)
    if len(irreps) == 0:
        raise ValueError(f"{name}: expected irreps C x 0e + C x 1o + ..., got empty irreps")
    mul = irreps[0].mul
    for l, (m, ir) in enumerate(irreps):
        if ir.l != l or ir.p != (-1) ** l or m != mul or mul < 1:
            raise ValueError(
                f"{name}: expected irreps C x 0e + C x 1o + C x 2e + ... (every degree 0..L once, in order, "
                f"with parity (-1)^l and the same channel count), got {irreps}; entry {l} is {m}x{ir}"
            )
    return irreps, mul, len(irreps) - 1


def _flat_channel_degree(channels: int, lmax: int) -> tuple[Tensor, Tensor]:
    """(channel, degree) of every position of the flat layout, to expand [C, L+1] weights into it."""
    channel = torch.cat([torch.arange(channels).repeat_interleave(2 * l + 1) for l in range(lmax + 1)])
    degree = torch.cat([torch.full((channels * (2 * l + 1),), l) for l in range(lmax + 1)])
    return channel, degree


class GauntTensorProduct(torch.nn.Module):
    """out = per-channel Gaunt product of x1 [..., irreps_in1.dim] and x2 [..., irreps_in2.dim].

    The channel counts of the inputs are equal, or one of them is 1 (shared by every channel); the output
    has the larger count. ``weights=True`` adds learnable weights (initialised to 1) per (channel, degree):
    ``weight1`` [C1, L1+1], ``weight2`` [C2, L2+1], ``weight_out`` [C, Lout+1]. ``method`` is passed to
    :func:`equikern.gaunt.gaunt_product` ("auto": see :func:`equikern.gaunt.choose_method`).
    """

    def __init__(self, irreps_in1, irreps_in2, irreps_out, method: str = "auto", weights: bool = True):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        self.irreps_in1, c1, self.lmax1 = _channel_layout(irreps_in1, "irreps_in1")
        self.irreps_in2, c2, self.lmax2 = _channel_layout(irreps_in2, "irreps_in2")
        self.irreps_out, c, self.lmax_out = _channel_layout(irreps_out, "irreps_out")
        if c1 != c2 and 1 not in (c1, c2):
            raise ValueError(f"irreps_in1, irreps_in2: channel counts {c1} and {c2} differ and neither is 1")
        if c != max(c1, c2):
            raise ValueError(f"irreps_out: expected {max(c1, c2)} channels (as the inputs), got {c}")
        self.channels, self.method = (c1, c2, c), method
        for key, (ch, l) in {
            "1": (c1, self.lmax1),
            "2": (c2, self.lmax2),
            "_out": (c, self.lmax_out),
        }.items():
            channel, degree = _flat_channel_degree(ch, l)
            self.register_buffer(f"channel{key}", channel, persistent=False)
            self.register_buffer(f"degree{key}", degree, persistent=False)
        if weights:
            self.weight1 = torch.nn.Parameter(torch.ones(c1, self.lmax1 + 1))
            self.weight2 = torch.nn.Parameter(torch.ones(c2, self.lmax2 + 1))
            self.weight_out = torch.nn.Parameter(torch.ones(c, self.lmax_out + 1))
        else:
            self.weight1 = self.weight2 = self.weight_out = None

    def extra_repr(self) -> str:
        return f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, method={self.method}"

    @staticmethod
    def _check(x, irreps: Irreps, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != irreps.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected shape [..., {irreps.dim}] for irreps {irreps}, got {got}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: expected a float32 or float64 tensor, got {x.dtype}")

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        self._check(x1, self.irreps_in1, "x1")
        self._check(x2, self.irreps_in2, "x2")
        if x1.dtype != x2.dtype:
            raise ValueError(f"x2: dtype {x2.dtype} differs from x1's {x1.dtype}")
        if self.weight1 is not None:
            x1 = x1 * self.weight1[self.channel1, self.degree1]
            x2 = x2 * self.weight2[self.channel2, self.degree2]
        try:
            batch = torch.broadcast_shapes(x1.shape[:-1], x2.shape[:-1])
        except RuntimeError as e:
            raise ValueError(
                f"x1, x2: leading dims {tuple(x1.shape)} and {tuple(x2.shape)} do not broadcast"
            ) from e
        (c1, c2, _), (l1, l2) = self.channels, (self.lmax1, self.lmax2)
        a = x1.expand(batch + x1.shape[-1:]).reshape(-1, c1, (l1 + 1) ** 2)
        b = x2.expand(batch + x2.shape[-1:]).reshape(-1, c2, (l2 + 1) ** 2)
        if c1 == 1 and c2 != 1:  # the product commutes; the ops share their second operand
            a, b, l1, l2 = b, a, l2, l1
        out = product(a, b, l1, l2, self.lmax_out, self.method, flat=True)
        out = out.reshape(batch + (self.irreps_out.dim,))
        if self.weight_out is not None:
            out = out * self.weight_out[self.channel_out, self.degree_out]
        return out
