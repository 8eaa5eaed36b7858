"""Many sessions, one run (issue 13): safe first loads, builds that block nobody else, one build per
artifact, the cancel rule, and the admission rule itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from attribution import jobs
from attribution.job_schedule import why_wait

ROOT = Path(__file__).resolve().parents[1]

# What a page does first in a fresh server (app.py -> _common -> attribute.py), from many
# session threads at once: import the package, open the run, load the model and the data, ready
# the engine, ask it what is cached. diffusers' lazy import used to fail here ("cannot import
# name 'UNet2DModel'") when two threads got to it at the same time; the engine's first cache fill
# (model, then schedule) let a second thread see the model without the schedule (KeyError).
FIRST_LOADS = textwrap.dedent("""
    import sys, threading, traceback
    run_dir, n = sys.argv[1], int(sys.argv[2])
    barrier = threading.Barrier(n)
    errors = []

    def session():
        try:
            barrier.wait()
            from attribution.runs import open_run
            run = open_run(run_dir)
            run.load_unet()
            run.model_fingerprint()
            run.dataset()
            from attribution import influence
            from attribution.job_kinds import warm_engine
            warm_engine(run)  # what every page's require_model() does
            influence.influence_status(run, "queries", [0], influence.InfluenceSettings())
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=session) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{len(errors)} errors")
    if errors:
        print(errors[0])
        sys.exit(1)
