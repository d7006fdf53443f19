"""`rlhf export` on what the real platform collected: rankings and a preference posted to the real
gateway, live thumbs joined by the real curator, all in the real Kafka. The files are read by
`datasets.load_dataset`, and TRL's DPOTrainer and KTOTrainer each train one step on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition

from services.common import topics
from services.common.kafka import make_producer
from services.genproto.rlhf.v1 import common_pb2, events_pb2
from tests.integration.curator.curator_steps import make_worker, step_until
from tests.integration.gateway.gateway_process import running_gateway

REPO = Path(__file__).resolve().parents[3]


def end_offsets(kafka_settings, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.servers)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return {tp.partition: n for tp, n in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


def rlhf_export(kafka_settings, output: Path, *settings: str) -> dict:
    argv = [sys.executable, "-m", "services.cli", "export", "--output", str(output)]
    argv += ["--bootstrap-servers", kafka_settings.bootstrap_servers]
    for s in settings:
        argv += ["--set", s]
    out = subprocess.run(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads((output / "export.json").read_text())


def generation(rid: str, messages: list[tuple[str, str]], answer: str):
    return events_pb2.GenerationRecord(
        response_id=rid,
        prompt=common_pb2.Prompt(
            messages=common_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages]
            )
        ),
        prompt_text="<|im_start|>user ... <|im_start|>assistant\n",  # the template: not exported
        response_text=answer,
        weights_version=1,
        model="policy",
    )


@pytest.fixture(scope="module")
def collected(kafka_settings, run_dir, tmp_path_factory):
    """Posts and joins one of each kind of judgement; returns what the test must find."""
    tag = uuid.uuid4().hex[:6]
    start = end_offsets(kafka_settings, topics.PREFERENCES)
    ranked = [f"Paris. ({tag})", f"It is Paris. ({tag})", f"Lyon. ({tag})"]
    ask = [("system", "Answer in one word."), ("user", f"Capital of Italy? ({tag})")]
    producer = make_producer(kafka_settings)
    for rid, answer in ((f"up-{tag}", "Rome."), (f"down-{tag}", "Milan.")):
        producer.send(topics.GENERATIONS, key=rid, value=generation(rid, ask, answer)).get(30)
    producer.close()
    with running_gateway(kafka_settings, run_dir / "gateway-export", rate_limit_burst=1000) as gw:
        r = httpx.post(
            f"{gw.url}/v1/rankings",
            json={"prompt": f"Capital of France? ({tag})", "responses": ranked},
            headers=gw.headers,
            timeout=10,
        )
        assert r.status_code == 202, r.text
        time.sleep(1.5)  # the time window below falls between the ranking and the rest
        middle = datetime.now(UTC)
        time.sleep(1.5)
        r = httpx.post(
            f"{gw.url}/v1/preferences",
            json={"prompt": f"2+2? ({tag})", "chosen": "4", "rejected": "5"},
            headers=gw.headers,
            timeout=10,
        )
        assert r.status_code == 202, r.text
        for rid, thumb in ((f"up-{tag}", "up"), (f"down-{tag}", "down")):
            r = httpx.post(
                f"{gw.url}/v1/feedback",
                json={"response_id": rid, "thumb": thumb},
                headers=gw.headers,
                timeout=10,
            )
            assert r.status_code == 202, r.text
    worker = make_worker(kafka_settings, tmp_path_factory.mktemp("curator"))
    try:
        step_until(
            worker,
            lambda out: any(
                r.WhichOneof("kind") == "pair" and "Rome." == r.pair.chosen for r in out
            ),
        )
    finally:
        worker.close()
    return {"tag": tag, "start": start, "middle": middle, "ranked": ranked, "ask": ask}


def mine(rows: list[dict], tag: str) -> list[dict]:
    return [r for r in rows if tag in json.dumps(r)]


def test_export_writes_trl_columns_with_the_conversation_as_asked(
    kafka_settings, collected, tmp_path
):
    tag, ask = collected["tag"], collected["ask"]
    start = ",".join(f"{p}:{n}" for p, n in collected["start"].items())
    summary = rlhf_export(kafka_settings, tmp_path, f"start_offsets={start}")
    assert summary["files"] == {"preferences": "preferences.jsonl", "labels": "labels.jsonl"}
    assert summary["undecodable"] == []
    assert {int(p): n for p, n in summary["window"]["start_offsets"].items()} == collected["start"]
    pairs = mine(
        [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()],
        tag,
    )
    labels = mine(
        [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()], tag
    )
    a, b, c = collected["ranked"]
    by_prompt = sorted((p["prompt"][-1]["content"], p["chosen"][0]["content"]) for p in pairs)
    france = f"Capital of France? ({tag})"
    assert sorted(
        (p["chosen"][0]["content"], p["rejected"][0]["content"])
        for p in pairs
        if p["prompt"] == [{"role": "user", "content": france}]
    ) == sorted([(a, b), (a, c), (b, c)])  # K(K-1)/2 pairs of the ranking
    assert (f"2+2? ({tag})", "4") in by_prompt
    live = [p for p in pairs if p["source"] == "live_feedback"]
    assert len(live) == 1 and len(pairs) == 5
    assert live[0]["prompt"] == [{"role": r, "content": c} for r, c in ask]  # not the template
    assert live[0]["chosen"] == [{"role": "assistant", "content": "Rome."}]
    assert live[0]["rejected"] == [{"role": "assistant", "content": "Milan."}]
    assert sorted((r["completion"][0]["content"], r["label"]) for r in labels) == [
        ("Milan.", False),
        ("Rome.", True),
    ]
    assert all(r["prompt"] == live[0]["prompt"] for r in labels)


def test_a_time_window_and_parquet_read_by_datasets(kafka_settings, collected, tmp_path):
    from datasets import load_dataset

    tag = collected["tag"]
    start = ",".join(f"{p}:{n}" for p, n in collected["start"].items())
    everything = rlhf_export(kafka_settings, tmp_path / "all", f"start_offsets={start}")
    since = collected["middle"].isoformat()
    later = rlhf_export(kafka_settings, tmp_path / "later", f"since={since}", "format=parquet")
    assert later["files"]["preferences"] == "preferences.parquet"
    assert everything["metrics"]["pairs"] >= 5

    jsonl = load_dataset("json", data_files=str(tmp_path / "all" / "preferences.jsonl"))["train"]
    parquet = load_dataset("parquet", data_files=str(tmp_path / "later" / "preferences.parquet"))[
        "train"
    ]
    for ds in (jsonl, parquet):
        assert {"prompt", "chosen", "rejected", "preference_id", "source"} <= set(ds.column_names)
    prompts = {row["prompt"][-1]["content"] for row in mine(list(parquet), tag)}
    # The ranking came before `since`, the preference and the live pair after it.
    assert prompts == {f"2+2? ({tag})", f"Capital of Italy? ({tag})"}
    assert len(mine(list(jsonl), tag)) == 5


def test_an_undecodable_record_is_reported_not_dropped(kafka_settings, tmp_path):
    topic = f"export-bad-{uuid.uuid4().hex[:6]}"
    from services.common.kafka import ensure_topics
    from services.common.preferences import Source, pair_record

    ensure_topics(kafka_settings, [topics.TopicSpec(topic, 1)])
    producer = make_producer(kafka_settings)
    good = pair_record("q", "a", "b", Source.PREFERENCE_SOURCE_FILE, [], "pair-1")
    producer.send(topic, key="k", value=good).get(30)
    producer.send(topic, key="k", value=b"\xff\xff not protobuf").get(30)
    producer.send(topic, key="k", value=good).get(30)  # a retry: the same id, written once
    producer.close()
    summary = rlhf_export(kafka_settings, tmp_path, f"topic={topic}")
    assert summary["metrics"] == {
        "pairs": 1,
        "labels": 0,
        "duplicates": 1,
        "filtered_out": 0,
        "undecodable": 1,
    }
    assert [(u["partition"], u["offset"]) for u in summary["undecodable"]] == [(0, 1)]


def test_trl_trains_one_step_on_the_exported_files(
    kafka_settings, collected, tmp_path, tiny_lm_dir
):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    start = ",".join(f"{p}:{n}" for p, n in collected["start"].items())
    rlhf_export(kafka_settings, tmp_path / "data", f"start_offsets={start}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    common = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
    }
    for trainer_cls, config_cls, name in (
        (DPOTrainer, DPOConfig, "preferences.jsonl"),
        (KTOTrainer, KTOConfig, "labels.jsonl"),
    ):
        data = load_dataset("json", data_files=str(tmp_path / "data" / name))["train"]
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = trainer_cls(
            model=model, args=config_cls(**common), train_dataset=data, processing_class=tokenizer
        )
        result = trainer.train()
        assert result.global_step == 1
        changed = [n for n, p in model.named_parameters() if not p.detach().equal(before[n])]
        assert changed, f"{trainer_cls.__name__} changed no weight"
