"""Irreducible representations of O(3) and their direct sums, with e3nn's conventions and string syntax.

``Irrep`` is a tuple (l, p) and ``Irreps`` a tuple of ``MulIr(mul, ir)``, like e3nn's classes: they compare,
order and hash like e3nn's, and e3nn's ``o3.Irrep``/``o3.Irreps`` accept them (and the reverse).
"""

import collections
import itertools
import operator
import re
from typing import NamedTuple

import torch

from equikern import so3

__all__ = ["Irrep", "MulIr", "Irreps", "as_irreps"]

_IRREP_HINT = "expected an irrep like '1o', '2e', '3y' or (l, p) with l >= 0 and p = +1 or -1"
_IRREPS_HINT = (
    "expected an irreps string like '16x0e+8x1o', a list of (mul, irrep) pairs or irreps, or an Irreps"
)
_INT = re.compile(r"[+-]?[0-9]+")


class _Bad(Exception):
    """A parse error; the public entry point adds what it expected."""


def _as_int(v, what: str) -> int:
    try:
        return operator.index(v)
    except TypeError:
        raise _Bad(f"{what} must be an integer, got {v!r}") from None


def _repeat_count(n) -> int | None:
    """n as an int for ``n * irrep`` and ``irreps * n``; None (-> NotImplemented) for anything else."""
    if isinstance(n, bool):
        return None
    try:
        return operator.index(n)
    except TypeError:
        return None


def _parse_mul(s: str, term: str) -> int:
    if not _INT.fullmatch(s.strip()):
        raise _Bad(f"cannot parse multiplicity {s.strip()!r} in {term.strip()!r}")
    return int(s)


def _irrep_args(l, p=None) -> tuple[int, int]:
    if p is None:
        if isinstance(l, str):
            return _parse_irrep_str(l)
        if hasattr(l, "l") and hasattr(l, "p"):
            l, p = l.l, l.p
        elif isinstance(l, (tuple, list)) and len(l) == 2:
            l, p = l
        else:
            raise _Bad(f"cannot interpret {l!r} as an irrep")
    l = _as_int(l, "l")
    if l < 0:
        raise _Bad(f"negative l = {l}")
    p = _as_int(p, "parity")
    if p not in (-1, 1):
        raise _Bad(f"parity must be +1 or -1, got {p}")
    return l, p


def _parse_irrep_str(s: str) -> tuple[int, int]:
    name = s.strip()
    if not name:
        raise _Bad("empty irrep")
    if _INT.fullmatch(name):
        raise _Bad(f"missing parity letter (e, o or y) after l in {name!r}")
    l_str, letter = name[:-1].strip(), name[-1]
    if not _INT.fullmatch(l_str):
        raise _Bad(f"cannot parse {name!r} as an irrep (l then e, o or y)")
    l = int(l_str)
    if l < 0:
        raise _Bad(f"negative l in {name!r}")
    if letter not in "eoy":
        raise _Bad(f"unknown parity letter {letter!r} in {name!r} (use e, o or y)")
    return l, {"e": 1, "o": -1, "y": (-1) ** l}[letter]


class Irrep(tuple):
    """Irreducible representation (l, p) of O(3): ``Irrep(1, -1)``, ``Irrep("1o")``, ``Irrep((1, -1))``.

    The letter ``y`` means p = (-1)^l (the parity of the spherical harmonics). Anything with ``.l`` and ``.p``
    (an e3nn Irrep) is accepted too.
    """

    def __new__(cls, l, p=None):
        if p is None and isinstance(l, Irrep):
            return l
        try:
            return super().__new__(cls, _irrep_args(l, p))
        except _Bad as e:
            what = repr(l) if p is None else repr((l, p))
            raise ValueError(f"invalid irrep {what}: {e}: {_IRREP_HINT}") from None

    @property
    def l(self) -> int:  # noqa: E743
        return self[0]

    @property
    def p(self) -> int:
        return self[1]

    @property
    def dim(self) -> int:
        return 2 * self.l + 1

    def is_scalar(self) -> bool:
        return self.l == 0 and self.p == 1

    def __repr__(self) -> str:
        return f"{self.l}{'e' if self.p == 1 else 'o'}"

    @classmethod
    def iterator(cls, lmax: int | None = None):
        """All irreps in e3nn's order 0e, 0o, 1o, 1e, 2e, 2o, ... up to l = lmax (forever if None)."""
        for l in itertools.count():
            if lmax is not None and l > lmax:
                return
            yield cls(l, (-1) ** l)
            yield cls(l, -((-1) ** l))

    def __mul__(self, other):
        """The irreps in the product of two irreps: l from |l1 - l2| to l1 + l2, parity p1 p2."""
        other = Irrep(other)
        p = self.p * other.p
        return (Irrep(l, p) for l in range(abs(self.l - other.l), self.l + other.l + 1))

    def __rmul__(self, mul):
        mul = _repeat_count(mul)
        return NotImplemented if mul is None else Irreps([(mul, self)])

    def __add__(self, other):
        return Irreps(self) + Irreps(other)

    def D_from_matrix(self, R: torch.Tensor) -> torch.Tensor:
        """Representation matrix [..., dim, dim] of (improper) rotations R [..., 3, 3], as e3nn's."""
        det_sign = torch.det(R).sign()[..., None, None]
        D = so3.wigner_D(self.l, R * det_sign)
        return D * det_sign if self.p == -1 else D


