"""TRAK / D-TRAK, CLIP cosine and pixel cosine baselines (attribution/baselines.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import attribution.baselines as bl
from attribution.errors import UserError
from attribution.gradients import kfac_parameters, per_example_gradients
from attribution.measurements import example_generator
from attribution.projection import make_projector
from attribution.runs import Run

REPO = Path(__file__).resolve().parents[1]


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
    assert bl.dtrak_timesteps(10, 1000) == list(range(0, 1000, 100))
    assert bl.dtrak_timesteps(100, 1000) == list(range(0, 1000, 10))
    with pytest.raises(UserError):
        bl.dtrak_timesteps(0, 1000)


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
    settings = bl.TrakSettings(variant="trak", num_draws=3, projection=kind, proj_dim=k or P)
    proj = make_projector(kind, P, k or P, seed=0)
    phi = bl.featurize(unet, schedule, x, settings, proj, params=params)
    phi_q = bl.featurize(unet, schedule, queries, settings, proj, params=params,
                         offset=bl.QUERY_INDEX_OFFSET)
    G = per_example_gradients(unet, schedule, x, settings.measurement(), 3, 0, params=params)
    Gq = per_example_gradients(unet, schedule, queries, settings.measurement(), 3, 0, params=params,
                               offset=bl.QUERY_INDEX_OFFSET)
    if kind == "gaussian":
        S = proj.matrix().double()
        G, Gq = G.double() @ S.T, Gq.double() @ S.T
    assert P > N if kind == "identity" else k < N
    eig = bl.gram_eigen(phi)
    assert eig.mode == ("train" if kind == "identity" else "feature")
    for rel in (1e-3, 1.0):
        lam = eig.default_damping(rel)
        ours = bl.scores_from_features(phi_q, phi, lam, eig)
        ref = _dense_reference(Gq, G, lam)
        scale = ref.abs().max()
        torch.testing.assert_close(ours / scale, ref / scale, rtol=0, atol=1e-5)
        # damping conversion (2): TRAK's code adds N * lambda to the unnormalised Gram matrix
        Phi = phi.double()
        trak_code = phi_q.double() @ torch.linalg.solve(
            Phi.T @ Phi + bl.trak_code_damping(lam, N) * torch.eye(Phi.shape[1], dtype=torch.float64), Phi.T)
        torch.testing.assert_close(ours / scale, N * trak_code / scale, rtol=0, atol=1e-5)
    # adding lambda to the unnormalised Gram matrix instead (the classic mistake) differs clearly
    lam = eig.default_damping(1.0)
    wrong = phi_q.double() @ torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64), Phi.T)
    ours = bl.scores_from_features(phi_q, phi, lam, eig)
    assert ((N * wrong - ours).abs().max() / ours.abs().max()) > 0.1


def test_damping_zero_is_the_limit_and_singular_damping_is_refused():
    """With k > N and full-rank features, lambda = 0 is the finite limit lambda -> 0 of (1)
    (push-through); duplicated training features make it singular, which is refused."""
    gen = torch.Generator().manual_seed(0)
    phi, q = torch.randn(4, 10, generator=gen), torch.randn(2, 10, generator=gen)
    torch.testing.assert_close(bl.scores_from_features(q, phi, 0.0), bl.scores_from_features(q, phi, 1e-9),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(UserError, match="too small"):
        bl.scores_from_features(q, torch.cat([phi, phi[:1]]), 0.0)
    with pytest.raises(UserError):
        bl.scores_from_features(q, phi, -1.0)


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
    settings = bl.TrakSettings(variant=variant, num_timesteps=4, num_draws=8, projection="identity", proj_dim=P)
    offset = 5
    phi = bl.featurize(unet, schedule, x, settings, make_projector("identity", P, P), offset=offset)
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


def test_trak_features_cached_and_invalidated_by_model_change(run_copy):
    settings = bl.TrakSettings(variant="dtrak", proj_dim=64, num_timesteps=2)
    count = _Counting()
    f1, d1 = bl.train_features(run_copy, settings, grad_fn=count)
    assert f1.shape == (16, 64) and count.calls >= 1
    calls = count.calls
    f1b, d1b = bl.train_features(run_copy, settings, grad_fn=count)
    assert count.calls == calls and d1b == d1 and torch.equal(f1, f1b)  # cache hit
    _perturb_model(run_copy)
    f2, d2 = bl.train_features(run_copy, settings, grad_fn=count)
    assert count.calls > calls and d2 != d1
    assert (f2 - f1).abs().max() > 1e-3 * f1.abs().max()


@pytest.mark.slow
def test_trak_and_dtrak_scores_end_to_end(run_copy):
    """Scores [Q, N], finite, and a training image used as a query ranks itself first."""
    queries = run_copy.load_samples("queries")[0]["images"]
    seen = []
    s = bl.trak_scores(run_copy, queries, proj_dim=256, num_draws=4,
                       progress=lambda d, t, st: seen.append(st))
    assert s.shape == (3, 16) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert {"train gradients", "query gradients", "scores"} <= set(seen)
    # Self-retrieval: query draws are independent of the training draws, so this needs enough
    # draws for the MC noise not to dominate (measured on this run: 8 draws retrieve 0/8 (TRAK)
    # and 6/8 (D-TRAK); 32 draws 5/8 and 8/8). Chance is 1/16.
    own = _train_images(run_copy, 8)
    for variant, min_rate in (("trak", 0.5), ("dtrak", 0.75)):
        res = bl.trak_attribution(run_copy, own, variant=variant, proj_dim=256, num_draws=32, num_timesteps=4)
        assert res.scores.shape == (8, 16)
        assert res.damping > 0 and res.damping_trak_code == pytest.approx(16 * res.damping)
        top = res.scores.argmax(dim=1)
        assert (top == torch.arange(8)).float().mean() >= min_rate, (variant, top)
    # an explicit damping is used as given; larger damping -> smaller scores
    a = bl.trak_scores(run_copy, queries, proj_dim=256, num_draws=4, damping=1e-3)
    b = bl.trak_scores(run_copy, queries, proj_dim=256, num_draws=4, damping=1e3)
    assert b.abs().max() < a.abs().max()
    with pytest.raises(UserError):
        bl.trak_scores(run_copy, queries[:, :, :4], proj_dim=64)
    with pytest.raises(UserError):
        bl.trak_scores(run_copy, queries, variant="nope")


# ----------------------------------------------------------------------------- pixels


def test_pixel_scores_are_cosines(micro_run):
    x = _train_images(micro_run)
    q = torch.cat([x[:3], -x[3:4]])
    s = bl.pixel_scores(micro_run, q)
    assert s.shape == (4, 16)
    torch.testing.assert_close(s[torch.arange(3), torch.arange(3)], torch.ones(3))
    assert s[3, 3].item() == pytest.approx(-1.0, abs=1e-6)
    a, b = q[1].flatten().double(), x[7].flatten().double()
    assert s[1, 7].item() == pytest.approx((a @ b / a.norm() / b.norm()).item(), abs=1e-6)
    with pytest.raises(UserError):
        bl.pixel_scores(micro_run, x[:2, :, :4, :4])


# ----------------------------------------------------------------------------- CLIP


def test_clip_scores_untrained_model_and_cache(run_copy, monkeypatch):
    """Untrained ViT-B-32 (offline): self-similarity 1, embeddings cached, model change -> recompute."""
    calls = []
    real = bl.clip_embeddings

    def counting(*a, **k):
        calls.append(k.get("stage"))
        return real(*a, **k)

    monkeypatch.setattr(bl, "clip_embeddings", counting)
    x = _train_images(run_copy)
    s = bl.clip_scores(run_copy, x[:4], pretrained=None)
    assert s.shape == (4, 16) and torch.isfinite(s).all()
    torch.testing.assert_close(s[torch.arange(4), torch.arange(4)], torch.ones(4), rtol=0, atol=1e-4)
    assert s.max() <= 1 + 1e-4 and calls.count("clip train embeddings") == 1
    s2 = bl.clip_scores(run_copy, x[:4], pretrained=None)
    assert calls.count("clip train embeddings") == 1  # cached
    torch.testing.assert_close(s2, s)
    _perturb_model(run_copy)
    bl.clip_scores(run_copy, x[:4], pretrained=None)
    assert calls.count("clip train embeddings") == 2  # new model fingerprint -> new cache


def test_clip_weight_file_changes_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.delenv(bl.CLIP_WEIGHTS_ENV, raising=False)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"one")
    k1 = bl.resolve_clip_weights(clip_weights=str(f)).key
    f.write_bytes(b"two!")
    k2 = bl.resolve_clip_weights(clip_weights=str(f)).key
    assert k1 != k2
    with pytest.raises(bl.ClipUnavailable, match="does not exist"):
        bl.resolve_clip_weights(clip_weights=str(tmp_path / "missing.bin"))


_OFFLINE_SCRIPT = textwrap.dedent("""
    import time, sys
    t0 = time.perf_counter()
    from attribution.baselines import ClipUnavailable, resolve_clip_weights
    t1 = time.perf_counter()
    try:
        resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k")
    except ClipUnavailable as exc:
        print("CLIPUNAVAILABLE", round(time.perf_counter() - t1, 2), exc)
        sys.exit(0)
    print("NO ERROR")
    sys.exit(1)
