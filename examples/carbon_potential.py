"""A NequIP-style interatomic potential on periodic diamond carbon: equikern against plain e3nn.

The model (``Potential``): a constant embedding of the single species (carbon) into scalar channels, then
``--layers`` interaction blocks, each

    x = Linear(h)
    m[dst] = sum over edges of TP(x[src], Y(edge_vec), radial_mlp(|edge_vec|)) / sqrt(28)
    h = h + Gate(Linear(m) + SelfConnection(h, species))      (no residual where the irreps change)

with Y the real spherical harmonics up to ``--lmax``, TP the channelwise (uvu) product of NequIP whose
per-edge weights come from a Bessel basis (times a smooth polynomial envelope) through a small MLP, the
self-connection a fully connected tensor product with the one-hot species and Gate e3nn's gated nonlinearity
(SiLU on the scalars, sigmoid gates on the l > 0 features). The energy is the sum of a per-atom Linear
readout of the scalars; forces are -dE/dpos by autograd. Training on forces needs second derivatives: the
gradient of the force loss with respect to the weights goes through the backward of every tensor product.

Two versions hold identical weights:
- e3nn: ``o3.spherical_harmonics``, and the convolution unfused (gather ``x[src]``, ``o3.TensorProduct``,
  ``index_add_``), as NequIP writes it;
- equikern: ``equikern.spherical_harmonics``, the convolution fused into one ``equikern.TensorProductConv``
  (the per-edge messages are never stored), and ``equikern.accelerate`` for the remaining e3nn tensor
  products (the self-connections and the products inside the Gates). e3nn's ``o3.Linear`` is kept as is.

The equikern model is a copy of the e3nn one converted by ``to_equikern``. The graph is the periodic diamond
lattice of ``equikern.bench.conv.diamond_lattice`` (8 atoms per cubic cell, every pair within 3.0 A an edge:
28 neighbours per atom); edge vectors are pos[dst] - pos[src] + shift with fixed periodic shifts, so they are
differentiable in the positions, which are randomly displaced (0.05 A) so that the forces are not zero. The
graph stays that of the ideal lattice (a benchmark, not a molecular dynamics code).

Run:
    python examples/carbon_potential.py                    # 3x3x3 cells (216 atoms), float32, on the CPU
    python examples/carbon_potential.py --dtype float64 --channels 16 --lmax 3
    python examples/carbon_potential.py --device cuda --cells 9    # the issue's lattice (5832 atoms)

It prints the lattice size, the largest differences of energy and forces between the two versions, then
the median time of inference (energy and forces) and of a training step (loss = ((E - E_ref) / atoms)^2 +
mean |F - F_ref|^2, backward through the forces, Adam step) for each version, and the speedups.
The fused convolution runs on the CPU (C++) and on CUDA (Triton); on any other device the equikern version
says so and runs the convolution unfused with equikern tensor products instead.
"""

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import Tensor

import equikern
from equikern.bench.conv import CUTOFF, LATTICE_CONSTANT, diamond_lattice

AVG_NEIGHBOURS = 28  # the diamond lattice within 3.0 A: 4 + 12 + 12 neighbours
R_MAX = 3.5  # A: the radial envelope's cutoff, above the lattice's 3.0 A so that displaced edges stay inside
DIAMOND_BASIS = (
    torch.tensor(
        [[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0], [1, 1, 1], [1, 3, 3], [3, 1, 3], [3, 3, 1]],
        dtype=torch.float64,
    )
    / 4
)


# ---------------------------------------------------------------------------------------------------------
# The lattice


@dataclass
class Lattice:
    """A periodic structure with a fixed graph: edge_vec = pos[edge_dst] - pos[edge_src] + shift."""

    pos: Tensor  # [atoms, 3]
    shift: Tensor  # [edges, 3], whole multiples of the box
    edge_src: Tensor
    edge_dst: Tensor

    @property
    def num_atoms(self) -> int:
        return self.pos.shape[0]

    @property
    def num_edges(self) -> int:
        return self.edge_src.shape[0]

    def edge_vectors(self, pos: Tensor) -> Tensor:
        return pos[self.edge_dst] - pos[self.edge_src] + self.shift

    def to(self, device, dtype) -> "Lattice":
        return Lattice(
            self.pos.to(device, dtype),
            self.shift.to(device, dtype),
            self.edge_src.to(device),
            self.edge_dst.to(device),
        )


