"""Long jobs (training, sampling, building influence / baseline scores) outside the app's script run.

A job is ``(kind, run directory, args)``; its id is a hash of the three, so starting the same job
again gets the same id: a session asking for a job that is queued or running joins it, and a
finished one is resumed (the work itself is resumable: training checkpoints, artifacts cached in
the run directory). What each kind does is in :mod:`attribution.job_kinds`. State lives in one
JSON file, ``<run>/jobs/<id>.json``, written atomically (``runs.write_json``)::

    {"id", "kind", "args", "status": queued|running|done|failed|cancelled|interrupted,
     "owner", "label", "priority": user|background, "needs", "builds", "queued_reason",
     "stage", "done", "total", "eta_s", "eta_total_s", "stage_index", "num_stages", "plan",
     "started", "updated", "stage_started", "error", "worker": {"pid", "mode"}, "result"}

Scheduling (many sessions, one run): before it runs, a job asks its kind what it would build
(``needs``: artifact keys). It waits ("queued") while a running job builds one of those
artifacts, so an artifact is built by exactly one job and everyone needing it waits for that
build; it also waits for a build slot (``MAX_BUILDS`` builds at once, at most one of them a
background warm-up, user jobs first). A job that needs nothing (a re-score on cached artifacts)
runs at once, whatever else is building. Builds run at a lower CPU priority than the pages.

The influence engine keeps one model per process and hooks its modules while computing
gradients, so two of its builds never run in one process at once (``SHARED_MODEL_KINDS``): a build
that starts while this process's engine is building runs in a worker process of its own instead.

Owners: a job records the session that started it (``owner``); :func:`cancel` with ``by=`` refuses
another session's job (the CLI, ``by=None``, may cancel any).

Workers make no streamlit calls. Three ways to run one:
- ``start(..., mode="thread")``: a daemon thread of the current process (imports warm);
- ``start(..., mode="process")``: a detached ``python -m attribution.jobs exec`` process;
- ``start(..., mode="auto")`` (the app): a process when the job builds something, else a thread.
  A build in a thread of the Streamlit server shares its GIL with every page rerun and ran about
  2x slower there (bench/results/first_gallery.md); a re-score stays a thread (no start-up);
- ``execute(...)``: in the foreground (the CLI: ``python -m attribution.jobs run KIND --run DIR``).
Cancel with :func:`cancel`: a marker file the worker's progress callback checks (and SIGINT for a
process worker); the work stops at the next progress report, keeping what was built.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from attribution.errors import UserError
from attribution.job_files import (JobCancelled, _active_marker, _cancel_marker, job_id, job_path, jobs_dir,  # noqa: F401
                                   result_path)
from attribution.job_kinds import KINDS
from attribution.job_progress import JobProgress, describe, format_eta, time_left  # noqa: F401  (re-exported)
from attribution.job_schedule import why_wait
from attribution.runs import read_json, write_json

FINAL = ("done", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
SCORE_KINDS = ("influence", "baseline")
MAX_BUILDS = max(1, int(os.environ.get("ATTRIBUTION_MAX_BUILDS", min(2, os.cpu_count() or 1))))
NICE = {"user": 5, "background": 10}  # CPU priority of a building worker thread (pages stay at 0)
# Kinds whose builds share one model per process (the influence engine caches the run's U-Net and
# hooks its modules while computing gradients): two such builds never run in one process at once.
# A second one starts in a worker process of its own instead, so it runs beside the first.
SHARED_MODEL_KINDS = {"influence", "regenerate"}  # regeneration scores its top-k with the engine
_THREADS: dict[str, threading.Thread] = {}  # job id -> worker thread of this process
_LOCK = threading.RLock()  # guards admission and start in this process (with a file lock across processes)
_CHANGED = threading.Condition()  # notified whenever a job of this process ends or is admitted
_LOCK_DEPTH = {"n": 0, "fh": None}
_JOINERS: dict[str, set] = {}  # job id -> other sessions of this process that asked for the same job


def app_mode() -> str:
    """How the app starts jobs: ``$ATTRIBUTION_JOB_MODE`` (auto | thread | process; default auto).
    Tests that hold a build inside this process (a patched function) set thread."""
    mode = os.environ.get("ATTRIBUTION_JOB_MODE", "auto")
    if mode not in ("thread", "process", "auto"):
        raise UserError(f"ATTRIBUTION_JOB_MODE must be auto, thread or process, got {mode!r}")
    return mode


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """This process's lock plus an exclusive ``flock`` on ``<run>/jobs/.lock`` (re-entrant)."""
    with _LOCK:
        if _LOCK_DEPTH["n"] == 0:
            jobs_dir(run_dir).mkdir(parents=True, exist_ok=True)
            fh = open(jobs_dir(run_dir) / ".lock", "a")
            fcntl.flock(fh, fcntl.LOCK_EX)
            _LOCK_DEPTH["fh"] = fh
        _LOCK_DEPTH["n"] += 1
        try:
            yield
        finally:
            _LOCK_DEPTH["n"] -= 1
            if _LOCK_DEPTH["n"] == 0:
                fh, _LOCK_DEPTH["fh"] = _LOCK_DEPTH["fh"], None
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()


