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
    settings = trak.TrakSettings(variant="trak", projection=kind, proj_dim=k or P)
    proj = make_projector(kind, P, k or P, seed=0)
    phi = trak.featurize(unet, schedule, x, settings, proj, num_draws=3, params=params)
    phi_q = trak.featurize(unet, schedule, queries, settings, proj, num_draws=3, params=params,
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
    settings = trak.TrakSettings(variant=variant, num_timesteps=4, train_draws=8, query_draws=8, projection="identity",
                                 proj_dim=P)
    offset = 5
    phi = trak.featurize(unet, schedule, x, settings, make_projector("identity", P, P), num_draws=8, offset=offset)
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


# ----------------------------------------------------------------------------- budgets and settings

SMALL = dict(proj_dim=64, train_draws=4, query_draws=4, num_timesteps=2)


def test_defaults_use_kfacs_budgets_and_trak_shares_kfacs_store():
    """Issue 15: TRAK / D-TRAK default to K-FAC's training and query draws; TRAK's store settings
    ARE K-FAC's defaults (one store serves both); D-TRAK's rounds cover its timesteps whole."""
    from attribution.influence_settings import InfluenceSettings

    kfac = InfluenceSettings()
    for variant in trak.TRAK_VARIANTS:
        s = trak.TrakSettings(variant=variant)
        assert (s.train_draws, s.query_draws) == (kfac.train_draws, kfac.query_draws)
        assert sum(s.round_draws) == kfac.train_draws and s.rounds >= 2
    assert trak.TrakSettings().influence_settings() == kfac
    assert trak.TrakSettings().round_draws == kfac.round_draws
    dt = trak.TrakSettings(variant="dtrak")
    assert all(d % dt.num_timesteps == 0 for d in dt.round_draws)
    assert trak.TrakSettings(variant="dtrak", num_timesteps=2, train_draws=12, query_draws=4).round_draws == [2, 2, 4, 4]
    for bad in (dict(variant="dtrak", num_timesteps=32, train_draws=100), dict(variant="dtrak", query_draws=96),
                dict(train_draws=3), dict(query_draws=5), dict(draw_scheme="nope"), dict(variant="nope")):
        with pytest.raises(UserError):
            trak.TrakSettings(**bad)


# ----------------------------------------------------------------------------- training features


def test_trak_features_are_the_projected_rows_of_kfacs_store(run_copy):
    """TRAK's training features project K-FAC's own gradient store (the same folder, no second
    store): each half and the draw-weighted mean equal the projection of the store's rows."""
    from attribution import influence

    settings = trak.TrakSettings(variant="trak", proj_dim=64, train_draws=8, query_draws=4)
    tf = trak.train_features(run_copy, settings, device="cpu")
    store = influence.gradient_store(run_copy, settings.influence_settings())
    assert [p.name for p in (run_copy.path / "artifacts" / "grad_store").iterdir()] == [store.dir.name]
    assert tf.source == "store" and read_json(tf.directory / "args.json")["store"] == store.dir.name
    assert store.rounds_done == tf.rounds_done == tf.rounds_total == 4 and len(tf.halves) == 2
    proj = trak.projector_for(run_copy.load_unet(), settings)
    ref = proj.project(store.rows(0, store.n))
    tol = dict(rtol=0, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(tf.features, ref, **tol)
    for h, half in enumerate(store.halves):
        torch.testing.assert_close(tf.halves[h], proj.project(half.rows(0, store.n)), **tol)
    assert tf.weights == store.weights() == [0.5, 0.5]


@pytest.mark.parametrize("variant", ["trak", "dtrak"])
def test_streamed_features_equal_the_store_route(run_copy, variant):
    """Above the store's byte budget the same rounds are computed and projected directly; the
    result equals projecting the store (up to the store's float16 rounding), half by half."""
    settings = trak.TrakSettings(variant=variant, proj_dim=64, train_draws=8, query_draws=4, num_timesteps=2)
    streamed = trak.train_features(run_copy, settings, device="cpu", store_budget_bytes=0)
    assert streamed.source == "stream"
    assert not list((run_copy.path / "artifacts").glob("grad_store/*/store.json"))  # no store was built
    stored = trak.train_features(run_copy, settings, device="cpu")
    assert stored.source == "store" and stored.directory != streamed.directory
    for a, b in zip(streamed.halves, stored.halves):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3 * float(b.abs().max()))
    assert streamed.weights == stored.weights
    assert float((streamed.halves[0] - streamed.halves[1]).norm() / streamed.halves[0].norm()) > 0.05  # independent


def test_dtrak_rounds_are_fresh_noise_at_its_fixed_timesteps_and_follow_flips(run_copy):
    """D-TRAK's store: square-norm gradients at the K uniformly spaced timesteps, round r drawn with
    its own generators (round r -> half r % 2), a flip per draw for a run trained with --hflip."""
    from attribution.measurements import Measurement

    cfg = run_copy.config
    cfg["train"]["hflip"] = True
    write_json(run_copy.path / "config.json", cfg)
    settings = trak.TrakSettings(variant="dtrak", proj_dim=64, train_draws=8, query_draws=4, num_timesteps=2)
    assert settings.round_draws == [2, 2, 2, 2]
    tf = trak.train_features(run_copy, settings, device="cpu")
    store_args = read_json(run_copy.path / "artifacts" / "grad_store" / read_json(tf.directory / "args.json")["store"]
                           / "args.json")
    assert store_args["measurement"] == "square-norm" and store_args["hflip"] is True and store_args["timesteps"] == 2
    unet = run_copy.load_unet()
    x = _train_images(run_copy)
    G = [per_example_gradients(unet, run_copy.schedule(), x, Measurement("square-norm"), 2, 0, timesteps=[0, 500],
                               options=DrawOptions(hflip=True, draw_round=r)) for r in range(4)]
    proj = trak.projector_for(unet, settings)
    for h in (0, 1):
        ref = proj.project((G[h] + G[h + 2]) / 2)
        torch.testing.assert_close(tf.halves[h], ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
    plain = per_example_gradients(unet, run_copy.schedule(), x, Measurement("square-norm"), 2, 0, timesteps=[0, 500])
    assert float((proj.project(plain) - tf.halves[0]).norm() / tf.halves[0].norm()) > 0.05  # flips matter


def test_feature_caches_are_keyed_by_every_setting_rounds_and_model(run_copy, monkeypatch):
    """A cache hit projects nothing; any other setting, more rounds of the store or another model
    never reuses the old features (and features of fewer rounds are pruned once superseded)."""
    from dataclasses import replace

    import attribution.trak_features as tfm

    base = trak.TrakSettings(variant="dtrak", proj_dim=64, train_draws=8, query_draws=4, num_timesteps=2)
    preview = trak.train_features(run_copy, base, device="cpu", rounds=2)
    assert preview.rounds_done == 2 and preview.directory.exists()
    full = trak.train_features(run_copy, base, device="cpu")
    assert full.rounds_done == 4 and full.directory != preview.directory and not preview.directory.exists()
    real = tfm.project_store

    def refuse(*a, **k):
        raise AssertionError("projected again")

    monkeypatch.setattr(tfm, "project_store", refuse)
    again = trak.train_features(run_copy, base, device="cpu")
    assert again.directory == full.directory and torch.equal(again.features, full.features)
    monkeypatch.setattr(tfm, "project_store", real)
    dirs = {full.directory}
    for other in (replace(base, proj_dim=32), replace(base, seed=1), replace(base, train_draws=12),
                  replace(base, num_timesteps=4, train_draws=16, query_draws=8)):
        f = trak.train_features(run_copy, other, device="cpu")
        assert f.directory not in dirs
        dirs.add(f.directory)
        if f.features.shape == full.features.shape:
            assert float((f.features - full.features).norm() / full.features.norm()) > 0.05
    _perturb_model(run_copy)
    moved = trak.train_features(run_copy, base, device="cpu")
    assert moved.directory not in dirs
    assert float((moved.features - full.features).norm() / full.features.norm()) > 1e-3


# ----------------------------------------------------------------------------- query features


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


def test_trak_queries_are_kfacs_query_gradients_and_are_cached(run_copy):
    """TRAK's query features are the projection of K-FAC's two query-gradient halves (same keys,
    scheme, rounds); with ``query_set`` they are read from K-FAC's cache. Raw halves are cached
    per image: a repeat computes nothing, other draws recompute."""
    from attribution import influence

    settings = trak.TrakSettings(variant="trak", **SMALL)
    queries = run_copy.load_samples("queries")[0]["images"]
    count = _Counting()
    keys = trak.query_keys(3)
    fa, fb = trak.query_feature_halves(run_copy, queries, settings, keys, device="cpu", grad_fn=count)
    assert count.calls == 2  # one group of 3 queries, two halves
    qa, qb = influence.query_gradient_halves(run_copy, "queries", [0, 1, 2], settings.influence_settings())
    proj = trak.projector_for(run_copy.load_unet(), settings)
    for ours, ref in ((fa, proj.project(qa)), (fb, proj.project(qb))):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert float((fa - fb).norm() / fa.norm()) > 0.05  # independent halves
    shared = trak.query_feature_halves(run_copy, queries, settings, keys, device="cpu", query_set="queries",
                                       query_indices=[0, 1, 2])
    torch.testing.assert_close(shared[0], fa, rtol=0, atol=1e-5 * float(fa.abs().max()))
    again = trak.query_feature_halves(run_copy, queries[[2]], settings, [keys[2]], device="cpu", grad_fn=count)
    assert count.calls == 2 and torch.equal(again[0][0], fa[2])  # cache hit per image
    trak.query_feature_halves(run_copy, queries, replace_settings(settings, query_draws=8), keys, device="cpu",
                              grad_fn=count)
    assert count.calls == 4  # other draws: recomputed


def replace_settings(s, **kw):
    from dataclasses import replace

    return replace(s, **kw)


@pytest.mark.parametrize("variant", ["trak", "dtrak"])
def test_query_scores_do_not_depend_on_the_other_queries(run_copy, variant):
    """Query draws are keyed by the query's GLOBAL index: query 2 scored alone equals its row
    when scored with queries 0-2 (keyed by batch position, as before, query 2 alone would get
    query 0's draws and differ)."""
    queries = run_copy.load_samples("queries")[0]["images"]
    kw = dict(variant=variant, damping=1e-3, device="cpu", **SMALL)
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


# ----------------------------------------------------------------------------- scores + reliability


def test_result_has_split_half_scores_reliability_and_previews(run_copy):
    """Half scores are equation (1) on each half's own features (own Gram matrix, same lambda); the
    reliability and standard errors come from them; a one-round preview has none."""
    from attribution.stability import moderated_se

    queries = run_copy.load_samples("queries")[0]["images"]
    kw = dict(variant="dtrak", device="cpu", proj_dim=64, train_draws=8, query_draws=4, num_timesteps=2)
    one = trak.trak_attribution(run_copy, queries, rounds=1, **kw)  # a preview: the store's first round
    assert one.preview and one.rounds_done == 1 and one.scores_a is None and one.reliability is None
    res = trak.trak_attribution(run_copy, queries, **kw)  # the store grown to all its rounds
    assert res.rounds_done == res.rounds_total == 4 and not res.preview
    s = trak.TrakSettings(**{k: v for k, v in kw.items() if k != "device"})
    tf = trak.train_features(run_copy, s, device="cpu")
    qa, qb = trak.query_feature_halves(run_copy, queries, s, trak.query_keys(3), device="cpu")
    ref_a = trak.scores_from_features(qa, tf.halves[0], res.damping)
    torch.testing.assert_close(res.scores_a.double(), ref_a, rtol=1e-4, atol=1e-6 * float(ref_a.abs().max()))
    ref = trak.scores_from_features((qa + qb) / 2, tf.features, res.damping)
    torch.testing.assert_close(res.scores.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    torch.testing.assert_close(res.se.double(), moderated_se(res.scores_a, res.scores_b), rtol=1e-5, atol=0)
    assert len(res.reliability) == 3 and all(-1 <= r.split_half_spearman <= 1 for r in res.reliability)
    assert res.summary(0)["train_draws_done"] == 8


def test_query_set_must_match_the_images(run_copy):
    queries = run_copy.load_samples("queries")[0]["images"]
    with pytest.raises(UserError, match="not queries"):
        trak.trak_attribution(run_copy, queries[[1, 0]], query_indices=[0, 1], query_set="queries", device="cpu",
                              **SMALL)


@pytest.mark.slow
def test_trak_and_dtrak_scores_end_to_end(run_copy):
    """Scores [Q, N], finite, and a training image used as a query ranks itself first."""
    queries = run_copy.load_samples("queries")[0]["images"]
    seen = []
    s = trak.trak_scores(run_copy, queries, progress=lambda d, t, st: seen.append(st), **SMALL)
    assert s.shape == (3, 16) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert {"query gradients", "scores"} <= {x.split(" (")[0] for x in seen}
    # Self-retrieval: query draws are independent of the training draws, so this needs enough
    # draws for the MC noise not to dominate. Chance is 1/16.
    own = _train_images(run_copy, 8)
    for variant, min_rate in (("trak", 0.5), ("dtrak", 0.75)):
        res = trak.trak_attribution(run_copy, own, variant=variant, proj_dim=256, train_draws=32, query_draws=32,
                                    num_timesteps=4)
        assert res.scores.shape == (8, 16)
        assert res.damping > 0 and res.damping_trak_code == pytest.approx(16 * res.damping)
        # each variant's own default relative damping (bench/results/trak_damping_*.md)
        eig = trak.gram_eigen(trak.train_features(run_copy, res.settings).features)
        assert res.damping == pytest.approx(eig.default_damping(trak.DEFAULT_RELATIVE_DAMPING[variant]), rel=1e-6)
        top = res.scores.argmax(dim=1)
        assert (top == torch.arange(8)).float().mean() >= min_rate, (variant, top)
    # an explicit damping is used as given; larger damping -> smaller scores
    a = trak.trak_scores(run_copy, queries, damping=1e-3, **SMALL)
    b = trak.trak_scores(run_copy, queries, damping=1e3, **SMALL)
    assert b.abs().max() < a.abs().max()
    with pytest.raises(UserError):
        trak.trak_scores(run_copy, queries[:, :, :4], **SMALL)
    with pytest.raises(UserError):
        trak.trak_scores(run_copy, queries, variant="nope")
