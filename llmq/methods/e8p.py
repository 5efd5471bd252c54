"""E8P lattice codebook with BlockLDLQ (QuIP#, Tseng et al. 2024): 2, 3 or 4 bits per weight.

The layer is quantized 8 input columns at a time, each row's 8 weights of the block being one vector for the E8P
codebook (llmq/codebooks/e8p.py; 3 and 4 bits add a residual stage). Error feedback is LDLQ generalised to blocks:

    H + λI = L D Lᵀ        L unit block-upper-triangular (8×8 blocks), D block-diagonal     (λ = damp · mean diag H)
    for each block b of 8 columns, in order:
        Ŵ_b = Q( W_b + (W − Ŵ)_{<b} (L − I)_{<b, b} )

so each block's target is its weights plus the feedback of the errors already made, and the result minimises the
proxy loss tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ)X‖² greedily block by block. This is GPTQ's block OBS update with
8-column steps (with U the upper Cholesky factor of (H + λI)⁻¹ and B = blockdiag(U): L = (B⁻¹U)⁻¹,
D = (BᵀB)⁻¹), so it runs in the shared engine, llmq.methods.feedback.error_feedback, with nearest-codeword
rounding as the plug-in. Inputs that are never active (diag H = 0) get zero weight, as in GPTQ. Without
calibration data H = I: BlockLDLQ is nearest-codeword rounding.

The intended use is on top of per-layer incoherence processing (`--rotate hadamard`): the rotated weights are close
to Gaussian, so one scale per layer fits: s₁ = RMS(W) / GAUSS_RMS · scale (the MSE-optimal scale for a standard
normal, times the `scale` option), and a residual stage gets s₂ = s₁ / GAUSS_RESID. `scale_search: true` instead
runs BlockLDLQ for the multipliers in SEARCH_GRID and keeps the one with the least proxy loss.

Recipe options: damp (0.01), scale (1.0), scale_search (false).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codebooks.e8p import DIM, GAUSS_RESID, GAUSS_RMS, STAGES, rvq_encode
from ..errors import InputError
from ..formats.e8p import E8PQuantized, check_shape
from .feedback import Quantizer, error_feedback, hessian_factor, one_thread
from .base import Calibration, Method, option, register
from .options import DAMP, FLAG, number

SEARCH_GRID = (0.8, 0.9, 1.0, 1.1, 1.25)


class NearestCodeword(Quantizer):
    """The plug-in for `error_feedback`: each row's 8 weights of a block (the target, weights plus feedback)
    become the nearest E8P codeword (plus residual stages)."""

    width = DIM

    def __init__(self, rows: int, cols: int, scales: list[float], stages: tuple[str, ...]):
        self.scales, self.stages = scales, stages
        self.codes = [torch.empty(rows, cols // DIM, dtype=torch.int64) for _ in stages]
        self.What_t = torch.empty(cols, rows)

    def residual(self, j: int, x: torch.Tensor, out: torch.Tensor) -> None:
        c, rec = rvq_encode(x.T, self.scales, self.stages)
        for i, ci in enumerate(c):
            self.codes[i][:, j // DIM] = ci
        self.What_t[j:j + DIM] = rec.T
        torch.sub(x, rec.T, out=out)


def block_ldlq(W: torch.Tensor, U: torch.Tensor | None, scales: list[float], stages: tuple[str, ...]):
    """Quantize W [N, K] in blocks of 8 columns with error feedback through U (None: no feedback).
    Returns (codes per stage [N, K/8], Ŵ)."""
    rows, cols = W.shape
    if U is None:
        codes, rec = rvq_encode(W.reshape(-1, DIM), scales, stages)
        return [c.reshape(rows, cols // DIM) for c in codes], rec.reshape(rows, cols)
    nearest = NearestCodeword(rows, cols, scales, stages)
    error_feedback(W.T.contiguous(), U, nearest)
    return nearest.codes, nearest.What_t.T


def proxy_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor | None) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) (H = I without data)."""
    d = W - What
    if H is None:
        return float(d.square().sum())
    return float((d @ H.to(torch.float32)).mul_(d).sum())


def stage_scales(W: torch.Tensor, bits: int, mult: float = 1.0) -> list[float]:
    rms = float(W.square().mean().sqrt())
    s1 = rms / GAUSS_RMS * mult if rms > 0 else 1.0
    out = [s1] + [s1 / GAUSS_RESID[kind] for kind in STAGES[bits][1:]]
    return torch.tensor(out, dtype=torch.float32).tolist()  # the values the checkpoint stores (fp32)


def e8p_quantize(w: torch.Tensor, H: torch.Tensor | None = None, bits: int = 2, damp: float = 0.01, scale: float = 1.0,
                 scale_search: bool = False) -> E8PQuantized:
    if bits not in STAGES:
        raise InputError(f"e8p: --bits must be 2, 3 or 4 (E8P, E8P + 1-bit E8, E8P + E8P), got {bits}")
    rows, cols = w.shape
    check_shape(rows, cols)
    W = w.to(torch.float32).clone()
    U = None
    if H is not None:
        dead, _, U, _ = hessian_factor(H, cols, damp)
        W[:, dead] = 0
    stages = STAGES[bits]
    best = None
    with one_thread():
        for mult in (SEARCH_GRID if scale_search else (1.0,)):
            scales = stage_scales(W, bits, scale * mult)
            codes, What = block_ldlq(W, U, scales, stages)
            loss = proxy_loss(W, What, H) if scale_search else 0.0
            if best is None or loss < best[0]:
                best = (loss, codes, scales)
    _, codes, scales = best
    return E8PQuantized(codes=codes, scales=torch.tensor(scales, dtype=torch.float32), bits=bits)


@register
class E8P(Method):
    name = "e8p"
    format = "e8p"
    bit_widths = "2, 3, 4"
    calibration = Calibration.USES  # BlockLDLQ with calibration data; nearest-codeword rounding without
    uses_fields = frozenset({"bits"})  # one scale per layer: no groups, no zero point

    @dataclass(frozen=True)
    class Options:
        damp: float = option(0.01, DAMP, "Hessian damping, fraction of mean diag H")
        scale: float = option(1.0, number(0.05, 20.0), "multiplier of the Gaussian-optimal codebook scale")
        scale_search: bool = option(False, FLAG, "try several scale multipliers, keep the least proxy loss")

    def check_spec(self, spec, where: str) -> None:
        if spec.bits not in STAGES:
            raise InputError(f"{where}: e8p takes --bits 2, 3 or 4 (E8P, E8P + 1-bit E8, E8P + E8P), got {spec.bits!r}")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> E8PQuantized:
        o = self.options(spec)
        return e8p_quantize(weight, hessian, bits=spec.bits, damp=float(o.damp), scale=float(o.scale),
                            scale_search=bool(o.scale_search))