class MulIr(NamedTuple):
    """``mul`` copies of the irrep ``ir``."""

    mul: int
    ir: Irrep

    @property
    def dim(self) -> int:
        return self.mul * self.ir.dim

    def __repr__(self) -> str:
        return f"{self.mul}x{self.ir}"


IrrepsSort = collections.namedtuple("IrrepsSort", ["irreps", "p", "inv"])


def _irrep(x) -> Irrep:
    """Irrep(x), raising _Bad so that Irreps can report the error in its own terms."""
    return x if isinstance(x, Irrep) else tuple.__new__(Irrep, _irrep_args(x))


def _mul_ir(mul, ir) -> MulIr:
    mul = _as_int(mul, "multiplicity")
    if mul < 0:
        raise _Bad(f"negative multiplicity {mul} for {ir!r}")
    return MulIr(mul, _irrep(ir))


def _parse_irreps_str(s: str) -> list[MulIr]:
    if not s.strip():
        return []
    out = []
    for term in s.split("+"):
        if not term.strip():
            raise _Bad(f"empty term in {s!r}")
        if "x" in term:
            mul, _, ir = term.partition("x")
            out.append(_mul_ir(_parse_mul(mul, term), ir.strip()))
        else:
            out.append(MulIr(1, _irrep(term)))
    return out


def _parse_irreps(x) -> list[MulIr]:
    if x is None:
        return []
    if isinstance(x, str):
        return _parse_irreps_str(x)
    if hasattr(x, "l") and hasattr(x, "p"):
        return [_mul_ir(1, x)]
    if hasattr(x, "mul") and hasattr(x, "ir"):
        return [_mul_ir(x.mul, x.ir)]
    try:
        items = list(x)
    except TypeError:
        raise _Bad(f"cannot interpret {x!r} of type {type(x).__name__} as irreps") from None
    out = []
    for item in items:
        if isinstance(item, str):
            out.extend(_parse_irreps_str(item))
        elif hasattr(item, "l") and hasattr(item, "p"):
            out.append(_mul_ir(1, item))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(_mul_ir(*item))
        else:
            raise _Bad(f"cannot interpret {item!r} as (mul, irrep)")
    return out


