"""The rollout worker: prompts -> policy (n samples each) -> reward and reference log-probs
(fetched concurrently) -> one `rlhf.v1.Rollout` per sample on `rlhf.rollouts.v1`.

    RLHF_ROLLOUT_DATASET=prompts.jsonl python -m services.rollout

One round, in order:
  1. pick prompts: from the dataset file, and a share from recent live generations;
  2. wait while backpressure says so (below);
  3. Generate: n samples per prompt with the behaviour log-probs and weights version;
  4. Score (reward) and ComputeLogprobs (reference) at the same time; each sample gets its
     reward-ensemble spread (0 from a single-head reward model) and, with a gold annotator, its
     gold score (reported beside the reward, never trained on);
  5. produce one Rollout per sample (idempotent, acks=all), keyed by rollout id; all samples
     of a prompt share a group id and go to one partition (crc32(group id)), so a trainer rank
     always holds whole groups;
  6. with an ensemble (ensemble_size > 1) and `annotation_min_disagreement` set: each group the
     members disagree on at least that much (services/common/disagreement.py) goes to
     `rlhf.annotation-queue.v1` as an AnnotationCandidate, after its rollouts are acknowledged,
     for people to rank (the gateway's GET /v1/annotation-queue).
Backpressure: a rollout produced now is used once the trainer has worked through its backlog,
at version trainer_version + backlog / rollouts_per_version, so its staleness then is that minus
the policy's version. The worker pauses while that exceeds `max_staleness` (the trainer would
only drop what it makes). The trainer's version comes from `rlhf.weights.v1`, its backlog from
its consumer group's committed offsets. A record of either tailed topic that does not decode is
dead-lettered to `<topic>.dlq` (services/common/dead_letters.py), counted, and skipped.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp
from kafka import TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.annotator import load_annotator
from services.common.channels import replica_channel
from services.common.dead_letters import DeadLetters
from services.common.grpc_server import message_size_options
from services.common.kafka import decode, make_consumer, make_producer
from services.common.logging import configure_logging
from services.common.metrics import LATENCY_BUCKETS, serve_metrics
from services.common.prompts import render_prompt
from services.genproto.rlhf.v1 import (
    common_pb2,
    events_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from services.rollout.candidates import annotation_candidates
from services.rollout.dataset import load_prompts
from services.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)


def expected_staleness(
    policy_version: int, trainer_version: int, backlog: int, rollouts_per_version: int
) -> float:
    """Versions between the policy that makes a rollout now and the trainer when it uses it."""
    return trainer_version + backlog / rollouts_per_version - policy_version


def group_partition(group_id: str, partitions: int) -> int:
    """All samples of a prompt go to one partition, so one trainer rank sees the whole group."""
    return zlib.crc32(group_id.encode()) % partitions


def build_rollouts(
    completions: list[policy_pb2.Completion],
    scores: list[float],
    reference: list[list[float]],
    prompts: list[common_pb2.Prompt] | None = None,
    reward_model_version: int = 0,
    spreads: list[float] | None = None,
    gold: list[float] | None = None,
) -> list[events_pb2.Rollout]:
    """One Rollout per sample; `scores`, `reference`, `spreads` (else 0) and `gold` (else unset)
    are in sample order across completions. With `prompts` (indexed by each completion's
    prompt_index) the rollout carries its prompt and response text, so that a reader can judge
    it without the tokenizer."""
    now = Timestamp()
    now.GetCurrentTime()
    rollouts, k = [], 0
    for completion in completions:
        group_id = uuid.uuid4().hex
        for sample in completion.samples:
            if len(reference[k]) != len(sample.token_ids):
                raise ValueError(
                    f"reference gave {len(reference[k])} log-probs for {len(sample.token_ids)} tokens"
                )
            rollouts.append(
                events_pb2.Rollout(
                    rollout_id=sample.response_id or uuid.uuid4().hex,
                    group_id=group_id,
                    group_size=len(completion.samples),
                    prompt_token_ids=completion.prompt_token_ids,
                    response_token_ids=sample.token_ids,
                    behaviour_logprobs=sample.logprobs,
                    reference_logprobs=reference[k],
                    reward=scores[k],
                    weights_version=sample.weights_version,
                    finish_reason=sample.finish_reason,
                    created_at=now,
                    reward_model_version=reward_model_version,
                    prompt=prompts[completion.prompt_index] if prompts is not None else None,
                    response_text=sample.text,
                    reward_spread=spreads[k] if spreads else 0.0,
                    gold_score=gold[k] if gold is not None else None,
                )
            )
            k += 1
    return rollouts


def check_score_response(scored: reward_pb2.ScoreResponse, pairs: int) -> None:
    """Raises RuntimeError when the reward service's reply does not fit the request."""
    if len(scored.scores) != pairs:
        raise RuntimeError(f"asked for {pairs} scores, got {len(scored.scores)}")
    if scored.spreads and len(scored.spreads) != pairs:
        raise RuntimeError(f"asked for {pairs} scores, got {len(scored.spreads)} spreads")
    if scored.ensemble_size > 1 and len(scored.member_scores) != pairs * scored.ensemble_size:
        raise RuntimeError(
            f"{pairs} pairs x {scored.ensemble_size} members, "
            f"got {len(scored.member_scores)} member scores"
        )


