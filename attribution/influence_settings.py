"""What an influence computation is: its settings (a frozen dataclass, saved with every result).

The Monte-Carlo defaults were chosen by measurement (bench/bench_stability.py, results in
bench/results/stability_*.md and the README's gallery section).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from attribution.curvature import CurvatureConfig
from attribution.errors import UserError
from attribution.measurements import DrawOptions, DrawScheme, Measurement, parse_measurement
from attribution.store import round_schedule

DEFAULT_TRAIN_DRAWS = 256
DEFAULT_PREVIEW_DRAWS = 1
DEFAULT_QUERY_DRAWS = 2048
DEFAULT_FACTOR_DRAWS = 2
DEFAULT_DRAW_SCHEME = DrawScheme.ANTITHETIC.value
PREVIEW_ROUNDS = 2  # the first gallery: two rounds, so that it already has a split-half stability


@dataclass(frozen=True)
class InfluenceSettings:
    method: str = "kfac"  # "kfac" | "ekfac"
    fisher: str = "mc"  # "mc" | "empirical"
    kfac_type: str = "expand"  # "expand" | "reduce"
    damping: float = 1e-8  # the paper's lambda: added to the GGN of the loss averaged over examples AND pixels
    measurement: str = "loss"  # measurement being explained (parse_measurement syntax)
    approx_measurement: Optional[str] = None  # measurement whose gradient is used; None = same
    train_draws: int = DEFAULT_TRAIN_DRAWS  # (t, eps) draws per training gradient (the store), all rounds
    query_draws: int = DEFAULT_QUERY_DRAWS  # draws per query gradient (two independent halves)
    seed: int = 0
    compress_queries: bool = False  # int8 preconditioned queries
    factor_draws: int = DEFAULT_FACTOR_DRAWS  # (t, eps) draws per training example for the Kronecker factors
    store_dtype: str = "float16"  # "float16" | "int8"
    store_budget_bytes: Optional[int] = None  # None = DEFAULT_STORE_BUDGET
    preview_draws: int = DEFAULT_PREVIEW_DRAWS  # draws of the store's first round; rounds then double in pairs
    draw_scheme: str = DEFAULT_DRAW_SCHEME  # measurements.DrawScheme (antithetic, importance, common, ...)

    def __post_init__(self):
        if self.method not in ("kfac", "ekfac"):
            raise UserError(f"unknown influence method {self.method!r}; choose kfac or ekfac")
        CurvatureConfig(self.method, self.fisher, self.kfac_type)  # validates the names
        parse_measurement(self.measurement)
        if self.approx_measurement is not None:
            parse_measurement(self.approx_measurement)
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}")
        if min(self.train_draws, self.query_draws, self.factor_draws, self.preview_draws) < 1:
            raise UserError("the numbers of draws must be >= 1")
        round_schedule(self.train_draws, self.preview_draws)  # validates train_draws (even, >= 2)
        if self.query_draws < 2 or self.query_draws % 2:
            raise UserError(f"query_draws must be even and >= 2 (two independent halves), got {self.query_draws}")
        DrawOptions(scheme=self.draw_scheme)  # validates the scheme

    @property
    def gradient_measurement(self) -> Measurement:
        """The measurement whose gradient enters the scores (measurement substitution)."""
        return parse_measurement(self.approx_measurement or self.measurement)

    @property
    def round_draws(self) -> list[int]:
        """Draws of each round of the store (:func:`attribution.store.round_schedule`); the first
        PREVIEW_ROUNDS rounds give the preview gallery."""
        return round_schedule(self.train_draws, self.preview_draws)

    @property
    def rounds(self) -> int:
        return len(self.round_draws)

    def curvature(self, hflip: bool = False) -> CurvatureConfig:
        return CurvatureConfig(self.method, self.fisher, self.kfac_type, self.factor_draws, self.seed, hflip=hflip)

    def to_dict(self) -> dict:
        return asdict(self)