""")


def _fresh_interpreters(run_dir: Path, times: int, threads: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    failures = []
    for _ in range(times):
        out = subprocess.run([sys.executable, "-c", FIRST_LOADS, str(run_dir), str(threads)], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=300)
        if out.returncode != 0:
            failures.append(out.stdout[-1500:] + out.stderr[-1500:])
    return failures


def test_first_loads_from_many_threads_in_a_fresh_interpreter(micro_run):
    """A fresh server, eight sessions arriving at once: zero errors (the unguarded import failed
    in every one of six tries with four threads; the slow tier repeats this 20 times)."""
    failures = _fresh_interpreters(micro_run.path, times=1, threads=8)
    assert not failures, failures[0]


@pytest.mark.slow
def test_first_loads_from_many_threads_many_times(micro_run):
    failures = _fresh_interpreters(micro_run.path, times=20, threads=8)
    assert not failures, f"{len(failures)} of 20 fresh interpreters failed:\n{failures[0]}"


def test_load_unet_reads_once_and_hands_out_copies(micro_run):
    from attribution import runs

    a, b = micro_run.load_unet(), micro_run.load_unet()
    assert a is not b and next(a.parameters()) is not next(b.parameters())
    a.double()  # a caller casting its copy leaves the next caller's untouched
    assert next(micro_run.load_unet().parameters()).dtype.is_floating_point
    assert next(micro_run.load_unet().parameters()).dtype != next(a.parameters()).dtype
    key = [k for k in runs._UNETS if k[0] == str(micro_run.model_dir.resolve())]
    assert len(key) == 1  # one load for the weights version, whatever the number of callers


# ----------------------------------------------------------------------------- admission rule (pure)


def _job(jid, status="running", builds=(), needs=(), priority="user", queued_at=0.0):
    return {"id": jid, "kind": "influence", "status": status, "builds": list(builds), "needs": list(needs),
            "priority": priority, "queued_at": queued_at, "label": f"settings of {jid}"}


def test_why_wait_one_build_per_artifact_and_rescores_never_wait():
    me = _job("me", status="queued", queued_at=5.0)
    builder = _job("b", builds=["factors ekfac"])
    # needs the artifact another job is building: waits for that very job, says whose it is
    reason, ids = why_wait(me, ["factors ekfac", "store"], [builder], max_builds=2)
    assert ids == ["b"] and "settings of b" in reason
    # nothing to build (a re-score on cached artifacts): runs at once, even with every slot busy
    full = [builder, _job("c", builds=["store"])]
    assert why_wait(me, [], full, max_builds=2) is None
    # a different artifact runs beside the build, until the slots are full
    assert why_wait(me, ["factors kfac"], [builder], max_builds=2) is None
    reason, ids = why_wait(me, ["factors kfac"], full, max_builds=2)
    assert "build slot" in reason and set(ids) == {"b", "c"}


def test_why_wait_background_warmup_yields_to_users():
    bg = _job("w", status="queued", priority="background", queued_at=1.0)
    user_waiting = _job("u", status="queued", needs=["factors kfac"], queued_at=2.0)
    one_builder = [_job("b", builds=["store"])]
    assert why_wait(bg, ["factors x"], one_builder, max_builds=2) is None
    # a user request waiting for the slot goes first
    assert why_wait(bg, ["factors x"], one_builder + [user_waiting], max_builds=2) is not None
    # at most one background build at a time
    assert why_wait(bg, ["factors x"], [_job("w2", builds=["f"], priority="background")], max_builds=3) is not None
    # user jobs: first come, first served for the last slot
    later = _job("me", status="queued", queued_at=3.0)
    assert why_wait(later, ["factors y"], one_builder + [user_waiting], max_builds=2) is not None
    earlier = _job("me", status="queued", queued_at=1.5)
    assert why_wait(earlier, ["factors y"], one_builder + [user_waiting], max_builds=2) is None


# ----------------------------------------------------------------------------- jobs through the real scheduler


class FakeBuilds:
    """A job kind whose builds block until released: ``args = {"name", "needs": [artifact keys]}``."""

    def __init__(self):
        self.built: list[tuple[str, str]] = []  # (artifact, job name): who built what
        self.release: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def needs(self, run_dir, args):
        done = {a for a, _ in self.built}
        return [n for n in args["needs"] if n not in done]

    def run(self, run_dir, args, progress):
        todo = self.needs(run_dir, args)
        progress(0, 1, "fake build")
        if todo:
            ev = self.release.setdefault(args["name"], threading.Event())
            while not ev.wait(0.05):
                progress(0, 1, "fake build")  # checks the cancel marker
        with self.lock:
            self.built += [(a, args["name"]) for a in todo]
        progress(1, 1, "fake build")
        return {"built": todo}

    def plan(self, run_dir, args, needs):
        return [{"name": "fake build", "kind": "fake_build", "units": 1}] if needs else []


@pytest.fixture
def fake(monkeypatch, tmp_path):
    from attribution import job_kinds

    f = FakeBuilds()
    monkeypatch.setitem(job_kinds.KINDS, "fake", job_kinds.JobKind(f.run, f.needs, f.plan))
    monkeypatch.setattr(jobs, "MAX_BUILDS", 2)
    f.dir = tmp_path / "run"
    f.dir.mkdir()
    return f


def _until(pred, timeout=20.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def _args(name, *needs):
    return {"name": name, "needs": list(needs)}


def test_a_build_blocks_only_work_that_needs_its_artifact(fake):
    a = jobs.start("fake", fake.dir, _args("a", "ekfac factors"), owner="session-B", label="EK-FAC, empirical, reduce")
    _until(lambda: jobs.status(fake.dir, a)["status"] == "running")
    # session A: a re-score on cached artifacts finishes while B's build runs
    r = jobs.start("fake", fake.dir, _args("rescore"), owner="session-A")
    assert jobs.wait(fake.dir, r, timeout=20)["status"] == "done"
    assert jobs.status(fake.dir, a)["status"] == "running"
    # another job needing the artifact being built waits for that build, and says for whose
    b = jobs.start("fake", fake.dir, _args("b", "ekfac factors"), owner="session-A")
    _until(lambda: jobs.status(fake.dir, b).get("queued_reason") is not None)
    sb = jobs.status(fake.dir, b)
    assert sb["status"] == "queued" and "EK-FAC, empirical, reduce" in sb["queued_reason"]
    # a build of a different artifact runs beside it
    c = jobs.start("fake", fake.dir, _args("c", "kfac factors"), owner="session-A")
    _until(lambda: jobs.status(fake.dir, c)["status"] == "running")
    fake.release["a"].set()
    fake.release.setdefault("c", threading.Event()).set()
    for jid in (a, b, c):
        assert jobs.wait(fake.dir, jid, timeout=20)["status"] == "done"
    # exactly one job built each artifact; b found it built and only scored
    assert sorted(fake.built) == [("ekfac factors", "a"), ("kfac factors", "c")]
    assert jobs.status(fake.dir, b)["builds"] == [] and jobs.status(fake.dir, b)["result"] == {"built": []}
    assert not jobs.active_jobs(fake.dir)


def test_builds_beyond_the_slots_queue_and_then_run(fake):
    ids = [jobs.start("fake", fake.dir, _args(n, f"artifact {n}")) for n in ("x", "y", "z")]
    _until(lambda: [jobs.status(fake.dir, j)["status"] for j in ids].count("running") == 2)
    queued = [j for j in ids if jobs.status(fake.dir, j)["status"] == "queued"]
    assert len(queued) == 1
    _until(lambda: "slot" in (jobs.status(fake.dir, queued[0]).get("queued_reason") or ""))
    for n in ("x", "y", "z"):
        fake.release.setdefault(n, threading.Event()).set()
    assert all(jobs.wait(fake.dir, j, timeout=20)["status"] == "done" for j in ids)
    assert sorted(a for a, _ in fake.built) == ["artifact x", "artifact y", "artifact z"]


def test_a_session_cancels_only_its_own_job(fake):
    a = jobs.start("fake", fake.dir, _args("mine", "store"), owner="session-B")
    _until(lambda: jobs.status(fake.dir, a)["status"] == "running")
    state = jobs.status(fake.dir, a)
    assert not jobs.may_cancel(state, "session-A") and jobs.may_cancel(state, "session-B")
    assert not jobs.cancel(fake.dir, a, by="session-A")  # another session's job: refused
    time.sleep(0.3)
    assert jobs.status(fake.dir, a)["status"] == "running"
    assert jobs.cancel(fake.dir, a, by="session-B")
    assert jobs.wait(fake.dir, a, timeout=20)["status"] == "cancelled"
    assert fake.built == []


def test_superseded_queued_requests_are_dropped(fake):
    """Slider values the user passed over do not stay queued: the settled one replaces them."""
    a = jobs.start("fake", fake.dir, _args("build", "store"), owner="s1")
    _until(lambda: jobs.status(fake.dir, a)["status"] == "running")
    passed = [jobs.start("fake", fake.dir, _args(f"damping {d}", "store"), owner="s1") for d in (1, 2)]
    other = jobs.start("fake", fake.dir, _args("other session", "store"), owner="s2")
    settled = jobs.start("fake", fake.dir, _args("damping 3", "store"), owner="s1")
    _until(lambda: all(jobs.status(fake.dir, j)["status"] == "queued" for j in passed + [other, settled]))
    dropped = jobs.cancel_superseded(fake.dir, "s1", "fake", keep=settled)
    assert sorted(dropped) == sorted(passed)
    fake.release["build"].set()
    for j in passed:
        assert jobs.wait(fake.dir, j, timeout=20)["status"] == "cancelled"
    assert jobs.wait(fake.dir, settled, timeout=20)["status"] == "done"
    assert jobs.wait(fake.dir, other, timeout=20)["status"] == "done"  # another session's request stays


# ----------------------------------------------------------------------------- estimates


def _demo_plan(p=175_569):
    return [
        {"name": "query gradients", "kind": "query_gradients", "units": 64, "params": p},
        {"name": "EK-FAC pass 1", "kind": "factors", "variant": "mc/expand", "units": 8000, "params": p},
        {"name": "EK-FAC pass 2", "kind": "factors_pass2", "variant": "mc/expand", "units": 8000, "params": p},
        {"name": "store", "kind": "store", "units": 32000, "params": p},
    ]


def _simulate(tracker, stages, slow, t0=1000.0, steps=10, check=None):
    """Feed ``tracker`` progress reports of ``stages`` [(reported name, prior seconds)] running
    ``slow`` times slower than the priors; ``check(t, est, truth_left_total, truth_left_stage)``."""
    durations = [d * slow for _, d in stages]
    t = t0
    for k, ((name, _), dur) in enumerate(zip(stages, durations)):
        for step in range(steps + 1):
            now = t + dur * step / steps
            est = tracker.report(step, steps, name, now=now)
            if check is not None:
                left_stage = dur * (1 - step / steps)
                check(k, step, est, left_stage + sum(durations[k + 1:]), left_stage)
        t += dur
    tracker.close(now=t)
    return t


def test_estimates_follow_stage_names_and_stay_within_2x(tmp_path):
    from attribution.job_estimates import PlanTracker, prior_rate

    plan = _demo_plan()
    priors = [e["units"] * prior_rate(e["kind"], e.get("variant", "")) for e in plan]
    # the engine's old names: both EK-FAC passes under one name (the count restarts at 0)
    stages = [("query gradients (loss)", priors[0]), ("EKFAC factors (mc, expand)", priors[1]),
              ("EKFAC factors (mc, expand)", priors[2]), ("gradient store (loss, 32 draws)", priors[3])]
    seen = []

    def check(k, step, est, truth_total, truth_stage):
        seen.append((k, est["stage_index"], est["num_stages"]))
        # once the first stage (about a second) has shown how fast the machine is, every
        # estimate is within 2x of the truth, though the priors are 3x off
        if k >= 1 and step >= 1:
            assert truth_stage / 2 <= est["stage_left_s"] <= 2 * truth_stage + 1e-6, (k, step, est)
            assert truth_total / 2 <= est["total_left_s"] <= 2 * truth_total + 1e-6, (k, step, est)

    _simulate(PlanTracker(plan, tmp_path), stages, slow=3.0, check=check)
    assert [i for _, i, _ in seen[::11]] == [1, 2, 3, 4]  # "stage k of 4", pass 2 recognised
    assert all(n == 4 for _, _, n in seen)
    assert [round(e["seconds"] / (3.0 * p), 2) for e, p in zip(plan, priors)] == [1.0] * 4

    # the next job on this run starts from the measured rates: right from its first report
    plan2 = _demo_plan()
    tracker = PlanTracker(plan2, tmp_path)
    est = tracker.report(0, 10, "EK-FAC factors, pass 1 of 2: Kronecker factors", now=0.0)
    truth = 3.0 * sum(priors[1:])
    assert truth / 2 <= est["total_left_s"] <= 2 * truth
    assert est["stage_index"] == 2  # the query gradients were cached: found by kind, not order


def test_new_stage_names_and_unknown_stages():
    from attribution.job_estimates import PlanTracker, classify

    assert classify("EK-FAC factors, pass 1 of 2: Kronecker factors") == "factors"
    assert classify("EK-FAC factors, pass 2 of 2: eigenvalue correction") == "factors_pass2"
    assert classify("gradient store (loss, 32 draws)") == "store"
    assert classify("query gradients (elbo)") == "query_gradients"
    tracker = PlanTracker(_demo_plan())
    est = tracker.report(0, 4, "something new", now=0.0)
    assert est["num_stages"] == 5 and est["stage_index"] == 5 and est["total_left_s"] is None


# ----------------------------------------------------------------------------- the Attribute page, two sessions

APP = str(ROOT / "app.py")


@pytest.fixture
def session_app(micro_run, monkeypatch, tmp_path):
    """AppTest sessions of the Attribute page on one private copy of micro_run."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from attribution.runs import Run

    dst = tmp_path / "micro"
    shutil.copytree(micro_run.path, dst, ignore=shutil.ignore_patterns("jobs"))
    monkeypatch.setenv("ATTRIBUTION_RUN", str(dst))
    monkeypatch.setenv("ATTRIBUTION_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ATTRIBUTION_WARMUP", "0")

    def make() -> AppTest:
        at = AppTest.from_file(APP, default_timeout=120).run()
        at.switch_page("app_pages/attribute.py")
        at.query_params["a_b"] = "false"  # baselines: their own tests
        at.run()
        assert at.toggle(key="a_b").value is False
        assert not at.exception, at.exception
        return at

    make.run = Run(dst)
    yield make
    for s in jobs.active_jobs(dst):
        jobs.cancel(dst, s["id"])
        jobs.wait(dst, s["id"], timeout=60)


