"""Hadamard matrices and fast orthogonal Hadamard transforms for any size a model uses (the layer transforms of
llmq.transforms and the rotations of llmq.rotation).

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H/√n is orthogonal. Constructions:

    Sylvester   H_2n = [[H, H], [H, -H]]                          orders 2^k   (applied as the fast WHT)
    Paley I     q prime, q ≡ 3 (mod 4):  H = I + [[0, 1ᵀ], [-1, Q]]          order q + 1
    Paley II    q prime, q ≡ 1 (mod 4):  C = [[0, 1ᵀ], [1, Q]],
                H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]          order 2(q + 1)
    Kronecker   H_m ⊗ H_2^k is Hadamard of order m·2^k

with Q the q×q Jacobsthal matrix Q_ij = χ(j − i) (χ the Legendre symbol mod q). A size n = m·2^k is
transformed as an [m, 2^k] array: the fast Walsh–Hadamard transform along the 2^k axis (n log n
additions) then the small dense H_m along the other (n·m). The smallest m with a construction is chosen:
576 = 36·16 (Paley II, q = 17), 1536 = 12·128 (Paley I, q = 11), 5120 = 20·256, 13824 = 108·128,
14336 = 28·512 (Paley II, q = 13), 18944 = 148·128 (Paley II, q = 73).

The randomized Hadamard transform (QuIP#) is U = H·diag(s)/√n with a seeded random sign vector s:
U x = H (s ⊙ x)/√n and Uᵀ y = s ⊙ (Hᵀ y)/√n.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

from ..errors import InputError


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) over GF(q), q prime: +1 for a nonzero square, −1 for a non-square, 0 on the diagonal."""
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[torch.tensor(sorted({(x * x) % q for x in range(1, q)}), dtype=torch.int64)] = 1
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q ≡ 3 mod 4, got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4)."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q ≡ 1 mod 4, got {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]])
    b = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def construction(m: int) -> str | None:
    """How llmq builds a Hadamard matrix of order m (the odd factor of a size), or None if it cannot."""
    if m in (1, 2):
        return "sylvester"
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return f"paley1:{m - 1}"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return f"paley2:{m // 2 - 1}"
    return None


