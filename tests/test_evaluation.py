"""LDS math, ground-truth jobs (resume), counterfactual retraining, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from attribution.errors import UserError
from attribution.lds import (
    GroundTruth,
    cross_lds,
    damping_sweep,
    draw_subset_masks,
    exact_retraining_lds,
    keep_indices,
    lds,
    model_correlation,
    predicted_vs_actual,
    rowwise_spearman,
    subset_predictions,
    top_k_removal,
)


def _synthetic(Q=6, N=40, M=30, R=3, noise=0.0, seed=0):
    """Ground truth that is exactly additive in per-example effects ``true_tau`` [Q, N]."""
    g = torch.Generator().manual_seed(seed)
    true_tau = torch.randn(Q, N, generator=g, dtype=torch.float64)
    masks = draw_subset_masks(N, M, 0.5, seed)
    base = torch.randn(Q, generator=g, dtype=torch.float64)
    effect = (true_tau @ (~masks).double().T) / N  # [Q, M]
    values = base[None, None, :] + effect.T[None] + noise * torch.randn(R, M, Q, generator=g, dtype=torch.float64)
    return true_tau, GroundTruth("loss", masks, values, base)


# ----------------------------------------------------------------------------- LDS math


def test_subset_masks_size_seed_and_extension():
    a = draw_subset_masks(101, 5, 0.5, seed=3)
    assert a.shape == (5, 101) and (a.sum(1) == 50).all()
    assert torch.equal(draw_subset_masks(101, 8, 0.5, seed=3)[:5], a)  # extendable
    assert not torch.equal(draw_subset_masks(101, 5, 0.5, seed=4), a)
    with pytest.raises(UserError):
        draw_subset_masks(10, 3, 1.0)


def test_lds_is_one_for_scores_linear_in_truth_and_near_zero_for_random():
    true_tau, gt = _synthetic()
    res = lds(3.0 * true_tau + 7.0, gt)  # positive affine map: removed-sum is affine in the truth
    assert res.mean == pytest.approx(1.0, abs=1e-12)
    assert res.per_query.shape == (6,)
    assert lds(-true_tau, gt).mean == pytest.approx(-1.0, abs=1e-12)
    # random scores: mean over many queries ~ 0 (sd of one Spearman over 30 points ~ 0.19)
    _, big = _synthetic(Q=200, N=60, M=30, seed=1)
    rnd = lds(torch.randn(200, 60, generator=torch.Generator().manual_seed(5)), big)
    assert abs(rnd.mean) < 0.05
    assert rnd.sem == pytest.approx(float(rnd.per_query.std() / math.sqrt(200)), rel=1e-9)


def test_sign_convention_removing_proponents_raises_prediction():
    N = 20
    scores = torch.zeros(1, N, dtype=torch.float64)
    scores[0, :5] = 1.0  # proponents: removing them is predicted to raise the loss
    masks = torch.ones(2, N, dtype=torch.bool)
    masks[0, :5] = False  # subset 0 removes the proponents
    masks[1, 10:15] = False  # subset 1 removes neutral examples
    pred = subset_predictions(scores, masks)
    assert pred[0, 0] == 5.0 and pred[0, 1] == 0.0
    gt = GroundTruth("loss", masks, torch.tensor([[[2.0], [1.0]]]), torch.tensor([1.0]))
    pva = predicted_vs_actual(scores, gt)
    assert pva["predicted"][0, 0] == pytest.approx(5.0 / N) and pva["actual"][0, 0] == pytest.approx(1.0)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 25), generator=g).double()
    b = torch.randn(4, 25, generator=g, dtype=torch.float64)
    ours = rowwise_spearman(a, b)
    for q in range(4):
        assert ours[q].item() == pytest.approx(spearmanr(a[q], b[q]).correlation, abs=1e-12)
    assert math.isnan(rowwise_spearman(torch.ones(1, 5), torch.randn(1, 5))[0])


def _dattri_semantics(score_train_test, gt_values, indices):
    """dattri.metric.lds re-stated: sum of scores over KEPT indices, Spearman per test sample."""
    from scipy.stats import spearmanr

    s = score_train_test.T
    sums = torch.stack([s[:, idx].sum(dim=1) for idx in indices])  # [M, Q]
    return torch.tensor([spearmanr(sums[:, q], gt_values[:, q]).correlation for q in range(s.shape[0])])


def test_agrees_with_dattri_lds_semantics_on_random_inputs():
    g = torch.Generator().manual_seed(2)
    Q, N, M = 5, 30, 12
    masks = draw_subset_masks(N, M, 0.5, 7)
    gt = GroundTruth("loss", masks, torch.randn(2, M, Q, generator=g, dtype=torch.float64))
    tau = torch.randn(Q, N, generator=g, dtype=torch.float64)
    idx = torch.tensor(keep_indices(masks))
    ref = _dattri_semantics(-tau.T, gt.values.mean(0), idx)  # dattri: helpfulness = -tau, sum over kept
    assert torch.allclose(lds(tau, gt).per_query, ref, atol=1e-12)
    assert not torch.allclose(lds(-tau, gt).per_query, ref, atol=1e-3)  # the sign matters


def test_agrees_with_installed_dattri():
    """dattri (the test extra) is imported, not skipped when missing: a skipped check checks nothing."""
    from dattri import metric
    g = torch.Generator().manual_seed(3)
    Q, N, M = 4, 30, 10
    masks = draw_subset_masks(N, M, 0.5, 1)
    gt = GroundTruth("loss", masks, torch.randn(1, M, Q, generator=g, dtype=torch.float64))
    tau = torch.randn(Q, N, generator=g, dtype=torch.float64)
    theirs, _ = metric.lds(-tau.T, (gt.values.mean(0), torch.tensor(keep_indices(masks))))
    assert torch.allclose(lds(tau, gt).per_query, theirs.double(), atol=1e-10)
    assert not torch.allclose(lds(-tau, gt).per_query, theirs.double(), atol=1e-3)  # the sign matters


def test_exact_retraining_oracle_holds_the_seed_out_of_the_mean():
    """Seeds that are pure independent noise: each seed against the mean of the OTHER seeds
    correlates ~0, whereas a leaky mean that includes the held-out seed correlates ~1/sqrt(R)-ish
    (0.7 for R = 2). The oracle must equal the hand-computed hold-out reference (scipy)."""
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(8)
    Q, N, M = 8, 30, 40
    masks = draw_subset_masks(N, M, 0.5, 2)
    for R in (2, 3):
        values = torch.randn(R, M, Q, generator=g, dtype=torch.float64)
        gt = GroundTruth("loss", masks, values)
        ex = exact_retraining_lds(gt)

        def ref(leaky: bool) -> torch.Tensor:
            per_q = []
            for q in range(Q):
                rhos = []
                for r in range(R):
                    pool = values[:, :, q] if leaky else torch.cat([values[:r, :, q], values[r + 1:, :, q]])
                    rhos.append(spearmanr(values[r, :, q], pool.mean(0)).correlation)
                per_q.append(sum(rhos) / R)
            return torch.tensor(per_q, dtype=torch.float64)

        held_out, leaky = ref(False), ref(True)
        torch.testing.assert_close(ex.per_query, held_out, rtol=0, atol=1e-12)
        assert abs(ex.mean) < 0.2 and float(leaky.mean()) > 0.5, (R, ex.mean, float(leaky.mean()))
        assert float((ex.per_query - leaky).abs().min()) > 0.1  # every query tells the two apart


def test_exact_retraining_damping_sweep_cross_lds_and_model_correlation():
    true_tau, noisy = _synthetic(Q=8, N=40, M=40, R=3, noise=0.02, seed=4)
    ex = exact_retraining_lds(noisy)
    assert 0.5 < ex.mean < 1.0  # seed noise keeps it below 1
    single = GroundTruth("loss", noisy.masks, noisy.values[:1])
    with pytest.raises(UserError):
        exact_retraining_lds(single)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(true_tau.shape, generator=g, dtype=torch.float64)
    # damping controls the noise level: small damping = large error, best is the largest
    rows, best = damping_sweep(lambda d: true_tau + noise / d, [0.1, 1.0, 100.0], noisy)
    assert best["damping"] == 100.0 and rows[0]["mean"] < rows[2]["mean"]
    rows, best = damping_sweep(lambda d: true_tau * float("nan") if d < 1 else true_tau, [0.5, 2.0], noisy)
    assert "error" in rows[0] and best["damping"] == 2.0

    r, c, mat = cross_lds({"good": true_tau, "bad": -true_tau}, {"loss": noisy})
    assert r == ["good", "bad"] and c == ["loss"] and mat[0, 0] > 0.5 > mat[1, 0]

    mc = model_correlation(noisy)
    assert mc["matrix"].shape == (1 + 3 * 40, 1 + 3 * 40) and mc["labels"][0] == "full data"
    assert mc["min_offdiag"] > 0.9  # between-query spread dominates the small subset effects


def test_top_k_and_bad_inputs():
    s = torch.tensor([[0.1, 5.0, -2.0, 3.0]])
    assert top_k_removal(s, 2).tolist() == [[1, 3]]
    _, gt = _synthetic(Q=2, N=40)
    with pytest.raises(UserError):
        lds(torch.full((2, 40), float("nan")), gt)
    with pytest.raises(UserError):
        lds(torch.zeros(2, 39), gt)
    with pytest.raises(UserError):
        lds(torch.zeros(3, 40), gt)


def test_lds_is_fast():
    import time

    _, gt = _synthetic(Q=200, N=5000, M=100, R=5)
    scores = torch.randn(200, 5000, dtype=torch.float64)
    t0 = time.perf_counter()
    lds(scores, gt)
    assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------- jobs


def fake_measure(unet, schedule, images, text, num_draws, seed, trajectory=None, batch_size=256):
    """A cheap deterministic function of the weights and the query images: ``[Q]`` float64."""
    w = torch.cat([p.detach().flatten() for p in unet.parameters()]).double()
    return images.double().flatten(1).sum(1) * 1e-3 + w.abs().mean() + len(text) + 0.001 * seed


def test_lds_job_resumes_without_redoing_finished_models(micro_run, monkeypatch):
    from attribution import evaluation as ev

    job = ev.LDSJob(num_subsets=2, num_seeds=2, steps=3, measurements=("loss", "lt:10"), num_draws=4)
    calls = []
    def counting_train(out, *a, **k):
        calls.append(out.name)
        return ev._fit_subset(out, *a, **k)

    # interrupt after the first model finishes: should_stop is polled every step
    stop = {"now": False}

    def progress(done, total, stage):
        if stage == "train" and done >= 3:
            stop["now"] = True

    ok = ev.run_lds_job(micro_run, job, progress=progress, should_stop=lambda: stop["now"],
                        measure_fn=fake_measure, train_fn=counting_train, device=torch.device("cpu"))
    assert not ok
    finished = [u for u in ev.units(job) if (ev.unit_dir(micro_run, job, *u) / "model").exists()]
    assert finished == [(0, 0)]
    mtime = (ev.unit_dir(micro_run, job, 0, 0) / "model").stat().st_mtime_ns

    calls.clear()
    assert ev.run_lds_job(micro_run, job, measure_fn=fake_measure, train_fn=counting_train,
                          device=torch.device("cpu"))
    assert sorted(calls) == ["subset_0_seed_1", "subset_1_seed_0", "subset_1_seed_1"]
    assert (ev.unit_dir(micro_run, job, 0, 0) / "model").stat().st_mtime_ns == mtime

    # a second call redoes nothing, neither training nor measurements
    calls.clear()
    measured = []
    ev.run_lds_job(micro_run, job, measure_fn=lambda *a, **k: measured.append(1) or fake_measure(*a, **k),
                   train_fn=counting_train, device=torch.device("cpu"))
    assert calls == [] and measured == []

    truth = ev.collect_ground_truth(micro_run, job)
    gt = truth["lt:10"]
    assert gt.values.shape == (2, 2, 3) and gt.base.shape == (3,)
    assert gt.masks.shape == (2, 16) and (gt.masks.sum(1) == 8).all()
    # different seeds of the same subset are different models
    assert not torch.allclose(gt.values[0], gt.values[1])
    # the subset model really trained on its subset only
    cfg = __import__("json").loads((ev.unit_dir(micro_run, job, 1, 0) / "config.json").read_text())
    assert cfg["subset"] == torch.nonzero(gt.masks[1]).flatten().tolist()
    assert cfg["train"]["steps"] == 3 and cfg["train"]["seed"] == ev.unit_seed(1, 0, paired=True)
    # paired seeds: seed r of every subset shares its training seed; seeds differ
    cfg0 = __import__("json").loads((ev.unit_dir(micro_run, job, 0, 0) / "config.json").read_text())
    cfg01 = __import__("json").loads((ev.unit_dir(micro_run, job, 0, 1) / "config.json").read_text())
    assert cfg0["train"]["seed"] == cfg["train"]["seed"] != cfg01["train"]["seed"]
    assert len({ev.unit_seed(m, r) for m in range(3) for r in range(2)}) == 6  # independent: all distinct
    loaded = ev.find_ground_truth(micro_run, "lt:10")
    assert torch.equal(loaded.values, gt.values) and torch.equal(loaded.masks, gt.masks)
    assert ev.read_progress(micro_run, job)[0]["stage"] == "measure"


def test_sharded_jobs_split_units_without_overlap():
    from attribution.evaluation import LDSJob, units

    job = LDSJob(num_subsets=5, num_seeds=2)
    parts = [set(units(job, (i, 3))) for i in range(3)]
    assert sum(len(p) for p in parts) == 10 and len(set.union(*parts)) == 10
    with pytest.raises(UserError):
        units(job, (3, 3))


def test_steps_rule_halves_the_run_steps(micro_run):
    from attribution.evaluation import LDSJob, retrain_steps

    assert retrain_steps(micro_run, LDSJob()) == round(0.5 * micro_run.config["train"]["steps"])
    assert retrain_steps(micro_run, LDSJob(steps=7)) == 7


def test_counterfactual_removes_top_k_and_reports_changes(micro_run):
    from attribution.evaluation import CounterfactualJob, counterfactual_removals, run_counterfactual

    n = 16
    scores = {"oracle": torch.arange(3 * n, dtype=torch.float64).view(3, n)}
    job = CounterfactualJob(query_indices=(0, 2), k=4, steps=2, num_draws=4)
    rem = counterfactual_removals(scores, job, n)
    assert rem["oracle"].tolist() == [[15, 14, 13, 12]] * 2 and set(rem) == {"oracle", "random"}
    report = run_counterfactual(micro_run, job, scores, measure_fn=fake_measure, device=torch.device("cpu"))
    assert set(report["methods"]) == {"oracle", "random"}
    assert len(report["methods"]["oracle"]["per_query"]) == 2
    # removing data changes the weights, hence the (fake) measurement
    assert all(v != 0.0 for v in report["methods"]["oracle"]["per_query"])
    with pytest.raises(UserError):
        counterfactual_removals({"bad": torch.zeros(3, n - 1)}, job, n)


# ----------------------------------------------------------------------------- CLI


def _cli(argv):
    from attribution.cli import main

    return main(argv)


def test_cli_lds_lds_score_and_errors(micro_run, tmp_path, capsys):
    import json

    from attribution.runs import save_tensors

    argv = ["lds", "--run", str(micro_run.path), "--subsets", "3", "--seeds", "2", "--steps", "2",
            "--warmup-steps", "1", "--measurements", "loss,LT=10", "--draws", "2"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "ground truth (2 measurements, 3 subsets x 2 seeds)" in out
    scores = tmp_path / "s.safetensors"
    save_tensors(scores, {"scores": torch.randn(3, 16)})
    assert _cli(["lds-score", "--run", str(micro_run.path), "--measurement", "lt:10", str(scores)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["subsets"] == 3 and res["seeds"] == 2 and "exact retraining" in res["lds"]
    assert -1.0 <= res["lds"][str(scores)]["mean"] <= 1.0
    # bad input: one-line errors, exit code 2
    assert _cli(["lds", "--run", str(micro_run.path), "--measurements", "nonsense"]) == 2
    assert _cli(["lds-score", "--run", str(micro_run.path), "--measurement", "elbo", str(scores)]) == 2
    assert _cli(["lds", "--run", str(micro_run.path), "--alpha", "1.5", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown measurement" in err and "no LDS ground truth" in err and "alpha" in err


@pytest.mark.slow
def test_cli_lds_with_two_worker_processes(micro_run, capsys):
    """A pool of two single-threaded processes trains the units; the parent writes and collects."""
    from attribution import evaluation as ev

    argv = ["lds", "--run", str(micro_run.path), "--subsets", "2", "--seeds", "2", "--steps", "2",
            "--warmup-steps", "1", "--measurements", "loss", "--draws", "2", "--workers", "2", "--subset-seed", "9"]
    assert _cli(argv) == 0
    job = ev.LDSJob(num_subsets=2, num_seeds=2, steps=2, warmup_steps=1, measurements=("loss",), num_draws=2,
                    subset_seed=9)
    assert all((ev.unit_dir(micro_run, job, m, r) / "model" / "config.json").exists() for m, r in ev.units(job))
    assert [p["stage"] for p in ev.read_progress(micro_run, job)] == ["retrain and measure"]
    assert ev.collect_ground_truth(micro_run, job, save=False)["loss"].values.shape == (2, 2, 3)


# ----------------------------------------------------------------------------- reproducibility nits (issue 15)


def test_ground_truth_draws_have_their_own_stream(micro_run):
    """Query q is measured with keys TRUTH_OFFSET + q: never training example q's draws, and the
    stream is named in the measurement key and the stored metadata."""
    from attribution import evaluation as ev
    from attribution.measurements import measurement_values, parse_measurement

    unet, schedule = micro_run.load_unet(), micro_run.schedule()
    images = micro_run.load_samples("queries")[0]["images"]
    got = ev._default_measure(unet, schedule, images, "loss", 4, 0)
    m = parse_measurement("loss")
    assert torch.equal(got, measurement_values(unet, schedule, images, m, 4, 0, offset=ev.TRUTH_OFFSET))
    legacy = measurement_values(unet, schedule, images, m, 4, 0)  # keys 0..Q-1 = training examples' keys
    assert not torch.allclose(got, legacy)
    from attribution.influence import QUERY_OFFSET

    assert ev.TRUTH_OFFSET != QUERY_OFFSET and ev.TRUTH_OFFSET > 10 * micro_run.config["train"]["steps"]
    job = ev.LDSJob(num_subsets=1, num_seeds=1, steps=1, measurements=("loss",), num_draws=2)
    key = ev.measurement_key(job, "loss", "abcd")
    assert key.endswith(f"_abcd_{ev.TRUTH_STREAM}") and ev.measurement_meta(job, "loss")["draw_stream"] == ev.TRUTH_STREAM


def test_counterfactual_measurements_are_keyed_by_the_query_set(micro_run, tmp_path):
    import shutil

    from attribution import evaluation as ev
    from attribution.runs import Run

    shutil.copytree(micro_run.path, tmp_path / "run", ignore=shutil.ignore_patterns("lds", "artifacts"))
    run = Run(tmp_path / "run")
    scores = {"oracle": torch.arange(3 * 16, dtype=torch.float64).view(3, 16)}
    job = ev.CounterfactualJob(query_indices=(0,), k=2, steps=1, num_draws=2)
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return fake_measure(*a, **k)

    first = ev.run_counterfactual(run, job, scores, measure_fn=counting, device=torch.device("cpu"))
    n_first = len(calls)
    ev.run_counterfactual(run, job, scores, measure_fn=counting, device=torch.device("cpu"))
    assert len(calls) == n_first  # cached
    q, meta = run.load_samples("queries")
    run.save_samples("queries", 0.5 * q["images"], q.get("trajectory"), meta)  # a redrawn query set
    second = ev.run_counterfactual(run, job, scores, measure_fn=counting, device=torch.device("cpu"))
    assert len(calls) == 2 * n_first  # measured again, not read from the old query set's files
    assert first["args"]["queries_digest"] != second["args"]["queries_digest"]
    assert first["reference_values"] != second["reference_values"]


def test_shipped_legacy_ground_truth_stays_loadable_and_says_its_stream():
    from pathlib import Path

    from attribution import evaluation as ev
    from attribution.runs import Run

    demo = Run(Path(__file__).resolve().parents[1] / "demo" / "run")
    rows = ev.list_ground_truth(demo)
    assert rows and all(r["draw_stream"] == ev.LEGACY_STREAM for r in rows)
    gt = ev.find_ground_truth(demo, "loss")
    assert gt.meta["draw_stream"] == ev.LEGACY_STREAM and gt.num_seeds == 2
    assert (demo.path / "lds_truth" / "README.md").read_text().count("legacy") >= 1
