"""Seeded random projections of gradients for TRAK / D-TRAK (method.md §6).

A projector maps per-example gradients ``[B, P]`` to features ``[B, k]`` with a fixed random
matrix ``S`` (``k x P``) such that ``E[<S x, S y>] = <x, y>`` (Johnson–Lindenstrauss). The matrix
is a pure function of ``(kind, P, k, seed)``: it never depends on the batch, the batch size, the
device or the call order, so training and query gradients projected in different calls, on
different machines, share one matrix.

Why not MadryLab's ``traker``: it is not installed here, its CPU projector regenerates its dense
matrix for every batch (slow for P ~ 1e5-1e7), and its projector object is unusable after
``finalize_features``. A sparse sign-hash projection is a few lines of torch and fast on CPU.

Kinds:
- ``"sjlt"`` (default): sparse Johnson–Lindenstrauss transform (Kane & Nelson 2014, block
  construction). Each input coordinate j is sent to ``s`` rows, one in each of ``s`` blocks of
  ``k / s`` rows, with independent random signs, scaled by ``1/sqrt(s)``. ``s = 1`` is CountSketch;
  its inner-product variance ``(||x||^2 ||y||^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / k`` is never
  above the dense Gaussian one. Cost: ``s`` scatter-adds of the batch, O(s B P).
- ``"gaussian"``: dense i.i.d. N(0, 1/k) entries (Dasgupta & Gupta 2003). O(B P k): for small
  ``P * k`` only.
- ``"identity"``: no projection (``k = P``); for tests and exact references.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attribution.errors import UserError

PROJECTION_KINDS = ("sjlt", "gaussian", "identity")

# Input coordinates are generated in fixed chunks, each from its own seeded generator, so a chunk
# of S can be (re)built alone. The chunk sizes are part of the matrix's definition: changing them
# changes S (and invalidates cached features, which record ``describe()``).
_SJLT_CHUNK = 1 << 20
_GAUSS_CHUNK = 1 << 12


def _chunk_generator(seed: int, chunk: int, salt: int) -> torch.Generator:
    """A CPU generator for one chunk; mixes seed, chunk index and kind into one 63-bit seed."""
    mixed = (seed * 0x9E3779B97F4A7C15 + chunk * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB)
    return torch.Generator().manual_seed(mixed % (1 << 63))


class Projector:
    """Base class: ``project(grads [B, in_dim]) -> [B, out_dim]`` float32."""

    kind = "base"

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, device=None):
        if in_dim <= 0 or out_dim <= 0:
            raise UserError(f"projection dimensions must be positive, got {in_dim} -> {out_dim}")
        self.in_dim, self.out_dim, self.seed = int(in_dim), int(out_dim), int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def describe(self) -> dict:
        """Everything that determines the matrix (stored with cached features)."""
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "seed": self.seed}

    def _check(self, grads: Tensor) -> Tensor:
        if grads.dim() != 2 or grads.shape[1] != self.in_dim:
            raise UserError(
                f"projector expects gradients of shape [B, {self.in_dim}], got {list(grads.shape)}"
            )
        return grads.to(device=self.device, dtype=torch.float32)

    def project(self, grads: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matrix(self) -> Tensor:
        """The dense ``[out_dim, in_dim]`` matrix (tests and small problems only)."""
        if self.in_dim * self.out_dim > 50_000_000:
            raise UserError("the dense projection matrix is too large to materialise")
        return self.project(torch.eye(self.in_dim, device=self.device)).T.contiguous()


class IdentityProjector(Projector):
    """``S = I`` (features are the raw gradients)."""

    kind = "identity"

    def __init__(self, in_dim: int, out_dim: Optional[int] = None, seed: int = 0, device=None):
        out_dim = in_dim if out_dim is None else out_dim
        if out_dim != in_dim:
            raise UserError(f"the identity projection needs proj_dim == {in_dim} (the gradient size), got {out_dim}")
        super().__init__(in_dim, out_dim, seed, device)

    def project(self, grads: Tensor) -> Tensor:
        return self._check(grads).clone()


class SJLTProjector(Projector):
    """Sparse sign-hash projection with ``s`` non-zeros ``±1/sqrt(s)`` per input coordinate."""

    kind = "sjlt"

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, device=None, s: int = 1,
                 cache_bytes: int = 1 << 30):
        super().__init__(in_dim, out_dim, seed, device)
        if s < 1 or out_dim % s != 0:
            raise UserError(f"SJLT needs s >= 1 dividing proj_dim; got s={s}, proj_dim={out_dim}")
        self.s = int(s)
        # Per chunk: rows [s, n] int64 and signs [s, n] float32 (12 bytes per entry).
        self._cache: Optional[dict[int, tuple[Tensor, Tensor]]] = (
            {} if 12 * self.s * in_dim <= cache_bytes else None
        )

    def describe(self) -> dict:
        return {**super().describe(), "s": self.s, "chunk": _SJLT_CHUNK}

    def _chunk(self, c: int) -> tuple[Tensor, Tensor]:
        """Rows ``[s, n]`` (long) and scaled signs ``[s, n]`` of input chunk ``c`` on the device."""
        if self._cache is not None and c in self._cache:
            return self._cache[c]
        n = min(_SJLT_CHUNK, self.in_dim - c * _SJLT_CHUNK)
        gen = _chunk_generator(self.seed, c, salt=1)
        block = self.out_dim // self.s
        offsets = (torch.arange(self.s) * block).unsqueeze(1)
        rows = torch.randint(0, block, (self.s, n), generator=gen) + offsets
        signs = torch.randint(0, 2, (self.s, n), generator=gen).float().mul_(2).sub_(1)
        signs /= math.sqrt(self.s)
        out = (rows.to(self.device), signs.to(self.device))
        if self._cache is not None:
            self._cache[c] = out
        return out

    def project(self, grads: Tensor) -> Tensor:
        grads = self._check(grads)
        out = torch.zeros(grads.shape[0], self.out_dim, device=self.device, dtype=torch.float32)
        for c in range(math.ceil(self.in_dim / _SJLT_CHUNK)):
            lo = c * _SJLT_CHUNK
            rows, signs = self._chunk(c)
            block = grads[:, lo:lo + rows.shape[1]]
            for r in range(self.s):
                out.index_add_(1, rows[r], block * signs[r])
        return out


class GaussianProjector(Projector):
    """Dense ``N(0, 1/k)`` projection, generated in seeded chunks of input coordinates."""

    kind = "gaussian"

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, device=None, cache_bytes: int = 1 << 29):
        super().__init__(in_dim, out_dim, seed, device)
        self._cache: Optional[dict[int, Tensor]] = {} if 4 * in_dim * out_dim <= cache_bytes else None

    def describe(self) -> dict:
        return {**super().describe(), "chunk": _GAUSS_CHUNK}

    def _chunk(self, c: int) -> Tensor:
        """Rows ``[n, k]`` of ``S^T`` for input chunk ``c``."""
        if self._cache is not None and c in self._cache:
            return self._cache[c]
        n = min(_GAUSS_CHUNK, self.in_dim - c * _GAUSS_CHUNK)
        m = torch.randn(n, self.out_dim, generator=_chunk_generator(self.seed, c, salt=2))
        m = m.div_(math.sqrt(self.out_dim)).to(self.device)
        if self._cache is not None:
            self._cache[c] = m
        return m

    def project(self, grads: Tensor) -> Tensor:
        grads = self._check(grads)
        out = torch.zeros(grads.shape[0], self.out_dim, device=self.device, dtype=torch.float32)
        for c in range(math.ceil(self.in_dim / _GAUSS_CHUNK)):
            lo = c * _GAUSS_CHUNK
            m = self._chunk(c)
            out.addmm_(grads[:, lo:lo + m.shape[0]], m)
        return out


def make_projector(kind: str, in_dim: int, out_dim: int, seed: int = 0, device=None, **kwargs) -> Projector:
    """A projector of ``kind`` in ``PROJECTION_KINDS`` (``kwargs``: ``s`` for SJLT)."""
    if kind == "sjlt":
        return SJLTProjector(in_dim, out_dim, seed, device, **kwargs)
    if kind == "gaussian":
        return GaussianProjector(in_dim, out_dim, seed, device, **kwargs)
    if kind == "identity":
        return IdentityProjector(in_dim, out_dim, seed, device)
    raise UserError(f"unknown projection {kind!r}; choose one of {', '.join(PROJECTION_KINDS)}")


def jl_epsilon(k: int, n_points: int) -> float:
    """Dasgupta & Gupta's (2003) JL distortion for ``n_points`` in ``k`` dims.

    The smallest ``eps`` with ``k >= 4 ln(n) / (eps^2/2 - eps^3/3)``: with probability at least
    ``1 - 1/n`` a Gaussian projection keeps every squared distance of the ``n`` points within
    ``(1 ± eps)``. Applied to the ``n`` unit vectors and their pairwise sums and differences, it
    bounds inner-product errors by ``eps`` (polarisation): use ``n_points = 2 n + 1`` for the
    points ``{x_i} ∪ {-x_i} ∪ {0}``.
    """
    target = 4.0 * math.log(n_points) / k
    if target >= 1 / 6:  # the lemma gives no guarantee below this dimension
        return math.inf
    lo, hi = 0.0, 1.0
    for _ in range(100):  # eps^2/2 - eps^3/3 is increasing on [0, 1]
        mid = (lo + hi) / 2
        if mid * mid / 2 - mid**3 / 3 < target:
            lo = mid
        else:
            hi = mid
    return hi
