"""Tensor products (anchors.json "tensor_product"): e3nn.o3.TensorProduct against equikern and the peers.

Every implementation gets the same inputs in e3nn's layout ([batch, dim] in mul_ir order, weights in e3nn's
instruction order); the peers' adapters convert them once, outside the timed region, into their own layout.

Implementations: e3nn (the reference); equikern (TensorProduct, backend "auto": on CUDA the Triton kernels for
the all-uvu and all-uvw problems, the C++/CUDA op otherwise); equikern_native (CUDA: backend "native", the
C++/CUDA op, so that both routes are timed); cue (cuEquivariance's ChannelWiseTensorProduct or
FullyConnectedTensorProduct, ir_mul layout; on a CPU its "naive" torch fallback); oeq (OpenEquivariance's
TensorProduct, CUDA only). Where e3nn cannot run a mode (out of memory) equikern's results check the peers.
"""

import re

import numpy as np
import torch
from e3nn import o3
from torch import Tensor

from equikern.bench import Case, Config, Impl, Unavailable, anchors, io_floor

FAMILY = "tensor_product"
_H100_FIGURES = re.compile(r"h100_fp(32|64)_batch(\d+)(?:_with_double_backward)?_ms")
_CPU_FIGURES = re.compile(r"cpu_e3nn_\d+cores_batch(\d+)_ms")


def tensor_product_arguments(problem: dict) -> dict:
    """The e3nn.o3.TensorProduct constructor arguments that the problem's "construction" describes."""
    in1, in2 = o3.Irreps(problem["irreps_in1"]), o3.Irreps(problem["irreps_in2"])
    target = o3.Irreps(problem["irreps_out_target"])
    if problem["mode"] == "uvw":
        out = target
        instructions = [
            (i, j, k, "uvw", True)
            for i, (_, ir1) in enumerate(in1)
            for j, (_, ir2) in enumerate(in2)
            for k, (_, ir) in enumerate(out)
            if ir in ir1 * ir2
        ]
    elif problem["mode"] == "uvu":
        blocks, paths = [], []
        for i, (mul, ir1) in enumerate(in1):
            for j, (_, ir2) in enumerate(in2):
                for ir in ir1 * ir2:
                    if ir in target:
                        paths.append((i, j, len(blocks)))
                        blocks.append((mul, ir))
        # sort() returns (irreps, p, inv) with p[old block] = new position (inv maps new -> old).
        out, p, _ = o3.Irreps(blocks).sort()
        instructions = [(i, j, p[k], "uvu", True) for i, j, k in paths]
    else:
        raise ValueError(f"{problem['label']}: unknown mode {problem['mode']!r}")
    return {
        "irreps_in1": str(in1),
        "irreps_in2": str(in2),
        "irreps_out": str(out),
        "instructions": instructions,
        "shared_weights": problem["weights"].startswith("shared"),
        "internal_weights": False,
    }


def _path_sizes(args: dict) -> list[int]:
    """Number of weights of each instruction, in e3nn's order."""
    muls = [[mul for mul, _ in o3.Irreps(args[key])] for key in ("irreps_in1", "irreps_in2", "irreps_out")]
    sizes = []
    for i, j, k, mode, _ in args["instructions"]:
        sizes.append(muls[0][i] * muls[1][j] * (muls[2][k] if mode == "uvw" else 1))
    return sizes


