"""The E8P lattice codebook (QuIP#, Tseng et al. 2024): 2¹⁶ points of the shifted E8 lattice E8 + ¼, 2 bits per weight
for 8-dimensional vectors, and the 256-point 1-bit E8 codebook used as a residual stage.

Lattice facts the construction rests on:
    D8  = {x ∈ Z⁸ : Σx even},   D̂8 = D8 + ½·1 = {x ∈ (Z + ½)⁸ : Σx even},   E8 = D8 ∪ D̂8.
    D8 = D̂8 − ½·1, so  E8 + ¼ = (D̂8 + ¼) ∪ (D̂8 − ¼):  every point of the shifted lattice is a point of D̂8 shifted
    by +¼ or −¼.
    Every coordinate of a D̂8 point is a half-odd integer, hence nonzero: x = σ ⊙ a with a = |x| ∈ {½, 3/2, 5/2, …}⁸ and
    σ ∈ {±1}⁸. Flipping one sign changes Σx by 2aᵢ, an odd integer, so Σx is even exactly when the number of negative
    signs has the parity of Σa (an integer): given a and 7 signs, the 8th sign is determined.

The codebook: 256 "base points" a (abs values): all 227 of |D̂8| with ‖a‖² ≤ 10, padded with 29 of the 56 vectors of
norm² 12 with five 3/2 and three ½ (QuIP# pads the same way; which 29 is a free choice: here the first 29 of the
3-subsets of ½-positions in lexicographic order). A 16-bit code is

    bits 0–7   index of a in the base table
    bits 8–14  signs of coordinates 0–6 (1 = negative); the sign of coordinate 7 follows from the parity rule
    bit  15    shift: 0 → +¼, 1 → −¼

so  point = σ ⊙ a ± ¼·1.  256 · 2⁷ · 2 = 2¹⁶ codes, all distinct points (a D̂8 point is determined by (a, σ), and
D̂8 + ¼ and D̂8 − ¼ are disjoint since their difference ½·1 is not in D̂8 − D̂8 = D8). Only the 256-entry table is
needed to decode; the full 65536 × 8 codebook is built in memory on demand (for brute-force checks), never stored.

Exact nearest point (encoder): for a target v and shift t, u = v − t; for base point a the best signs are
σᵢ = sign(uᵢ) at cost Σ(|uᵢ| − aᵢ)², and if their count of negatives has the wrong parity, the cheapest repair
flips the coordinate minimising the extra cost (|uᵢ| + aᵢ)² − (|uᵢ| − aᵢ)² = 4 aᵢ|uᵢ|. Minimising that over the 256
base points and the 2 shifts is the exact nearest codeword over all 2¹⁶ (no approximation, no search heuristics).

The 1-bit E8 codebook (`E8_1BIT`, 256 points, 8-bit codes): the E8 points of norm² ≤ 2 (origin and the 240 roots:
112 of the form ±eᵢ ± eⱼ, 128 of the form (±½)⁸ with an even number of minus signs) plus 15 of the 16 norm-4 axis
points ±2eᵢ (all but −2e₇), found by exhaustive search (256 candidates).

Residual (RVQ) stages, as in QuIP#: 4 bits = E8P + E8P, 3 bits = E8P + 1-bit E8:
    q₁ = s₁ · C₁(v / s₁),   q₂ = s₂ · C₂((v − q₁) / s₂),   v ≈ q₁ + q₂
with Cᵢ the exact nearest codeword of stage i. The default stage scales are the mean-squared-error optimal ones for a
standard normal input (`GAUSS_*`, measured by `gaussian_constants()`; incoherence processing makes rotated weights
close to Gaussian).
"""

from __future__ import annotations

import functools
import itertools

import torch

DIM = 8
N_BASE = 256
SHIFT = 0.25

# MSE-optimal scales for i.i.d. N(0, 1) inputs (gaussian_constants(1 << 15, seed 0), rounded): stage-1 scale
# s₁ = RMS/GAUSS_RMS; the second stage uses s₂ = s₁ / GAUSS_RESID[its codebook]. Relative MSE per weight there:
# 0.0914 (2 bits), 0.0300 (3 bits), 0.0097 (4 bits).
GAUSS_RMS = 1.0348
GAUSS_RESID = {"e8p": 3.305, "e8": 1.967}


