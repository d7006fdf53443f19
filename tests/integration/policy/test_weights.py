"""Weight updates on the real service: a valid push swaps the served model, a bad one is refused
with its reason while the old version keeps serving, clients generating during several pushes
see no error and only served versions, and a replica catches up from rlhf.weights.v1. Pushes go
through the UpdateWeights stream and through the side channel (BLAKE3-checked bytes over raw TCP,
services/common/side_channel.py), as the trainer sends them."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import grpc
import pytest
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.control_auth import control_metadata
from services.common.digest import BLAKE3
from services.common.kafka import make_producer
from services.common.models import load_causal_lm, load_tokenizer
from services.common.topics import WEIGHTS
from services.genproto.rlhf.v1 import common_pb2, events_pb2, policy_pb2
from services.trainer.weights_push import (
    SIDE_CHANNEL,
    STREAM,
    iter_requests,
    push,
    push_all,
    update_weights_call,
)
from tests.support.push import build_manifest, push_folder
from tests.support.tiny_models import tiny_causal_lm

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """Same architecture, other random weights."""
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm-seed1"), seed=1)


@pytest.fixture(scope="module")
def restore(channel, policy, tiny_lm_dir):
    """Leaves the session's service serving the original weights again (as a newer version)."""
    yield
    response = push_folder(channel, tiny_lm_dir, policy.weights_version + 1)
    assert response.accepted, response.reason


def greedy(stub) -> policy_pb2.Sample:
    request = policy_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=PROMPT)],
        sampling=policy_pb2.SamplingParams(n=1, max_new_tokens=8),
    )
    return stub.Generate(request, timeout=60).completions[0].samples[0]


def in_process_greedy(folder) -> list[int]:
    model, tok = load_causal_lm(folder, torch.device("cpu"), torch.float32), load_tokenizer(folder)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8
    )[0, ids.shape[1] :].tolist()


def test_valid_push_swaps_the_served_model(stub, channel, policy, other_weights, restore):
    old = policy.weights_version
    response = push_folder(channel, other_weights, old + 1, chunk_bytes=1 << 20)
    assert response.accepted, response.reason
    assert response.weights_version == old + 1
    assert response.bytes_received == (other_weights / "model.safetensors").stat().st_size
    assert stub.GetModelInfo(policy_pb2.GetModelInfoRequest()).weights_version == old + 1
    sample = greedy(stub)
    assert sample.weights_version == old + 1
    assert list(sample.token_ids) == in_process_greedy(other_weights)
    assert policy.registry.get_sample_value("rlhf_policy_weights_version") == old + 1


def test_a_push_of_ordinary_protobuf_messages_is_accepted(stub, policy, other_weights, restore):
    """The service parses the stream itself (weights_wire); a client that sends generated
    protobuf messages, as any other language's client would, is served the same."""
    version = policy.weights_version + 1
    manifest = build_manifest(other_weights, version)
    data = (other_weights / "model.safetensors").read_bytes()
    step = 100_000
    requests = [policy_pb2.UpdateWeightsRequest(manifest=manifest)] + [
        policy_pb2.UpdateWeightsRequest(
            chunk=policy_pb2.WeightsChunk(
                file_name="model.safetensors", offset=o, data=data[o : o + step]
            )
        )
        for o in range(0, len(data), step)
    ]
    response = stub.UpdateWeights(iter(requests), timeout=120, metadata=control_metadata())
    assert response.accepted, response.reason
    assert (response.weights_version, response.bytes_received) == (version, len(data))
    assert list(greedy(stub).token_ids) == in_process_greedy(other_weights)


def test_a_malformed_chunk_message_is_refused(stub, channel, policy, other_weights, restore):
    before = policy.weights_version
    manifest = build_manifest(other_weights, before + 1)
    requests = [
        policy_pb2.UpdateWeightsRequest(manifest=manifest).SerializeToString(),
        b"\x12\x09\x0a\x05model",
    ]  # a chunk whose length says 9 bytes, with 7
    response = update_weights_call(channel)(iter(requests), timeout=60, metadata=control_metadata())
    assert not response.accepted
    assert "malformed chunk message" in response.reason
    assert response.weights_version == before == policy.weights_version


