"""Start and stop the Streamlit app on a free local port (the browser tier and the benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(pinned_run: Path, runs_dir: Path, log_path: Path, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """The app served on 127.0.0.1 with ``pinned_run`` first in the run picker; ``(process, url)``
    once its health check answers. Builds run in worker processes as in the served app (the
    tests' own environment sets thread mode). RuntimeError with the log's tail if it does not start."""
    port = free_port()
    env = {**os.environ, "ATTRIBUTION_RUN": str(pinned_run), "ATTRIBUTION_RUNS": str(runs_dir),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ATTRIBUTION_JOB_MODE": "auto"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"streamlit did not start: {Path(log_path).read_text()[-2000:]}") from None
            time.sleep(0.5)


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