def _base_points() -> torch.Tensor:
    """The 256 base points (abs values, float64 [256, 8]), in a fixed order: norm² ≤ 10 by norm then lexicographic,
    then the 29 norm-12 padding points."""
    half = [0.5, 1.5, 2.5]
    small = [a for a in itertools.product(half, repeat=DIM) if sum(x * x for x in a) <= 10]
    small.sort(key=lambda a: (sum(x * x for x in a), a))
    assert len(small) == 227
    pad = []
    for halves in itertools.combinations(range(DIM), 3):  # positions of the three ½ among five 3/2
        pad.append(tuple(0.5 if i in halves else 1.5 for i in range(DIM)))
    return torch.tensor(small + pad[:29], dtype=torch.float64)


BASE = _base_points()  # [256, 8] float64
BASE_PARITY = ((BASE - 0.5).sum(1).round().long() & 1)  # parity of Σa (= Σ(aᵢ − ½) + 4) per base point


def _pack_base() -> torch.Tensor:
    """The base table as the kernels read it: int32 [256], bits 2i..2i+1 = aᵢ − ½ (0, 1 or 2), bit 16 = parity of Σa."""
    k = (BASE - 0.5).round().long()
    word = torch.zeros(N_BASE, dtype=torch.long)
    for i in range(DIM):
        word |= k[:, i] << (2 * i)
    return (word | (BASE_PARITY << 16)).to(torch.int32)


BASE_PACKED = _pack_base()


def _e8_1bit() -> torch.Tensor:
    pts = [(0.0,) * DIM]
    for i, j in itertools.combinations(range(DIM), 2):  # 112 roots ±eᵢ ± eⱼ
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            p = [0.0] * DIM
            p[i], p[j] = si, sj
            pts.append(tuple(p))
    for signs in itertools.product((0.5, -0.5), repeat=DIM):  # 128 roots (±½)⁸, even number of minus signs
        if sum(s < 0 for s in signs) % 2 == 0:
            pts.append(signs)
    for i in range(DIM):  # 15 norm-4 axis points
        for s in (2.0, -2.0):
            if not (i == DIM - 1 and s < 0):
                p = [0.0] * DIM
                p[i] = s
                pts.append(tuple(p))
    assert len(pts) == 256
    return torch.tensor(pts, dtype=torch.float64)


E8_1BIT = _e8_1bit()  # [256, 8] float64


def _pack_e8_1bit() -> torch.Tensor:
    """int32 [256]: nibble i = 2·xᵢ + 4 (0..8)."""
    nib = (E8_1BIT * 2 + 4).round().long()
    word = torch.zeros(256, dtype=torch.long)
    for i in range(DIM):
        word |= nib[:, i] << (4 * i)
    return word.to(torch.int32)  # the top nibble can reach 8 (bit 31): wraps to a negative int32, decoded with masks


E8_1BIT_PACKED = _pack_e8_1bit()


# ---- decode ------------------------------------------------------------------------------------------------------