@functools.lru_cache(maxsize=64)
def small_hadamard(m: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order m used as the dense Kronecker factor (int64)."""
    how = construction(m)
    if how is None:
        raise ValueError(f"no Hadamard construction for order {m}")
    if how == "sylvester":
        return sylvester(m)
    kind, q = how.split(":")
    return paley1(int(q)) if kind == "paley1" else paley2(int(q))


def factor(n: int) -> tuple[int, int]:
    """n = m · 2^k with the smallest m that has a construction; (m, 2^k)."""
    if n < 1:
        raise InputError(f"cannot build a Hadamard transform of size {n}")
    p = n & -n  # largest power of two dividing n
    m = n // p
    while True:
        if construction(m) is not None:
            return m, n // m
        if p == 1:
            break
        m, p = m * 2, p // 2
    raise InputError(
        f"no Hadamard transform of size {n} = {n // (n & -n)}·2^{(n & -n).bit_length() - 1}: llmq builds orders m·2^k "
        "with m from Paley I (prime q ≡ 3 mod 4, m = q+1) or Paley II (prime q ≡ 1 mod 4, m = 2(q+1))")


FWHT_CHUNK = 1 << 15  # elements per chunk of rows (128 KiB in fp32): the butterfly stages run in cache
FWHT_BASE_BITS = 5  # the lowest 5 index bits are done as one dense H_32 product (a GEMM), the rest as butterflies


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform (Sylvester order) along the last dim, a power of two n.

    H_n = H_{n/b} ⊗ H_b: the lowest log2(b) index bits are transformed by one dense H_b product (b ≤ 32,
    a GEMM, b flops per element), then each remaining bit by a butterfly stage (a, b) -> (a + b, a - b)
    over contiguous runs of ≥ b elements: n·(b + log2(n/b)) operations, O(n log n). Rows go in
    cache-sized chunks and the stages ping-pong between two buffers, so nothing is allocated per stage."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    stages = n.bit_length() - 1
    base = 1 << min(stages, FWHT_BASE_BITS)
    y = (x.reshape(-1, base) @ _sylvester_float(base, x.dtype, x.device)).reshape(-1, n)  # H_b symmetric
    stages -= base.bit_length() - 1
    if stages == 0:
        return y.reshape(x.shape)
    if y.requires_grad and torch.is_grad_enabled():  # the same butterflies out of place: out= buffers stop autograd
        h = base
        for _ in range(stages):
            c = y.view(-1, n // (2 * h), 2, h)
            y = torch.stack((c[:, :, 0] + c[:, :, 1], c[:, :, 0] - c[:, :, 1]), 2).reshape(-1, n)
            h *= 2
        return y.reshape(x.shape)
    out = torch.empty_like(y)
    step = max(1, FWHT_CHUNK // n)
    scratch = torch.empty(min(step, y.shape[0]), n, dtype=y.dtype, device=y.device)
    for s in range(0, y.shape[0], step):
        e = min(s + step, y.shape[0])
        dst, tmp = out[s:e], scratch[: e - s]
        bufs = (dst, tmp) if stages % 2 else (tmp, dst)  # the last stage must land in dst
        cur, h = y[s:e], base
        for i in range(stages):
            nxt = bufs[i % 2]
            c = cur.view(e - s, n // (2 * h), 2, h)
            o = nxt.view(e - s, n // (2 * h), 2, h)
            torch.add(c[:, :, 0], c[:, :, 1], out=o[:, :, 0])
            torch.sub(c[:, :, 0], c[:, :, 1], out=o[:, :, 1])
            cur, h = nxt, h * 2
    return out.reshape(x.shape)


@functools.lru_cache(maxsize=32)
def _sylvester_float(n: int, dtype, device) -> torch.Tensor:
    return sylvester(n).to(dtype=dtype, device=device)


_DENSE_CACHE: dict = {}


def _dense(m: int, n: int, dtype, device, transpose: bool) -> torch.Tensor:
    """H_m (or H_mᵀ) scaled by 1/√n, cached per device and dtype."""
    key = (m, n, dtype, str(device), transpose)
    if key not in _DENSE_CACHE:
        h = small_hadamard(m).to(dtype=torch.float64) / math.sqrt(n)
        _DENSE_CACHE[key] = (h.T if transpose else h).contiguous().to(dtype=dtype, device=device)
    return _DENSE_CACHE[key]


def hadamard_transform(x: torch.Tensor, m: int, p: int, transpose: bool = False) -> torch.Tensor:
    """(H_m ⊗ H_p)/√n (or its transpose, the inverse) applied to the last dim of x, n = m·p."""
    n = m * p
    if x.shape[-1] != n:
        raise ValueError(f"last dim {x.shape[-1]} != transform size {n}")
    lead = x.shape[:-1]
    y = fwht(x.reshape(-1, p))  # H_p (symmetric) on the low index part
    if m == 1:
        return y.reshape(x.shape).mul_(1.0 / math.sqrt(n))
    # H_m on the high index part: one GEMM over [rows·p, m], with the 1/√n folded into the small matrix
    hm = _dense(m, n, y.dtype, y.device, not transpose)  # right-multiplying by H_mᵀ applies H_m
    y = y.reshape(-1, m, p).transpose(1, 2).reshape(-1, m) @ hm
    return y.reshape(-1, p, m).transpose(1, 2).reshape(*lead, n)


def dense_hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """The normalised orthogonal matrix T (n×n) that hadamard_transform applies: T x."""
    m, p = factor(n)
    return torch.kron(small_hadamard(m), sylvester(p)).to(dtype) / math.sqrt(n)


def random_signs(n: int, key: str, seed: int = 0) -> torch.Tensor:
    """±1 (float32) vector of length n, a deterministic function of (key, seed)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    return torch.randint(0, 2, (n,), generator=g).mul_(2).sub_(1).to(torch.float32)


class RandomizedHadamard:
    """U = T·diag(s), T = (H_m ⊗ H_p)/√n orthogonal. `forward` is U x, `inverse` is Uᵀ y, on the last dim.
    Computed in fp32 (or the input's dtype if wider) and returned in the input's dtype."""

    def __init__(self, signs: torch.Tensor):
        self.n = signs.numel()
        self.m, self.p = factor(self.n)
        self.signs = signs.to(torch.float32)

    def _s(self, x):
        if self.signs.device != x.device:
            self.signs = self.signs.to(x.device)
        return self.signs

    def _kernel(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """On a GPU: the fused Triton transform (llmq.kernels.hadamard), same T and signs."""
        from ..kernels.dispatch import hadamard_transform as fused

        hm = None if self.m == 1 else _dense(self.m, 1, torch.float32, x.device, False)  # ±1 H_m (scale 1/√1)
        return fused(x, hm, self._s(x), inverse=inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self._kernel(x, inverse=False)
        dt = x.dtype
        y = x.to(torch.promote_types(dt, torch.float32)) * self._s(x)
        return hadamard_transform(y, self.m, self.p).to(dt)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if y.is_cuda:
            return self._kernel(y, inverse=True)
        dt = y.dtype
        x = hadamard_transform(y.to(torch.promote_types(dt, torch.float32)), self.m, self.p, transpose=True)
        return x.mul_(self._s(x)).to(dt)

    def matrix(self) -> torch.Tensor:
        """U as a dense float64 matrix (tests)."""
        return dense_hadamard(self.n) * self.signs.to(torch.float64)


class BlockHadamard:
    """Block-diagonal randomized Hadamard: each run of `block` consecutive features is rotated on its own,
    U = diag(T_b, …, T_b)·diag(s) (HIGGS's `hadamard_size`: an outlier is spread over its block only).
    Same interface as RandomizedHadamard; `signs` has one sign per feature."""

    def __init__(self, signs: torch.Tensor, block: int):
        if block < 1 or signs.numel() % block:
            raise ValueError(f"a Hadamard block of {block} does not divide {signs.numel()} features")
        self.n, self.block = signs.numel(), block
        self.signs = signs.to(torch.float32)
        self.inner = RandomizedHadamard(torch.ones(block))
        self.m, self.p = self.inner.m, self.inner.p

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.n // self.block, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.signs.to(device=x.device, dtype=x.dtype)  # ±1: exact in any dtype
        return self.inner.forward(self._blocks(x * s)).reshape(x.shape)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s = self.signs.to(device=y.device, dtype=y.dtype)
        return self.inner.inverse(self._blocks(y)).reshape(y.shape) * s

    def matrix(self) -> torch.Tensor:
        """U as a dense float64 matrix (tests)."""
        return torch.block_diag(*[dense_hadamard(self.block)] * (self.n // self.block)) * self.signs.to(torch.float64)


def input_hadamard(signs: torch.Tensor, block: int | None = None):
    """The randomized Hadamard over all features (block None) or, block-diagonal, over runs of `block` features."""
    return BlockHadamard(signs, block) if block else RandomizedHadamard(signs)
