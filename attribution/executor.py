"""Executors: run independent units of work and hand each result back to the driver.

One small interface, two implementations:

- :class:`LocalExecutor` (``local``, the default; needs nothing beyond the package): with one
  worker the units run in the calling process, one after another; with ``workers > 1`` in a
  pool of spawned processes (``concurrent.futures``), one thread each.
- :class:`RayExecutor` (``ray``; ``pip install 'attribution[ray]'``): every unit is a Ray task.
  It connects to ``address`` (``auto``, ``host:6379`` or ``ray://host:10001``), or starts a
  local cluster when none is given. The package itself travels to the cluster (``py_modules``),
  large shared inputs go through Ray's object store (:meth:`Executor.share`), so no shared file
  system is assumed. A task whose worker process dies is retried (``max_retries``); tasks ask for
  a GPU (``num_gpus``) when the cluster has one.

A unit is ``fn(*args)`` with ``fn`` a module-level function (it is pickled by reference). The
driver gets ``on_result(i, result)`` for unit ``i`` in completion order and writes artifacts
itself (atomically), so a job is resumable whatever the executor: units already on disk are
simply not submitted again.
"""

from __future__ import annotations

import os
import socket
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from attribution.errors import UserError

RAY_ADDRESS_ENV = "ATTRIBUTION_RAY_ADDRESS"  # the app (and library callers) submit to this cluster
DEFAULT_MAX_RETRIES = 3  # retries of a Ray task whose worker process died
ResultFn = Callable[[int, Any], None]


class ExecutorKind(str, Enum):
    """Where units run (shared by the CLI's --executor and the app)."""

    LOCAL = "local"
    RAY = "ray"


class Executor:
    """Runs units ``fn(*args)``; see the module docstring."""

    kind: ExecutorKind
    inline = False  # True: units run in the calling process (step progress and stop inside units)

    @property
    def slots(self) -> int:
        """How many units run at once."""
        raise NotImplementedError

    def share(self, obj):
        """A handle to pass ``obj`` (large, read-only) to many units as a top-level argument."""
        return obj

    def run(self, fn: Callable, items: Sequence[tuple], on_result: ResultFn,
            should_stop: Optional[Callable[[], bool]] = None) -> bool:
        """Run ``fn(*items[i])`` for every i; ``on_result(i, result)`` in the driver as each ends.

        Returns False when ``should_stop()`` ended it early (unfinished units are cancelled;
        call again to resume), True when every unit finished. A unit's :class:`UserError` is
        raised here with its message.
        """
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind.value} executor, {self.slots} slot(s)"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- local


def _init_local_worker(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


class LocalExecutor(Executor):
    """In-process (``workers=1``) or a pool of ``workers`` spawned processes, one thread each."""

    kind = ExecutorKind.LOCAL

    def __init__(self, workers: int = 1, threads_per_worker: int = 1, in_process: Optional[bool] = None):
        if workers < 1:
            raise UserError(f"the number of workers must be >= 1, got {workers}")
        self.workers, self.threads = int(workers), int(threads_per_worker)
        self.inline = self.workers == 1 if in_process is None else bool(in_process)  # False: a pool even of 1
        self._pool = None

    @property
    def slots(self) -> int:
        return self.workers

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_local_worker, initargs=(self.threads,))
        return self._pool

    def run(self, fn, items, on_result, should_stop=None) -> bool:
        if self.inline:
            for i, args in enumerate(items):
                if should_stop is not None and should_stop():
                    return False
                on_result(i, fn(*args))
            return True
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pool = self._get_pool()
        futures = {pool.submit(fn, *args): i for i, args in enumerate(items)}
        pending = set(futures)
        try:
            while pending:
                if should_stop is not None and should_stop():
                    for f in pending:
                        f.cancel()
                    return False
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for f in done:
                    on_result(futures[f], f.result())
        except BrokenProcessPool:
            self._pool = None
            raise UserError("a local worker process died; finished units are kept, re-run to resume") from None
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----------------------------------------------------------------------------- Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'attribution[ray]'") from None
    return ray


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when ``address`` names no reachable host:port.

    Why: ``ray.init`` retries an unreachable GCS address for minutes before giving up.
    ``auto`` is left to Ray (it fails at once when no local cluster runs).
    """
    text = address.strip()
    if text == "auto":
        return
    hostport = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--ray-address takes auto, host:port or ray://host:port, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
                        "start one with `ray start --head` or fix --ray-address") from None


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def _call(fn, *args):
    """Runs in a Ray worker: the unit's result and where it ran."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args)


