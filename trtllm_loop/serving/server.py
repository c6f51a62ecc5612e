"""Start/stop a Triton Inference Server on 127.0.0.1 for a model repository.

Binary: ``$TRITONSERVER`` if set, else the system ``tritonserver`` (NGC container: ``/opt/tritonserver``), else
the server bundled in the ``nvidia-pytriton`` wheel (Triton 2.51 with the Python backend; runs on CPU-only
machines). For the bundled server (``shared/docs/triton.md`` section 5.4): the Python-backend stub matching
this interpreter is copied into a small backend directory, ``LD_LIBRARY_PATH`` gets this interpreter's
``LIBDIR`` (the stub embeds libpython) and ``nvidia_pytriton.libs``, this venv's ``bin`` goes first on ``PATH``
(the stub takes ``sys.prefix`` from ``python3`` on ``PATH``), and numpy must be < 2.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from trtllm_loop.errors import UserError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port_free(port: int, what: str) -> None:
    """A clear error when ``port`` on 127.0.0.1 is taken (another server would answer our readiness probe)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise UserError(f"{what} port {port} on {HOST} is already in use ({e.strerror}): stop the process "
                            f"listening there (e.g. `ss -ltnp 'sport = :{port}'`) or choose another port") from None


def _bundled() -> tuple[Path, Path, Path]:
    """(tritonserver binary, backends dir with the matching stub, nvidia_pytriton.libs)."""
    try:
        import pytriton
    except ImportError:
        raise UserError("no tritonserver found: install the serving extra (pip install -e '.[serving]', which "
                        "brings nvidia-pytriton==0.7.0 and its bundled server) or run inside the NGC Triton "
                        "container, or set TRITONSERVER=/path/to/tritonserver") from None
    pt = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = pt.parent.parent / "nvidia_pytriton.libs"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = pt / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no Python-backend stub for Python {ver} ({stub}); use Python 3.8-3.13")
    cache = Path(os.environ.get("TRTLLM_LOOP_CACHE", Path.home() / ".cache" / "trtllm-loop"))
    backends = cache / f"tritonserver-backends-py{ver}-{stub.stat().st_size}"
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".backends.", dir=cache))
        shutil.copytree(pt / "backends", tmp / "b")
        shutil.copy2(stub, tmp / "b" / "python" / "triton_python_backend_stub")
        try:
            os.replace(tmp / "b", backends)
        except OSError:  # a concurrent start won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return pt / "bin" / "tritonserver", backends, libs


def locate() -> dict:
    """How to run tritonserver here: ``{"binary", "backends", "env", "kind"}``."""
    env = dict(os.environ)
    explicit = os.environ.get("TRITONSERVER")
    system = explicit or shutil.which("tritonserver") or (
        "/opt/tritonserver/bin/tritonserver" if os.path.exists("/opt/tritonserver/bin/tritonserver") else None)
    if system:
        b = Path(system).resolve()
        backends = b.parent.parent / "backends"
        return {"binary": b, "backends": backends if backends.is_dir() else None, "env": env, "kind": "system"}
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise UserError(f"numpy {numpy.__version__} breaks the bundled Triton 2.51 Python backend (STRING tensors "
                        "arrive corrupted): pip install 'numpy<2'")
    binary, backends, libs = _bundled()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    soname = f"libpython{ver}.so.1.0"
    if not (Path(libdir) / soname).exists():
        import ctypes.util

        if ctypes.util.find_library(f"python{ver}") is None:
            raise UserError(f"the Triton Python-backend stub needs the shared library {soname}, which this "
                            f"interpreter ({sys.executable}) does not have: use a Python built with --enable-shared "
                            f"(Debian/Ubuntu: apt-get install libpython{ver}; pyenv: "
                            "PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...)")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return {"binary": binary, "backends": backends, "env": env, "kind": "pytriton"}


class TritonServer:
    """``with TritonServer(repo) as s: ...`` -- loopback only, free ports unless given.

    ``exit_timeout`` bounds Triton's shutdown (``--exit-timeout-secs``; Triton's default is 30 s): it waits
    for in-flight requests and for the Python-backend stubs, which take ~6 s to exit once torch and
    transformers are imported (measured on 2 CPU cores), so keep it well above that."""

    def __init__(self, repo: str | Path, *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 log_path: str | Path | None = None, exit_timeout: int = 30, verbose: int = 0, stream_log=None):
        self.repo = Path(repo).resolve()
        if not (self.repo.is_dir() and any(self.repo.glob("*/config.pbtxt"))):
            raise UserError(f"{self.repo}: not a Triton model repository (no */config.pbtxt); render one with "
                            "`trtllm-loop triton-repo`")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.exit_timeout = exit_timeout
        self.verbose = verbose
        self.log_path = Path(log_path) if log_path else None
        self.stream_log = stream_log
        self.proc: subprocess.Popen | None = None
        self._log = None
        # the id our server reports in its metadata: readiness counts only when this one answers
        self.server_id = f"trtllm-loop-{uuid.uuid4().hex[:12]}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def command(self, loc: dict) -> list[str]:
        cmd = [str(loc["binary"]), f"--model-repository={self.repo}",
               f"--http-address={HOST}", f"--grpc-address={HOST}", f"--http-port={self.http_port}",
               f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
               f"--metrics-address={HOST}",  # every endpoint on loopback only
               f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.verbose}", f"--id={self.server_id}"]
        if loc["backends"]:
            cmd.append(f"--backend-directory={loc['backends']}")
        if loc["kind"] == "pytriton":  # no GPU/DCGM here: skip those collectors
            cmd += ["--allow-gpu-metrics=false", "--allow-cpu-metrics=false"]
        return cmd

    def start(self, timeout: float = 180.0) -> "TritonServer":
        loc = locate()
        self.kind = loc["kind"]
        for what, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            check_port_free(port, what)
        if self.log_path:
            self._log = open(self.log_path, "wb")
            out = self._log
        else:
            out = self.stream_log if self.stream_log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(loc), env=loc["env"], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise UserError(f"tritonserver exited with code {self.proc.returncode} while loading {self.repo}"
                                f"{': ' + tail if tail else ''}")
            try:
                if self.ready():
                    return self
            except UserError:
                self.stop()
                raise
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise UserError(f"tritonserver not ready after {timeout:.0f} s{': ' + tail if tail else ''}")

    def ours(self) -> bool:
        """The server answering on our HTTP port is the one we started (its metadata names our ``--id``)."""
        import json

        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=2) as r:
                return json.loads(r.read()).get("name") == self.server_id
        except Exception:
            return False

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
        except Exception:
            return False
        if not self.ours():
            raise UserError(f"another server answers on {self.http_url} (its metadata does not name "
                            f"{self.server_id}): the port was taken after the check; choose another --http-port")
        return True

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def log_tail(self, n: int = 25) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        if self._log:
            self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        keep = [ln for ln in lines if ln[:1] in ("E", "W") or "error" in ln.lower()] or lines
        return "\n".join(keep[-n:])

    def stop(self) -> int | None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # SIGINT is ignored by background processes of non-interactive shells
            try:
                p.wait(timeout=self.exit_timeout + 10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the server and its stubs
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        if self._log:
            self._log.close()
            self._log = None
        return None if p is None else p.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
