"""e3nn's real spherical harmonics as generated Triton kernels, differentiable to any order.

The math: Y_l(x) are homogeneous polynomials of x (of u = x / max(|x|, 1e-12) with ``normalize=True``, as
``torch.nn.functional.normalize``), built by the recurrence of :mod:`equikern.so3`
(Y_{l+1} = (Y_l outer x) @ M_l, e3nn's basis, y the polar axis). For the requested degrees the recurrence is
unrolled at generation time into a straight-line program over scalars (the sparse M_l entries and the
normalisation constants folded in float64), and that program is differentiated symbolically:

- forward-mode: the directional derivative D^m f(x)[v_1, ..., v_m] of the output, for m directions;
- reverse-mode: the gradient with respect to x of T_m = g . D^m f(x)[v_1, ..., v_m] for an output weight g.

Each (degrees, normalize, normalization, compute dtype, m, outputs) gets one kernel, written as Python source
to a cache file (``$EQUIKERN_CACHE_DIR`` or ``~/.cache/equikern/triton``, named by a hash of the source;
triton.jit needs a real file) and imported once per process. A program handles ``BLOCK`` vectors, one per
lane. float16/bfloat16 inputs are computed in float32; float32 and float64 in their own precision.

Three ops, every one a Triton kernel, every derivative built from the same three ops (so derivatives of any
order work; there is no torch fallback):

- ``equikern::triton_spherical_harmonics(x [N, 3], ...) -> [N, D]``: f(x), D = sum(2l + 1);
- ``equikern::triton_spherical_harmonics_backward(grad [N, D], x, ...) -> [N, 3]``: grad_x of grad . f(x);
- ``equikern::triton_spherical_harmonics_jet(grad [N, D], x, directions [m, N, 3], ...)``
  ``-> (D^m f[v] [N, D], grad_x T_m [N, 3])``, m >= 1: the double backward is the jet with m = 1
  (direction = the incoming gradient of grad_x), its own derivatives are jets with m - 1, m and m + 1.

With T_m(g, x, V) = g . D^m f(x)[V] the identities used are: d/dg T_m = D^m f[V] (the jet's first output),
d/dx T_m (its second) and, the derivatives being symmetric, d/dv_i T_m = grad_x T_{m-1}(g, x, V without
v_i). So for a cotangent (c_a, c_b) of the jet's outputs, L = T_m(c_a, x, V) + T_{m+1}(g, x, V + [c_b]).

The ops are ``torch.library.custom_op`` with fake kernels, like every equikern op: ``torch.compile`` and
``torch.export`` keep them as opaque calls. (``triton_op`` would let the compiler see the kernels, but
under Triton's interpreter, which is how CI runs them, kernels cannot be traced; one registration for
both keeps what CI tests the same as what runs on a GPU.)
"""

import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from pathlib import Path

import torch
import triton
from torch import Tensor

from equikern import so3

__all__ = ["spherical_harmonics", "triton_spherical_harmonics", "spherical_harmonics_kernel_source"]

_NORMALIZATIONS = ("integral", "component", "norm")
_EPS = 1e-12  # torch.nn.functional.normalize's default, as e3nn uses it
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_DTYPES = (torch.float32, torch.float64)

# ---------------------------------------------------------------------------------------------------------
# A tiny symbolic straight-line program: hash-consed nodes over scalars (one lane of the kernel).
#   ("leaf", name)   an input scalar: x0..x2, g<k>, v<a>_<j>
#   ("const", c)     a float64 constant
#   ("add", a, b), ("mul", a, b)
#   ("invnorm",)     n = 1 / max(|x|, eps)
#   ("mask",)        c = 1 if |x| >= eps else 0 (piecewise constant: derivative 0)
# The derivative of n is -n^3 c x_j dx_j: zero where the clamp is active, as torch's normalize.
# ---------------------------------------------------------------------------------------------------------


