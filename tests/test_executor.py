"""Executors: local vs Ray give identical LDS ground truth and counterfactuals; a killed Ray
worker is retried with identical results; units land on both nodes of a two-node cluster;
bad --ray-address is a one-line error. Ray runs as a simulated two-node cluster on this machine
(``ray.cluster_utils.Cluster``, 1 CPU per node = 2 CPUs), started once for the module."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from attribution import evaluation as ev
from attribution.errors import UserError
from attribution.executor import LocalExecutor, RayExecutor, configured_executor, make_executor
from attribution.runs import Run

JOB = dict(num_subsets=2, num_seeds=2, steps=4, warmup_steps=2, measurements=("loss", "lt:10"), num_draws=4)


def _copy(run: Run, dest: Path) -> Run:
    shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns("lds", "lds_truth", "artifacts", "jobs"))
    return Run(dest)


def _truth(run: Run, job) -> dict:
    return {k: (g.values, g.base) for k, g in ev.collect_ground_truth(run, job, save=False).items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]), k
        assert torch.equal(a[k][1], b[k][1]), k


@pytest.fixture(scope="module")
def reference(micro_run, tmp_path_factory):
    """The in-process (default) LDS job: the reference every executor must reproduce."""
    run = _copy(micro_run, tmp_path_factory.mktemp("ref") / "run")
    job = ev.LDSJob(**JOB)
    assert ev.run_lds_job(run, job, device=torch.device("cpu"))
    return run, job, _truth(run, job)


@pytest.fixture(scope="module")
def pool():
    with LocalExecutor(2) as ex:
        yield ex


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    from attribution.executor import _package_dir

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"py_modules": [_package_dir()]})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_local_pool_gives_identical_ground_truth(reference, pool, tmp_path):
    ref_run, job, truth = reference
    run = _copy(ref_run, tmp_path / "run")
    assert ev.run_lds_job(run, job, executor=pool)
    _assert_same(_truth(run, job), truth)
    # the models themselves are bit-identical to the in-process ones
    for m, r in ev.units(job):
        assert Run(ev.unit_dir(run, job, m, r)).model_fingerprint() == \
            Run(ev.unit_dir(ref_run, job, m, r)).model_fingerprint()


def test_ray_on_two_nodes_gives_identical_ground_truth_and_resumes(reference, ray_cluster, tmp_path):
    ref_run, job, truth = reference
    run = _copy(ref_run, tmp_path / "run")
    ex = RayExecutor()
    assert not ex._owns  # joined the running cluster
    assert ev.run_lds_job(run, job, executor=ex)
    _assert_same(_truth(run, job), truth)
    import ray

    placed = set(ex.placements.values())
    assert placed == {n["NodeID"] for n in ray.nodes() if n["Alive"]} and len(placed) == 2  # both nodes took units
    # resumable: a re-run submits nothing; a new measurement re-uses the retrained models
    calls = []
    orig = ex.run
    ex.run = lambda fn, items, *a, **k: calls.append(len(items)) or orig(fn, items, *a, **k)
    assert ev.run_lds_job(run, job, executor=ex)
    assert calls == []
    job2 = ev.LDSJob(**{**JOB, "measurements": ("loss", "lt:10", "lt:3")})
    mtime = (ev.unit_dir(run, job, 0, 0) / "model").stat().st_mtime_ns
    assert ev.run_lds_job(run, job2, executor=ex)
    assert calls == [5]  # full model + 4 units, measuring only
    assert (ev.unit_dir(run, job, 0, 0) / "model").stat().st_mtime_ns == mtime
    ex.close()


def test_app_entry_point_submits_to_the_configured_cluster(reference, ray_cluster, tmp_path, monkeypatch):
    from attribution.retrain_units import ground_truth_job

    ref_run, job, truth = reference
    run = Run(tmp_path / "run")
    shutil.copytree(ref_run.path, run.path)  # with its retrained models: only the new measurement runs
    job2 = ev.LDSJob(**{**JOB, "measurements": ("loss", "lt:3")})
    monkeypatch.setenv("ATTRIBUTION_RAY_ADDRESS", ray_cluster.address)
    out = ground_truth_job(run, job2)
    assert out["executor"].startswith("ray executor") and "2 node(s)" in out["executor"]
    saved = ev.find_ground_truth(run, "loss")
    assert torch.equal(saved.values, truth["loss"][0]) and saved.meta["draw_stream"] == ev.TRUTH_STREAM
    assert ev.find_ground_truth(run, "lt:3").values.shape == (2, 2, 3)


def _ray_task_pids(name: str) -> list[int]:
    """Processes whose title is ``ray::<name>`` (a Ray worker running that task)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{name}"):
                out.append(int(d.name))
    return out


