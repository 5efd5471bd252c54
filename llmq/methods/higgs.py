"""HIGGS (Malinovskii et al. 2024, "Pushing the Limits of LLM Quantization via the Linearity Theorem"):
data-free quantization with a randomized Hadamard rotation and MSE-optimal grids for a standard normal.

1. Rotate each row's input dimension with a randomized Hadamard transform V = T·diag(s) (llmq.rotation.hadamard,
   the transform `--rotate hadamard` uses): W̃ = W Vᵀ. After the rotation the weights of a row are close to
   i.i.d. Gaussian whatever the original distribution (outliers are spread over the whole row).
2. Per group of `group_size` inputs, scale by the group's RMS σ (fp16): W̃/σ ≈ N(0, 1). (Option `scale: mse`
   then refines σ by alternating least squares: codes for σ, σ = ⟨w, g⟩/⟨g, g⟩ for those codes.)
3. Round to the grid that minimises the expected squared error for N(0, 1): the 2^b-level Lloyd–Max grid
   (dim 1) or the 2^(2b)-point 2-d grid applied to pairs of consecutive weights (dim 2), llmq.methods.grids.
   The linearity theorem says the model's perplexity increase is, to first order, a weighted sum of the
   layers' relative MSEs, so minimising each layer's MSE on its (Gaussian) weights is the data-free goal.

At inference the layer computes W̃ (V x): the stored signs give V (format "lut", `lut_signs`). No calibration
data is used (works with `--calib none`; a Hessian, if given, is ignored). Options (recipe `options:`):
`dim` 1 or 2 (default 1), `rotate` (default true; false quantizes the unrotated weights, for ablations),
`scale` (rms: the group's RMS, as the paper; mse: then refined by alternating least squares, a few
percent lower error), `hadamard_size` (rotate each run of that many inputs on its own — the reference
implementation's block-diagonal transform, default there 1024 — instead of the whole row; it must divide
the layer's inputs), `column_scale` (see below), `seed` (the signs' seed, default 0; the signs depend on the input size and seed, so layers reading the same
input share them). `--rotate hadamard` on top adds QuIP#'s two-sided rotation, which composes correctly.

`column_scale: true` (an llmq extension, not in the paper; still data-free): before the rotation divide each
input column by its RMS over the rows (relative to the matrix's RMS), W = A·diag(c), quantize A, store c (fp16,
K values, counted in the bits per weight; at inference y = W̃ (V (c ⊙ x))). The rotation spreads A's rounding
error evenly over its columns, so each column of W gets an error in proportion to its own size, as an unrotated
per-group grid does, while the weights A that are rounded stay Gaussian after the rotation. Why it matters: a
model's massive-activation input channels (the attention sink's, up to ~5,000x the median mean x² on SmolLM2)
are read through weights the model has made tiny (on SmolLM2 the strongest one's v_proj column is among the
smallest 1.4 % in every block from 1 on; reports/ablate_layer_types.md). A plain rotation gives those tiny weights the same absolute error as every other, and
the sink token's huge activation multiplies it. The column norms, not data, find them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.lut import LutQuantized, code_count
from .grids import gaussian_grid, nearest_1d, nearest_2d
from .lut_common import check_group_size_even, expand, fp16_scale, group_reduce, group_sum
from .base import Calibration, Method, option, register
from .options import FLAG, choice, integer, optional

HIGGS_BITS = (2, 3, 4)


def higgs_signs(in_features: int, seed: int = 0) -> torch.Tensor:
    from ..rotation.hadamard import random_signs

    return random_signs(in_features, f"higgs:{in_features}", seed)


def grid_codes(u: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest grid point for u [N, K] scaled weights: grid [T, 1] per weight, or [T, 2] per pair of weights
    (an odd K's last weight is matched on the first coordinate only; the pad decodes to nothing)."""
    n, k = u.shape
    if grid.shape[1] == 1:
        return nearest_1d(u, grid[:, 0])
    pairs = k // 2
    codes = torch.empty(n, code_count(k, 2), dtype=torch.int64)
    if pairs:
        codes[:, :pairs] = nearest_2d(u[:, : 2 * pairs].reshape(-1, 2), grid).reshape(n, pairs)
    if k % 2:
        codes[:, -1] = (u[:, -1:] - grid[None, :, 0]).square().argmin(1)
    return codes