class _Program:
    def __init__(self) -> None:
        self.nodes: list[tuple] = []
        self._ids: dict[tuple, int] = {}

    def _node(self, key: tuple) -> int:
        i = self._ids.get(key)
        if i is None:
            i = len(self.nodes)
            self.nodes.append(key)
            self._ids[key] = i
        return i

    def leaf(self, name: str) -> int:
        return self._node(("leaf", name))

    def const(self, c: float) -> int:
        return self._node(("const", float(c) + 0.0))  # + 0.0: -0.0 and 0.0 are one node

    def value(self, i: int) -> float | None:
        node = self.nodes[i]
        return node[1] if node[0] == "const" else None

    def add(self, a: int, b: int) -> int:
        ca, cb = self.value(a), self.value(b)
        if ca is not None and cb is not None:
            return self.const(ca + cb)
        if ca == 0.0:
            return b
        if cb == 0.0:
            return a
        return self._node(("add", min(a, b), max(a, b)))

    def mul(self, a: int, b: int) -> int:
        ca, cb = self.value(a), self.value(b)
        if ca is not None and cb is not None:
            return self.const(ca * cb)
        if cb is not None:
            a, b, ca, cb = b, a, cb, ca
        if ca is not None:  # constant first: fold constant chains, drop 0 and 1
            if ca == 0.0:
                return self.const(0.0)
            if ca == 1.0:
                return b
            nb = self.nodes[b]
            if nb[0] == "mul" and self.value(nb[1]) is not None:
                return self.mul(self.const(ca * self.value(nb[1])), nb[2])
            return self._node(("mul", a, b))
        return self._node(("mul", min(a, b), max(a, b)))

    def sum(self, terms) -> int:
        out = self.const(0.0)
        for t in terms:
            out = self.add(out, t)
        return out

    def is_zero(self, i: int) -> bool:
        return self.value(i) == 0.0

    def reachable(self, roots) -> list[int]:
        """Node ids that the roots depend on, in increasing (topological) order."""
        seen = set()
        stack = list(roots)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            node = self.nodes[i]
            if node[0] in ("add", "mul"):
                stack.extend(node[1:])
        return sorted(seen)


def _invnorm_partials(p: _Program, n: int, xs: list[int]) -> list[int]:
    """d n / d x_j = -n^3 c x_j (0 where |x| < eps, as torch's clamp_min)."""
    coef = p.mul(p.const(-1.0), p.mul(p.mul(n, p.mul(n, n)), p._node(("mask",))))
    return [p.mul(coef, x) for x in xs]


def _tangent(p: _Program, outputs: list[int], xs: list[int], vs: list[int]) -> list[int]:
    """Forward mode: d/de outputs(x + e v) at e = 0 (all leaves but x are constants)."""
    x_index = {x: j for j, x in enumerate(xs)}
    tan: dict[int, int] = {}
    zero = p.const(0.0)
    for i in p.reachable(outputs):
        node = p.nodes[i]
        op = node[0]
        if op == "leaf":
            tan[i] = vs[x_index[i]] if i in x_index else zero
        elif op in ("const", "mask"):
            tan[i] = zero
        elif op == "invnorm":
            tan[i] = p.sum(p.mul(d, v) for d, v in zip(_invnorm_partials(p, i, xs), vs))
        elif op == "add":
            tan[i] = p.add(tan[node[1]], tan[node[2]])
        else:  # mul
            a, b = node[1], node[2]
            tan[i] = p.add(p.mul(tan[a], b), p.mul(a, tan[b]))
    return [tan[o] for o in outputs]


def _gradient(p: _Program, outputs: list[int], weights: list[int], xs: list[int]) -> list[int]:
    """Reverse mode: d/dx of sum_k weights[k] * outputs[k] (weights are leaves, constant in x)."""
    adj: dict[int, int] = {}

    def acc(i: int, a: int) -> None:
        if not p.is_zero(a):
            adj[i] = p.add(adj[i], a) if i in adj else a

    for o, w in zip(outputs, weights):
        acc(o, w)
    for i in reversed(p.reachable(outputs)):
        a = adj.get(i)
        if a is None:
            continue
        node = p.nodes[i]
        if node[0] == "add":
            acc(node[1], a)
            acc(node[2], a)
        elif node[0] == "mul":
            acc(node[1], p.mul(a, node[2]))
            acc(node[2], p.mul(a, node[1]))
        elif node[0] == "invnorm":
            for x, d in zip(xs, _invnorm_partials(p, i, xs)):
                acc(x, p.mul(a, d))
    return [adj.get(x, p.const(0.0)) for x in xs]


@functools.cache
def _recurrence_terms(l: int) -> tuple[tuple[tuple[float, int, int], ...], ...]:
    """For each component k of Y_{l+1}: the nonzero (M_l[i*3+j, k], i, j), Y_{l+1}[k] = sum M Y_l[i] x_j."""
    m = so3._sh_step_np(l)[0]
    return tuple(
        tuple((float(m[3 * i + j, k]), i, j) for i in range(2 * l + 1) for j in range(3) if m[3 * i + j, k])
        for k in range(2 * l + 3)
    )