@pytest.fixture
def held_ekfac(monkeypatch):
    """EK-FAC influence jobs build a (pretend) artifact that takes until ``release()``."""
    from attribution import job_kinds

    real = job_kinds.KINDS["influence"]
    gate = threading.Event()

    def needs(run_dir, args):
        extra = ["held EK-FAC artifact"] if args["settings"]["method"] == "ekfac" and not gate.is_set() else []
        return real.needs(run_dir, args) + extra

    def run(run_dir, args, progress):
        while args["settings"]["method"] == "ekfac" and not gate.wait(0.05):
            progress(0, 1, "EK-FAC factors, pass 1 of 2: Kronecker factors")
        return real.run(run_dir, args, progress)

    monkeypatch.setitem(job_kinds.KINDS, "influence", job_kinds.JobKind(run, needs, real.plan))
    gate.release = gate.set
    yield gate
    gate.set()


def _captions(at) -> list[str]:  # the robustness mark " · ✓" is part of a caption
    return [img.proto.imgs[0].caption for img in at.get("image") if " · τ" in img.proto.imgs[0].caption]


def _settle(at, run_dir, timeout=300):
    for s in jobs.active_jobs(run_dir):
        jobs.wait(run_dir, s["id"], timeout=timeout)
    at.run()
    assert not at.exception, at.exception


