"""The online loop on the real broker and Triton: rollout worker -> Kafka -> trainer -> weights
push -> the policy serves version 2, and generations after it carry version 2. Also: pushes with
a wrong checksum or a wrong shape are refused and the old version keeps serving; live prompts
from rlhf.generations.v1 become rollouts (with their gold scores); the worker waits while the
trainer is behind; against a reward ensemble, rollouts carry its spread and the groups it is
unsure of reach the annotation queue."""

from __future__ import annotations

import json
import threading
import time
import uuid

import grpc
import pytest
import torch
from kafka import TopicPartition

from services.common.annotator import load_annotator
from services.common.disagreement import member_matrix, pairwise_disagreement
from services.common.kafka import commit, decode, ensure_topics, make_consumer
from services.common.prompts import render_prompt
from services.common.topics import TopicSpec
from services.genproto.rlhf.v1 import (
    common_pb2,
    events_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from services.rollout.settings import RolloutSettings
from services.rollout.worker import RolloutWorker
from services.trainer.loop import TrainerService
from services.trainer.settings import TrainerSettings
from services.trainer.weights_push import build_manifest, push, sha256_file, write_version
from tests.integration.trainer.helpers import private_topic, produce_groups, synthetic_group
from tests.support.policy_stack import policy_stack
from tests.support.scoring_stacks import (
    reference_stack,
    reward_stack,
    tiny_ensemble_reward_model,
)


@pytest.fixture(scope="module")
def stacks(triton_server, kafka_settings, tiny_lm_dir, tiny_rm_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("loop")
    # A model name of its own: the session's weights topic holds other tests' announcements for
    # the tiny model's default name, and a replica rightly catches up to those.
    name = f"loop-{uuid.uuid4().hex[:8]}"
    with (
        policy_stack(
            triton_server, kafka_settings, tiny_lm_dir, work / "policy", model_name=name
        ) as policy,
        reward_stack(triton_server, tiny_rm_dir) as reward,
        reference_stack(triton_server, tiny_lm_dir) as reference,
    ):
        yield policy, reward, reference


def _stub(address: str) -> policy_pb2_grpc.PolicyServiceStub:
    return policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(address))


def _generate_versions(stub) -> list[int]:
    reply = stub.Generate(
        policy_pb2.GenerateRequest(
            prompts=[common_pb2.Prompt(text="Hello")],
            sampling=policy_pb2.SamplingParams(n=2, max_new_tokens=4),
        ),
        timeout=60,
    )
    return [s.weights_version for c in reply.completions for s in c.samples]


def _initial_weights(tiny_lm_dir):
    from safetensors.torch import load_file

    return load_file(tiny_lm_dir / "model.safetensors")


def _read_rollouts(kafka_settings, topic: str, count: int) -> list[events_pb2.Rollout]:
    consumer = make_consumer(kafka_settings, None, [], auto_offset_reset="earliest")
    consumer.subscribe([topic])
    rollouts: list[events_pb2.Rollout] = []
    for _ in range(60):
        rollouts += [
            decode(events_pb2.Rollout, r.value)
            for rs in consumer.poll(timeout_ms=500).values()
            for r in rs
        ]
        if len(rollouts) >= count:
            break
    consumer.close()
    return rollouts


GOLD = "services.common.annotator_rules:helpful_concise"


def _worker(stacks, kafka_settings, dataset, topic: str, **settings) -> RolloutWorker:
    policy, reward, reference = stacks
    return RolloutWorker(RolloutSettings(
        dataset=dataset, policy_address=policy.address, reward_address=reward.address,
        reference_address=reference.address, model_name=policy.model_name, rollouts_topic=topic,
        trainer_group=f"trainer-{topic}", kafka=kafka_settings, **settings,
    ))  # fmt: skip


def test_bad_checksum_or_shape_is_refused_and_old_version_serves(stacks, tiny_lm_dir, tmp_path):
    policy, _, _ = stacks
    stub = _stub(policy.address)
    before = stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=30).weights_version
    weights = _initial_weights(tiny_lm_dir)

    folder = write_version(tmp_path, before + 1, weights)
    manifest = build_manifest(folder, before + 1)
    name = next(iter(manifest.file_sha256))
    manifest.file_sha256[name] = "0" * 64  # lie about the checksum
    refused = push(policy.address, folder, manifest, chunk_bytes=64 * 1024)
    assert not refused.accepted and "sha256" in refused.reason
    assert refused.serving_version == before

    wrong = dict(weights)
    key = next(k for k, v in wrong.items() if v.dim() == 2)
    wrong[key] = torch.zeros(wrong[key].shape[0], wrong[key].shape[1] + 1)  # one column too many
    folder = write_version(tmp_path / "shape", before + 1, wrong)
    refused = push(
        policy.address, folder, build_manifest(folder, before + 1), chunk_bytes=64 * 1024
    )
    assert not refused.accepted and "shape" in refused.reason and key in refused.reason
    assert refused.serving_version == before

    assert stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=30).weights_version == before
    assert set(_generate_versions(stub)) == {before}  # still serving, still the old version


