"""Curvature: K-FAC against exact GGNs where it is provably exact, MC in expectation, exact
damping, the paper <-> curvlinops scaling (lambda_curvlinops = lambda_paper; G_sum = D G_mean) checked
end to end against the dense exact GGN, caching."""

from __future__ import annotations

import pytest
import torch
from curvlinops import GGNLinearOperator

from attribution.curvature import (
    CurvatureConfig,
    DensePreconditioner,
    Preconditioner,
    TrainingRows,
    build_factors,
    curvature_factors,
    curvlinops_operator,
    dense_ggn,
    preconditioner_from_factors,
)
from attribution.ddpm import FlatEpsNet, build_unet, linear_schedule
from attribution.errors import UserError
from attribution.gradients import kfac_parameters


def _dense(op, P):
    return op @ torch.eye(P, dtype=torch.float64)


def _blocks(params):
    sizes = [p.numel() for p in params]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _regression(N=12, d_in=5, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(N, D, generator=g, dtype=torch.float64)
    return [(X[:7], y[:7]), (X[7:], y[7:])], N


def _ggn(model, params, data):
    op = GGNLinearOperator(model, torch.nn.MSELoss(), params, data, check_deterministic=False)
    return _dense(op, sum(p.numel() for p in params))


@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
def test_kfac_type2_equals_ggn_on_single_linear_layer(kfac_type):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4)).double()
    params = list(model.parameters())
    data, N = _regression()
    op = curvlinops_operator(model, params, data, fisher="type-2", kfac_type=kfac_type, num_data=N)
    K, G = _dense(op, 24), _ggn(model, params, data)
    for b in _blocks(params):  # K-FAC is block-diagonal over parameters (weight, bias)
        torch.testing.assert_close(K[b, b], G[b, b], rtol=1e-10, atol=1e-12)
    assert G[_blocks(params)[0], _blocks(params)[0]].abs().max() > 1e-3


def test_kfac_type2_equals_ggn_blocks_on_deep_linear_network():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False), torch.nn.Linear(6, 3, bias=False),
                                torch.nn.Linear(3, 4, bias=False)).double()
    params = list(model.parameters())
    data, N = _regression()
    op = curvlinops_operator(model, params, data, fisher="type-2", num_data=N)
    K, G = _dense(op, sum(p.numel() for p in params)), _ggn(model, params, data)
    for b in _blocks(params):
        torch.testing.assert_close(K[b, b], G[b, b], rtol=1e-9, atol=1e-12)
    # ...and it is not exact once a nonlinearity breaks the Kronecker structure
    model2 = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False), torch.nn.Tanh(),
                                 torch.nn.Linear(6, 4, bias=False)).double()
    p2 = list(model2.parameters())
    K2 = _dense(curvlinops_operator(model2, p2, data, fisher="type-2", num_data=N), 54)
    b = _blocks(p2)[0]
    assert (K2[b, b] - _ggn(model2, p2, data)[b, b]).abs().max() > 1e-6


