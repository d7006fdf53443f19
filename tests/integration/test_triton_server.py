"""The real Triton server: a torch model's output fetched with tritonclient equals the same
model run in process, and the dynamic batcher really groups concurrent requests."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from deploy.local.probe_model import IN_FEATURES, probe_spec, save_probe
from services.common.triton_repo import write_model


@pytest.fixture(scope="module")
def probe(triton_server, run_dir):
    weights = run_dir / "probe.safetensors"
    model = save_probe(weights, seed=3)
    write_model(triton_server.model_repository, probe_spec(weights))
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.load_model("probe")
    assert client.is_model_ready("probe")
    yield model, client
    client.unload_model("probe")
    client.close()


def _infer(client, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        "probe",
        [inp],
        outputs=[
            grpcclient.InferRequestedOutput("OUTPUT"),
            grpcclient.InferRequestedOutput("BATCH_SIZE"),
        ],
    )
    return result.as_numpy("OUTPUT"), result.as_numpy("BATCH_SIZE")


def test_triton_output_equals_in_process(probe):
    model, client = probe
    x = np.random.default_rng(0).standard_normal((5, IN_FEATURES)).astype(np.float32)
    served, _ = _infer(client, x)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    assert served.shape == expected.shape == (5, 4)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


def test_dynamic_batching_groups_concurrent_requests(probe, triton_server):
    model, _ = probe
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, IN_FEATURES)).astype(np.float32) for _ in range(24)]
    results: list = [None] * len(inputs)

    def call(i: int) -> None:
        c = grpcclient.InferenceServerClient(triton_server.grpc_url)
        results[i] = _infer(c, inputs[i])
        c.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.inference_mode():
        for x, (out, _) in zip(inputs, results):
            np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), atol=1e-6)
    # At least one execution saw more than one request: the dynamic batcher is on.
    assert max(int(bs[0, 0]) for _, bs in results) > 1


def test_the_triton_image_ships_the_server_version_the_tests_run(triton_server):
    """docker/triton.Dockerfile builds on NVIDIA's release that ships this server version; the
    Python-backend stub it swaps in (from the nvidia-pytriton wheel) is built for that version."""
    dockerfile = (Path(__file__).resolve().parents[2] / "docker" / "triton.Dockerfile").read_text()
    declared = re.search(r"^ARG TRITON_SERVER_VERSION=(\S+)$", dockerfile, re.MULTILINE).group(1)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.get_server_metadata().version == declared
    finally:
        client.close()
