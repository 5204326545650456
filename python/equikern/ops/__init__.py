"""The Python face of ``torch.ops.equikern.*``: one module per op family."""

from equikern.ops import cp, gaunt, orbit, tensor_product, tensor_product_conv  # noqa: F401