def _influence_jobs(run_dir, method):
    return [s for s in jobs.active_jobs(run_dir) if s["kind"] == "influence" and s["args"]["settings"]["method"] == method]


def test_the_last_gallery_stays_marked_updating_while_a_build_runs(session_app, held_ekfac):
    at = session_app()
    _settle(at, session_app.run.path)
    before = _captions(at)
    assert len(before) >= 8
    at.radio(key="a_h").set_value("ekfac").run()
    assert not at.exception, at.exception
    assert _captions(at) == before  # nothing vanishes
    assert any(m.value.endswith("— updating") for m in at.markdown), [m.value for m in at.markdown]
    assert any("Showing the last gallery" in c.value for c in at.caption)
    progress = " ".join(p.proto.text for p in at.get("progress"))
    assert "Stage 1 of" in progress and "EK-FAC" in progress, progress  # the variant actually being built
    held_ekfac.release()
    _settle(at, session_app.run.path)
    assert not any(m.value.endswith("— updating") for m in at.markdown)
    assert at.session_state["attr_last"]["args"]["settings"]["method"] == "ekfac"


def test_two_sessions_a_build_blocks_nobody_and_runs_once(session_app, held_ekfac):
    a, b = session_app(), session_app()
    run_dir = session_app.run.path
    _settle(a, run_dir)
    b.run()
    assert _captions(a) == _captions(b) and _captions(a)
    # B asks for a new variant: its build runs (held), B may cancel it
    b.radio(key="a_h").set_value("ekfac").run()
    (build,) = _influence_jobs(run_dir, "ekfac")
    assert build["owner"] == b.session_state["_session_id"]
    assert [x for x in b.button if x.key == f"cancel_{build['id']}"]
    # meanwhile A re-scores a new damping on cached artifacts: a gallery, no waiting
    a.select_slider(key="a_d").set_value(1e-3).run()
    assert not a.exception, a.exception
    assert _captions(a) and not any(m.value.endswith("— updating") for m in a.markdown)
    assert a.session_state["attr_last"]["args"]["settings"]["damping"] == 1e-3
    rescore = jobs.status(run_dir, jobs.job_id("influence", a.session_state["attr_last"]["args"]))
    assert rescore["worker"]["mode"] == "thread" and rescore["builds"] == []  # no process start-up for it
    assert jobs.status(run_dir, build["id"])["status"] == "running"
    # A asks for B's settings: it joins B's build (one job), read-only, told whose it is
    a.select_slider(key="a_d").set_value(1e-8)
    a.radio(key="a_h").set_value("ekfac").run()
    assert len(_influence_jobs(run_dir, "ekfac")) == 1
    assert not [x for x in a.button if str(x.key).startswith("cancel_")]
    assert any("Started by another session" in c.value and "EK-FAC" in c.value for c in a.caption)
    assert not jobs.cancel(run_dir, build["id"], by=a.session_state["_session_id"])
    held_ekfac.release()
    _settle(a, run_dir)
    b.run()
    assert _captions(a) == _captions(b) and _captions(a)  # identical settings, identical galleries
    done = [s for s in jobs.list_jobs(run_dir) if s["kind"] == "influence"]
    built = [k for s in done for k in jobs.built_artifacts(s)]
    assert len(built) == len(set(built))  # every artifact built by exactly one job


