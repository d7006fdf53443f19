"""Triton Inference Server, the binary carried by the `nvidia-pytriton` wheel, run directly on a
standard model repository (Python backend), as NVIDIA's Triton image runs it in production.

What the binary needs on a machine that is not NVIDIA's image:
- a backend folder whose `python/` holds the Python-backend stub built for this Python
  (`python_backend_stubs/3.11/triton_python_backend_stub`, copied beside `libtriton_python.so`);
- this Python's shared `libpython3.11` and the wheel's `nvidia_pytriton.libs` on LD_LIBRARY_PATH;
- the environment's `bin` on PATH and its site-packages plus the checkout on PYTHONPATH, so
  the models' `model.py` can import torch and `services.*`.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.process import Daemon, free_port, port_open

REPO_ROOT = Path(__file__).resolve().parents[2]


def pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def prepared_backends(cache: Path) -> Path:
    """A backend folder with the Python stub for this interpreter; built once per wheel version."""
    from importlib.metadata import version

    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = cache / f"triton-backends-{version('nvidia-pytriton')}-py{pyver}"
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    source = pytriton_dir() / "tritonserver"
    stub = source / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no Python-backend stub for Python {pyver}: {stub}")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / "backends", tmp, symlinks=True)
    shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    libdirs = [
        sysconfig.get_config_var("LIBDIR") or "",
        str(pytriton_dir().parent / "nvidia_pytriton.libs"),
    ]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [d for d in libdirs if d]
        + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), site])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class TritonServer:
    """tritonserver in explicit model-control mode; `grpc_url` is what `tritonclient` uses."""

    state_dir: Path
    model_repository: Path
    models: list[str] = field(default_factory=list)
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    cache_dir: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    """Extra environment of the server and so of its Python model stubs (thread counts...)."""

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.model_repository = Path(self.model_repository)
        self.cache_dir = Path(
            self.cache_dir or os.environ.get("RLHF_CACHE") or Path.home() / ".cache/rlhf-platform"
        )
        self.daemon = Daemon("tritonserver", self.state_dir)
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        backends = prepared_backends(self.cache_dir)
        argv = [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            "--exit-timeout-secs=15",
            # Tensors between the server and the Python stubs go through /dev/shm.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]
        argv += [f"--load-model={m}" for m in self.models]
        return argv

    def start(self, timeout_s: float = 300.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.daemon.start(
            self.argv(), env={**server_environment(), **self.environment}, cwd=self.state_dir
        )
        self.daemon.wait_ready(self._ready, timeout_s)

    def _ready(self) -> bool:
        if not port_open(self.grpc_port):
            return False
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            return client.is_server_ready() and all(client.is_model_ready(m) for m in self.models)
        finally:
            client.close()

    def stop(self) -> bool:
        return self.daemon.stop(timeout_s=30)

    @property
    def running(self) -> bool:
        return self.daemon.pid is not None
