"""Long jobs (training, sampling, building influence / baseline scores) outside the app's script run.

A job is ``(kind, run directory, args)``; its id is a hash of the three, so starting the same job
again gets the same id and resumes: the work itself is resumable (training checkpoints, artifacts
cached in the run directory), the job only drives it. Its state lives in one JSON file,
``<run>/jobs/<id>.json``, written atomically (``runs.write_json``)::

    {"id", "kind", "args", "status": running|done|failed|cancelled|interrupted,
     "stage", "done", "total", "eta_s", "started", "updated", "stage_started",
     "error", "worker": {"pid", "mode": thread|process}, "result": {...}}

Score-producing jobs also save their scores ``[Q, N]`` to ``<run>/jobs/<id>.result.safetensors``.

Workers make no streamlit calls. Three ways to run one:
- ``start(..., mode="thread")``: a daemon thread of the current process (the app: imports warm);
- ``start(..., mode="process")``: a detached ``python -m attribution.jobs exec`` process;
- ``execute(...)``: in the foreground (the CLI: ``python -m attribution.jobs run KIND --run DIR``).
Cancel with :func:`cancel`: a marker file the worker's progress callback checks (and SIGINT for a
process worker); the work stops at the next progress report, keeping what was built.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from attribution.errors import UserError
from attribution.runs import config_hash, read_json, write_json

FINAL = ("done", "failed", "cancelled", "interrupted")
_THREADS: dict[str, threading.Thread] = {}  # job id -> worker thread of this process
_LOCK = threading.Lock()


class JobCancelled(Exception):
    """Raised inside a worker when its cancel marker appears."""


# ----------------------------------------------------------------------------- paths and ids


def job_id(kind: str, args: dict) -> str:
    return f"{kind}-{config_hash({'kind': kind, 'args': args})}"


def jobs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "jobs"


def job_path(run_dir: Path, jid: str) -> Path:
    return jobs_dir(run_dir) / f"{jid}.json"


def result_path(run_dir: Path, jid: str) -> Path:
    return jobs_dir(run_dir) / f"{jid}.result.safetensors"


def _cancel_marker(run_dir: Path, jid: str) -> Path:
    return jobs_dir(run_dir) / f"{jid}.cancel"


# ----------------------------------------------------------------------------- progress


class JobProgress:
    """Callable progress reporter persisted to the job's JSON file.

    ``progress(done, total, stage)`` (influence / baselines style). Writes at most every
    ``min_interval`` seconds, and always on a stage change or when a stage completes. Raises
    :class:`JobCancelled` once the cancel marker exists.
    """

    def __init__(self, run_dir: Path, jid: str, state: dict, min_interval: float = 0.5):
        self.run_dir, self.jid, self.state = Path(run_dir), jid, state
        self.min_interval = min_interval
        self._last_write = 0.0

    def cancelled(self) -> bool:
        return _cancel_marker(self.run_dir, self.jid).exists()

    def __call__(self, done: float, total: float, stage: str = "") -> None:
        self.report(done, total, stage)
        if self.cancelled():
            raise JobCancelled(f"job {self.jid} cancelled")

    def report(self, done: float, total: float, stage: str = "") -> None:
        """Record progress without the cancellation check."""
        now = time.time()
        s = self.state
        stage = str(stage or s.get("stage") or self.state["kind"])
        changed = stage != s.get("stage")
        if changed:
            s["stage_started"] = now
            s.setdefault("stages", []).append(stage)
        s.update(stage=stage, done=float(done), total=float(total), updated=now)
        elapsed = now - s["stage_started"]
        s["eta_s"] = elapsed / done * (total - done) if done > 0 and total >= done else None
        if changed or done >= total or now - self._last_write >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        self._last_write = time.time()
        write_json(job_path(self.run_dir, self.jid), self.state)


# ----------------------------------------------------------------------------- job kinds


def _query_images(run, query_set: str, query_indices: list[int]):
    tensors, _ = run.load_samples(query_set)
    images = tensors["images"]
    bad = [i for i in query_indices if not 0 <= i < len(images)]
    if bad:
        raise UserError(f"query indices {bad} are out of range for sample set {query_set!r} ({len(images)} samples)")
    return images[list(query_indices)]


def _kind_train(run_dir: Path, args: dict, progress: JobProgress) -> dict:
    from attribution.data import DatasetSpec
    from attribution.train import TrainConfig, train_run

    cfg = TrainConfig(**args.get("train", {}))
    spec = DatasetSpec(**args.get("dataset", {}))

    def on_step(step, total, loss):
        progress.state["loss"] = float(loss)
        progress.report(step, total, "train")  # cancellation goes through should_stop (checkpoints)

    finished = {"flag": False}

    def should_stop() -> bool:
        finished["flag"] = progress.cancelled()
        return finished["flag"]

    train_run(run_dir, spec, cfg, progress=on_step, should_stop=should_stop)
    if finished["flag"]:
        raise JobCancelled("training stopped at a checkpoint; start the job again to resume")
    return {"steps": cfg.steps, "final_loss": progress.state.get("loss")}


def _kind_sample(run_dir: Path, args: dict, progress: JobProgress) -> dict:
    import torch

    from attribution.ddpm import default_device, sample
    from attribution.runs import open_run

    n, seed = int(args.get("n", 16)), int(args.get("seed", 0))
    if not 1 <= n <= 10_000:
        raise UserError(f"number of samples must be between 1 and 10000, got {n}")
    run = open_run(run_dir)
    device = torch.device(args["device"]) if args.get("device") else default_device()
    unet = run.load_unet(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample(unet, run.schedule(), n, gen, return_trajectory=bool(args.get("trajectory")),
                 batch_size=int(args.get("batch_size", 64)),
                 progress=lambda d, t: progress(d, t, f"sample on {device}"))
    name = args.get("name") or f"seed{seed}_n{n}"
    run.save_samples(name, out.images, out.trajectory, {"seed": seed, "n": n, "device": str(device)})
    return {"name": name, "n": n, "device": str(device)}


def _kind_influence(run_dir: Path, args: dict, progress: JobProgress):
    from attribution.influence import InfluenceSettings, influence_scores
    from attribution.runs import open_run

    run = open_run(run_dir)
    settings = InfluenceSettings(**args["settings"])
    scores = influence_scores(run, args["query_set"], list(args["query_indices"]), settings, progress=progress)
    return {"shape": list(scores.shape)}, scores


def _kind_baseline(run_dir: Path, args: dict, progress: JobProgress):
    from attribution import baselines
    from attribution.runs import open_run

    run = open_run(run_dir)
    images = _query_images(run, args["query_set"], list(args["query_indices"]))
    method = args["method"]
    if method in ("trak", "dtrak"):
        kw = {k: args[k] for k in ("proj_dim", "damping") if args.get(k) is not None}
        scores = baselines.trak_scores(run, images, variant=method, progress=progress, **kw)
    elif method == "clip":
        scores = baselines.clip_scores(run, images, progress=progress)
    elif method == "pixel":
        scores = baselines.pixel_scores(run, images)
    else:
        raise UserError(f"unknown baseline {method!r}; choose trak, dtrak, clip or pixel")
    return {"shape": list(scores.shape)}, scores


def _kind_regenerate(run_dir: Path, args: dict, progress: JobProgress) -> dict:
    from attribution.regen_job import run_job

    return run_job(run_dir, args, progress)


KINDS: dict[str, Callable] = {
    "train": _kind_train,
    "sample": _kind_sample,
    "influence": _kind_influence,
    "baseline": _kind_baseline,
    "regenerate": _kind_regenerate,
}


# ----------------------------------------------------------------------------- running


def _new_state(kind: str, args: dict, jid: str, mode: str) -> dict:
    now = time.time()
    return {"id": jid, "kind": kind, "args": args, "status": "running", "stage": "starting",
            "stages": [], "done": 0.0, "total": 1.0, "eta_s": None, "started": now, "updated": now,
            "stage_started": now, "error": None, "result": None,
            "worker": {"pid": os.getpid(), "mode": mode}}


def execute(kind: str, run_dir: Path, args: dict, mode: str = "foreground") -> dict:
    """Run a job in this thread to completion (or failure / cancellation); returns its final state.

    Never raises for the job's own errors: they are recorded in ``state["error"]`` (a
    :class:`UserError`'s message as is; anything else with its type name).
    """
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
    run_dir = Path(run_dir)
    jid = job_id(kind, args)
    _cancel_marker(run_dir, jid).unlink(missing_ok=True)
    state = _new_state(kind, args, jid, mode)
    progress = JobProgress(run_dir, jid, state)
    progress.flush()
    try:
        out = KINDS[kind](run_dir, args, progress)
        if isinstance(out, tuple):
            from attribution.runs import save_tensors

            out, scores = out
            save_tensors(result_path(run_dir, jid), {"scores": scores.float()}, {"job": jid, "args": args})
        state.update(status="done", result=out, eta_s=0.0)
    except (JobCancelled, KeyboardInterrupt):
        state.update(status="cancelled", error="cancelled; start the same job again to resume")
    except UserError as exc:
        state.update(status="failed", error=str(exc), error_type=type(exc).__name__)
    except Exception as exc:  # recorded, not swallowed: the page shows it, the CLI exits non-zero
        import traceback

        state.update(status="failed", error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
                     traceback=traceback.format_exc())
    state["updated"] = time.time()
    progress.flush()
    _cancel_marker(run_dir, jid).unlink(missing_ok=True)
    return state


def start(kind: str, run_dir: Path, args: dict, mode: str = "thread") -> str:
    """Start a job in the background (unless the same job is already running); returns its id."""
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
    if mode not in ("thread", "process"):
        raise UserError(f"mode must be 'thread' or 'process', got {mode!r}")
    run_dir = Path(run_dir)
    jid = job_id(kind, args)
    with _LOCK:
        current = status(run_dir, jid)
        if current is not None and current["status"] == "running":
            return jid
        # Write "running" now, so a poll right after start() never sees the previous final state.
        write_json(job_path(run_dir, jid), _new_state(kind, args, jid, mode))
        if mode == "thread":
            t = threading.Thread(target=execute, args=(kind, run_dir, args, "thread"),
                                 name=f"job-{jid}", daemon=True)
            _THREADS[jid] = t
            t.start()
        else:
            jobs_dir(run_dir).mkdir(parents=True, exist_ok=True)
            log = open(jobs_dir(run_dir) / f"{jid}.log", "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "attribution.jobs", "exec", kind, "--run", str(run_dir),
                 "--args", json.dumps(args)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            )
            state = _new_state(kind, args, jid, "process")
            state["worker"]["pid"] = proc.pid
            write_json(job_path(run_dir, jid), state)
    return jid


def _worker_alive(state: dict) -> bool:
    worker = state.get("worker") or {}
    if worker.get("pid") == os.getpid():
        if worker.get("mode") == "thread":
            t = _THREADS.get(state["id"])
            return t is not None and t.is_alive()
        return True  # a foreground job of this very process
    return _pid_alive(worker.get("pid"))


def _pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))  # zombie = gone


def status(run_dir: Path, jid: str) -> Optional[dict]:
    """The job's state, or None if it never ran. A "running" job whose worker is gone reads as
    "interrupted" (start it again to resume)."""
    p = job_path(run_dir, jid)
    if not p.exists():
        return None
    try:
        state = read_json(p)
    except UserError:
        return None
    if state.get("status") == "running" and not _worker_alive(state):
        state["status"] = "interrupted"
        state["error"] = "the worker stopped (server restart or crash); start the job again to resume"
    return state


def list_jobs(run_dir: Path) -> list[dict]:
    """All jobs of a run, newest first."""
    d = jobs_dir(run_dir)
    states = [status(run_dir, p.stem) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return sorted((s for s in states if s), key=lambda s: s.get("started", 0), reverse=True)


def cancel(run_dir: Path, jid: str) -> bool:
    """Ask a running job to stop; True if it was running."""
    state = status(run_dir, jid)
    if state is None or state["status"] != "running":
        return False
    write_json(_cancel_marker(run_dir, jid), {"requested": time.time()})
    worker = state.get("worker") or {}
    if worker.get("mode") == "process" and worker.get("pid") != os.getpid():
        try:
            os.kill(int(worker["pid"]), signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass
    return True


def wait(run_dir: Path, jid: str, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Block until the job reaches a final state (or ``timeout`` seconds pass); returns its state."""
    deadline = time.time() + timeout
    while True:
        state = status(run_dir, jid)
        if state is not None and state["status"] in FINAL:
            return state
        if time.time() > deadline:
            raise TimeoutError(f"job {jid} still running after {timeout:.0f} s")
        time.sleep(poll)


