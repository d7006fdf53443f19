"""The skeleton every model service shares (KServe's `Model`): a gRPC front end over one model
that runs inside Triton. A service is a subclass that says only what differs: its settings
(a `ModelServiceSettings`), its Triton model, and what it puts in front of it.

    class RewardService(ModelService):
        name = "reward"
        settings_type = RewardSettings

        @classmethod
        def triton_spec(cls, settings):
            return python_model_spec(settings, "services.reward.triton_model:RewardTritonModel",
                                     INPUTS, OUTPUTS, version=settings.model_version, ...)

        def __init__(self, settings, registry=None):
            super().__init__(settings, registry)     # the gRPC server, not started
            ...                                     # connect to the model, self.server.add(...)

        def close(self): ...                        # what __init__ opened

    python -m services.reward               # RewardService.main(): serve until SIGTERM
    python -m services.reward repository    # write the Triton model repository and exit

What `launch` (and so `python -m services.<name>`) does:
1. with `model_repository` set (local runs, tests), write the Triton model there and have Triton
   load it; in Kubernetes the init container ran `repository` and Triton loaded it at start;
2. construct the service: the subclass connects to its model and adds its servicer;
3. serve gRPC (health SERVING) and /metrics;
4. watch Triton (`TritonWatch`, every `triton_health_interval_s`): while Triton does not serve
   the model, health is NOT_SERVING and calls fail at once with UNAVAILABLE; when Triton is back
   (and, in local runs, the model reloaded), the service serves again.
SIGTERM: health goes NOT_SERVING, in-flight calls finish, then `close` releases what step 2 made.
"""

from __future__ import annotations

import logging
import sys
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Self

from prometheus_client import CollectorRegistry, Gauge

from services.common.entry import run
from services.common.grpc_server import ModelServer
from services.common.logging import configure_logging
from services.common.settings import ModelServiceSettings
from services.common.triton_client import connect, load_model, write_and_load
from services.common.triton_repo import PythonModelSpec, TensorIO, write_model

log = logging.getLogger(__name__)


def python_model_spec(
    settings: ModelServiceSettings,
    python_class: str,
    inputs: tuple[TensorIO, ...],
    outputs: tuple[TensorIO, ...],
    *,
    decoupled: bool = False,
    **parameters: object,
) -> PythonModelSpec:
    """A service's Triton model from its settings: name, batching, device and dtype, and the
    model folder plus `parameters` as the string parameters its `initialize` reads. The folder
    is made absolute because Triton resolves it from its own working directory."""
    return PythonModelSpec(
        name=settings.triton_model,
        python_class=python_class,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=settings.triton_max_batch_size,
        max_queue_delay_us=settings.triton_queue_delay_us,
        decoupled=decoupled,
        device=settings.device,
        dtype=settings.dtype,
        parameters={
            "model_dir": str(Path(settings.model_dir).resolve()),
            **{key: str(value) for key, value in parameters.items()},
        },
    )


