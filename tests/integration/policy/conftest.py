"""One real policy service (Triton model + gRPC server) for the whole policy test package, and
the same tiny model in process as the reference."""

from __future__ import annotations

import grpc
import pytest
import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.genproto.rlhf.v1 import policy_pb2_grpc
from tests.support.policy_stack import policy_stack

LIMITS = {
    "max_n": 4,
    "max_sequences_per_request": 8,
    "max_queued_sequences": 10,
    "max_total_tokens": 512,
}


@pytest.fixture(scope="session")
def policy(triton_server, kafka_settings, tiny_lm_dir, tmp_path_factory):
    with policy_stack(
        triton_server, kafka_settings, tiny_lm_dir, tmp_path_factory.mktemp("policy"), **LIMITS
    ) as stack:
        yield stack


@pytest.fixture(scope="session")
def channel(policy):
    channel = grpc.insecure_channel(
        policy.address, options=[("grpc.max_send_message_length", 256 << 20)]
    )
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def stub(channel):
    return policy_pb2_grpc.PolicyServiceStub(channel)


@pytest.fixture(scope="session")
def reference(tiny_lm_dir):
    """The served model's initial weights, in process (float32 on CPU)."""
    return load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32), load_tokenizer(
        tiny_lm_dir
    )
