"""Learned vector codebooks (GPTVQ, van Baalen et al. 2024; VPTQ, Liu et al. 2024): each row is cut into vectors of
d consecutive input features, every vector becomes a k-bit index into a learned codebook of 2^k d-dimensional
centroids (one codebook per block of R rows, or per layer), so a weight costs k/d bits plus the codebook overhead.

Three steps per layer, all against the layer's input Hessian H = 2XXᵀ/N (H = I without calibration data):

1. Init: k-means over the layer's d-vectors, each coordinate weighted by its input column's importance diag(H)_c
   (the output error of a lone weight error δ in column c is H_cc δ²):
       min Σ_v Σ_t h_{v,t} (x_{v,t} − c_{a(v),t})²
   seeded weighted k-means++ (first centroid ∝ a vector's total weight, then ∝ its weighted distance to the nearest
   centroid so far), then weighted Lloyd iterations (on a seeded random subset of at most `kmeans_sample` = 65,536
   vectors per codebook: on SmolLM2's gate_proj that halves the time at the same output error); the E step (argmin over centroids) and the M step (per
   coordinate weighted mean, c_{a,t} = Σ h x / Σ h; an empty centroid keeps its value) each never increase the
   objective.
2. Assignment with GPTQ error feedback, d columns at a time in column order. With U the upper Cholesky factor of the
   damped inverse Hessian (`feedback.hessian_factor`, damping 1% of mean diag H raised tenfold on failure) and
   U_bb its d×d diagonal block at the current columns, the OBS cost of quantizing the vector x of a row to q, when
   the later columns compensate, is (x − q)(U_bbᵀU_bb)⁻¹(x − q)ᵀ = ‖(x − q)U_bb⁻¹‖² (GPTVQ's metric: the inverse
   of the d×d block of the remaining inverse Hessian), so each vector takes the centroid nearest in the basis U_bb⁻¹;
   the error E = (x − q)U_bb⁻¹ is pushed onto the later columns, W[:, later] −= E U[b, later]
   (llmq.methods.feedback.error_feedback with d-column steps).
3. Codebook update: with the indices fixed, Q is linear in the centroids, and the centroids minimising the layer's
   output error tr((W − Q) H (W − Q)ᵀ) (W the original weights) solve the normal equations
       Σ_r S_rᵀ H S_r θ = Σ_r S_rᵀ H w_r        (S_r: row r's selection of centroid coordinates)
   solved per codebook by conjugate gradients (Jacobi preconditioner), each step one [N, K] × [K, K] product plus a
   scatter; CG from the current centroids never increases the objective. The result is rounded to the storage
   dtype (fp16, or int8 with one fp16 scale per codebook) and kept only if the rounded loss is not worse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats.vq import (CODEBOOK_DTYPES, MAX_INDEX_BITS, VQ_DIMS, VQQuantized, check_shape, codebook_of_rows,
                          n_codebooks, round_codebooks)
from .feedback import Quantizer, diagonal_block_inverses, error_feedback, hessian_factor, one_thread
from .base import Calibration, Method, option, register
from .options import DAMP, FLAG, choice, integer

SCORE_ELEMENTS = 1 << 24  # distance matrices are computed in chunks of about this many entries


def default_dim(bits: int) -> int:
    """d = 4 at 2 bits (256 centroids of 4 weights); d = 2 above (k = 2·bits: 64 centroids at 3 bits), so codebooks
    stay small enough for per-block-of-rows codebooks and for k-means on a CPU."""
    return 4 if bits <= 2 else 2


# ---- 1. Hessian-diagonal-weighted k-means ------------------------------------------------------------------------

def row_blocks(M: torch.Tensor, rows_per_codebook: int, fill: float = 0.0) -> torch.Tensor:
    """[N, ...] -> [nb, R, ...], the last block padded with `fill`."""
    n = M.shape[0]
    r = rows_per_codebook or n
    nb = -(-n // r)
    if nb * r != n:
        M = torch.cat([M, M.new_full((nb * r - n, *M.shape[1:]), fill)])
    return M.reshape(nb, r, *M.shape[1:])


def kmeans_inputs(w: torch.Tensor, h: torch.Tensor, dim: int, rows_per_codebook: int):
    """The d-vectors of each codebook's rows and their coordinate weights: X, Hw [nb, R·K/d, d]; padded rows weigh 0."""
    n, k = w.shape
    X = row_blocks(w.reshape(n, k // dim, dim), rows_per_codebook)
    Hw = row_blocks(h.reshape(1, k // dim, dim).expand(n, -1, -1), rows_per_codebook)
    nb = X.shape[0]
    return X.reshape(nb, -1, dim), Hw.reshape(nb, -1, dim).contiguous()


def weighted_assign(X: torch.Tensor, Hw: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """argmin_a Σ_t h_t (x_t − c_{a,t})² for every vector: [nb, V] (Σ h x² is constant per vector and dropped)."""
    nb, V, d = X.shape
    feats = torch.cat([-2 * Hw * X, Hw], -1)  # [nb, V, 2d] · [c, c²] = Σ h (c² − 2xc)
    cents = torch.cat([C, C * C], -1).transpose(1, 2)  # [nb, 2d, nc]
    step = max(1, SCORE_ELEMENTS // max(1, nb * C.shape[1]))
    return torch.cat([torch.bmm(feats[:, s:s + step], cents).argmin(-1) for s in range(0, V, step)] or
                     [torch.empty(nb, 0, dtype=torch.int64)], 1)


def weighted_means(X: torch.Tensor, Hw: torch.Tensor, a: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """M step: each centroid coordinate = weighted mean of its members' coordinates (unchanged if it has none)."""
    nb, nc, d = C.shape
    flat = (a + torch.arange(nb)[:, None] * nc).reshape(-1)
    num = torch.zeros(nb * nc, d).index_add_(0, flat, (Hw * X).reshape(-1, d))
    den = torch.zeros(nb * nc, d).index_add_(0, flat, Hw.reshape(-1, d))
    return torch.where(den > 0, num / den.clamp_min(1e-30), C.reshape(-1, d)).reshape(nb, nc, d)


def kmeans_objective(X: torch.Tensor, Hw: torch.Tensor, C: torch.Tensor, a: torch.Tensor) -> float:
    q = torch.gather(C, 1, a.unsqueeze(-1).expand(-1, -1, C.shape[2]))
    return float((Hw.double() * (X.double() - q.double()).square()).sum())


def kmeans_pp(X: torch.Tensor, Hw: torch.Tensor, n_centroids: int, gen: torch.Generator, candidates: int = 32) -> torch.Tensor:
    """Weighted k-means++ seeding, all codebooks at once: [nb, nc, d]. Seeds are drawn from a seeded random subset of
    `candidates` · nc vectors per codebook (the seeding is sequential over centroids; Lloyd iterations see more)."""
    nb, V, d = X.shape
    idx = torch.arange(nb)
    if V > candidates * n_centroids:
        sub = torch.argsort(torch.rand(nb, V, generator=gen), 1)[:, : candidates * n_centroids]
        X, Hw = torch.gather(X, 1, sub[..., None].expand(-1, -1, d)), torch.gather(Hw, 1, sub[..., None].expand(-1, -1, d))
    mass = Hw.sum(-1)  # a vector's total importance
    if V == 0:
        return torch.zeros(nb, n_centroids, d)
    first = torch.multinomial(torch.where(mass.sum(1, keepdim=True) > 0, mass, torch.ones_like(mass)), 1, generator=gen)[:, 0]
    C = torch.empty(nb, n_centroids, d)
    C[:, 0] = X[idx, first]
    best = (Hw * (X - C[:, 0:1]).square()).sum(-1)
    for c in range(1, n_centroids):
        p = best.clamp_min(0)
        p = torch.where(p.sum(1, keepdim=True) > 0, p, mass + 1e-30)  # all vectors covered exactly: any member
        pick = torch.multinomial(p, 1, generator=gen)[:, 0]
        C[:, c] = X[idx, pick]
        torch.minimum(best, (Hw * (X - C[:, c:c + 1]).square()).sum(-1), out=best)
    return C


def weighted_kmeans(X: torch.Tensor, Hw: torch.Tensor, n_centroids: int, iters: int, seed: int = 0, tol: float = 1e-4,
                    trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [nb, nc, d], assignment [nb, V]). Stops early once an iteration lowers the objective by less than
    `tol` (relative). `trace` collects the objective after every half step (E and M)."""
    gen = torch.Generator().manual_seed(seed)
    C = kmeans_pp(X, Hw, n_centroids, gen)
    a = weighted_assign(X, Hw, C)
    last = kmeans_objective(X, Hw, C, a)
    if trace is not None:
        trace.append(last)
    for _ in range(iters):
        C = weighted_means(X, Hw, a, C)
        if trace is not None:
            trace.append(kmeans_objective(X, Hw, C, a))
        a_new = weighted_assign(X, Hw, C)
        obj = kmeans_objective(X, Hw, C, a_new)
        if trace is not None:
            trace.append(obj)
        if torch.equal(a_new, a) or last - obj <= tol * last:
            a = a_new
            break
        a, last = a_new, obj
    return C, a


# ---- 2. assignment with GPTQ error feedback ----------------------------------------------------------------------

def nearest_codes(x: torch.Tensor, C: torch.Tensor, cb_rows: torch.Tensor, rows_per_codebook: int) -> torch.Tensor:
    """Euclidean nearest centroid of each row's vector x [N, d] in its row's codebook: [N]."""
    n = x.shape[0]
    xb = row_blocks(x, rows_per_codebook)  # [nb, R, d]
    scores = torch.baddbmm(C.square().sum(-1).unsqueeze(1), xb, C.transpose(1, 2), alpha=-2)  # ‖c‖² − 2 x·c
    return scores.argmin(-1).reshape(-1)[:n]


class NearestCentroid(Quantizer):
    """The plug-in for `error_feedback`: each row's d-vector takes the centroid nearest in the basis U_bb⁻¹."""

    def __init__(self, U: torch.Tensor, C: torch.Tensor, rows: int, rows_per_codebook: int):
        self.C, self.rpc = C, rows_per_codebook
        self.width = C.shape[2]
        self.A = diagonal_block_inverses(U, self.width)  # U_bb⁻¹ of each d-column step
        self.cb_rows = codebook_of_rows(rows, rows_per_codebook)
        self.codes = torch.empty(rows, U.shape[0] // self.width, dtype=torch.int64)

    def residual(self, j: int, x: torch.Tensor, out: torch.Tensor) -> None:
        nb, nc, d = self.C.shape
        v = j // d
        xr = x.T  # [rows, d], as updated by the earlier columns
        code = nearest_codes(xr @ self.A[v], self.C @ self.A[v], self.cb_rows, self.rpc)
        self.codes[:, v] = code
        torch.sub(x, self.C.reshape(-1, d)[self.cb_rows * nc + code].T, out=out)


def assign_feedback(W: torch.Tensor, U: torch.Tensor | None, C: torch.Tensor, rows_per_codebook: int,
                    block_size: int = 128) -> torch.Tensor:
    """Indices [N, K/d] chosen d columns at a time with GPTQ error feedback (module docstring, step 2).
    U = None (no Hessian): plain nearest-centroid assignment. W is not modified."""
    rows, cols = W.shape
    d = C.shape[2]
    if U is None:
        x = W.reshape(rows, cols // d, d).transpose(0, 1)  # [K/d, N, d]
        return torch.stack([nearest_codes(x[v], C, codebook_of_rows(rows, rows_per_codebook), rows_per_codebook) for v in range(cols // d)], 1)
    nearest = NearestCentroid(U, C, rows, rows_per_codebook)
    error_feedback(W.T.contiguous(), U, nearest, block_size)
    return nearest.codes


# ---- 3. codebook update ------------------------------------------------------------------------------------------

def decode(C: torch.Tensor, codes: torch.Tensor, rows_per_codebook: int) -> torch.Tensor:
    rows, nv = codes.shape
    nb, nc, d = C.shape
    cb = codebook_of_rows(rows, rows_per_codebook)
    return C.reshape(-1, d)[(cb[:, None] * nc + codes).reshape(-1)].reshape(rows, nv * d)


def proxy_loss(w: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ), the layer's output error up to a constant."""
    D = (w - Q).double()
    return float(((D @ H.double()) * D).sum())


def update_codebooks(w: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, C: torch.Tensor, rows_per_codebook: int,
                     iters: int = 25) -> torch.Tensor:
    """Least-squares centroids for fixed indices (module docstring, step 3), by per-codebook preconditioned CG."""
    rows, cols = w.shape
    nb, nc, d = C.shape
    cb = codebook_of_rows(rows, rows_per_codebook)
    flat = (cb[:, None] * nc + codes).reshape(-1)
    H = H.to(torch.float32)

    def gather(theta):  # θ -> Q [rows, cols]
        return theta.reshape(-1, d)[flat].reshape(rows, cols)

    def scatter(M):  # Sᵀ M: sum each weight position's value into its centroid coordinate
        return torch.zeros(nb * nc, d).index_add_(0, flat, M.reshape(-1, d)).reshape(nb, nc, d)

    D = scatter(torch.diagonal(H).expand(rows, cols).contiguous())
    D = torch.where(D > 0, D, torch.ones_like(D))
    theta = C.clone()
    r = scatter((w - gather(theta)) @ H)  # b − Gθ
    z = r / D
    p = z.clone()
    rz = (r * z).sum((1, 2))
    for _ in range(iters):
        Gp = scatter(gather(p) @ H)
        pGp = (p * Gp).sum((1, 2))
        alpha = torch.where(pGp > 0, rz / pGp.clamp_min(1e-30), torch.zeros_like(rz))
        theta += alpha[:, None, None] * p
        r -= alpha[:, None, None] * Gp
        z = r / D
        rz_new = (r * z).sum((1, 2))
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta[:, None, None] * p
        rz = rz_new
        if float(rz.max()) <= 0:
            break
    return theta


# ---- the method --------------------------------------------------------------------------------------------------

def vq_quantize(w: torch.Tensor, H: torch.Tensor | None = None, dim: int = 4, index_bits: int = 8,
                rows_per_codebook: int = 0, codebook_dtype: str = "fp16", kmeans_iters: int = 10, seed: int = 0,
                feedback: bool = True, update: bool = True, update_iters: int = 25, damp: float = 0.01,
                block_size: int = 128, kmeans_sample: int = 65536) -> VQQuantized:
    with one_thread():  # mostly small ops: intra-op threads cost more than they give on a busy machine (measured 3-9x)
        return _vq_quantize(w, H, dim, index_bits, rows_per_codebook, codebook_dtype, kmeans_iters, seed, feedback,
                            update, update_iters, damp, block_size, kmeans_sample)


def _vq_quantize(w, H, dim, index_bits, rows_per_codebook, codebook_dtype, kmeans_iters, seed, feedback, update,
                 update_iters, damp, block_size, kmeans_sample) -> VQQuantized:
    rows, cols = w.shape
    check_shape(cols, dim)
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise InputError(f"vq: index bits must be in 1..{MAX_INDEX_BITS}, got {index_bits}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise InputError(f"vq: codebook dtype must be fp16 or int8, got {codebook_dtype!r}")
    rpc = 0 if not rows_per_codebook or rows_per_codebook >= rows else int(rows_per_codebook)
    W = w.to(torch.float32).clone()
    if H is None:
        U, h, Hl = None, torch.ones(cols), torch.eye(cols)
    else:
        dead, _, U, _ = hessian_factor(H, cols, damp)
        W[:, dead] = 0  # GPTQ's convention: inputs that never fire carry no information
        Hl = H.to(torch.float32)
        h = torch.diagonal(Hl).clamp_min(0).clone()
        if not feedback:
            U = None
    X, Hw = kmeans_inputs(W, h, dim, rpc)
    if kmeans_sample and X.shape[1] > kmeans_sample:  # Lloyd on a seeded random subset of each codebook's vectors
        keep = torch.randperm(X.shape[1], generator=torch.Generator().manual_seed(seed + 1))[:kmeans_sample]
        X, Hw = X[:, keep], Hw[:, keep]
    C, _ = weighted_kmeans(X, Hw, 1 << index_bits, kmeans_iters, seed)
    del X, Hw
    C = round_codebooks(C, codebook_dtype)
    codes = assign_feedback(W, U, C, rpc, block_size)
    if update:
        before = proxy_loss(W, decode(C, codes, rpc), Hl)
        C_new = round_codebooks(update_codebooks(W, Hl, codes, C, rpc, update_iters), codebook_dtype)
        if proxy_loss(W, decode(C_new, codes, rpc), Hl) <= before:
            C = C_new
    return VQQuantized(codes=codes, codebooks=C, dim=dim, index_bits=index_bits, rows_per_codebook=rpc,
                       codebook_dtype=codebook_dtype)


def layer_options(bits: int, options: dict) -> dict:
    """The vq_quantize keyword arguments of a recipe spec's options: d from the bits unless given, k = bits · d
    unless `index_bits` is given (None: not given)."""
    o = {k: v for k, v in options.items() if v is not None}
    dim = int(o.pop("dim", default_dim(bits)))
    kw = {"dim": dim, "index_bits": int(o.pop("index_bits", bits * dim))}
    if kw["index_bits"] > MAX_INDEX_BITS:
        raise InputError(f"vq: {bits} bits with d = {dim} needs {bits * dim}-bit indices (at most {MAX_INDEX_BITS}); "
                         f"use a smaller dim or set index_bits")
    kw.update(o)
    return kw


@register
class VQ(Method):
    name = "vq"
    format = "vq"
    bit_widths = "2-8 (index bits / dim)"
    calibration = Calibration.USES  # H = I without calibration data
    uses_fields = frozenset({"bits"})  # bits per weight = index bits / dim; codebooks, not groups

    @dataclass(frozen=True)
    class Options:  # the defaults are vq_quantize's
        dim: int | None = option(None, choice(*VQ_DIMS), "vector length d (default 4 at 2 bits, else 2)")
        index_bits: int | None = option(None, integer(1, MAX_INDEX_BITS), "bits per index (default bits · dim)")
        rows_per_codebook: int = option(0, integer(0, 1 << 30), "rows sharing one codebook (0: one per layer)")
        codebook_dtype: str = option("fp16", choice(*CODEBOOK_DTYPES), "codebook storage: fp16, or int8 with one fp16 scale")
        kmeans_iters: int = option(10, integer(0, 1000), "weighted Lloyd iterations")
        kmeans_sample: int = option(65536, integer(0, 1 << 40), "vectors per codebook for k-means (0: all)")
        update_iters: int = option(25, integer(0, 1000), "conjugate-gradient steps of the codebook update")
        seed: int = option(0, integer(0, 2**31 - 1), "k-means seed")
        feedback: bool = option(True, FLAG, "GPTQ error feedback in the assignment")
        update: bool = option(True, FLAG, "least-squares codebook update after the assignment")
        damp: float = option(0.01, DAMP, "Hessian damping, fraction of mean diag H")
        block_size: int = option(128, integer(8, 4096), "columns per lazy batch update")

    def check_spec(self, spec, where: str) -> None:
        try:  # bits x dim must fit the index bits: refused before any work
            layer_options(spec.bits, spec.options)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None

    def check_layer(self, spec, out_features: int, in_features: int, where: str) -> None:
        """From the layer's shape, before any work: k-means with more centroids than vectors to fit is
        meaningless and slow (8-bit indices, d = 2, on a small layer ran for minutes)."""
        kw = layer_options(spec.bits, spec.options)
        rows = min(kw.get("rows_per_codebook") or out_features, out_features)
        vectors, centroids = rows * in_features // kw["dim"], 1 << kw["index_bits"]
        if vectors < centroids:
            raise InputError(f"{where}: vq with {kw['index_bits']}-bit indices fits {centroids:,} centroids to only {vectors:,} "
                             "vectors per codebook; use fewer bits or more rows_per_codebook")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> VQQuantized:
        o = self.options(spec)
        return vq_quantize(weight, hessian, **layer_options(spec.bits, dataclasses.asdict(o)))


__all__ = ["VQ", "vq_quantize", "n_codebooks"]
