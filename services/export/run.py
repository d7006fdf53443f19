"""`rlhf export`: the preference data on `rlhf.preferences.v1`, out to JSONL or Parquet in TRL's
column conventions, so that `datasets.load_dataset` reads it and TRL's trainers take it as is.

    python -m services.cli export --output runs/export-1
    python -m services.cli export --output runs/export-1 --set format=parquet \\
        --set since=2026-12-01T00:00:00Z --set until=2026-12-02T00:00:00Z
    python -m services.cli export --output runs/export-2 --set start_offsets=0:120,1:98

What is written to the output folder (each file atomically):
- `preferences.<ext>`: one row per pairwise preference (rankings become their K(K-1)/2 pairs,
  live thumbs their joined pairs): conversational `prompt` (the messages as asked),
  `chosen` and `rejected` (one assistant message each), for DPO and reward modelling;
- `labels.<ext>`: one row per thumbs judgement joined with its generation: `prompt`,
  `completion`, `label` (true for thumbs up), for KTO;
- both with `preference_id`, `source` and `created_at` beside, for tracing a row back;
- `export.json`: the window read (start and end offset of every partition), the row counts, and
  every record that could not be decoded (partition, offset, error). Its end offsets are the
  next export's `start_offsets`.

A window is chosen by time (`since`/`until`, record timestamps) or by offset
(`start_offsets`/`end_offsets`: one number for every partition, or `P:N,P:N`); by default it is
everything up to the end offsets when the export starts. Records are read without a consumer
group (nothing is committed), and a record seen twice (a producer's retry after a crash keeps
its id) is written once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from kafka import KafkaConsumer, TopicPartition

from services.common import topics
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import events_pb2

EXPORT_FILE = "export.json"
FORMATS = ("jsonl", "parquet")
SOURCES = {
    events_pb2.PREFERENCE_SOURCE_UNSPECIFIED: "unspecified",
    events_pb2.PREFERENCE_SOURCE_LIVE_FEEDBACK: "live_feedback",
    events_pb2.PREFERENCE_SOURCE_ANNOTATION: "annotation",
    events_pb2.PREFERENCE_SOURCE_FILE: "file",
    events_pb2.PREFERENCE_SOURCE_AI: "ai",
}


class ExportError(ValueError):
    """Bad configuration of `rlhf export`; the message names the field."""


@dataclass
class ExportConfig:
    output: Path
    """Folder the files are written to (created if missing)."""
    bootstrap_servers: str = ""
    """Kafka brokers, host:port[,host:port]; empty: RLHF_KAFKA_BOOTSTRAP_SERVERS."""
    topic: str = topics.PREFERENCES
    """The topic of PreferenceRecords to read."""
    format: str = "jsonl"
    """jsonl or parquet."""
    since: str = ""
    """Only records at or after this time (ISO 8601, e.g. 2026-12-01T00:00:00Z, or epoch s)."""
    until: str = ""
    """Only records before this time (same forms)."""
    start_offsets: str = ""
    """First offset to read: N for every partition, or P:N,P:N (others from the start)."""
    end_offsets: str = ""
    """Offset to stop before: N or P:N,P:N (others at their end when the export starts)."""
    sources: str = ""
    """Only these sources, comma-separated (live_feedback, annotation, file, ai); empty: all."""
    timeout_s: float = 120.0
    """Give up when the window is not read within this time."""


# ----- rows -----


def conversation(record: events_pb2.PreferenceRecord) -> list[dict[str, str]]:
    """The prompt as TRL's conversational messages: the conversation as asked, or, for records
    without one, the prompt text as one user turn."""
    asked = record.conversation
    if asked.WhichOneof("kind") == "messages":
        return [{"role": m.role, "content": m.content} for m in asked.messages.messages]
    text = asked.text if asked.WhichOneof("kind") == "text" else record.prompt
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def to_row(record: events_pb2.PreferenceRecord) -> tuple[str, dict[str, Any]]:
    """("preferences" | "labels", the TRL row) of one record."""
    meta = {
        "preference_id": record.preference_id,
        "source": SOURCES.get(record.source, str(record.source)),
        "created_at": record.created_at.ToDatetime(tzinfo=UTC).isoformat(),
    }
    prompt = conversation(record)
    if record.WhichOneof("kind") == "pair":
        pair = record.pair
        row = {
            "prompt": prompt,
            "chosen": assistant(pair.chosen),
            "rejected": assistant(pair.rejected),
        }
        return "preferences", {**row, **meta}
    if record.WhichOneof("kind") == "label":
        label = record.label
        row = {
            "prompt": prompt,
            "completion": assistant(label.completion),
            "label": label.desirable,
        }
        return "labels", {**row, **meta}
    raise ValueError(f"preference record {record.preference_id!r} has neither a pair nor a label")


# ----- the window -----


def parse_time(name: str, value: str) -> int | None:
    """Milliseconds since the epoch, or None for an empty value."""
    if not value:
        return None
    try:
        return int(float(value) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise ExportError(f"{name}={value!r}: expected ISO 8601 or epoch seconds") from err
    if moment.tzinfo is None:
        raise ExportError(f"{name}={value!r}: give a time zone (e.g. Z)")
    return int(moment.timestamp() * 1000)


def parse_offsets(name: str, value: str, partitions: list[int]) -> dict[int, int]:
    """`N` (every partition) or `P:N,P:N` -> {partition: offset}."""
    if not value:
        return {}
    try:
        if ":" not in value:
            offsets = dict.fromkeys(partitions, int(value))
        else:
            offsets = {}
            for part in value.split(","):
                p, n = part.split(":")
                offsets[int(p)] = int(n)
    except ValueError as err:
        raise ExportError(f"{name}={value!r}: expected N or P:N,P:N") from err
    unknown = sorted(set(offsets) - set(partitions))
    if unknown or any(n < 0 for n in offsets.values()):
        raise ExportError(f"{name}={value!r}: partitions {partitions} and offsets >= 0 only")
    return offsets


def check(config: ExportConfig) -> None:
    if config.format not in FORMATS:
        raise ExportError(f"format={config.format!r}: one of {', '.join(FORMATS)}")
    if (config.since or config.until) and (config.start_offsets or config.end_offsets):
        raise ExportError("choose the window by time (since/until) or by offset, not both")
    parse_time("since", config.since)
    parse_time("until", config.until)
    names = set(SOURCES.values())
    wanted = {s.strip() for s in config.sources.split(",") if s.strip()}
    if wanted - names:
        raise ExportError(f"sources: unknown {sorted(wanted - names)}; known: {sorted(names)}")


def _bounds(
    consumer: KafkaConsumer, parts: list[TopicPartition], config: ExportConfig
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """The [start, end) offsets of every partition for the configured window."""
    begin = consumer.beginning_offsets(parts)
    end = consumer.end_offsets(parts)
    ids = [tp.partition for tp in parts]
    start = dict(begin)
    for p, n in parse_offsets("start_offsets", config.start_offsets, ids).items():
        tp = next(t for t in parts if t.partition == p)
        start[tp] = max(n, begin[tp])
    for p, n in parse_offsets("end_offsets", config.end_offsets, ids).items():
        tp = next(t for t in parts if t.partition == p)
        end[tp] = min(n, end[tp])
    for name, bound in (("since", start), ("until", end)):
        ms = parse_time(name, getattr(config, name))
        if ms is None:
            continue
        found = consumer.offsets_for_times(dict.fromkeys(parts, ms))
        for tp in parts:
            # The first offset at or after the time; none: every record is before it.
            at = found[tp].offset if found[tp] is not None else end[tp]
            bound[tp] = max(at, start[tp]) if name == "since" else min(at, end[tp])
    return start, end


def read_window(config: ExportConfig) -> dict[str, Any]:
    """Reads the window; returns rows by file, the offsets read, and the undecodable records."""
    check(config)
    kafka = (
        KafkaSettings(bootstrap_servers=config.bootstrap_servers)
        if config.bootstrap_servers
        else KafkaSettings()
    )
    wanted = {s.strip() for s in config.sources.split(",") if s.strip()}
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.servers,
        client_id=f"{kafka.client_id}-export",
        enable_auto_commit=False,
        isolation_level="read_committed",
        consumer_timeout_ms=1000,
        **kafka.kafka_python_config(),
    )
    try:
        ids = consumer.partitions_for_topic(config.topic)
        if not ids:
            raise ExportError(f"topic {config.topic!r} does not exist on {kafka.bootstrap_servers}")
        parts = [TopicPartition(config.topic, p) for p in sorted(ids)]
        start, end = _bounds(consumer, parts, config)
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start[tp])
        rows: dict[str, dict[str, dict]] = {"preferences": {}, "labels": {}}
        bad: list[dict[str, Any]] = []
        duplicates = filtered = 0
        deadline = time.monotonic() + config.timeout_s
        todo = {tp for tp in parts if start[tp] < end[tp]}
        while todo:
            if time.monotonic() > deadline:
                left = {tp.partition: consumer.position(tp) for tp in todo}
                raise TimeoutError(f"the window was not read in {config.timeout_s}s; at {left}")
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    if r.offset >= end[tp]:
                        break
                    try:
                        record = events_pb2.PreferenceRecord.FromString(r.value)
                        kind, row = to_row(record)
                    except (DecodeError, ValueError) as err:  # reported in export.json
                        bad.append(
                            {"partition": tp.partition, "offset": r.offset, "error": str(err)}
                        )
                        continue
                    if wanted and row["source"] not in wanted:
                        filtered += 1
                    elif row["preference_id"] in rows[kind]:
                        duplicates += 1
                    else:
                        rows[kind][row["preference_id"]] = row
            for tp in list(todo):
                if consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
    finally:
        consumer.close()
    return {
        "rows": {kind: list(by_id.values()) for kind, by_id in rows.items()},
        "window": {
            "topic": config.topic,
            "start_offsets": {tp.partition: start[tp] for tp in parts},
            "end_offsets": {tp.partition: end[tp] for tp in parts},
        },
        "undecodable": bad,
        "duplicates": duplicates,
        "filtered_out": filtered,
    }


# ----- files -----


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write(tmp: Path) -> None:
            pq.write_table(pa.Table.from_pylist(rows), tmp)

    _write_atomic(path, write)


def run_export(config: ExportConfig) -> dict[str, Any]:
    """The CLI's entry: reads the window, writes the files; returns the summary."""
    result = read_window(config)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, rows in result["rows"].items():
        path = output / f"{kind}.{config.format}"
        if rows:
            write_rows(path, rows, config.format)
            files[kind] = path.name
        elif path.exists():
            path.unlink()  # a file from an earlier export would claim rows this window lacks
    metrics = {
        "pairs": len(result["rows"]["preferences"]),
        "labels": len(result["rows"]["labels"]),
        "duplicates": result["duplicates"],
        "filtered_out": result["filtered_out"],
        "undecodable": len(result["undecodable"]),
    }
    summary = {
        "files": files,
        "format": config.format,
        "window": result["window"],
        "undecodable": result["undecodable"],
        "metrics": metrics,
    }
    _write_atomic(
        output / EXPORT_FILE,
        lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n"),
    )
    return summary