def _notify() -> None:
    with _CHANGED:
        _CHANGED.notify_all()


# ----------------------------------------------------------------------------- scheduling


def _new_state(kind: str, args: dict, jid: str, mode: str, owner: Optional[str] = None,
               label: Optional[str] = None, priority: str = "user", status: str = "running") -> dict:
    now = time.time()
    return {"id": jid, "kind": kind, "args": args, "status": status, "stage": "starting",
            "stages": [], "done": 0.0, "total": 1.0, "eta_s": None, "eta_total_s": None, "started": now,
            "queued_at": now, "updated": now, "stage_started": now, "error": None, "result": None,
            "owner": owner, "label": label, "priority": priority, "needs": [], "builds": [], "plan": [],
            "stage_index": None, "num_stages": None, "queued_reason": None,
            "worker": {"pid": os.getpid(), "mode": mode}}


def active_jobs(run_dir: Path) -> list[dict]:
    """The run's queued and running jobs (stale markers of dead workers are removed)."""
    d = jobs_dir(run_dir) / "active"
    out = []
    for marker in sorted(d.iterdir()) if d.is_dir() else []:
        state = status(run_dir, marker.name)
        if state is not None and state["status"] in ACTIVE:
            out.append(state)
        else:
            marker.unlink(missing_ok=True)
    return out


ENGINE_KEY = "gradients on the engine's model in process"


def _engine_key() -> str:
    return f"{ENGINE_KEY} {os.getpid()}"


def built_artifacts(state: dict) -> list[str]:
    """The artifacts a job built (its ``builds`` without the engine's per-process lock)."""
    return [k for k in state.get("builds") or [] if not k.startswith(ENGINE_KEY)]


def _admit(run_dir: Path, kind: str, args: dict, progress: JobProgress) -> None:
    """Block while the job must wait (see the module docstring); then mark it running with the
    artifacts it builds. Raises :class:`JobCancelled` when cancelled while queued."""
    state = progress.state
    while True:
        if progress.cancelled():
            raise JobCancelled("cancelled while queued")
        needs = KINDS[kind].needs(run_dir, args)
        if needs and kind in SHARED_MODEL_KINDS:
            needs = needs + [_engine_key()]
        with _run_lock(run_dir):
            others = [s for s in active_jobs(run_dir) if s["id"] != state["id"]]
            why = why_wait(state, needs, others, MAX_BUILDS)
            now = time.time()
            if why is None:
                state.update(status="running", needs=needs, builds=needs, queued_reason=None, waiting_for=[],
                             started=now, stage_started=now, updated=now)
                progress.flush()
                break
            reason, ids = why
            if (state["status"], state.get("queued_reason"), state.get("needs")) != ("queued", reason, needs):
                state.update(status="queued", needs=needs, queued_reason=reason, waiting_for=ids, updated=now)
                progress.flush()
        with _CHANGED:
            _CHANGED.wait(timeout=0.5)
    _notify()
    if needs and (state["worker"]["mode"] == "process" or threading.current_thread() is not threading.main_thread()):
        nice = NICE.get(state.get("priority"), 5)
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        if state["worker"]["mode"] == "process":
            # A process worker leads its own session, hence (Linux autogroup scheduling) its own CPU
            # group, which competes with the server's group as an equal whatever its nice value: set
            # the group's nice too, or a build starves the pages' re-scores (seen as 7-21 s switches).
            with contextlib.suppress(OSError):
                Path("/proc/self/autogroup").write_text(f"{nice}\n")


# ----------------------------------------------------------------------------- running