def _weight_permutation(sizes: list[int], order: list[int]) -> Tensor:
    """Index that gathers the weight blocks of the paths in ``order`` from e3nn's concatenation."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return torch.cat([torch.arange(starts[t], starts[t + 1]) for t in order])


def _transpose_blocks(x: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    """Transpose every [a, b] block of the last dimension to [b, a] (mul_ir <-> ir_mul)."""
    parts, start = [], 0
    for a, b in blocks:
        parts.append(x[..., start : start + a * b].unflatten(-1, (a, b)).transpose(-1, -2).flatten(-2))
        start += a * b
    return torch.cat(parts, -1)


def to_ir_mul(x: Tensor, irreps: str) -> Tensor:
    return _transpose_blocks(x, [(mul, ir.dim) for mul, ir in o3.Irreps(irreps)])


def from_ir_mul(x: Tensor, irreps: str) -> Tensor:
    return _transpose_blocks(x, [(ir.dim, mul) for mul, ir in o3.Irreps(irreps)])


def _published(problem: dict, cfg: Config) -> dict[str, dict[str, float]]:
    """The anchors' figures measured at this hardware, dtype and batch: impl -> mode -> ms."""
    if cfg.hardware == "h100":
        bits = {torch.float32: "32", torch.float64: "64"}.get(cfg.dtype)
        for key, table in problem.items():
            found = _H100_FIGURES.fullmatch(key)
            if found and found[1] == bits and int(found[2]) == cfg.batch:
                return {
                    impl: {m.removesuffix("_ms"): ms for m, ms in figs.items()}
                    for impl, figs in table.items()
                }
    if cfg.hardware == "cpu" and cfg.dtype == torch.float32:
        for key, table in anchors().items():
            found = _CPU_FIGURES.fullmatch(key)
            if found and int(found[1]) == cfg.batch and problem["label"] in table:
                return {"e3nn": table[problem["label"]]}
    return {}


def equikern_route(module, cfg: Config) -> str:
    """Which kernels an equikern module runs on the config's device: "triton" or "native" (C++/CUDA op)."""
    triton = getattr(module, "_triton_key", None) is not None
    return "triton" if triton and (module.backend == "triton" or cfg.device.type == "cuda") else "native"


