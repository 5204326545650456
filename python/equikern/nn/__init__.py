"""Drop-in modules."""

from equikern.nn.cp import CPTensorProduct
from equikern.nn.gaunt import GauntTensorProduct
from equikern.nn.orbit import OrbitLinear
from equikern.nn.tensor_product import (
    ChannelwiseTensorProduct,
    ElementwiseTensorProduct,
    FullTensorProduct,
    FullyConnectedTensorProduct,
    Instruction,
    TensorProduct,
    channelwise_instructions,
)
from equikern.nn.tensor_product_conv import TensorProductConv

__all__ = [
    "CPTensorProduct",
    "ChannelwiseTensorProduct",
    "ElementwiseTensorProduct",
    "FullTensorProduct",
    "FullyConnectedTensorProduct",
    "GauntTensorProduct",
    "Instruction",
    "OrbitLinear",
    "TensorProduct",
    "TensorProductConv",
    "channelwise_instructions",
]
