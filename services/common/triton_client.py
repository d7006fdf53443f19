"""Triton client helpers: connect with raised message limits, numpy in and out, decoupled streams.

The services talk to Triton over gRPC with `tritonclient`; these helpers keep the conversion
between numpy arrays and Triton tensors in one place.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from services.common.settings import TritonSettings

log = logging.getLogger(__name__)


def connect(settings: TritonSettings) -> grpcclient.InferenceServerClient:
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]
    return grpcclient.InferenceServerClient(settings.url, channel_args=options)


LOAD_TIMEOUT_S = 600.0


def model_state(client: grpcclient.InferenceServerClient, name: str) -> str | None:
    """Triton's state of model `name` in its repository index ("READY", "UNAVAILABLE",
    "LOADING", ...), or None when the repository does not list it."""
    index = client.get_model_repository_index(as_json=True).get("models", [])
    states = [m.get("state", "") for m in index if m.get("name") == name]
    return "READY" if "READY" in states else (states[0] if states else None)


def load_model(settings: TritonSettings, name: str) -> None:
    """Asks Triton (explicit model control) to load or reload model `name` from its repository."""
    client = connect(settings)
    try:
        # Loading reads and builds the model: minutes on a busy CPU, not an inference deadline.
        client.load_model(name, client_timeout=max(settings.timeout_s, LOAD_TIMEOUT_S))
    finally:
        client.close()


def _folder_digest(folder: Path) -> str | None:
    """sha256 over the relative paths and bytes of every file under `folder` (None if absent)."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(
        p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write_and_load(settings, write: Callable[[Any], Path]) -> None:
    """Writes a model service's Triton model into `settings.model_repository` with `write` and
    loads it, when that is set (local runs and tests). Unset in Kubernetes: an init container
    writes the repository and Triton loads the model at start.

    A model that Triton already serves from exactly these files is left alone: a service that
    restarts (after a crash, say) attaches to it. Reloading it would not only cost the load; on
    Triton 2.51 it can kill the server. A reload loads the new instance before the old is gone,
    and the two Python-backend instances then share the custom metric family
    `rlhf_policy_model_generated_tokens_total`; the old one's teardown frees storage the new one
    still increments, and the server aborts with glibc heap corruption
    (triton-inference-server/server#8663). The chaos suite hit that in 4 of 6 restarts of a
    killed policy replica. Unloading first does not help: the killed process's streams keep the
    old instance UNLOADING for minutes."""
    if settings.model_repository is None:
        return
    folder = Path(settings.model_repository) / settings.triton_model
    before = _folder_digest(folder)
    write(settings)
    if before is not None and before == _folder_digest(folder):
        client = connect(settings.triton)
        try:
            ready = model_state(client, settings.triton_model) == "READY"
        finally:
            client.close()
        if ready:
            log.info(
                "Triton already serves this model from these files: not reloading it",
                extra={"fields": {"model": settings.triton_model}},
            )
            return
    load_model(settings.triton, settings.triton_model)


def make_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Triton inputs from numpy arrays; object/str arrays become BYTES tensors."""
    inputs = []
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind in ("U", "S", "O"):
            array = array.astype(np.object_)
            dtype = "BYTES"
        else:
            dtype = np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    arrays: dict[str, np.ndarray],
    outputs: list[str],
    timeout_s: float | None = None,
    request_id: str = "",
) -> dict[str, np.ndarray]:
    """One inference call; returns the requested outputs as numpy arrays."""
    result = client.infer(
        model,
        make_inputs(arrays),
        outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
        request_id=request_id,
        client_timeout=timeout_s,
    )
    return {o: result.as_numpy(o) for o in outputs}


def stream_infer(
    settings: TritonSettings,
    model: str,
    arrays: dict[str, np.ndarray],
    outputs: list[str],
    request_id: str = "",
    final_flag: str = "triton_final_response",
) -> Iterator[dict[str, np.ndarray]]:
    """Calls a decoupled model and yields each response as it arrives.

    Stops after the response flagged final. Closing the generator early cancels the stream,
    which Triton passes on to the model (`request.is_cancelled()`).
    """
    responses: queue.Queue = queue.Queue()
    client = connect(settings)

    def on_response(result, error):
        responses.put((result, error))

    client.start_stream(callback=on_response, stream_timeout=settings.timeout_s)
    try:
        client.async_stream_infer(
            model,
            make_inputs(arrays),
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            request_id=request_id,
            enable_empty_final_response=True,
        )
        while True:
            result, error = responses.get(timeout=settings.timeout_s)
            if error is not None:
                raise error
            params = result.get_response().parameters
            final = final_flag in params and params[final_flag].bool_param
            if result.get_response().outputs:
                yield {o: result.as_numpy(o) for o in outputs}
            if final:
                return
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
