"""TRAK / D-TRAK (attribution/trak.py): the closed form against a dense reference, featurisation
against autograd, draw keys, caching, end to end."""

from __future__ import annotations

import shutil

import pytest
import torch

import attribution.trak as trak
from attribution.errors import UserError
from attribution.gradients import kfac_parameters, per_example_gradients
from attribution.measurements import DrawOptions, example_generator
from attribution.projection import make_projector
from attribution.runs import Run, read_json, write_json


@pytest.fixture
def run_copy(micro_run, tmp_path):
    """A private copy of the micro run (tests here modify its model or fill its artifacts)."""
    dst = tmp_path / "run"
    shutil.copytree(micro_run.path, dst, ignore=shutil.ignore_patterns("artifacts"))
    return Run(dst)


def _train_images(run, n=None):
    x = run.dataset().tensors()
    return x if n is None else x[:n]


# ----------------------------------------------------------------------------- closed form


def test_dtrak_timesteps_are_uniform_like_dtrak():
    assert trak.dtrak_timesteps(10, 1000) == list(range(0, 1000, 100))
    assert trak.dtrak_timesteps(100, 1000) == list(range(0, 1000, 10))
    with pytest.raises(UserError):
        trak.dtrak_timesteps(0, 1000)


def _dense_reference(Gq: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """g_q^T (G^T G / N + lam I)^{-1} g_n by a dense P x P solve in float64."""
    G, Gq = G.double(), Gq.double()
    N, P = G.shape
    H = G.T @ G / N + lam * torch.eye(P, dtype=torch.float64)
    return Gq @ torch.linalg.solve(H, G.T)


@pytest.mark.parametrize("kind, k", [("identity", None), ("gaussian", 8)])
def test_trak_equals_dense_closed_form(micro_run, kind, k):
    """Identity projection (P = 584 > N = 16, N-space route) and a k = 8 < N Gaussian one
    (k-space route) both equal the dense float64 formula with lambda on the MEAN-loss GGN."""
    unet = micro_run.load_unet()
    schedule = micro_run.schedule()
    params = kfac_parameters(unet)[-6:]  # last layers: a dense P x P reference stays small
    P = sum(p.numel() for p in params)
    x = _train_images(micro_run)
    queries = micro_run.load_samples("queries")[0]["images"]
    N = x.shape[0]
    settings = trak.TrakSettings(variant="trak", num_draws=3, projection=kind, proj_dim=k or P)
    proj = make_projector(kind, P, k or P, seed=0)
    phi = trak.featurize(unet, schedule, x, settings, proj, params=params)
    phi_q = trak.featurize(unet, schedule, queries, settings, proj, params=params,
                         offset=trak.QUERY_INDEX_OFFSET)
    G = per_example_gradients(unet, schedule, x, settings.measurement(), 3, 0, params=params)
    Gq = per_example_gradients(unet, schedule, queries, settings.measurement(), 3, 0, params=params,
                               offset=trak.QUERY_INDEX_OFFSET)
    if kind == "gaussian":
        S = proj.matrix().double()
        G, Gq = G.double() @ S.T, Gq.double() @ S.T
    assert P > N if kind == "identity" else k < N
    eig = trak.gram_eigen(phi)
    assert eig.mode == ("train" if kind == "identity" else "feature")
    for rel in (1e-3, 1.0):
        lam = eig.default_damping(rel)
        ours = trak.scores_from_features(phi_q, phi, lam, eig)
        ref = _dense_reference(Gq, G, lam)
        scale = ref.abs().max()
        torch.testing.assert_close(ours / scale, ref / scale, rtol=0, atol=1e-5)
        # damping conversion (2): TRAK's code adds N * lambda to the unnormalised Gram matrix
        Phi = phi.double()
        trak_code = phi_q.double() @ torch.linalg.solve(
            Phi.T @ Phi + trak.trak_code_damping(lam, N) * torch.eye(Phi.shape[1], dtype=torch.float64), Phi.T)
        torch.testing.assert_close(ours / scale, N * trak_code / scale, rtol=0, atol=1e-5)
    # adding lambda to the unnormalised Gram matrix instead (the classic mistake) differs clearly
    lam = eig.default_damping(1.0)
    wrong = phi_q.double() @ torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64), Phi.T)
    ours = trak.scores_from_features(phi_q, phi, lam, eig)
    assert ((N * wrong - ours).abs().max() / ours.abs().max()) > 0.1