def carbon_lattice(cells: int) -> Lattice:
    """The ideal diamond lattice of ``diamond_lattice(cells)`` (float64), with positions and periodic shifts.

    diamond_lattice gives edge_vec = d - box * round(d / box) with d = pos[dst] - pos[src]; the positions
    are rebuilt the same way and the shifts are -box * round(d / box), so edge_vectors(pos) reproduces
    its edge_vec bitwise (checked here).
    """
    src, dst, vec = diamond_lattice(cells)
    grid = torch.stack(torch.meshgrid(*[torch.arange(cells, dtype=torch.float64)] * 3, indexing="ij"), -1)
    pos = ((grid.reshape(-1, 1, 3) + DIAMOND_BASIS) * LATTICE_CONSTANT).reshape(-1, 3)
    box = cells * LATTICE_CONSTANT
    d = pos[dst] - pos[src]
    lattice = Lattice(pos, -box * torch.round(d / box), src, dst)
    if not torch.equal(lattice.edge_vectors(pos), vec):
        raise RuntimeError("carbon_lattice: positions and shifts do not reproduce diamond_lattice's edge_vec")
    return lattice


def displaced(lattice: Lattice, amplitude: float, generator: torch.Generator) -> Lattice:
    """The lattice with every atom moved by a random vector (each component uniform in +-amplitude)."""
    noise = (torch.rand(lattice.pos.shape, generator=generator, dtype=torch.float64) * 2 - 1) * amplitude
    return Lattice(lattice.pos + noise, lattice.shift, lattice.edge_src, lattice.edge_dst)


# ---------------------------------------------------------------------------------------------------------
# The model


def bessel_basis(r: Tensor, num_basis: int, r_max: float) -> Tensor:
    """sqrt(2 / r_max) sin(n pi r / r_max) / r for n = 1..num_basis, times NequIP's envelope (p = 6)."""
    n = torch.arange(1, num_basis + 1, device=r.device, dtype=r.dtype)
    basis = math.sqrt(2 / r_max) * torch.sin(n * math.pi * r[:, None] / r_max) / r[:, None]
    x, p = r / r_max, 6.0
    envelope = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    return basis * (envelope * (x < 1))[:, None]


def nequip_instructions(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, target: o3.Irreps):
    """NequIP's convolution: one uvu path and one output block per (ir_in, ir_sh, ir_out in target).

    Returns (irreps_out, instructions), the output blocks sorted by irrep (not merged).
    """
    wanted = {ir for _, ir in target}
    blocks, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted:
                    instructions.append((i, j, len(blocks), "uvu", True))
                    blocks.append((mul, ir_out))
    irreps_out, perm, _ = o3.Irreps(blocks).sort()
    return irreps_out, [(i, j, perm[k], mode, w) for i, j, k, mode, w in instructions]


class RadialMLP(torch.nn.Module):
    def __init__(self, num_basis: int, hidden: int, num_out: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(num_basis, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, num_out),
        )

    def forward(self, basis: Tensor) -> Tensor:
        return self.net(basis)