def execute(kind: str, run_dir: Path, args: dict, mode: str = "foreground", owner: Optional[str] = None,
            label: Optional[str] = None, priority: str = "user") -> dict:
    """Run a job in this thread to completion (or failure / cancellation); returns its final state.

    Waits first while it must (queued). Never raises for the job's own errors: they are recorded
    in ``state["error"]`` (a :class:`UserError`'s message as is; anything else with its type name).
    """
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
    run_dir = Path(run_dir)
    jid = job_id(kind, args)
    prior = status(run_dir, jid)
    if prior is not None and prior["status"] == "queued" and prior.get("worker", {}).get("pid") == os.getpid():
        owner, label, priority = prior.get("owner"), prior.get("label"), prior.get("priority", priority)
        queued_at = prior.get("queued_at")
    else:
        _cancel_marker(run_dir, jid).unlink(missing_ok=True)
        queued_at = None
    state = _new_state(kind, args, jid, mode, owner, label, priority, status="queued")
    if queued_at:
        state["queued_at"] = queued_at
    progress = JobProgress(run_dir, jid, state)
    _active_marker(run_dir, jid).parent.mkdir(parents=True, exist_ok=True)
    _active_marker(run_dir, jid).touch()
    progress.flush()
    try:
        _admit(run_dir, kind, args, progress)
        progress.set_plan(KINDS[kind].plan(run_dir, args, state["builds"]))
        progress.flush()
        out = KINDS[kind].run(run_dir, args, progress)
        if isinstance(out, tuple):
            from attribution.runs import save_tensors

            out, tensors = out
            tensors = tensors if isinstance(tensors, dict) else {"scores": tensors}
            save_tensors(result_path(run_dir, jid), {k: v.float() for k, v in tensors.items()},
                         {"job": jid, "args": args})
        state.update(status="done", result=out, eta_s=0.0, eta_total_s=0.0)
    except (JobCancelled, KeyboardInterrupt):
        state.update(status="cancelled", error="cancelled; start the same job again to resume")
    except UserError as exc:
        state.update(status="failed", error=str(exc), error_type=type(exc).__name__)
    except Exception as exc:  # recorded, not swallowed: the page shows it, the CLI exits non-zero
        import traceback

        state.update(status="failed", error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
                     traceback=traceback.format_exc())
    if progress.tracker is not None:
        progress.tracker.close()
    state["updated"] = time.time()
    progress.flush()
    _cancel_marker(run_dir, jid).unlink(missing_ok=True)
    _active_marker(run_dir, jid).unlink(missing_ok=True)
    _notify()
    return state