class RayExecutor(Executor):
    """Ray tasks on an existing cluster (``address``) or on a local one started here."""

    kind = ExecutorKind.RAY

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None,
                 gpus_per_unit: Optional[float] = None, max_retries: int = DEFAULT_MAX_RETRIES):
        ray = self._ray = _import_ray()
        if address:
            check_ray_address(address)
        self._owns = False
        if not ray.is_initialized():  # else: join the connection this process already has
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                          runtime_env={"py_modules": [_package_dir()]})
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = workers
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError, SystemExit) as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: {msg}") from None
            self._owns = True
        self.address = address
        self.max_retries = int(max_retries)
        res = ray.cluster_resources()
        self.gpus = float(gpus_per_unit) if gpus_per_unit is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
        self._cpus = int(res.get("CPU", 1))
        self._remote = ray.remote(_call)
        self.placements: dict[int, str] = {}  # unit index -> Ray node id of the last run()

    @property
    def slots(self) -> int:
        if self.gpus > 0:
            return max(1, int(self._ray.cluster_resources().get("GPU", 0) // self.gpus))
        return max(1, self._cpus)

    def describe(self) -> str:
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        where = self.address or "local cluster"
        return f"ray executor ({where}: {len(nodes)} node(s), {self._cpus} CPUs, {self.gpus:g} GPU per unit)"

    def share(self, obj):
        return self._ray.put(obj)

    def run(self, fn, items, on_result, should_stop=None) -> bool:
        ray = self._ray
        from ray.exceptions import RayTaskError, TaskCancelledError, WorkerCrashedError

        opts = dict(num_cpus=1, num_gpus=self.gpus, max_retries=self.max_retries, retry_exceptions=False,
                    name=getattr(fn, "__name__", "unit"))
        refs = {self._remote.options(**opts).remote(fn, *args): i for i, args in enumerate(items)}
        pending = list(refs)
        self.placements = {}

        def cancel_all():
            for r in pending:
                ray.cancel(r, force=True)

        try:
            while pending:
                if should_stop is not None and should_stop():
                    cancel_all()
                    return False
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for r in ready:
                    node, result = ray.get(r)
                    self.placements[refs[r]] = node
                    on_result(refs[r], result)
        except RayTaskError as exc:
            cancel_all()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise
        except (WorkerCrashedError, TaskCancelledError) as exc:
            cancel_all()
            raise UserError(f"a Ray worker died {self.max_retries + 1} times running one unit ({type(exc).__name__}); "
                            "finished units are kept, re-run to resume") from None
        except BaseException:
            cancel_all()
            raise
        return True

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False


# ----------------------------------------------------------------------------- factory


def make_executor(kind: str = "local", ray_address: Optional[str] = None, workers: Optional[int] = None,
                  gpus_per_unit: Optional[float] = None) -> Executor:
    """The executor for the CLI's ``--executor`` / ``--ray-address`` / ``--workers``.

    ``local``: ``workers`` processes (default 1 = in-process). ``ray``: connect to ``ray_address``
    or start a local cluster with ``workers`` CPUs (default: all cores).
    """
    try:
        kind = ExecutorKind(str(kind).lower())
    except ValueError:
        raise UserError(f"unknown executor {kind!r}; choose local or ray") from None
    if kind is ExecutorKind.LOCAL:
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        return LocalExecutor(workers or 1)
    if workers is not None and workers < 1:
        raise UserError(f"the number of workers must be >= 1, got {workers}")
    return RayExecutor(ray_address, None if ray_address else workers, gpus_per_unit)


def configured_executor(workers: int = 1, address: Optional[str] = None) -> Executor:
    """The executor a long job of the app (LDS, counterfactual) should use.

    ``address`` or the ``ATTRIBUTION_RAY_ADDRESS`` environment variable (e.g. ``auto`` or
    ``ray://head:10001``) selects a Ray cluster; otherwise local with ``workers`` processes.
    """
    address = address or os.environ.get(RAY_ADDRESS_ENV) or None
    if address:
        return make_executor("ray", address)
    return make_executor("local", None, workers)

