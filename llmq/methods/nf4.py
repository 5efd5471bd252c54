"""NF4 (QLoRA, Dettmers et al. 2023): 4-bit codes into the fixed NormalFloat table, absmax scale per group.

    scale = max |w| over the group (fp16),   code = nearest NF4 value to w / scale,   ŵ = scale · NF4[code]

The NF4 values (llmq.methods.grids.nf4_table) are quantiles of N(0, 1) normalised to [−1, 1] with an exact
zero: each value is equally likely for normally distributed weights. Data-free; `--bits` is ignored (NF4 is
4-bit by definition); `--group-size` defaults to 64, QLoRA's block size. Format: "lut" with a shared table.
"""

from __future__ import annotations

import torch

from ..formats.lut import LutQuantized
from .base import Calibration, Method, register
from .grids import nearest_1d, nf4_table
from .lut_common import expand, fp16_scale, group_reduce


def nf4_quantize(w: torch.Tensor, group_size: int = 64) -> LutQuantized:
    w = w.to(torch.float32)
    table = nf4_table().half().float()  # the stored (fp16) values are the ones codes are chosen against
    scale = fp16_scale(group_reduce(w, group_size, "absmax"))
    codes = nearest_1d(w / expand(scale, w.shape[1], group_size), table)
    return LutQuantized(codes=codes.to(torch.uint8), scales=scale.half(), table=table.half()[:, None], bits=4, dim=1,
                        group_size=group_size, in_features=w.shape[1], grid="nf4")


@register
class NF4(Method):
    name = "nf4"
    format = "lut"
    bit_widths = "4"
    calibration = Calibration.IGNORES
    uses_fields = frozenset({"group_size"})  # always 4-bit, a fixed symmetric table
    default_group_size = 64

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> LutQuantized:
        return nf4_quantize(weight, spec.group_size)
