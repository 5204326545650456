"""Irrep / Irreps against e3nn's o3.Irrep / o3.Irreps (the oracle)."""

import copy
import pickle
import random

import pytest
import torch
from e3nn import o3

from equikern import so3
from equikern.irreps import Irrep, Irreps, MulIr, as_irreps


def _random_irreps_string(rng: random.Random) -> str:
    terms = []
    for _ in range(rng.randint(0, 6)):
        l = rng.randint(0, 5)
        ir = f"{l}{rng.choice('eoy')}"
        mul = rng.choice([0, 1, 1, 2, 3, 16])
        term = rng.choice([f"{mul}x{ir}", f"{mul} x {ir}", ir if mul == 1 else f"{mul}x{ir}"])
        terms.append(term)
    return rng.choice(["+", " + "]).join(terms)


RNG = random.Random(0)
STRINGS = ["", "0e", "16x0e+8x1o", "1e + 0e + 1e + 0x2e", "2o + 1e + 0e + 1e", "1e+0x0e+1e", "0x1o+1o"]
STRINGS += [_random_irreps_string(RNG) for _ in range(40)]


@pytest.mark.parametrize("s", STRINGS)
def test_irreps_methods_match_e3nn(s):
    ours, ref = Irreps(s), o3.Irreps(s)
    assert str(ours) == str(ref) and repr(ours) == repr(ref)
    assert ours == ref and ref == ours and not (ours != ref)
    assert hash(ours) == hash(ref)
    assert ours == s and s == ours
    assert len(ours) == len(ref)
    assert ours.dim == ref.dim and ours.num_irreps == ref.num_irreps and ours.ls == ref.ls
    if ref.num_irreps:
        assert ours.lmax == ref.lmax
    else:
        with pytest.raises(ValueError):
            ours.lmax  # noqa: B018
    assert ours.slices() == ref.slices()
    srt, srt_ref = ours.sort(), ref.sort()
    assert str(srt.irreps) == str(srt_ref.irreps) and srt.p == srt_ref.p and srt.inv == srt_ref.inv
    assert str(ours.simplify()) == str(ref.simplify())
    assert str(ours.regroup()) == str(ref.regroup())
    assert str(ours.remove_zero_multiplicities()) == str(ref.remove_zero_multiplicities())
    for ir in ["0e", "0o", "1o", "1e", "2e", "5o", Irrep(3, 1), o3.Irrep("4e")]:
        assert ours.count(ir) == ref.count(ir)
        assert (ir in ours) == (ir in ref)
    for i in range(len(ref)):
        assert ours[i] == ref[i] and isinstance(ours[i], MulIr)
        assert ours[i].mul == ref[i].mul and ours[i].ir == ref[i].ir and ours[i].dim == ref[i].dim
        assert repr(ours[i]) == repr(ref[i])
    for sl in [slice(1, None), slice(None, -1), slice(None, None, 2)]:
        assert isinstance(ours[sl], Irreps) and str(ours[sl]) == str(ref[sl])
    assert str(ours + "2x3o") == str(ref + "2x3o")
    assert str(ours + ref) == str(ref + ref)
    assert str(ours * 3) == str(ref * 3) and str(2 * ours) == str(2 * ref)
    assert [tuple(m) for m in ours] == [tuple(m) for m in ref]


@pytest.mark.parametrize("s", STRINGS[:12])
def test_irreps_conversions(s):
    ref = o3.Irreps(s)
    ours = Irreps(ref)
    assert ours == ref and isinstance(ours, Irreps)
    assert o3.Irreps(ours) == ref
    assert Irreps(list(ref)) == ours
    assert Irreps([(mul, (ir.l, ir.p)) for mul, ir in ref]) == ours
    assert Irreps([(mul, str(ir)) for mul, ir in ref]) == ours
    assert Irreps(str(ours)) == ours
    assert as_irreps(ours) is ours
    assert as_irreps(s) == ours and as_irreps(ref) == ours
    assert pickle.loads(pickle.dumps(ours)) == ours
    assert copy.deepcopy(ours) == ours


def test_irreps_constructors():
    assert Irreps() == Irreps("") == Irreps(None) == Irreps([]) == "  "
    assert len(Irreps("")) == 0 and str(Irreps("")) == ""
    assert Irreps("0e + 1o") == "1x0e+1x1o"
    assert Irreps(Irrep("1o")) == "1x1o"
    assert Irreps(MulIr(2, Irrep("1o"))) == "2x1o"
    assert Irreps(["1o", Irrep("2e"), (3, "0e"), (2, (1, 1)), o3.Irrep("3o")]) == "1o+2e+3x0e+2x1e+3o"
    assert Irreps("3y+2y") == "1x3o+1x2e"
    assert Irreps("0e") != Irreps("0o") and Irreps("0e") != "1x0o"
    assert Irreps("0e") != None  # noqa: E711
    assert Irreps("0e") != 3


def test_irreps_empty_lmax():
    for s in ["", "0x1o"]:
        with pytest.raises(ValueError, match="no irreps"):
            Irreps(s).lmax  # noqa: B018


