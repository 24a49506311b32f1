"""Real server processes for tests: an `mlflow server` on 127.0.0.1 with a SQLite backend."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, timeout: float = 120) -> None:
    """Until ``url`` answers; raises with the process's stderr when it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(url)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port`` over ``workdir/server.db``; start() and stop() as often
    as a test needs (the store survives: same database and artifact folder)."""

    def __init__(self, workdir, port: int | None = None, app_name: str = "", env: dict | None = None):
        self.workdir = str(workdir)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.app_name = app_name  # "basic-auth": MLflow's users and permissions
        self.env = env or {}

    def start(self) -> "MlflowServer":
        app = ["--app-name", self.app_name] if self.app_name else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{os.path.join(self.workdir, 'server.db')}",
             "--artifacts-destination", os.path.join(self.workdir, "server-artifacts")] + app,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.workdir,
            env={**os.environ, **self.env}, start_new_session=True)  # its own process group: stop() takes its workers
        wait_http(f"{self.uri}/health", self.proc)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``: it vanishes as a crashed host would)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.time() + 20  # its port is free again when nothing answers there
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                time.sleep(0.2)
            except Exception:
                return
