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
# session threads at once: import the package, open the run, load the model and the data, ask
# the engine what is cached. diffusers' lazy import used to fail here ("cannot import name
# 'UNet2DModel'") when two threads got to it at the same time.
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
    """Two fresh servers, eight sessions each arriving at once: zero errors (the unguarded
    import failed in every one of six tries with four threads)."""
    failures = _fresh_interpreters(micro_run.path, times=2, threads=8)
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