""")


@pytest.mark.parametrize("offline", ["1", "unset"])
def test_offline_clip_fails_fast_with_instructions(tmp_path, offline):
    """Empty HF cache, no weight file: ClipUnavailable within 20 s. Without HF_HUB_OFFLINE the
    hub endpoint is a non-routable address (this sandbox's proxy accepts the TCP connection and
    never answers): the 4 s HTTP probe gives up instead of the hub client's minute of retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ATTRIBUTION_CLIP"))}
    env.update(HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"), HOME=str(tmp_path),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if offline == "1":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "https://10.255.255.1"  # black hole: connects never complete
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    line = [l for l in out.stdout.splitlines() if l.startswith("CLIPUNAVAILABLE")][0]
    elapsed = float(line.split()[1])
    assert elapsed < 20, line
    assert bl.CLIP_WEIGHTS_ENV in line and "huggingface-cli download" in line
    assert time.perf_counter() - t0 < 120


def test_offline_clip_scores_raise_user_error_in_process(micro_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(bl.CLIP_WEIGHTS_ENV, raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=bl.CLIP_WEIGHTS_ENV):
        bl.clip_scores(micro_run, _train_images(micro_run, 2))
    assert time.perf_counter() - t0 < 20


# ----------------------------------------------------------------------------- CLI


def test_cli_attribute_pixel(run_copy, capsys):
    if importlib.util.find_spec("attribution.cli_attribute") is None:
        pytest.skip("attribution.cli_attribute (the `attribute` command) is not there yet")
    from attribution.cli import main

    rc = main(["attribute", "--run", str(run_copy.path), "--method", "pixel", "--samples", "queries",
               "--query", "0-2", "--json", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    queries = run_copy.load_samples("queries")[0]["images"]
    best = int(bl.pixel_scores(run_copy, queries[:1]).argmax())
    assert str(best) in out and "pixel" in out
