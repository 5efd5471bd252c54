"""Fixed lookup grids: NF4 (QLoRA) and MSE-optimal grids for a standard normal (HIGGS).

NF4 (Dettmers et al. 2023, QLoRA §3): a 4-bit data type whose values are quantiles of N(0, 1), normalised to
[−1, 1], with an exact zero. The quantiles are taken separately for the two signs so that 0 is a value:
8 positive values Φ⁻¹(p) for p evenly spaced from δ to 1/2 (the 1/2 end, i.e. 0, dropped), 7 negative values
−Φ⁻¹(p) for 8 evenly spaced p from δ to 1/2 (again dropping 0), plus 0; each side divided by its largest
magnitude. δ = ½(1 − 1/(2·15) + 1 − 1/(2·16)) ≈ 0.9677: the extreme quantile is placed between the ones a
15- and a 16-level grid would use, because Φ⁻¹(1) is infinite.

Lloyd–Max grids (1-d): the scalar quantizer with 2^b levels minimising E(X − Q(X))² for X ~ N(0, 1). Lloyd's
conditions (nearest neighbour: thresholds at midpoints; centroid: each level is the conditional mean of its
cell, (φ(a) − φ(b)) / (Φ(b) − Φ(a))) are iterated with the exact Gaussian integrals, no sampling.

2-d grids (HIGGS, Malinovskii et al. 2024): 2^(2b) points in R² minimising E‖X − Q(X)‖² for X ~ N(0, I₂).
No closed form; they are found by k-means (Lloyd) on a large seeded Gaussian sample, k-means++ seeded, the
best of a few restarts, computed once by `python -m llmq.methods.grids --write` and stored as constants in
`gauss_grids_data.py` (so quantizing never waits for it and every run uses the same points). The product of
two 1-d Lloyd–Max grids is a stationary point of 2-d Lloyd but not the optimum (its cells are rectangles;
the optimum's are roughly hexagonal), which is why the 2-d grids beat 1-d grids at the same bits per weight.
"""

from __future__ import annotations

import functools
import math

import torch

NF4_DELTA = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))


def nf4_table() -> torch.Tensor:
    """The 16 NF4 values (float64, ascending), computed from the normal quantile function."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(NF4_DELTA, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive quantiles
    neg = -ndtri(torch.linspace(NF4_DELTA, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative quantiles
    v = torch.cat([pos / pos.max(), torch.zeros(1, dtype=torch.float64), neg / neg.abs().max()])
    return v.sort().values


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _cells(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mid = (levels[1:] + levels[:-1]) / 2
    inf = torch.tensor([math.inf], dtype=levels.dtype)
    return torch.cat([-inf, mid]), torch.cat([mid, inf])


def gaussian_mse_1d(levels: torch.Tensor) -> float:
    """E(X − Q(X))², X ~ N(0, 1), Q = nearest of `levels` (sorted), by exact integrals over the cells."""
    lv = levels.to(torch.float64).sort().values
    a, b = _cells(lv)
    P = _Phi(b) - _Phi(a)
    M1 = _phi(a) - _phi(b)  # ∫ x φ
    # ∫ x² φ = [Φ − xφ]; xφ(x) → 0 at ±inf
    xa = torch.where(torch.isinf(a), torch.zeros_like(a), a * _phi(a))
    xb = torch.where(torch.isinf(b), torch.zeros_like(b), b * _phi(b))
    M2 = P - (xb - xa)
    return float((M2 - 2 * lv * M1 + lv * lv * P).sum())


@functools.lru_cache(maxsize=None)
def lloyd_max_1d(bits: int, iters: int = 20000, tol: float = 1e-15) -> torch.Tensor:
    """The MSE-optimal 2^bits-level scalar quantizer for N(0, 1) (float64, ascending, symmetric)."""
    n = 1 << bits
    lv = torch.linspace(-2.5, 2.5, n, dtype=torch.float64) * (1 if n > 2 else 0.3)
    for _ in range(iters):
        a, b = _cells(lv)
        new = (_phi(a) - _phi(b)) / (_Phi(b) - _Phi(a))
        done = float((new - lv).abs().max()) < tol
        lv = new
        if done:
            break
    return (lv - lv.flip(0)) / 2  # exact symmetry (the iteration keeps it up to rounding)


def nearest_1d(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` for every element of x (ties to the lower level)."""
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mid.to(x.dtype), right=False)


