"""The trainer service's loop: Kafka rollouts -> whole-group batches -> `Learner.step` ->
checkpoint -> commit -> weights push. `server.py` builds it from settings and runs it.

One turn, in order:
  1. poll this rank's partitions; duplicate rollouts are counted, invalid ones dead-lettered
     (`rlhf.rollouts.v1.dlq`, acknowledged before their offset can be saved), at once;
  2. drop rollouts more than `max_staleness` versions behind the trainer (counted);
  3. the ranks agree that each holds a full batch of whole groups (or that one wants to stop);
  4. `Learner.step` (gradients all-reduced across ranks by the learner);
  5. every `checkpoint_every` updates: checkpoint (atomic), and only then commit offsets; a
     single-process trainer takes a copy and writes it on a thread beside the next update
     (`checkpoint.BackgroundWriter`), committing its offsets once it is on disk;
  6. every `push_every` updates (after its checkpoint): weights version N+1 taken (a copy), then
     written, pushed to every replica and announced on `rlhf.weights.v1` by rank 0, on a
     publisher thread beside the next update (at most one push in flight; the newest wins).
     The file is written while that step's checkpoint is written, renamed into place (durably)
     and pushed at once (`push_before_durable`, the default), or only once the checkpoint is on
     disk (False).
Exactly once: the checkpoint stores, per partition, the first offset not yet used and the ids
already used beyond it; a restart seeks there and skips those ids.
One number, one set of weights: a version's folder is renamed into place before any replica can
see the number. A restart resumes from the last checkpoint, whose version may be older than
versions pushed before the crash (their steps are redone); it then serves the checkpoint's
weights under the next number past every version folder on disk (`resume_version`), never
under one already pushed.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter

import torch

from services.common.dead_letters import DeadLetters
from services.common.digest import BLAKE3, SHA256
from services.common.kafka import make_producer
from services.common.schema import record_headers
from services.common.versions import VersionedFolders
from services.trainer import checkpoint, distributed
from services.trainer.checkpoint import Checkpoint, ConsumerPosition
from services.trainer.consumer import (
    Received,
    RolloutBatcher,
    RolloutSource,
    Unreadable,
    partitions_of_rank,
)
from services.trainer.learner import Learner, LearnerConfig, RolloutSample
from services.trainer.metrics import MetricsLog, TrainerMetrics
from services.trainer.settings import TrainerSettings
from services.trainer.weights_push import (
    NewestWins,
    add_sha256,
    announce,
    build_manifest,
    commit_version,
    push_all,
    read_manifest,
    snapshot,
    stage_adapter_version,
    stage_version,
    version_dir,
)

log = logging.getLogger(__name__)

KEEP_WEIGHT_VERSIONS = 3


def to_sample(rollout) -> RolloutSample:
    """A `rlhf.v1.Rollout` as the learner's plain-Python sample (validated)."""
    sample = RolloutSample(
        prompt_token_ids=list(rollout.prompt_token_ids),
        response_token_ids=list(rollout.response_token_ids),
        behaviour_logprobs=list(rollout.behaviour_logprobs),
        reference_logprobs=list(rollout.reference_logprobs),
        reward=float(rollout.reward),
        group_id=rollout.group_id or rollout.rollout_id,
        weights_version=int(rollout.weights_version),
        rollout_id=rollout.rollout_id,
        reward_spread=float(rollout.reward_spread),
        gold_score=float(rollout.gold_score) if rollout.HasField("gold_score") else None,
    )
    sample.validate()
    return sample


def resume_version(checkpointed: int, written: int) -> tuple[int, bool]:
    """(the version to resume as, whether it is a new number) from the checkpoint's version and
    the highest version folder written (0: none). Folders past the checkpoint hold weights of
    steps the crash lost, which were pushed and may be served: the checkpoint's weights take the
    next number after them instead of a number they already had."""
    if written > checkpointed:
        return written + 1, True
    return checkpointed, False


def merge_positions(positions: dict[int, ConsumerPosition], mine: list[int]) -> ConsumerPosition:
    """The share of a (possibly differently sized) earlier set of ranks that this rank now owns."""
    merged = ConsumerPosition()
    for position in positions.values():
        merged.offsets.update({p: o for p, o in position.offsets.items() if p in mine})
        merged.skip_ids.extend(position.skip_ids)
        merged.recent_ids.extend(position.recent_ids)
    return merged


