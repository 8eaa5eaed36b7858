"""Shared fixtures: small trained runs made once per test session (CPU, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

# One thread per test process: several processes share this 2-core machine, and OpenMP
# oversubscription slows everything down tenfold. Tests are small; one thread suffices.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# AppTests hold and patch builds inside this process, so the app's jobs run as threads here (the
# served app runs builds as processes: tests/test_jobs.py checks that mode, and the browser tier's
# servers set ATTRIBUTION_JOB_MODE=auto explicitly, since they inherit this environment).
os.environ.setdefault("ATTRIBUTION_JOB_MODE", "thread")

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_partial_train.npz"


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_deterministic():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    yield


def _make_run(root: Path, preset: str, limit: int, resolution: int, steps: int, n_queries: int):
    from attribution.data import DatasetSpec
    from attribution.ddpm import sample
    from attribution.train import TrainConfig, train_run

    spec = DatasetSpec(source="mnist5k", limit=limit, resolution=resolution)
    cfg = TrainConfig(preset=preset, steps=steps, batch_size=16, lr=2e-3, warmup_steps=5,
                      checkpoint_every=steps, seed=0)
    run = train_run(root, spec, cfg, device=torch.device("cpu"))
    unet = run.load_unet()
    out = sample(unet, run.schedule(), n_queries, torch.Generator().manual_seed(0), return_trajectory=True)
    run.save_samples("queries", out.images, out.trajectory, {"seed": 0, "n": n_queries})
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny` preset, 32 MNIST digits at 8x8, 30 steps, 4 query samples with trajectories."""
    return _make_run(tmp_path_factory.mktemp("tiny_run"), "tiny", 32, 8, 30, 4)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """`micro` preset (~11K params), 16 MNIST digits at 8x8, 20 steps, 3 queries with trajectories."""
    return _make_run(tmp_path_factory.mktemp("micro_run"), "micro", 16, 8, 20, 3)


@pytest.fixture
def shared_cifar():
    """Path to ../shared/data's CIFAR-10 npz; the test is skipped when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data/cifar10_partial_train.npz is not present")
    return SHARED_DATA
