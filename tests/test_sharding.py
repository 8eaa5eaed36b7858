"""Sharded gradient store (bit-identical to the single-process build, resumable) and sharded
K-FAC / EK-FAC factors (float64 allclose to curvlinops' single pass), through executors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from attribution.curvature import CurvatureConfig, TrainingRows, build_factors, operator_from_tensors
from attribution.ddpm import FlatEpsNet, build_unet, linear_schedule
from attribution.executor import LocalExecutor
from attribution.gradients import kfac_parameters
from attribution.measurements import DrawOptions, Measurement
from attribution.store import GradientStore, build_gradient_store
from attribution.sharding import (
    build_factors_sharded,
    build_gradient_store_sharded,
    factor_shard_groups,
    merge_shard_sums,
    store_shard_ranges,
)

warnings.filterwarnings("ignore", message="Loading a state dict")
INLINE = LocalExecutor(1)


def store_files(d: Path) -> dict[str, bytes]:
    """Every file of a store directory, by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model64():
    """A micro U-Net in float64 and 32 images: 256 factor rows (8 draws), 4 batches of 64 rows."""
    unet = build_unet("micro", 8, 1, seed=0).double().eval()
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-1, 1)
    return unet, linear_schedule(), images


@pytest.fixture(scope="module")
def small64(model64):
    """16 of those images with 4 draws: 64 K-FAC rows in 4 batches of 16."""
    unet, schedule, images = model64
    return unet, schedule, images[:16]


@pytest.fixture(scope="module")
def pool():
    with LocalExecutor(2) as ex:
        yield ex


def test_shard_plans_cover_everything_once():
    assert store_shard_ranges(130, 3, 64) == [(0, 64), (64, 128), (128, 130)]
    assert store_shard_ranges(130, 2, 64) == [(0, 128), (128, 130)]
    assert store_shard_ranges(10, 8, 4) == [(0, 4), (4, 8), (8, 10)]
    shards = factor_shard_groups(32, 8, 3, rows_per_batch=64)
    flat = [i for s in shards for g in s for i in g]
    assert flat == list(range(32)) and len(shards) == 3 and all(len(g) == 8 for s in shards for g in s)


@pytest.mark.parametrize("dtype,options", [("float16", DrawOptions(hflip=True)),
                                           ("int8", DrawOptions(scheme="stratified"))])
def test_sharded_store_is_bit_identical_and_resumes(micro_run, tmp_path, request, dtype, options):
    # float16: the resumed shards run on the 2-process pool (other processes, same bits)
    executor = request.getfixturevalue("pool") if dtype == "float16" else INLINE
    unet = micro_run.load_unet().float().eval()
    images = micro_run.dataset().tensors().float()
    m, schedule = Measurement("loss"), micro_run.schedule()
    # rounds of 1, 1, 2 draws: half 0 averages two rounds (draw-weighted), half 1 holds one
    kw = dict(dtype=dtype, chunk_size=4, rounds=3, options=options, round_draws=[1, 1, 2])
    single = build_gradient_store(tmp_path / "single", unet, schedule, images, m, 0, 3, **kw)

    # interrupted inside the second round, then resumed on the process pool
    seen = []
    stopped = build_gradient_store_sharded(tmp_path / "sharded", unet, schedule, images, m, 0, 3, INLINE,
                                           num_shards=3, progress=lambda d, n, s: seen.append(d),
                                           should_stop=lambda: len(seen) > 5, **kw)
    assert stopped is None and 16 < seen[-1] < 32
    assert GradientStore(tmp_path / "sharded").rounds_done == 1
    store = build_gradient_store_sharded(tmp_path / "sharded", unet, schedule, images, m, 0, 3, executor,
                                         num_shards=3, **kw)
    assert store.rounds_done == 3 and store.n == single.n
    assert store_files(tmp_path / "sharded") == store_files(tmp_path / "single")
    q = torch.randn(2, store.p)
    assert torch.equal(store.score(q), single.score(q))


def _factor_max_rel(a: dict, b: dict, prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-300))
               for k in keys)


@pytest.mark.parametrize("kfac_type,fisher,mc_samples,hflip", [
    ("expand", "mc", 1, False), ("reduce", "mc", 1, True), ("expand", "mc", 2, False),
    ("expand", "empirical", 1, True), ("reduce", "empirical", 1, False)])
