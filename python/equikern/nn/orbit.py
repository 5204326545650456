"""OrbitLinear: the linear layer equivariant under a permutation group, weights tied over orbitals.

For features x [..., n, C_in] it computes y_i = sum_j x_j W[O(i, j)] + b[O(i)], with O(i, j) the
orbital of the pair and O(i) the orbit of the point: the most general equivariant linear map of the
group's 2-closure. The n x n weight matrix is never formed on the orbital route.

Routes (``route="auto"`` picks the first that applies):

- ``deepsets``: a transitive group with 2 orbitals (S_n and every 2-transitive group):
  y = x W_diag + (sum_j x_j - x) W_off, O(n C_in C_out).
- ``fft``: the orbitals of the cyclic shift i -> i + 1, ids[i, j] = (j - i) mod n: y is a circular
  cross-correlation, computed with real FFTs, O(n log n C_in + n C_in C_out).
- ``orbital`` or ``dense``, whichever needs the smaller intermediate. orbital: pool the inputs of
  each row by orbital (A[b, i, s] = sum of x_j over the pairs (i, j) in the row's slot s; a row has
  R slots, the number of orbitals from its point orbit), then one matrix product with W (a transitive
  group) or one batched product with per-row weights (otherwise): B n R C_in elements (+ n R C_in
  C_out for the per-row weights). dense: the gathered matrix W[O] of n^2 C_in C_out elements.
"""

import math

import torch
from torch import Tensor

from equikern.ops.orbit import orbital_pool
from equikern.orbit import as_generators, orbitals, orbits

ROUTES = ("auto", "deepsets", "fft", "orbital", "dense")


class OrbitLinear(torch.nn.Module):
    """G-equivariant linear layer on [..., n, in_channels] (see the module docstring for routes).

    weight: [num_orbitals, in_channels, out_channels]; bias: [num_point_orbits, out_channels].
    """

    def __init__(
        self, generators, in_channels: int, out_channels: int, bias: bool = True, route: str = "auto"
    ):
        super().__init__()
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(c, int) or c < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {c!r}")
        if route not in ROUTES:
            raise ValueError(f"route: expected one of {ROUTES}, got {route!r}")
        gens = as_generators(generators)
        n = gens.shape[1]
        if n < 1:
            raise ValueError("generators: the group must act on at least one point")
        self.n, self.in_channels, self.out_channels = n, in_channels, out_channels
        point_ids, self.num_point_orbits = orbits(gens, 1)
        ids, self.num_orbitals, tau = orbitals(gens)
        self.register_buffer("generators", gens, persistent=False)
        self.register_buffer("point_ids", point_ids, persistent=False)
        self.register_buffer("orbital_ids", ids, persistent=False)
        self.register_buffer("tau", tau, persistent=False)
        self._plan_slots(point_ids, ids)

        self.weight = torch.nn.Parameter(
            torch.randn(self.num_orbitals, in_channels, out_channels) / math.sqrt(n * in_channels)
        )
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(self.num_point_orbits, out_channels))
        else:
            self.register_parameter("bias", None)

        cyclic = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
        if self.num_point_orbits == 1 and self.num_orbitals <= 2:
            special = "deepsets"
        elif n > 2 and torch.equal(ids, cyclic):
            special = "fft"
        else:
            special = None
        if route in ("deepsets", "fft") and route != special:
            raise ValueError(f"route: {route!r} does not apply to this group's orbitals")
        self.route = route if route != "auto" else (special or "auto")

    def _plan_slots(self, point_ids: Tensor, ids: Tensor) -> None:
        """Number the orbitals of each row: slot s of a row in point orbit a is table[a, s]."""
        n, m = self.n, self.num_orbitals
        first = torch.empty(m, dtype=torch.int64)  # point orbit of an orbital's first point
        first[ids.reshape(-1)] = point_ids[:, None].expand(n, n).reshape(-1)
        order = torch.argsort(first, stable=True)
        counts = torch.bincount(first, minlength=self.num_point_orbits)
        start = torch.cumsum(counts, 0) - counts
        local = torch.empty(m, dtype=torch.int64)
        local[order] = torch.arange(m) - start[first[order]]
        self.num_slots = int(counts.max())
        table = torch.full((self.num_point_orbits, self.num_slots), m, dtype=torch.int64)
        table[first, local] = torch.arange(m)
        self.register_buffer("slots", local[ids], persistent=False)
        # per-row orbital of each slot; m indexes a zero block appended to the weights
        self.register_buffer("row_table", table[point_ids], persistent=False)

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"orbitals={self.num_orbitals}, point_orbits={self.num_point_orbits}, route={self.route}"
        )

    def dense_weight(self) -> Tensor:
        """The materialised weight matrix W[O(i, j)]: [n, n, in_channels, out_channels]."""
        return self.weight[self.orbital_ids]

    def _pick(self, batch: int) -> str:
        if self.route != "auto":
            return self.route
        per_row = 0 if self.num_point_orbits == 1 else self.out_channels
        orbital = self.n * self.num_slots * self.in_channels * (batch + per_row)
        dense = self.n * self.n * self.in_channels * self.out_channels
        return "orbital" if orbital <= dense else "dense"

    def forward(self, x: Tensor) -> Tensor:
        n, cin, cout = self.n, self.in_channels, self.out_channels
        if not isinstance(x, Tensor) or x.dim() < 2 or tuple(x.shape[-2:]) != (n, cin):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (..., {n}, {cin}), got {got}")
        if x.dtype != self.weight.dtype:
            raise ValueError(f"x: dtype {x.dtype} differs from the weights' {self.weight.dtype}")
        lead = x.shape[:-2]
        x3 = x.reshape(-1, n, cin)
        b = x3.shape[0]
        w = self.weight
        route = self._pick(b)
        if route == "deepsets":
            if self.num_orbitals == 1:
                y = x3 @ w[0]
            else:
                y = x3 @ (w[0] - w[1]) + x3.sum(1, keepdim=True) @ w[1]
        elif route == "fft":
            spec = torch.einsum("bfc,fcd->bfd", torch.fft.rfft(x3, dim=1), torch.fft.rfft(w, dim=0).conj())
            y = torch.fft.irfft(spec, n=n, dim=1)
        elif route == "dense":
            matrix = self.dense_weight().permute(1, 2, 0, 3).reshape(n * cin, n * cout)
            y = (x3.reshape(b, n * cin) @ matrix).reshape(b, n, cout)
        else:
            a = orbital_pool(x3, self.slots, self.num_slots)  # [b, n, R, cin]
            r = self.num_slots
            if self.num_point_orbits == 1:  # one point orbit: slot s is orbital s in every row
                y = (a.reshape(b * n, r * cin) @ w.reshape(r * cin, cout)).reshape(b, n, cout)
            else:
                w_ext = torch.cat([w, w.new_zeros(1, cin, cout)])
                rows = w_ext[self.row_table].reshape(n, r * cin, cout)
                y = torch.bmm(a.transpose(0, 1).reshape(n, b, r * cin), rows).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias[self.point_ids]
        return y.reshape(lead + (n, cout))
