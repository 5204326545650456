import os

import pytest
import torch

# Triton kernels run under Triton's interpreter where there is no GPU (CI): set before any kernel is
# defined, since triton.jit reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def float64_default():
    """e3nn stores its Wigner 3j and builds its D matrices in the default dtype: comparisons at
    float64 precision need references built with float64 as the default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
