"""E8P lattice codebook with BlockLDLQ (QuIP#, Tseng et al. 2024): 2, 3 or 4 bits per weight.

The layer is quantized 8 input columns at a time, each row's 8 weights of the block being one vector for the E8P
codebook (llmq/codebooks/e8p.py; 3 and 4 bits add a residual stage). Error feedback is LDLQ generalised to blocks:

    H + λI = L D Lᵀ        L unit block-upper-triangular (8×8 blocks), D block-diagonal     (λ = damp · mean diag H)
    for each block b of 8 columns, in order:
        Ŵ_b = Q( W_b + (W − Ŵ)_{<b} (L − I)_{<b, b} )

so each block's target is its weights plus the feedback of the errors already made, and the result minimises the
proxy loss tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ)X‖² greedily block by block (the block OBS update; with 1-column blocks
this is GPTQ). L comes from GPTQ's factor: with U the upper Cholesky factor of (H + λI)⁻¹ (`inverse_hessian_cholesky`,
same damping and retries) and B = blockdiag(U), A = B⁻¹U is unit upper triangular, H + λI = A⁻¹ (BᵀB)⁻¹ A⁻ᵀ, so
L = A⁻¹ and D = (BᵀB)⁻¹. Inputs that are never active (diag H = 0) get zero weight, as in GPTQ. Without calibration
data H = I: L = I and BlockLDLQ is nearest-codeword rounding.

The intended use is on top of per-layer incoherence processing (`--rotate hadamard`): the rotated weights are close
to Gaussian, so one scale per layer fits: s₁ = RMS(W) / GAUSS_RMS · scale (the MSE-optimal scale for a standard
normal, times the `scale` option), and a residual stage gets s₂ = s₁ / GAUSS_RESID. `scale_search: true` instead
runs BlockLDLQ for the multipliers in SEARCH_GRID and keeps the one with the least proxy loss.

Recipe options: damp (0.01), scale (1.0), scale_search (false).
"""

from __future__ import annotations

import torch

from ..codebooks.e8p import DIM, GAUSS_RESID, GAUSS_RMS, STAGES, rvq_encode
from ..errors import InputError
from ..formats.e8p import E8PQuantized, check_shape
from .gptq import inverse_hessian_cholesky, one_thread
from .options import DAMP, FLAG, number

SEARCH_GRID = (0.8, 0.9, 1.0, 1.1, 1.25)
LAZY = 128  # feedback from earlier super-blocks is applied LAZY columns at a time (one matmul), as GPTQ's lazy batches


def block_ldl(H: torch.Tensor, damp: float = 0.01, block: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D) with H + λI = L D Lᵀ, L unit block-upper-triangular, D block-diagonal (blocks of `block` columns)."""
    n = H.shape[0]
    if n % block:
        raise ValueError(f"block LDL needs a size divisible by {block}, got {n}")
    U = inverse_hessian_cholesky(H.to(torch.float32), damp)
    nb = n // block
    Ub = torch.stack([U[i:i + block, i:i + block] for i in range(0, n, block)])  # [nb, b, b]
    A = torch.linalg.solve_triangular(Ub, U.reshape(nb, block, n), upper=True).reshape(n, n)  # B⁻¹U
    eye = torch.eye(n, dtype=A.dtype)
    for i in range(0, n, block):  # its diagonal blocks are U_bb⁻¹U_bb = I: make that exact, so L's are too
        A[i:i + block, i:i + block] = eye[:block, :block]
    L = torch.linalg.solve_triangular(A, eye, upper=True, unitriangular=True)
    D = torch.block_diag(*torch.linalg.inv(Ub.transpose(1, 2) @ Ub))
    return L, D


_FEEDBACK_CACHE: dict = {}


def feedback_matrix(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead inputs, L − I) for a layer's H. Layers reading the same input (q/k/v, gate/up) share one H object and
    so one factorisation."""
    key = (id(H), H._version, damp)
    if _FEEDBACK_CACHE.get("key") == key and _FEEDBACK_CACHE.get("H") is H:
        return _FEEDBACK_CACHE["value"]
    Hd = H.to(torch.float32).clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    L, _ = block_ldl(Hd, damp)
    value = (dead, L - torch.eye(L.shape[0]))
    _FEEDBACK_CACHE.update(key=key, H=H, value=value)
    return value


def block_ldlq(W: torch.Tensor, M: torch.Tensor | None, scales: list[float], stages: tuple[str, ...]):
    """Quantize W [N, K] in blocks of 8 columns with feedback matrix M = L − I (None: no feedback).
    Returns (codes per stage [N, K/8], Ŵ)."""
    rows, cols = W.shape
    nv = cols // DIM
    if M is None:
        codes, rec = rvq_encode(W.reshape(-1, DIM), scales, stages)
        return [c.reshape(rows, nv) for c in codes], rec.reshape(rows, cols)
    codes = [torch.empty(rows, nv, dtype=torch.int64) for _ in stages]
    What = torch.empty_like(W)
    R = torch.empty_like(W)  # W − Ŵ of the finished columns
    for s0 in range(0, cols, LAZY):
        s1 = min(s0 + LAZY, cols)
        T = W[:, s0:s1].clone()  # targets: W plus feedback from all earlier super-blocks, in one matmul
        if s0:
            T.addmm_(R[:, :s0], M[:s0, s0:s1])
        for b0 in range(s0, s1, DIM):
            b1 = b0 + DIM
            x = T[:, b0 - s0:b1 - s0]
            if b0 > s0:  # feedback from this super-block's finished blocks
                x = x + R[:, s0:b0] @ M[s0:b0, b0:b1]
            c, rec = rvq_encode(x, scales, stages)
            for i, ci in enumerate(c):
                codes[i][:, b0 // DIM] = ci
            What[:, b0:b1] = rec
            R[:, b0:b1] = W[:, b0:b1] - rec
    return codes, What


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
    M = None
    if H is not None:
        dead, M = feedback_matrix(H, damp)
        W[:, dead] = 0
    stages = STAGES[bits]
    best = None
    with one_thread():
        for mult in (SEARCH_GRID if scale_search else (1.0,)):
            scales = stage_scales(W, bits, scale * mult)
            codes, What = block_ldlq(W, M, scales, stages)
            loss = proxy_loss(W, What, H) if scale_search else 0.0
            if best is None or loss < best[0]:
                best = (loss, codes, scales)
    _, codes, scales = best
    return E8PQuantized(codes=codes, scales=torch.tensor(scales, dtype=torch.float32), bits=bits)


class E8P:
    name = "e8p"
    needs_hessian = False  # BlockLDLQ with calibration data; nearest-codeword rounding without
    uses_fields = frozenset({"bits"})  # one scale per layer: no groups, no zero point
    options_schema = {"damp": DAMP, "scale": number(0.05, 20.0), "scale_search": FLAG}

    @staticmethod
    def check_spec(spec, where: str) -> None:
        if spec.bits not in STAGES:
            raise InputError(f"{where}: e8p takes --bits 2, 3 or 4 (E8P, E8P + 1-bit E8, E8P + E8P), got {spec.bits!r}")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> E8PQuantized:
        o = spec.options
        return e8p_quantize(weight, hessian, bits=spec.bits, damp=float(o.get("damp", 0.01)),
                            scale=float(o.get("scale", 1.0)), scale_search=bool(o.get("scale_search", False)))
