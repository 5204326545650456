"""Gaunt tensor products (anchors.json "gaunt"): equikern's GauntTensorProduct against e3nn and torch.fft.

Inputs are e3nn's flat layout C x 0e + C x 1o + ... + C x Le, output degrees 0..L. References: e3nn_cg (the
uuu CG product on the even paths, weighted by the Gaunt/3j ratio of each path: equal to the Gaunt product),
e3nn_grid (ToS2Grid/FromS2Grid product at the smallest exact resolution) and torch_fft (the paper's 2D
Fourier method, equikern.gaunt's "fourier"). C = 32 on a CPU (the anchors' 128 elsewhere); by default a CPU
run measures N = 1000 and L <= 6, the sizes of the CPU targets (e3nn's CG product takes seconds at L = 8).
equikern runs GauntTensorProduct(method="auto") on the flat layout itself; e3nn_grid and torch_fft get their
inputs in the channel layout, converted outside the timed call.
"""

import torch
from e3nn import o3
from torch import Tensor

from equikern.bench import Case, Config, Impl, anchors, io_floor

FAMILY = "gaunt"
_CPU_CHANNELS = 32
_CPU_BATCH, _CPU_LMAX = 1000, 6


def _irreps(channels: int, lmax: int) -> o3.Irreps:
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def cases(cfg: Config) -> list[Case]:
    """One case per row of anchors.json "gaunt"."""
    rows = anchors()["gaunt"]["rows"]
    if cfg.hardware == "cpu" and not cfg.batch_given:
        cfg = Config(cfg.device, cfg.dtype, _CPU_BATCH, cfg.hardware, True)
        rows = [row for row in rows if row["L"] <= _CPU_LMAX]
    return [_case(row, cfg) for row in rows]


def _case(row: dict, cfg: Config) -> Case:
    from equikern.gaunt import choose_method, flat_index, gaunt_coefficients, gaunt_product
    from equikern.nn.gaunt import GauntTensorProduct
    from equikern.so3 import wigner_3j

    L = row["L"]
    C = _CPU_CHANNELS if cfg.hardware == "cpu" else row["C"]
    irreps, batch, d = _irreps(C, L), cfg.batch, (L + 1) ** 2
    like = {"device": cfg.device, "dtype": cfg.dtype}
    index = flat_index(C, L).to(cfg.device)
    inverse = torch.argsort(index.reshape(-1))

    def inputs() -> tuple[Tensor, ...]:
        return torch.randn(batch, irreps.dim, **like), torch.randn(batch, irreps.dim, **like)

    def to_channels(xs):
        return tuple(x[..., index] for x in xs)

    def from_channels(out: Tensor) -> Tensor:
        return out.flatten(-2)[..., inverse]

    def e3nn_cg() -> Impl:
        instructions, ratios = [], []
        for i in range(L + 1):
            for j in range(L + 1):
                for k in range(abs(i - j), min(i + j, L) + 1):
                    if (i + j + k) % 2 == 0:
                        instructions.append((i, j, k, "uuu", True))
                        ratios.append(float((gaunt_coefficients(i, j, k) * wigner_3j(i, j, k)).sum()))
        tp = o3.TensorProduct(
            irreps,
            irreps,
            irreps,
            instructions,
            irrep_normalization="none",
            path_normalization="none",
            internal_weights=False,
            shared_weights=True,
        ).to(**like)
        weight = torch.tensor(ratios, **like).repeat_interleave(C)
        return Impl(lambda a, b: tp(a, b, weight))

    def e3nn_grid() -> Impl:
        res = (2 * (3 * L // 2 + 1), 2 * (3 * L // 2 + 1) - 1)  # exact for the degree-3L integrand
        to_grid = o3.ToS2Grid(L, res, normalization="integral").to(**like)
        from_grid = o3.FromS2Grid(res, L, normalization="integral").to(**like)
        return Impl(lambda a, b: from_grid(to_grid(a) * to_grid(b)), to_channels, from_channels)

    def torch_fft() -> Impl:
        return Impl(lambda a, b: gaunt_product(a, b, L, method="fourier"), to_channels, from_channels)

    def equikern_impl() -> Impl:
        return Impl(GauntTensorProduct(irreps, irreps, irreps, weights=False).to(**like))

    itemsize = cfg.dtype.itemsize
    published = {}
    if cfg.hardware == "h100" and cfg.dtype == torch.float32 and batch == row["N"]:
        published = {name: {"fwd": row[f"{name}_ms"]} for name in ("e3nn_cg", "e3nn_grid", "torch_fft")}
    return Case(
        family=FAMILY,
        label=f"gaunt-L{L}",
        params={
            "L": L,
            "C": C,
            "irreps": str(irreps),
            "paths": row["paths"],
            "method": choose_method(L, L, L, cfg.dtype, cfg.device.type),  # what equikern's "auto" runs
        },
        inputs=inputs,
        impls={"equikern": equikern_impl, "e3nn_cg": e3nn_cg, "e3nn_grid": e3nn_grid, "torch_fft": torch_fft},
        floor_bytes=io_floor(2 * batch * C * d * itemsize, batch * C * d * itemsize),
        reference="e3nn_cg",
        published=published,
        batch=batch,
    )