def _scale(l: int, normalization: str) -> float:
    if normalization == "integral":
        return 1 / math.sqrt(4 * math.pi)
    if normalization == "norm":
        return 1 / math.sqrt(2 * l + 1)
    return 1.0


def _build(degrees: tuple[int, ...], normalize: bool, normalization: str, m: int, value: bool, grad: bool):
    """The program of one kernel: (program, value outputs [D], grad outputs [3])."""
    p = _Program()
    xs = [p.leaf(f"x{j}") for j in range(3)]
    u = [p.mul(x, p._node(("invnorm",))) for x in xs] if normalize else xs
    lmax = max(degrees)
    ys = [[p.const(1.0)]]
    if lmax >= 1:
        ys.append([p.mul(p.const(math.sqrt(3)), uj) for uj in u])
    for l in range(1, lmax):
        prev = ys[-1]
        nxt = []
        for terms in _recurrence_terms(l):
            # group by j: sum_j u_j * (sum_i M y_i), 3 products per component
            nxt.append(
                p.sum(
                    p.mul(u[j], p.sum(p.mul(p.const(c), prev[i]) for c, i, jj in terms if jj == j))
                    for j in range(3)
                )
            )
        ys.append(nxt)
    outs = [p.mul(p.const(_scale(l, normalization)), y) for l in degrees for y in ys[l]]
    for a in range(m):
        outs = _tangent(p, outs, xs, [p.leaf(f"v{a}_{j}") for j in range(3)])
    grads = []
    if grad:
        grads = _gradient(p, outs, [p.leaf(f"g{k}") for k in range(len(outs))], xs)
    return p, (outs if value else []), grads


# ---------------------------------------------------------------------------------------------------------
# Emission: the program as a Triton kernel, one lane per vector.
# ---------------------------------------------------------------------------------------------------------


def _kernel_args(m: int, value: bool, grad: bool) -> list[str]:
    args = ["x_ptr"]
    if grad:
        args.append("g_ptr")
    args += [f"v{a}_ptr" for a in range(m)]
    if value:
        args.append("value_ptr")
    if grad:
        args.append("grad_ptr")
    return args + ["n_rows"]


def _emit(p: _Program, value_out, grad_out, dim: int, m: int, value: bool, grad: bool, compute: str) -> str:
    cdt = f"tl.{compute}"
    lines: list[str] = []
    names: dict[int, str] = {}

    def ref(i: int) -> str:
        c = p.value(i)
        return f"({c!r})" if c is not None else names[i]

    def full(i: int) -> str:
        c = p.value(i)
        return f"tl.full([BLOCK], {c!r}, {cdt})" if c is not None else names[i]

    lines.append("    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)")
    lines.append("    mask = rows < n_rows")
    for j in range(3):
        lines.append(f"    x{j} = tl.load(x_ptr + rows * 3 + {j}, mask=mask, other=0.0).to({cdt})")
    needed = p.reachable(list(value_out) + list(grad_out))
    kinds = {p.nodes[i][0] for i in needed}
    if "invnorm" in kinds or "mask" in kinds:
        # eps as a typed tensor: Triton may round a Python float operand of tl.maximum to float32
        lines.append(f"    eps = tl.full([BLOCK], {_EPS!r}, {cdt})")
        if compute == "float64":
            lines.append("    r = tl.sqrt(x0 * x0 + x1 * x1 + x2 * x2)")
            lines.append("    inv_r = 1.0 / tl.maximum(r, eps)")
        else:  # IEEE-rounded sqrt and division: Triton's defaults for float32 are approximate
            lines.append("    r = tl.sqrt_rn(x0 * x0 + x1 * x1 + x2 * x2)")
            lines.append(f"    inv_r = tl.div_rn(tl.full([BLOCK], 1.0, {cdt}), tl.maximum(r, eps))")
        lines.append(f"    r_mask = (r >= eps).to({cdt})")
    for i in needed:
        node = p.nodes[i]
        op = node[0]
        if op == "const":
            continue
        if op == "leaf":
            name = node[1]
            if name[0] == "x":
                names[i] = name
            elif name[0] == "g":
                names[i] = f"t{i}"
                lines.append(
                    f"    t{i} = tl.load(g_ptr + rows * {dim} + {name[1:]}, mask=mask, other=0.0).to({cdt})"
                )
            else:  # v<a>_<j>
                a, j = name[1:].split("_")
                names[i] = f"t{i}"
                lines.append(f"    t{i} = tl.load(v{a}_ptr + rows * 3 + {j}, mask=mask, other=0.0).to({cdt})")
        elif op == "invnorm":
            names[i] = "inv_r"
        elif op == "mask":
            names[i] = "r_mask"
        else:
            names[i] = f"t{i}"
            sym = "+" if op == "add" else "*"
            lines.append(f"    t{i} = {ref(node[1])} {sym} {ref(node[2])}")
    for k, o in enumerate(value_out):
        lines.append(
            f"    tl.store(value_ptr + rows * {dim} + {k}, {full(o)}.to(value_ptr.dtype.element_ty), "
            "mask=mask)"
        )
    for j, o in enumerate(grad_out):
        lines.append(
            f"    tl.store(grad_ptr + rows * 3 + {j}, {full(o)}.to(grad_ptr.dtype.element_ty), mask=mask)"
        )
    args = ", ".join(_kernel_args(m, value, grad))
    head = [
        "# generated by equikern.triton.spherical_harmonics (the file name is a hash of this text)",
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def kernel({args}, BLOCK: tl.constexpr):",
    ]
    return "\n".join(head + lines) + "\n"


