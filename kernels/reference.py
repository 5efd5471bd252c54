"""Torch reference for the int format's matmul: the CPU path, and what the Triton kernels are tested against.

    y = x @ Wᵀ (+ bias),   W[n, k] = scale[n, g(k)] · (code[n, k] − zero[n, g(k)])

with g(k) = g_idx[k] (act-order) or k // group_size, zero = 2^(b−1) when symmetric. W is rebuilt in fp32 and
rounded once to the activation dtype, so the reference and the kernels see the same weights; the matmul
accumulates in fp32 (torch's CPU half/bfloat16 GEMM accumulates in fp32).

Not needlessly slow: codes are unpacked with one broadcast shift when b divides 32 (2, 4, 8 bits: no word
straddles), scales/zeros are expanded with one gather, and there is no Python loop over groups or rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmq.formats.intq import default_group_index
from llmq.formats.packing import unpack_bits

from .registry import register


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 [N, ceil(K·b/32)] -> int32 codes [N, K]."""
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
        # Arithmetic right shift of a negative word fills the top with ones; the mask keeps only b bits.
        codes = (qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(qweight.shape[0], qweight.shape[1] * per_word)[:, :in_features]
    return unpack_bits(qweight, bits, in_features).to(torch.int32)


def group_index(cfg: dict, t: dict[str, torch.Tensor], device) -> torch.Tensor:
    if "g_idx" in t:
        return t["g_idx"].to(device=device, dtype=torch.long)
    return default_group_index(cfg["in_features"], cfg["group_size"]).to(device)


def dequantize_int(t: dict[str, torch.Tensor], cfg: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed int-format tensors -> weight [N, K] in `dtype` (computed in fp32, rounded once)."""
    bits, k = cfg["bits"], cfg["in_features"]
    codes = unpack_codes(t["qweight"], bits, k).to(torch.float32)
    gi = group_index(cfg, t, codes.device)
    scales = t["scales"].to(torch.float32)
    if "qzeros" in t:
        codes = codes - t["qzeros"].to(torch.float32)[:, gi]
    else:
        codes = codes - float(1 << (bits - 1))
    return (codes * scales[:, gi]).to(dtype)


@register("int", backend="torch")
def int_matmul_ref(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                   transforms=None) -> torch.Tensor:
    """W rebuilt in x's dtype, as the Triton kernel rounds it; input transforms applied to x, as the kernel does."""
    for tr in transforms or ():
        x = tr.forward(x)
    w = dequantize_int(t, cfg, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