def test_a_first_message_that_is_not_a_manifest_is_invalid(channel):
    with pytest.raises(grpc.RpcError) as err:
        update_weights_call(channel)(iter([b"\x12\x00"]), timeout=60, metadata=control_metadata())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be the manifest" in err.value.details()


def refused(stub, channel, policy, folder, version, manifest, expect_reason: str) -> None:
    before_version, before = policy.weights_version, list(greedy(stub).token_ids)
    response = push_folder(channel, folder, version, manifest=manifest)
    assert not response.accepted
    assert expect_reason in response.reason
    assert response.weights_version == before_version
    sample = greedy(stub)
    assert sample.weights_version == before_version
    assert list(sample.token_ids) == before


def test_wrong_checksum_is_refused_and_old_version_serves(
    stub, channel, policy, other_weights, restore
):
    manifest = build_manifest(other_weights, policy.weights_version + 1)
    manifest.file_sha256["model.safetensors"] = "0" * 64
    refused(stub, channel, policy, other_weights, policy.weights_version + 1, manifest, "sha256")


def test_wrong_shape_is_refused_and_old_version_serves(stub, channel, policy, tmp_path, restore):
    wider = tiny_causal_lm(tmp_path / "wider", hidden=96)
    manifest = build_manifest(wider, policy.weights_version + 1)
    refused(stub, channel, policy, wider, policy.weights_version + 1, manifest, "shape")


def test_manifest_that_lies_about_the_file_is_refused(
    stub, channel, policy, tmp_path, other_weights, restore
):
    wider = tiny_causal_lm(tmp_path / "wider", hidden=96)
    honest = build_manifest(other_weights, policy.weights_version + 1)
    lying = build_manifest(wider, policy.weights_version + 1)
    del lying.tensors[:]
    lying.tensors.extend(honest.tensors)  # claims the served shapes, sends wider tensors
    refused(stub, channel, policy, wider, policy.weights_version + 1, lying, "files vs manifest")


def test_stale_version_is_refused(stub, channel, policy, other_weights, restore):
    manifest = build_manifest(other_weights, policy.weights_version)
    refused(stub, channel, policy, other_weights, policy.weights_version, manifest, "not newer")


def test_clients_see_no_error_during_several_pushes(
    stub, channel, policy, other_weights, tiny_lm_dir, restore
):
    served = {policy.weights_version}
    errors, seen = [], []
    stop = threading.Event()

    def client(i: int) -> None:
        request = policy_pb2.GenerateRequest(
            prompts=[common_pb2.Prompt(text=f"{PROMPT} {i}")],
            sampling=policy_pb2.SamplingParams(
                n=1, max_new_tokens=6, temperature=0.7, seed=i, has_seed=True
            ),
        )
        while not stop.is_set():
            try:
                response = stub.Generate(request, timeout=60)
                seen.extend(s.weights_version for c in response.completions for s in c.samples)
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for k, folder in enumerate([other_weights, tiny_lm_dir, other_weights]):
            time.sleep(0.3)
            response = push_folder(channel, folder, policy.weights_version + 1)
            assert response.accepted, response.reason
            served.add(response.weights_version)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(seen) > 8
    assert set(seen) <= served
    assert len(set(seen)) >= 2, "the clients never saw a swap"
    assert max(seen) == policy.weights_version


def test_replica_catches_up_from_the_weights_topic(
    stub, policy, kafka_settings, other_weights, tmp_path, restore
):
    version = policy.weights_version + 1
    location = tmp_path / "announced"
    shutil.copytree(other_weights, location)
    manifest = build_manifest(location, version)
    created = Timestamp()
    created.GetCurrentTime()
    event = events_pb2.WeightsVersionEvent(
        model=policy.model_name,
        weights_version=version,
        file_sha256=dict(manifest.file_sha256),
        location=str(location),
        created_at=created,
    )
    producer = make_producer(kafka_settings)
    producer.send(WEIGHTS, key=policy.model_name, value=event).get(timeout=30)
    producer.close()
    deadline = time.monotonic() + 60
    while policy.weights_version != version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert policy.weights_version == version
    sample = greedy(stub)
    assert sample.weights_version == version
    assert list(sample.token_ids) == in_process_greedy(other_weights)