def test_warmup_prepares_the_other_variants_after_the_first_gallery(session_app, monkeypatch):
    from attribution.attribute_text import VARIANTS, variant_label

    monkeypatch.setenv("ATTRIBUTION_WARMUP", "1")
    at = session_app()
    _settle(at, session_app.run.path)
    warm = [s for s in jobs.list_jobs(session_app.run.path) if s["kind"] == "warmup"]
    assert len(warm) == 1 and warm[0]["owner"] == at.session_state["_session_id"]
    state = jobs.wait(session_app.run.path, warm[0]["id"], timeout=600)
    assert state["status"] == "done", state
    step_ids = {jobs.job_id(x["kind"], x["args"]) for x in warm[0]["args"]["steps"] if x["kind"] == "influence"}
    subs = [s for s in jobs.list_jobs(session_app.run.path) if s["id"] in step_ids]
    assert all(s.get("priority") == "background" and s["status"] == "done" for s in subs)
    assert len(subs) == 7  # the other seven Hessian variants
    for s in subs:  # each labelled with the variant it builds
        st_ = s["args"]["settings"]
        assert variant_label(st_["method"], st_["fisher"], st_["kfac_type"]) in s["label"]
    assert {(s["args"]["settings"]["method"], s["args"]["settings"]["fisher"], s["args"]["settings"]["kfac_type"])
            for s in subs} | {("kfac", "mc", "expand")} == set(VARIANTS)
    # any variant now renders at once from the finished job
    at.radio(key="a_h").set_value("ekfac")
    at.radio(key="a_kt").set_value("reduce").run()
    assert not at.exception and _captions(at) and not at.get("progress")