class TrainerService:
    """One trainer rank: owns its learner, its partitions, and (rank 0) the weights push."""

    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        if settings.push_every % settings.checkpoint_every:
            raise ValueError(
                "push_every must be a multiple of checkpoint_every (a version is pushed only once durable)"
            )
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.rank = distributed.init_from_env()
        config = LearnerConfig(
            **{
                "algorithm": settings.algorithm,
                "seed": settings.seed,
                **settings.lora,
                **settings.learner,
            }
        )
        self.learner = Learner(config, settings.model_dir)
        self.metrics = TrainerMetrics()
        self.dead_letters = DeadLetters(
            settings.kafka, f"trainer-rank-{self.rank.rank}", self.metrics.registry
        )
        self.batcher = RolloutBatcher(settings.batch_size, settings.max_staleness)
        self.source = RolloutSource(
            settings.kafka,
            settings.rollouts_topic,
            settings.consumer_group,
            self.rank.rank,
            self.rank.world,
        )
        self.producer = (
            make_producer(settings.kafka)
            if self.rank.is_leader and settings.weights_topic
            else None
        )
        suffix = "" if self.rank.is_leader else f"-rank-{self.rank.rank}"
        self.log = MetricsLog(settings.metrics_log.with_name(f"metrics{suffix}.jsonl"))
        self.step = 0
        self.version = settings.initial_weights_version
        self.stop_requested = threading.Event()
        self.publisher = (
            NewestWins(self._push_version, "weights-publisher")
            if self.rank.is_leader and settings.push_in_background
            else None
        )
        """Runs each version's push beside the next update: at most one in flight, the newest
        waiting version replaces an older one (settings.push_in_background)."""
        self._counted: Counter[str] = Counter()
        self.checkpoints: checkpoint.BackgroundWriter | None = None
        """Writes checkpoints beside the next update (one process only: the ranks of a
        multi-rank trainer write their parts together, behind barriers)."""
        self._restore()
        if settings.checkpoint_in_background and self.rank.world == 1:
            self.checkpoints = checkpoint.BackgroundWriter(
                settings.checkpoint_dir, settings.keep_checkpoints, done_step=self.step
            )

    # -- start --------------------------------------------------------------------------------
    def _restore(self) -> None:
        saved = checkpoint.latest(self.settings.checkpoint_dir)
        offsets: dict[int, int] = {}
        if saved is not None:
            state = dict(saved.trainer_state)
            state["policy"] = {
                k.removeprefix("policy."): v
                for k, v in saved.tensors.items()
                if k.startswith("policy.")
            }
            state["value_head"] = {
                k.removeprefix("value_head."): v
                for k, v in saved.tensors.items()
                if k.startswith("value_head.")
            }
            self.learner.load_state_dict(state)
            self.step, self.version = saved.step, saved.weights_version
            mine = partitions_of_rank(self.source.all_partitions, self.rank.rank, self.rank.world)
            position = merge_positions(saved.positions, mine)
            self.batcher.restore(position)
            offsets = position.offsets
        start = self.source.seek(offsets)
        if offsets:
            # Durable in the checkpoint; a kill between its write and the commit (or a restart
            # with nothing new to train) would otherwise leave Kafka's offsets behind it.
            self.source.commit(offsets)
        written = 0
        if self.rank.world == 1:  # multi-rank trainers push only after their checkpoint
            folders = VersionedFolders(self.settings.weights_dir).folders()
            written = folders[-1][0] if folders else 0
        self.version, renumbered = resume_version(self.version, written)
        if renumbered:
            log.warning(
                "versions up to %s were pushed past the checkpoint of step %s: its weights "
                "resume as version %s",
                written,
                self.step,
                self.version,
            )
        self.metrics.version.set(self.version)
        self.log.write(
            {
                "event": "resume",
                "step": self.step,
                "weights_version": self.version,
                "renumbered": renumbered,
                "offsets": start,
            }
        )
        log.info(
            "trainer ready",
            extra={"fields": {"rank": self.rank.rank, "step": self.step, "offsets": start}},
        )
        if renumbered or (
            saved is not None and self.version > self.settings.initial_weights_version
        ):
            self._publish()  # a crash may have fallen between the checkpoint and its push

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        s = self.settings
        last_record = time.monotonic()
        while True:
            self._commit_durable()
            # 1. Poll and take in.
            records = self.source.poll(timeout_ms=200)
            if records:
                last_record = time.monotonic()
            for item in records:
                self._take_in(item)
            # 2. Staleness.
            self.batcher.drop_stale(self.version)
            self._sync_counters()
            # 3. Agree.
            groups = self.batcher.peek()
            size = sum(len(g.members) for g in groups) if groups else 0
            stop = (
                self.stop_requested.is_set()
                or (s.max_steps and self.step >= s.max_steps)
                or (s.idle_exit_s and time.monotonic() - last_record > s.idle_exit_s and not size)
            )
            ready, stop_any = distributed.agree(size, bool(stop))
            if stop_any:
                return
            if ready:
                self._update(self.batcher.take(groups))

    def _take_in(self, item: Received | Unreadable) -> None:
        """Invalid records are dead-lettered (acknowledged) before their offset can be saved."""
        if isinstance(item, Unreadable):
            self.dead_letters.send_record(item.record, item.error)
            self.batcher.add_invalid(item.partition, item.offset)
            return
        try:
            to_sample(item.rollout)
        except ValueError as exc:
            rollout = item.rollout
            self.dead_letters.send(
                self.settings.rollouts_topic,
                item.partition,
                item.offset,
                rollout.rollout_id.encode(),
                rollout.SerializeToString(),
                f"invalid rollout: {exc}",
                record_headers(rollout),
            )
            self.batcher.add_invalid(item.partition, item.offset)
            return
        self.batcher.add(item)

    def _update(self, used: list[Received]) -> None:
        s = self.settings
        # 4. The update.
        started = time.perf_counter()
        learner_metrics = self.learner.step([to_sample(r.rollout) for r in used])
        seconds = time.perf_counter() - started
        staleness = [self.version - int(r.rollout.weights_version) for r in used]
        self.step += 1
        publish = self.step % s.push_every == 0
        if publish:
            self.version += 1
        self.metrics.observe_update(learner_metrics, staleness, seconds)
        self.metrics.version.set(self.version)
        self.log.write({
            "event": "update", "step": self.step, "weights_version": self.version, "rank": self.rank.rank,
            "rollout_ids": [r.rollout.rollout_id for r in used], "staleness/mean": sum(staleness) / len(staleness),
            "rollouts/consumed": self.batcher.counts["consumed"], "rollouts/dropped_stale": self.batcher.counts["stale"],
            "rollouts/duplicates": self.batcher.counts["duplicate"], "rollouts/invalid": self.batcher.counts["invalid"],
            "time/update_s": seconds, "time/unix": time.time(), **learner_metrics,
            **({"weights/sha256": distributed.weights_digest(self.learner.policy_state_dict())} if s.log_weights_digest else {}),
        })  # fmt: skip
        # 5. Checkpoint, then commit.
        if self.step % s.checkpoint_every == 0:
            self._checkpoint()
        # 6. Publish.
        if publish:
            self._publish()

    def _checkpoint(self) -> None:
        root = self.settings.checkpoint_dir
        if self.checkpoints is not None:
            started = time.perf_counter()
            state = checkpoint.cloned(self.learner.state_dict())
            saved = Checkpoint(
                self.step,
                self.version,
                self._checkpoint_tensors(state),
                state,
                positions={0: self.batcher.position()},
            )
            self.checkpoints.submit(saved)  # waits while the previous one is still written
            self.metrics.checkpoint_copy_time.observe(time.perf_counter() - started)
            return
        if self.rank.is_leader:
            checkpoint.begin(root, self.step)
        distributed.barrier()
        position = self.batcher.position()
        checkpoint.write_position(checkpoint.temp_dir(root, self.step), self.rank.rank, position)
        distributed.barrier()
        if self.rank.is_leader:
            state = self.learner.state_dict()
            tensors = self._checkpoint_tensors(state, copy=True)
            saved = Checkpoint(self.step, self.version, tensors, state, positions={})
            checkpoint.finish(root, saved, keep=self.settings.keep_checkpoints)
        distributed.barrier()
        # The checkpoint holding these offsets' effect is durable: now Kafka may know them.
        self.source.commit(position.offsets)

    @staticmethod
    def _checkpoint_tensors(state: dict, copy: bool = False) -> dict:
        """Moves the policy's and the value head's tensors out of `state` under their prefixes;
        `copy` copies each (tied weights share storage, which safetensors refuses to save)."""
        return {
            f"{part}.{k}": v.detach().to("cpu", copy=copy)
            for part in ("policy", "value_head")
            for k, v in state.pop(part).items()
        }

    def _commit_durable(self) -> None:
        """Commits the offsets of every checkpoint the background writer finished (in order)."""
        if self.checkpoints is not None:
            for position in self.checkpoints.durable():
                self.source.commit(position.offsets)

    def _publish(self) -> None:
        """6. Takes this version's tensors now (the next update changes them in place) and hands
        them to the publisher thread, which writes, pushes and announces them beside the next
        update. With `push_before_durable` off, the push waits for this step's checkpoint to be
        on disk (`_push_version`); with it on, a restart numbers past what was pushed
        (`resume_version`): either way a version number never names two sets of weights."""
        if not self.rank.is_leader:
            return
        s = self.settings
        version = self.version
        folder = version_dir(s.weights_dir, version)
        if folder.is_dir():
            stage = None  # the checkpoint's own version, written before a crash: pushed again
        elif self.learner.lora:  # only the adapter travels
            adapter, *rest = self.learner.adapter_push(base_version=s.initial_weights_version)
            adapter = snapshot(adapter)
            stage = lambda: stage_adapter_version(s.weights_dir, version, adapter, *rest)
        else:
            tensors = snapshot(self.learner.policy_state_dict())
            # sha256 too, for the announcement: hashed while the file is written, not read back.
            stage = lambda: stage_version(s.weights_dir, version, tensors, (BLAKE3, SHA256))
        job = (version, self.step, stage)
        if self.publisher is None:
            self._push_version(job)
        else:
            self.publisher.submit(job)

    def _push_version(self, job) -> None:
        """The publisher thread's work for one version: write, push to every replica, announce.
        The file is written under its temporary name while the step's checkpoint is still being
        written, and renamed into place (the rename made durable) before the push: at once with
        `push_before_durable`, where a restart then numbers past it (`resume_version`), or once
        the checkpoint is on disk, where a crash in between leaves no `v{N}` folder."""
        version, step, stage = job
        s = self.settings
        started = time.perf_counter()
        staged = stage() if stage is not None else None
        waits = self.checkpoints is not None and not s.push_before_durable
        if waits and not self.checkpoints.wait_durable(step):
            log.error("version %s not pushed: the checkpoint of step %s failed", version, step)
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            return  # the trainer stops on that error; a restart redoes the step
        if staged is not None:
            folder = commit_version(s.weights_dir, version, staged)
        else:
            folder = version_dir(s.weights_dir, version)
        # The digests taken while the file was written (a file changed since fails the
        # policy's check); a LoRA adapter's folder lists sha256 only, so it is hashed here.
        manifest = read_manifest(folder)
        if manifest.digest_algorithm != BLAKE3:
            manifest = build_manifest(folder, version, (BLAKE3,))
        results = push_all(
            s.policy_addresses,
            folder,
            manifest,
            s.push_chunk_bytes,
            s.push_timeout_s,
            s.max_message_bytes,
            transport=s.push_transport,
        )
        failed = [r for r in results if not r.accepted]
        self.metrics.push_failures.inc(len(failed))
        if self.producer is not None:
            add_sha256(manifest, folder)  # the announcement lists sha256, as it always has
            announce(self.producer, s.weights_topic, s.model_name, manifest, folder.resolve())
        seconds = time.perf_counter() - started
        self.metrics.push_time.observe(seconds)
        self.log.write({
            "event": "publish", "step": step, "weights_version": version, "time/push_s": seconds,
            "files/blake3": dict(manifest.file_digest),
            "replicas": [{"address": r.address, "accepted": r.accepted, "reason": r.reason} for r in results],
            "transports": [r.transport for r in results],
        })  # fmt: skip
        for old in sorted(s.weights_dir.glob("v*"))[:-KEEP_WEIGHT_VERSIONS]:
            shutil.rmtree(old, ignore_errors=True)

    def _sync_counters(self) -> None:
        for reason in ("stale", "duplicate", "invalid"):
            delta = self.batcher.counts[reason] - self._counted[reason]
            if delta:
                self.metrics.dropped.labels(reason).inc(delta)
                self._counted[reason] += delta

    def close(self) -> None:
        error = None
        if self.checkpoints is not None:
            try:
                self.checkpoints.close()  # the last checkpoint is on disk: its offsets commit
                self._commit_durable()
            except Exception as exc:  # noqa: BLE001 - raised below, once the rest is closed
                error = exc
        if self.publisher is not None:
            self.publisher.close()  # the last version's push finishes before the log closes
        self.source.close()
        self.dead_letters.close()
        if self.producer is not None:
            # Bounded like every service's: a record Kafka never acknowledged cannot hold the
            # exit (kafka-python's close waits forever by default).
            self.producer.close(timeout=10)
        self.log.close()
        if error is not None:
            raise error