def start(kind: str, run_dir: Path, args: dict, mode: str = "thread", owner: Optional[str] = None,
          label: Optional[str] = None, priority: str = "user") -> str:
    """Start a job in the background unless the same job is queued or running (then this joins
    it); returns its id. ``owner``: the session that asks (only it may cancel); ``label``: what
    the job is for, in words (shown to other sessions); ``priority``: "user" or "background"."""
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
    if mode not in ("thread", "process", "auto"):
        raise UserError(f"mode must be 'thread', 'process' or 'auto', got {mode!r}")
    if priority not in NICE:
        raise UserError(f"priority must be 'user' or 'background', got {priority!r}")
    run_dir = Path(run_dir)
    jid = job_id(kind, args)
    with _run_lock(run_dir):
        current = status(run_dir, jid)
        if current is not None and current["status"] in ACTIVE:
            if owner is not None and owner != current.get("owner"):
                _JOINERS.setdefault(jid, set()).add(owner)
            return jid
        _JOINERS.pop(jid, None)
        if mode == "auto":  # (a job that builds nothing never meets the engine rule below)
            mode = "process" if KINDS[kind].needs(run_dir, args) else "thread"
        elif mode == "thread" and kind in SHARED_MODEL_KINDS and any(
                _engine_key() in (s.get("builds") or []) for s in active_jobs(run_dir)) \
                and KINDS[kind].needs(run_dir, args):
            mode = "process"  # this process's engine is building: build beside it, not after it
            # (a re-score, which needs nothing built, stays a thread: it must not pay a start-up)
        # Write "queued" now, so a poll right after start() never sees the previous final state.
        state = _new_state(kind, args, jid, mode, owner, label, priority, status="queued")
        write_json(job_path(run_dir, jid), state)
        _cancel_marker(run_dir, jid).unlink(missing_ok=True)
        _active_marker(run_dir, jid).parent.mkdir(parents=True, exist_ok=True)
        _active_marker(run_dir, jid).touch()
        if mode == "thread":
            t = threading.Thread(target=execute, args=(kind, run_dir, args, "thread"),
                                 name=f"job-{jid}", daemon=True)
            _THREADS[jid] = t
            t.start()
        else:
            log = open(jobs_dir(run_dir) / f"{jid}.log", "ab")
            extra = json.dumps({"owner": owner, "label": label, "priority": priority})
            proc = subprocess.Popen(
                [sys.executable, "-m", "attribution.jobs", "exec", kind, "--run", str(run_dir),
                 "--args", json.dumps(args), "--meta", extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            )
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
    """The job's state, or None if it never ran. A queued or running job whose worker is gone
    reads as "interrupted" (start it again to resume)."""
    p = job_path(run_dir, jid)
    if not p.exists():
        return None
    try:
        state = read_json(p)
    except UserError:
        return None
    if state.get("status") in ACTIVE and not _worker_alive(state):
        state["status"] = "interrupted"
        state["error"] = "the worker stopped (server restart or crash); start the job again to resume"
    return state


def list_jobs(run_dir: Path) -> list[dict]:
    """All jobs of a run, newest first."""
    d = jobs_dir(run_dir)
    states = [status(run_dir, p.stem) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return sorted((s for s in states if s and "kind" in s), key=lambda s: s.get("started", 0), reverse=True)


def may_cancel(state: dict, session: Optional[str]) -> bool:
    """Whether ``session`` may cancel the job: its own, or one nobody owns."""
    return state.get("owner") in (None, session)


def cancel(run_dir: Path, jid: str, by: Optional[str] = None) -> bool:
    """Ask a queued or running job to stop; True if it was asked. ``by``: the asking session
    (another session's job is refused); None = the operator (CLI)."""
    state = status(run_dir, jid)
    if state is None or state["status"] not in ACTIVE:
        return False
    if by is not None and not may_cancel(state, by):
        return False
    write_json(_cancel_marker(run_dir, jid), {"requested": time.time(), "by": by})
    worker = state.get("worker") or {}
    if worker.get("mode") == "process" and worker.get("pid") != os.getpid():
        try:
            os.kill(int(worker["pid"]), signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass
    _notify()
    return True


def cancel_superseded(run_dir: Path, owner: str, kind: str, keep: str) -> list[str]:
    """Cancel ``owner``'s *queued* user jobs of ``kind`` other than ``keep`` (settings the user
    passed over, e.g. intermediate slider values); running builds, and jobs another session
    asked for too, are kept. Returns their ids."""
    out = []
    for s in active_jobs(run_dir):
        if s["kind"] == kind and s["id"] != keep and s["status"] == "queued" and s.get("owner") == owner \
                and s.get("priority") != "background" and not (_JOINERS.get(s["id"], set()) - {owner}) \
                and cancel(run_dir, s["id"], by=owner):
            out.append(s["id"])
    return out


def wait(run_dir: Path, jid: str, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Block until the job reaches a final state (or ``timeout`` seconds pass); returns its state."""
    deadline = time.time() + timeout
    while True:
        state = status(run_dir, jid)
        if state is not None and state["status"] in FINAL:
            return state
        left = deadline - time.time()
        if left <= 0:
            raise TimeoutError(f"job {jid} still running after {timeout:.0f} s")
        with _CHANGED:  # woken at once when a job of this process ends
            _CHANGED.wait(timeout=min(poll, left))


def load_result(run_dir: Path, jid: str):
    """Scores ``[Q, N]`` saved by a finished score job, or None."""
    from attribution.runs import load_tensors

    p = result_path(run_dir, jid)
    return load_tensors(p)[0]["scores"] if p.exists() else None


def load_result_tensors(run_dir: Path, jid: str) -> Optional[dict]:
    """Every tensor a finished score job saved (``"scores"``; influence also ``"scores_a"``,
    ``"scores_b"``, ``"se"`` when the store has two halves), or None."""
    from attribution.runs import load_tensors

    p = result_path(run_dir, jid)
    return load_tensors(p)[0] if p.exists() else None


def has_result(run_dir: Path, state: dict) -> bool:
    """A finished job's output is there (score jobs: the scores file)."""
    return state["kind"] not in SCORE_KINDS or result_path(run_dir, state["id"]).exists()




if __name__ == "__main__":
    from attribution.jobs_cli import main

    raise SystemExit(main())
