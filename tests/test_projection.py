"""Random projections: JL inner-product preservation, determinism, structure, speed."""

from __future__ import annotations

import time

import pytest
import torch

import attribution.projection as projection
from attribution.errors import UserError
from attribution.projection import jl_epsilon, make_projector


def _unit_rows(n: int, dim: int, seed: int, heavy_tailed: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    if heavy_tailed:  # gradient-like: a few coordinates carry much of the mass (Student-t, 3 dof)
        chi2 = torch.randn(3, n, dim, generator=gen, dtype=torch.float64).pow(2).sum(0)
        x = x / (chi2 / 3).sqrt()
    x[1] = 0.6 * x[0] + 0.8 * x[1] / x[1].norm() * x[0].norm()  # a correlated pair, <x0,x1> ~ 0.6
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "kind, dim, k, kwargs, heavy",
    [
        ("sjlt", 200_000, 2048, {}, False),
        ("sjlt", 200_000, 2048, {}, True),
        ("sjlt", 200_000, 2048, {"s": 4}, True),
        ("sjlt", 50_000, 8192, {}, False),
        ("gaussian", 20_000, 512, {}, False),
    ],
)
def test_projection_preserves_inner_products_within_jl_bound(kind, dim, k, kwargs, heavy):
    """max |<Sx,Sy> - <x,y>| over all pairs (and x = y) of n = 20 unit vectors <= eps_JL.

    Bound: Dasgupta & Gupta (2003) with the 2n+1 points {x_i} ∪ {-x_i} ∪ {0}: squared distances
    are kept within (1 ± eps) when k >= 4 ln(2n+1) / (eps^2/2 - eps^3/3); polarisation turns
    that into |<Sx,Sy> - <x,y>| <= eps for unit vectors (eps = 0.126 at k = 2048, 0.061 at 8192,
    0.266 at 512). The lemma is for Gaussian matrices; SJLT's inner-product variance is never
    larger, and it is tested against the same bound.
    """
    n = 20
    x = _unit_rows(n, dim, seed=1, heavy_tailed=heavy)
    proj = make_projector(kind, dim, k, seed=3, **kwargs)
    y = proj.project(x.float()).double()
    err = (y @ y.T - x @ x.T).abs()
    eps = jl_epsilon(k, 2 * n + 1)
    assert err.max().item() <= eps, (err.max().item(), eps)
    # not vacuous: a projection does distort, by about 1/sqrt(k)
    assert err.max().item() > 0.1 / k**0.5


def test_deterministic_given_seed_and_batch_invariant():
    x = torch.randn(6, 30_000, generator=torch.Generator().manual_seed(0))
    a = make_projector("sjlt", 30_000, 256, seed=7).project(x)
    b = make_projector("sjlt", 30_000, 256, seed=7)
    rowwise = torch.cat([b.project(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(rowwise, a, rtol=0, atol=1e-6)
    c = make_projector("sjlt", 30_000, 256, seed=8).project(x)
    assert (c - a).abs().max() > 1.0
    g1 = make_projector("gaussian", 5000, 64, seed=7).project(x[:, :5000])
    g2 = make_projector("gaussian", 5000, 64, seed=7).project(x[:, :5000])
    assert torch.equal(g1, g2)


def test_sjlt_structure_across_chunks(monkeypatch):
    """Each column has s entries ±1/sqrt(s), one per block of k/s rows, across chunk borders."""
    monkeypatch.setattr(projection, "_SJLT_CHUNK", 64)  # exercise many chunks on a small matrix
    s, k, dim = 4, 32, 300
    proj = make_projector("sjlt", dim, k, seed=0, s=s)
    m = proj.matrix()  # [k, dim]
    assert m.shape == (k, dim)
    nz = m != 0
    assert torch.equal(nz.sum(0), torch.full((dim,), s))
    torch.testing.assert_close(m[nz].abs(), torch.full((s * dim,), s**-0.5), rtol=0, atol=1e-7)
    per_block = nz.view(s, k // s, dim).sum(1)
    assert torch.equal(per_block, torch.ones(s, dim, dtype=per_block.dtype))
    x = torch.randn(5, dim)
    torch.testing.assert_close(proj.project(x), x @ m.T, rtol=1e-5, atol=1e-5)
    # signs are balanced and rows spread out (not a degenerate hash)
    assert abs((m > 0).sum().item() / (s * dim) - 0.5) < 0.1
    assert nz.any(1).all()


def test_gaussian_entries_have_variance_one_over_k():
    k, dim = 128, 3000
    m = make_projector("gaussian", dim, k, seed=1).matrix()
    assert abs(m.mean().item()) < 3 * (1 / k / m.numel()) ** 0.5
    assert abs(m.var().item() * k - 1) < 0.02


def test_identity_and_bad_shapes():
    x = torch.randn(3, 10)
    torch.testing.assert_close(make_projector("identity", 10, 10).project(x), x)
    with pytest.raises(UserError):
        make_projector("identity", 10, 5)
    with pytest.raises(UserError):
        make_projector("sjlt", 10, 6, s=4)
    with pytest.raises(UserError):
        make_projector("sjlt", 10, 8).project(torch.randn(3, 11))
    with pytest.raises(UserError):
        make_projector("nope", 10, 8)


def test_sjlt_projects_a_200k_gradient_batch_quickly():
    """64 gradients of 200K parameters to 2048 dims: well under a second on one CPU thread."""
    x = torch.randn(64, 200_000)
    proj = make_projector("sjlt", 200_000, 2048, seed=0)
    proj.project(x[:1])  # builds and caches the hash
    t0 = time.perf_counter()
    proj.project(x)
    assert time.perf_counter() - t0 < 2.0
