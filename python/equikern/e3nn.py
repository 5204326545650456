"""Conversion of e3nn modules into equikern modules: ``from_e3nn`` and ``accelerate``."""

import torch

from equikern.nn.tensor_product import TensorProduct


def _e3nn_tensor_product_class():
    try:
        from e3nn import o3
    except ImportError:
        return None
    return o3.TensorProduct


def from_e3nn(module: torch.nn.Module) -> TensorProduct:
    """The equikern module computing the same function as an e3nn ``TensorProduct`` (or subclass).

    The instructions are taken with e3nn's final path weights (normalisation, variances and user
    path weights already folded in), so the result matches whatever options built ``module``;
    internal weights, buffers, dtype and device are copied.
    """
    cls = _e3nn_tensor_product_class()
    if cls is None or not isinstance(module, cls):
        raise ValueError(f"module: expected an e3nn.o3.TensorProduct, got {type(module).__name__}")
    # e3nn stores path_weight = sqrt(alpha); with normalisations "none" ours is sqrt(path_weight).
    instructions = [
        (i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight, i.path_weight**2)
        for i in module.instructions
    ]
    new = TensorProduct(
        str(module.irreps_in1),
        str(module.irreps_in2),
        str(module.irreps_out),
        instructions,
        irrep_normalization="none",
        path_normalization="none",
        internal_weights=module.internal_weights,
        shared_weights=module.shared_weights,
    )
    ref = module.output_mask
    new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    with torch.no_grad():
        if new.internal_weights and new.weight_numel > 0:
            new.weight.copy_(module.weight)
    new.train(module.training)
    return new


def accelerate(model: torch.nn.Module) -> int:
    """Replace, in place, every e3nn tensor product inside ``model``; returns how many were replaced.

    Parameters of the replaced modules are carried over (the new modules hold the same values, as
    new Parameter objects: rebuild optimizers after calling this).
    """
    cls = _e3nn_tensor_product_class()
    if cls is None:
        return 0
    if isinstance(model, cls):
        raise ValueError("model: is itself an e3nn TensorProduct; use equikern.from_e3nn(model) instead")
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, cls)]
    converted = {}  # a module used at several places stays shared after conversion
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(m) not in converted:
            converted[id(m)] = from_e3nn(m)
        setattr(parent, attr, converted[id(m)])
    return len(converted)
