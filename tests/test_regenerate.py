"""Counterfactual regeneration: exact noise recovery, reproduction with the original model, the
retrain-and-regenerate job (resumable, sharded), its job kind and its CLI command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from attribution import jobs
from attribution.errors import UserError
from attribution.regen_job import (RegenJob, collect_report, list_reports, load_report, plan, progress_of,
                                   removal_sets, run_regeneration)
from attribution.regenerate import RemovalMethod, image_distances, recover_noise, regenerate


@pytest.fixture(scope="module")
def regen_run(tmp_path_factory):
    """`tiny` preset, 32 digits at 8x8, 150 steps: enough that its samples stay inside [-1, 1]
    (the 20- and 30-step fixtures' samples are clamped to all +-1, so a removal could not show),
    and 3 queries with trajectories."""
    from attribution.data import DatasetSpec
    from attribution.ddpm import sample
    from attribution.train import TrainConfig, train_run

    cfg = TrainConfig(preset="tiny", steps=150, batch_size=16, lr=2e-3, warmup_steps=5, checkpoint_every=150, seed=0)
    run = train_run(tmp_path_factory.mktemp("regen") / "tiny150", DatasetSpec(source="mnist5k", limit=32, resolution=8),
                    cfg, device=torch.device("cpu"))
    out = sample(run.load_unet(), run.schedule(), 3, torch.Generator().manual_seed(0), return_trajectory=True)
    run.save_samples("queries", out.images, out.trajectory, {"seed": 0, "n": 3})
    return run


@pytest.fixture(scope="module")
def micro_copy(micro_run, tmp_path_factory):
    """A private copy of micro_run (16 digits, 20 steps: cheap retraining for the job mechanics)."""
    from attribution.runs import Run

    dst = tmp_path_factory.mktemp("regen_micro") / "micro"
    shutil.copytree(micro_run.path, dst)
    return Run(dst)


def test_recovered_noise_is_the_sampling_noise_and_reproduces_the_query(regen_run):
    """Exact reference: ddpm.sample's own z stream (same generator seed as the fixture)."""
    unet, schedule = regen_run.load_unet(), regen_run.schedule()
    tensors, _ = regen_run.load_samples("queries")
    traj = tensors["trajectory"]
    noise = recover_noise(unet, schedule, traj)
    T, n = schedule.T, traj.shape[1]
    assert noise.shape == (T, n, 1, 8, 8)
    assert torch.count_nonzero(noise[-1]) == 0  # sigma_0 = 0: the last step adds no noise
    # the z that ddpm.sample drew: x_T first, then one z per step (generator seeded 0, one batch)
    gen = torch.Generator().manual_seed(0)
    torch.randn((n, 1, 8, 8), generator=gen)
    z = torch.stack([torch.randn((n, 1, 8, 8), generator=gen) for _ in range(T)])
    sigma = schedule.sigma2.sqrt().flip(0).float().view(T, 1, 1, 1, 1)  # step s uses t = T - 1 - s
    # equal to float32 rounding of the states
    scale = torch.maximum(traj[1:].abs(), traj[:-1].abs())
    assert ((noise - sigma * z).abs() <= 8 * torch.finfo(torch.float32).eps * scale + 1e-7).all()
    assert (noise[:-1] / sigma[:-1]).std() == pytest.approx(1.0, abs=0.02)
    # regenerating with the original model reproduces the query (to float rounding), also one query
    # at a time from noise recovered in a batch (as the job does)
    again = regenerate(unet, schedule, traj[0], noise)
    assert torch.allclose(again, tensors["images"], atol=1e-5), (again - tensors["images"]).abs().max()
    one = regenerate(unet, schedule, traj[0, 1:2], noise[:, 1:2])
    assert torch.allclose(one, tensors["images"][1:2], atol=1e-5)


def test_image_distances():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[1, 0, 0, 0] = 2.0
    d = image_distances(a, b)
    assert d["l2"].tolist() == [0.0, 2.0]
    assert d["ssim"][0] == pytest.approx(1.0) and d["ssim"][1] < 1.0
    rgb = image_distances(torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1)
    assert rgb["ssim"].shape == (1,) and rgb["ssim"][0] < 0.5
    with pytest.raises(UserError, match="same"):
        image_distances(a, torch.zeros(2, 1, 4, 4))


def test_job_validation():
    job = RegenJob(query_indices=[2, 0], k=3, methods=("pixel", "KFAC"))
    assert job.methods == ("kfac", "pixel", "random")  # enum order, the random control always added
    assert job.query_indices == (2, 0)
    assert RegenJob.from_args(job.to_args()) == job
    for kwargs, msg in (({"query_indices": (), "k": 1}, "at least one query"),
                        ({"query_indices": (0, 0), "k": 1}, "distinct"),
                        ({"query_indices": (0,), "k": 0}, "positive"),
                        ({"query_indices": (0,), "k": 1, "methods": ("nonsense",)}, "unknown removal method")):
        with pytest.raises(UserError, match=msg):
            RegenJob(**kwargs)
    with pytest.raises(UserError, match="measurement"):
        RegenJob(query_indices=(0,), k=1, measurement="bogus")
    with pytest.raises(UserError, match="unknown regeneration argument"):
        RegenJob.from_args({"query_indices": [0], "k": 1, "colour": "red"})
    assert RemovalMethod.parse("D-TRAK".replace("-", "")) == RemovalMethod.DTRAK


def test_plan_shares_a_model_between_equal_kept_sets():
    job = RegenJob(query_indices=(0, 1), k=2, methods=("pixel",))
    removals = {"pixel": [[0, 1], [2, 3]], "random": [[1, 0], [5, 6]]}  # query 0: the same set twice
    units = plan(job, removals, 8)
    assert units[0].uses == (("reference", None),) and units[0].queries == (0, 1) and len(units[0].keep) == 8
    assert len(units) == 4  # reference + 3 distinct kept sets
    shared = next(u for u in units if u.keep == (2, 3, 4, 5, 6, 7))
    assert set(shared.uses) == {("pixel", 0), ("random", 0)} and shared.queries == (0,)


class _CountingTrain:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        from attribution.evaluation import _fit_subset

        self.calls += 1
        return _fit_subset(*args, **kwargs)


JOB = RegenJob(query_indices=(0, 2), k=4, methods=("pixel",), num_draws=8)  # the run's own 20-step recipe


def test_job_retrains_regenerates_and_reports(regen_run):
    train = _CountingTrain()
    stages = []
    report = run_regeneration(regen_run, JOB, progress=lambda d, t, s: stages.append(s), train_fn=train,
                              device=torch.device("cpu"))
    assert train.calls == 5  # reference + 2 queries x (pixel, random)
    assert float(regen_run.load_samples("queries")[0]["trajectory"][-1].abs().max()) < 5  # not diverged
    assert any("recovering" in s for s in stages) and any("regenerating query 2" in s for s in stages)
    assert any("images pixel cosine ranks highest for query 0" in s for s in stages)
    m = report["methods"]
    assert set(m) == {"reference", "pixel", "random"}
    # the same seed and recipe on all the data reproduces the original model, hence the query
    assert max(m["reference"]["l2"]["per_query"]) < 1e-4
    assert min(m["reference"]["ssim"]["per_query"]) > 0.999
    # removing training images changes the regenerated sample and the measurement
    for name in ("pixel", "random"):
        assert min(m[name]["l2"]["per_query"]) > 1e-3
        assert all(v != 0 for v in m[name]["change"]["per_query"])
        assert m[name]["l2"]["sem"] > 0 and len(m[name]["removed"]) == 2 and len(m[name]["removed"][0]) == 4
    # pixel removes the query's nearest training images
    from attribution.baselines import pixel_scores

    images = regen_run.load_samples("queries")[0]["images"][[0, 2]]
    top = torch.topk(pixel_scores(regen_run, images), 4, dim=1).indices
    assert [sorted(r) for r in m["pixel"]["removed"]] == [sorted(r) for r in top.tolist()]
    pair = report["paired"]["pixel - random"]["l2"]
    assert pair["mean"] == pytest.approx(m["pixel"]["l2"]["mean"] - m["random"]["l2"]["mean"])
    # measurement change is relative to the reference model, which equals the original here
    assert report["measurement_reference"] == pytest.approx(report["measurement_original"], abs=1e-6)
    # stored, listed and loadable with its images
    path = list_reports(regen_run)[-1]
    saved, images = load_report(path)
    assert saved["methods"]["pixel"]["l2"] == m["pixel"]["l2"]
    assert set(images) == {"original", "reference", "pixel", "random"} and images["pixel"].shape == (2, 1, 8, 8)
    l2 = (images["pixel"] - images["original"]).flatten(1).norm(dim=1)
    assert l2.tolist() == pytest.approx(m["pixel"]["l2"]["per_query"])
    assert progress_of(regen_run, JOB) == (5, 5)
    # resuming a finished job trains nothing
    again = _CountingTrain()
    assert run_regeneration(regen_run, JOB, train_fn=again)["methods"]["pixel"] == saved["methods"]["pixel"]
    assert again.calls == 0


def test_job_stops_and_resumes_and_shards(micro_copy):
    regen_run = micro_copy
    job = RegenJob(query_indices=(1,), k=3, methods=("random",), num_draws=4)  # the reference + 1 model
    calls = {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 3

    assert run_regeneration(regen_run, job, should_stop=stop_soon) is None
    done, total = progress_of(regen_run, job)
    assert total == 2 and done < total
    with pytest.raises(UserError, match="not finished"):
        collect_report(regen_run, job)
    assert run_regeneration(regen_run, job, shard=(0, 2), report=False) is None
    assert run_regeneration(regen_run, job, shard=(1, 2), report=False) is None
    report = collect_report(regen_run, job)
    assert report["queries"] == [1] and set(report["methods"]) == {"reference", "random"}


def test_removal_errors(micro_copy):
    regen_run = micro_copy
    with pytest.raises(UserError, match="k must lie"):
        removal_sets(regen_run, RegenJob(query_indices=(0,), k=16, methods=("pixel",)))
    with pytest.raises(UserError, match="out of range"):
        removal_sets(regen_run, RegenJob(query_indices=(7,), k=2, methods=("pixel",)))
    images = regen_run.load_samples("queries")[0]["images"][:1]
    regen_run.save_samples("no-traj", images, None, {"seed": 0})
    with pytest.raises(UserError, match="no trajectories"):
        removal_sets(regen_run, RegenJob(query_indices=(0,), k=2, methods=("pixel",), query_set="no-traj"))


def test_job_kind_runs_in_the_background(regen_run):
    args = RegenJob(query_indices=(0, 2), k=4, methods=("pixel",), num_draws=8).to_args()
    jid = jobs.start("regenerate", regen_run.path, args)
    state = jobs.wait(regen_run.path, jid, timeout=120)
    assert state["status"] == "done", state
    assert state["result"]["report"].endswith(".json")
    assert state["result"]["methods"]["pixel"]["l2"] > 0
    bad = jobs.execute("regenerate", regen_run.path, {"query_indices": [0], "k": 4, "methods": ["nope"]})
    assert bad["status"] == "failed" and "unknown removal method" in bad["error"]


def test_cli(regen_run, capsys):
    from attribution import cli_regenerate
    from attribution.cli import main
    from attribution.trak import DEFAULT_RELATIVE_DAMPING

    # the --trak-damping help spells out the library's defaults (the CLI does not import torch for --help)
    assert cli_regenerate.TRAK_DAMPING_HELP == ", ".join(f"{v} {r:g}" for v, r in DEFAULT_RELATIVE_DAMPING.items())

    rc = main(["regenerate", "--run", str(regen_run.path), "--queries", "0,2", "--k", "4", "--methods", "pixel",
               "--draws", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["methods"]["pixel"]["l2"]["mean"] > 0 and out["report"].endswith(".json")
    for argv, msg in ((["--queries", "0", "--k", "4", "--methods", "kfac,bogus"], "unknown removal method"),
                      (["--queries", "9", "--k", "4", "--methods", "pixel"], "out of range"),
                      (["--queries", "a,b", "--k", "4"], "comma-separated"),
                      (["--queries", "0", "--k", "0"], "positive")):
        rc = main(["regenerate", "--run", str(regen_run.path), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1, err
