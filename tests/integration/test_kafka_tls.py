"""Kafka over TLS on a real broker: an SSL listener with mutual TLS and a SASL_SSL listener
(PLAIN), each used by every kind of client the platform has (kafka-python's producer, consumer
and admin client from services.common.kafka, and the gateway's librdkafka producer), and the
refusals: no client certificate, a wrong password. The password never shows in a repr or a log.

The broker is this module's own (deploy.local.kafka with `tls`), with a CA, a broker
certificate and a client certificate made here (tests/support/certs.py); it is stopped at the end.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from kafka import TopicPartition

from deploy.local.kafka import BrokerTls, KafkaBroker
from services.common import topics
from services.common.kafka import connect_admin, decode, make_consumer, make_producer
from services.common.schema import record_headers
from services.common.settings import KafkaSettings
from services.genproto.rlhf.v1 import events_pb2
from tests.support.certs import CertificateAuthority, Issued

SASL_USER = "rlhf_gateway"
SASL_PASSWORD = "pw-" + uuid.uuid4().hex
LISTENERS = ("SSL", "SASL_SSL")


@dataclass
class TlsBroker:
    """The broker, and what its clients present: the CA, a client certificate, the login."""

    broker: KafkaBroker
    ca_file: Path
    client: Issued

    def settings(self, listener: str, **fields) -> KafkaSettings:
        """Client settings for `listener`: the CA, plus the client certificate (SSL) or the
        login (SASL_SSL); `fields` override."""
        side = (
            {"ssl_cert_file": self.client.cert_file, "ssl_key_file": self.client.key_file}
            if listener == "SSL"
            else {"sasl_username": SASL_USER, "sasl_password": SASL_PASSWORD}
        )
        return self.broker.client_settings(
            listener,
            ssl_ca_file=self.ca_file,
            client_id="pytest-tls",
            request_timeout_ms=5_000,
            **{**side, **fields},
        )


@pytest.fixture(scope="module")
def tls(run_dir):
    folder = run_dir / "kafka-tls"
    ca = CertificateAuthority.create(folder / "ca")
    server = ca.issue(folder / "broker", "kafka-broker", server=True)
    broker = KafkaBroker(
        state_dir=folder / "kafka",
        tls=BrokerTls(
            ca_file=ca.cert_file,
            cert_file=server.cert_file,
            key_file=server.key_file,
            sasl_users={SASL_USER: SASL_PASSWORD},
        ),
    )
    try:
        broker.start()
        yield TlsBroker(broker, ca.cert_file, ca.issue(folder / "client", "pytest-client"))
    finally:
        broker.stop()


def _rollout() -> events_pb2.Rollout:
    return events_pb2.Rollout(
        rollout_id=f"tls-{uuid.uuid4().hex[:12]}",
        group_id="g-tls",
        prompt_token_ids=[1, 2, 3],
        response_token_ids=[4, 5],
        behaviour_logprobs=[-0.5, -1.25],
        reference_logprobs=[-0.75, -1.0],
        reward=0.25,
        weights_version=3,
        group_size=2,
    )


def _read_back(consumer, rollout_id: str, polls: int = 40) -> events_pb2.Rollout | None:
    for _ in range(polls):
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                if record.key.decode() == rollout_id:
                    return decode(events_pb2.Rollout, record.value)
    return None


@pytest.mark.parametrize("listener", LISTENERS)
def test_protobuf_round_trip(tls, listener):
    settings = tls.settings(listener)
    sent = _rollout()
    producer = make_producer(settings)
    meta = producer.send(topics.ROLLOUTS, key=sent.rollout_id, value=sent).get(timeout=30)
    producer.close()
    assert meta.offset >= 0

    consumer = make_consumer(settings, f"tls-{uuid.uuid4().hex[:8]}", [topics.ROLLOUTS])
    try:
        assert consumer.config["security_protocol"] == listener
        assert _read_back(consumer, sent.rollout_id) == sent
    finally:
        consumer.close()


@pytest.mark.parametrize("listener", LISTENERS)
def test_admin_lists_topics(tls, listener):
    admin = connect_admin(tls.settings(listener), timeout_s=30)
    try:
        assert {s.name for s in topics.TOPICS} <= set(admin.list_topics())
    finally:
        admin.close()


@pytest.mark.parametrize("listener", LISTENERS)
def test_gateway_librdkafka_producer_delivers(tls, listener):
    from services.gateway.publisher import make_producer as make_gateway_producer

    settings = tls.settings(listener)
    sent = _rollout()
    reports = []
    producer = make_gateway_producer(settings)
    producer.produce(
        topics.ROLLOUTS,
        key=sent.rollout_id.encode(),
        value=sent.SerializeToString(),
        headers=record_headers(sent),
        on_delivery=lambda error, message: reports.append((error, message)),
    )
    assert producer.flush(30) == 0
    [(error, message)] = reports
    assert error is None, error

    # kafka-python reads exactly that record back over the same listener.
    consumer = make_consumer(settings, group_id=None)
    try:
        tp = TopicPartition(topics.ROLLOUTS, message.partition())
        consumer.assign([tp])
        consumer.seek(tp, message.offset())
        assert _read_back(consumer, sent.rollout_id) == sent
    finally:
        consumer.close()


def test_mtls_listener_refuses_a_client_without_certificate(tls):
    settings = tls.settings("SSL", ssl_cert_file=None, ssl_key_file=None)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"\(SSL\) did not answer in 3s: .*SSL"):
        connect_admin(settings, timeout_s=3)
    assert time.monotonic() - started < 20


def _capture_platform_logs(caplog) -> None:
    """Everything at INFO and up (the platform keeps kafka-python at WARNING:
    services/common/logging.py; its DEBUG wire dumps print SASL PLAIN bytes, password and all),
    and the admin client's DEBUG line that prints its whole configuration."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kafka.admin.client")