class Irreps(tuple):
    """Direct sum of irreps, a tuple of ``MulIr(mul, ir)``: ``Irreps("16x0e+8x1o")``, ``Irreps([(8, "1o")])``.

    Accepts a string, an Irrep, a list of (mul, irrep) pairs, irreps or strings, or an Irreps (also e3nn's).
    Compares equal to anything it accepts that describes the same irreps.
    """

    def __new__(cls, irreps=None):
        if isinstance(irreps, cls):
            return irreps
        try:
            return super().__new__(cls, _parse_irreps(irreps))
        except _Bad as e:
            raise ValueError(f"invalid irreps {irreps!r}: {e}: {_IRREPS_HINT}") from None

    @staticmethod
    def spherical_harmonics(lmax: int, p: int = -1) -> "Irreps":
        """The irreps of (Y^0, ..., Y^lmax): 1x0e+1x1o+1x2e+... for p = -1."""
        return Irreps([(1, (l, p**l)) for l in range(lmax + 1)])

    @property
    def dim(self) -> int:
        return sum(mul_ir.dim for mul_ir in self)

    @property
    def num_irreps(self) -> int:
        return sum(mul for mul, _ in self)

    @property
    def ls(self) -> list[int]:
        """l of every irrep, repeated mul times."""
        return [ir.l for mul, ir in self for _ in range(mul)]

    @property
    def lmax(self) -> int:
        """Largest l among the irreps with mul > 0 (as e3nn, 0x entries do not count)."""
        if self.num_irreps == 0:
            raise ValueError(f"lmax of Irreps {self!r} that hold no irreps")
        return max(self.ls)

    def slices(self) -> list[slice]:
        """The slice of each MulIr in a feature vector."""
        out, start = [], 0
        for mul_ir in self:
            out.append(slice(start, start + mul_ir.dim))
            start += mul_ir.dim
        return out

    def sort(self) -> IrrepsSort:
        """Stable sort by irrep ((l, p) order: 0o < 0e < 1o < 1e < ...), as e3nn.

        Returns (irreps, p, inv): ``irreps[i] = self[inv[i]]`` and ``self[i] = irreps[p[i]]``.
        """
        inv = tuple(sorted(range(len(self)), key=lambda i: self[i].ir))
        p = [0] * len(inv)
        for new, old in enumerate(inv):
            p[old] = new
        return IrrepsSort(Irreps([self[i] for i in inv]), tuple(p), inv)

    def simplify(self) -> "Irreps":
        """Merge consecutive equal irreps and drop zero multiplicities, without sorting (as e3nn).

        As in e3nn, a 0x entry is dropped before merging, so "1e+0x0e+1e" becomes "2x1e".
        """
        out = []
        for mul, ir in self:
            if out and out[-1][1] == ir:
                out[-1] = (out[-1][0] + mul, ir)
            elif mul > 0:
                out.append((mul, ir))
        return Irreps(out)

    def remove_zero_multiplicities(self) -> "Irreps":
        return Irreps([mul_ir for mul_ir in self if mul_ir.mul > 0])

    def regroup(self) -> "Irreps":
        """``sort().irreps.simplify()``: one entry per distinct irrep, sorted."""
        return self.sort().irreps.simplify()

    def count(self, ir) -> int:
        """Total multiplicity of ``ir``."""
        ir = Irrep(ir)
        return sum(mul for mul, other in self if other == ir)

    def __contains__(self, ir) -> bool:
        ir = Irrep(ir)
        return any(other == ir for _, other in self)

    def __getitem__(self, i):
        x = super().__getitem__(i)
        return Irreps(x) if isinstance(i, slice) else x

    def __add__(self, other) -> "Irreps":
        return Irreps(tuple(self) + tuple(as_irreps(other)))

    def __mul__(self, n) -> "Irreps":
        n = _repeat_count(n)
        return NotImplemented if n is None else Irreps(tuple(self) * n)

    __rmul__ = __mul__

    def __eq__(self, other) -> bool:
        if other is None:
            return False
        if not isinstance(other, Irreps):
            try:
                other = as_irreps(other)
            except ValueError:
                return NotImplemented
        return tuple(self) == tuple(other)

    def __ne__(self, other) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    # same hash as an equal e3nn Irreps
    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return "+".join(repr(mul_ir) for mul_ir in self)

    def D_from_matrix(self, R: torch.Tensor) -> torch.Tensor:
        """Block-diagonal representation [..., dim, dim] of (improper) rotations R [..., 3, 3], as e3nn's.

        For det(R) = -1 an irrep of parity p gets the factor p: D_ir(R) = p D_l(-R).
        """
        det_sign = torch.det(R).sign()[..., None, None]
        proper = R * det_sign
        out = R.new_zeros(R.shape[:-2] + (self.dim, self.dim))
        d_of_l = {}
        for s, (_, ir) in zip(self.slices(), self):
            if ir.l not in d_of_l:
                d_of_l[ir.l] = so3.wigner_D(ir.l, proper)
            D = d_of_l[ir.l] * det_sign if ir.p == -1 else d_of_l[ir.l]
            for i in range(s.start, s.stop, ir.dim):
                out[..., i : i + ir.dim, i : i + ir.dim] = D
        return out


def as_irreps(x) -> Irreps:
    """``x`` as an Irreps (itself if it is one); a ValueError naming the problem if it is not irreps."""
    return x if isinstance(x, Irreps) else Irreps(x)
