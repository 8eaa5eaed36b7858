"""Background jobs: progress persisted as JSON, cancel, resume, failure reporting, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attribution import jobs
from attribution.runs import open_run, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_copy(micro_run, tmp_path_factory):
    from attribution.runs import Run

    dst = tmp_path_factory.mktemp("jobs") / "micro"
    # without the artifacts other tests may already have built in the shared fixture run, so the
    # jobs here really build (and report) their stages whatever the test order
    shutil.copytree(micro_run.path, dst, ignore=shutil.ignore_patterns("artifacts", "jobs"))
    return Run(dst)


def test_sample_job_records_progress_and_result(run_copy):
    args = {"n": 1, "seed": 5, "trajectory": True, "name": "job1"}
    jid = jobs.start("sample", run_copy.path, args)
    assert jid == jobs.job_id("sample", args)
    assert jobs.start("sample", run_copy.path, args) == jid  # already running: same job, not a second one
    state = jobs.wait(run_copy.path, jid, timeout=120)
    assert state["status"] == "done", state
    assert state["stage"] == "sample on cpu" and state["done"] == state["total"] == 1000
    assert state["result"] == {"name": "job1", "n": 1, "device": "cpu"}
    on_disk = read_json(jobs.job_path(run_copy.path, jid))  # persisted, not only in memory
    assert on_disk["status"] == "done" and on_disk["eta_s"] == 0.0
    tensors, meta = run_copy.load_samples("job1")
    assert tensors["trajectory"].shape[:2] == (1001, 1) and meta["seed"] == 5
    assert "done" in jobs.describe(state) and "1000/1000" in jobs.describe(state)


def test_progress_reports_eta_and_stage_changes(tmp_path):
    state = jobs._new_state("sample", {}, "x", "foreground")
    p = jobs.JobProgress(tmp_path, "x", state, min_interval=0.0)
    p(0, 10, "a")
    time.sleep(0.05)
    p(5, 10, "a")
    eta = state["eta_s"]
    assert eta is not None and 0.03 < eta < 5.0  # remaining 5 steps at the measured rate
    p(1, 4, "b")
    assert state["stages"] == ["a", "b"] and state["stage"] == "b"
    assert read_json(jobs.job_path(tmp_path, "x"))["done"] == 1.0
    write_json(jobs._cancel_marker(tmp_path, "x"), {})
    with pytest.raises(jobs.JobCancelled):
        p(2, 4, "b")


def test_cancel_stops_a_job_and_restart_runs_it_again(run_copy):
    args = {"n": 200, "seed": 1, "trajectory": False, "name": "never"}
    jid = jobs.start("sample", run_copy.path, args)
    deadline = time.time() + 60
    while (jobs.status(run_copy.path, jid) or {}).get("done", 0) < 5:
        assert time.time() < deadline, "the job never reported progress"
        time.sleep(0.05)
    assert jobs.cancel(run_copy.path, jid)
    state = jobs.wait(run_copy.path, jid, timeout=60)
    assert state["status"] == "cancelled" and 0 < state["done"] < state["total"]
    assert "never" not in run_copy.sample_names()
    assert not jobs.cancel(run_copy.path, jid)  # nothing left to cancel


def test_train_job_cancel_keeps_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "trained"
    args = {"dataset": {"source": "mnist5k", "limit": 8, "resolution": 8},
            "train": {"preset": "micro", "steps": 40, "batch_size": 4, "checkpoint_every": 1000, "seed": 0}}
    jid = jobs.start("train", out, args)
    deadline = time.time() + 90
    while (jobs.status(out, jid) or {}).get("done", 0) < 3:
        assert time.time() < deadline, "training never reported progress"
        time.sleep(0.05)
    jobs.cancel(out, jid)
    state = jobs.wait(out, jid, timeout=90)
    assert state["status"] == "cancelled", state
    stopped_at = int(state["done"])
    assert 3 <= stopped_at < 40
    assert (out / "train_state" / "state.pt").exists()  # checkpoint written on cancel
    jid2 = jobs.start("train", out, args)  # the same job again: resumes from the checkpoint
    assert jid2 == jid
    # The resumed job's first report is past the checkpoint, never step 1.
    first = None
    deadline = time.time() + 120
    while True:
        s = jobs.status(out, jid2)
        if s["stage"] == "train" and first is None:
            first = s["done"]
        if s["status"] not in jobs.ACTIVE:  # queued (admission) or running
            break
        assert time.time() < deadline
        time.sleep(0.02)
    assert s["status"] == "done", s
    assert first is not None and first > stopped_at
    assert (out / "model" / "config.json").exists()


def test_failures_are_recorded_with_actionable_message(run_copy):
    state = jobs.execute("sample", run_copy.path, {"n": 0})
    assert state["status"] == "failed"
    assert "between 1 and 10000" in state["error"] and state["error_type"] == "UserError"
    with pytest.raises(jobs.UserError, match="unknown job kind"):
        jobs.start("nope", run_copy.path, {})


def test_dead_worker_reads_as_interrupted(run_copy, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    state = jobs._new_state("sample", {"n": 3}, "sample-dead", "process")
    state["worker"]["pid"] = proc.pid
    write_json(jobs.job_path(run_copy.path, "sample-dead"), state)
    assert jobs.status(run_copy.path, "sample-dead")["status"] == "interrupted"
    assert any(s["id"] == "sample-dead" for s in jobs.list_jobs(run_copy.path))


def test_cli_runs_a_job_in_the_foreground_and_lists_it(run_copy):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = json.dumps({"n": 0})
    out = subprocess.run([sys.executable, "-m", "attribution.jobs", "run", "sample", "--run", str(run_copy.path),
                          "--args", args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 2
    assert json.loads(out.stdout)["status"] == "failed"
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "attribution.jobs", "list", "--run", str(run_copy.path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "failed" in out.stdout


def test_influence_job_saves_the_engine_scores(run_copy):
    influence = pytest.importorskip("attribution.influence")
    settings = {"method": "kfac", "fisher": "mc", "kfac_type": "expand", "damping": 1e-6, "measurement": "loss",
                "train_draws": 4, "query_draws": 4, "factor_draws": 2}
    args = {"settings": settings, "query_set": "queries", "query_indices": [0, 2]}
    state = jobs.execute("influence", run_copy.path, args)
    assert state["status"] == "done", state
    assert state["result"]["shape"] == [2, 16]
    assert len(state["result"]["stability"]) == 2  # the engine's reliability summary per query
    assert any("factors" in s.lower() for s in state["stages"])
    assert any("training gradients" in s.lower() for s in state["stages"])
    # its plan named every stage up front, and each one ran: query gradients, factors, pilot, store
    kinds = [e["kind"] for e in state["plan"]]
    assert kinds[0] == "query_gradients" and "factors" in kinds and kinds[-1] == "store", kinds
    assert all(e.get("seconds") is not None for e in state["plan"]), state["plan"]
    saved = jobs.load_result(run_copy.path, state["id"])
    direct = influence.influence_scores(run_copy, "queries", [0, 2], influence.InfluenceSettings(**settings))
    assert saved.shape == (2, 16)
    assert torch.allclose(saved, direct.float(), rtol=1e-5, atol=1e-8)
    bad = jobs.execute("influence", run_copy.path, {**args, "query_indices": [99]})
    assert bad["status"] == "failed" and "out of range" in bad["error"]


def test_lds_job_builds_ground_truth_on_the_configured_executor(run_copy, monkeypatch):
    """The app's "lds" job kind: ground truth on the local executor (no ATTRIBUTION_RAY_ADDRESS),
    saved in the run and found by the LDS page's loader; a second start reuses every model."""
    from attribution.evaluation import list_ground_truth

    monkeypatch.delenv("ATTRIBUTION_RAY_ADDRESS", raising=False)
    args = {"subsets": 2, "seeds": 1, "draws": 4, "measurements": ["loss"]}
    state = jobs.execute("lds", run_copy.path, args)
    assert state["status"] == "done", state.get("error")
    # the shared fixture run may already hold other tests' ground truths: look at this job's own
    truths = [t for t in list_ground_truth(open_run(run_copy.path))
              if t["path"].startswith(state["result"]["truth_dir"])]
    assert [t["measurement"] for t in truths] == ["loss"] and truths[0]["num_subsets"] == 2
    again = jobs.execute("lds", run_copy.path, args)
    assert again["status"] == "done" and again["result"]["truth_dir"] == state["result"]["truth_dir"]


