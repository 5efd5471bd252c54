"""The shared error-feedback engine (llmq.methods.feedback.error_feedback): with a plain integer-grid plug-in it is
GPTQ, bit for bit; its lazy batches give the same decisions as the textbook loop with immediate updates, for
1-column and d-column steps (BlockLDLQ)."""

import pytest
import torch

from llmq.methods.feedback import Quantizer, error_feedback, hessian_factor
from llmq.methods.gptq import gptq_quantize
from llmq.methods.rtn import find_scales


def layer(rows=48, cols=200, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(3 * cols, cols, generator=g) * (0.2 + 3 * torch.rand(cols, generator=g))
    x = x @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5)  # correlated inputs
    H = 2 * x.T @ x / x.shape[0]
    H[7], H[:, 7] = 0, 0  # a dead input
    return w.to(dtype), H.to(dtype)


class RowGrid(Quantizer):
    """Round to nearest on one symmetric integer grid per row, written independently of GPTQ's plug-in."""

    def __init__(self, scale, bits, cols):
        self.scale, self.lo, self.hi = scale, -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        self.q = torch.empty(cols, scale.shape[0], dtype=scale.dtype)

    def residual(self, j, x, out):
        torch.div(x, self.scale, out=self.q[j:j + 1]).round_().clamp_(self.lo, self.hi)
        torch.addcmul(x, self.q[j:j + 1], self.scale, value=-1.0, out=out)


@pytest.mark.parametrize("bits", [2, 4])
def test_engine_with_a_plain_grid_is_gptq_exactly(bits):
    w, H = layer()
    dead, perm, U, damping = hessian_factor(H, w.shape[1], 0.01)
    W = w.clone()
    W[:, dead] = 0
    scale, zero = find_scales(W, bits, 0, True, False)  # one group per row: GPTQ fixes it from the unmodified row
    grid = RowGrid(scale[:, 0], bits, w.shape[1])
    energy = error_feedback(W.T.contiguous(), U, grid)
    ref = gptq_quantize(w, H, bits, 0, True, act_order=False)
    assert torch.equal(grid.q.T + zero, ref.codes.float())
    Q = grid.q.T * scale
    assert torch.equal(energy.sub_((W - Q).square().sum(1), alpha=damping).clamp_min_(0), ref.hessian_error)


def textbook(W, U, quant, d):
    """Immediate updates, no batching: for each step of d columns, E = (W_b − Q_b) U_bb⁻¹, W[:, later] −= E U[b, later]."""
    W = W.clone()
    Q = torch.empty_like(W)
    for b in range(0, W.shape[1], d):
        e = b + d
        Q[:, b:e] = quant(W[:, b:e])
        E = torch.linalg.solve_triangular(U[b:e, b:e], W[:, b:e] - Q[:, b:e], upper=True, left=False)
        W[:, e:] -= E @ U[b:e, e:]
    return Q


class Fixed(Quantizer):
    """A plug-in from a function of the [rows, d] block."""

    def __init__(self, quant, d, rows, cols):
        self.quant, self.width, self.Qt = quant, d, torch.empty(cols, rows, dtype=torch.float64)

    def residual(self, j, x, out):
        q = self.quant(x.T).T
        self.Qt[j:j + x.shape[0]] = q
        torch.sub(x, q, out=out)


@pytest.mark.parametrize("d", [1, 2, 8, 128])
def test_lazy_batches_decide_as_immediate_updates(d):
    w, H = layer(rows=16, cols=384, seed=1, dtype=torch.float64)
    _, _, U, _ = hessian_factor(H, w.shape[1], 0.01, dtype=torch.float64)

    def quant(x):  # a coarse grid, and a block decision that couples the d columns (their mean)
        return torch.round(x * 20) / 20 + (x.mean(1, keepdim=True) > 0) * 0.01

    ref = textbook(w, U, quant, d)
    plug = Fixed(quant, d, *w.shape)
    error_feedback(w.T.contiguous(), U, plug)
    assert torch.allclose(plug.Qt.T, ref, rtol=0, atol=1e-12)