class TritonWatch:
    """Polls Triton's readiness of one model and sets the server's health and admission by it.

    With a `model_repository` (local runs), a Triton that is live again without the model (a
    restarted explicit-mode server) is asked to load it; in Kubernetes the restarted Triton
    container loads its repository by itself."""

    def __init__(self, service: ModelService, registry: CollectorRegistry):
        self.service = service
        self.settings = service.settings
        self.ready_gauge = Gauge(
            f"rlhf_{service.name}_triton_model_ready",
            "1 while Triton serves this service's model, else 0 (health and admission follow).",
            registry=registry,
        )
        self.ready_gauge.set(1)
        self._stop = threading.Event()
        self._client = None
        self._thread = threading.Thread(target=self._run, name="triton-watch", daemon=True)

    def start(self) -> None:
        if self.settings.triton_health_interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._client is not None:
            self._client.close()

    def model_ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        s = self.settings
        timeout = max(1.0, min(5.0, s.triton_health_interval_s))
        try:
            if self._client is None:
                self._client = connect(s.triton)
            if self._client.is_model_ready(s.triton_model, client_timeout=timeout):
                return True
            if s.model_repository is not None and self._client.is_server_live(
                client_timeout=timeout
            ):
                log.info("triton is back without the model: loading it")
                load_model(s.triton, s.triton_model)
                return self._client.is_model_ready(s.triton_model, client_timeout=timeout)
            return False
        except InferenceServerException:
            return False

    def _run(self) -> None:
        ready = True
        while not self._stop.wait(self.settings.triton_health_interval_s):
            now = self.model_ready()
            if now != ready:
                ready = now
                self.ready_gauge.set(int(ready))
                self.service.server.set_serving(ready)
                log.warning(
                    "triton model %s",
                    "ready: serving" if ready else "not ready: NOT_SERVING",
                    extra={"fields": {"model": self.settings.triton_model}},
                )


class ModelService(ABC):
    """One running model service: its settings, its gRPC server (`server`), and what the
    subclass's constructor opened, released by `close`."""

    name: ClassVar[str]
    """`policy`, `reward`, ...: the metrics' prefix (`rlhf_<name>_*`), the logs, the usage line."""
    settings_type: ClassVar[type[ModelServiceSettings]]
    control_methods: ClassVar[tuple[str, ...]] = ()
    """Full method names that change what is served: only callers with the control token."""

    def __init__(self, settings: ModelServiceSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.server = ModelServer(self.name, settings.grpc, registry, self.control_methods)
        self.triton_watch = TritonWatch(self, self.server.registry)
        self._stopped = False

    @classmethod
    @abstractmethod
    def triton_spec(cls, settings: ModelServiceSettings) -> PythonModelSpec:
        """The service's Triton model (`python_model_spec`)."""

    def close(self) -> None:
        """Releases what the constructor opened (Triton clients, threads, producers)."""

    @property
    def address(self) -> str:
        """host:port of the gRPC server on this machine, once started."""
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> int:
        """Serves gRPC and /metrics, and starts watching Triton; returns the gRPC port."""
        port = self.server.start()
        self.triton_watch.start()
        return port

    def stop(self, grace_s: float | None = None) -> None:
        """Drains and stops the gRPC server, then closes; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self.triton_watch.stop()
        self.server.stop(grace_s)
        self.close()

    @classmethod
    def write_triton_model(cls, settings: ModelServiceSettings) -> Path:
        """Writes the Triton model into `settings.model_repository`; returns its folder."""
        return write_model(settings.model_repository, cls.triton_spec(settings))

    @classmethod
    def launch(
        cls, settings: ModelServiceSettings, registry: CollectorRegistry | None = None
    ) -> Self:
        """Steps 1-3 of the module docstring: the service, serving."""
        write_and_load(settings, cls.write_triton_model)
        service = cls(settings, registry)
        service.start()
        return service

    @classmethod
    def serve(cls) -> None:
        """`python -m services.<name>`: launch from the environment, serve until SIGTERM."""
        configure_logging(cls.name)
        service = cls.launch(cls.settings_type())
        service.server.install_signal_handlers()
        service.server.wait()
        service.stop(0)

    @classmethod
    def write_repository(cls) -> int:
        """`python -m services.<name> repository`: writes the Triton model repository from the
        environment and exits (the Helm chart's init container runs it)."""
        settings = cls.settings_type()
        if settings.model_repository is None:
            prefix = cls.settings_type.model_config.get("env_prefix", "")
            print(f"{prefix}MODEL_REPOSITORY is not set", file=sys.stderr)
            return 2
        print(cls.write_triton_model(settings))
        return 0

    @classmethod
    def main(cls) -> int:
        """The body of `services/<name>/__main__.py`."""
        return run(cls.name, cls.serve, {"repository": cls.write_repository})