def test_wrong_sasl_password_is_refused_clearly(tls, caplog):
    _capture_platform_logs(caplog)
    wrong = "wrong-" + uuid.uuid4().hex
    settings = tls.settings("SASL_SSL", sasl_password=wrong)
    started = time.monotonic()
    # kafka-python mostly sees only the connection close that follows the broker's refusal (it
    # drops a response that arrives with the close); when it does read the refusal, it says so.
    with pytest.raises(
        TimeoutError, match=r"refused the SASL login|as it does on a refused SASL login"
    ) as refused:
        connect_admin(settings, timeout_s=3)
    assert time.monotonic() - started < 20
    assert wrong not in str(refused.value) and wrong not in caplog.text


def test_gateway_producer_reports_a_wrong_password(tls):
    from services.gateway.publisher import make_producer as make_gateway_producer

    wrong = "wrong-" + uuid.uuid4().hex
    errors, reports = [], []
    producer = make_gateway_producer(
        tls.settings("SASL_SSL", sasl_password=wrong, delivery_timeout_ms=3_000),
        error_cb=errors.append,
        log_level=0,  # its own log lines say the same; the test reads the error callback
    )
    producer.produce(topics.ROLLOUTS, value=b"x", on_delivery=lambda e, m: reports.append(e))
    assert producer.flush(15) == 0  # the record failed within its delivery timeout: no hang
    [report] = reports
    assert report is not None
    refusals = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
    assert refusals and "Invalid username or password" in refusals[0].str()
    assert not [e for e in errors if wrong in e.str()]


def test_password_is_in_no_repr_and_no_log(tls, caplog):
    _capture_platform_logs(caplog)
    settings = tls.settings("SASL_SSL")
    assert SASL_PASSWORD not in repr(settings) and SASL_PASSWORD not in str(settings)
    admin = connect_admin(settings, timeout_s=30)
    admin.list_topics()
    admin.close()
    producer = make_producer(settings)
    producer.send(topics.ROLLOUTS, key="k", value=_rollout()).get(timeout=30)
    producer.close()
    assert "'sasl_plain_password': '**********'" in caplog.text  # the configuration was logged,
    assert SASL_PASSWORD not in caplog.text  # ... without the password
