"""Fused message passing: ``out[n] = sum_{e: dst[e] = n} TP(x[src[e]], edge_attr[e], edge_weight[e])``.

``TensorProductConv`` is a :class:`equikern.TensorProduct` (same constructor, instructions, normalisations,
shared or per-edge weights) applied over an edge list without materialising the per-edge messages: the
unfused form ``torch.zeros(n, d).index_add_(0, dst, tp(x[src], edge_attr, w))`` allocates and writes
[E, dim_out] messages (and [E, dim_in1] gathered features); this one reads each node's inputs and writes
each output row once.
"""

import warnings

import torch
from torch import Tensor

from equikern.nn.tensor_product import TensorProduct
from equikern.ops.tensor_product_conv import (
    ConvGraph,
    conv_gather,
    conv_graph,
    conv_segment_sum,
    tensor_product_conv,
)
from equikern.so3 import spherical_harmonics
from equikern.triton.tensor_product_conv import tensor_product_conv as triton_conv


class TensorProductConv(TensorProduct):
    """``TensorProduct`` summed over the edges of a graph by destination node.

    The constructor takes ``TensorProduct``'s arguments (``irreps_in1`` are the node features,
    ``irreps_in2`` the edge attributes, e.g. spherical harmonics of the edge vectors) plus
    ``deterministic``. ``forward(node_features, edge_attr, edge_weight, edge_src, edge_dst, num_nodes=None)``:
    node_features [N_src, irreps_in1.dim], edge_attr [E, irreps_in2.dim], edge_weight [E, weight_numel]
    (``shared_weights=False``), [weight_numel] (shared) or None (internal weights), edge_src / edge_dst [E]
    integer indices; returns [num_nodes, irreps_out.dim] with num_nodes = N_src by default.

    Edges may come in any order, with repeats. Every call groups them by destination (forward) and by source
    (backward) with a stable sort, so each node's messages are summed in edge order by one thread: on the
    CPU both ``deterministic=True`` and the default are bitwise reproducible from run to run and for any
    number of threads. On a GPU (the Triton kernels of :mod:`equikern.triton.tensor_product_conv`, for
    instruction lists that are all ``uvu`` (NequIP, MACE) or all ``uvw`` (DiffDock's fully connected
    products)) the default adds messages with atomics, and ``deterministic=True``
    walks the groupings instead (no floating-point atomics: bitwise reproducible). Indices out of range
    raise an error naming the argument. ``backend`` is as for ``TensorProduct``. CUDA tensors with other
    instruction lists (or ``backend="native"``) take an unfused route, with a warning: the per-edge
    messages are computed by the CUDA tensor product and summed by destination in edge order
    (reproducible in both modes, [edges, dim] of extra memory).

    ``edge_vectors=True``: ``edge_attr`` are the edge vectors [E, 3] and the module takes their spherical
    harmonics itself (``equikern.spherical_harmonics`` of the degrees of ``irreps_in2``, normalised
    vectors, ``sh_normalization``; Triton kernels on a GPU), so a model passes positions-derived vectors
    and gets forces through both. ``irreps_in2`` must then be spherical-harmonic irreps (one copy of each
    degree, parity (-1)^l).
    """

    def __init__(
        self,
        *args,
        deterministic: bool = False,
        edge_vectors: bool = False,
        sh_normalization: str = "component",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.deterministic = bool(deterministic)
        self.edge_vectors = bool(edge_vectors)
        self.sh_normalization = sh_normalization
        if self.edge_vectors:
            if any(mul != 1 or ir.p != (-1) ** ir.l for mul, ir in self.irreps_in2):
                raise ValueError(
                    f"edge_vectors=True: irreps_in2 must be spherical harmonics (one copy of each l, parity "
                    f"(-1)^l), got {self.irreps_in2}"
                )
            if sh_normalization not in ("integral", "component", "norm"):
                raise ValueError(
                    f"sh_normalization: expected 'integral', 'component' or 'norm', got {sh_normalization!r}"
                )
            self._sh_degrees = [ir.l for _, ir in self.irreps_in2]

    def right(self, y, weight=None):
        raise NotImplementedError("TensorProductConv.right: a convolution has no per-sample linear map")

    def forward(
        self,
        node_features: Tensor,
        edge_attr: Tensor,
        edge_weight: Tensor | None,
        edge_src: Tensor,
        edge_dst: Tensor,
        num_nodes: int | None = None,
    ) -> Tensor:
        w = self._get_weights(edge_weight)
        x = node_features
        if self.edge_vectors:
            if not isinstance(edge_attr, Tensor) or edge_attr.dim() != 2 or edge_attr.shape[1] != 3:
                got = tuple(edge_attr.shape) if isinstance(edge_attr, Tensor) else type(edge_attr).__name__
                raise ValueError(
                    f"edge_attr: expected edge vectors of shape (edges, 3) (edge_vectors=True), got {got}"
                )
            edge_attr = spherical_harmonics(self._sh_degrees, edge_attr, True, self.sh_normalization)
        for t, name, dim, irreps in (
            (x, "node_features", self._dim1, self.irreps_in1),
            (edge_attr, "edge_attr", self._dim2, self.irreps_in2),
        ):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[-1] != dim:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape (rows, {dim}) for irreps {irreps}, got {got}")
        for t, name in ((edge_src, "edge_src"), (edge_dst, "edge_dst")):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a 1-D int64 (or int32) tensor of edge indices, got {got}")
            if t.shape[0] != edge_attr.shape[0]:
                raise ValueError(
                    f"{name}: has {t.shape[0]} edges but edge_attr has {edge_attr.shape[0]} rows"
                )
            if t.device != x.device:
                raise ValueError(f"{name}: is on {t.device} but node_features is on {x.device}")
        if edge_attr.dtype != x.dtype or (self.weight_numel and w.dtype != x.dtype):
            raise ValueError(
                "node_features, edge_attr, edge_weight: dtypes differ "
                f"({x.dtype}, {edge_attr.dtype}, {w.dtype})"
            )
        if edge_attr.device != x.device or (self.weight_numel and w.device != x.device):
            raise ValueError(
                f"node_features, edge_attr, edge_weight: devices differ ({x.device}, {edge_attr.device}, "
                f"{w.device})"
            )
        if self.weight_numel == 0:
            w2 = x.new_zeros(1, 0)
        elif self.shared_weights:
            w2 = w.reshape(1, -1)
        else:
            if w.shape != (edge_attr.shape[0], self.weight_numel):
                raise ValueError(
                    f"edge_weight: expected shape ({edge_attr.shape[0]}, {self.weight_numel}) "
                    f"(one row per edge), got {tuple(w.shape)}"
                )
            w2 = w
        n = x.shape[0] if num_nodes is None else num_nodes
        graph = conv_graph(edge_src.long(), edge_dst.long(), x.shape[0], n)
        cg_val = self._cg_bits.view(torch.float64)
        if self._triton_key is not None and (self.backend == "triton" or x.is_cuda):
            return triton_conv(
                x, edge_attr, w2, graph, self._paths, self._cg_ijk, cg_val, self._triton_key,
                self.deterministic, self._dim_out,
            )  # fmt: skip
        if x.is_cuda:
            if not torch.compiler.is_compiling():
                modes = sorted({i.connection_mode for i in self.instructions})
                warnings.warn(
                    f"TensorProductConv: no fused GPU kernel for this instruction list (modes {modes}, "
                    f"backend {self.backend!r}; the fused kernels take all-'uvu' or all-'uvw' lists with "
                    "backend 'auto' or 'triton'): computing the per-edge messages instead ([edges, dim] "
                    "buffers), with the CUDA tensor product and a reproducible sum by destination",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self._unfused(x, edge_attr, edge_weight, graph)
        return tensor_product_conv(
            x, edge_attr, w2, graph, self._paths, self._blocks, self._cg_ijk, cg_val, self._dim_out
        )

    def _unfused(self, x: Tensor, edge_attr: Tensor, edge_weight: Tensor | None, graph: ConvGraph) -> Tensor:
        """The convolution through per-edge messages: x gathered by source, ``TensorProduct.forward`` on the
        edges, messages summed by destination in edge order. Every step (and its derivatives) is bitwise
        reproducible, so this serves both modes. The GPU route for plans that no fused kernel covers."""
        xs = conv_gather(x, graph.edge_src, graph.src_perm, graph.src_ptr)
        messages = TensorProduct.forward(self, xs, edge_attr, edge_weight)
        return conv_segment_sum(messages, graph.edge_dst, graph.dst_perm, graph.dst_ptr)
