"""Rotations before quantization (`--rotate`): orthogonal changes of basis that leave the model's function
unchanged but spread weight outliers, so low-bit grids waste less of their range. Every method sees only
the rotated (W, H), so RTN, GPTQ and later methods compose with them unchanged.

    none      no rotation
    hadamard  per-layer incoherence processing (QuIP#): each layer quantized as U W Vᵀ, transformed online
    residual  model-level residual-stream rotation (QuaRot/SpinQuant R1, + per-head V/O): zero inference cost
    both      residual, then per-layer hadamard on top
"""

from __future__ import annotations

from ..errors import InputError
from ..transforms.hadamard import RandomizedHadamard, factor, fwht, hadamard_transform
from .incoherence import HadamardLinear, LayerIncoherence
from .residual import ResidualRotation, RotatedSource, head_dim_of, rotate_model_

ROTATE_MODES = ("none", "hadamard", "residual", "both")


def per_layer(mode: str) -> bool:
    return mode in ("hadamard", "both")


def residual(mode: str) -> bool:
    return mode in ("residual", "both")


def check_mode(mode: str) -> str:
    if mode not in ROTATE_MODES:
        raise InputError(f"unknown rotation {mode!r} (choose from {', '.join(ROTATE_MODES)})")
    return mode


def residual_rotation(recipe, config) -> ResidualRotation | None:
    if not residual(recipe.rotate):
        return None
    return ResidualRotation.for_config(config, recipe.rotate_seed, per_head_vo=recipe.rotate_vo)


def layer_incoherence(recipe, in_key: str, out_key: str, in_features: int, out_features: int) -> LayerIncoherence | None:
    """The per-layer transforms for a layer (None unless the recipe asks for them); `in_key` names the group
    of layers reading the same input, `out_key` the layer."""
    if not per_layer(recipe.rotate):
        return None
    return LayerIncoherence.for_layer(in_key, out_key, in_features, out_features, recipe.rotate_seed)


def check_sizes(recipe, config, quantize_head: bool = False) -> None:
    """Fail early, with one line, when a size the rotation needs has no Hadamard construction."""
    if recipe.rotate == "none":
        return
    hd = head_dim_of(config)
    sizes = {"hidden size": config.hidden_size}
    if residual(recipe.rotate) and recipe.rotate_vo:
        sizes["head_dim"] = hd
    if per_layer(recipe.rotate):
        sizes.update({"intermediate size": config.intermediate_size, "q width": config.num_attention_heads * hd,
                      "k/v width": getattr(config, "num_key_value_heads", config.num_attention_heads) * hd})
        if quantize_head:
            sizes["vocab size"] = config.vocab_size
    for what, n in sizes.items():
        try:
            factor(n)
        except InputError as e:
            raise InputError(f"--rotate {recipe.rotate}: {what} {n}: {e}") from None


def rotate_(model, mode: str, seed: int = 0, per_head_vo: bool = True):
    """Rotate a loaded, unquantized model in place without quantizing it (the function must not change):
    `residual` rewrites its weights; `hadamard` replaces each decoder linear layer by a HadamardLinear."""
    from ..adapters import adapter_for
    from ..modules import set_submodule

    check_mode(mode)
    adapter = adapter_for(model.config)
    if residual(mode):
        rotate_model_(model, ResidualRotation.for_config(model.config, seed, per_head_vo), adapter)
    if per_layer(mode):
        blocks = model.get_submodule(adapter.blocks)
        for i, block in enumerate(blocks):
            prefix = adapter.block_prefix(i)
            for group in adapter.linear_groups:
                for name in group:
                    lin = block.get_submodule(name)
                    inc = LayerIncoherence.for_layer(prefix + group[0], prefix + name, lin.in_features, lin.out_features, seed)
                    set_submodule(block, name, HadamardLinear(lin, inc))
    return model


__all__ = ["ROTATE_MODES", "HadamardLinear", "LayerIncoherence", "RandomizedHadamard", "ResidualRotation", "RotatedSource",
           "check_mode", "check_sizes", "factor", "fwht", "hadamard_transform", "layer_incoherence", "per_layer", "residual",
           "residual_rotation", "rotate_", "rotate_model_"]
