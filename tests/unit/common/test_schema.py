"""Self-describing records: the headers, and decoding by them from the descriptor set alone."""

from __future__ import annotations

import pytest

from services.common.kafka import ProtobufProducer
from services.common.schema import (
    SchemaError,
    decode_record,
    descriptor_set_path,
    message_class,
    record_headers,
)
from services.genproto.rlhf.v1 import events_pb2


def test_headers_name_the_content_type_and_the_full_message_name():
    assert record_headers(events_pb2.GenerationRecord()) == [
        ("content-type", b"application/x-protobuf"),
        ("message-type", b"rlhf.v1.GenerationRecord"),
    ]


def test_a_record_decodes_by_its_headers_into_a_class_built_from_the_set():
    record = events_pb2.FeedbackEvent(feedback_id="f", response_id="r", thumb=events_pb2.THUMB_UP)
    decoded = decode_record(record_headers(record), record.SerializeToString())
    assert type(decoded) is not events_pb2.FeedbackEvent  # built from the set, not generated code
    assert decoded.SerializeToString() == record.SerializeToString()
    assert decoded.response_id == "r"
    assert descriptor_set_path().stat().st_size > 0


def test_records_that_do_not_say_what_they_hold_are_refused():
    with pytest.raises(SchemaError, match="content-type"):
        decode_record([], b"")
    with pytest.raises(SchemaError, match="message-type"):
        decode_record([("content-type", b"application/x-protobuf")], b"")
    with pytest.raises(SchemaError, match="no message"):
        message_class("rlhf.v1.Nope")


def test_the_producer_adds_the_headers_before_the_callers_own(monkeypatch):
    sent = {}

    def fake_send(self, topic, value=None, key=None, headers=None, **kwargs):
        sent.update(topic=topic, headers=headers)

    monkeypatch.setattr("kafka.KafkaProducer.send", fake_send)
    monkeypatch.setattr("kafka.KafkaProducer.__del__", lambda self: None)
    producer = object.__new__(ProtobufProducer)  # no broker: only send() is exercised
    producer.send("t", value=events_pb2.Rollout(), headers=[("trace", b"1")])
    assert sent["headers"] == [*record_headers(events_pb2.Rollout()), ("trace", b"1")]
    producer.send("t", value=b"raw")
    assert sent["headers"] is None  # bytes say nothing about their type: no claim is made
