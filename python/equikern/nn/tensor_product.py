"""Drop-in replacements for ``e3nn.o3.TensorProduct`` and its subclasses.

The constructor plans the work once: it normalises the instructions exactly as e3nn does, gathers
the sparse Wigner 3j coefficients of every path (scaled by the path normalisation) and stores the
result as small integer/float tables that the compiled op consumes. ``forward`` only reshapes and
calls ``torch.ops.equikern.tensor_product`` (C++ on the CPU, CUDA on the GPU) or, for channelwise
(``uvu``) instruction lists on the GPU, the Triton kernels generated for the plan
(``equikern.triton.tensor_product``); ``backend`` chooses.
"""

import importlib.util
import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from equikern.irreps import Irrep, Irreps, as_irreps
from equikern.ops.tensor_product import tensor_product
from equikern.so3 import wigner_3j_sparse
from equikern.triton.tensor_product import tensor_product as triton_tensor_product

MODES = {"uvw": 0, "uvu": 1, "uvv": 2, "uuw": 3, "uuu": 4, "uvuv": 5}
BACKENDS = ("auto", "native", "triton")
IRREP_NORMALIZATIONS = ("component", "norm", "none")
PATH_NORMALIZATIONS = ("element", "path", "none")


class Instruction(NamedTuple):
    """One path of a tensor product, as in e3nn (``path_weight`` includes the normalisation)."""

    i_in1: int
    i_in2: int
    i_out: int
    connection_mode: str
    has_weight: bool
    path_weight: float
    path_shape: tuple


def _path_shape(mode: str, mul1: int, mul2: int, mulo: int) -> tuple:
    return {
        "uvw": (mul1, mul2, mulo),
        "uvu": (mul1, mul2),
        "uvv": (mul1, mul2),
        "uuw": (mul1, mulo),
        "uuu": (mul1,),
        "uvuv": (mul1, mul2),
    }[mode]


def _num_elements(mode: str, mul1: int, mul2: int) -> int:
    """Number of terms summed into one output component (e3nn's 'element' normalisation)."""
    return {"uvw": mul1 * mul2, "uvu": mul2, "uvv": mul1, "uuw": mul1, "uuu": 1, "uvuv": 1}[mode]


def _variances(var, irreps: Irreps, name: str) -> list[float]:
    if var is None:
        return [1.0] * len(irreps)
    var = [float(v) for v in var]
    if len(var) != len(irreps):
        raise ValueError(f"{name}: expected {len(irreps)} variances (one per irrep), got {len(var)}")
    if not all(math.isfinite(v) and v >= 0 for v in var):
        raise ValueError(f"{name}: variances must be finite and non-negative, got {var}")
    return var


def _check_instruction(ins, irreps_in1: Irreps, irreps_in2: Irreps, irreps_out: Irreps) -> tuple:
    if not isinstance(ins, (tuple, list)) or len(ins) not in (5, 6):
        raise ValueError(
            f"instructions: each must be (i_in1, i_in2, i_out, mode, has_weight[, path_weight]), got {ins!r}"
        )
    i1, i2, io, mode, has_weight = ins[:5]
    path_weight = float(ins[5]) if len(ins) == 6 else 1.0
    for i, irreps, name in ((i1, irreps_in1, "i_in1"), (i2, irreps_in2, "i_in2"), (io, irreps_out, "i_out")):
        if not isinstance(i, int) or not 0 <= i < len(irreps):
            raise ValueError(f"instructions: {name}={i!r} in {ins!r} is not an index of {irreps}")
    if mode not in MODES:
        raise ValueError(
            f"instructions: connection mode {mode!r} in {ins!r} is not one of {sorted(MODES)}"
            + (" (not supported by equikern yet)" if mode in ("uvu<v", "u<vw") else "")
        )
    if not math.isfinite(path_weight) or path_weight < 0:
        raise ValueError(f"instructions: path_weight must be finite and >= 0, got {path_weight} in {ins!r}")
    (mul1, ir1), (mul2, ir2), (mulo, iro) = irreps_in1[i1], irreps_in2[i2], irreps_out[io]
    if ir1.p * ir2.p != iro.p:
        raise ValueError(f"instructions: {ins!r} violates parity: {ir1} x {ir2} cannot give {iro}")
    if not abs(ir1.l - ir2.l) <= iro.l <= ir1.l + ir2.l:
        raise ValueError(f"instructions: {ins!r} violates the triangle rule: {ir1} x {ir2} cannot give {iro}")
    need = {
        "uvu": (mul1 == mulo, "mul(in1) == mul(out)"),
        "uvv": (mul2 == mulo, "mul(in2) == mul(out)"),
        "uuw": (
            mul1 == mul2 and (bool(has_weight) or mulo == 1),
            "mul(in1) == mul(in2) (and mul(out) == 1 unweighted)",
        ),
        "uuu": (mul1 == mul2 == mulo, "mul(in1) == mul(in2) == mul(out)"),
        "uvuv": (mul1 * mul2 == mulo, "mul(in1) * mul(in2) == mul(out)"),
        "uvw": (bool(has_weight), "has_weight=True"),
    }[mode]
    if not need[0]:
        raise ValueError(f"instructions: mode {mode!r} of {ins!r} requires {need[1]}")
    return i1, i2, io, mode, bool(has_weight), path_weight