def test_two_real_builds_side_by_side_give_the_serial_scores(micro_run, tmp_path):
    """The engine shares one model per process, so a second influence build starts in a worker
    process of its own and runs beside the first; both give the scores of a serial computation."""
    import torch

    from attribution import influence
    from attribution.runs import Run

    runs = []
    for name in ("together", "serial"):
        shutil.copytree(micro_run.path, tmp_path / name, ignore=shutil.ignore_patterns("artifacts", "jobs"))
        runs.append(Run(tmp_path / name))
    base = {"fisher": "mc", "damping": 1e-4, "measurement": "loss", "train_draws": 16, "query_draws": 4,
            "factor_draws": 4}
    settings = [{**base, "method": "kfac", "kfac_type": "expand"}, {**base, "method": "ekfac", "kfac_type": "reduce"}]
    args = [{"settings": s, "query_set": "queries", "query_indices": [0, 1]} for s in settings]
    first = jobs.start("influence", runs[0].path, args[0])
    _until(lambda: jobs.status(runs[0].path, first)["status"] == "running", timeout=120)
    second = jobs.start("influence", runs[0].path, args[1])
    assert jobs.status(runs[0].path, second)["worker"]["mode"] == "process"
    states = [jobs.wait(runs[0].path, j, timeout=600) for j in (first, second)]
    assert [s["status"] for s in states] == ["done", "done"], [s.get("error") for s in states]
    assert states[0]["worker"]["mode"] == "thread" and states[1]["worker"]["mode"] == "process"
    influence.clear_cache()
    for jid, s in zip((first, second), settings):
        ref = influence.influence_scores(runs[1], "queries", [0, 1], influence.InfluenceSettings(**s))
        got = jobs.load_result(runs[0].path, jid)
        assert torch.allclose(got, ref.float(), rtol=1e-4, atol=1e-6 * float(ref.abs().max())), (s, got, ref)


def test_the_progress_bar_never_falls_back(tmp_path):
    """EK-FAC's second pass counts from 0 again; the job's bar (overall fraction) keeps rising."""
    state = jobs._new_state("influence", {}, "x", "foreground")
    p = jobs.JobProgress(tmp_path, "x", state, min_interval=0.0)
    p.set_plan(_demo_plan())
    bars, labels = [], []
    for name, steps in (("query gradients (loss)", 2), ("EKFAC factors (mc, expand)", 4),
                        ("EKFAC factors (mc, expand)", 4), ("gradient store (loss, 32 draws)", 4)):
        for d in range(steps + 1):
            p(d, steps, name)
            bars.append(state["overall_fraction"])
            labels.append((state["stage_index"], state["stage_label"]))
    assert bars == sorted(bars) and bars[-1] == 1.0
    assert (3, "EK-FAC pass 2") in labels and labels[-1] == (4, "store")
    assert "stage 4 of 4" in jobs.describe({**state, "status": "running"})