class Interaction(torch.nn.Module):
    """One NequIP interaction block (see the module docstring). ``conv`` replaces ``tp`` in to_equikern."""

    def __init__(
        self, irreps_in: o3.Irreps, irreps_hidden: o3.Irreps, irreps_sh: o3.Irreps, num_basis: int
    ) -> None:
        super().__init__()
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l > 0])
        self.gate = Gate(
            scalars,
            [torch.nn.functional.silu] * len(scalars),
            o3.Irreps(f"{gated.num_irreps}x0e"),
            [torch.sigmoid],
            gated,
        )
        irreps_mid, instructions = nequip_instructions(irreps_in, irreps_sh, irreps_hidden)
        self.tp_args = dict(
            irreps_in1=irreps_in,
            irreps_in2=irreps_sh,
            irreps_out=irreps_mid,
            instructions=instructions,
            shared_weights=False,
            internal_weights=False,
        )
        self.linear_in = o3.Linear(irreps_in, irreps_in)
        self.tp = o3.TensorProduct(**self.tp_args)
        self.conv = None
        self.radial = RadialMLP(num_basis, 32, self.tp.weight_numel)
        self.linear_out = o3.Linear(irreps_mid, self.gate.irreps_in)
        self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, "1x0e", self.gate.irreps_in)
        self.residual = irreps_in == self.gate.irreps_out
        self.irreps_out = self.gate.irreps_out

    def forward(self, h: Tensor, species: Tensor, sh: Tensor, basis: Tensor, src: Tensor, dst: Tensor):
        weight = self.radial(basis)
        x = self.linear_in(h)
        if self.conv is not None:
            m = self.conv(x, sh, weight, src, dst, h.shape[0])
        else:
            messages = self.tp(x[src], sh, weight)
            m = messages.new_zeros(h.shape[0], messages.shape[1]).index_add_(0, dst, messages)
        m = m * (1 / math.sqrt(AVG_NEIGHBOURS))
        out = self.gate(self.linear_out(m) + self.self_connection(h, species))
        return h + out if self.residual else out


class Potential(torch.nn.Module):
    """E(pos) of a one-species periodic structure; ``energy_and_forces`` gives E and -dE/dpos."""

    def __init__(self, channels: int, lmax: int, layers: int = 2, num_basis: int = 8) -> None:
        super().__init__()
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        irreps_hidden = o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])
        self.num_basis = num_basis
        self.embedding = o3.Linear("1x0e", f"{channels}x0e")
        blocks, irreps = [], o3.Irreps(f"{channels}x0e")
        for _ in range(layers):
            blocks.append(Interaction(irreps, irreps_hidden, self.irreps_sh, num_basis))
            irreps = blocks[-1].irreps_out
        self.interactions = torch.nn.ModuleList(blocks)
        self.readout = o3.Linear(irreps, "1x0e")
        self.spherical_harmonics = o3.spherical_harmonics

    def forward(self, pos: Tensor, lattice: Lattice) -> Tensor:
        vec = lattice.edge_vectors(pos)
        sh = self.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        basis = bessel_basis(vec.norm(dim=-1), self.num_basis, R_MAX)
        species = pos.new_ones(pos.shape[0], 1)  # one-hot of the only species
        h = self.embedding(species)
        for block in self.interactions:
            h = block(h, species, sh, basis, lattice.edge_src, lattice.edge_dst)
        return self.readout(h).sum()


def energy_and_forces(model: Potential, lattice: Lattice, create_graph: bool = False):
    pos = lattice.pos.detach().requires_grad_(True)
    energy = model(pos, lattice)
    (grad,) = torch.autograd.grad(energy, pos, create_graph=create_graph)
    return energy, -grad


def fused_conv_available(device) -> bool:
    """Whether equikern's fused convolution runs on this device type: C++ on the CPU, Triton kernels (the
    convolution here is channelwise, uvu) on CUDA."""
    return torch.device(device).type in ("cpu", "cuda")


def to_equikern(model: Potential, fused: bool = True) -> Potential:
    """A copy of ``model`` computing the same function with equikern (same weights, new Parameters).

    Each convolution becomes one TensorProductConv (``fused``) or stays unfused with an equikern
    TensorProduct; every other e3nn tensor product is replaced by ``equikern.accelerate``.
    """
    new = copy.deepcopy(model)
    ref = next(model.parameters())
    for block in new.interactions:
        if fused:
            block.conv = equikern.TensorProductConv(**block.tp_args).to(device=ref.device, dtype=ref.dtype)
            block.tp = None
    new.spherical_harmonics = equikern.spherical_harmonics
    equikern.accelerate(new)
    return new


def build_models(channels: int, lmax: int, layers: int, device, dtype, seed: int = 0, fused=None):
    """(e3nn model, equikern model) with identical weights; the default dtype is ``dtype`` while e3nn
    builds its Wigner 3j tables, so that float64 models are float64 throughout."""
    if fused is None:
        fused = fused_conv_available(device)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        model = Potential(channels, lmax, layers).to(device=device, dtype=dtype)
        return model, to_equikern(model, fused)
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------------------
# Training and timing


