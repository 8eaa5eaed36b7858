"""A job's progress record: the callable a worker reports to, persisted to the job's JSON file,
and its one-line descriptions (stage k of n, time left in the stage and overall)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from attribution.job_estimates import PlanTracker, format_seconds
from attribution.job_files import JobCancelled, _cancel_marker, job_path
from attribution.runs import write_json



class JobProgress:
    """Callable progress reporter persisted to the job's JSON file.

    ``progress(done, total, stage)`` (influence / baselines style). Follows the job's plan
    (:class:`attribution.job_estimates.PlanTracker`): ``stage_index`` of ``num_stages``, the
    stage's ``eta_s`` and the job's ``eta_total_s``. Writes at most every ``min_interval``
    seconds, and always on a stage change or when a stage completes. Raises
    :class:`JobCancelled` once the cancel marker exists.
    """

    def __init__(self, run_dir: Path, jid: str, state: dict, min_interval: float = 0.5):
        self.run_dir, self.jid, self.state = Path(run_dir), jid, state
        self.min_interval = min_interval
        self._last_write = 0.0
        self.tracker: Optional[PlanTracker] = None

    def set_plan(self, plan: list[dict]) -> None:
        self.state["plan"] = plan
        self.state["num_stages"] = len(plan)
        self.tracker = PlanTracker(plan, self.run_dir) if self.state["kind"] != "warmup" else None

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
        changed = stage != s.get("stage") or float(done) < float(s.get("done") or 0)
        if changed:
            s["stage_started"] = now
            if stage != s.get("stage"):
                s.setdefault("stages", []).append(stage)
        s.update(stage=stage, done=float(done), total=float(total), updated=now)
        if self.tracker is not None:
            est = self.tracker.report(done, total, stage, now)
            entry = self.tracker.plan[est["stage_index"] - 1]
            s["overall_fraction"] = max(float(s.get("overall_fraction") or 0.0), _overall_fraction(
                self.tracker.plan, est, float(done) / float(total) if total else 0.0))  # one bar, never back
            s.update(eta_s=est["stage_left_s"], eta_total_s=est["total_left_s"], stage_total_s=est["stage_total_s"],
                     stage_index=est["stage_index"], num_stages=est["num_stages"],
                     stage_label=entry.get("name") or stage)
        else:  # no plan (or a warm-up: one step per sub-job, whose own records carry the estimates)
            elapsed = now - s["stage_started"]
            s["eta_s"] = elapsed / done * (total - done) if done > 0 and total >= done else None
            if s["kind"] == "warmup":
                s.update(stage_index=min(int(done) + 1, int(total) or 1), num_stages=int(total) or 1, stage_label=stage)
        if changed or done >= total or now - self._last_write >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        self._last_write = time.time()
        write_json(job_path(self.run_dir, self.jid), self.state)


def _overall_fraction(plan: list[dict], est: dict, stage_fraction: float) -> float:
    """The job's progress 0..1 for one bar that never falls back: time spent over time spent plus
    the overall estimate left; by stages (k - 1 + fraction) / n while no estimate is known."""
    k, n = est["stage_index"], max(1, est["num_stages"])
    spent = sum(float(e.get("seconds") or 0) for i, e in enumerate(plan) if i != k - 1)
    current = est.get("stage_total_s")
    if est.get("total_left_s") is not None and current is not None:
        spent += max(0.0, current - (est.get("stage_left_s") or 0.0))
        whole = spent + est["total_left_s"]
        if whole > 0:
            return min(1.0, spent / whole)
    return min(1.0, (k - 1 + min(1.0, stage_fraction)) / n)


def format_eta(seconds: Optional[float]) -> str:
    return format_seconds(seconds)


def time_left(state: dict) -> str:
    """``"about 1 min 10 s left in this stage, 3 min 05 s overall"`` (or "estimating the time left")."""
    stage, total = state.get("eta_s"), state.get("eta_total_s")
    if stage is None:
        return "estimating the time left"
    text = f"about {format_seconds(stage)} left in this stage"
    if (state.get("num_stages") or 1) > 1:
        text += f", {format_seconds(total) if total is not None else 'estimating the rest'} overall"
    return text


def describe(state: dict) -> str:
    """One line: ``stage k of n, name: pct — about ETA left (this stage), ETA overall``."""
    total = state.get("total") or 1
    done = state.get("done") or 0
    pct = 100.0 * done / total if total else 0.0
    if state.get("status") == "queued":
        return f"queued: {state.get('queued_reason') or 'waiting to start'}"
    k, n = state.get("stage_index"), state.get("num_stages")
    head = f"stage {k} of {n}, " if k and n else ""
    line = f"{head}{state.get('stage_label') or state.get('stage')}: {done:g}/{total:g} ({pct:.0f}%)"
    if state.get("status") == "running":
        line += f" — {time_left(state)}"
    else:
        line += f" — {state.get('status')}"
    return line
