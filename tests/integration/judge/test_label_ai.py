"""`rlhf label-ai` through a running judge service (rule-based, over real gRPC): one verdict per
row of the file, equal to the rule's, and a clear error for a bad row or a missing service."""

from __future__ import annotations

import json

import grpc
import pytest

from deploy.local.process import free_port
from services.cli import main as rlhf
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import common_pb2, judge_pb2
from tests.integration.judge.judge_stack import judge_stack

RULE = "tests.integration.judge.rules:longer"


@pytest.fixture(scope="module")
def judge():
    with judge_stack(None, annotator=RULE) as stack:
        yield stack


def test_every_row_gets_the_rules_verdict(judge, tmp_path, capsys):
    rows = [
        {"prompt": "q1", "answer_a": "a longer answer", "answer_b": "short"},
        {"messages": [{"role": "user", "content": "q2"}], "answer_a": "ab", "answer_b": "abc"},
        {"prompt": "q3", "answer_a": "same", "answer_b": "SAME"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "verdicts.jsonl"
    argv = ["label-ai", "--judge", judge.address, "--data", str(data), "--output", str(output)]
    assert rlhf(argv + ["--set", "publish=false", "--set", "batch_size=2"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert (metrics["pairs"], metrics["a_better"], metrics["b_better"], metrics["ties"]) == (
        3,
        1,
        1,
        1,
    )
    assert metrics["published"] == 0
    # The rule is blind to the order: no position bias, and both orders agree except on the tie.
    assert metrics["position_bias_mean"] == 0.0
    assert metrics["orders_agree"] == 2
    verdicts = [json.loads(line) for line in output.read_text().splitlines()]
    assert [v["p_a_better"] for v in verdicts] == [1.0, 0.0, 0.5]
    assert [v["confidence"] for v in verdicts] == [1.0, 1.0, 0.0]
    assert {v["judge_model"] for v in verdicts} == {RULE}
    assert verdicts[1]["prompt"] == rows[1]["messages"]
    assert all(v["preference_id"] == "" for v in verdicts)
    # Two Compare calls (batch_size=2) reached the service.
    assert judge.metric("rlhf_judge_request_pairs_count") == 2


def test_bad_rows_and_a_missing_judge_are_clear_errors(judge, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "answer_a": "x", "answer_b": ""}) + "\n")
    argv = ["label-ai", "--data", str(data), "--output", str(tmp_path / "out.jsonl")]
    assert rlhf(argv + ["--judge", judge.address]) == 2
    assert "line 1: column 'answer_b' must be a non-empty string" in capsys.readouterr().err
    data.write_text(json.dumps({"prompt": "q", "answer_a": "x", "answer_b": "y"}) + "\n")
    assert rlhf(argv + ["--judge", "127.0.0.1:1", "--set", "timeout_s=5"]) == 2
    assert "config field 'judge': no JudgeService at 127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_labels_kafka_did_not_acknowledge_fail_the_call():
    """With `publish` on in the settings and no broker at the address, Compare is UNAVAILABLE:
    an OK always means the labels are in Kafka."""
    nowhere = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    with judge_stack(None, annotator=RULE, publish=True, kafka=nowhere) as judge:
        request = judge_pb2.CompareRequest(
            pairs=[
                judge_pb2.JudgedPair(
                    prompt=common_pb2.Prompt(text="q"), answer_a="long answer", answer_b="short"
                )
            ]
        )
        with pytest.raises(grpc.RpcError) as caught:
            judge.stub().Compare(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "publishing the labels failed" in caught.value.details()
        assert judge.metric("rlhf_judge_labels_published_total") == 0
        # A tie publishes nothing, so it needs no broker and answers.
        tie = judge_pb2.CompareRequest(
            pairs=[
                judge_pb2.JudgedPair(
                    prompt=common_pb2.Prompt(text="q"), answer_a="ab", answer_b="cd"
                )
            ]
        )
        assert judge.stub().Compare(tie, timeout=60).verdicts[0].p_a_better == 0.5