def test_killed_ray_worker_is_retried_with_identical_results(micro_run, ray_cluster, tmp_path):
    job = ev.LDSJob(**{**JOB, "steps": 150, "num_subsets": 1, "num_seeds": 1, "measurements": ("loss",)})
    ref = _copy(micro_run, tmp_path / "ref")
    assert ev.run_lds_job(ref, job, device=torch.device("cpu"))
    run = _copy(micro_run, tmp_path / "run")
    ex = RayExecutor()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("ok", ev.run_lds_job(run, job, executor=ex)))
    worker.start()
    killed = None
    end = time.time() + 120
    while killed is None and time.time() < end and worker.is_alive():
        pids = _ray_task_pids("retrain_unit")
        if pids:
            time.sleep(1.0)  # mid-task (importing or training: 150 steps take longer)
            if pids[0] in _ray_task_pids("retrain_unit"):  # still running its unit
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    worker.join(300)
    assert killed is not None, "no Ray worker was seen running a unit"
    assert result.get("ok") is True
    _assert_same(_truth(run, job), _truth(ref, job))
    ex.close()


def test_counterfactual_on_ray_equals_local(micro_run, ray_cluster, tmp_path):
    scores = {"oracle": torch.arange(3 * 16, dtype=torch.float64).view(3, 16)}
    job = ev.CounterfactualJob(query_indices=(0, 2), k=4, steps=3, num_draws=4)
    a = ev.run_counterfactual(_copy(micro_run, tmp_path / "a"), job, scores, device=torch.device("cpu"))
    ex = RayExecutor()
    b = ev.run_counterfactual(_copy(micro_run, tmp_path / "b"), job, scores, executor=ex)
    ex.close()
    assert a["methods"] == b["methods"] and a["reference_values"] == b["reference_values"]
    assert a["args"]["draw_stream"] == ev.TRUTH_STREAM and "queries_digest" in a["args"]


def test_bad_ray_address_is_a_one_line_error(micro_run, tmp_path, capsys):
    from attribution.cli import main
    from attribution.runs import save_tensors

    for addr in ("127.0.0.1:1", "ray://127.0.0.1:1", "nonsense"):
        t0 = time.time()
        assert main(["lds", "--run", str(micro_run.path), "--steps", "1", "--ray-address", addr]) == 2
        assert time.time() - t0 < 30
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    save_tensors(tmp_path / "s.safetensors", {"scores": torch.zeros(3, 16)})
    assert main(["counterfactual", "--run", str(micro_run.path), "--scores", f"a={tmp_path / 's.safetensors'}",
                 "--queries", "0", "-k", "1", "--ray-address", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot reach a Ray cluster at 127.0.0.1:1")


def test_executor_factory_and_configured_address(monkeypatch):
    assert make_executor("local").inline and not make_executor("local", workers=2).inline
    with pytest.raises(UserError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(UserError, match="needs --executor ray"):
        make_executor("local", "auto")
    monkeypatch.delenv("ATTRIBUTION_RAY_ADDRESS", raising=False)
    assert isinstance(configured_executor(), LocalExecutor)
    monkeypatch.setenv("ATTRIBUTION_RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(UserError, match="cannot reach a Ray cluster"):
        configured_executor()


def test_unit_errors_surface_as_user_errors(micro_run, pool, tmp_path):
    run = _copy(micro_run, tmp_path / "run")
    job = ev.LDSJob(**{**JOB, "measurements": ("lt:5000",)})  # timestep out of range, found in the worker
    with pytest.raises(UserError, match="timestep must lie"):
        ev.run_lds_job(run, job, executor=pool)
