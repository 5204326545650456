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
    "channelwise_instructions",
]