def _on(t: torch.Tensor, like: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(device=like.device, dtype=dtype)


def e8p_decode(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """16-bit codes (any integer dtype; int16 storage is read as unsigned) [...] -> points [..., 8]."""
    c = codes.to(torch.int64) & 0xFFFF
    idx = c & 0xFF
    a = _on(BASE, c, dtype)[idx]
    bits = (c.unsqueeze(-1) >> torch.arange(8, 15, device=c.device)) & 1  # signs of coords 0..6
    last = (bits.sum(-1) + _on(BASE_PARITY, c, torch.int64)[idx]) & 1  # the parity rule fixes coord 7's sign
    neg = torch.cat([bits, last.unsqueeze(-1)], -1).bool()
    shift = torch.where(((c >> 15) & 1).bool(), -SHIFT, SHIFT).to(dtype).unsqueeze(-1)
    return torch.where(neg, -a, a) + shift


def e8_decode(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """8-bit codes of the 1-bit E8 codebook [...] -> points [..., 8]."""
    return _on(E8_1BIT, codes, dtype)[codes.to(torch.int64) & 0xFF]


@functools.lru_cache(maxsize=2)
def full_codebook(dtype=torch.float64) -> torch.Tensor:
    """All 2¹⁶ E8P points [65536, 8], row c = e8p_decode(c) (for brute-force checks and analysis only)."""
    return e8p_decode(torch.arange(1 << 16), dtype)


# ---- exact encoders ----------------------------------------------------------------------------------------------

def _best_for_shift(u: torch.Tensor, A: torch.Tensor, par: torch.Tensor, k: int = 16):
    """Exact nearest σ ⊙ a (a a base point, σ with the parity rule) to each row of u [N, 8]: (distance², base
    index, negative-sign mask [N, 8]).

    Cheap part for all 256 base points with one matmul: d₀(a) = Σ(|uᵢ| − aᵢ)² (signs of u). Base points whose parity
    disagrees with u's count of negatives pay the repair 4·minᵢ aᵢ|uᵢ| ≥ 2·minᵢ|uᵢ| (aᵢ ≥ ½). The repair is computed
    exactly only for the k mismatched base points with the smallest lower bound d₀ + 2·min|u|; rows where the
    (k+1)-th lower bound could still beat the answer are redone over all 256 (rare), so the result is exact."""
    n = u.shape[0]
    au, neg = u.abs(), u < 0
    negpar = neg.sum(-1) & 1
    d0 = (au.square().sum(-1, keepdim=True) - 2 * au @ A.T) + A.square().sum(-1)  # [N, 256]
    mism = (negpar.unsqueeze(1) ^ par).bool()
    inf = torch.full_like(d0, float("inf"))
    dm, im = torch.where(mism, inf, d0).min(-1)  # best base point needing no repair
    lb = torch.where(mism, d0 + 2 * au.min(-1, keepdim=True).values, inf)
    kk = min(k + 1, A.shape[0])
    lbk, cand = lb.topk(kk, -1, largest=False)  # [N, k+1]
    prod = au.unsqueeze(1) * A[cand[:, :k]]  # [N, k, 8]: aᵢ|uᵢ| for the k candidates
    fmin, fpos = prod.min(-1)
    dr = d0.gather(1, cand[:, :k]) + 4 * fmin
    drm, j = dr.min(-1)
    take = drm < dm
    d = torch.where(take, drm, dm)
    idx = torch.where(take, cand.gather(1, j[:, None]).squeeze(1), im)
    flip_at = fpos.gather(1, j[:, None]).squeeze(1)
    redo = lbk[:, k] < d  # the (k+1)-th candidate's bound does not rule it out: exhaustive for these rows
    if redo.any():
        r = redo.nonzero().squeeze(1)
        prod_all = au[r].unsqueeze(1) * A  # [R, 256, 8]
        fa, pa = prod_all.min(-1)
        da = d0[r] + torch.where(mism[r], 4 * fa, torch.zeros_like(fa))
        d_r, i_r = da.min(-1)
        d[r], idx[r] = d_r, i_r
        take[r] = mism[r].gather(1, i_r[:, None]).squeeze(1)
        flip_at[r] = pa.gather(1, i_r[:, None]).squeeze(1)
    s = neg.clone()
    s[torch.arange(n, device=u.device), flip_at] ^= take  # repair: flip the cheapest coordinate
    return d, idx, s


def _base_lookup() -> torch.Tensor:
    """Index of each abs vector with entries in {½, 3/2, 5/2} in the base table (key Σ (aᵢ − ½)·3ⁱ), −1 if absent."""
    lut = torch.full((3 ** DIM,), -1, dtype=torch.int64)
    k = (BASE - 0.5).round().long()
    lut[(k * (3 ** torch.arange(DIM))).sum(1)] = torch.arange(N_BASE)
    return lut


BASE_LOOKUP = _base_lookup()


def _lattice_nearest(u: torch.Tensor):
    """Nearest point of the whole D̂8 to each row of u (Conway & Sloane's Dₙ decoder on the half-integer coset): round
    every coordinate to the nearest half-odd integer; if the sum is odd, re-round the coordinate that was closest to
    the other choice the other way. Returns (base index or −1 if |x| is not in the table, negative-sign mask)."""
    y = torch.floor(u) + 0.5
    err = u - y  # in [−½, ½)
    odd = (y.sum(-1).round().long() & 1).bool()
    j = err.abs().argmax(-1)
    ej = err.gather(1, j[:, None]).squeeze(1)
    rows = torch.arange(u.shape[0], device=u.device)
    y[rows, j] += torch.where(odd, torch.where(ej >= 0, 1.0, -1.0), 0.0).to(y.dtype)
    k = (y.abs() - 0.5).round().long()
    ok = (k <= 2).all(-1)
    key = (k.clamp(max=2) * (3 ** torch.arange(DIM, device=u.device))).sum(-1)
    idx = torch.where(ok, _on(BASE_LOOKUP, u, torch.int64)[key], -1)
    return idx, y < 0


def _encode_chunk(v: torch.Tensor) -> torch.Tensor:
    """Per shift: the lattice decoder's point when it lies in the codebook (then it is the nearest codeword, the
    codebook being a subset of the lattice), the exact search over the 256 base points for the other rows."""
    A = _on(BASE, v, v.dtype)  # [256, 8]
    par = _on(BASE_PARITY, v, torch.int64)
    pos = torch.arange(8, 15, device=v.device)
    best_d = best_code = None
    for shift_bit, t in ((0, SHIFT), (1, -SHIFT)):
        u = v - t
        idx, s = _lattice_nearest(u)
        miss = idx < 0
        if miss.any():
            r = miss.nonzero().squeeze(1)
            _, idx_r, s_r = _best_for_shift(u[r], A, par)
            idx[r], s[r] = idx_r, s_r
        x = torch.where(s, -A[idx], A[idx])
        d = (u - x).square().sum(-1)
        code = idx | (s[:, :7].long() << pos).sum(-1) | (shift_bit << 15)
        if best_d is None:
            best_d, best_code = d, code
        else:
            take = d < best_d
            best_d, best_code = torch.where(take, d, best_d), torch.where(take, code, best_code)
    return best_code


def e8p_encode(v: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact nearest E8P codeword of each 8-vector: v [N, 8] (float32 or float64) -> codes int64 [N] in [0, 2¹⁶)."""
    if v.shape[-1] != DIM:
        raise ValueError(f"E8P encodes 8-dimensional vectors, got last dim {v.shape[-1]}")
    v2 = v.reshape(-1, DIM)
    out = [_encode_chunk(v2[i:i + chunk]) for i in range(0, v2.shape[0], chunk)]
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)).reshape(v.shape[:-1])


def e8_encode(v: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Exact nearest point of the 256-point 1-bit E8 codebook (exhaustive): v [..., 8] -> codes int64 [...]."""
    C = _on(E8_1BIT, v, v.dtype)
    cn = C.square().sum(-1)
    v2 = v.reshape(-1, DIM)
    out = [(cn - 2 * v2[i:i + chunk] @ C.T).argmin(-1) for i in range(0, v2.shape[0], chunk)]
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)).reshape(v.shape[:-1])


ENCODERS = {"e8p": (e8p_encode, e8p_decode), "e8": (e8_encode, e8_decode)}
STAGES = {2: ("e8p",), 3: ("e8p", "e8"), 4: ("e8p", "e8p")}  # bits per weight -> codebook of each residual stage
CODE_BITS = {"e8p": 16, "e8": 8}


def rvq_encode(v: torch.Tensor, scales: list[float], stages: tuple[str, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Residual quantization of 8-vectors v [N, 8]: each stage codes the residual left by the ones before it.
    Returns (codes per stage, the reconstruction Σ sᵢ Cᵢ)."""
    rec = torch.zeros_like(v)
    codes = []
    for s, kind in zip(scales, stages):
        enc, dec = ENCODERS[kind]
        c = enc((v - rec) / s)
        codes.append(c)
        rec = rec + s * dec(c, v.dtype)
    return codes, rec


def rvq_decode(codes: list[torch.Tensor], scales: list[float], stages: tuple[str, ...], dtype=torch.float32) -> torch.Tensor:
    out = None
    for c, s, kind in zip(codes, scales, stages):
        q = ENCODERS[kind][1](c, dtype) * s
        out = q if out is None else out + q
    return out


def gaussian_constants(n: int = 1 << 20, seed: int = 0) -> dict:
    """Measure the MSE-optimal stage scales for N(0, 1) inputs (how GAUSS_RMS and GAUSS_RESID were obtained):
    a golden-section search of the stage-1 scale, then of each second stage's residual scale ratio."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, DIM, generator=g)

    def golden(f, lo, hi, iters=30):
        phi = (5 ** 0.5 - 1) / 2
        a, b = lo, hi
        c, d = b - phi * (b - a), a + phi * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(iters):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - phi * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + phi * (b - a)
                fd = f(d)
        return (a + b) / 2

    def mse(scales, stages):
        return float((rvq_encode(v, scales, stages)[1] - v).square().mean())

    k = golden(lambda k: mse([1 / k], ("e8p",)), 0.7, 1.4)
    out = {"rms": k, "mse_2bit": mse([1 / k], ("e8p",))}
    for kind in ("e8p", "e8"):
        r = golden(lambda r: mse([1 / k, 1 / (k * r)], ("e8p", kind)), 1.0, 6.0)
        out[f"resid_{kind}"] = r
        out[f"mse_{kind}"] = mse([1 / k, 1 / (k * r)], ("e8p", kind))
    return out
