"""Training lowers the loss; interrupted-then-resumed training equals uninterrupted training."""

import pytest
import torch

from attribution.data import DatasetSpec
from attribution.ddpm import diffusion_loss, draw_t_eps
from attribution.errors import UserError
from attribution.train import TrainConfig, train_run

SPEC = DatasetSpec(limit=16, resolution=8)


def _eval_loss(run):
    unet = run.load_unet()
    x0 = run.dataset().tensors()
    g = torch.Generator().manual_seed(123)
    t, eps = draw_t_eps(256, tuple(x0.shape[1:]), 1000, g)
    with torch.no_grad():
        return diffusion_loss(unet, run.schedule(), x0[torch.arange(256) % len(x0)], t, eps).mean().item()


def test_training_lowers_the_loss(tmp_path):
    short = train_run(tmp_path / "a", SPEC, TrainConfig(preset="micro", steps=1, batch_size=16, warmup_steps=1, ema_decay=0.0))
    long = train_run(tmp_path / "b", SPEC, TrainConfig(preset="micro", steps=150, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.0))
    before, after = _eval_loss(short), _eval_loss(long)
    assert after < 0.7 * before, (before, after)
    curve = long.loss_curve()
    assert curve[-1]["step"] == 150 and curve[-1]["loss"] < curve[0]["loss"]


def test_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(preset="micro", steps=12, batch_size=8, checkpoint_every=100, seed=5)
    full = train_run(tmp_path / "full", SPEC, cfg)

    calls = {"n": 0}

    def stop_after_5():
        calls["n"] += 1
        return calls["n"] == 5

    part_dir = tmp_path / "part"
    first = train_run(part_dir, SPEC, cfg, should_stop=stop_after_5)
    assert not first.has_model()  # stopped early: only the checkpoint exists
    resumed = train_run(part_dir, SPEC, cfg)
    a = torch.load(full.path / "train_state/state.pt", weights_only=True)
    b = torch.load(resumed.path / "train_state/state.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert full.model_fingerprint() == resumed.model_fingerprint()
    assert [r["step"] for r in resumed.loss_curve()] == [r["step"] for r in full.loss_curve()]


def test_same_seed_same_model_and_subset(tmp_path):
    cfg = TrainConfig(preset="micro", steps=3, batch_size=4)
    a = train_run(tmp_path / "a", SPEC, cfg, subset=[0, 2, 4, 6])
    b = train_run(tmp_path / "b", SPEC, cfg, subset=[0, 2, 4, 6])
    c = train_run(tmp_path / "c", SPEC, cfg, subset=[1, 3, 5, 7])
    assert a.model_fingerprint() == b.model_fingerprint() != c.model_fingerprint()
    assert a.config["subset"] == [0, 2, 4, 6]


def test_bad_training_input(tmp_path):
    with pytest.raises(UserError, match="steps must be positive"):
        TrainConfig(steps=0)
    with pytest.raises(UserError, match="subset indices"):
        train_run(tmp_path / "x", SPEC, TrainConfig(preset="micro", steps=1), subset=[99])
    train_run(tmp_path / "y", SPEC, TrainConfig(preset="micro", steps=1))
    with pytest.raises(UserError, match="different configuration"):
        train_run(tmp_path / "y", SPEC, TrainConfig(preset="micro", steps=2))
    with pytest.raises(UserError, match="unknown model preset"):
        train_run(tmp_path / "z", SPEC, TrainConfig(preset="huge", steps=1))