def test_mc_fisher_matches_ggn_in_expectation():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4)).double()
    params = list(model.parameters())
    data, N = _regression()
    op = curvlinops_operator(model, params, data, fisher="mc", mc_samples=2000, num_data=N, seed=3)
    K, G = _dense(op, 24), _ggn(model, params, data)
    for b in _blocks(params):
        err = (K[b, b] - G[b, b]).norm() / G[b, b].norm()
        assert err < 0.1, float(err)
    one = _dense(curvlinops_operator(model, params, data, fisher="mc", mc_samples=1, num_data=N, seed=3), 24)
    b = _blocks(params)[0]
    assert (one[b, b] - G[b, b]).norm() / G[b, b].norm() > err  # one sample is noisier


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_exact_damping_inverts_damped_operator_in_paper_scaling(method):
    """Preconditioner(lambda) @ (D * G_curvlinops + D * lambda I) = I: lambda is added to the GGN of
    the pixel-mean loss (the paper's / official code's unit), the gradients are pixel sums."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    params = list(model.parameters())
    data, N = _regression()
    P = sum(p.numel() for p in params)
    op = curvlinops_operator(model, params, data, method=method, fisher="empirical", num_data=N)
    D, lam = 4, 1e-3
    G_paper = D * _dense(op, P)  # G_sum: squared error summed over the D outputs
    pre = Preconditioner(op, lam, D)
    M = pre.apply(G_paper + D * lam * torch.eye(P, dtype=torch.float64))
    torch.testing.assert_close(M, torch.eye(P, dtype=torch.float64), rtol=0, atol=1e-7)
    # another damping reuses the factorisation and is still exact
    pre2 = pre.with_damping(0.5)
    torch.testing.assert_close(pre2.apply(G_paper + D * 0.5 * torch.eye(P, dtype=torch.float64)),
                               torch.eye(P, dtype=torch.float64), rtol=0, atol=1e-9)
    with pytest.raises(UserError):
        Preconditioner(op, -1.0, D)


def test_paper_ggn_is_D_times_curvlinops_mean_mse_ggn():
    """G_paper (squared error summed over D pixels, mean over rows) = D * curvlinops' GGN."""
    torch.manual_seed(0)
    unet = build_unet("micro", 8, 1).double()
    s = linear_schedule()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    params = [unet.conv_out.weight, unet.conv_out.bias, unet.up_blocks[1].resnets[1].conv2.bias]
    G = dense_ggn(unet, s, x, 2, 0, params)
    op = GGNLinearOperator(FlatEpsNet(unet), torch.nn.MSELoss(), params, TrainingRows(s, x, 2, 0, torch.float64),
                           batch_size_fn=lambda X: X["x"].shape[0], check_deterministic=False)
    Gc = _dense(op, G.shape[0])
    torch.testing.assert_close(G, 64 * Gc, rtol=1e-9, atol=1e-12)
    assert G.diagonal().min() > 0


def test_config_validation():
    assert CurvatureConfig("EKFAC", "Empirical", "reduce").method == "ekfac"
    for bad in [dict(method="kfc"), dict(fisher="type3"), dict(kfac_type="both"), dict(draws=0),
                dict(fisher="empirical", mc_samples=2)]:
        with pytest.raises(UserError):
            CurvatureConfig(**bad)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_saved_factors_rebuild_the_same_preconditioner(method):
    torch.manual_seed(0)
    unet = build_unet("micro", 8, 1)
    s = linear_schedule()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    cfg = CurvatureConfig(method, "empirical", "expand", draws=2)  # MC labels differ by dtype
    tensors, meta = build_factors(unet, s, x, cfg)
    assert meta["output_dim"] == 64 and meta["num_data"] == 8
    pre = preconditioner_from_factors(unet, s, tensors, meta, 1.0)
    # the same factors through a live curvlinops operator on the float64 model
    model = FlatEpsNet(build_unet("micro", 8, 1)).double()
    model.load_state_dict(FlatEpsNet(unet).double().state_dict())
    params = kfac_parameters(model)
    data = TrainingRows(s, x, 2, 0, torch.float64)
    op = curvlinops_operator(model, params, data, method=method, fisher="empirical", num_data=8, seed=0,
                             batch_size_fn=lambda X: X["x"].shape[0])
    v = torch.randn(3, sum(p.numel() for p in params), dtype=torch.float64)
    live = Preconditioner(op, 1.0, 64).apply(v)
    # float32 factors (saved) vs float64 (live): agree to float32 accuracy in relative norm
    assert float((pre.apply(v) - live).norm() / live.norm()) < 1e-4


def test_factors_are_cached_in_the_run(micro_run):
    from attribution.influence import training_images

    images = training_images(micro_run)
    cfg = CurvatureConfig("kfac", "empirical", "reduce", draws=2, seed=5)
    t1, m1 = curvature_factors(micro_run, images, cfg)
    files = list((micro_run.path / "artifacts" / "curvature").glob("*/factors.safetensors"))
    assert files
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    t2, m2 = curvature_factors(micro_run, images, cfg)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert m1["fisher_type"] == "empirical" and m2["kfac_approx"] == "reduce"
    assert all(torch.equal(t1[k], t2[k]) for k in t1)


