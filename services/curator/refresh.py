"""The reward-model refresh: fine-tunes the served reward model on live preference pairs and
publishes a new version only when held-out pairwise accuracy did not drop. Run it with

    RLHF_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 RLHF_REFRESH_BASE_MODEL_DIR=/models/reward/v1 \
    RLHF_REFRESH_VERSIONS_ROOT=/models/reward RLHF_REFRESH_REWARD_ADDRESS=reward:50052 \
        python -m services.curator.refresh          # settings: services/curator/refresh_settings.py

One cycle (`RefreshWorker.step`):
  1. poll `rlhf.preferences.v1` (consumer group, manual commits);
  2. store each new pair in the sqlite pair store, de-duplicated by `preference_id`, on the
     held-out side when `int(prompt_hash(prompt), 16) % held_out_modulus == 0` (the Kafka key's
     hash, so a prompt never crosses splits and all its records share a partition);
  3. store the next offsets and commit sqlite; only then commit the offsets to Kafka (on restart
     the store's offsets win: `_SeekToStored`, as in the curator);
  4. once `refresh_every` new training pairs are stored (and `min_held_out` held-out ones):
     a. fine-tune the current version on the new pairs plus a replay sample of older ones
        (`replay_ratio` older per new), Bradley-Terry loss, with the offline stage's functions;
     b. held-out pairwise accuracy before and after; publish only if after >= before - tolerance;
     c. publish: the Hugging Face folder written to a temporary sibling, fsynced, renamed to
        `versions_root/vNNNNNN`; then (version, path, sha256 manifest, "reload pending") and the
        pairs' "trained" marks commit in one sqlite transaction, and only then the reward service
        is told (ReloadModel). A crash before that commit re-runs the refresh; a crash after it
        re-sends the reload on restart (the service accepts a repeated order as a no-op).
     A refused reload is logged and counted, never retried; an unreachable service is tried
     `reload_attempts` times. The next refresh starts from the published version either way.
KTO binary labels are counted and skipped: the curator already emits a chosen/rejected pair for
every up/down combination of one prompt, so pairing labels here would count those twice.

Shapes: `P` preference pairs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf.message import DecodeError
from kafka import TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.kafka import commit, decode, make_consumer
from services.common.logging import configure_logging
from services.common.metrics import serve_metrics
from services.common.models import load_tokenizer
from services.curator.preferences import prompt_hash
from services.curator.refresh_settings import RefreshSettings
from services.curator.server import _SeekToStored
from services.genproto.rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc
from services.reward.checkpoint import manifest
from services.trainer.checkpoint import fsync_dir
from services.trainer.offline.common import (
    make_optimizer,
    make_runtime,
    optimizer_step,
    save_model_folder,
    shuffled_batches,
)
from services.trainer.offline.data import PreferencePair
from services.trainer.offline.losses import LossName, get_loss
from services.trainer.offline.reward import (
    RewardConfig,
    held_out_metrics,
    load_reward_for_training,
    pair_rewards,
)

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


def publish_decision(before: float, after: float, tolerance: float = 0.0) -> Decision:
    """Publish only when held-out accuracy did not drop (by more than `tolerance`)."""
    if after + 1e-12 >= before - tolerance:
        return Decision(True, f"held-out accuracy {before:.4f} -> {after:.4f}")
    return Decision(False, f"held-out accuracy dropped {before:.4f} -> {after:.4f}")


# ---------------------------------------------------------------------------------------------
# The pair store: pairs, ids seen, offsets and the current version, in one sqlite file

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, preference_id TEXT UNIQUE, prompt TEXT, chosen TEXT,
  rejected TEXT, held_out INTEGER, trained INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS pairs_split ON pairs(held_out, trained);
CREATE TABLE IF NOT EXISTS seen (preference_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS offsets (
  topic TEXT, partition INTEGER, next_offset INTEGER, PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass(frozen=True)
class CurrentVersion:
    """The reward model the next refresh starts from (the last one published)."""

    version: int
    path: Path
    file_sha256: dict[str, str]
    reload_pending: bool
    """Published and recorded, but the reward service has not answered its reload yet."""


class PairStore:
    """Typed layer over the sqlite file; callers group writes with `commit`/`rollback`."""

    def __init__(self, state_dir: Path):
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(Path(state_dir) / "refresh.sqlite", isolation_level="DEFERRED")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
        self.db.executescript(SCHEMA)
        self.db.commit()

    def commit(self) -> None:
        self.db.commit()

    def rollback(self) -> None:
        self.db.rollback()

    def close(self) -> None:
        self.db.close()

    def mark_seen(self, preference_id: str) -> bool:
        """False when the id was stored before (a duplicate)."""
        return (
            self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (preference_id,)).rowcount == 1
        )

    def add_pair(self, preference_id: str, pair: PreferencePair, held_out: bool) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO pairs (preference_id, prompt, chosen, rejected, held_out) "
            "VALUES (?,?,?,?,?)",
            (preference_id, pair.prompt, pair.chosen, pair.rejected, int(held_out)),
        )

    def count(self, held_out: bool, trained: bool | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM pairs WHERE held_out=?", [int(held_out)]
        if trained is not None:
            sql, args = sql + " AND trained=?", args + [int(trained)]
        return self.db.execute(sql, args).fetchone()[0]

    def new_training_pairs(self) -> list[tuple[int, PreferencePair]]:
        """(seq, pair) of training pairs no refresh has used yet, oldest first."""
        rows = self.db.execute(
            "SELECT seq, prompt, chosen, rejected FROM pairs "
            "WHERE held_out=0 AND trained=0 ORDER BY seq"
        ).fetchall()
        return [(seq, PreferencePair(*texts)) for seq, *texts in rows]

    def trained_seqs(self) -> list[int]:
        return [
            r[0]
            for r in self.db.execute(
                "SELECT seq FROM pairs WHERE held_out=0 AND trained=1 ORDER BY seq"
            )
        ]

    def pairs_by_seq(self, seqs: list[int]) -> list[PreferencePair]:
        out = []
        for start in range(0, len(seqs), 500):  # sqlite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            out += [
                PreferencePair(*r)
                for r in self.db.execute(
                    f"SELECT prompt, chosen, rejected FROM pairs WHERE seq IN ({marks}) ORDER BY seq",
                    chunk,
                )
            ]
        return out

    def held_out_pairs(self, limit: int) -> list[PreferencePair]:
        """The newest `limit` held-out pairs, in store order."""
        rows = self.db.execute(
            "SELECT prompt, chosen, rejected FROM (SELECT * FROM pairs "
            "WHERE held_out=1 ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (limit,),
        )
        return [PreferencePair(*r) for r in rows]

    def mark_trained(self, up_to_seq: int) -> None:
        self.db.execute("UPDATE pairs SET trained=1 WHERE held_out=0 AND seq<=?", (up_to_seq,))

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO offsets VALUES (?,?,?)", (topic, partition, next_offset)
        )

    def offsets(self) -> dict[tuple[str, int], int]:
        return {
            (t, p): o
            for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM offsets")
        }

    def current(self, base: CurrentVersion) -> CurrentVersion:
        row = self.db.execute("SELECT value FROM state WHERE key='current'").fetchone()
        if row is None:
            return base
        data = json.loads(row[0])
        return CurrentVersion(
            int(data["version"]),
            Path(data["path"]),
            dict(data["file_sha256"]),
            bool(data["reload_pending"]),
        )

    def set_current(self, current: CurrentVersion) -> None:
        value = json.dumps(
            {
                "version": current.version,
                "path": str(current.path),
                "file_sha256": current.file_sha256,
                "reload_pending": current.reload_pending,
            }
        )
        self.db.execute("INSERT OR REPLACE INTO state VALUES ('current', ?)", (value,))


# ---------------------------------------------------------------------------------------------
# Fine-tuning, with the offline train-reward stage's functions


@dataclass
class Candidate:
    model: torch.nn.Module
    tokenizer: object
    before: dict[str, float]
    """Held-out metrics of the starting version: accuracy, margin, loss."""
    after: dict[str, float]
    """Held-out metrics of the fine-tuned model."""
    steps: int


def fine_tune(
    model_dir: Path,
    train: list[PreferencePair],
    held_out: list[PreferencePair],
    config: RewardConfig,
    rng: random.Random,
) -> Candidate:
    """Bradley-Terry fine-tuning of `model_dir` on `train`, evaluated on `held_out` around it."""
    runtime = make_runtime(config)
    tokenizer = load_tokenizer(model_dir)
    model = load_reward_for_training(model_dir, runtime.device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    before = held_out_metrics(model, tokenizer, held_out, config, runtime)
    optimizer = make_optimizer(model, config)
    bradley_terry = get_loss(LossName.BRADLEY_TERRY)
    steps = 0
    for _ in range(config.epochs):
        for chunk in shuffled_batches(train, config.batch_size, rng):
            chosen, rejected = pair_rewards(
                model, tokenizer, chunk, config.max_length, runtime
            )  # (P,), (P,)
            loss, _ = bradley_terry(chosen, rejected)
            optimizer_step(model, optimizer, loss, config.max_grad_norm)
            steps += 1
    after = held_out_metrics(model, tokenizer, held_out, config, runtime)
    return Candidate(model.eval(), tokenizer, before, after, steps)


def version_dir(root: Path, version: int) -> Path:
    return Path(root).resolve() / f"v{version:06d}"


def publish_folder(root: Path, version: int, candidate: Candidate, summary: dict) -> Path:
    """Writes the version folder atomically (temp sibling, fsync, rename) and returns its path."""
    path = save_model_folder(
        version_dir(root, version), candidate.model, candidate.tokenizer, summary, overwrite=True
    )  # a folder left by a crash before the record
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path)
    fsync_dir(path.parent)
    return path


def prune_versions(root: Path, keep: int, current: Path) -> None:
    """Removes all but the `keep` newest version folders (never the current one)."""
    folders = sorted((p for p in Path(root).glob("v[0-9]*") if p.is_dir()), reverse=True)
    for old in folders[keep:]:
        if old.resolve() != Path(current).resolve():
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The loop


class RefreshMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.records = Counter(
            "rlhf_refresh_records_consumed_total",
            "Preference records read, by what became of them (pair, label, duplicate, invalid).",
            ["kind"],
            registry=registry,
        )
        self.pairs = Counter(
            "rlhf_refresh_pairs_consumed_total",
            "New pairs stored, by split.",
            ["split"],
            registry=registry,
        )
        self.runs = Counter("rlhf_refresh_refreshes_run_total", "Refreshes run.", registry=registry)
        self.published = Counter(
            "rlhf_refresh_refreshes_published_total",
            "Refreshes whose model was published.",
            registry=registry,
        )
        self.rejected = Counter(
            "rlhf_refresh_refreshes_rejected_total",
            "Refreshes dropped: held-out accuracy fell.",
            registry=registry,
        )
        self.reloads = Counter(
            "rlhf_refresh_reloads_total",
            "ReloadModel outcomes, by result (accepted, refused, unreachable).",
            ["result"],
            registry=registry,
        )
        self.accuracy = Gauge(
            "rlhf_refresh_held_out_accuracy",
            "Held-out pairwise accuracy of the current and the last candidate model.",
            ["model"],
            registry=registry,
        )
        self.version = Gauge(
            "rlhf_refresh_reward_model_version",
            "Version of the last published reward model.",
            registry=registry,
        )
        self.duration = Histogram(
            "rlhf_refresh_duration_seconds",
            "Time of one refresh.",
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=registry,
        )


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


class RefreshWorker:
    """`step()` runs one consume cycle and, when due, a refresh (tests drive it); `run()` loops."""

    def __init__(self, settings: RefreshSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.metrics = RefreshMetrics(registry or CollectorRegistry())
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
        self.consumer.subscribe([settings.topic], listener=_SeekToStored(self))
        self.stopping = threading.Event()
        if self.store.current(self.base).reload_pending:  # a crash between record and reload
            self._reload()

    # 1-3. consume --------------------------------------------------------------------------
    def step(self) -> RefreshResult | None:
        self.consume()
        return self.refresh() if self.refresh_due() else None

    def consume(self) -> int:
        """One poll stored durably, then committed to Kafka; returns the records read."""
        batches = self.consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
        next_offsets: dict[TopicPartition, int] = {}
        kinds: list[str] = []
        try:
            for tp, records in batches.items():
                for record in records:
                    kinds.append(self._take(record.value))
                    next_offsets[tp] = record.offset + 1
            for tp, offset in next_offsets.items():
                self.store.set_offset(tp.topic, tp.partition, offset)
            self.store.commit()
            self.stored_offsets = {
                **self.stored_offsets,
                **{(tp.topic, tp.partition): o for tp, o in next_offsets.items()},
            }
        except Exception:
            self.store.rollback()
            for tp, records in batches.items():  # read this batch again next cycle
                self.consumer.seek(tp, records[0].offset)
            raise
        try:
            commit(self.consumer, next_offsets)
        except Exception as exc:  # noqa: BLE001 - a rebalance: the store's offsets are the truth
            log.warning("kafka offset commit failed", extra={"fields": {"error": repr(exc)}})
        for kind in kinds:
            self.metrics.records.labels(kind.split(":")[0]).inc()
            if kind.startswith("pair:"):
                self.metrics.pairs.labels(kind.split(":")[1]).inc()
        return len(kinds)

    def _take(self, value: bytes) -> str:
        """Stores one record; returns what became of it (`pair:train`, `label`, ...)."""
        try:
            record = decode(events_pb2.PreferenceRecord, value)
        except DecodeError:
            log.warning("undecodable preference record skipped")
            return "invalid"
        kind = record.WhichOneof("kind")
        if not record.preference_id or kind not in RECORD_HANDLERS:
            log.warning(
                "preference record without id or kind skipped",
                extra={"fields": {"preference_id": record.preference_id}},
            )
            return "invalid"
        if not self.store.mark_seen(record.preference_id):
            return "duplicate"
        return RECORD_HANDLERS[kind](self, record)

    def _store_pair(self, record: events_pb2.PreferenceRecord) -> str:
        pair = PreferencePair(record.prompt, record.pair.chosen, record.pair.rejected)
        if not (pair.prompt and pair.chosen and pair.rejected) or pair.chosen == pair.rejected:
            log.warning(
                "unusable pair skipped", extra={"fields": {"preference_id": record.preference_id}}
            )
            return "invalid"
        held_out = is_held_out(pair.prompt, self.settings.held_out_modulus)
        self.store.add_pair(record.preference_id, pair, held_out)
        return "pair:held_out" if held_out else "pair:train"

    def _skip_label(self, record: events_pb2.PreferenceRecord) -> str:
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
        # a. fine-tune, b. evaluate before and after
        config = self.training_config(current)
        candidate = fine_tune(current.path, [p for _, p in new] + replay, held_out, config, rng)
        before, after = candidate.before["accuracy"], candidate.after["accuracy"]
        decision = publish_decision(before, after, self.settings.tolerance)
        self.metrics.runs.inc()
        self.metrics.accuracy.labels("candidate").set(after)
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
        log.info("refresh", extra={"fields": {k: v for k, v in result.__dict__.items()}})
        return result

    def _reload(self) -> bool | None:
        """Tells the reward service about the current version; True/False is its answer, None when
        it could not be reached. Never retried beyond `reload_attempts`."""
        current = self.store.current(self.base)
        request = reward_pb2.ReloadModelRequest(
            reward_model_version=current.version,
            path=str(current.path),
            file_sha256=current.file_sha256,
        )
        answer: bool | None = None
        for attempt in range(self.settings.reload_attempts):
            try:
                with grpc.insecure_channel(self.settings.reward_address) as channel:
                    reply = reward_pb2_grpc.RewardServiceStub(channel).ReloadModel(
                        request, timeout=self.settings.reload_timeout_s
                    )
                answer = reply.accepted
                self.metrics.reloads.labels("accepted" if reply.accepted else "refused").inc()
                log.log(
                    logging.INFO if reply.accepted else logging.ERROR,
                    "reward model reload",
                    extra={
                        "fields": {
                            "version": current.version,
                            "accepted": reply.accepted,
                            "serving": reply.reward_model_version,
                            "reason": reply.reason,
                        }
                    },
                )
                break
            except grpc.RpcError as error:
                log.warning(
                    "reward service unreachable for reload",
                    extra={"fields": {"attempt": attempt + 1, "code": str(error.code())}},
                )
                time.sleep(min(2.0**attempt, 10.0))
        else:
            self.metrics.reloads.labels("unreachable").inc()
        self.store.set_current(
            CurrentVersion(current.version, current.path, current.file_sha256, False)
        )
        self.store.commit()
        self.metrics.version.set(current.version)
        return answer

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except Exception:
                log.exception("refresh cycle failed; retrying from the stored offsets")
                time.sleep(1.0)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.store.close()


RECORD_HANDLERS = {"pair": RefreshWorker._store_pair, "label": RefreshWorker._skip_label}
"""PreferenceRecord kind -> how the refresh takes it."""


def main() -> None:
    settings = RefreshSettings()
    configure_logging("reward-refresh", settings.log_level)
    registry = CollectorRegistry()
    if settings.metrics_port:
        serve_metrics(registry, settings.metrics_port)
    worker = RefreshWorker(settings, registry)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    log.info("reward refresh started", extra={"fields": {"state_dir": str(settings.state_dir)}})
    try:
        worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
