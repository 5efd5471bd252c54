import pytest
import torch

from llmq.formats import IntFormat
from llmq.formats.intq import n_groups
from llmq.methods.rtn import rtn_quantize


def weight(out=24, inp=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, 17] = 0.5  # an outlier
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_is_nearest_grid_point(bits, group_size, sym):
    w = weight()
    q = rtn_quantize(w, bits, group_size, sym)
    assert q.scales.shape == (24, n_groups(200, group_size))  # 200 = 128 + 72: a shorter last group
    assert int(q.codes.max()) < 2**bits
    deq = q.dequantize()
    gi = torch.arange(200) // (group_size or 200)
    step = q.scales.float()[:, gi]
    # every weight inside its group's grid range is within half a step of its dequantized value
    lo = step * (0 - (q.zeros.float()[:, gi] if q.zeros is not None else 2 ** (bits - 1)))
    hi = lo + step * (2**bits - 1)
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.9  # the standard grids clip a little (sym: [-2^(b-1), 2^(b-1)-1] steps)
    assert ((w - deq).abs()[inside] <= step[inside] / 2 * (1 + 1e-5)).all()
    # outside the grid's range, the nearest grid point is the nearer end
    assert torch.allclose(deq[w < lo], lo[w < lo]) and torch.allclose(deq[w > hi], hi[w > hi])


def test_more_bits_less_error():
    w = weight()
    errs = [(w - rtn_quantize(w, b, 64, True).dequantize()).pow(2).sum() for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]


@pytest.mark.parametrize("sym", [True, False])
def test_mse_clip_never_worse(sym):
    w = weight()
    plain = (w - rtn_quantize(w, 3, 64, sym).dequantize()).pow(2).sum()
    clipped = (w - rtn_quantize(w, 3, 64, sym, mse_clip=True).dequantize()).pow(2).sum()
    assert clipped < plain


def test_scales_are_fp16_exact_and_pack_round_trips():
    w = weight()
    q = rtn_quantize(w, 3, 64, False)
    packed = q.pack()
    assert set(packed) == {"qweight", "scales", "qzeros"}
    cfg = q.layer_config()
    assert {k: (tuple(s), d) for k, (s, d) in IntFormat.tensor_specs(cfg).items()} == {k: (tuple(v.shape), v.dtype) for k, v in packed.items()}
    assert torch.equal(IntFormat.dequantize(packed, cfg), q.dequantize())
    # the in-memory codes with the fp16 scales reproduce the dequantized weight exactly
    gi = torch.arange(200) // 64
    manual = (q.codes.float() - q.zeros.float()[:, gi]) * q.scales.float()[:, gi]
    assert torch.equal(manual, q.dequantize())


def test_zero_rows_stay_zero():
    w = torch.zeros(4, 64)
    assert torch.equal(rtn_quantize(w, 4, 32, True).dequantize(), w)
    assert torch.equal(rtn_quantize(w, 4, 32, False).dequantize(), w)


def test_unpacked_decode_equals_packed_decode():
    """IntQuantized.dequantize (straight from the codes, used for reports) is bit-identical to decoding the
    packed tensors, for symmetric and asymmetric grids, a short last group and an act-order group index."""
    from llmq.formats.intq import IntFormat
    from llmq.methods.gptq import gptq_quantize
    from llmq.methods.rtn import rtn_quantize

    torch.manual_seed(0)
    w = torch.randn(24, 100)
    x = torch.randn(400, 100)
    for sym in (True, False):
        for q in (rtn_quantize(w, 3, 32, sym), gptq_quantize(w, 2 * x.T @ x / 400, 3, 32, sym, act_order=True)):
            assert torch.equal(q.dequantize(), IntFormat.dequantize(q.pack(), q.layer_config()))
