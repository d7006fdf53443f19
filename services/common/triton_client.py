"""Triton client helpers: connect with raised message limits, numpy in and out, decoupled streams.

The services talk to Triton over gRPC with `tritonclient`; these helpers keep the conversion
between numpy arrays and Triton tensors in one place.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from services.common.settings import TritonSettings


def connect(settings: TritonSettings) -> grpcclient.InferenceServerClient:
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]
    return grpcclient.InferenceServerClient(settings.url, channel_args=options)


def load_model(settings: TritonSettings, name: str) -> None:
    """Asks Triton (explicit model control) to load or reload model `name` from its repository."""
    client = connect(settings)
    try:
        client.load_model(name)
    finally:
        client.close()


def write_and_load(settings, write: Callable[[Any], Path]) -> None:
    """Writes a model service's Triton model into `settings.model_repository` with `write` and
    (re)loads it, when that is set (local runs and tests). Unset in Kubernetes: an init container
    writes the repository and Triton loads the model at start."""
    if settings.model_repository is None:
        return
    write(settings)
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