def test_rollouts_through_kafka_train_and_the_policy_serves_version_2(
    stacks, kafka_settings, tiny_lm_dir, tmp_path
):
    policy, _, _ = stacks
    stub = _stub(policy.address)
    assert policy.weights_version == 1
    topic = private_topic(kafka_settings)
    group = f"trainer-{topic}"
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Say hi.", "Count to three."]))

    # 1. The worker: 2 prompts x 4 samples = 8 rollouts (one group per prompt).
    worker = _worker(
        stacks,
        kafka_settings,
        dataset,
        topic,
        samples_per_prompt=4,
        prompts_per_call=2,
        max_new_tokens=6,
        max_rollouts=8,
    )
    try:
        assert worker.run() == 8
    finally:
        worker.close()

    # What reached Kafka: every field the trainer needs.
    rollouts = _read_rollouts(kafka_settings, topic, 8)
    assert len(rollouts) == 8 and len({r.rollout_id for r in rollouts}) == 8
    assert len({r.group_id for r in rollouts}) == 2 and all(r.group_size == 4 for r in rollouts)
    for r in rollouts:
        assert r.weights_version == 1 and r.response_token_ids and r.prompt_token_ids
        assert len(r.behaviour_logprobs) == len(r.reference_logprobs) == len(r.response_token_ids)
        assert all(lp <= 0 for lp in r.reference_logprobs)
        assert r.prompt.text in ("Say hi.", "Count to three.") and r.response_text
        assert r.reward_model_version >= 1  # the version the reward service said it scored with
        assert r.reward_spread == 0.0  # a single-head reward model
        assert not r.HasField("gold_score")  # no gold annotator configured

    # 2. The trainer: one GRPO update on those 8, then version 2 pushed and announced.
    settings = TrainerSettings(
        model_dir=tiny_lm_dir, algorithm="grpo", batch_size=8, max_steps=1, rollouts_topic=topic,
        consumer_group=group, policy_addresses=[policy.address], model_name=policy.model_name,
        state_dir=tmp_path / "trainer", push_chunk_bytes=256 * 1024, kafka=kafka_settings, threads=1,
        learner={"lr": 1e-3},
    )  # fmt: skip
    trainer = TrainerService(settings)
    runner = threading.Thread(target=trainer.run)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "the trainer did not finish its update"
    trainer.close()
    assert trainer.step == 1 and trainer.version == 2

    # 3. The policy serves version 2, the very bytes the trainer wrote, and generations carry it.
    info = stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=30)
    assert info.weights_version == 2
    pushed = settings.weights_dir / "v00000002" / "model.safetensors"
    served = policy.settings.weights_root / "v00000002" / "model.safetensors"
    assert sha256_file(served) == sha256_file(pushed)
    assert set(_generate_versions(stub)) == {2}
    publish = [
        json.loads(line)
        for line in settings.metrics_log.read_text().splitlines()
        if '"publish"' in line
    ]
    assert publish[-1]["replicas"] == [{"address": policy.address, "accepted": True, "reason": ""}]