def spherical_harmonics_kernel_source(
    ls,
    normalize: bool,
    normalization: str = "integral",
    compute: str = "float32",
    m: int = 0,
    value: bool = True,
    grad: bool = False,
) -> str:
    """The generated Triton source of one kernel (for reading; ``ls`` as in :func:`spherical_harmonics`).

    ``compute`` is "float32" or "float64"; the kernel computes D^m f[v_1..v_m] if ``value`` and the gradient
    of g . D^m f[v_1..v_m] with respect to x if ``grad`` (m = 0: the forward and the backward kernels).
    """
    if compute not in ("float32", "float64"):
        raise ValueError(f"compute must be 'float32' or 'float64', got {compute!r}")
    if not (value or grad) or m < 0:
        raise ValueError(f"need value or grad and m >= 0, got value={value}, grad={grad}, m={m}")
    degrees = _check_config(so3._sh_degrees(ls), normalization)
    return _source(degrees, bool(normalize), normalization, compute, int(m), bool(value), bool(grad))[0]


@functools.cache
def _source(degrees, normalize, normalization, compute, m, value, grad) -> tuple[str, int]:
    p, vo, go = _build(degrees, normalize, normalization, m, value, grad)
    src = _emit(p, vo, go, sum(2 * l + 1 for l in degrees), m, value, grad, compute)
    return src, src.count("\n")


def _cache_dir() -> Path:
    env = os.environ.get("EQUIKERN_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "equikern"
    d = base / "triton"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"equikern-triton-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _import_source(src: str):
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    modname = f"equikern_triton_sh_{digest}"
    mod = sys.modules.get(modname)
    if mod is not None:
        return mod
    path = _cache_dir() / f"sh_{digest}.py"
    if not path.exists() or path.read_text() != src:
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(src)
        os.replace(tmp, path)  # atomic: a concurrent process sees the old file or the whole new one
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[modname]
        raise
    return mod


_KERNELS: dict[tuple, tuple] = {}
_LOCK = threading.Lock()


def _kernel(
    degrees: tuple[int, ...],
    normalize: bool,
    normalization: str,
    dtype: torch.dtype,
    m: int,
    value: bool,
    grad: bool,
):
    """(kernel, BLOCK, num_warps), generated and imported on first use."""
    compute = "float64" if dtype == torch.float64 else "float32"
    key = (degrees, normalize, normalization, compute, m, value, grad)
    hit = _KERNELS.get(key)
    if hit is None:
        with _LOCK:
            hit = _KERNELS.get(key)
            if hit is None:
                src, n_lines = _source(*key)
                # One vector per lane; long programs keep many values live, so fewer lanes per program
                # (the register file is shared). Not tuned on hardware yet.
                block, warps = (128, 4) if n_lines < 1500 else (64, 2)
                hit = (_import_source(src).kernel, block, warps)
                _KERNELS[key] = hit
    return hit


# ---------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------


def _check(what: str, t: Tensor, x: Tensor | None, cols: int, lead: tuple = ()) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    allowed = _CPU_DTYPES if t.device.type == "cpu" else _GPU_DTYPES
    if t.dtype not in allowed:
        raise ValueError(
            f"{what} must have a floating dtype in {[str(d) for d in allowed]} on {t.device.type}, "
            f"got {t.dtype}"
        )
    if x is None:
        if t.dim() != 2 or t.shape[1] != cols:
            raise ValueError(f"{what} must have shape [N, {cols}], got {tuple(t.shape)}")
        return
    if tuple(t.shape) != (*lead, x.shape[0], cols):
        raise ValueError(f"{what} must have shape {[*lead, x.shape[0], cols]}, got {tuple(t.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ValueError(
            f"{what} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, {t.device}"
        )


def _check_config(degrees, normalization) -> tuple[int, ...]:
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    degrees = tuple(degrees)
    if not degrees:
        raise ValueError("degrees must hold at least one l")
    for l in degrees:
        if l < 0:
            raise ValueError(f"degrees must be >= 0, got {list(degrees)}")
    return degrees


def _launch(kernel_info, n: int, *args) -> None:
    kernel, block, warps = kernel_info
    if n > 0:
        kernel[(triton.cdiv(n, block),)](*args, n, BLOCK=block, num_warps=warps)


def _forward_impl(x: Tensor, degrees: list[int], normalize: bool, normalization: str) -> Tensor:
    degrees = _check_config(degrees, normalization)
    _check("x", x, None, 3)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], sum(2 * l + 1 for l in degrees)))
    _launch(_kernel(degrees, normalize, normalization, x.dtype, 0, True, False), x.shape[0], x, out)
    return out