def nearest_2d(x: torch.Tensor, points: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Index of the nearest of `points` [T, 2] for each row of x [n, 2], exact (squared distances), in cache-sized chunks."""
    p = points.to(x.dtype)
    pn = (p * p).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = pn[None, :] - 2 * xs @ p.T  # ‖x‖² is the same for every point
        out[s:s + chunk] = d.argmin(1)
    return out


def kmeans_2d(n_points: int, samples: int = 1 << 19, restarts: int = 2, iters: int = 200, seed: int = 0) -> torch.Tensor:
    """Lloyd / k-means for N(0, I₂): k-means++ seeding on a seeded Gaussian sample, the best of `restarts`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 2, generator=g)
    best, best_err = None, math.inf
    for _ in range(restarts):
        c = x[torch.randint(0, samples, (1,), generator=g)]
        d2 = ((x - c) ** 2).sum(1)
        for _ in range(n_points - 1):  # k-means++: next seed drawn with probability ∝ squared distance
            i = torch.multinomial((d2 / d2.sum()).float(), 1, generator=g)
            c = torch.cat([c, x[i]])
            d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
        prev = math.inf
        for _ in range(iters):
            a = nearest_2d(x, c)
            cnt = torch.bincount(a, minlength=n_points).double()
            s = torch.zeros(n_points, 2, dtype=torch.float64).index_add_(0, a, x.double())
            c = torch.where(cnt[:, None] > 0, s / cnt.clamp_min(1)[:, None], c.double()).to(x.dtype)
            err = float(((x - c[a]) ** 2).sum(1).double().mean()) / 2
            if prev - err < 1e-7 * prev:
                break
            prev = err
        if err < best_err:
            best, best_err = c.clone(), err
    return best


def sorted_points(c: torch.Tensor) -> torch.Tensor:
    """A canonical order for a 2-d grid (by first then second coordinate), so stored tables are stable."""
    key = torch.round(c[:, 0] * 1e6) * 1e7 + c[:, 1]
    return c[key.argsort()]


@functools.lru_cache(maxsize=None)
def gaussian_grid(bits: int, dim: int) -> torch.Tensor:
    """The HIGGS grid for `bits` per weight and dimension 1 or 2: float32 [2^(bits·dim), dim]."""
    if dim == 1:
        return lloyd_max_1d(bits).to(torch.float32)[:, None]
    if dim == 2:
        from .gauss_grids_data import GRIDS_2D

        if bits not in GRIDS_2D:
            raise ValueError(f"no stored 2-d grid for {bits} bits per weight")
        return torch.tensor(GRIDS_2D[bits], dtype=torch.float32)
    raise ValueError(f"grid dimension must be 1 or 2, got {dim}")


def _write(path: str) -> None:
    lines = ['"""2-d MSE-optimal grids for N(0, I₂), generated by `python -m llmq.methods.grids --write` (llmq/methods/grids.py:',
             'k-means on 2^19 seeded Gaussian samples (seed = bits), k-means++ seeding, best of 2 restarts). {bits per weight: [[x, y], ...]}."""',
             "", "GRIDS_2D = {"]
    for bits in (2, 3, 4):
        c = sorted_points(kmeans_2d(1 << (2 * bits), seed=bits))
        lines.append(f"    {bits}: [")
        for row in c.tolist():
            lines.append(f"        [{row[0]:.8f}, {row[1]:.8f}],")
        lines.append("    ],")
        print(f"{bits} bits: {c.shape[0]} points", flush=True)
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if "--write" in sys.argv:
        torch.set_num_threads(1)  # small kernels: one thread is much faster on a shared CPU
        _write(str(Path(__file__).with_name("gauss_grids_data.py")))
