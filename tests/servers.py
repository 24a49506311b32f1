"""Real server processes for tests: an `mlflow server` on 127.0.0.1 with a SQLite backend, and an
Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) with its DICOMweb plugin."""
from __future__ import annotations

import json
import os
import shutil
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


ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"  # /usr/sbin: on root's PATH only
ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_missing() -> list[str]:
    """What of Orthanc + its DICOMweb plugin is not installed here (empty: all there)."""
    return [what for what, there in (("Orthanc (apt: orthanc)", os.path.exists(ORTHANC)),
                                     (f"{ORTHANC_PLUGIN} (apt: orthanc-dicomweb)", os.path.exists(ORTHANC_PLUGIN)))
            if not there]


class OrthancServer:
    """``Orthanc CONFIG.json`` in the foreground, its storage and index under ``workdir``: HTTP on
    127.0.0.1:``port`` only (RemoteAccessAllowed false), no users, the DICOMweb plugin at
    ``/dicom-web/``. The DICOM (DIMSE) listener is off: it would bind every interface and the tests
    do not use it (its port is still a free one). start() and stop() as often as a test needs: the
    storage survives, so a restarted server holds what it held."""

    def __init__(self, workdir, port: int | None = None):
        self.workdir = str(workdir)
        self.port = port or free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.root}/dicom-web"
        self.proc = None
        self.config = os.path.join(self.workdir, "orthanc.json")
        with open(self.config, "w") as handle:
            json.dump({"Name": "medmoco-test", "HttpPort": self.port, "DicomPort": free_port(),
                       "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                       "StorageDirectory": os.path.join(self.workdir, "storage"),
                       "IndexDirectory": os.path.join(self.workdir, "index"), "SaveJobs": False,
                       "Plugins": [ORTHANC_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}},
                      handle, indent=1)

    def start(self) -> "OrthancServer":
        log = open(os.path.join(self.workdir, "orthanc.log"), "a")
        self.proc = subprocess.Popen([ORTHANC, self.config], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                with open(os.path.join(self.workdir, "orthanc.log")) as handle:
                    raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {handle.read()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.dicomweb}/studies", timeout=2)  # the plugin answers: ready
                return self
            except Exception:
                time.sleep(0.2)
        self.stop(kill=True)
        raise TimeoutError(f"Orthanc on {self.root} did not answer within 60 s")

    def stop(self, kill: bool = False) -> None:
        """Stop it by PID (SIGKILL with ``kill``: it vanishes as a crashed host would)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def upload(self, paths) -> list[str]:
        """Store DICOM files through the REST API (``POST /instances``, the raw file): RSNA's files
        carry no SOPClassUID, which Orthanc's STOW-RS refuses. Returns Orthanc's instance ids."""
        ids = []
        for path in paths:
            with open(path, "rb") as handle:
                request = urllib.request.Request(f"{self.root}/instances", data=handle.read(), method="POST",
                                                 headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                ids.append(json.load(answer)["ID"])
        return ids

    def rest(self, path: str, method: str = "GET", body: str | None = None):
        """Orthanc's REST API: ``rest("/tools/lookup", "POST", uid)``, ``rest(path, "DELETE")``."""
        request = urllib.request.Request(f"{self.root}{path}", method=method,
                                         data=body.encode() if body is not None else None)
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read()
        return json.loads(text) if text else None