def load_result(run_dir: Path, jid: str):
    """Scores ``[Q, N]`` saved by a finished score job, or None."""
    from attribution.runs import load_tensors

    p = result_path(run_dir, jid)
    return load_tensors(p)[0]["scores"] if p.exists() else None


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def describe(state: dict) -> str:
    """One line: ``stage: done/total (pct) — about ETA left``."""
    total = state.get("total") or 1
    done = state.get("done") or 0
    pct = 100.0 * done / total if total else 0.0
    line = f"{state.get('stage')}: {done:g}/{total:g} ({pct:.0f}%)"
    if state.get("status") == "running":
        line += f" — about {format_eta(state.get('eta_s'))} left"
    else:
        line += f" — {state.get('status')}"
    return line


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attribution.jobs",
                                     description="Run, start, watch and cancel long jobs of a run directory.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "run a job in the foreground (Ctrl-C cancels; run again to resume)"),
                        ("start", "start a job as a detached background process"),
                        ("exec", argparse.SUPPRESS)):
        p = sub.add_parser(name, help=help_)
        p.add_argument("kind", choices=list(KINDS))
        p.add_argument("--run", required=True, help="run directory (for train: the output directory)")
        p.add_argument("--args", default="{}", help="job arguments as JSON")
    p = sub.add_parser("list", help="list a run's jobs")
    p.add_argument("--run", required=True)
    p = sub.add_parser("cancel", help="cancel a running job")
    p.add_argument("--run", required=True)
    p.add_argument("id")
    a = parser.parse_args(argv)
    try:
        if a.cmd in ("run", "start", "exec"):
            try:
                args = json.loads(a.args)
            except json.JSONDecodeError as exc:
                raise UserError(f"--args must be JSON ({exc})") from None
            if a.cmd == "start":
                print(start(a.kind, Path(a.run), args, mode="process"))
                return 0
            state = execute(a.kind, Path(a.run), args, mode="process" if a.cmd == "exec" else "foreground")
            print(json.dumps({k: state[k] for k in ("id", "status", "error", "result")}))
            return 0 if state["status"] == "done" else 2
        if a.cmd == "list":
            for s in list_jobs(Path(a.run)):
                print(f"{s['id']}  {s['status']:<11}  {describe(s)}")
            return 0
        ok = cancel(Path(a.run), a.id)
        print("cancel requested" if ok else f"job {a.id} is not running")
        return 0 if ok else 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