@pytest.mark.parametrize("lmax", [0, 1, 4])
@pytest.mark.parametrize("p", [-1, 1])
def test_spherical_harmonics_irreps(lmax, p):
    assert str(Irreps.spherical_harmonics(lmax, p)) == str(o3.Irreps.spherical_harmonics(lmax, p))


def test_irrep_matches_e3nn():
    for l in range(4):
        for p in (-1, 1):
            ours, ref = Irrep(l, p), o3.Irrep(l, p)
            assert ours == ref and hash(ours) == hash(ref) and repr(ours) == repr(ref)
            assert ours.l == l and ours.p == p and ours.dim == ref.dim
            assert ours.is_scalar() == ref.is_scalar()
            assert Irrep(repr(ref)) == ours and Irrep((l, p)) == ours and Irrep(ref) == ours
            assert Irrep(ours) is ours and o3.Irrep(ours) == ref
            for other in ["0e", "1o", "2e", "3o"]:
                assert list(ours * other) == list(ref * o3.Irrep(other))
            assert 3 * ours == Irreps([(3, ours)]) == 3 * ref
            assert ours + "1o" == ref + o3.Irrep("1o")
    assert Irrep("3y") == o3.Irrep("3y") and Irrep(" 2y ") == (2, 1)
    assert list(Irrep.iterator(3)) == list(o3.Irrep.iterator(3))
    it = Irrep.iterator()
    assert [repr(next(it)) for _ in range(5)] == ["0e", "0o", "1o", "1e", "2e"]
    it, it_ref = Irrep.iterator(), o3.Irrep.iterator()
    assert [next(it) for _ in range(9)] == [next(it_ref) for _ in range(9)]


def test_irrep_ordering_matches_e3nn():
    rng = random.Random(1)
    names = [f"{rng.randint(0, 4)}{rng.choice('eo')}" for _ in range(30)]
    assert [repr(x) for x in sorted(Irrep(n) for n in names)] == [
        repr(x) for x in sorted(o3.Irrep(n) for n in names)
    ]
    assert Irrep("0o") < Irrep("0e") < Irrep("1o") < Irrep("1e")


BAD_IRREPS = [
    ("1q", "unknown parity letter 'q'"),
    ("16x0e+8x1z", "unknown parity letter 'z'"),
    ("-1x0e", "negative multiplicity -1"),
    ("2x-1e", "negative l"),
    ("hello", "cannot parse 'hello'"),
    ("3", "missing parity letter"),
    ("1o+", "empty term"),
    ("1o++2e", "empty term"),
    ("1x2x1o", "cannot parse '2x1o'"),
    ("x1o", "cannot parse multiplicity ''"),
    ("1.5x0e", "cannot parse multiplicity '1.5'"),
    ([(-2, "1o")], "negative multiplicity -2"),
    ([("a", "1o")], "multiplicity must be an integer"),
    ([(1, (1, 2))], "parity must be"),
    ([(1, (-1, 1))], "negative l"),
    ([3], "cannot interpret 3"),
    (5, "cannot interpret 5"),
]


@pytest.mark.parametrize("bad, what", BAD_IRREPS)
def test_bad_irreps(bad, what):
    with pytest.raises(ValueError, match=r"expected an irreps string like '16x0e\+8x1o'") as info:
        as_irreps(bad)
    assert what in str(info.value) and repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="expected an irreps string"):
        Irreps(bad)
    if isinstance(bad, str):  # the oracle rejects them too
        with pytest.raises(ValueError):
            o3.Irreps(bad)


@pytest.mark.parametrize(
    "args, what",
    [
        (("1q",), "unknown parity letter 'q'"),
        (("",), "empty irrep"),
        (("e",), "cannot parse 'e'"),
        ((-1, 1), "negative l"),
        ((1, 0), "parity must be +1 or -1"),
        (((1, 2),), "parity must be +1 or -1"),
        ((1.5,), "cannot interpret 1.5"),
        ((1.0, 1), "l must be an integer"),
    ],
)
def test_bad_irrep(args, what):
    with pytest.raises(ValueError, match="expected an irrep like") as info:
        Irrep(*args)
    assert what in str(info.value)


@pytest.mark.parametrize("s", ["1x0e", "2x1o+1x1e+0x2e", "0e+1o+2e+3o+2o+1e+0o", "3x2e+2x3o"])
def test_D_from_matrix_matches_e3nn(s, float64_default):
    gen = torch.Generator().manual_seed(0)
    R = so3.rand_matrix(3, generator=gen)
    R = torch.cat([R, -R])  # proper and improper rotations
    ours, ref = Irreps(s).D_from_matrix(R), o3.Irreps(s).D_from_matrix(R)
    assert ours.shape == ref.shape == (6, Irreps(s).dim, Irreps(s).dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    for mul_ir in Irreps(s):
        torch.testing.assert_close(
            mul_ir.ir.D_from_matrix(R), o3.Irrep(mul_ir.ir).D_from_matrix(R), rtol=0, atol=1e-10
        )
