"""equikern: compiled kernels for equivariant deep learning.

Importing the package loads ``equikern._C``, which registers the ``torch.ops.equikern`` ops.
"""

import torch  # noqa: F401  (must be imported before _C: it provides libtorch)

from equikern import _C  # noqa: F401
from equikern import ops as _ops  # noqa: F401  (registers fake kernels and autograd)
from equikern.cp import cp_bilinear, cp_decompose, from_tensor_product
from equikern.e3nn import accelerate, from_e3nn
from equikern.gaunt import gaunt_coefficients, gaunt_power, gaunt_product
from equikern.irreps import Irrep, Irreps
from equikern.nn import (
    ChannelwiseTensorProduct,
    CPTensorProduct,
    ElementwiseTensorProduct,
    FullTensorProduct,
    FullyConnectedTensorProduct,
    GauntTensorProduct,
    OrbitLinear,
    TensorProduct,
    TensorProductConv,
)
from equikern.orbit import (
    group_average,
    orbit_average,
    orbit_broadcast,
    orbit_pool,
    orbital_embedding,
    orbitals,
    orbits,
    permute,
)
from equikern.so3 import spherical_harmonics, wigner_3j

__version__ = "0.1.0"

__all__ = [
    "CPTensorProduct",
    "ChannelwiseTensorProduct",
    "ElementwiseTensorProduct",
    "FullTensorProduct",
    "FullyConnectedTensorProduct",
    "GauntTensorProduct",
    "Irrep",
    "Irreps",
    "OrbitLinear",
    "TensorProduct",
    "TensorProductConv",
    "accelerate",
    "cp_bilinear",
    "cp_decompose",
    "from_e3nn",
    "from_tensor_product",
    "gaunt_coefficients",
    "gaunt_power",
    "gaunt_product",
    "group_average",
    "orbit_average",
    "orbit_broadcast",
    "orbit_pool",
    "orbital_embedding",
    "orbitals",
    "orbits",
    "permute",
    "spherical_harmonics",
    "wigner_3j",
]