def _backward_impl(
    grad: Tensor, x: Tensor, degrees: list[int], normalize: bool, normalization: str
) -> Tensor:
    degrees = _check_config(degrees, normalization)
    _check("x", x, None, 3)
    _check("grad", grad, x, sum(2 * l + 1 for l in degrees))
    x, grad = x.contiguous(), grad.contiguous()
    out = torch.empty_like(x)
    _launch(_kernel(degrees, normalize, normalization, x.dtype, 0, False, True), x.shape[0], x, grad, out)
    return out


def _jet_impl(
    grad: Tensor, x: Tensor, directions: Tensor, degrees: list[int], normalize: bool, normalization: str
) -> tuple[Tensor, Tensor]:
    degrees = _check_config(degrees, normalization)
    _check("x", x, None, 3)
    dim = sum(2 * l + 1 for l in degrees)
    _check("grad", grad, x, dim)
    if not isinstance(directions, Tensor) or directions.dim() != 3 or directions.shape[0] < 1:
        raise ValueError(
            f"directions must have shape [m >= 1, N, 3], got {tuple(getattr(directions, 'shape', ()))}"
        )
    m = directions.shape[0]
    _check("directions", directions, x, 3, (m,))
    x, grad, directions = x.contiguous(), grad.contiguous(), directions.contiguous()
    value = x.new_empty((x.shape[0], dim))
    grad_x = torch.empty_like(x)
    info = _kernel(degrees, normalize, normalization, x.dtype, m, True, True)
    _launch(info, x.shape[0], x, grad, *directions.unbind(0), value, grad_x)
    return value, grad_x


def _fake_forward(x, degrees, normalize, normalization):
    degrees = _check_config(degrees, normalization)
    _check("x", x, None, 3)
    return x.new_empty((x.shape[0], sum(2 * l + 1 for l in degrees)))


def _fake_backward(grad, x, degrees, normalize, normalization):
    degrees = _check_config(degrees, normalization)
    _check("x", x, None, 3)
    _check("grad", grad, x, sum(2 * l + 1 for l in degrees))
    return torch.empty_like(x)


def _fake_jet(grad, x, directions, degrees, normalize, normalization):
    degrees = _check_config(degrees, normalization)
    _check("x", x, None, 3)
    dim = sum(2 * l + 1 for l in degrees)
    _check("grad", grad, x, dim)
    torch._check(
        directions.dim() == 3 and directions.shape[0] >= 1, lambda: "directions must be [m >= 1, N, 3]"
    )
    return x.new_empty((x.shape[0], dim)), torch.empty_like(x)