def test_auto_mode_builds_in_a_process_and_rescores_in_a_thread(run_copy, tmp_path, monkeypatch):
    """The app's mode: a job that builds artifacts runs as a process of its own (in a thread it would
    share the server's GIL with every page rerun); a re-score on cached artifacts stays a thread."""
    from attribution.runs import Run

    monkeypatch.setenv("ATTRIBUTION_JOB_MODE", "auto")
    assert jobs.app_mode() == "auto"
    dst = tmp_path / "auto"
    shutil.copytree(run_copy.path, dst, ignore=shutil.ignore_patterns("artifacts", "jobs"))
    settings = {"method": "kfac", "damping": 1e-4, "train_draws": 4, "query_draws": 4, "factor_draws": 1}
    build = {"settings": settings, "query_set": "queries", "query_indices": [0]}
    jid = jobs.start("influence", dst, build, mode=jobs.app_mode())
    state = jobs.wait(dst, jid, timeout=600)
    assert state["status"] == "done", state.get("error")
    assert state["worker"]["mode"] == "process" and state["builds"]
    rescore = {**build, "settings": {**settings, "damping": 1e-2}}
    jid2 = jobs.start("influence", Run(dst).path, rescore, mode=jobs.app_mode())
    state2 = jobs.wait(dst, jid2, timeout=600)
    assert state2["status"] == "done" and state2["worker"]["mode"] == "thread" and state2["builds"] == []
    monkeypatch.setenv("ATTRIBUTION_JOB_MODE", "fast")
    with pytest.raises(Exception, match="ATTRIBUTION_JOB_MODE"):
        jobs.app_mode()