def loss_fn(energy: Tensor, forces: Tensor, energy_ref: Tensor, forces_ref: Tensor) -> Tensor:
    atoms = forces.shape[0]
    return ((energy - energy_ref) / atoms) ** 2 + (forces - forces_ref).pow(2).sum(-1).mean()


def train_step(model, lattice, energy_ref, forces_ref, optimizer) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    energy, forces = energy_and_forces(model, lattice, create_graph=True)
    loss = loss_fn(energy, forces, energy_ref, forces_ref)
    loss.backward()
    optimizer.step()
    return loss.detach()


def median_seconds(fns: dict, device, warmup: int, repeats: int) -> dict:
    """Median wall time of each function; the functions take turns, so that a change in the load of the
    machine during the measurement hits them alike."""

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=None, help="cells per side (default 3 on CPU, 9 on GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--channels", type=int, default=32, help="multiplicity of every irrep")
    parser.add_argument("--lmax", type=int, default=2, help="degree of the spherical harmonics and features")
    parser.add_argument("--layers", type=int, default=2, help="interaction blocks")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cells = args.cells if args.cells is not None else (3 if device.type == "cpu" else 9)

    gen = torch.Generator().manual_seed(args.seed)
    lattice = displaced(carbon_lattice(cells), 0.05, gen).to(device, dtype)
    fused = fused_conv_available(device)
    models = dict(
        zip(("e3nn", "equikern"), build_models(args.channels, args.lmax, args.layers, device, dtype))
    )
    print(
        f"diamond carbon, {cells}^3 cells: {lattice.num_atoms} atoms, {lattice.num_edges} edges "
        f"(within {CUTOFF} A), {args.layers} layers, {args.channels} channels, lmax {args.lmax}, "
        f"{args.dtype} on {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    )
    if not fused:
        print(f"equikern: no fused convolution kernel on {device.type}; running it unfused (equikern TP)")

    results = {name: energy_and_forces(m, lattice) for name, m in models.items()}
    (e_ref, f_ref), (e_ek, f_ek) = results["e3nn"], results["equikern"]
    diff_e, diff_f = (e_ek - e_ref).abs().item(), (f_ek - f_ref).abs().max().item()
    print(f"energy: e3nn {e_ref.item():.6f}, equikern {e_ek.item():.6f}, |diff| {diff_e:.2e}")
    print(f"forces: max |F| {f_ref.abs().max().item():.4f}, max |diff| {diff_f:.2e}")

    # Fitting targets: the e3nn model's own output, perturbed (so that the loss and its gradient are not 0).
    energy_target = (e_ref.detach() + 0.1 * lattice.num_atoms).to(dtype)
    forces_target = (f_ref.detach() + 0.1 * torch.randn(f_ref.shape, generator=gen, dtype=torch.float64)).to(
        device, dtype
    )
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    inference = {name: (lambda m=m: energy_and_forces(m, lattice)) for name, m in models.items()}
    training = {
        name: (lambda m=m, o=optimizers[name]: train_step(m, lattice, energy_target, forces_target, o))
        for name, m in models.items()
    }
    timings = {name: {} for name in models}
    for what, fns in (("inference", inference), ("train_step", training)):
        for name, seconds in median_seconds(fns, device, args.warmup, args.repeats).items():
            timings[name][what] = seconds

    print(f"\nmedian of {args.repeats} runs, ms      e3nn   equikern   speedup")
    for what, label in (("inference", "inference (E + F)"), ("train_step", "training step (E, F loss)")):
        t_ref, t_ek = timings["e3nn"][what] * 1e3, timings["equikern"][what] * 1e3
        print(f"{label:<28}{t_ref:>10.1f}{t_ek:>11.1f}{t_ref / t_ek:>9.1f}x")
    return {"diff_energy": diff_e, "diff_forces": diff_f, "timings": timings, "fused": fused}


if __name__ == "__main__":
    main()