def _define(name: str, impl, fake):
    op = torch.library.custom_op(f"equikern::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


_forward_op = _define("triton_spherical_harmonics", _forward_impl, _fake_forward)
_backward_op = _define("triton_spherical_harmonics_backward", _backward_impl, _fake_backward)
_jet_op = _define("triton_spherical_harmonics_jet", _jet_impl, _fake_jet)


def _setup(ctx, inputs, output):
    *tensors, degrees, normalize, normalization = inputs
    ctx.save_for_backward(*tensors)
    ctx.config = (degrees, normalize, normalization)


def _forward_grad(ctx, grad_value):
    (x,) = ctx.saved_tensors
    return _backward_op(grad_value, x, *ctx.config), None, None, None


def _backward_grad(ctx, cotangent):
    # L = cotangent . grad_x T_0(grad, x) = T_1(grad, x, [cotangent])
    grad, x = ctx.saved_tensors
    d_grad, d_x = _jet_op(grad, x, cotangent.unsqueeze(0), *ctx.config)
    return d_grad, d_x, None, None, None


def _jet_grad(ctx, c_value, c_grad):
    # L = T_m(c_value, x, V) + T_{m+1}(grad, x, V + [c_grad])
    grad, x, directions = ctx.saved_tensors
    config = ctx.config
    m = directions.shape[0]
    want_dirs = ctx.needs_input_grad[2]
    d_grad = d_x = d_dirs = None
    if c_value is not None:
        # grad_x T_m(c_value, x, V); d/dv_i T_m(c_value, x, V) = grad_x T_{m-1}(c_value, x, V without v_i)
        d_x = _jet_op(c_value, x, directions, *config)[1]
        if not want_dirs:
            pass
        elif m == 1:
            d_dirs = _backward_op(c_value, x, *config).unsqueeze(0)
        else:
            d_dirs = torch.stack([_jet_op(c_value, x, _without(directions, i), *config)[1] for i in range(m)])
    if c_grad is not None:
        more = torch.cat([directions, c_grad.unsqueeze(0)])
        d_grad, dx_more = _jet_op(grad, x, more, *config)
        d_x = dx_more if d_x is None else d_x + dx_more
        if want_dirs:
            # d/dv_i T_{m+1}(grad, x, V + [c]) = grad_x T_m(grad, x, V without v_i, + [c])
            dd = torch.stack([_jet_op(grad, x, _without(more, i), *config)[1] for i in range(m)])
            d_dirs = dd if d_dirs is None else d_dirs + dd
    return d_grad, d_x, d_dirs, None, None, None


def _without(directions: Tensor, i: int) -> Tensor:
    return torch.cat([directions[:i], directions[i + 1 :]])


_forward_op.register_autograd(_forward_grad, setup_context=_setup)
_backward_op.register_autograd(_backward_grad, setup_context=_setup)
_jet_op.register_autograd(_jet_grad, setup_context=_setup)


def triton_spherical_harmonics(x: Tensor, degrees: list[int], normalize: bool, normalization: str) -> Tensor:
    """The raw op on x [N, 3] -> [N, sum(2l+1)] (``degrees``: a list of l, repeats and any order allowed)."""
    return torch.ops.equikern.triton_spherical_harmonics.default(x, list(degrees), normalize, normalization)


def spherical_harmonics(ls, x: Tensor, normalize: bool, normalization: str = "integral") -> Tensor:
    """Same signature, values and layout as :func:`equikern.so3.spherical_harmonics` (and e3nn's), by Triton.

    Works on any device Triton runs on: CUDA, or the CPU under ``TRITON_INTERPRET=1``. x [..., 3] in
    float32/float64 (float16/bfloat16 too on CUDA, computed in float32); output [..., sum(2l+1)] in x's dtype.
    Differentiable to any order: every derivative is a generated Triton kernel (see the module docstring).
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"spherical_harmonics expects x to be a torch.Tensor, got {type(x).__name__}")
    if x.shape[-1:] != (3,):
        raise ValueError(f"spherical_harmonics expects x of shape [..., 3], got {tuple(x.shape)}")
    allowed = _CPU_DTYPES if x.device.type == "cpu" else _GPU_DTYPES
    if x.dtype not in allowed:
        raise ValueError(
            f"spherical_harmonics expects x with a floating dtype in {[str(d) for d in allowed]} on "
            f"{x.device.type}, got {x.dtype}"
        )
    degrees = so3._sh_degrees(ls)
    out = triton_spherical_harmonics(x.reshape(-1, 3), degrees, bool(normalize), normalization)
    return out.reshape(*x.shape[:-1], out.shape[-1])
