"""wait_healthy: how the benchmarks wait for a server process they started (ours or a peer)."""
import subprocess
import sys

import pytest

from sim.lab.http_bench import wait_healthy
from tests.server_harness import free_port

HEALTH_AFTER_A_WHILE = """
import http.server, sys, time
time.sleep(0.3)  # not listening at first: the first polls are refused
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_waits_until_health_answers():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HEALTH_AFTER_A_WHILE, str(port)])
    try:
        seconds = wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=30, poll_s=0.05)
        assert 0.3 <= seconds < 30
    finally:
        proc.kill()
        proc.wait()


def test_a_server_that_exits_is_an_error_with_its_exit_code():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, timeout_s=30, poll_s=0.05)


def test_a_server_that_never_answers_times_out():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(TimeoutError, match="within 0.3 s"):
            wait_healthy(f"http://127.0.0.1:{free_port()}", proc, timeout_s=0.3, poll_s=0.05)
    finally:
        proc.kill()
        proc.wait()
