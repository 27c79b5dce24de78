"""Where independent tasks run: in this process, in a pool of local processes, or on a Ray cluster.

Each executor runs fn(*args) for a list of tasks and yields (task index, result) as tasks finish, in
whatever order they finish; callers that need an order (sim.lab.results_store) restore it. The task
functions here are pure (a simulated cell), so the executor and its number of workers change how
long a run takes, never what it gives.

- SerialExecutor: this process, one task after another (workers = 1).
- ProcessExecutor: a local process pool (forkserver start where the OS has it: children fork from a
  server that has already imported the simulator, so a worker starts in milliseconds, and the
  parent's threads are never forked).
- RayExecutor: tasks on a Ray cluster (`ray start --head` on one machine, `ray start --address` on
  the others; then `--ray HOST:PORT`). Ray is what vLLM's multi-node runtime and Vidur's
  configuration search run on; it schedules one task per free CPU across machines. The driver ships
  this source tree to the workers (Ray's working_dir) when it runs from a checkout, so the cluster
  runs the same code; data files an experiment names (traces, profiles) must exist at the same
  absolute paths on the workers (a shared file system, or the loopback cluster of one machine).

A ConfigError raised in a worker reaches the caller as a ConfigError (it does not pickle as itself).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from reference.errors import ConfigError

try:  # optional: `pip install servesim[ray]`
    import ray
except ImportError:  # pragma: no cover - exercised where ray is absent
    ray = None

RAY_MISSING = "ray is not installed; install servesim with the ray extra: pip install -e '.[ray]'"
_REPO_ROOT = Path(__file__).resolve().parents[2]
#: Folders of a checkout that workers never need (results, figures, the paper, tests, git).
_RAY_EXCLUDES = [".git", "runs", "out", "experiments/results", "papers", "tests", "**/__pycache__", "*.egg-info",
                 ".hypothesis", ".pytest_cache"]


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _call(fn: Callable, args: tuple) -> tuple[str, Any]:
    """fn(*args) as ("ok", result), or ("config_error", (field, message, allowed)): ConfigError does not pickle."""
    try:
        return "ok", fn(*args)
    except ConfigError as e:
        return "config_error", (e.field, e.message, e.allowed)


def _unwrap(outcome: tuple[str, Any]) -> Any:
    kind, value = outcome
    if kind == "config_error":
        raise ConfigError(*value)
    return value


class Executor:
    """Runs tasks; `workers` says how many at once; use as a context manager (close() frees the workers)."""

    name = "executor"
    workers = 1

    def map_unordered(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """(index into tasks, fn(*tasks[index])) for every task, as each finishes."""
        raise NotImplementedError

    def describe(self) -> str:
        """'2 local processes', 'Ray at 127.0.0.1:6379 (4 CPUs)', ... for progress lines and reports."""
        return self.name

    def close(self) -> None:
        """Free the workers (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialExecutor(Executor):
    """Every task in this process, in order."""

    name = "this process"

    def map_unordered(self, fn, tasks):
        for i, args in enumerate(tasks):
            yield i, fn(*args)


class ProcessExecutor(Executor):
    """A pool of `workers` local processes (forkserver where available, else spawn)."""

    def __init__(self, workers: int, preload: Sequence[str] = ("sim.lab.cell_tasks",)):
        if workers < 1:
            raise ConfigError("--workers", f"must be at least 1, got {workers}", "integers >= 1")
        self.workers = workers
        methods = multiprocessing.get_all_start_methods()
        self._ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(list(preload))
        self._pool: ProcessPoolExecutor | None = None

    def describe(self):
        return f"{self.workers} local processes"

    def map_unordered(self, fn, tasks):
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._ctx)
        futures: dict[Future, int] = {self._pool.submit(_call, fn, args): i for i, args in enumerate(tasks)}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=futures.get):
                    yield futures[fut], _unwrap(fut.result())
        finally:
            for fut in futures:
                fut.cancel()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Tasks on the Ray cluster at address ('HOST:PORT' of a head node, 'auto', or 'ray://HOST:10001')."""

    def __init__(self, address: str):
        if ray is None:
            raise ConfigError("--ray", RAY_MISSING)
        self.address = address
        _check_reachable(address)
        try:
            ray.init(address=address, runtime_env=_ray_runtime_env(), log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError("--ray", f"cannot connect to a Ray cluster at {address!r}: {e}",
                              "HOST:PORT of a running head node (`ray start --head`), auto, or ray://HOST:PORT") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_call)

    def describe(self):
        return f"Ray at {self.address} ({self.workers} CPUs)"

    def map_unordered(self, fn, tasks):
        refs = {self._remote.remote(fn, args): i for i, args in enumerate(tasks)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield refs[ref], _unwrap(ray.get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self):
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # disconnects this driver; the cluster keeps running


def _check_reachable(address: str) -> None:
    """ConfigError at once when a HOST:PORT address has nothing listening (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ConfigError("--ray", f"nothing answers at {address}: {e.strerror or e}",
                          "HOST:PORT of a running head node (`ray start --head`), auto, or ray://HOST:PORT") from None


def _ray_runtime_env() -> dict:
    """Ship this checkout to the workers (so they run this code), unless servesim runs from an installed copy."""
    if not (_REPO_ROOT / "pyproject.toml").exists():
        return {}
    return {"working_dir": str(_REPO_ROOT), "excludes": _RAY_EXCLUDES}


def make_executor(workers: int | None = None, ray_address: str | None = None, tasks: int | None = None) -> Executor:
    """The executor for a run: Ray at ray_address if given, else `workers` local processes (default: this
    machine's CPUs, never more than `tasks`); one worker runs in this process."""
    if ray_address:
        return RayExecutor(ray_address)
    n = local_cpus() if workers is None else workers
    if n < 1:
        raise ConfigError("--workers", f"must be at least 1, got {n}", "integers >= 1")
    if tasks is not None:
        n = min(n, max(tasks, 1))
    return SerialExecutor() if n == 1 else ProcessExecutor(n)
