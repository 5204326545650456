"""The Python face of ``torch.ops.equikern.*``: one module per op family."""

from equikern.ops import orbit, tensor_product  # noqa: F401
