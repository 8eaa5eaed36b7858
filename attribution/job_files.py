"""Where a run's job records live, and how a job is named: ``<run>/jobs/<id>.json`` (state),
``<id>.result.safetensors`` (scores), ``<id>.cancel`` (cancel marker), ``active/<id>`` (queued
or running)."""

from __future__ import annotations

from pathlib import Path

from attribution.runs import config_hash


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


def _active_marker(run_dir: Path, jid: str) -> Path:
    return jobs_dir(run_dir) / "active" / jid