def test_a_push_without_the_control_token_changes_nothing(stub, channel, policy, other_weights):
    before = policy.weights_version
    served = list(greedy(stub).token_ids)
    manifest = build_manifest(other_weights, before + 1)
    for metadata in ([], [("authorization", "Bearer not-the-token")]):
        with pytest.raises(grpc.RpcError) as refused:
            update_weights_call(channel)(
                iter_requests(other_weights, manifest, 1 << 20), timeout=60, metadata=metadata
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert policy.weights_version == before
    assert list(greedy(stub).token_ids) == served


# The side channel -------------------------------------------------------------------------------


def test_a_side_channel_push_swaps_the_served_model(stub, policy, other_weights, restore):
    listener = policy.service.side_channel
    dropped = listener.dropped
    version = policy.weights_version + 1
    manifest = build_manifest(other_weights, version, digests=(BLAKE3,))
    result = push(policy.address, other_weights, manifest)
    assert result.accepted, result.reason
    assert (result.transport, result.serving_version) == (SIDE_CHANNEL, version)
    assert policy.weights_version == version
    sample = greedy(stub)
    assert sample.weights_version == version
    assert list(sample.token_ids) == in_process_greedy(other_weights)
    assert listener.live_tickets() == 0  # spent
    assert listener.dropped == dropped


def test_a_side_channel_push_with_a_wrong_blake3_digest_is_refused(
    stub, policy, other_weights, restore
):
    before, served = policy.weights_version, list(greedy(stub).token_ids)
    manifest = build_manifest(other_weights, before + 1, digests=(BLAKE3,))
    manifest.file_digest["model.safetensors"] = "0" * 64
    result = push(policy.address, other_weights, manifest)
    assert not result.accepted
    assert result.transport == SIDE_CHANNEL
    assert "blake3" in result.reason and "does not match" in result.reason
    assert result.serving_version == before == policy.weights_version
    assert list(greedy(stub).token_ids) == served


def test_a_side_channel_connection_without_the_token_is_dropped(stub, policy, other_weights):
    listener = policy.service.side_channel
    before, dropped = policy.weights_version, listener.dropped
    host = policy.address.rpartition(":")[0]
    with socket.create_connection((host, listener.port), timeout=10) as sock:
        try:  # a wrong token and the weights after it: the listener resets the connection
            sock.sendall(
                b"RLHFWSC1" + bytes(32) + (other_weights / "model.safetensors").read_bytes()
            )
            assert sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    deadline = time.monotonic() + 5
    while listener.dropped == dropped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.dropped == dropped + 1
    assert policy.weights_version == before


def test_a_side_channel_push_without_the_control_token_gets_no_ticket(policy, other_weights):
    before = policy.weights_version
    manifest = build_manifest(other_weights, before + 1, digests=(BLAKE3,))
    manifest.transport = policy_pb2.WeightsManifest.TRANSPORT_SIDE_CHANNEL
    with pytest.raises(grpc.RpcError) as refused:
        update_weights_call(grpc.insecure_channel(policy.address))(
            iter([manifest.SerializeToString()]), timeout=60, metadata=[]
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert policy.service.side_channel.live_tickets() == 0
    assert policy.weights_version == before


def test_a_replica_without_a_side_channel_is_streamed_to(stub, policy, other_weights, restore):
    updater = policy.service.servicer.updater
    listener, updater.side_channel = updater.side_channel, None
    try:
        version = policy.weights_version + 1
        (result,) = push_all(
            [policy.address], other_weights, build_manifest(other_weights, version, (BLAKE3,))
        )
    finally:
        updater.side_channel = listener
    assert result.accepted, result.reason
    assert (result.transport, result.serving_version) == (STREAM, version)
    assert list(greedy(stub).token_ids) == in_process_greedy(other_weights)
