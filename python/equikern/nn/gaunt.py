"""GauntTensorProduct: the Gaunt tensor product as a module, in e3nn's flat layout.

Inputs and output are irreps ``C x 0e + C x 1o + C x 2e + ...`` (every degree 0..L once, one channel
count, parity (-1)^l): per channel, the coefficients of a function on the sphere. The output is the
per-channel product of the two functions, truncated at the output's degree (see :mod:`equikern.gaunt`),
with optional learnable weights per (channel, degree) on each input and on the output.
"""

import torch
from torch import Tensor

from equikern.gaunt import METHODS, gaunt_product
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


def _flat_index(channels: int, lmax: int) -> Tensor:
    """[C, (L+1)^2]: position in e3nn's flat layout (blocks [C, 2l+1] per degree) of coefficient (c, lm)."""
    blocks = [
        channels * l * l + torch.arange(channels)[:, None] * (2 * l + 1) + torch.arange(2 * l + 1)[None, :]
        for l in range(lmax + 1)
    ]
    return torch.cat(blocks, dim=1)


class GauntTensorProduct(torch.nn.Module):
    """out = per-channel Gaunt product of x1 [..., irreps_in1.dim] and x2 [..., irreps_in2.dim].

    The channel counts of the inputs are equal, or one of them is 1 (shared by every channel); the output
    has the larger count. ``weights=True`` adds learnable weights (initialised to 1) per (channel, degree):
    ``weight1`` [C1, L1+1], ``weight2`` [C2, L2+1], ``weight_out`` [C, Lout+1]. ``method`` is passed to
    :func:`equikern.gaunt.gaunt_product`.
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
            index = _flat_index(ch, l)
            self.register_buffer(f"index{key}", index, persistent=False)
            self.register_buffer(
                f"degree{key}",
                torch.arange(l + 1).repeat_interleave(2 * torch.arange(l + 1) + 1),
                persistent=False,
            )
        self.register_buffer("inverse_out", torch.argsort(self.index_out.reshape(-1)), persistent=False)
        if weights:
            self.weight1 = torch.nn.Parameter(torch.ones(c1, self.lmax1 + 1))
            self.weight2 = torch.nn.Parameter(torch.ones(c2, self.lmax2 + 1))
            self.weight_out = torch.nn.Parameter(torch.ones(c, self.lmax_out + 1))
        else:
            self.weight1 = self.weight2 = self.weight_out = None

    def extra_repr(self) -> str:
        return f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, method={self.method}"

    def _unflatten(
        self, x: Tensor, irreps: Irreps, index: Tensor, degree: Tensor, weight, name: str
    ) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != irreps.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected shape [..., {irreps.dim}] for irreps {irreps}, got {got}")
        x = x[..., index]
        return x if weight is None else x * weight[:, degree]

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        a = self._unflatten(x1, self.irreps_in1, self.index1, self.degree1, self.weight1, "x1")
        b = self._unflatten(x2, self.irreps_in2, self.index2, self.degree2, self.weight2, "x2")
        out = gaunt_product(a, b, self.lmax_out, self.method)
        if self.weight_out is not None:
            out = out * self.weight_out[:, self.degree_out]
        return out.flatten(-2)[..., self.inverse_out]
