"""Time estimates for background jobs: a plan of stages, per-stage and overall estimates.

A job's *plan* is the list of stages it will run, known before it starts (from what is missing):
``[{"name", "kind", "variant", "units"}]``. ``units`` counts per-example forward+backward passes
(examples x Monte-Carlo draws), so a stage's duration is ``units x seconds per unit``.

Seconds per unit come from, in this order:
1. this run's history (``<run>/jobs/rates.json``, updated whenever a stage finishes): exact for
   the model and machine;
2. the live rate of the stage that is running (elapsed / fraction done), which also rescales
   the priors of the stages still to come (the machine's speed relative to the priors);
3. priors measured on the shipped demo run (bench/results/influence_cpu.md: 175,569 K-FAC
   parameters, 16x16, one thread), scaled by the model's parameter count.

Stage names come from the engine's progress callbacks; :func:`classify` maps them to a kind by
keywords, so renamed or extra stages still land on the right plan entry (unknown ones are
appended).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

# Seconds per unit on the demo run (bench/results/influence_cpu.md (a)-(c)); keys: kind or
# "kind:variant". EK-FAC's second pass = the EK-FAC total minus the K-FAC pass of that variant.
DEMO_PARAMS = 175_569
DEMO_PIXELS = 16 * 16
PRIOR_S_PER_UNIT = {
    "store": 0.0026,  # per row and draw, rounds' rewrite included as extra draws (job_kinds); gallery_demo.md
    "query_gradients": 0.0035,  # 1 x 1,024 draws in 3.4-3.8 s in a worker process (first_gallery.md)
    "factors:mc/expand": 0.0150,  # 107 s extrapolated, 117-156 s measured on all N
    "factors:mc/reduce": 0.0076,
    "factors:empirical/expand": 0.0178,
    "factors:empirical/reduce": 0.0060,
    "factors_pass2:mc/expand": 0.0169,
    "factors_pass2:mc/reduce": 0.0116,
    "factors_pass2:empirical/expand": 0.0128,
    "factors_pass2:empirical/reduce": 0.0131,
    "proposal": 0.008,  # the importance scheme's pilot: small batches of one draw
    "baseline_train:trak": 0.0078,  # 12.8 examples/s at 10 draws
    "baseline_train:dtrak": 0.0062,  # 16.2 examples/s at 10 draws
    "baseline_query": 0.0078,
    "clip": 0.02,  # per image, CLIP ViT-B/32 on the CPU
    "score": 0.0,
}
FIXED_S = {"score": 0.5}  # stages whose cost does not scale with units
MIN_FRACTION = 0.03  # below this fraction done, a stage's live rate is not trusted yet
MIN_ELAPSED_S = 0.5


def classify(stage_name: str) -> str:
    """The kind of a progress stage name (keywords; see the module docstring)."""
    s = stage_name.lower()
    if "pass 2" in s or "eigenvalue" in s:
        return "factors_pass2"
    if "factor" in s:
        return "factors"
    if "clip" in s:
        return "clip"
    if "query" in s:  # the engine's "query gradients (loss)"; the baselines' bare "query gradients"
        return "query_gradients" if "(" in s else "baseline_query"
    if "store" in s or "streaming training" in s or s.startswith("training gradients"):
        return "store"
    if "proposal" in s or "pilot" in s:
        return "proposal"
    if "train gradients" in s or "train features" in s:
        return "baseline_train"
    if s.startswith("score"):
        return "score"
    if s.startswith("sampl"):
        return "sample"
    if s.startswith("train"):
        return "train"
    return re.sub(r"[^a-z]+", "_", s).strip("_") or "work"


def prior_rate(kind: str, variant: str = "", num_params: Optional[int] = None,
               pixels: Optional[int] = None) -> Optional[float]:
    """Prior seconds per unit for ``kind`` (and ``variant``), scaled by the model's parameter
    count and image pixels (a convolution's cost grows with both)."""
    rate = PRIOR_S_PER_UNIT.get(f"{kind}:{variant}", PRIOR_S_PER_UNIT.get(kind))
    if rate is None:
        return None
    return rate * (num_params / DEMO_PARAMS if num_params else 1.0) * (pixels / DEMO_PIXELS if pixels else 1.0)


def _rate_key(entry: dict) -> str:
    return f"{entry['kind']}:{entry.get('variant', '')}"


# ----------------------------------------------------------------------------- history


def rates_path(run_dir: Path) -> Path:
    return Path(run_dir) / "jobs" / "rates.json"


def load_rates(run_dir: Path) -> dict:
    from attribution.errors import UserError
    from attribution.runs import read_json

    p = rates_path(run_dir)
    try:
        return read_json(p) if p.exists() else {}
    except UserError:
        return {}


def record_rate(run_dir: Path, entry: dict, seconds: float) -> None:
    """Remember a finished stage's seconds per unit (0.5 / 0.5 running mean with the old one)."""
    from attribution.runs import write_json

    units = float(entry.get("units") or 0)
    if units <= 0 or seconds <= 0:
        return
    rates = load_rates(run_dir)
    key, rate = _rate_key(entry), seconds / units
    rates[key] = rate if key not in rates else 0.5 * (rates[key] + rate)
    write_json(rates_path(run_dir), rates)


# ----------------------------------------------------------------------------- estimates


def stage_estimate(entry: dict, rates: dict, speed: float = 1.0) -> Optional[float]:
    """Expected seconds of a plan entry that has not started (None when nothing is known)."""
    if entry["kind"] in FIXED_S:
        return FIXED_S[entry["kind"]]
    units = float(entry.get("units") or 0)
    hist = rates.get(_rate_key(entry))
    if hist is not None:
        return units * hist
    prior = prior_rate(entry["kind"], entry.get("variant", ""), entry.get("params"), entry.get("pixels"))
    return None if prior is None else units * prior * speed


def live_total(elapsed: float, fraction: float) -> Optional[float]:
    """A running stage's total duration extrapolated from its progress (None: too early)."""
    if fraction >= 1.0:
        return elapsed
    if fraction < MIN_FRACTION or elapsed < MIN_ELAPSED_S:
        return None
    return elapsed / fraction


def history_speed(rates: dict) -> float:
    """This run's measured rates relative to the priors (mean ratio; 1.0 without history)."""
    ratios = []
    for key, rate in rates.items():
        kind, _, variant = key.partition(":")
        prior = PRIOR_S_PER_UNIT.get(key, PRIOR_S_PER_UNIT.get(kind))
        if prior:
            ratios.append(rate / prior)
    return sum(ratios) / len(ratios) if ratios else 1.0


def estimate(plan: list[dict], current: Optional[int], fraction: float, elapsed: float,
             rates: dict, speed: Optional[float] = None) -> dict:
    """Per-stage and overall estimates for a job part-way through ``plan``.

    ``current``: index of the running entry (None before the first); ``fraction`` and
    ``elapsed``: its progress (0..1) and seconds since it started; ``speed``: the machine's
    speed relative to the priors (None: from ``rates``). Finished entries carry their measured
    ``seconds``. Returns ``{"stage_total_s", "stage_left_s", "total_left_s", "stages_s"}``
    (seconds; None = unknown).
    """
    speed = history_speed(rates) if speed is None else speed
    stage_total = stage_left = None
    if current is not None:
        entry = plan[current]
        prior = stage_estimate(entry, rates, speed)
        live = live_total(elapsed, fraction)
        if live is not None:
            if prior and _rate_key(entry) not in rates:
                speed *= live / prior  # the running stage says how fast this machine is today
            stage_total = live
        elif prior is not None:
            stage_total = max(prior, elapsed)
        stage_left = None if stage_total is None else max(0.0, stage_total - elapsed)
    stages: list[Optional[float]] = []
    for i, entry in enumerate(plan):
        if i == current:
            stages.append(stage_total)
        elif entry.get("seconds") is not None:
            stages.append(float(entry["seconds"]))
        else:
            stages.append(stage_estimate(entry, rates, speed))
    future = [stages[i] for i, e in enumerate(plan) if i != current and e.get("seconds") is None]
    total_left = None
    if all(s is not None for s in future) and (current is None or stage_left is not None):
        total_left = (stage_left or 0.0) + sum(future)
    return {"stage_total_s": stage_total, "stage_left_s": stage_left, "total_left_s": total_left,
            "stages_s": stages}


def work_fraction(entry: dict, done: float, total: float) -> float:
    """The share of a stage's work that is done. Progress counts rows; a stage with ``segments``
    (the store's rounds: equal rows, ``segments[r]`` draws each) weighs each round by its draws."""
    if not total:
        return 0.0
    f = min(1.0, max(0.0, float(done) / float(total)))
    seg = entry.get("segments") or []
    if len(seg) < 2 or sum(seg) <= 0:
        return f
    pos = f * len(seg)
    r = min(int(pos), len(seg) - 1)
    return min(1.0, (sum(seg[:r]) + seg[r] * (pos - r)) / sum(seg))


class PlanTracker:
    """Follows a job's progress reports through its plan.

    Records on each entry when it started, what was estimated (``est_start_s`` when it started,
    ``est_10_s`` at 10% done) and its measured ``seconds``; finished stages update the run's
    rate history. A report with the running stage's name whose count restarts from below is
    the next stage (EK-FAC's second data pass under the first pass's name).
    """

    def __init__(self, plan: list[dict], run_dir: Optional[Path] = None):
        self.plan = plan
        self.run_dir = run_dir
        self.rates = load_rates(run_dir) if run_dir is not None else {}
        self.current: Optional[int] = None
        self.started = 0.0
        self.start_fraction = 0.0
        self.last_done = 0.0
        self.last_name = ""
        self.speed: Optional[float] = None  # from this job's finished stages

    def _next(self, kind: str) -> int:
        """The unfinished plan entry of ``kind`` named like the report (else the first of that kind;
        appended when the plan has none)."""
        free = [i for i, e in enumerate(self.plan) if e["kind"] == kind and e.get("seconds") is None and i != self.current]
        for i in free:
            if str(self.plan[i].get("name", "")).lower() == self.last_name.lower():
                return i
        if free:
            return free[0]
        self.plan.append({"name": self.last_name, "kind": kind, "units": None})
        return len(self.plan) - 1

    def report(self, done: float, total: float, name: str, now: Optional[float] = None) -> dict:
        """Record one progress report; :func:`estimate`'s dict plus ``stage_index`` (1-based) and
        ``num_stages``."""
        now = time.time() if now is None else now
        fraction = min(1.0, float(done) / float(total)) if total else 0.0
        kind = classify(name)
        cur = self.plan[self.current] if self.current is not None else None
        if cur is None:
            switch = kind
        elif name == self.last_name and done < self.last_done:  # counting again: the next pass
            switch = "factors_pass2" if cur["kind"] == "factors" else cur["kind"]
        elif name != self.last_name and kind != cur["kind"]:
            switch = kind
        else:
            switch = None
        self.last_name = name
        if switch is not None:
            self._finish(now)
            self.current = self._next(switch)
            fraction = work_fraction(self.plan[self.current], done, total)
            self.started, self.start_fraction = now, fraction
            entry = self.plan[self.current]
            entry["started"] = now
            speed = self._speed()
            entry["est_start_s"] = stage_estimate(entry, self.rates, history_speed(self.rates) if speed is None else speed)
        self.last_done = done
        entry = self.plan[self.current]
        entry["reported_name"] = name
        fraction = work_fraction(entry, done, total)
        live_fraction = (fraction - self.start_fraction) / (1.0 - self.start_fraction) if self.start_fraction < 1 else 1.0
        out = estimate(self.plan, self.current, live_fraction, now - self.started, self.rates, self._speed())
        if 0.1 <= fraction < 1.0 and entry.get("est_10_s") is None and entry.get("seconds") is None:
            entry["est_10_s"] = out["stage_total_s"]
        if fraction >= 1.0:
            self._finish(now)
        out.update(stage_index=self.current + 1, num_stages=len(self.plan))
        return out

    def _speed(self) -> Optional[float]:
        """Measured / prior duration over this job's finished stages (None: none yet)."""
        ratios = []
        for e in self.plan:
            if e.get("seconds") and e.get("units") and e.get("scaled_units"):
                prior = stage_estimate({**e, "units": e["scaled_units"]}, {}, 1.0)
                if prior:
                    ratios.append(e["seconds"] / prior)
        return sum(ratios) / len(ratios) if ratios else None

    def _finish(self, now: float) -> None:
        if self.current is None:
            return
        entry = self.plan[self.current]
        if entry.get("seconds") is not None:
            return
        entry["seconds"] = now - self.started
        # a stage resumed part-way (or found complete) did only part of its units
        entry["scaled_units"] = (entry.get("units") or 0) * (1.0 - self.start_fraction)
        if self.run_dir is not None and entry["scaled_units"] > 0 and entry["seconds"] >= 0.5 \
                and self.start_fraction < 0.95:
            record_rate(self.run_dir, {**entry, "units": entry["scaled_units"]}, entry["seconds"])
            self.rates = load_rates(self.run_dir)

    def close(self, now: Optional[float] = None) -> None:
        """The job ended: the running entry is finished."""
        self._finish(time.time() if now is None else now)


def format_seconds(seconds: Optional[float]) -> str:
    """``"about 2 min 05 s"`` style, ``"estimating…"`` when unknown."""
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