def test_damping_zero_is_the_limit_and_singular_damping_is_refused():
    """With k > N and full-rank features, lambda = 0 is the finite limit lambda -> 0 of (1)
    (push-through); duplicated training features make it singular, which is refused."""
    gen = torch.Generator().manual_seed(0)
    phi, q = torch.randn(4, 10, generator=gen), torch.randn(2, 10, generator=gen)
    torch.testing.assert_close(trak.scores_from_features(q, phi, 0.0), trak.scores_from_features(q, phi, 1e-9),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(UserError, match="too small"):
        trak.scores_from_features(q, torch.cat([phi, phi[:1]]), 0.0)
    with pytest.raises(UserError):
        trak.scores_from_features(q, phi, -1.0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", ["dtrak", "trak"])
def test_featurisation_matches_autograd_on_direct_formula(micro_run, variant):
    """D-TRAK: grad of (1/K) sum_k mean_pixels(eps_theta(x_t_k, t_k)^2) at D-TRAK's fixed
    timesteps; TRAK: grad of (1/K) sum_k ||eps_k - eps_theta(x_t_k, t_k)||^2 at random t.
    Written here directly with autograd, reusing only the documented draw generator."""
    unet = micro_run.load_unet()
    schedule = micro_run.schedule()
    params = kfac_parameters(unet)
    P = sum(p.numel() for p in params)
    x = _train_images(micro_run, 3)
    settings = trak.TrakSettings(variant=variant, num_timesteps=4, num_draws=8, projection="identity", proj_dim=P)
    offset = 5
    phi = trak.featurize(unet, schedule, x, settings, make_projector("identity", P, P), offset=offset)
    abar = schedule.alpha_bars
    for i in range(x.shape[0]):
        g = example_generator(settings.seed, offset + i)
        if variant == "dtrak":
            t = torch.tensor([0, 250, 500, 750]).repeat(2)
        else:
            t = torch.randint(0, schedule.T, (8,), generator=g)
        eps = torch.randn((8, *x.shape[1:]), generator=g, dtype=torch.float64)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x[i].double() + (1 - a).sqrt() * eps).float()
        out = unet(x_t, t).sample
        if variant == "dtrak":
            f = out.pow(2).mean(dim=(1, 2, 3)).mean()
        else:
            f = (eps.float() - out).pow(2).sum(dim=(1, 2, 3)).mean()
        ref = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(f, params)])
        torch.testing.assert_close(phi[i], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert phi.abs().max() > 0


# ----------------------------------------------------------------------------- end to end + cache


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return per_example_gradients(*args, **kwargs)


def _perturb_model(run: Run) -> None:
    unet = run.load_unet()
    with torch.no_grad():
        unet.conv_out.weight.add_(0.05 * torch.randn_like(unet.conv_out.weight))
    unet.save_pretrained(run.model_dir)


@pytest.mark.parametrize("variant", ["trak", "dtrak"])
def test_query_scores_do_not_depend_on_the_other_queries(run_copy, variant):
    """Query draws are keyed by the query's GLOBAL index: query 2 scored alone equals its row
    when scored with queries 0-2 (keyed by batch position, as before, query 2 alone would get
    query 0's draws and differ)."""
    queries = run_copy.load_samples("queries")[0]["images"]
    kw = dict(variant=variant, proj_dim=64, num_draws=2, num_timesteps=2, damping=1e-3, device="cpu")
    all3 = trak.trak_scores(run_copy, queries, query_indices=[0, 1, 2], **kw)
    tol = dict(rtol=0, atol=1e-5 * float(all3.abs().max()))  # float32 batch-shape round-off only
    alone = trak.trak_scores(run_copy, queries[2:3], query_indices=[2], **kw)
    torch.testing.assert_close(alone[0], all3[2], **tol)
    # the default (no indices) keys the images as a whole set 0..Q-1: the same rows
    torch.testing.assert_close(trak.trak_scores(run_copy, queries, **kw), all3, **tol)
    # a reordered batch gives each query its own row
    torch.testing.assert_close(trak.trak_scores(run_copy, queries[[2, 0]], query_indices=[2, 0], **kw),
                               all3[[2, 0]], **tol)
    # the keys matter: query 2 with query 0's key (the old position-keyed behaviour) differs
    wrong = trak.trak_scores(run_copy, queries[2:3], query_indices=[0], **kw)
    assert (wrong[0] - all3[2]).abs().max() > 1e-2 * all3[2].abs().max()
    assert trak.query_keys(2, [5, 7]) == [trak.QUERY_INDEX_OFFSET + 5, trak.QUERY_INDEX_OFFSET + 7]
    with pytest.raises(UserError):
        trak.query_keys(2, [1])
    with pytest.raises(UserError):
        trak.trak_scores(run_copy, queries[:2], query_indices=[0], **kw)


@pytest.mark.parametrize("variant", ["trak", "dtrak"])
def test_training_features_follow_the_runs_flip_augmentation(run_copy, variant):
    """A run trained with --hflip gets an independent flip per (t, eps) training draw, from the
    example's own keyed stream: features differ from the flip-free ones, equal the projected
    per_example_gradients(options=DrawOptions(hflip=True)), rebuild identically, live under their
    own cache key; query features (generated samples) are not flipped."""
    settings = trak.TrakSettings(variant=variant, proj_dim=64, num_draws=4, num_timesteps=2)
    queries = run_copy.load_samples("queries")[0]["images"]
    f0, d0 = trak.train_features(run_copy, settings, device="cpu")
    q0 = trak.query_features(run_copy, queries, settings, device="cpu")
    cfg = run_copy.config
    cfg["train"]["hflip"] = True
    write_json(run_copy.path / "config.json", cfg)
    f1, d1 = trak.train_features(run_copy, settings, device="cpu")
    assert d1 != d0 and read_json(d1 / "args.json")["hflip"] is True
    assert "hflip" not in read_json(d0 / "args.json")  # flip-free runs keep their old cache keys
    assert float((f1 - f0).norm() / f0.norm()) > 0.05
    unet = run_copy.load_unet()
    G = per_example_gradients(unet, run_copy.schedule(), _train_images(run_copy), settings.measurement(), 4, 0,
                              timesteps=settings.timesteps(1000), options=DrawOptions(hflip=True))
    ref = trak._projector_for(unet, settings, torch.device("cpu")).project(G)
    torch.testing.assert_close(f1, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    shutil.rmtree(d1)
    f1b, _ = trak.train_features(run_copy, settings, device="cpu")
    assert torch.equal(f1b, f1)  # reproducible
    assert torch.equal(trak.query_features(run_copy, queries, settings, device="cpu"), q0)


def test_trak_features_cached_and_invalidated_by_model_change(run_copy):
    settings = trak.TrakSettings(variant="dtrak", proj_dim=64, num_timesteps=2)
    count = _Counting()
    f1, d1 = trak.train_features(run_copy, settings, grad_fn=count)
    assert f1.shape == (16, 64) and count.calls >= 1
    calls = count.calls
    f1b, d1b = trak.train_features(run_copy, settings, grad_fn=count)
    assert count.calls == calls and d1b == d1 and torch.equal(f1, f1b)  # cache hit
    _perturb_model(run_copy)
    f2, d2 = trak.train_features(run_copy, settings, grad_fn=count)
    assert count.calls > calls and d2 != d1
    assert (f2 - f1).abs().max() > 1e-3 * f1.abs().max()


@pytest.mark.slow
def test_trak_and_dtrak_scores_end_to_end(run_copy):
    """Scores [Q, N], finite, and a training image used as a query ranks itself first."""
    queries = run_copy.load_samples("queries")[0]["images"]
    seen = []
    s = trak.trak_scores(run_copy, queries, proj_dim=256, num_draws=4,
                       progress=lambda d, t, st: seen.append(st))
    assert s.shape == (3, 16) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert {"train gradients", "query gradients", "scores"} <= set(seen)
    # Self-retrieval: query draws are independent of the training draws, so this needs enough
    # draws for the MC noise not to dominate (measured on this run: 8 draws retrieve 0/8 (TRAK)
    # and 6/8 (D-TRAK); 32 draws 5/8 and 8/8). Chance is 1/16.
    own = _train_images(run_copy, 8)
    for variant, min_rate in (("trak", 0.5), ("dtrak", 0.75)):
        res = trak.trak_attribution(run_copy, own, variant=variant, proj_dim=256, num_draws=32, num_timesteps=4)
        assert res.scores.shape == (8, 16)
        assert res.damping > 0 and res.damping_trak_code == pytest.approx(16 * res.damping)
        top = res.scores.argmax(dim=1)
        assert (top == torch.arange(8)).float().mean() >= min_rate, (variant, top)
    # an explicit damping is used as given; larger damping -> smaller scores
    a = trak.trak_scores(run_copy, queries, proj_dim=256, num_draws=4, damping=1e-3)
    b = trak.trak_scores(run_copy, queries, proj_dim=256, num_draws=4, damping=1e3)
    assert b.abs().max() < a.abs().max()
    with pytest.raises(UserError):
        trak.trak_scores(run_copy, queries[:, :, :4], proj_dim=64)
    with pytest.raises(UserError):
        trak.trak_scores(run_copy, queries, variant="nope")