class TensorProduct(torch.nn.Module):
    """Tensor product of two irreps features, with e3nn's constructor, weights and output.

    See ``e3nn.o3.TensorProduct``; ``instructions`` are tuples
    ``(i_in1, i_in2, i_out, connection_mode, has_weight[, path_weight])`` with modes
    uvw, uvu, uvv, uuw, uuu, uvuv. ``forward(x, y, weight=None)`` broadcasts the batch dimensions of
    x, y (and per-sample weights) like e3nn.

    ``backend``: "native" runs the compiled C++/CUDA op; "triton" runs Triton kernels generated for
    the instruction list (every instruction ``uvu``, or every instruction ``uvw``; on a CPU only under
    Triton's interpreter, ``TRITON_INTERPRET=1``, for testing); "auto" (default) takes Triton for CUDA
    tensors when the instructions allow it and triton is installed, "native" otherwise. The Triton
    kernels also take float16/bfloat16 inputs (computed in float32).
    """

    def __init__(
        self,
        irreps_in1,
        irreps_in2,
        irreps_out,
        instructions: list,
        in1_var=None,
        in2_var=None,
        out_var=None,
        irrep_normalization: str | None = None,
        path_normalization: str | None = None,
        internal_weights: bool | None = None,
        shared_weights: bool | None = None,
        backend: str = "auto",
        **e3nn_options,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        unknown = set(e3nn_options) - {
            "compile_left_right",
            "compile_right",
            "_specialized_code",
            "_optimize_einsums",
        }
        if unknown:
            raise TypeError(f"TensorProduct: unexpected keyword arguments {sorted(unknown)}")
        irrep_normalization = "component" if irrep_normalization is None else irrep_normalization
        path_normalization = "element" if path_normalization is None else path_normalization
        if irrep_normalization not in IRREP_NORMALIZATIONS:
            raise ValueError(
                f"irrep_normalization: expected one of {IRREP_NORMALIZATIONS}, got {irrep_normalization!r}"
            )
        if path_normalization not in PATH_NORMALIZATIONS:
            raise ValueError(
                f"path_normalization: expected one of {PATH_NORMALIZATIONS}, got {path_normalization!r}"
            )
        self.irreps_in1 = as_irreps(irreps_in1)
        self.irreps_in2 = as_irreps(irreps_in2)
        self.irreps_out = as_irreps(irreps_out)
        self.irrep_normalization = irrep_normalization
        self.path_normalization = path_normalization

        raw = [
            _check_instruction(ins, self.irreps_in1, self.irreps_in2, self.irreps_out) for ins in instructions
        ]
        v1 = _variances(in1_var, self.irreps_in1, "in1_var")
        v2 = _variances(in2_var, self.irreps_in2, "in2_var")
        vo = _variances(out_var, self.irreps_out, "out_var")
        self.instructions = self._normalize(raw, v1, v2, vo)

        if shared_weights is False and internal_weights is None:
            internal_weights = False
        if shared_weights is None:
            shared_weights = True
        if internal_weights is None:
            internal_weights = shared_weights and any(i.has_weight for i in self.instructions)
        if internal_weights and not shared_weights:
            raise ValueError("internal_weights=True requires shared_weights=True")
        self.internal_weights = bool(internal_weights)
        self.shared_weights = bool(shared_weights)
        self.weight_numel = sum(math.prod(i.path_shape) for i in self.instructions if i.has_weight)
        if self.internal_weights and self.weight_numel > 0:
            self.weight = torch.nn.Parameter(torch.randn(self.weight_numel))
        else:
            self.register_buffer("weight", torch.Tensor())
        self.register_buffer("output_mask", self._output_mask())
        # plain ints for forward(): cheap for torch.compile to guard on
        self._dim1, self._dim2, self._dim_out = self.irreps_in1.dim, self.irreps_in2.dim, self.irreps_out.dim
        self._register_plan()
        self.backend = backend
        self._triton_key = self._register_triton(backend)

    def _register_triton(self, backend: str) -> str | None:
        """The key of this plan's Triton kernels, or None where the Triton route is not taken."""
        if backend == "native":
            return None
        from equikern.triton import tensor_product as triton_tp  # numpy only: triton loads lazily

        tables = (self._paths.numpy(), self._cg_ijk.numpy(), self._cg_bits.view(torch.float64).numpy())
        if not triton_tp.supports(tables[0]):
            if backend == "triton":
                modes = sorted({i.connection_mode for i in self.instructions})
                raise ValueError(
                    "backend='triton' needs every instruction 'uvu', or every instruction 'uvw' with at most "
                    f"{triton_tp.MAX_UVW_CHANNELS} output channels; got modes {modes}"
                )
            return None
        if importlib.util.find_spec("triton") is None:
            if backend == "triton":
                raise ValueError("backend='triton' needs the triton package (pip install triton)")
            return None
        return triton_tp.register_plan(*tables)

    def _normalize(self, raw, v1, v2, vo) -> list[Instruction]:
        """e3nn's path normalisation: path_weight = sqrt(alpha), folded into the coefficients."""
        out = []
        for i1, i2, io, mode, has_weight, pw in raw:
            (mul1, ir1), (mul2, ir2), (mulo, iro) = (
                self.irreps_in1[i1],
                self.irreps_in2[i2],
                self.irreps_out[io],
            )
            alpha = {"component": iro.dim, "norm": ir1.dim * ir2.dim, "none": 1}[self.irrep_normalization]
            same_out = [r for r in raw if r[2] == io]
            if self.path_normalization == "element":
                x = sum(
                    v1[r[0]]
                    * v2[r[1]]
                    * _num_elements(r[3], self.irreps_in1[r[0]].mul, self.irreps_in2[r[1]].mul)
                    for r in same_out
                )
            elif self.path_normalization == "path":
                x = v1[i1] * v2[i2] * _num_elements(mode, mul1, mul2) * len(same_out)
            else:
                x = 1
            if x > 0.0:
                alpha /= x
            alpha *= vo[io] * pw
            out.append(
                Instruction(
                    i1, i2, io, mode, has_weight, math.sqrt(alpha), _path_shape(mode, mul1, mul2, mulo)
                )
            )
        return out

    def _output_mask(self) -> Tensor:
        if self.irreps_out.dim == 0:
            return torch.ones(0)
        return torch.cat(
            [
                torch.full(
                    (mul * ir.dim,),
                    float(
                        any(
                            i.i_out == io and i.path_weight != 0 and 0 not in i.path_shape
                            for i in self.instructions
                        )
                    ),
                )
                for io, (mul, ir) in enumerate(self.irreps_out)
            ]
        )

    def _register_plan(self) -> None:
        """The tables the compiled op reads: paths, operand blocks and sparse CG coefficients."""
        s1, s2, so = self.irreps_in1.slices(), self.irreps_in2.slices(), self.irreps_out.slices()
        blocks = [
            (operand, sl.start, mul, ir.dim)
            for operand, (irreps, slices) in enumerate(
                ((self.irreps_in1, s1), (self.irreps_in2, s2), (self.irreps_out, so))
            )
            for sl, (mul, ir) in zip(slices, irreps)
            if mul * ir.dim > 0
        ]
        paths, ijk, val = [], [], []
        woff = 0
        for ins in self.instructions:
            size = math.prod(ins.path_shape)
            offset = woff if ins.has_weight else -1
            if ins.has_weight:
                woff += size
            (mul1, ir1), (mul2, ir2), (mulo, iro) = (
                self.irreps_in1[ins.i_in1],
                self.irreps_in2[ins.i_in2],
                self.irreps_out[ins.i_out],
            )
            if ins.path_weight == 0 or mul1 == 0 or mul2 == 0 or mulo == 0:
                continue  # contributes nothing; its weights (if any) keep their slot
            cg_ijk, cg_val = wigner_3j_sparse(ir1.l, ir2.l, iro.l)
            begin = sum(len(v) for v in val)
            ijk.append(cg_ijk)
            val.append(cg_val * ins.path_weight)
            paths.append(
                (
                    MODES[ins.connection_mode],
                    s1[ins.i_in1].start,
                    mul1,
                    ir1.dim,
                    s2[ins.i_in2].start,
                    mul2,
                    ir2.dim,
                )
                + (so[ins.i_out].start, mulo, iro.dim, offset, begin, begin + len(cg_val))
            )
        ijk_np = np.concatenate(ijk).astype(np.int32) if ijk else np.zeros((0, 3), np.int32)
        val_np = np.concatenate(val).astype(np.float64) if val else np.zeros(0)
        self.register_buffer(
            "_paths", torch.tensor(paths, dtype=torch.int64).reshape(-1, 13), persistent=False
        )
        self.register_buffer(
            "_blocks", torch.tensor(blocks, dtype=torch.int64).reshape(-1, 4), persistent=False
        )
        self.register_buffer("_cg_ijk", torch.from_numpy(ijk_np).reshape(-1, 3), persistent=False)
        # float64 coefficients kept as their int64 bit patterns, so that module.float()/.half()
        # (which cast floating buffers) never round them.
        self.register_buffer("_cg_bits", torch.from_numpy(val_np).view(torch.int64), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # e3nn's state_dict also holds its generated code's Wigner 3j buffers; equikern computes
        # its own coefficients, so those entries are accepted and ignored.
        for key in [k for k in state_dict if k.startswith(prefix + "_compiled_main_")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        npath = sum(math.prod(i.path_shape) for i in self.instructions)
        return (
            f"{self.__class__.__name__}({self.irreps_in1.simplify()} x {self.irreps_in2.simplify()} "
            f"-> {self.irreps_out.simplify()} | {npath} paths | {self.weight_numel} weights)"
        )

    # -- weights -----------------------------------------------------------------------------------

    def _get_weights(self, weight) -> Tensor:
        if isinstance(weight, (list, tuple)):
            shapes = [i.path_shape for i in self.instructions if i.has_weight]
            if self.shared_weights:
                weight = torch.cat([w.reshape(math.prod(s)) for w, s in zip(weight, shapes)], dim=-1)
            else:
                weight = torch.cat([w.reshape(-1, math.prod(s)) for w, s in zip(weight, shapes)], dim=-1)
        if weight is None:
            if self.weight_numel > 0 and not self.internal_weights:
                raise ValueError("weight: required, since this TensorProduct has no internal weights")
            return self.weight
        if not isinstance(weight, Tensor):
            raise ValueError(f"weight: expected a tensor, got {type(weight).__name__}")
        got = tuple(weight.shape)
        if self.shared_weights:
            if got != (self.weight_numel,):
                raise ValueError(f"weight: expected shape ({self.weight_numel},) (shared weights), got {got}")
        elif weight.dim() < 2 or weight.shape[-1] != self.weight_numel:
            raise ValueError(
                f"weight: expected shape (..., {self.weight_numel}) with a batch dimension, got {got}"
            )
        return weight

    def weight_views(self, weight: Tensor | None = None, yield_instruction: bool = False) -> Iterator:
        """Views of the flat weights, one per weighted instruction, shaped like ``path_shape``."""
        weight = self._get_weights(weight)
        batch = weight.shape[:-1]
        offset = 0
        for i, ins in enumerate(self.instructions):
            if ins.has_weight:
                n = math.prod(ins.path_shape)
                view = weight.narrow(-1, offset, n).reshape(batch + ins.path_shape)
                offset += n
                yield (i, ins, view) if yield_instruction else view

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
        w = self._get_weights(weight)
        for t, name, dim in ((x, "x", self._dim1), (y, "y", self._dim2)):
            if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[-1] != dim:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                irreps = self.irreps_in1 if name == "x" else self.irreps_in2
                raise ValueError(f"{name}: expected shape (..., {dim}) for irreps {irreps}, got {got}")
        if y.dtype != x.dtype or (self.weight_numel and w.dtype != x.dtype):
            raise ValueError(f"x, y, weight: dtypes differ ({x.dtype}, {y.dtype}, {w.dtype})")
        if y.device != x.device or (self.weight_numel and w.device != x.device):
            raise ValueError(f"x, y, weight: devices differ ({x.device}, {y.device}, {w.device})")
        shapes = [x.shape[:-1], y.shape[:-1]]
        if not self.shared_weights:
            shapes.append(w.shape[:-1])
        try:
            batch = torch.broadcast_shapes(*shapes)
        except RuntimeError as e:
            raise ValueError(
                f"x, y, weight: batch shapes {[tuple(s) for s in shapes]} do not broadcast"
            ) from e
        x1 = _rows(x, batch)
        x2 = _rows(y, batch)
        if self.weight_numel == 0:
            w2 = x.new_zeros(1, 0)
        elif self.shared_weights:
            w2 = w.reshape(1, -1)
        else:
            w2 = _rows(w, batch)
        cg_val = self._cg_bits.view(torch.float64)
        if self._triton_key is not None and (self.backend == "triton" or x1.is_cuda):
            out = triton_tensor_product(
                x1, x2, w2, self._paths, self._cg_ijk, cg_val, self._triton_key, self._dim_out
            )
        else:
            out = tensor_product(x1, x2, w2, self._paths, self._blocks, self._cg_ijk, cg_val, self._dim_out)
        return out.reshape(batch + (self._dim_out,))

    def right(self, y: Tensor, weight: Tensor | None = None) -> Tensor:
        """The linear map x -> forward(x, y): a tensor of shape (..., irreps_in1.dim, irreps_out.dim)."""
        d1 = self.irreps_in1.dim
        eye = torch.eye(d1, dtype=y.dtype, device=y.device).reshape((d1,) + (1,) * (y.dim() - 1) + (d1,))
        return self.forward(eye, y, weight).movedim(0, -2)


def _rows(t: Tensor, batch: torch.Size) -> Tensor:
    """t as [Z or 1, dim] for the op: size-1 batches broadcast inside the kernel, others expand here."""
    if t.shape[:-1] == batch:
        return t.reshape(-1, t.shape[-1])
    if math.prod(t.shape[:-1]) == 1:
        return t.reshape(1, t.shape[-1])
    return t.expand(batch + t.shape[-1:]).reshape(-1, t.shape[-1])


class FullyConnectedTensorProduct(TensorProduct):
    """Every (in1, in2, out) triple allowed by the selection rules, mode uvw, weighted (as e3nn)."""

    def __init__(
        self, irreps_in1, irreps_in2, irreps_out, irrep_normalization=None, path_normalization=None, **kwargs
    ):
        irreps_in1, irreps_in2, irreps_out = (
            as_irreps(irreps_in1),
            as_irreps(irreps_in2),
            as_irreps(irreps_out),
        )
        instr = [
            (i1, i2, io, "uvw", True, 1.0)
            for i1, (_, ir1) in enumerate(irreps_in1)
            for i2, (_, ir2) in enumerate(irreps_in2)
            for io, (_, iro) in enumerate(irreps_out)
            if iro in ir1 * ir2
        ]
        super().__init__(
            irreps_in1,
            irreps_in2,
            irreps_out,
            instr,
            irrep_normalization=irrep_normalization,
            path_normalization=path_normalization,
            **kwargs,
        )


def _filter(filter_ir_out):
    if filter_ir_out is None:
        return None
    try:
        return [Irrep(ir) for ir in filter_ir_out]
    except (ValueError, TypeError) as e:
        raise ValueError(f"filter_ir_out: expected an iterable of irreps, got {filter_ir_out!r}") from e


class ElementwiseTensorProduct(TensorProduct):
    """Channel by channel product of two features with the same number of irreps (mode uuu)."""

    def __init__(self, irreps_in1, irreps_in2, filter_ir_out=None, irrep_normalization=None, **kwargs):
        irreps_in1, irreps_in2 = as_irreps(irreps_in1).simplify(), as_irreps(irreps_in2).simplify()
        filter_ir_out = _filter(filter_ir_out)
        if irreps_in1.num_irreps != irreps_in2.num_irreps:
            raise ValueError(
                f"irreps_in1, irreps_in2: need the same number of irreps, got {irreps_in1.num_irreps} "
                f"and {irreps_in2.num_irreps}"
            )
        a, b = list(irreps_in1), list(irreps_in2)
        i = 0
        while i < len(a):  # split blocks so that multiplicities line up
            (m1, ir1), (m2, ir2) = a[i], b[i]
            if m1 < m2:
                b[i : i + 1] = [(m1, ir2), (m2 - m1, ir2)]
            elif m2 < m1:
                a[i : i + 1] = [(m2, ir1), (m1 - m2, ir1)]
            i += 1
        out, instr = [], []
        for i, ((mul, ir1), (_, ir2)) in enumerate(zip(a, b)):
            for ir in ir1 * ir2:
                if filter_ir_out is not None and ir not in filter_ir_out:
                    continue
                instr.append((i, i, len(out), "uuu", False))
                out.append((mul, ir))
        super().__init__(
            Irreps(a), Irreps(b), Irreps(out), instr, irrep_normalization=irrep_normalization, **kwargs
        )


class FullTensorProduct(TensorProduct):
    """All products of all pairs of channels (mode uvuv, no weights), output sorted (as e3nn)."""

    def __init__(self, irreps_in1, irreps_in2, filter_ir_out=None, irrep_normalization=None, **kwargs):
        irreps_in1, irreps_in2 = as_irreps(irreps_in1).simplify(), as_irreps(irreps_in2).simplify()
        filter_ir_out = _filter(filter_ir_out)
        out, instr = [], []
        for i1, (mul1, ir1) in enumerate(irreps_in1):
            for i2, (mul2, ir2) in enumerate(irreps_in2):
                for ir in ir1 * ir2:
                    if filter_ir_out is not None and ir not in filter_ir_out:
                        continue
                    instr.append((i1, i2, len(out), "uvuv", False))
                    out.append((mul1 * mul2, ir))
        out, p, _ = Irreps(out).sort()
        instr = [(i1, i2, p[io], mode, w) for i1, i2, io, mode, w in instr]
        super().__init__(
            irreps_in1, irreps_in2, out, instr, irrep_normalization=irrep_normalization, **kwargs
        )


def channelwise_instructions(irreps_in1, irreps_in2, irreps_out) -> tuple[Irreps, list]:
    """The channelwise (uvu) construction of MACE and NequIP convolutions.

    For every (i, ir1) of in1, (j, ir2) of in2 and every ir in ir1 * ir2 that appears in
    ``irreps_out``, one output block mul(i) x ir and one weighted uvu path; the output irreps are
    then sorted and the paths renumbered. Returns (irreps_out, instructions).
    """
    irreps_in1, irreps_in2, target = as_irreps(irreps_in1), as_irreps(irreps_in2), as_irreps(irreps_out)
    wanted = {ir for _, ir in target}
    out, instr = [], []
    for i, (mul, ir1) in enumerate(irreps_in1):
        for j, (_, ir2) in enumerate(irreps_in2):
            for ir in ir1 * ir2:
                if ir in wanted:
                    instr.append((i, j, len(out), "uvu", True))
                    out.append((mul, ir))
    out, p, _ = Irreps(out).sort()
    return out, [(i, j, p[k], mode, w) for i, j, k, mode, w in instr]


class ChannelwiseTensorProduct(TensorProduct):
    """The channelwise (uvu, per-sample weights) product of MACE and NequIP convolutions.

    ``irreps_out`` is the target: which irreps to produce. The module's own ``irreps_out`` is the
    sorted list of the blocks produced (see :func:`channelwise_instructions`).
    """

    def __init__(
        self, irreps_in1, irreps_in2, irreps_out, shared_weights=False, internal_weights=False, **kwargs
    ):
        out, instr = channelwise_instructions(irreps_in1, irreps_in2, irreps_out)
        super().__init__(
            irreps_in1,
            irreps_in2,
            out,
            instr,
            shared_weights=shared_weights,
            internal_weights=internal_weights,
            **kwargs,
        )