# ----------------------------------------------------------------------------- absolute scale, end to end


class _OneLayerEps(torch.nn.Module):
    """eps_theta(x_t, t) = one bias-free layer of x_t (t ignored), with a diffusers-like ``config``.

    For one Linear layer, or one zero-padded Conv2d under K-FAC-expand, the output Hessian of the
    MSE is a constant multiple of I, so type-2 K-FAC (and EK-FAC) equals the exact GGN."""

    def __init__(self, kind: str, C: int = 2, H: int = 4):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(in_channels=C, out_channels=C, sample_size=H)
        self.kind = kind
        self.layer = (torch.nn.Linear(C * H * H, C * H * H, bias=False) if kind == "linear"
                      else torch.nn.Conv2d(C, C, 3, padding=1, bias=False))

    def forward(self, x, t):
        from types import SimpleNamespace

        out = self.layer(x.flatten(1)).view_as(x) if self.kind == "linear" else self.layer(x)
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("kind, method", [("linear", "kfac"), ("linear", "ekfac"), ("conv", "kfac")])
def test_saved_factors_precondition_like_the_dense_exact_ggn_at_paper_damping(kind, method):
    """End to end: build_factors -> preconditioner_from_factors equals
    DensePreconditioner(dense_ggn(...), lambda, D) = (G_sum + D lambda I)^{-1}, where K-FAC is exact.

    lambda = the mean eigenvalue of G_mean = G_sum / D, so the damping is neither negligible nor
    dominant and every scale factor shows. Verified by breaking the code; each variant fails with
    the relative error shown (tolerance 1e-8):
    - damping in the old unit, lambda / D given to curvlinops in Preconditioner: 27;
    - D dropped (preconditioner_from_factors with output_dim 1, or apply without the / D): 31 (= D - 1);
    - num_data = N instead of N * draws in build_factors: 0.35 (linear) / 0.20 (conv), and the meta check;
    - MSELoss(reduction="sum") in curvlinops_operator (G off by D): 0.49.
    The dense versions of the same mistakes, at the bottom, differ from the truth by > 0.1 as well."""
    torch.manual_seed(0)
    unet = _OneLayerEps(kind).double()
    s = linear_schedule()
    N, draws = 6, 3
    x = torch.rand(N, 2, 4, 4, dtype=torch.float64) * 2 - 1
    D = 2 * 4 * 4
    cfg = CurvatureConfig(method, "type-2", "expand", draws=draws)
    tensors, meta = build_factors(unet, s, x, cfg)
    assert meta["output_dim"] == D and meta["num_data"] == N * draws
    params = kfac_parameters(unet)
    G = dense_ggn(unet, s, x, draws, 0, params)  # G_sum, summed-pixel scaling
    lam = float(torch.linalg.eigvalsh(G).mean()) / D  # paper units: added to G_mean = G_sum / D
    pre = preconditioner_from_factors(unet, s, tensors, meta, lam)
    V = torch.randn(4, G.shape[0], dtype=torch.float64)
    exact = DensePreconditioner(G, lam, D).apply(V)

    def rel(a):
        return float((a - exact).norm() / exact.norm())

    assert rel(pre.apply(V)) < 1e-8, rel(pre.apply(V))
    # ... at another damping, through the shared eigendecomposition
    exact10 = DensePreconditioner(G, 10 * lam, D).apply(V)
    assert float((pre.with_damping(10 * lam).apply(V) - exact10).norm() / exact10.norm()) < 1e-8
    # the wrong conventions this test must catch are far off at this damping
    wrong = {
        "lambda / D (old unit)": DensePreconditioner(G, lam / D, D).apply(V),
        "D missing": DensePreconditioner(G / D, lam, 1).apply(V),
        "num_data = N (G x draws)": DensePreconditioner(draws * G, lam, D).apply(V),
        "sum-reduced MSE (G x D)": DensePreconditioner(D * G, lam, D).apply(V),
    }
    for name, w in wrong.items():
        assert rel(w) > 0.1, (name, rel(w))