def cue_module(problem: dict, args: dict, cfg: Config, method: str | None = None):
    """cuEquivariance's module for the problem (ir_mul layout) and the index that orders e3nn's weights.

    Channelwise (uvu) problems take ``cuet.ChannelWiseTensorProduct`` with the problem's target irreps as
    filter, the others ``cuet.FullyConnectedTensorProduct``; weights are per sample (or shared, [1, n]).
    ``method`` is cue's (default: its own choice on CUDA, "naive", its torch fallback, on a CPU). Raises
    ``Unavailable`` when cuEquivariance (or on CUDA its kernels, cuequivariance_ops_torch) is not installed.
    """
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet
        from cuequivariance.group_theory.experimental.e3nn import O3_e3nn

        if cfg.device.type == "cuda":
            import cuequivariance_ops_torch  # noqa: F401  (without it cuet silently runs its naive fallback)
    except ImportError as err:
        raise Unavailable(f"cuEquivariance: {err}") from err

    def irreps(text: str):
        return cue.Irreps(O3_e3nn, text)

    shared = args["shared_weights"]
    common = dict(
        layout=cue.ir_mul,
        shared_weights=shared,
        internal_weights=False,
        math_dtype=cfg.dtype,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    if method is not None or cfg.device.type == "cpu":
        common["method"] = method or "naive"  # cue's kernels are CUDA-only; naive is its torch fallback
    paths = range(len(args["instructions"]))
    if problem["mode"] == "uvu":
        module = cuet.ChannelWiseTensorProduct(
            irreps(args["irreps_in1"]),
            irreps(args["irreps_in2"]),
            irreps(problem["irreps_out_target"]),
            **common,
        )
        # Each channelwise path has its own output block; cue orders the weights by that block.
        paths = sorted(paths, key=lambda t: args["instructions"][t][2])
    else:
        module = cuet.FullyConnectedTensorProduct(
            irreps(args["irreps_in1"]), irreps(args["irreps_in2"]), irreps(args["irreps_out"]), **common
        )
    if str(module.irreps_out) != args["irreps_out"]:
        raise ValueError(f"cue's output irreps {module.irreps_out} differ from e3nn's {args['irreps_out']}")
    return module, _weight_permutation(_path_sizes(args), list(paths)).to(cfg.device)


def import_oeq():
    """The openequivariance package, or ``Unavailable``."""
    try:
        import openequivariance as oeq
    except ImportError as err:
        raise Unavailable(f"OpenEquivariance: {err}") from err
    return oeq


def oeq_problem(args: dict, cfg: Config):
    """OpenEquivariance's TPProblem for e3nn.o3.TensorProduct(**args) at the config's dtype."""
    oeq = import_oeq()
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[cfg.dtype]
    return oeq.TPProblem(
        oeq.Irreps(args["irreps_in1"]),
        oeq.Irreps(args["irreps_in2"]),
        oeq.Irreps(args["irreps_out"]),
        args["instructions"],
        shared_weights=args["shared_weights"],
        internal_weights=False,
        irrep_dtype=np_dtype,
        weight_dtype=np_dtype,
    )


def oeq_weight_perm(module, n_w: int, shared: bool, device: torch.device) -> Tensor:
    """Index gathering an OpenEquivariance module's weight order from e3nn's (its reorder is a permutation:
    read it off indices)."""
    probe = torch.arange(n_w, dtype=torch.float64)
    probe = module.reorder_weights_from_e3nn(probe if shared else probe[None], has_batch_dim=not shared)
    return probe.reshape(-1).long().to(device)


def cases(cfg: Config) -> list[Case]:
    """One case per problem of anchors.json "tensor_product"."""
    return [_case(problem, cfg) for problem in anchors()["tensor_product"]]


def _case(problem: dict, cfg: Config) -> Case:
    args = tensor_product_arguments(problem)
    n1, n2, n_out, n_w = problem["dims_in1_in2_out_weights"]
    batch, shared = cfg.batch, args["shared_weights"]
    like = {"device": cfg.device, "dtype": cfg.dtype}

    def inputs() -> tuple[Tensor, ...]:
        w = torch.randn(n_w, **like) if shared else torch.randn(batch, n_w, **like)
        return torch.randn(batch, n1, **like), torch.randn(batch, n2, **like), w

    def e3nn_impl() -> Impl:
        module = o3.TensorProduct(**args).to(**like)
        dims = [module.irreps_in1.dim, module.irreps_in2.dim, module.irreps_out.dim, module.weight_numel]
        if dims != problem["dims_in1_in2_out_weights"]:
            raise ValueError(f"construction gives dims {dims}, anchors.json says {n1, n2, n_out, n_w}")
        return Impl(module)

    def equikern_impl(backend: str = "auto") -> Impl:
        import equikern

        module = equikern.TensorProduct(**args, backend=backend).to(**like)
        return Impl(module, note=f"backend={backend}, route={equikern_route(module, cfg)}")

    def cue_impl() -> Impl:
        module, perm = cue_module(problem, args, cfg)

        def to_native(xs):
            x1, x2, w = xs
            w = w[..., perm]
            return (
                to_ir_mul(x1, args["irreps_in1"]),
                to_ir_mul(x2, args["irreps_in2"]),
                w[None] if shared else w,
            )

        return Impl(module, to_native, lambda out: from_ir_mul(out, args["irreps_out"]))

    def oeq_impl() -> Impl:
        if cfg.device.type != "cuda":
            raise Unavailable("needs CUDA: OpenEquivariance's kernels run only on a GPU")
        oeq = import_oeq()
        module = oeq.TensorProduct(oeq_problem(args, cfg), torch_op=True)
        perm = oeq_weight_perm(module, n_w, shared, cfg.device)
        return Impl(module, lambda xs: (xs[0], xs[1], xs[2][..., perm]))

    impls = {"equikern": equikern_impl, "e3nn": e3nn_impl, "cue": cue_impl, "oeq": oeq_impl}
    if cfg.device.type == "cuda":
        # backend="auto" takes the Triton kernels for these products on CUDA: time the C++/CUDA op too
        impls["equikern_native"] = lambda: equikern_impl("native")

    itemsize = cfg.dtype.itemsize
    in_bytes = (batch * (n1 + n2) + (n_w if shared else batch * n_w)) * itemsize
    return Case(
        family=FAMILY,
        label=problem["label"],
        params={
            "mode": problem["mode"],
            "irreps_in1": args["irreps_in1"],
            "irreps_in2": args["irreps_in2"],
            "irreps_out": args["irreps_out"],
            "weights": "shared" if shared else "per-sample",
            "dims_in1_in2_out_weights": problem["dims_in1_in2_out_weights"],
        },
        inputs=inputs,
        impls=impls,
        floor_bytes=io_floor(in_bytes, batch * n_out * itemsize),
        published=_published(problem, cfg),
        fallback_reference="equikern",
    )