def test_live_prompts_from_the_generations_topic_become_rollouts(stacks, kafka_settings, tmp_path):
    """A product's user asks the policy something; the policy logs it to rlhf.generations.v1; the
    worker, drawing live prompts, turns that very prompt into a group of rollouts."""
    policy, _, _ = stacks
    topic = private_topic(kafka_settings)
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    worker = _worker(
        stacks,
        kafka_settings,
        dataset,
        topic,
        live_prompt_fraction=1.0,
        samples_per_prompt=2,
        prompts_per_call=2,
        max_new_tokens=4,
        max_rollouts=4,
        gold_annotator=GOLD,
    )
    live_text = f"What is the capital of {uuid.uuid4().hex[:6]}?"
    try:
        stub = _stub(policy.address)
        request = policy_pb2.GenerateRequest(
            prompts=[common_pb2.Prompt(text=live_text)],
            sampling=policy_pb2.SamplingParams(n=1, max_new_tokens=2),
        )
        for _ in range(30):  # the worker tails from the latest offset: ask until it has seen one
            live_ids = list(stub.Generate(request, timeout=60).completions[0].prompt_token_ids)
            if any(p.text == live_text for p in worker.live):
                break
            time.sleep(1)
        assert any(p.text == live_text for p in worker.live), (
            "the live prompt never reached the worker"
        )
        assert worker.run() == 4
    finally:
        worker.close()
    rollouts = _read_rollouts(kafka_settings, topic, 4)
    groups = {}
    for r in rollouts:
        groups.setdefault(r.group_id, set()).add(tuple(r.prompt_token_ids))
    assert len(rollouts) == 4 and len(groups) == 2
    assert {ids for g in groups.values() for ids in g} >= {
        tuple(live_ids)
    }  # one group is the live prompt
    # One round of 4: the gold gauge is the independent annotator's mean over it, the reward
    # gauge the reward model's.
    gold = load_annotator(GOLD)
    expected = [gold.score(render_prompt(r.prompt), r.response_text) for r in rollouts]
    value = worker.registry.get_sample_value
    assert value("rlhf_rollout_gold_mean") == pytest.approx(sum(expected) / 4)
    assert [r.gold_score for r in rollouts] == pytest.approx(expected)  # recorded per rollout
    assert value("rlhf_rollout_reward_mean") == pytest.approx(sum(r.reward for r in rollouts) / 4)


def test_the_worker_waits_while_the_trainer_is_behind(stacks, kafka_settings, tmp_path):
    """8 rollouts the trainer group has not consumed, 2 rollouts per version: new rollouts would
    be 4 versions stale when used, above max_staleness 2, so the worker produces nothing until
    the group's committed offsets (on the real broker) catch up."""
    topic = private_topic(kafka_settings)
    produce_groups(kafka_settings, topic, [synthetic_group(f"backlog-{i}", 4) for i in range(2)])
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    worker = _worker(
        stacks,
        kafka_settings,
        dataset,
        topic,
        samples_per_prompt=2,
        prompts_per_call=1,
        max_new_tokens=4,
        max_rollouts=2,
        max_staleness=2,
        rollouts_per_version=2,
    )
    runner = threading.Thread(target=worker.run)
    runner.start()
    try:
        time.sleep(4)
        assert worker.produced == 0
        assert worker.registry.get_sample_value("rlhf_rollout_expected_staleness_versions") == 4.0
        # The trainer works through its backlog: its group commits the end of every partition.
        group = make_consumer(kafka_settings, f"trainer-{topic}")
        partitions = [TopicPartition(topic, p) for p in group.partitions_for_topic(topic)]
        group.assign(partitions)
        commit(group, group.end_offsets(partitions))
        group.close()
        runner.join(timeout=90)
        assert not runner.is_alive(), "the worker did not resume once the backlog was consumed"
    finally:
        worker.stop_requested.set()
        runner.join(timeout=30)
        worker.close()
    assert worker.produced == 2
    assert worker.registry.get_sample_value("rlhf_rollout_backpressure_seconds_total") >= 4
    assert len(_read_rollouts(kafka_settings, topic, 10)) == 8 + 2


