"""One seed of each method's DEFAULT pipeline, timed by stage (used by bench/bench_stability.py).

Each function runs the library's own default path on a run (building, or reusing from the run's
artifacts, whatever it needs) and returns ``(scores [Q, N], info)``; ``info["stages"]`` holds the
wall seconds of every stage built in this call (0 for what was reused), measured by the progress
callback: the time since the previous progress report is charged to the stage reported.
Scores are cached in the run (``artifacts/bench-stability/``), together with the stage times of
the call that computed them, so a rerun reports the times of the first (building) call.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from attribution.runs import load_tensors, save_tensors


class StageTimer:
    """Progress callback that charges wall time to the stage being reported."""

    def __init__(self):
        self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def __call__(self, done: int, total: int, stage: str) -> None:
        now = time.perf_counter()
        key = stage.split(" (")[0]
        self.stages[key] = self.stages.get(key, 0.0) + now - self.last
        self.last = now

    def mark(self, stage: str) -> None:
        self(0, 1, stage)

    def rounded(self) -> dict:
        return {k: round(v, 1) for k, v in self.stages.items()}


def cached(run, method: str, args: dict, compute: Callable[[], tuple]) -> tuple:
    """``compute() -> (scores [Q, N], info)``, cached in the run under (method, args)."""
    d = run.artifact_dir("bench-stability", {"method": method, **args})
    path = d / "scores.safetensors"
    if path.exists():
        t, meta = load_tensors(path)
        return t["scores"], {**meta, "cached": True}
    scores, info = compute()
    save_tensors(path, {"scores": scores.float().contiguous()}, info)
    return scores, {**info, "cached": False}


def kfac_default(run, seed: int, query_idx: list[int]) -> tuple:
    """K-FAC at InfluenceSettings' defaults (seed changed): factors, proposal pilot, store, queries."""
    from attribution.influence import InfluenceSettings, influence_result

    settings = InfluenceSettings(seed=seed)

    def compute():
        timer = StageTimer()
        t0 = time.perf_counter()
        res = influence_result(run, "queries", query_idx, settings, progress=timer)
        timer.mark("scores")
        info = {"seconds": round(time.perf_counter() - t0, 1), "stages": timer.rounded(),
                "settings": settings.to_dict()}
        if res.reliability is not None:
            info["predicted_stability"] = sum(r.stability for r in res.reliability) / len(res.reliability)
            info["predicted_top_pos"] = sum(r.expected_top_pos for r in res.reliability) / len(res.reliability)
            info["predicted_top_neg"] = sum(r.expected_top_neg for r in res.reliability) / len(res.reliability)
        return res.scores, info

    return cached(run, "kfac-default", {"seed": seed, "queries": query_idx, **settings.to_dict()}, compute)


def query_images(run, query_idx: list[int]) -> torch.Tensor:
    return run.load_samples("queries")[0]["images"][query_idx].float()


def trak_default(run, variant: str, seed: int, query_idx: list[int], proj_dim=None, rounds=None) -> tuple:
    """TRAK / D-TRAK at TrakSettings' defaults (seed changed: draws AND projection; ``proj_dim``
    and ``rounds`` (a preview of the store) optionally changed). TRAK shares K-FAC's store and,
    through ``query_set``, K-FAC's cached query gradients."""
    from attribution.trak import DEFAULT_RELATIVE_DAMPING, TrakSettings, trak_attribution

    kw = {"proj_dim": proj_dim} if proj_dim is not None else {}
    settings = TrakSettings(variant=variant, seed=seed, **kw)

    def compute():
        timer = StageTimer()
        t0 = time.perf_counter()
        res = trak_attribution(run, query_images(run, query_idx), variant=variant, seed=seed, device="cpu",
                               query_indices=query_idx, query_set="queries", progress=timer, rounds=rounds, **kw)
        timer.mark("scores")
        info = {"seconds": round(time.perf_counter() - t0, 1), "stages": timer.rounded(),
                "settings": {**settings.__dict__}, "damping": res.damping, "rounds_done": res.rounds_done,
                "train_draws_done": sum(settings.round_draws[:res.rounds_done])}
        if res.reliability is not None:
            n = len(res.reliability)
            info["predicted_stability"] = sum(r.stability for r in res.reliability) / n
            info["predicted_top_pos"] = sum(r.expected_top_pos for r in res.reliability) / n
            info["predicted_top_neg"] = sum(r.expected_top_neg for r in res.reliability) / n
        return res.scores, info

    args = {"seed": seed, "queries": query_idx, "rounds": rounds, **settings.__dict__,
            "relative_damping": DEFAULT_RELATIVE_DAMPING[variant]}
    return cached(run, variant, args, compute)