def test_sharded_kfac_factors_equal_curvlinops_single_pass(small64, kfac_type, fisher, mc_samples, hflip, monkeypatch):
    unet, schedule, images = small64
    cfg = CurvatureConfig("kfac", fisher, kfac_type, draws=4, seed=5, mc_samples=mc_samples, hflip=hflip)
    ref, ref_meta = build_factors(unet, schedule, images, cfg, rows_per_batch=16)
    got, meta = build_factors_sharded(unet, schedule, images, cfg, INLINE, num_shards=3, rows_per_batch=16)
    assert got.keys() == ref.keys() and meta == ref_meta
    assert _factor_max_rel(ref, got) < 1e-12
    if fisher == "mc":  # the replayed label stream matters: shards drawing from the seed are wrong
        assert _factor_max_rel(ref, build_factors_sharded(unet, schedule, images, cfg, INLINE, num_shards=4,
                                                          rows_per_batch=16)[0]) < 1e-12
        monkeypatch.setattr("attribution.sharding.ShardRows._replay_labels", lambda self: None)
        wrong = build_factors_sharded(unet, schedule, images, cfg, INLINE, num_shards=4, rows_per_batch=16)[0]
        assert _factor_max_rel(ref, wrong, "gradient_covariances") > 1e-3


def _ekfac_single_pass_correction(unet, schedule, images, cfg, basis, meta):
    """curvlinops' own eigenvalue correction over all the data, in the given (fixed) basis."""
    net = FlatEpsNet(unet).eval()
    params = kfac_parameters(net)
    data = TrainingRows(schedule, images, cfg.draws, cfg.seed, params[0].dtype, 64)
    op = operator_from_tensors(net, params, data, basis, meta, batch_size_fn=lambda X: X["x"].shape[0])
    with torch.enable_grad():
        op.compute_eigenvalue_correction()
    from attribution.curvature import state_to_tensors

    return {k: v for k, v in state_to_tensors(op.state_dict())[0].items() if k.startswith("corrected")}


