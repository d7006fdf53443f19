"""ComputeLogprobs requests are checked field by field before anything reaches Triton."""

from __future__ import annotations

import json

import pytest

from services.common.rpc import FieldError
from services.genproto.rlhf.v1 import reference_pb2
from services.reference.scorer import ModelLimits, chunk_arrays, model_limits
from services.reference.servicer import checked_sequences
from services.reference.settings import ReferenceSettings

LIMITS = ModelLimits(vocab_size=100, max_positions=16)


def settings(**overrides) -> ReferenceSettings:
    return ReferenceSettings(model_dir="/models/ref", **overrides)


def request(*sequences, model: str = "") -> reference_pb2.ComputeLogprobsRequest:
    return reference_pb2.ComputeLogprobsRequest(
        model=model,
        sequences=[
            reference_pb2.TokenSequence(prompt_token_ids=p, response_token_ids=r)
            for p, r in sequences
        ],
    )


def test_a_valid_request_becomes_token_lists():
    assert checked_sequences(
        request(([1, 2], [3]), ([4], [5, 6]), model="reference"), settings(), LIMITS
    ) == [
        ([1, 2], [3]),
        ([4], [5, 6]),
    ]


@pytest.mark.parametrize(
    ("bad", "overrides", "field", "message"),
    [
        (request(), {}, "sequences", "empty batch"),
        (
            request(([1], [2]), ([1], [2])),
            {"max_sequences": 1},
            "sequences",
            "2 sequences exceed the limit of 1",
        ),
        (request(([1], [2]), ([], [2])), {}, "sequences[1].prompt_token_ids", "empty prompt"),
        (request(([1], [])), {}, "sequences[0].response_token_ids", "empty response"),
        (
            request(([1, 100], [2])),
            {},
            "sequences[0].prompt_token_ids[1]",
            "token id 100 is outside the vocabulary [0, 100)",
        ),
        (request(([1], [2, 3, 250])), {}, "sequences[0].response_token_ids[2]", "token id 250"),
        (
            request(([1] * 10, [2] * 7)),
            {},
            "sequences[0]",
            "17 tokens exceed the model's limit of 16",
        ),
        (
            request(([1] * 5, [2] * 5)),
            {"max_total_tokens": 8},
            "sequences[0]",
            "10 tokens exceed the model's limit of 8",
        ),
        (request(([1], [2]), model="policy"), {}, "model", "unknown model 'policy'"),
    ],
)
def test_bad_requests_name_the_field(bad, overrides, field, message):
    with pytest.raises(FieldError) as error:
        checked_sequences(bad, settings(**overrides), LIMITS)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ") and message in str(error.value)


def test_limits_come_from_the_model_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 49152, "max_position_embeddings": 8192})
    )
    assert model_limits(tmp_path) == ModelLimits(49152, 8192)


def test_chunk_arrays_right_pad_and_carry_lengths():
    arrays = chunk_arrays([([1, 2], [3]), ([4], [5, 6, 7])])
    assert arrays["TOKEN_IDS"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert arrays["PROMPT_LENGTHS"].tolist() == [[2], [1]]
    assert arrays["RESPONSE_LENGTHS"].tolist() == [[1], [3]]


def test_settings_read_their_env_prefixes(monkeypatch):
    monkeypatch.setenv("RLHF_REFERENCE_MODEL_DIR", "/models/smollm2")
    monkeypatch.setenv("RLHF_REFERENCE_GRPC_PORT", "6000")
    monkeypatch.setenv("RLHF_TRITON_URL", "triton:8001")
    loaded = ReferenceSettings()
    assert str(loaded.model_dir) == "/models/smollm2"
    assert loaded.grpc.port == 6000 and loaded.grpc.metrics_port == 9103
    assert loaded.triton.url == "triton:8001"
