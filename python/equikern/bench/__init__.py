"""Benchmark harness behind ``python -m equikern.bench``.

Every public module of this package is an op family (``tensor_product``, ...): it exposes
``cases(config: Config) -> list[Case]``. A ``Case`` is one benchmark problem at the config's batch,
dtype and device; it is cheap to create, and builds its inputs and implementations only when asked.
The core (``__main__``) checks every implementation against the case's reference, then times it.
Adding a family means adding a module here, nothing else.
"""

import importlib
import json
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import ModuleType

import torch
from torch import Tensor

MODES = ("fwd", "fwdbwd", "dblbwd")


class Unavailable(Exception):
    """Raised by an implementation's builder when its library cannot run here: the row is left out."""


@dataclass(frozen=True)
class Config:
    """The device, dtype and batch that a family's cases are built for."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    hardware: str  # "h100", "cuda" or "cpu": selects the published figures of anchors.json
    batch_given: bool = True  # False: `batch` is the device default, a family may use its own size
    cells: int | None = None  # --cells: the conv family's lattice (cells per side); None: its default
    quick: bool = False  # --quick: tiny problems, for tests


def _same(out: Tensor) -> Tensor:
    return out


@dataclass
class Impl:
    """One implementation of a case, called on its own (native) layout.

    ``to_native`` maps the case's inputs to the arguments of ``fn`` and ``from_native`` maps its output back
    to the reference layout; both must be differentiable, so that gradients are compared in the reference
    layout too. ``from_native=None`` says the output cannot be mapped back: the row is timed but "unchecked".
    ``note`` (e.g. which kernels an implementation took) is copied into its result rows.
    """

    fn: Callable[..., Tensor]
    to_native: Callable[[Sequence[Tensor]], Sequence[Tensor]] = tuple
    from_native: Callable[[Tensor], Tensor] | None = _same
    note: str | None = None


@dataclass
class Case:
    """One benchmark problem of a family at a fixed device, dtype and batch.

    ``params`` describes the problem (JSON-able, copied into every result row). ``inputs()`` returns fresh
    random inputs in the reference layout (floating-point ones get gradients in the backward modes).
    ``impls`` maps an implementation name to a builder returning an ``Impl`` (raise ``Unavailable`` when
    its library is missing; any other exception is reported as an error row). ``floor_bytes`` maps each
    mode of ``MODES`` to the bytes it must move at least. ``published`` holds the figures of anchors.json
    that apply to this device, dtype and batch: impl -> mode -> ms (and "<mode>_peak_GB" -> GB of peak
    memory where published). ``fallback_reference`` names the implementation whose results check the others
    in a mode where the reference itself fails (e.g. runs out of memory); None: those rows stay unchecked.
    """

    family: str
    label: str
    params: dict
    inputs: Callable[[], tuple[Tensor, ...]]
    impls: dict[str, Callable[[], Impl]]
    floor_bytes: dict[str, int]
    reference: str = "e3nn"
    published: dict[str, dict[str, float]] = field(default_factory=dict)
    batch: int | None = None  # the batch measured when the family chose its own, else the config's
    fallback_reference: str | None = None


def io_floor(in_bytes: int, out_bytes: int) -> dict[str, int]:
    """Bytes moved by an op that reads its inputs and writes one output, and by its derivatives.

    fwdbwd adds a backward that reads the inputs and the output gradient and writes the input gradients;
    dblbwd adds a second backward that also reads the first gradients.
    """
    return {
        "fwd": in_bytes + out_bytes,
        "fwdbwd": 3 * in_bytes + 2 * out_bytes,
        "dblbwd": 6 * in_bytes + 3 * out_bytes,
    }


@cache
def anchors() -> dict:
    """The benchmark problems and published peer figures (a copy of the project's bench/anchors.json)."""
    return json.loads(resources.files(__name__).joinpath("anchors.json").read_text())


def families() -> dict[str, ModuleType | Exception]:
    """Every family module of this package by name, or the exception that importing it raised."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            found[info.name] = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as err:  # a broken family must not stop the others
            found[info.name] = err
    return found
