"""The reward-model refresh: fine-tunes the served reward model on live preference pairs and
publishes a new version only when held-out pairwise accuracy did not drop. Run it with

    RLHF_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 RLHF_REFRESH_BASE_MODEL_DIR=/models/reward/v1 \
    RLHF_REFRESH_VERSIONS_ROOT=/models/reward RLHF_REFRESH_REWARD_ADDRESS=reward:50052 \
        python -m services.refresh          # settings: services/refresh/settings.py

One cycle (`RefreshWorker.step`):
  1. poll `rlhf.preferences.v1` (consumer group, manual commits);
  2. store each new pair in the sqlite pair store, de-duplicated by `preference_id`, on the
     held-out side when `int(prompt_hash(prompt), 16) % held_out_modulus == 0` (the Kafka key's
     hash, so a prompt never crosses splits and all its records share a partition);
  3. store the next offsets and commit sqlite; only then commit the offsets to Kafka (on restart
     the store's offsets win: `SeekToStoredOffsets`, as in the curator);
  4. once `refresh_every` new training pairs are stored (and `min_held_out` held-out ones):
     a. fine-tune the current version on the new pairs plus a replay sample of older ones
        (`replay_ratio` older per new), Bradley-Terry loss: the offline stage's `fit_reward`,
        with as many heads as the current version has (an ensemble stays one: the reward service
        refuses a version with another head count) and each pair weighed by who labelled it
        (`human_weight`, `ai_weight` for PREFERENCE_SOURCE_AI records);
     b. held-out pairwise accuracy before and after; publish only if after >= before - tolerance,
        or (with `significance` > 0) the drop is not significant by a one-sided exact McNemar
        test on the held-out pairs the two versions rank differently;
        per annotator cohort, the held-out pairs, their share of the training mix and the
        accuracy, and how often cohorts, and the AI judge and people, agree on the same
        comparison: gauges (`rlhf_refresh_cohort_*`, `rlhf_refresh_*_agreement`) and the
        version's summary;
     c. publish: the Hugging Face folder written to a temporary sibling, fsynced, renamed to
        `versions_root/vNNNNNN`; then (version, path, sha256 manifest, "reload pending") and the
        pairs' "trained" marks commit in one sqlite transaction, and only then `versions_root/
        CURRENT` is pointed at it and every reward replica is told (ReloadModel; a headless
        Service name resolves to all of them). A crash before that commit re-runs the refresh; a
        crash after it re-sends the reload on restart (a repeated order is a no-op).
     A refused reload is logged and counted, never retried; an unreachable replica is tried
     `reload_attempts` times, and catches up from CURRENT on its own (services/reward/follower).
     The next refresh starts from the published version either way.
A record that does not decode or is not a usable pair goes to `rlhf.preferences.v1.dlq` (counted,
acknowledged before step 3's commit). KTO binary labels are counted and skipped: the curator already emits a chosen/rejected pair for
every up/down combination of one prompt, so pairing labels here would count those twice.

Shapes: `P` preference pairs.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf.message import DecodeError
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from services.common.channels import client_channel
from services.common.control_auth import control_metadata
from services.common.dead_letters import DeadLetters
from services.common.durable import SeekToStoredOffsets, durable_cycle
from services.common.kafka import decode, make_consumer
from services.common.preferences import prompt_hash
from services.common.replicas import replica_addresses
from services.common.training.data import PreferencePair
from services.common.training.reward import (
    RewardConfig,
    agreement_report,
    fit_reward,
    saved_heads,
    source_weights,
)
from services.common.training.stage import make_runtime
from services.common.versions import manifest, write_published
from services.common.worker import run_cycles, serve
from services.genproto.rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc
from services.refresh.metrics import RefreshMetrics, report_cohorts
from services.refresh.settings import RefreshSettings
from services.refresh.store import CurrentVersion, PairStore
from services.refresh.training import prune_versions, publish_folder, version_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pure decisions


def is_held_out(prompt: str, modulus: int) -> bool:
    """The held-out split, a function of the prompt alone (its Kafka key's hash)."""
    return int(prompt_hash(prompt), 16) % modulus == 0


def replay_sample(older: list, new_count: int, ratio: float, rng: random.Random) -> list:
    """`round(ratio * new_count)` items of `older` drawn without replacement (all when fewer)."""
    return rng.sample(older, min(len(older), round(ratio * new_count)))


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str


def drop_p_value(lost: int, gained: int) -> float:
    """One-sided exact McNemar test of a drop in accuracy on one held-out set: of the pairs the
    two versions rank differently, `lost` the new one gets wrong and `gained` it gets right. Were
    both versions equally accurate each such pair would be a fair coin, and this is the chance
    of `lost` or more of the `lost + gained` going the old version's way (1 when none differ)."""
    n = lost + gained
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


def publish_decision(
    before: float,
    after: float,
    tolerance: float = 0.0,
    *,
    lost: int = 0,
    gained: int = 0,
    significance: float = 0.0,
) -> Decision:
    """Publish when held-out accuracy did not drop by more than `tolerance`; with `significance`
    > 0, also when it did but the drop is not significant at that level (`drop_p_value` of the
    `lost` and `gained` pairs >= `significance`): a few pairs of a small held-out set are noise,
    and rejecting on them keeps a stale version scoring a policy that has moved on."""
    if after + 1e-12 >= before - tolerance:
        return Decision(True, f"held-out accuracy {before:.4f} -> {after:.4f}")
    dropped = f"held-out accuracy dropped {before:.4f} -> {after:.4f}"
    if significance <= 0:
        return Decision(False, dropped)
    p = drop_p_value(lost, gained)
    test = f"{lost} pairs lost, {gained} gained: p = {p:.3f}"
    if p >= significance:
        return Decision(True, f"{dropped}, not significantly ({test} >= {significance})")
    return Decision(False, f"{dropped} significantly ({test} < {significance})")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class RefreshResult:
    """What one refresh did, for logs, metrics and tests."""

    published: bool
    version: int
    """The version the next refresh starts from (the new one when published)."""
    accuracy_before: float
    accuracy_after: float
    new_pairs: int
    replay_pairs: int
    held_out_pairs: int
    steps: int
    seconds: float
    reason: str
    reload_accepted: bool | None = None
    """The reward service's answer: None when nothing was published or it was unreachable."""


class Unusable(ValueError):
    """A record the refresh cannot take: it goes to the DLQ."""


def read_preference(value: bytes) -> events_pb2.PreferenceRecord:
    """A record the refresh can take (an id and a kind), or Unusable: nothing else is raised."""
    try:
        record = decode(events_pb2.PreferenceRecord, value)
    except DecodeError as err:
        raise Unusable(f"undecodable PreferenceRecord: {err}") from err
    if not record.preference_id or record.WhichOneof("kind") not in RECORD_HANDLERS:
        raise Unusable("preference record without preference_id or kind")
    return record


class RefreshWorker:
    """`step()` runs one consume cycle and, when due, a refresh (tests drive it); `run()` loops."""

    def __init__(self, settings: RefreshSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        registry = registry or CollectorRegistry()
        self.metrics = RefreshMetrics(registry)
        self.dead_letters = DeadLetters(settings.kafka, "refresh", registry)
        self.store = PairStore(settings.state_dir)
        base_dir = Path(settings.base_model_dir).resolve()
        self.base = CurrentVersion(settings.base_version, base_dir, manifest(base_dir), False)
        self.metrics.version.set(self.store.current(self.base).version)
        self.stored_offsets: dict[tuple[str, int], int] = self.store.offsets()
        self.consumer = make_consumer(
            settings.kafka,
            settings.group_id,
            max_poll_records=settings.max_poll_records,
            max_poll_interval_ms=settings.max_poll_interval_ms,
        )
        self.consumer.subscribe([settings.topic], listener=SeekToStoredOffsets(self))
        self.base_cutoff = self._base_cutoff()
        self.stopping = threading.Event()
        if self.store.current(self.base).reload_pending:  # a crash between record and reload
            self._reload()

    def _base_cutoff(self) -> dict[int, int]:
        """Partition -> first offset the base version has not seen (empty: it saw nothing)."""
        if not self.settings.base_trained_on_existing:
            return {}
        cutoff = self.store.base_cutoff()
        if cutoff is None:  # the first start: the topic's end now, kept for every restart
            topic = self.settings.topic
            parts = self.consumer.partitions_for_topic(topic) or set()
            ends = self.consumer.end_offsets([TopicPartition(topic, p) for p in parts])
            cutoff = {tp.partition: offset for tp, offset in ends.items()}
            self.store.set_base_cutoff(cutoff)
            self.store.commit()
        return cutoff

    # 1-3. consume --------------------------------------------------------------------------
    def step(self) -> RefreshResult | None:
        self.consume()
        return self.refresh() if self.refresh_due() else None

    def consume(self) -> int:
        """One poll stored durably, then committed to Kafka; returns the records read."""
        batches = self.consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
        next_offsets: dict[TopicPartition, int] = {}
        kinds: list[str] = []
        with durable_cycle(self, batches, next_offsets):
            for tp, records in batches.items():
                for record in records:
                    seen_by_base = record.offset < self.base_cutoff.get(tp.partition, 0)
                    next_offsets[tp] = record.offset + 1
                    try:
                        kinds.append(self._take(record.value, seen_by_base))
                    except Unusable as why:  # acknowledged in the DLQ before the commit
                        self.dead_letters.send_record(record, str(why))
                        kinds.append("invalid")
        for kind in kinds:
            self.metrics.records.labels(kind.split(":")[0]).inc()
            if kind.startswith("pair:"):
                self.metrics.pairs.labels(kind.split(":")[1]).inc()
        return len(kinds)

    def _take(self, value: bytes, seen_by_base: bool = False) -> str:
        """Stores one record; returns what became of it (`pair:train`, `label`, ...)."""
        record = read_preference(value)
        if not self.store.mark_seen(record.preference_id):
            return "duplicate"
        return RECORD_HANDLERS[record.WhichOneof("kind")](self, record, seen_by_base)

    def _store_pair(self, record: events_pb2.PreferenceRecord, seen_by_base: bool) -> str:
        pair = PreferencePair(
            record.prompt,
            record.pair.chosen,
            record.pair.rejected,
            source="ai" if record.source == events_pb2.PREFERENCE_SOURCE_AI else "human",
            cohort=record.cohort,
        )
        if not (pair.prompt and pair.chosen and pair.rejected) or pair.chosen == pair.rejected:
            raise Unusable("pair without prompt, chosen or rejected, or chosen == rejected")
        held_out = is_held_out(pair.prompt, self.settings.held_out_modulus)
        self.store.add_pair(record.preference_id, pair, held_out, trained=seen_by_base)
        return "pair:held_out" if held_out else "pair:train"

    def _skip_label(self, record: events_pb2.PreferenceRecord, seen_by_base: bool) -> str:
        return "label"  # see the module docstring: the curator already pairs opposite labels

    # 4. refresh ------------------------------------------------------------------------------
    def refresh_due(self) -> bool:
        return (
            self.store.count(held_out=False, trained=False) >= self.settings.refresh_every
            and self.store.count(held_out=True) >= self.settings.min_held_out
        )

    def training_config(self, current: CurrentVersion) -> RewardConfig:
        s = self.settings
        return RewardConfig(
            data=Path("kafka:" + s.topic),
            output=version_dir(s.versions_root, current.version + 1),
            model=current.path,
            epochs=s.epochs,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            max_length=s.max_length,
            seed=s.seed,
            device=s.device,
            ensemble_size=saved_heads(current.path) or 1,
            human_weight=s.human_weight,
            ai_weight=s.ai_weight,
        )

    def refresh(self) -> RefreshResult:
        started = time.monotonic()
        current = self.store.current(self.base)
        new = self.store.new_training_pairs()
        # Seeded by the data's extent, so a refresh re-run after a crash draws the same replay.
        rng = random.Random(f"{self.settings.seed}-{current.version}-{new[-1][0]}")
        replay = self.store.pairs_by_seq(
            replay_sample(self.store.trained_seqs(), len(new), self.settings.replay_ratio, rng)
        )
        held_out = self.store.held_out_pairs(self.settings.max_held_out)
        config = self.training_config(current)
        train = [p for _, p in new] + replay
        if not bool((source_weights(train, config) > 0).any()):
            return self._nothing_to_learn(current, new, replay, held_out, started)
        # a. fine-tune, b. evaluate before and after
        candidate = fit_reward(config, train, held_out, make_runtime(config), rng)
        before, after = candidate.before["accuracy"], candidate.after["accuracy"]
        changed = list(zip(candidate.correct_before, candidate.correct_after, strict=True))
        decision = publish_decision(
            before,
            after,
            self.settings.tolerance,
            lost=sum(was and not now for was, now in changed),
            gained=sum(now and not was for was, now in changed),
            significance=self.settings.significance,
        )
        agreement = agreement_report(self.store.all_pairs())
        self.metrics.runs.inc()
        self.metrics.accuracy.labels("candidate").set(after)
        report_cohorts(self.metrics, candidate.cohorts, agreement)
        # c. the version folder durable, then its record and the trained marks together
        if decision.publish:
            summary = {
                "stage": "reward-refresh",
                "base_version": current.version,
                "base_model": str(current.path),
                "new_pairs": len(new),
                "replay_pairs": len(replay),
                "held_out_pairs": len(held_out),
                "steps": candidate.steps,
                "metrics": {f"eval/{k}_before": v for k, v in candidate.before.items()}
                | {f"eval/{k}_after": v for k, v in candidate.after.items()},
                "ensemble_size": candidate.ensemble_size,
                "weights": {"human": self.settings.human_weight, "ai": self.settings.ai_weight},
                "cohorts": candidate.cohorts,
                "agreement": agreement,
            }
            path = publish_folder(
                self.settings.versions_root, current.version + 1, candidate, summary
            )
            current = CurrentVersion(current.version + 1, path, manifest(path), reload_pending=True)
            self.store.set_current(current)
        self.store.mark_trained(new[-1][0])
        self.store.commit()
        reload_accepted = self._reload() if decision.publish else None
        if decision.publish:
            prune_versions(self.settings.versions_root, self.settings.keep_versions, current.path)
        (self.metrics.published if decision.publish else self.metrics.rejected).inc()
        self.metrics.accuracy.labels("current").set(after if decision.publish else before)
        result = RefreshResult(
            decision.publish,
            current.version,
            before,
            after,
            len(new),
            len(replay),
            len(held_out),
            candidate.steps,
            time.monotonic() - started,
            decision.reason,
            reload_accepted,
        )
        self.metrics.duration.observe(result.seconds)
        log.info("refresh", extra={"fields": dict(result.__dict__)})
        return result

    def _nothing_to_learn(self, current, new, replay, held_out, started) -> RefreshResult:
        """Every pair of this refresh has weight 0 (only AI labels, with ai_weight 0, say): the
        pairs are marked trained, so that the next refresh waits for new data instead of
        failing on the same ones again; nothing is published."""
        s = self.settings
        self.store.mark_trained(new[-1][0])
        self.store.commit()
        self.metrics.rejected.inc()
        reason = (
            f"all {len(new) + len(replay)} pairs have weight 0 "
            f"(human_weight={s.human_weight}, ai_weight={s.ai_weight}): nothing to learn"
        )
        result = RefreshResult(
            False,
            current.version,
            math.nan,
            math.nan,
            len(new),
            len(replay),
            len(held_out),
            0,
            time.monotonic() - started,
            reason,
        )
        log.warning("refresh skipped", extra={"fields": dict(result.__dict__)})
        return result

    def _reload(self) -> bool | None:
        """Points versions_root/CURRENT at the current version (what a reward replica that misses
        this call serves when it catches up: services/reward/follower), then tells every replica
        (ReloadModel). True when all that answered accepted, False when one refused, None when
        none could be reached. Never retried beyond `reload_attempts`."""
        current = self.store.current(self.base)
        if current.version > self.base.version:
            write_published(
                self.settings.versions_root, current.version, current.path, current.file_sha256
            )
        request = reward_pb2.ReloadModelRequest(
            reward_model_version=current.version,
            path=str(current.path),
            file_sha256=current.file_sha256,
        )
        answers = [
            self._reload_one(address, request)
            for address in replica_addresses([self.settings.reward_address])
        ]
        self.store.set_current(
            CurrentVersion(current.version, current.path, current.file_sha256, False)
        )
        self.store.commit()
        self.metrics.version.set(current.version)
        reached = [a for a in answers if a is not None]
        return all(reached) if reached else None

    def _reload_one(self, address: str, request: reward_pb2.ReloadModelRequest) -> bool | None:
        for attempt in range(self.settings.reload_attempts):
            try:
                with client_channel(address) as channel:
                    reply = reward_pb2_grpc.RewardServiceStub(channel).ReloadModel(
                        request,
                        timeout=self.settings.reload_timeout_s,
                        metadata=control_metadata(),
                    )
            except grpc.RpcError as error:
                log.warning(
                    "reward service unreachable for reload",
                    extra={
                        "fields": {
                            "address": address,
                            "attempt": attempt + 1,
                            "code": str(error.code()),
                        }
                    },
                )
                if attempt + 1 < self.settings.reload_attempts:
                    time.sleep(min(2.0**attempt, 10.0))
                continue
            self.metrics.reloads.labels("accepted" if reply.accepted else "refused").inc()
            log.log(
                logging.INFO if reply.accepted else logging.ERROR,
                "reward model reload",
                extra={
                    "fields": {
                        "address": address,
                        "version": request.reward_model_version,
                        "accepted": reply.accepted,
                        "serving": reply.reward_model_version,
                        "reason": reply.reason,
                    }
                },
            )
            return reply.accepted
        self.metrics.reloads.labels("unreachable").inc()
        return None

    def run(self) -> None:
        run_cycles(self, "refresh")

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.dead_letters.close()
        self.store.close()


RECORD_HANDLERS = {"pair": RefreshWorker._store_pair, "label": RefreshWorker._skip_label}
"""PreferenceRecord kind -> how the refresh takes it."""


def main() -> None:
    serve("reward-refresh", RefreshSettings(), RefreshWorker)
