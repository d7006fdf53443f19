"""Hostile input never crashes a consumer or a validator (hypothesis).

Every Kafka consumer's decoding, given any bytes or a corrupted real record, either yields a
usable record or raises the one error that sends the record to the DLQ; every gRPC request
validator either accepts a request or raises FieldError naming a field. No other exception
escapes, so no input can kill a consumer loop or turn into an INTERNAL error."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import topics
from services.common.preferences import Source, label_record, pair_record
from services.common.rpc import FieldError
from services.curator.server import read_record
from services.export.run import to_row
from services.genproto.rlhf.v1 import (
    common_pb2,
    events_pb2,
    policy_pb2,
    reference_pb2,
    reward_pb2,
)
from services.policy.validation import InvalidArgument, check_sampling
from services.policy.validation import Limits as PolicyLimits
from services.reference.scorer import ModelLimits
from services.reference.servicer import checked_sequences
from services.reference.settings import ReferenceSettings
from services.refresh.worker import Unusable, read_preference
from services.reward.servicer import checked_pairs
from services.reward.settings import RewardSettings
from services.trainer.loop import to_sample

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REAL = [
    events_pb2.GenerationRecord(
        response_id="r", prompt=common_pb2.Prompt(text="q"), response_text="a"
    ).SerializeToString(),
    events_pb2.FeedbackEvent(
        feedback_id="f", response_id="r", thumb=events_pb2.THUMB_UP
    ).SerializeToString(),
    pair_record("q", "a", "b", Source.PREFERENCE_SOURCE_FILE, [], "p").SerializeToString(),
    label_record("q", "a", True, Source.PREFERENCE_SOURCE_FILE, [], "l").SerializeToString(),
    events_pb2.Rollout(
        rollout_id="x",
        prompt_token_ids=[1, 2],
        response_token_ids=[3],
        behaviour_logprobs=[-1.0],
        reference_logprobs=[-1.1],
    ).SerializeToString(),
]


@st.composite
def corrupted(draw) -> bytes:
    """A real record with bytes flipped, cut short, or extended."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 4))):
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


VALUES = st.one_of(st.binary(max_size=256), corrupted())


@FAST
@given(VALUES, st.sampled_from([topics.GENERATIONS, topics.FEEDBACK]))
def test_the_curator_reads_or_dead_letters(value: bytes, topic: str):
    try:
        record = read_record(topic, value)
    except (DecodeError, ValueError):
        return
    assert record.response_id  # what it accepts, it can join


@FAST
@given(VALUES)
def test_the_refresh_reads_or_dead_letters(value: bytes):
    try:
        record = read_preference(value)
    except Unusable:
        return
    assert record.preference_id and record.WhichOneof("kind") in ("pair", "label")


@FAST
@given(VALUES)
def test_the_trainer_reads_or_dead_letters(value: bytes):
    try:
        sample = to_sample(events_pb2.Rollout.FromString(value))
    except (DecodeError, ValueError):
        return
    assert len(sample.behaviour_logprobs) == len(sample.response_token_ids) > 0


@FAST
@given(VALUES)
def test_export_reads_or_reports(value: bytes):
    try:
        kind, row = to_row(events_pb2.PreferenceRecord.FromString(value))
    except (DecodeError, ValueError):
        return
    assert kind in ("preferences", "labels") and row["prompt"]


TEXT = st.text(max_size=40)
MESSAGES = st.lists(
    st.builds(
        common_pb2.ChatMessage,
        role=st.sampled_from(["user", "system", "assistant", "tool", "", "x" * 9]),
        content=TEXT,
    ),
    max_size=3,
)
PROMPTS = st.one_of(
    st.builds(common_pb2.Prompt, text=TEXT),
    MESSAGES.map(lambda ms: common_pb2.Prompt(messages=common_pb2.ChatMessages(messages=ms))),
    st.just(common_pb2.Prompt()),
)
REWARD_SETTINGS = RewardSettings(
    model_dir=Path("/m"), triton_model="r", max_pairs=4, max_text_chars=30
)


@FAST
@given(
    st.sampled_from(["", REWARD_SETTINGS.model_name, "other"]),
    st.lists(st.builds(reward_pb2.ScoredPair, prompt=PROMPTS, response=TEXT), max_size=6),
)
def test_the_reward_validator_accepts_or_names_a_field(model: str, pairs):
    request = reward_pb2.ScoreRequest(model=model, pairs=pairs)
    try:
        prompts, responses = checked_pairs(request, REWARD_SETTINGS)
    except FieldError as err:
        assert err.field.split("[")[0].split(".")[0] in ("model", "pairs")
        return
    assert len(prompts) == len(responses) == len(pairs) <= REWARD_SETTINGS.max_pairs
    assert all(p.strip() and len(p) <= 30 for p in prompts)


REFERENCE_SETTINGS = ReferenceSettings(
    model_dir=Path("/m"), triton_model="ref", max_sequences=4, max_total_tokens=16
)
LIMITS = ModelLimits(vocab_size=100, max_positions=32)
IDS = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 120), max_size=12)


@FAST
@given(
    st.lists(
        st.builds(reference_pb2.TokenSequence, prompt_token_ids=IDS, response_token_ids=IDS),
        max_size=6,
    )
)
def test_the_reference_validator_accepts_or_names_a_field(sequences):
    request = reference_pb2.ComputeLogprobsRequest(sequences=sequences)
    try:
        checked = checked_sequences(request, REFERENCE_SETTINGS, LIMITS)
    except FieldError as err:
        assert err.field.split("[")[0] in ("model", "sequences")
        return
    for prompt, response in checked:
        assert prompt and response and len(prompt) + len(response) <= 16
        assert all(0 <= t < 100 for t in prompt + response)


POLICY_LIMITS = PolicyLimits(
    served_name="policy",
    max_prompts=4,
    max_n=4,
    max_sequences=8,
    max_total_tokens=64,
    default_max_new_tokens=16,
    max_stop_strings=4,
    vocab_size=100,
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@FAST
@given(
    st.builds(
        policy_pb2.SamplingParams,
        n=st.integers(0, 2**32 - 1),
        max_new_tokens=st.integers(0, 2**32 - 1),
        temperature=FLOATS,
        top_p=FLOATS,
        top_k=st.integers(0, 2**32 - 1),
        stop=st.lists(st.text(max_size=3), max_size=6),
        presence_penalty=FLOATS,
        frequency_penalty=FLOATS,
        logit_bias=st.dictionaries(st.integers(0, 2**32 - 1), FLOATS, max_size=4),
        top_logprobs=st.integers(0, 2**32 - 1),
    ),
    st.integers(1, 8),
)
def test_the_policy_sampling_validator_accepts_or_names_a_field(sampling, prompts: int):
    try:
        plan = check_sampling(sampling, prompts, POLICY_LIMITS)
    except InvalidArgument as err:
        assert err.field.startswith("sampling.")
        return
    assert 1 <= plan.n <= 4 and prompts * plan.n <= 8
    assert 0 < plan.top_p <= 1 and plan.max_new_tokens < 64
    assert all(0 <= t < 100 and abs(b) <= 100 for t, b in plan.logit_bias.items())
