"""CLIP cosine and pixel cosine (attribution/similarity.py), and the compatibility module
attribution/baselines.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import attribution.similarity as sim
from attribution.errors import UserError
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


def _perturb_model(run: Run) -> None:
    unet = run.load_unet()
    with torch.no_grad():
        unet.conv_out.weight.add_(0.05 * torch.randn_like(unet.conv_out.weight))
    unet.save_pretrained(run.model_dir)


# ----------------------------------------------------------------------------- pixels


def test_pixel_scores_are_cosines(micro_run):
    x = _train_images(micro_run)
    q = torch.cat([x[:3], -x[3:4]])
    s = sim.pixel_scores(micro_run, q)
    assert s.shape == (4, 16)
    torch.testing.assert_close(s[torch.arange(3), torch.arange(3)], torch.ones(3))
    assert s[3, 3].item() == pytest.approx(-1.0, abs=1e-6)
    a, b = q[1].flatten().double(), x[7].flatten().double()
    assert s[1, 7].item() == pytest.approx((a @ b / a.norm() / b.norm()).item(), abs=1e-6)
    with pytest.raises(UserError):
        sim.pixel_scores(micro_run, x[:2, :, :4, :4])


# ----------------------------------------------------------------------------- CLIP


def test_clip_scores_untrained_model_and_cache(run_copy, monkeypatch):
    """Untrained ViT-B-32 (offline): self-similarity 1, embeddings cached, model change -> recompute."""
    calls = []
    real = sim.clip_embeddings

    def counting(*a, **k):
        calls.append(k.get("stage"))
        return real(*a, **k)

    monkeypatch.setattr(sim, "clip_embeddings", counting)
    x = _train_images(run_copy)
    s = sim.clip_scores(run_copy, x[:4], pretrained=None)
    assert s.shape == (4, 16) and torch.isfinite(s).all()
    torch.testing.assert_close(s[torch.arange(4), torch.arange(4)], torch.ones(4), rtol=0, atol=1e-4)
    assert s.max() <= 1 + 1e-4 and calls.count("clip train embeddings") == 1
    s2 = sim.clip_scores(run_copy, x[:4], pretrained=None)
    assert calls.count("clip train embeddings") == 1  # cached
    torch.testing.assert_close(s2, s)
    _perturb_model(run_copy)
    sim.clip_scores(run_copy, x[:4], pretrained=None)
    assert calls.count("clip train embeddings") == 2  # new model fingerprint -> new cache


def test_clip_weight_file_changes_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.delenv(sim.CLIP_WEIGHTS_ENV, raising=False)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"one")
    k1 = sim.resolve_clip_weights(clip_weights=str(f)).key
    f.write_bytes(b"two!")
    k2 = sim.resolve_clip_weights(clip_weights=str(f)).key
    assert k1 != k2
    with pytest.raises(sim.ClipUnavailable, match="does not exist"):
        sim.resolve_clip_weights(clip_weights=str(tmp_path / "missing.bin"))


_OFFLINE_SCRIPT = textwrap.dedent("""
    import time, sys
    t0 = time.perf_counter()
    from attribution.similarity import ClipUnavailable, resolve_clip_weights
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
    assert sim.CLIP_WEIGHTS_ENV in line and "huggingface-cli download" in line
    assert time.perf_counter() - t0 < 120


def test_offline_clip_scores_raise_user_error_in_process(micro_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(sim.CLIP_WEIGHTS_ENV, raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=sim.CLIP_WEIGHTS_ENV):
        sim.clip_scores(micro_run, _train_images(micro_run, 2))
    assert time.perf_counter() - t0 < 20


# ----------------------------------------------------------------------------- CLI


def test_cli_attribute_pixel(run_copy, capsys):
    from attribution.cli import main

    rc = main(["attribute", "--run", str(run_copy.path), "--method", "pixel", "--samples", "queries",
               "--query", "0-2", "--json", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    queries = run_copy.load_samples("queries")[0]["images"]
    best = int(sim.pixel_scores(run_copy, queries[:1]).argmax())
    assert str(best) in out and "pixel" in out


# ----------------------------------------------------------------------------- compatibility


def test_baselines_module_re_exports_the_public_names():
    """``attribution.baselines`` (the pre-split module) still offers every public name."""
    import attribution.baselines as bl
    import attribution.trak as trak

    for mod in (sim, trak):
        for name in mod.__all__:
            assert getattr(bl, name) is getattr(mod, name), name
    assert set(bl.__all__) == set(sim.__all__) | set(trak.__all__)