def test_store_rounds_are_weighed_by_their_draws():
    from attribution.job_estimates import work_fraction

    entry = {"kind": "store", "segments": [2, 2, 4, 4, 8, 8]}  # 28 draws in six rounds of N rows each
    n = 100
    assert work_fraction(entry, 2 * n, 6 * n) == pytest.approx(4 / 28)  # two rounds = 4 of 28 draws
    assert work_fraction(entry, 4.5 * n, 6 * n) == pytest.approx((12 + 4) / 28)
    assert work_fraction(entry, 6 * n, 6 * n) == 1.0
    assert work_fraction({"kind": "factors"}, 3, 12) == 0.25


def test_one_refinement_grows_the_shared_store_for_every_setting(monkeypatch, tmp_path):
    """The store does not depend on the variant, damping or measurement: while one background
    refinement grows it, a gallery for other settings starts no second one (which would only queue
    behind it and crowd the job list); settings with another store still get their own."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from app_pages import _attribute_jobs as aj
    from attribution.influence import InfluenceSettings

    started = []
    monkeypatch.setattr(aj, "warmup_enabled", lambda: True)
    monkeypatch.setattr(aj, "session_id", lambda: "me")
    monkeypatch.setattr(aj.jobs, "start", lambda kind, run_dir, args, **kw: started.append(args))
    monkeypatch.setattr(aj.jobs, "status", lambda run_dir, jid: None)
    running = asdict(InfluenceSettings())
    monkeypatch.setattr(aj.jobs, "active_jobs", lambda run_dir: [
        {"kind": "influence", "status": "running", "args": {"settings": running, "rounds": InfluenceSettings().rounds}}])
    run = SimpleNamespace(path=tmp_path)
    common = {"query_set": "queries", "query_indices": [0], "model": "m"}
    other_variant = asdict(InfluenceSettings(method="ekfac", kfac_type="reduce", damping=1e-6))
    aj.start_refinement(run, {"settings": other_variant, **common})
    assert started == []
    other_store = asdict(InfluenceSettings(train_draws=64))
    aj.start_refinement(run, {"settings": other_store, **common})
    assert len(started) == 1 and started[0]["rounds"] == InfluenceSettings(train_draws=64).rounds


def test_store_estimates_count_each_rounds_rewrite(micro_run):
    """A store round rewrites its half of the store besides computing its draws, so a preview of
    two one-draw rounds costs far more per draw than a big round: the plan weighs each round as
    its draws plus STORE_ROUND_OVERHEAD_DRAWS, and the priors then match both ends measured on
    the demo run (1,000 images: preview 19.8 s in bench/results/first_gallery.md; the 256-draw
    store ~776 CPU s in bench/results/gallery_demo.md) within 1.5x, where draws alone missed the
    preview 3x."""
    from attribution.influence import InfluenceSettings, run_hflip
    from attribution.job_estimates import DEMO_PARAMS, DEMO_PIXELS, prior_rate
    from attribution.job_kinds import STORE_ROUND_OVERHEAD_DRAWS, _plan_influence, _training_size, artifact_keys

    settings = InfluenceSettings(train_draws=8, preview_draws=1, factor_draws=1, query_draws=4)
    key = artifact_keys("queries", settings, run_hflip(micro_run))["store"]
    args = {"settings": settings.to_dict(), "query_set": "queries", "query_indices": [0], "rounds": 2}
    (entry,) = [e for e in _plan_influence(micro_run.path, args, [key]) if e["kind"] == "store"]
    n = _training_size(micro_run)
    assert entry["segments"] == [1 + STORE_ROUND_OVERHEAD_DRAWS] * 2 and entry["units"] == n * sum(entry["segments"])

    rate = prior_rate("store", num_params=DEMO_PARAMS, pixels=DEMO_PIXELS)
    preview = 1000 * 2 * (1 + STORE_ROUND_OVERHEAD_DRAWS) * rate
    full = 1000 * sum(d + STORE_ROUND_OVERHEAD_DRAWS for d in InfluenceSettings().round_draws) * rate
    assert 19.8 / 1.5 <= preview <= 19.8 * 1.5, preview
    assert 776 / 1.5 <= full <= 776 * 1.5, full
