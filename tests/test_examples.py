"""examples/carbon_potential.py: the equikern potential against the same model in plain e3nn.

The example is imported as a module, so these tests run its own functions at a tiny size (2x2x2 cells, 64
atoms, 1792 edges, few channels) in float64: energies and forces must match e3nn's, forces must be physical
(translation and rotation symmetry, finite differences of the energy), and one training step on a force
loss, which differentiates through the tensor products' backward, must give e3nn's gradients and updated
parameters.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from e3nn import o3

import equikern
from equikern.bench.conv import diamond_lattice

pytestmark = pytest.mark.usefixtures("float64_default")

_PATH = Path(__file__).resolve().parents[1] / "examples" / "carbon_potential.py"
_spec = importlib.util.spec_from_file_location("carbon_potential", _PATH)
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def lattice(seed: int = 0, amplitude: float = 0.05) -> "cp.Lattice":
    gen = torch.Generator().manual_seed(seed)
    return cp.displaced(cp.carbon_lattice(2), amplitude, gen).to("cpu", F64)


def test_lattice_reproduces_diamond_lattice():
    src, dst, vec = diamond_lattice(2)
    lat = cp.carbon_lattice(2)
    assert torch.equal(lat.edge_src, src) and torch.equal(lat.edge_dst, dst)
    assert torch.equal(lat.edge_vectors(lat.pos), vec)
    assert lat.num_atoms == 64 and lat.num_edges == cp.AVG_NEIGHBOURS * 64
    assert torch.bincount(lat.edge_dst, minlength=64).eq(cp.AVG_NEIGHBOURS).all()
    # shifts are whole multiples of the box
    box = 2 * cp.LATTICE_CONSTANT
    assert torch.allclose(lat.shift / box, torch.round(lat.shift / box), atol=1e-12)

    moved = cp.displaced(lat, 0.05, torch.Generator().manual_seed(1))
    delta = moved.pos - lat.pos
    assert delta.abs().max() <= 0.05 and delta.abs().min() > 0
    # the displaced edge vectors stay inside the radial envelope
    assert moved.edge_vectors(moved.pos).norm(dim=-1).max() < cp.R_MAX


@pytest.mark.parametrize("lmax, channels, fused", [(2, 4, True), (3, 3, True), (2, 5, False)])
def test_energy_forces_match_e3nn(lmax, channels, fused):
    ref, ours = cp.build_models(channels, lmax, 2, "cpu", F64, seed=lmax + channels, fused=fused)
    kinds = {type(m) for m in ours.modules()}
    assert (equikern.TensorProductConv in kinds) == fused
    assert not any(isinstance(m, o3.TensorProduct) for m in ours.modules())  # all converted
    lat = lattice(seed=channels)
    e_ref, f_ref = cp.energy_and_forces(ref, lat)
    e, f = cp.energy_and_forces(ours, lat)
    assert f_ref.abs().max() > 1e-3  # displaced atoms: the forces are not zero
    assert rel_err(e, e_ref) < 1e-12
    assert rel_err(f, f_ref) < 1e-10


def test_forces_are_physical():
    """Outside truths for the equikern model: sum F = 0 (the energy depends on differences of positions),
    E invariant and F rotating with the structure, F = -dE/dpos by central differences."""
    _, model = cp.build_models(4, 2, 2, "cpu", F64, seed=3)
    lat = lattice(seed=3)
    energy, forces = cp.energy_and_forces(model, lat)
    assert forces.sum(0).abs().max() < 1e-12 * forces.abs().max() * lat.num_atoms

    rot = equikern.so3.rand_matrix(generator=torch.Generator().manual_seed(4))
    turned = cp.Lattice(lat.pos @ rot.T, lat.shift @ rot.T, lat.edge_src, lat.edge_dst)
    e_rot, f_rot = cp.energy_and_forces(model, turned)
    assert rel_err(e_rot, energy) < 1e-12
    assert rel_err(f_rot, forces @ rot.T) < 1e-9

    h = 1e-5
    with torch.no_grad():
        for atom, axis in ((0, 0), (17, 1), (63, 2)):
            step = torch.zeros_like(lat.pos)
            step[atom, axis] = h
            diff = (model(lat.pos + step, lat) - model(lat.pos - step, lat)) / (2 * h)
            assert abs(-diff.item() - forces[atom, axis].item()) < 1e-7 * forces.abs().max().item()


def _one_step(model, lat, e_target, f_target, energy_only=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if energy_only:  # the same loss without the force term: no second derivative
        opt.zero_grad(set_to_none=True)
        energy = model(lat.pos, lat)
        ((energy - e_target) / lat.num_atoms).pow(2).backward()
        opt.step()
    else:
        cp.train_step(model, lat, e_target, f_target, opt)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, {
        n: p.grad.clone() for n, p in model.named_parameters()
    }


def test_training_step_matches_e3nn():
    """One SGD step on the energy + force loss: the gradients (through the derivative of the forces with
    respect to every weight, i.e. the tensor products' double backward) and updated weights match e3nn."""
    ref, ours = cp.build_models(4, 2, 2, "cpu", F64, seed=5)
    lat = lattice(seed=5)
    e0, f0 = cp.energy_and_forces(ref, lat)
    gen = torch.Generator().manual_seed(6)
    e_target = e0.detach() + 0.002 * lat.num_atoms
    f_target = f0.detach() + 0.1 * torch.randn(f0.shape, generator=gen, dtype=F64)

    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    p_ref, g_ref = _one_step(ref, lat, e_target, f_target)
    p_ours, g_ours = _one_step(ours, lat, e_target, f_target)
    _, g_energy = _one_step(cp.build_models(4, 2, 2, "cpu", F64, seed=5)[1], lat, e_target, f_target, True)

    force_share = []
    for n in names:
        assert g_ref[n].abs().max() > 0, n
        assert rel_err(g_ours[n], g_ref[n]) < 1e-9, n
        assert rel_err(p_ours[n], p_ref[n]) < 1e-12, n
        assert not torch.equal(p_ours[n], before[n]), n
        force_share.append(((g_ref[n] - g_energy[n]).norm() / g_ref[n].norm()).item())
    # the force term carries a large part of every gradient, so wrong second derivatives cannot pass
    assert min(force_share) > 0.05, force_share

    # both models keep agreeing after the step
    e1_ref, f1_ref = cp.energy_and_forces(ref, lat)
    e1, f1 = cp.energy_and_forces(ours, lat)
    assert rel_err(e1, e1_ref) < 1e-12 and rel_err(f1, f1_ref) < 1e-10
    assert not math.isclose(e1.item(), e0.item(), rel_tol=1e-9)


def test_main_runs(capsys):
    out = cp.main(
        ["--cells", "2", "--channels", "3", "--dtype", "float64", "--repeats", "1", "--warmup", "0"]
    )
    text = capsys.readouterr().out
    assert "64 atoms, 1792 edges" in text and "training step" in text
    assert out["fused"] and out["diff_forces"] < 1e-12
    for times in out["timings"].values():
        assert times["inference"] > 0 and times["train_step"] > 0


def test_bad_lattice_size():
    with pytest.raises(ValueError, match="cells"):
        cp.carbon_lattice(1)