class TopicTail:
    """Follows a topic from a thread without a consumer group and hands each value to `on_value`;
    a record `on_value` cannot use goes to `dead_letters` (counted) and the tail goes on. Nothing
    is committed, so a restarted worker may dead-letter the same record again: its dlq.source.*
    headers identify it."""

    def __init__(
        self, settings, topic: str, on_value, from_beginning: bool, dead_letters: DeadLetters
    ):
        self.consumer = make_consumer(
            settings, group_id=None, auto_offset_reset="earliest" if from_beginning else "latest"
        )
        self.topic, self.on_value, self.dead_letters = topic, on_value, dead_letters
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tail-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        parts = self.consumer.partitions_for_topic(self.topic) or set()
        self.consumer.assign([TopicPartition(self.topic, p) for p in parts])
        while not self._stop.is_set():
            for records in self.consumer.poll(timeout_ms=300).values():
                for record in records:
                    try:
                        self.on_value(record.key, record.value)
                    except Exception as err:  # noqa: BLE001 - one bad record must not stop it
                        self._dead_letter(record, err)

    def _dead_letter(self, record, error: Exception) -> None:
        try:
            self.dead_letters.send_record(record, error)
        except Exception:  # the broker is down: logged, and the tail goes on
            log.exception(
                "could not dead-letter a %s record at offset %s", self.topic, record.offset
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


class RolloutWorker:
    def __init__(self, settings: RolloutSettings, registry: CollectorRegistry | None = None):
        self.settings = s = settings
        self.prompts = load_prompts(s.dataset)
        self.gold = load_annotator(s.gold_annotator).score if s.gold_annotator else None
        options = message_size_options(s.max_message_bytes)
        # Each address may name several replicas (a headless Service, or a list): calls go round
        # robin, and one that fails on a dead replica is retried on another (common/channels.py).
        self.channels = [
            replica_channel(address, [service], options)
            for address, service in (
                (s.policy_address, "rlhf.v1.PolicyService"),
                (s.reward_address, "rlhf.v1.RewardService"),
                (s.reference_address, "rlhf.v1.ReferenceService"),
            )
        ]
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channels[0])
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channels[1])
        self.reference = reference_pb2_grpc.ReferenceServiceStub(self.channels[2])
        self.producer = make_producer(s.kafka)
        self.partitions = len(self.producer.partitions_for(s.rollouts_topic))
        # Reads the trainer group's committed offsets; never subscribes, so never joins the group.
        self.offsets = make_consumer(s.kafka, group_id=s.trainer_group)
        self.trainer_version: int | None = None
        self.live: deque[common_pb2.Prompt] = deque(maxlen=s.live_prompt_buffer)
        r = self.registry = registry or CollectorRegistry()
        self.dead_letters = DeadLetters(s.kafka, "rollout-worker", r, producer=self.producer)
        self.tails = [
            TopicTail(s.kafka, s.weights_topic, self._on_weights, True, self.dead_letters)
        ]
        if s.live_prompt_fraction > 0:
            self.tails.append(
                TopicTail(
                    s.kafka, s.generations_topic, self._on_generation, False, self.dead_letters
                )
            )
        self.random = random.Random(s.seed)
        self.stop_requested = threading.Event()
        self.produced = 0
        self.candidates = 0
        self.m_rollouts = Counter("rlhf_rollout_rollouts_total", "Rollouts produced.", registry=r)
        self.m_round = Histogram(
            "rlhf_rollout_round_duration_seconds",
            "Generate + score + produce.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.m_paused = Counter(
            "rlhf_rollout_backpressure_seconds_total", "Time paused by backpressure.", registry=r
        )
        self.m_reward = Gauge(
            "rlhf_rollout_reward_mean", "Mean reward-model score of the last round.", registry=r
        )
        self.m_gold = Gauge(
            "rlhf_rollout_gold_mean",
            "Mean score of the last round by the independent gold annotator (when configured).",
            registry=r,
        )
        self.m_spread = Gauge(
            "rlhf_rollout_reward_spread_mean",
            "Mean reward-ensemble spread of the last round (0 with a single-head reward model).",
            registry=r,
        )
        self.m_candidates = Counter(
            "rlhf_rollout_annotation_candidates_total",
            "Groups the reward ensemble disagreed on, offered on the annotation queue.",
            registry=r,
        )
        self.m_staleness = Gauge(
            "rlhf_rollout_expected_staleness_versions",
            "Staleness new rollouts would have.",
            registry=r,
        )

    # -- inputs -------------------------------------------------------------------------------
    def _on_weights(self, key: bytes | None, value: bytes) -> None:
        event = decode(events_pb2.WeightsVersionEvent, value)
        if event.model == self.settings.model_name:
            self.trainer_version = max(self.trainer_version or 0, event.weights_version)

    def _on_generation(self, key: bytes | None, value: bytes) -> None:
        record = decode(events_pb2.GenerationRecord, value)
        if record.prompt.WhichOneof("kind"):
            self.live.append(record.prompt)

    def prompt_stream(self) -> Iterator[common_pb2.Prompt]:
        epoch = 0
        while not self.settings.epochs or epoch < self.settings.epochs:
            order = list(range(len(self.prompts)))
            self.random.shuffle(order)
            for i in order:
                if self.live and self.random.random() < self.settings.live_prompt_fraction:
                    yield self.live[self.random.randrange(len(self.live))]
                yield self.prompts[i]
            epoch += 1

    # -- backpressure -------------------------------------------------------------------------
    def policy_version(self) -> int:
        info = self.policy.GetModelInfo(
            policy_pb2.GetModelInfoRequest(), timeout=self.settings.timeout_s
        )
        return info.weights_version

    def trainer_backlog(self) -> int:
        """Rollouts on the topic past the trainer group's committed offsets."""
        s = self.settings
        tps = [TopicPartition(s.rollouts_topic, p) for p in range(self.partitions)]
        ends = self.offsets.end_offsets(tps)
        starts = self.offsets.beginning_offsets(tps)
        committed = {tp: self.offsets.committed(tp) for tp in tps}
        return sum(
            ends[tp] - (committed[tp] if committed[tp] is not None else starts[tp]) for tp in tps
        )

    def wait_for_trainer(self) -> None:
        s = self.settings
        started = time.monotonic()
        while not self.stop_requested.is_set():
            policy = self.policy_version()
            trainer = self.trainer_version if self.trainer_version is not None else policy
            staleness = expected_staleness(
                policy, max(trainer, policy), self.trainer_backlog(), s.rollouts_per_version
            )
            self.m_staleness.set(staleness)
            if staleness <= s.max_staleness:
                break
            time.sleep(0.2)
        self.m_paused.inc(time.monotonic() - started)

    # -- one round ----------------------------------------------------------------------------
    def make_rollouts(
        self, prompts: list[common_pb2.Prompt]
    ) -> tuple[list[events_pb2.Rollout], list[events_pb2.AnnotationCandidate]]:
        """One round (steps 3-4 and the choice of step 6): its rollouts and the annotation
        candidates among their groups."""
        s = self.settings
        sampling = policy_pb2.SamplingParams(
            n=s.samples_per_prompt,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
        )
        generated = self.policy.Generate(
            policy_pb2.GenerateRequest(prompts=prompts, sampling=sampling), timeout=s.timeout_s
        )
        completions = sorted(generated.completions, key=lambda c: c.prompt_index)
        pairs, sequences = [], []
        for completion in completions:
            for sample in completion.samples:
                pairs.append(
                    reward_pb2.ScoredPair(
                        prompt=prompts[completion.prompt_index], response=sample.text
                    )
                )
                sequences.append(
                    reference_pb2.TokenSequence(
                        prompt_token_ids=completion.prompt_token_ids,
                        response_token_ids=sample.token_ids,
                    )
                )
        # Reward and reference at the same time: neither depends on the other.
        score_call = self.reward.Score.future(
            reward_pb2.ScoreRequest(pairs=pairs), timeout=s.timeout_s
        )
        ref_call = self.reference.ComputeLogprobs.future(
            reference_pb2.ComputeLogprobsRequest(sequences=sequences), timeout=s.timeout_s
        )
        scored = score_call.result()
        reference = [list(r.logprobs) for r in ref_call.result().results]
        check_score_response(scored, len(pairs))
        if len(reference) != len(sequences):
            raise RuntimeError(f"asked for {len(sequences)} log-probs, got {len(reference)}")
        gold = None
        if self.gold is not None:
            gold = [self.gold(render_prompt(pair.prompt), pair.response) for pair in pairs]
        rollouts = build_rollouts(
            completions,
            list(scored.scores),
            reference,
            prompts,
            scored.reward_model_version,
            spreads=list(scored.spreads),
            gold=gold,
        )
        threshold = s.annotation_min_disagreement
        if threshold is None or threshold < 0:
            return rollouts, []
        return rollouts, annotation_candidates(rollouts, scored, threshold)

    def publish(
        self,
        rollouts: list[events_pb2.Rollout],
        candidates: list[events_pb2.AnnotationCandidate] = (),
    ) -> None:
        """Steps 5 and 6: the rollouts, then (once acknowledged) the candidates naming them."""
        topic = self.settings.rollouts_topic
        futures = [
            self.producer.send(
                topic,
                key=r.rollout_id,
                value=r,
                partition=group_partition(r.group_id, self.partitions),
            )
            for r in rollouts
        ]
        for f in futures:
            f.get(timeout=60)
        self.produced += len(rollouts)
        self.m_rollouts.inc(len(rollouts))
        if rollouts:
            self.m_reward.set(sum(r.reward for r in rollouts) / len(rollouts))
            self.m_spread.set(sum(r.reward_spread for r in rollouts) / len(rollouts))
        gold = [r.gold_score for r in rollouts if r.HasField("gold_score")]
        if gold:
            self.m_gold.set(sum(gold) / len(gold))
        futures = [
            self.producer.send(self.settings.annotation_topic, key=c.candidate_id, value=c)
            for c in candidates
        ]
        for f in futures:
            f.get(timeout=60)
        self.candidates += len(candidates)
        self.m_candidates.inc(len(candidates))

    def run(self) -> int:
        s = self.settings
        stream = self.prompt_stream()
        while not self.stop_requested.is_set() and not (
            s.max_rollouts and self.produced >= s.max_rollouts
        ):
            prompts = [p for _, p in zip(range(s.prompts_per_call), stream)]
            if not prompts:
                break
            self.wait_for_trainer()
            if self.stop_requested.is_set():
                break
            started = time.perf_counter()
            self.publish(*self.make_rollouts(prompts))
            self.m_round.observe(time.perf_counter() - started)
        return self.produced

    def close(self) -> None:
        for tail in self.tails:
            tail.stop()
        # Bounded: what Kafka never acknowledged was never counted as produced.
        self.producer.close(timeout=10)
        self.offsets.close()
        for channel in self.channels:
            channel.close()


def main() -> None:
    configure_logging("rollout")
    settings = RolloutSettings()
    worker = RolloutWorker(settings)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop_requested.set())
    if settings.metrics_port:
        serve_metrics(worker.registry, settings.metrics_port)
    try:
        produced = worker.run()
    finally:
        worker.close()
    log.info("rollout worker stopped", extra={"fields": {"produced": produced}})
