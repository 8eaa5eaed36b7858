"""The shipped runs carry the K-FAC factors of the default settings (so that the first gallery on
a fresh clone skips their build). They must be exactly what the code builds now: recomputed here
on a copy of the run without artifacts and compared with the shipped file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from attribution.curvature import curvature_factors
from attribution.influence import InfluenceSettings, run_hflip, training_images
from attribution.runs import load_tensors, open_run

ROOT = Path(__file__).resolve().parents[1]


def shipped_factor_dir(run):
    return run.artifact_dir("curvature", InfluenceSettings().curvature(run_hflip(run)).key())


@pytest.mark.parametrize("name", ["cifar2", pytest.param("run", marks=pytest.mark.slow)])
def test_shipped_default_factors_equal_a_fresh_build(name, tmp_path):
    src = open_run(ROOT / "demo" / name)
    shipped = shipped_factor_dir(src) / "factors.safetensors"
    assert shipped.exists(), f"{shipped} is missing: run `make ship-factors`"
    dst = tmp_path / name
    shutil.copytree(src.path, dst, ignore=shutil.ignore_patterns("artifacts", "jobs", "lds", "lds_truth", "train_state"))
    run = open_run(dst)
    cfg = InfluenceSettings().curvature(run_hflip(run))
    fresh, fresh_meta = curvature_factors(run, lambda: training_images(run), cfg)
    ref, ref_meta = load_tensors(shipped)
    assert set(fresh) == set(ref)
    for key in ref:
        scale = float(ref[key].abs().max())
        assert torch.allclose(fresh[key].to(ref[key].dtype), ref[key], rtol=1e-5, atol=1e-6 * scale), key