def test_an_ensemble_reward_model_gives_spreads_and_annotation_candidates(
    stacks, triton_server, kafka_settings, tmp_path
):
    """The worker against a real 3-head reward model on Triton: every rollout carries the
    ensemble's spread, and every group of answers goes to the annotation queue (threshold 0)
    with the disagreement of the members' scores, computed again here from a direct Score call."""
    policy, _, reference = stacks
    topic, queue = private_topic(kafka_settings), f"test.annotation-queue.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_settings, [TopicSpec(queue, 1)])
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Say hi.", "Count to three."]))
    ensemble_dir = tiny_ensemble_reward_model(tmp_path / "ensemble-rm", heads=3)
    with reward_stack(triton_server, ensemble_dir) as ensemble:
        worker = RolloutWorker(RolloutSettings(
            dataset=dataset, policy_address=policy.address, reward_address=ensemble.address,
            reference_address=reference.address, model_name=policy.model_name,
            rollouts_topic=topic, trainer_group=f"trainer-{topic}", kafka=kafka_settings,
            samples_per_prompt=3, prompts_per_call=2, max_new_tokens=4, max_rollouts=6,
            annotation_topic=queue, annotation_min_disagreement=0.0,
        ))  # fmt: skip
        try:
            assert worker.run() == 6
        finally:
            worker.close()
        rollouts = {r.rollout_id: r for r in _read_rollouts(kafka_settings, topic, 6)}
        candidates = [
            decode(events_pb2.AnnotationCandidate, r.value)
            for r in _read_records(kafka_settings, queue, 2)
        ]
        assert len(candidates) == 2 == worker.candidates
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(ensemble.address))
        for candidate in candidates:
            pairs = [
                reward_pb2.ScoredPair(prompt=candidate.prompt, response=text)
                for text in candidate.responses
            ]
            reply = stub.Score(reward_pb2.ScoreRequest(pairs=pairs), timeout=60)
            assert reply.ensemble_size == 3 and len(reply.member_scores) == 3 * 3
            members = member_matrix(reply.member_scores, 3, 0, 3)
            assert candidate.disagreement == pytest.approx(
                pairwise_disagreement(members), rel=1e-3, abs=1e-6
            )
            assert candidate.disagreement > 0  # random heads do not agree exactly
            assert candidate.reason == "ensemble" and candidate.reward_model_version == 1
            group = [rollouts[i] for i in candidate.response_ids]
            assert len(group) == 3 and len({r.group_id for r in group}) == 1
            assert candidate.candidate_id == group[0].group_id
            assert [r.response_text for r in group] == list(candidate.responses)
            assert [r.reward_spread for r in group] == pytest.approx(
                list(reply.spreads), rel=1e-3, abs=1e-6
            )
            assert all(r.reward_spread > 0 for r in group)
    value = worker.registry.get_sample_value
    assert value("rlhf_rollout_annotation_candidates_total") == 2
    assert value("rlhf_rollout_reward_spread_mean") == pytest.approx(
        sum(r.reward_spread for r in rollouts.values()) / 6
    )


def _read_records(kafka_settings, topic: str, count: int) -> list:
    consumer = make_consumer(kafka_settings, None, [topic], auto_offset_reset="earliest")
    records: list = []
    for _ in range(60):
        records += [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
        if len(records) >= count:
            break
    consumer.close()
    return records
