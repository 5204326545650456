"""CP tensor products of Tensor Decomposition Networks (anchors.json "cp"): equikern's op against einsums.

The problem: out[e, k, c] = w[e, c] sum_r C[k, r] (sum_i A[i, r] x[e, i, c]) (sum_j B[j, r] y[e, j]) with
d = (L + 1)^2 components, rank R = 7 L^2 and C channels, in TDN's layout: x [E, d, C] (channels last),
y [E, d] (edge spherical harmonics, shared by the channels of an edge), w [E, C]. The inputs are x, y and w;
the factors are constants, as in TDN (fitted once). They are Gaussian here: the time of every implementation
is independent of their values, and fitting rank-7L^2 factors of the real coupling tensor takes over a
minute at L = 2, 3 (``equikern.CPTensorProduct`` does it, and caches them).

Implementations:
  tdn_einsum (the reference): the single ``torch.einsum`` over x, y, A, B, C, w that TDN calls.
  two_gemm_einsum: staged einsums (project x on A, scale by y B, contract with C, scale by w).
  equikern: the op ``equikern.cp_bilinear`` runs ("auto": C++ on a CPU, Triton on a GPU), weights fused.
  equikern_tp: the exact channelwise ``equikern.TensorProduct`` (uvu paths, every path weight tied to w) on
    the same x, y, w, for context. It computes the exact product, which a rank-7L^2 CP is not, and the harness
    has one reference per case: its row is timed but "unchecked" (tests/test_cp.py checks the exact product
    against CPTensorProduct at full rank instead).
E = 2000 on a CPU unless --batch is given (the anchors' 50000 elsewhere), C = 128.
"""

from functools import cache

import torch
from torch import Tensor

from equikern.bench import Case, Config, Impl, anchors, io_floor

FAMILY = "cp"
_CPU_BATCH = 2000


def cases(cfg: Config) -> list[Case]:
    """One case per row of anchors.json "cp"."""
    if cfg.hardware == "cpu" and not cfg.batch_given:
        cfg = Config(cfg.device, cfg.dtype, _CPU_BATCH, cfg.hardware, True)
    return [_case(row, cfg) for row in anchors()["cp"]["rows"]]


def _irreps(channels: int, L: int) -> str:
    return "+".join(f"{channels}x{l}{'eo'[l % 2]}" for l in range(L + 1))


def _case(row: dict, cfg: Config) -> Case:
    L, d, R, C = row["L"], row["d"], row["R"], row["C"]
    batch = cfg.batch
    like = {"device": cfg.device, "dtype": cfg.dtype}

    @cache
    def factors() -> tuple[Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(L)
        # scaled so that the output has about unit variance for unit-variance inputs
        scale = (R * d * d) ** (-1 / 6)
        return tuple(
            (torch.randn(d, R, generator=gen, dtype=torch.float64) * scale).to(**like) for _ in range(3)
        )

    def inputs() -> tuple[Tensor, ...]:
        return (
            torch.randn(batch, d, C, **like),
            torch.randn(batch, d, **like),
            torch.randn(batch, C, **like),
        )

    def tdn_einsum() -> Impl:
        A, B, Cf = factors()
        return Impl(lambda x, y, w: torch.einsum("eic,ej,ir,jr,kr,ec->ekc", x, y, A, B, Cf, w))

    def two_gemm_einsum() -> Impl:
        A, B, Cf = factors()

        def staged(x, y, w):
            u = torch.einsum("eic,ir->erc", x, A)
            v = y @ B
            return torch.einsum("kr,erc->ekc", Cf, u * v[:, :, None]) * w[:, None, :]

        return Impl(staged)

    def equikern_impl() -> Impl:
        from equikern.cp import op_for

        A, B, Cf = factors()
        op = op_for(A)  # what equikern.cp_bilinear's "auto" runs here: Triton on a GPU, C++ on a CPU
        return Impl(lambda x, y, w: op(x, y, A, B, Cf, w))

    def equikern_tp() -> Impl:
        import equikern
        from equikern.irreps import Irreps

        irreps, sh = Irreps(_irreps(C, L)), Irreps.spherical_harmonics(L)
        instructions = [
            (i1, i2, io, "uvu", True)
            for i1, (_, ir1) in enumerate(irreps)
            for i2, (_, ir2) in enumerate(sh)
            for io, (_, iro) in enumerate(irreps)
            if iro in ir1 * ir2
        ]
        tp = equikern.TensorProduct(
            irreps, sh, irreps, instructions, shared_weights=False, internal_weights=False
        ).to(**like)
        starts = [l * l for l in range(L + 2)]

        def to_native(xs):
            x, y, w = xs
            # [E, d, C] component-major -> e3nn's mul_ir: per degree a [C, 2l+1] block
            blocks = [x[:, starts[l] : starts[l + 1], :].transpose(1, 2).flatten(1) for l in range(L + 1)]
            return torch.cat(blocks, 1), y, w.repeat(1, len(instructions))

        return Impl(tp, to_native, from_native=None)

    itemsize = cfg.dtype.itemsize
    published = {}
    if cfg.hardware == "h100" and cfg.dtype == torch.float32 and batch == row["E"]:
        published = {name: {"fwd": row[f"{name}_ms"]} for name in ("tdn_einsum", "two_gemm_einsum")}
    return Case(
        family=FAMILY,
        label=f"cp-L{L}",
        params={"L": L, "d": d, "R": R, "C": C},
        inputs=inputs,
        impls={
            "equikern": equikern_impl,
            "tdn_einsum": tdn_einsum,
            "two_gemm_einsum": two_gemm_einsum,
            "equikern_tp": equikern_tp,
        },
        floor_bytes=io_floor((batch * d * C + batch * d + batch * C) * itemsize, batch * d * C * itemsize),
        reference="tdn_einsum",
        published=published,
        batch=batch,
    )