@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_sharded_ekfac_equals_curvlinops(model64, kfac_type, fisher):
    unet, schedule, images = model64
    cfg = CurvatureConfig("ekfac", fisher, kfac_type, draws=8, seed=2)
    ref, ref_meta = build_factors(unet, schedule, images, cfg, rows_per_batch=64)
    got, meta = build_factors_sharded(unet, schedule, images, cfg, INLINE, num_shards=3, rows_per_batch=64)
    assert got.keys() == ref.keys() and meta == ref_meta
    # the second sharded pass over a fixed eigenbasis = curvlinops' single pass in that basis
    basis = {k: v for k, v in got.items() if "eigenvectors" in k}
    single = _ekfac_single_pass_correction(unet, schedule, images, cfg, basis, meta)
    assert single.keys() == {k for k in got if k.startswith("corrected")}
    assert _factor_max_rel(single, got, "corrected") < 1e-12
    # end to end against build_factors: every eigenvector with a distinct eigenvalue agrees (up to
    # sign); reduce's factors also have exactly repeated eigenvalues (zero ones, from GroupNorm),
    # whose eigenvectors are any basis of their eigenspace, in curvlinops' single pass as here
    kref = build_factors(unet, schedule, images, CurvatureConfig("kfac", fisher, kfac_type, draws=8, seed=2),
                         rows_per_batch=64)[0]
    checked = 0
    for k, q in got.items():
        if "eigenvectors" in k:
            ev = torch.linalg.eigvalsh(kref[k.replace("_eigenvectors", "")])
            gap = torch.minimum(torch.cat([ev[1:] - ev[:-1], ev.new_full((1,), float("inf"))]),
                                torch.cat([ev.new_full((1,), float("inf")), ev[1:] - ev[:-1]]))
            unique = gap > 1e-6 * ev.abs().max()
            cos = (ref[k].T @ q).diagonal().abs()
            assert (cos[unique] > 1 - 1e-9).all(), k
            checked += int(unique.sum())
    assert checked > 100
    if kfac_type == "expand":  # here every eigenspace is one-dimensional: the operators agree
        net = FlatEpsNet(unet).eval()
        params = kfac_parameters(net)
        dummy = [({"x": images[:1], "t": torch.zeros(1, dtype=torch.long)}, torch.zeros(1, 64, dtype=torch.float64))]
        bs = lambda X: X["x"].shape[0]  # noqa: E731
        V = torch.randn(sum(p.numel() for p in params), 3, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
        a = operator_from_tensors(net, params, dummy, ref, ref_meta, batch_size_fn=bs) @ V
        b = operator_from_tensors(net, params, dummy, got, meta, batch_size_fn=bs) @ V
        assert float((a - b).abs().max() / a.abs().max()) < 1e-12


def test_merge_is_a_plain_sum():
    a = {"input_covariances|m": torch.ones(2, 2, dtype=torch.float32)}
    b = {"input_covariances|m": 2 * torch.ones(2, 2, dtype=torch.float32)}
    out = merge_shard_sums([a, b])
    assert out["input_covariances|m"].dtype == torch.float32 and torch.equal(out["input_covariances|m"],
                                                                              3 * torch.ones(2, 2))
    with pytest.raises(ValueError):
        merge_shard_sums([a, {"gradient_covariances|m": torch.ones(1)}])


def test_sharded_factors_on_the_process_pool_resume(model64, pool, tmp_path):
    unet, schedule, images = model64
    cfg = CurvatureConfig("ekfac", "mc", "expand", draws=8, seed=1)
    ref, ref_meta = build_factors(unet, schedule, images, cfg, rows_per_batch=64)
    n = []
    assert build_factors_sharded(unet, schedule, images, cfg, INLINE, num_shards=3, rows_per_batch=64,
                                 workdir=tmp_path, progress=lambda d, t, s: n.append(d),
                                 should_stop=lambda: len(n) > 2) is None
    assert 0 < len(list(tmp_path.glob("factors_*of3.safetensors"))) < 3  # finished shards kept for the resume
    got, meta = build_factors_sharded(unet, schedule, images, cfg, pool, num_shards=3, rows_per_batch=64,
                                      workdir=tmp_path)
    assert meta == ref_meta and _factor_max_rel(ref, got, "corrected") < 1e-12
    assert list(tmp_path.glob("*.safetensors")) == []


def test_build_command_and_sharded_artifacts_are_what_attribute_uses(micro_run, tmp_path, pool, monkeypatch, capsys):
    import json
    import shutil

    from attribution import cli_build, influence
    from attribution.cli import main
    from attribution.runs import Run

    shutil.copytree(micro_run.path, tmp_path / "a", ignore=shutil.ignore_patterns("artifacts", "lds*"))
    shutil.copytree(micro_run.path, tmp_path / "b", ignore=shutil.ignore_patterns("artifacts", "lds*"))
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    flags = ["--method", "ekfac", "--train-draws", "4", "--preview-draws", "1", "--factor-draws", "2", "--quiet"]
    assert main(["build", "--run", str(a.path), *flags]) == 0  # in this process: the reference
    out_a = json.loads(capsys.readouterr().out)
    settings = influence.InfluenceSettings(method="ekfac", train_draws=4, preview_draws=1, factor_draws=2,
                                           query_draws=2)
    assert cli_build.build_store(b, settings, pool, num_shards=2).complete
    assert cli_build.build_curvature(b, settings, pool, num_shards=2).exists()
    assert cli_build.store_dir(b, settings).name == Path(out_a["store"]).name
    assert store_files(Path(out_a["store"])) == store_files(cli_build.store_dir(b, settings))
    assert out_a["settings"]["preview_draws"] == 1 and settings.round_draws == [1, 1, 1, 1]
    # attribute finds both artifacts and builds neither again
    monkeypatch.setattr(influence, "build_gradient_store", lambda *a, **k: pytest.fail("store rebuilt"))
    monkeypatch.setattr("attribution.store.build_gradient_store", lambda *a, **k: pytest.fail("store rebuilt"))
    monkeypatch.setattr("attribution.curvature.build_factors", lambda *a, **k: pytest.fail("factors rebuilt"))
    influence.clear_cache()
    sa = influence.influence_scores(a, "queries", [0, 1], settings)
    influence.clear_cache()
    sb = influence.influence_scores(b, "queries", [0, 1], settings)
    assert torch.allclose(sa, sb, rtol=1e-3, atol=1e-6 * float(sa.abs().max()))
    # bad input: one-line errors
    assert main(["build", "--run", str(a.path), "--what", "nonsense"]) == 2
    assert main(["build", "--run", str(a.path), "--shards", "0"]) == 2
    assert main(["build", "--run", str(a.path), "--executor", "ray", "--ray-address", "nohost"]) == 2
    err = capsys.readouterr().err
    assert "--what takes store" in err and "--shards must be" in err and "--ray-address takes" in err
