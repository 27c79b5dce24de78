"""A throwaway Ray cluster on this machine's loopback, for tests and benchmarks of `--ray`.

    with local_ray_cluster(num_cpus=2) as address:     # '127.0.0.1:PORT'
        run_sweep(exp, out, ray_address=address)

It runs `ray start --head --block` in a session of its own with a private temp dir, so it never
touches another Ray on the machine, and stops exactly the processes it started: SIGTERM to
`ray start --block` ends its children (GCS, raylet, workers); the process group follows only if that
did not finish within a minute. Needs the ray extra.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reference.errors import ConfigError
from sim.lab.executors import RAY_MISSING, ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    """The `ray` command of this interpreter's environment."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ray")
    if found is None:
        raise ConfigError("--ray", "the `ray` command is not on PATH", "pip install -e '.[ray]'")
    return [found]


@contextmanager
def local_ray_cluster(num_cpus: int = 2, start_timeout_s: float = 300.0) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 with num_cpus CPUs; yields its address (HOST:PORT) and stops it on exit."""
    if ray is None:
        raise ConfigError("--ray", RAY_MISSING)
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    log = open(Path(temp) / "ray_start.log", "w")
    cmd = _ray_cli() + ["start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
                        "--temp-dir", temp, "--object-store-memory", str(200 * 2 ** 20)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_port(port, proc, start_timeout_s, Path(temp) / "ray_start.log")
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the session this function started, nothing else
                proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0 and "Ray runtime started" in log.read_text():
                return
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not come up within {timeout_s:.0f} s:\n{log.read_text()[-2000:]}")