def grid_values(codes: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """The (unscaled) grid values the codes select, [N, K]."""
    return grid[codes].reshape(codes.shape[0], -1)[:, :k]


def mse_scales(w: torch.Tensor, grid: torch.Tensor, scale: torch.Tensor, group_size: int, iters: int) -> torch.Tensor:
    """Alternating minimisation of ‖w − s·grid[c]‖² per group: codes for the current s, then the least-squares
    s = ⟨w, g⟩ / ⟨g, g⟩ for those codes. Each step lowers the group's error (starting from the RMS scale)."""
    k = w.shape[1]
    for _ in range(iters):
        q = grid_values(grid_codes(w / expand(scale, k, group_size), grid), grid, k)
        num, den = group_sum(w * q, group_size), group_sum(q * q, group_size)
        new = num / den.clamp_min(1e-30)
        scale = torch.where((den > 0) & (new > 0), new, scale)
    return scale


def column_scales(w: torch.Tensor) -> torch.Tensor:
    """c [K] (fp16 values): each input column's RMS over the rows, relative to the whole matrix's RMS. Quantizing
    A = W diag(c)⁻¹ instead of W gives every column the same error relative to its own size (A's columns all have
    the same norm; after the rotation A's error is spread evenly over its columns, and diag(c) scales column j's share
    back by c_j). An all-zero column gets c = 0 and decodes to exactly zero."""
    rms = w.square().mean(0).sqrt()
    c = rms / w.square().mean().sqrt().clamp_min(1e-30)
    return torch.where(rms > 0, c.clamp(2.0**-14, 65504.0), torch.zeros_like(c)).half()


def higgs_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, dim: int = 1, rotate: bool = True,
                   seed: int = 0, scale: str = "rms", scale_iters: int = 4, hadamard_size: int | None = None,
                   column_scale: bool = False) -> LutQuantized:
    from ..errors import InputError
    from ..rotation.hadamard import input_hadamard

    if bits not in HIGGS_BITS:
        raise InputError(f"higgs: bits must be one of {HIGGS_BITS}, got {bits}")
    w = w.to(torch.float32)
    k = w.shape[1]
    if hadamard_size == k:
        hadamard_size = None  # one block is the whole row
    if hadamard_size is not None and k % hadamard_size:
        raise InputError(f"higgs: hadamard_size {hadamard_size} does not divide the layer's {k} inputs")
    c = column_scales(w) if column_scale else None
    if c is not None:  # A = W diag(c)⁻¹ (a zero column has c = 0 and stays zero)
        w = w / torch.where(c > 0, c.float(), torch.ones((), dtype=torch.float32))
    signs = higgs_signs(k, seed) if rotate else None
    if signs is not None:
        w = input_hadamard(signs, hadamard_size).forward(w)  # every row: V w
    grid = gaussian_grid(bits, dim).half().float()  # encode against the stored (fp16) points
    s = group_reduce(w, group_size, "rms")
    if scale == "mse":
        s = mse_scales(w, grid, torch.where(s > 0, s, torch.ones_like(s)), group_size, scale_iters)
    scale = fp16_scale(s)
    codes = grid_codes(w / expand(scale, k, group_size), grid)
    return LutQuantized(codes=codes, scales=scale.half(), table=grid.half(), bits=bits, dim=dim, group_size=group_size,
                        in_features=k, grid="higgs", signs=signs, hadamard_block=hadamard_size if signs is not None else None,
                        input_scale=c)


@register
class HIGGS(Method):
    name = "higgs"
    format = "lut"
    bit_widths = "2, 3, 4"
    calibration = Calibration.IGNORES
    uses_fields = frozenset({"bits", "group_size"})  # Gaussian grids: symmetric, no clipping search

    @dataclass(frozen=True)
    class Options:
        dim: int = option(1, choice(1, 2), "grid dimension: 1 (per weight) or 2 (pairs of weights)")
        rotate: bool = option(True, FLAG, "randomized Hadamard rotation of each row (false: ablation)")
        seed: int = option(0, integer(0, 2**31 - 1), "seed of the rotation's random signs")
        scale: str = option("rms", choice("rms", "mse"), "group scale: RMS, or refined by least squares (mse)")
        hadamard_size: int | None = option(None, optional(integer(2, 1 << 20)), "rotate runs of this many inputs (null: whole row)")
        column_scale: bool = option(False, FLAG, "divide input columns by their RMS before the rotation (llmq extension)")

    def check_spec(self, spec, where: str) -> None:
        from ..errors import InputError

        if spec.bits not in HIGGS_BITS:
            raise InputError(f"{where}: higgs grids exist for {', '.join(map(str, HIGGS_BITS))} bits, got {spec.bits}")
        if self.options(spec).dim == 2:
            check_group_size_even(spec, where)

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> LutQuantized:
        o = self.options(spec)
        return higgs_quantize(weight, spec.bits, spec.group_size, dim=int(o.dim), rotate=bool(o.rotate), seed=int(o.seed or 0),
                              scale=str(o.scale), hadamard_size=int(o.hadamard_size) if o.hadamard_size else None,
                              column_scale=bool(o.column_scale))
